"""ROME: rank-one model editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

One fact is written into the MLP output projection W of one layer as a rank-one update:

1. **Key** k*: the projection's input at the subject's last token, averaged over the prompt
   preceded by short generated context prefixes.
2. **Direction** u = C⁻¹k*, with C = E[k kᵀ] over a text corpus (:mod:`factedit.stats`); with
   ``mom2_adjustment=False`` u = k* (the FastEdit-style simplification).
3. **Value** v*: a vector δ is added to the MLP output at the subject's last token and
   optimised so that the new target follows every prefixed prompt, with a KL term keeping the
   model's next-token distribution after "{subject} is a" unchanged, weight decay on δ and a
   norm clamp; v* = (original MLP output) + δ.
4. **Update** ΔW = (v* − W k*) uᵀ / (uᵀ k*), so that W' k* = v*, applied in the weight's
   storage orientation. With ``key_mode="each"`` the rank-one update instead gives every
   optimised prompt's key the same shift (see :class:`ROMEHParams`).

The research code formed step 4 with the key of the unprefixed prompt instead of k*, which
produces the "disabling" edits described by Gupta et al. 2024 (r-ROME). factedit uses k*; the
original behaviour is available with ``original_key_bug=True``.

Speed (the value optimisation is nearly all of an edit's time): the blocks below the edited
layer do not depend on δ, so their outputs are computed once and replayed; logits are formed
only at the positions a loss reads; the frozen network can run under bfloat16 autocast
(``value_dtype``), with δ and the loss in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch
from ..fingerprint import module_params_fingerprint
from ..generation import generate
from ..hooks import (
    Trace,
    TraceDict,
    as_batch_seq,
    first_tensor,
    frozen_parameters,
    get_module,
    replace_module,
    with_first_tensor,
)
from ..hparams import HParams
from ..models import cache_dir as default_cache_dir
from ..models import model_device, module_device, parse_dtype
from ..requests import EditRequest
from ..scoring import target_prob
from ..stats import layer_stats
from ..tokens import encode_target, subject_token_range
from .base import EditContext, EditMethod, LowRankDelta, PhaseTimer, WeightEditor

log = logging.getLogger(__name__)


@dataclass
class ROMEHParams(HParams):
    """ROME's hyperparameters (defaults: the research code's GPT-2 XL settings, except where
    measurement on the default model chose otherwise; see ``configs/rome``).

    Attributes:
        layer: block whose MLP output projection is edited.
        context_templates: ``[[n_tokens, n_prompts], ...]``: generated prefixes of each length.
        template_seed: seed for generating the prefixes.
        v_num_grad_steps, v_lr: Adam steps and learning rate for δ.
        v_weight_decay: weight of ‖δ‖² / ‖v₀‖² in the loss.
        clamp_norm_factor: ‖δ‖ is clamped to this times ‖v₀‖.
        kl_factor: weight of the KL term on the "{} is a" prompts.
        kl_prompts: prompts (with ``{}`` for the subject) whose distribution must stay.
        early_stop_loss: stop once the mean target NLL falls below this.
        mom2_adjustment: use u = C⁻¹k* (True) or u = k* (False, FastEdit-style).
        mom2_tokens: corpus tokens for C.
        original_key_bug: reproduce the research code's update with the unprefixed key.
        key_mode: ``"mean"``: ΔW maps k* to W k* + δ (the paper, with r-ROME's fix);
            ``"each"``: the rank-one ΔW = δ wᵀ whose w has the smallest C-norm with
            wᵀkᵢ = 1 for every prompt's key kᵢ, the bare prompt's included, so each prompt the
            value was optimised on gets the same shift δ.
        value_dtype: autocast dtype for the frozen network during the value optimisation
            (``"bfloat16"`` or ``None`` for the model's dtype).
        replay_lower_layers: compute the blocks below ``layer`` once and replay them.
    """

    layer: int = 5
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    template_seed: int = 0
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    early_stop_loss: float = 0.05
    mom2_adjustment: bool = True
    mom2_tokens: int = 200_000
    original_key_bug: bool = False
    key_mode: str = "mean"
    value_dtype: str | None = None
    replay_lower_layers: bool = True

    def adapt(self, arch: ModelArch) -> ROMEHParams:
        # ROME's sweeps put the best layer in the lower third of the network (17 of 48 in
        # GPT-2 XL, 5 of 28 in GPT-J); without a measured default, take the same proportion.
        return self.replace(layer=max(0, round(arch.n_layers * 0.2)))


class ROME(EditMethod):
    name = "rome"
    summary = "rank-one update of one MLP output projection (r-ROME key fix on by default)"
    hparams_class = ROMEHParams

    def check(self, hparams: ROMEHParams, arch: ModelArch) -> None:
        if hparams.key_mode not in ("mean", "each"):
            raise ValueError(f"key_mode must be 'mean' or 'each', got {hparams.key_mode!r}")
        if not 0 <= hparams.layer < arch.n_layers:
            raise ValueError(f"ROME layer {hparams.layer} out of range: this model has layers 0..{arch.n_layers - 1}")
        if hparams.v_num_grad_steps < 1 or hparams.v_lr <= 0:
            raise ValueError("v_num_grad_steps must be >= 1 and v_lr > 0")
        if hparams.mom2_tokens < 1:
            raise ValueError("mom2_tokens must be positive")
        parse_dtype(hparams.value_dtype)
        for p in hparams.kl_prompts:
            if p.count("{}") != 1:
                raise ValueError(f"kl_prompts entries need exactly one '{{}}': {p!r}")

    def execute(
        self,
        model: nn.Module,
        tok: Any,
        requests: list[EditRequest],
        hparams: ROMEHParams,
        editor: WeightEditor,
        arch: ModelArch,
        context: EditContext,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        timer = PhaseTimer(timings)
        diagnostics = []
        with timer("templates"):
            templates = context_templates(model, tok, hparams, context)
        with timer("stats"):
            # Once for all requests: edits of this projection do not change its inputs, and the
            # statistics' cache key excludes it for that reason.
            c = None
            if hparams.mom2_adjustment:
                c = layer_stats(
                    model, tok, hparams.layer, arch=arch, corpus=context.stats_corpus,
                    tokens=context.stats_tokens or hparams.mom2_tokens,
                    cache_dir=Path(context.cache_dir) / "stats" if context.cache_dir else None,
                    progress=context.progress,
                ).mom2  # fmt: skip
        for request in requests:
            with timer("probe"):
                p_before = target_prob(model, tok, [request.text], [request.target_text]).item()
            delta, info = compute_rome_update(model, tok, request, hparams, arch, templates, c, timer)
            with timer("update"):
                editor.apply({arch.mlp_out_weight_name(hparams.layer): delta})
            with timer("probe"):
                p_after = target_prob(model, tok, [request.text], [request.target_text]).item()
            diagnostics.append({**info, "target_prob_before": p_before, "target_prob_after": p_after})
        return diagnostics


# ---- context templates -------------------------------------------------------------------


def context_templates(model: nn.Module, tok: Any, hparams: ROMEHParams, context: EditContext) -> list[str]:
    """``["{}"]`` plus generated prefixes ``"<text>. {}"``, seeded and cached on disk.

    The cache key covers the model's weights, the tokenizer's vocabulary size, the lengths and
    the seed, so a different or edited model gets its own prefixes.
    """
    spec = {"lengths": hparams.context_templates, "seed": hparams.template_seed, "version": 1}
    fp = module_params_fingerprint(model, [""])
    key = hashlib.sha256(json.dumps({**spec, "weights": fp, "vocab": len(tok)}, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(context.cache_dir or default_cache_dir()) / "templates"
    path = folder / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["templates"]
    starts = ["The", "Therefore", "Because", "I", "You"]
    templates = ["{}"]
    for i, (length, n) in enumerate(hparams.context_templates):
        prompts = [starts[j % len(starts)] for j in range(n)]
        texts = generate(
            model, tok, prompts, max_new_tokens=length, top_k=5, seed=hparams.template_seed + i
        )
        for t in texts:
            t = " ".join(t.replace("{", " ").replace("}", " ").split())
            templates.append(t + ". {}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"templates": templates, **spec}, indent=1))
    os.replace(tmp, path)
    return templates


# ---- batches with subject positions --------------------------------------------------------


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor  # (rows,) position of the subject's last token
    target_pos: list[list[int]]  # rewrite rows only
    last_pos: int  # every row's last position (left padding)


def _subject_batch(tok: Any, texts: list[str], subject: str, starts: list[int], suffix_ids: list[list[int]]) -> _Batch:
    rows, spos = [], []
    for text, start, suffix in zip(texts, starts, suffix_ids, strict=True):
        ids = tok(text)["input_ids"]
        _, end = subject_token_range(tok, text, subject, start_char=start)
        rows.append(ids + suffix)
        spos.append(end - 1 - len(ids))  # relative to the prompt's end
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids_t)
    subj, tpos = [], []
    for i, (r, s, suffix) in enumerate(zip(rows, spos, suffix_ids, strict=True)):
        off = width - len(r)
        ids_t[i, off:] = torch.tensor(r)
        mask[i, off:] = 1
        prompt_end = width - len(suffix)  # index just past the prompt
        subj.append(prompt_end + s)
        tpos.append(list(range(prompt_end - 1, prompt_end - 1 + len(suffix) + 1)))
    return _Batch(ids_t, mask, torch.tensor(subj), tpos, width - 1)


# ---- the update --------------------------------------------------------------------------


@torch.no_grad()
def compute_key(
    model: nn.Module, tok: Any, request: EditRequest, arch: ModelArch, layer: int, templates: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection input at the subject's last token for each prefixed prompt, ``(n, d)``
    in template order (k* is their mean; template ``"{}"`` gives the bare prompt's key)."""
    texts, starts = _prefixed(request, templates)
    b = _subject_batch(tok, texts, request.subject, starts, [[] for _ in texts])
    device = model_device(model)
    with Trace(model, arch.mlp_out_name(layer), retain_input=True, retain_output=False, stop=True) as tr:
        model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
    # On the device that computes the layer (not the inputs' device under a device map).
    at = tr.input.device
    keys = as_batch_seq(tr.input, *b.input_ids.shape)[torch.arange(len(texts), device=at), b.subject_pos.to(at)].float()
    return keys


def _prefixed(request: EditRequest, templates: list[str]) -> tuple[list[str], list[int]]:
    texts, starts = [], []
    for t in templates:
        head = t.split("{}")[0]
        texts.append(t.replace("{}", request.text))
        starts.append(len(head))
    return texts, starts


class _Replay(nn.Module):
    """Stands in for a block whose output is fixed: returns what the block returned before."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextlib.contextmanager
def _replayed_blocks(model: nn.Module, arch: ModelArch, outputs: list[Any]) -> Iterator[None]:
    """Replace blocks ``0..len(outputs)-1`` by :class:`_Replay` stand-ins; put them back on exit."""
    originals = []
    try:
        for i, out in enumerate(outputs):
            originals.append(replace_module(model, arch.layer_name(i), _Replay(out)))
        yield
    finally:
        for i, block in enumerate(originals):
            replace_module(model, arch.layer_name(i), block)


def compute_value(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    hparams: ROMEHParams,
    arch: ModelArch,
    templates: list[str],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """δ: the shift of the MLP output at the subject's last token that makes the model say
    the target after every prefixed prompt (v* = W k* + δ).

    The model's weights are unchanged when this returns (only activations are altered,
    through hooks that are removed on exit).
    """
    device = model_device(model)  # inputs
    # δ lives where the edited layer computes; the losses where the unembedding does (they
    # differ when a device map spreads the model over devices).
    layer_dev = module_device(get_module(model, arch.mlp_name(hparams.layer)))
    out_dev = module_device(get_module(model, arch.unembed))
    target_ids = encode_target(tok, request.target_text)
    texts, starts = _prefixed(request, templates)
    kl_texts = [p.replace("{}", request.subject) for p in hparams.kl_prompts]
    kl_starts = [p.index("{}") for p in hparams.kl_prompts]
    suffixes = [target_ids[:-1]] * len(texts) + [[] for _ in kl_texts]
    b = _subject_batch(tok, texts + kl_texts, request.subject, starts + kl_starts, suffixes)
    ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
    n_rw, rows = len(texts), torch.arange(len(texts) + len(kl_texts), device=layer_dev)
    subj = b.subject_pos.to(layer_dev)
    # Flattened (row, position, target token) triples for the NLL.
    r_idx, p_idx, t_idx, weights = [], [], [], []
    for i in range(n_rw):
        pos = b.target_pos[i][: len(target_ids)]
        r_idx += [i] * len(pos)
        p_idx += pos
        t_idx += target_ids
        weights += [1.0 / len(target_ids)] * len(pos)
    r_idx_t, p_idx_t = torch.tensor(r_idx, device=out_dev), torch.tensor(p_idx, device=out_dev)
    t_idx_t, w_t = torch.tensor(t_idx, device=out_dev), torch.tensor(weights, device=out_dev)
    kl_rows = torch.arange(n_rw, n_rw + len(kl_texts), device=out_dev)
    kl_pos = torch.full_like(kl_rows, b.last_pos)
    nll_rows = torch.arange(len(t_idx_t), device=out_dev)

    mlp_name, norm_name = arch.mlp_name(hparams.layer), arch.final_norm
    autocast_dtype = parse_dtype(hparams.value_dtype)
    delta = torch.zeros(arch.hidden_size, device=layer_dev, requires_grad=True)
    state: dict[str, Any] = {}

    def add_delta(output: Any, layer: str) -> Any:
        flat = first_tensor(output)
        h = as_batch_seq(flat, *ids.shape)
        if "v0" not in state:
            state["v0"] = h[0, subj[0]].detach().float().clone()
        h = h.clone()
        h[rows, subj] = h[rows, subj] + delta.to(h.dtype)
        return with_first_tensor(output, h.view(flat.shape))

    def run() -> torch.Tensor:
        """Final-norm outputs (the lm head is applied only where a loss reads)."""
        ctx = (
            torch.autocast(device_type=layer_dev.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx, TraceDict(model, [mlp_name, norm_name], edit_output=_only(mlp_name, add_delta), stop=True) as td:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return first_tensor(td[norm_name].output)

    def logits_at(h: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return arch.logits_from_normed(model, h[r.to(h.device), p.to(h.device)]).float().to(out_dev)

    replay: list[Any] = []
    if hparams.replay_lower_layers and hparams.layer > 0:
        names = [arch.layer_name(i) for i in range(hparams.layer)]
        with torch.no_grad(), TraceDict(model, names, stop=True, detach=True) as td:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        replay = [td[n].output for n in names]

    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_ref = None
    losses: list[float] = []
    steps = 0
    with _replayed_blocks(model, arch, replay), frozen_parameters(model):
        for step in range(hparams.v_num_grad_steps):
            steps = step + 1
            opt.zero_grad()
            h = run()
            lp = torch.log_softmax(logits_at(h, r_idx_t, p_idx_t), dim=-1)
            nll = -(lp[nll_rows, t_idx_t] * w_t).sum() / n_rw
            kl_lp = torch.log_softmax(logits_at(h, kl_rows, kl_pos), dim=-1)
            if kl_ref is None:
                kl_ref = kl_lp.detach()
            kl = torch.nn.functional.kl_div(kl_lp, kl_ref, log_target=True, reduction="batchmean")
            v0 = state["v0"]
            wd = hparams.v_weight_decay * delta.norm() ** 2 / v0.norm() ** 2
            loss = (nll + hparams.kl_factor * kl).to(layer_dev) + wd
            losses.append(nll.item())
            if nll.item() < hparams.early_stop_loss:
                break
            if step == hparams.v_num_grad_steps - 1:
                break  # the last loss is measured, not stepped on
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = hparams.clamp_norm_factor * v0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return delta.detach(), {"v_steps": steps, "v_nll": losses[-1], "v_nll_first": losses[0], "delta_norm": delta.norm().item()}


def _only(name: str, fn: Any) -> Any:
    def edit(output: Any, layer: str) -> Any:
        return fn(output, layer) if layer == name else output

    return edit


def compute_rome_update(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    hparams: ROMEHParams,
    arch: ModelArch,
    templates: list[str],
    mom2: torch.Tensor | None,
    timer: PhaseTimer | None = None,
) -> tuple[LowRankDelta, dict[str, Any]]:
    """The rank-one ΔW for one request, as factors in the weight's storage orientation.

    The model is unchanged when this returns.
    """
    timer = timer or PhaseTimer({})
    layer = hparams.layer
    with timer("key"):
        keys = compute_key(model, tok, request, arch, layer, templates)
        k_star = keys.mean(0)
        k_bare = keys[templates.index("{}")] if "{}" in templates else keys[0]
    with timer("value"):
        delta_v, info = compute_value(model, tok, request, hparams, arch, templates)
    with timer("update"), torch.no_grad():
        # The optimisation shifted the MLP output by δ at every prompt, so the update must
        # map the key to W k + δ: the residual is δ itself. Dividing by uᵀk* makes the shift
        # exactly δ for k* (the mean of the prefixed keys) and δ on average over them; the
        # research code divided by uᵀk₀ (the bare prompt's key), which mis-scales the edit.
        k = k_bare if hparams.original_key_bug else k_star
        c = mom2.to(torch.float64) if mom2 is not None else None
        if hparams.key_mode == "each" and not hparams.original_key_bug:
            kk = keys.to(torch.float64 if c is None else c.device, torch.float64) if c is not None else keys.double()
            cinv_k = torch.linalg.solve(c, kk.T) if c is not None else kk.T  # (d, n)
            gram = kk @ cinv_k
            ridge = 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            alpha = torch.linalg.solve(gram + ridge, torch.ones(len(gram), dtype=gram.dtype, device=gram.device))
            left_in = (cinv_k @ alpha).float()
        else:
            u = torch.linalg.solve(c, k_star.to(c.device, torch.float64)) if c is not None else k_star.double()
            left_in = (u / torch.dot(u, k.to(u.device, torch.float64))).float()  # (in,)
        resid = delta_v.to(left_in.device)
        if arch.mlp_out_transposed:
            delta = LowRankDelta(left=left_in[:, None], right=resid[:, None])
        else:
            delta = LowRankDelta(left=resid[:, None], right=left_in[:, None])
    info.update({"layer": layer, "key_norm": k_star.norm().item(), "residual_norm": resid.norm().item()})
    return delta, info
