"""The value optimisation shared by ROME, MEMIT and AlphaEdit, batched over requests.

For each request a vector δ is added to the output of one MLP at the subject's last token and
optimised so that the new target follows the request's prompt in every context template,
while a KL term keeps the next-token distribution after "{subject} is a" where it was, a
weight decay keeps δ small and a clamp bounds ‖δ‖ (Meng et al. 2022, 2023). v* = v₀ + δ.
Optionally (``repeat_factor``) an unlikelihood term keeps the target from following itself.

Every request has its own δ, its own early stop and its own clamp, but all of them run in
one batched forward/backward pass: the loss is the sum of the requests' losses, and since
each δ only reaches its own rows, its gradient (and Adam's element-wise update) is exactly
what it would be alone. A request that has converged leaves the batch, so the passes get
cheaper as the optimisation proceeds. Public implementations loop over requests instead.

Speed: the blocks below the edited layer do not depend on δ, so their outputs are computed
once and replayed; logits are formed only at the positions a loss reads; the frozen network
can run in bfloat16 (a bfloat16 copy of the weights while it runs) with δ and the loss in
float32.

Besides the mean target NLL, a request is done only when, on every prompt, the new target's
first token is more likely than the old target's first token (the model's own answer when the
request names none): this is what stops an edit from leaving a strongly known fact in place.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import ModelArch
from .hooks import (
    TraceDict,
    as_batch_seq,
    cast_parameters,
    first_tensor,
    frozen_parameters,
    get_module,
    parameters_castable,
    replace_module,
    with_first_tensor,
)
from .models import model_device, model_dtype, module_device, parse_dtype
from .requests import EditRequest
from .tokens import encode_target, subject_token_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueConfig:
    """What the value optimisation needs from a method's hyperparameters.

    Attributes:
        steps: Adam steps at most (the last loss is measured, not stepped on).
        lr: Adam's learning rate for δ.
        weight_decay: weight of ‖δ‖² / ‖v₀‖² in the loss.
        clamp_norm_factor: ‖δ‖ is kept at most this times ‖v₀‖.
        kl_factor: weight of the KL term on ``kl_prompts``.
        kl_prompts: prompts (with ``{}`` for the subject) whose distribution must stay.
        early_stop_loss: a request is done once its mean target NLL is below this (and the
            new target's first token beats the old one's on every prompt).
        dtype: the dtype the frozen network runs in (``None``: the model's own); the weights
            are cast for the optimisation's duration (autocast where they are offloaded),
            δ and the losses stay in float32.
        replay_lower_layers: compute the blocks below the layer once and replay them.
        margin: the log-probability by which the new target's first token must beat the old
            one's on every prompt before a request counts as done (``None`` disables the check).
        prefix_cache: compute the columns before the subject's last token once (keys and
            values of every layer) and run only the rest at each step; same values, less work.
        repeat_factor: weight of an unlikelihood term, −log(1 − P(the new target's first
            token)), at the token after the whole target on every rewrite prompt: δ must not
            make the target follow itself. Without it the edited model's generations can
            loop on the target ("is a philosopher philosopher philosopher ..."), one part of
            the fluency (GE) a mass edit loses. 0: off (the research code).
    """

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    early_stop_loss: float = 0.05
    dtype: str | None = None
    replay_lower_layers: bool = True
    margin: float | None = 0.0
    prefix_cache: bool = True
    repeat_factor: float = 0.0

    @classmethod
    def from_hparams(cls, hp: Any, **overrides: Any) -> ValueConfig:
        """From a method's hyperparameters with the ``v_*`` field names of ROME/MEMIT."""
        margin = getattr(hp, "value_margin", 0.0)
        prefix_cache = getattr(hp, "prefix_cache", True)
        repeat_factor = getattr(hp, "repeat_factor", 0.0)
        cfg = cls(
            steps=hp.v_num_grad_steps,
            lr=hp.v_lr,
            weight_decay=hp.v_weight_decay,
            clamp_norm_factor=hp.clamp_norm_factor,
            kl_factor=hp.kl_factor,
            kl_prompts=tuple(hp.kl_prompts),
            early_stop_loss=hp.early_stop_loss,
            dtype=hp.value_dtype,
            replay_lower_layers=hp.replay_lower_layers,
            margin=margin,
            prefix_cache=prefix_cache,
            repeat_factor=repeat_factor,
        )
        return cls(**{**cfg.__dict__, **overrides}) if overrides else cfg


def cpu_has_bfloat16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX tiles or AVX-512 BF16; on
    this project's Xeon 2.5x float32 for ROME-sized products). Elsewhere bfloat16 is emulated."""
    probes = [
        getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    ]
    return any(bool(p()) for p in probes if p is not None)


def resolve_value_dtype(name: str | None, model: nn.Module) -> torch.dtype | None:
    """The dtype the value optimisation runs in: ``None`` (the model's own), a dtype name, or
    ``"auto"``: bfloat16 for a model on a CPU with bfloat16 matrix units
    (:func:`cpu_has_bfloat16_units`), the model's own dtype elsewhere (on accelerators a gain
    was not measured)."""
    if name == "auto":
        on_cpu = model_device(model).type == "cpu"
        return torch.bfloat16 if on_cpu and cpu_has_bfloat16_units() else None
    return parse_dtype(name)


def check_value_hparams(hp: Any) -> None:
    """Raise ``ValueError`` for ``v_*`` fields (see :meth:`ValueConfig.from_hparams`) that
    cannot work: the checks every method built on this optimiser shares."""
    if hp.v_num_grad_steps < 1 or hp.v_lr <= 0:
        raise ValueError("v_num_grad_steps must be >= 1 and v_lr > 0")
    if hp.value_dtype != "auto":
        parse_dtype(hp.value_dtype)
    for p in hp.kl_prompts:
        if p.count("{}") != 1:
            raise ValueError(f"kl_prompts entries need exactly one '{{}}': {p!r}")
    if getattr(hp, "repeat_factor", 0.0) < 0:
        raise ValueError(f"repeat_factor must be >= 0, got {hp.repeat_factor}")


@dataclass
class ValueResult:
    """The optimised shift for one request.

    ``delta`` is δ (float32, on the edited layer's device); ``v0`` the MLP output it was added
    to at the bare prompt's subject token; ``done`` whether the request met its stopping
    criterion within the step budget; ``clamped`` whether ‖δ‖ ended at its bound; ``dtype``
    the dtype the network ran in; ``repeat_prob`` (with ``repeat_factor``) the mean over the
    rewrite prompts of P(the target's first token right after the whole target).
    """

    delta: torch.Tensor
    v0: torch.Tensor
    steps: int
    nll_first: float
    nll: float
    margin: float
    done: bool
    clamped: bool
    dtype: str = "float32"
    repeat_prob: float | None = None

    def info(self) -> dict[str, Any]:
        return {
            "v_steps": self.steps,
            "v_nll_first": self.nll_first,
            "v_nll": self.nll,
            "v_margin": self.margin,
            "v_done": self.done,
            "v_clamped": self.clamped,
            "v_dtype": self.dtype,
            "delta_norm": self.delta.norm().item(),
            **({"v_repeat_prob": self.repeat_prob} if self.repeat_prob is not None else {}),
        }


# ---- batches ------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Every request's prompts in one batch, aligned on the subject's last token.

    Row kinds: rewrite rows (a template filled with the request's prompt, followed by the new
    target's tokens but the last, or all of them with ``repeat``) and KL rows (a KL prompt
    filled with the subject). Each row is left-padded up to its subject's last token, which
    sits at column ``split`` in every row, and right-padded after its last token. Columns
    before ``split`` do not depend on δ (the model is causal), so their keys and values can be
    computed once.
    """

    input_ids: torch.Tensor  # (rows, width)
    attention_mask: torch.Tensor
    split: int  # the column of every row's subject-last token
    request: torch.Tensor  # (rows,) request index
    is_kl: torch.Tensor  # (rows,) bool
    last_pos: torch.Tensor  # (rows,) column of each row's last real token
    bare: torch.Tensor  # (requests,) the row of each request's bare ("{}") prompt
    # Flattened NLL terms: (row, column, token, weight) with weights 1/(len(target)·n_templates).
    nll_row: torch.Tensor
    nll_pos: torch.Tensor
    nll_tok: torch.Tensor
    nll_w: torch.Tensor
    first_pos: torch.Tensor  # (rows,) column predicting the target's first token
    new_first: torch.Tensor  # (requests,) first token of the new target
    old_first: torch.Tensor  # (requests,) first token of the old target, -1 if none/same
    # With ``repeat``: (row, column) of each rewrite row's last target token, whose prediction
    # of the target's first token is penalised, and the term's weight 1/n_templates.
    rep_row: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    rep_pos: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    rep_w: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def subject_pos(self) -> torch.Tensor:
        return torch.full((self.input_ids.shape[0],), self.split, dtype=torch.long)


def _fill(template: str, text: str) -> tuple[str, int]:
    head = template.split("{}")[0]
    return template.replace("{}", text), len(head)


def build_rows(
    tok: Any,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    kl_prompts: Sequence[str],
    old_first: Sequence[int | None],
    *,
    repeat: bool = False,
) -> _Rows:
    """Tokenise every request's rewrite and KL prompts into one batch (see :class:`_Rows`).

    With ``repeat`` the rewrite rows carry the whole target, so that the column of its last
    token predicts what follows it (``rep_row``/``rep_pos``); the NLL terms are unchanged."""
    heads: list[list[int]] = []  # tokens before the subject's last token
    tails: list[list[int]] = []  # from the subject's last token to the row's end
    meta: list[tuple[int, bool, int]] = []  # request, kl, prompt tokens in the tail
    targets = []
    for j, r in enumerate(requests):
        tid = encode_target(tok, r.target_text)
        if not tid:
            raise ValueError(f"target {r.target_text!r} maps to no tokens")
        targets.append(tid)
        filled = [_fill(t, r.text) for t in templates] + [_fill(p, r.subject) for p in kl_prompts]
        for i, (text, start) in enumerate(filled):
            kl = i >= len(templates)
            ids = tok(text)["input_ids"]
            _, end = subject_token_range(tok, text, r.subject, start_char=start)
            heads.append(ids[: end - 1])
            tails.append(ids[end - 1 :] + ([] if kl else (tid if repeat else tid[:-1])))
            meta.append((j, kl, len(ids) - end + 1))
    split = max(len(h) for h in heads)
    width = split + max(len(t) for t in tails)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids_t = torch.full((len(heads), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids_t)
    req, is_kl, first, last = [], [], [], []
    nll_row, nll_pos, nll_tok, nll_w = [], [], [], []
    rep_row, rep_pos = [], []
    bare: list[int] = [-1] * len(requests)
    bare_index = list(templates).index("{}") if "{}" in templates else 0
    seen: dict[int, int] = {}
    for i, (head, tail, (j, kl, n_prompt_tail)) in enumerate(zip(heads, tails, meta, strict=True)):
        row = head + tail
        lo = split - len(head)
        ids_t[i, lo : lo + len(row)] = torch.tensor(row)
        mask[i, lo : lo + len(row)] = 1
        req.append(j)
        is_kl.append(kl)
        prompt_last = split + n_prompt_tail - 1
        first.append(prompt_last)
        last.append(lo + len(row) - 1)
        if not kl:
            k = seen.get(j, 0)
            seen[j] = k + 1
            if k == bare_index:
                bare[j] = i
            tid = targets[j]
            for t, token in enumerate(tid):
                nll_row.append(i)
                nll_pos.append(prompt_last + t)
                nll_tok.append(token)
                nll_w.append(1.0 / (len(tid) * len(templates)))
            if repeat:
                rep_row.append(i)
                rep_pos.append(prompt_last + len(tid))
    new_first = [t[0] for t in targets]
    old = [
        (-1 if (o is None or o == nf) else o) for o, nf in zip(old_first, new_first, strict=True)
    ]
    return _Rows(
        ids_t, mask, split, torch.tensor(req), torch.tensor(is_kl), torch.tensor(last),
        torch.tensor(bare), torch.tensor(nll_row), torch.tensor(nll_pos), torch.tensor(nll_tok),
        torch.tensor(nll_w), torch.tensor(first), torch.tensor(new_first), torch.tensor(old),
        torch.tensor(rep_row, dtype=torch.long), torch.tensor(rep_pos, dtype=torch.long),
        torch.full((len(rep_row),), 1.0 / len(templates)),
    )  # fmt: skip


# ---- replaying the lower blocks -----------------------------------------------------------


class BlockReplay(nn.Module):
    """Stands in for a block whose output is fixed: returns the recorded output for the rows
    currently in the batch."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.full = output
        self.output = output

    def select(self, rows: torch.Tensor, n_rows: int) -> None:
        self.output = _take_rows(self.full, rows, n_rows)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _take_rows(value: Any, rows: torch.Tensor, n_rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == n_rows:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, n_rows) for v in value)
    return value


@contextlib.contextmanager
def replayed_blocks(
    model: nn.Module, arch: ModelArch, n_blocks: int, output: Any
) -> Iterator[list[BlockReplay]]:
    """Replace blocks ``0..n_blocks-1`` by :class:`BlockReplay` stand-ins that return ``output``,
    the recorded output of block ``n_blocks - 1`` (the stand-ins ignore their inputs, so only the
    top one's output matters and the model computes only the blocks above); put the blocks back
    on exit."""
    originals, stand_ins = [], []
    try:
        for i in range(n_blocks):
            stand_in = BlockReplay(output)
            originals.append(replace_module(model, arch.layer_name(i), stand_in))
            stand_ins.append(stand_in)
        yield stand_ins
    finally:
        for i, block in enumerate(originals):
            replace_module(model, arch.layer_name(i), block)


# ---- the optimisation ---------------------------------------------------------------------


def optimize_values(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    arch: ModelArch,
    layer: int,
    templates: Sequence[str],
    cfg: ValueConfig,
    *,
    old_first: Sequence[int | None] | None = None,
    init: Sequence[torch.Tensor | None] | None = None,
    progress: bool = False,
) -> list[ValueResult]:
    """Optimise one δ per request at the output of ``layer``'s MLP, all in one batch.

    Args:
        old_first: per request, the token id the new target must beat (the old target's first
            token); ``None`` entries (or the argument) skip that criterion.
        init: per request, a δ to start from (to continue an earlier optimisation).

    The model's weights are unchanged when this returns (only activations are altered,
    through hooks and stand-in modules that are removed on exit, however it exits; with
    ``cfg.dtype`` the weights hold a ``cfg.dtype`` copy while it runs and get their original
    tensors back on exit).
    """
    if not requests:
        return []
    dtype = resolve_value_dtype(cfg.dtype, model) or model_dtype(model)
    with _precision(model, dtype) as autocast_dtype:
        results = _optimize(
            model,
            tok,
            requests,
            arch,
            layer,
            templates,
            cfg,
            old_first,
            init,
            progress,
            autocast_dtype,
        )
    for r in results:
        r.dtype = str(dtype).removeprefix("torch.")
    return results


@contextlib.contextmanager
def _precision(model: nn.Module, dtype: torch.dtype) -> Iterator[torch.dtype | None]:
    """Make the frozen network compute in ``dtype`` inside the block; yields the autocast
    dtype the passes must run under (``None``: none needed)."""
    if dtype == model_dtype(model):
        yield None
    elif not parameters_castable(model):
        # Offloaded weights are loaded back in their own dtype by accelerate: autocast instead.
        yield dtype
    else:
        # Native low-precision kernels on a copy of the weights: on CPUs with bfloat16 matrix
        # units ~2.5x faster per matrix product than float32, where autocast, which re-casts
        # every frozen weight at every use, is slower than float32. On CPU attention goes
        # through the math backend: the flash kernel's bfloat16 backward is ~15x slower than
        # its float32 one there (8.7 ms vs 0.58 ms per call on the default model).
        with contextlib.ExitStack() as stack:
            stack.enter_context(cast_parameters(model, dtype))
            if model_device(model).type == "cpu":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            yield None


def _optimize(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    arch: ModelArch,
    layer: int,
    templates: Sequence[str],
    cfg: ValueConfig,
    old_first: Sequence[int | None] | None,
    init: Sequence[torch.Tensor | None] | None,
    progress: bool,
    autocast_dtype: torch.dtype | None,
) -> list[ValueResult]:
    """:func:`optimize_values` on the weights as they are, under ``autocast_dtype`` if given."""
    old_first = list(old_first) if old_first is not None else [None] * len(requests)
    if cfg.margin is None:
        old_first = [None] * len(requests)
    in_device = model_device(model)
    # δ lives where the edited layer computes, the losses where the unembedding does (they
    # differ when a device map spreads the model over devices).
    device = module_device(get_module(model, arch.mlp_name(layer)))
    out_device = module_device(get_module(model, arch.unembed))
    b = build_rows(
        tok, requests, templates, cfg.kl_prompts, old_first, repeat=cfg.repeat_factor > 0
    )
    n_rows, n_req = b.input_ids.shape[0], len(requests)

    def autocast() -> Any:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    # The columns before the subject's last token do not depend on δ: when the model's cache
    # allows it, their keys and values are computed once and each step runs only the rest.
    prefix = _PrefixCache.build(model, arch, b, in_device, autocast) if cfg.prefix_cache else None
    offset = b.split if prefix is not None else 0
    ids_all = b.input_ids[:, offset:].to(in_device)
    mask_all = b.attention_mask.to(in_device)  # always the full width: the cache covers the rest
    req_all, kl_all = b.request.to(device), b.is_kl.to(device)
    new_first, old_first_t = b.new_first.to(device), b.old_first.to(device)
    nll_row, nll_pos = b.nll_row.to(device), (b.nll_pos - offset).to(device)
    nll_tok, nll_w = b.nll_tok.to(device), b.nll_w.to(device)
    rep_row, rep_pos, rep_w = (
        b.rep_row.to(device),
        (b.rep_pos - offset).to(device),
        b.rep_w.to(device),
    )
    first_pos_all = (b.first_pos - offset).to(device)
    last_pos_all = (b.last_pos - offset).to(device)
    subj_col = b.split - offset

    deltas = [
        (init[j].detach().clone().float().to(device) if init is not None and init[j] is not None
         else torch.zeros(arch.hidden_size, device=device)).requires_grad_(True)
        for j in range(n_req)
    ]  # fmt: skip
    v0 = torch.zeros(n_req, arch.hidden_size, device=device)
    mlp_name, norm_name = arch.mlp_name(layer), arch.final_norm
    state: dict[str, Any] = {}

    def run(names_stop: list[str] | None = None, edit: Any = None) -> TraceDict:
        kwargs: dict[str, Any] = {"input_ids": state["ids"], "attention_mask": state["mask"]}
        if prefix is not None:
            kwargs.update(prefix.forward_kwargs(state["rows"]))
        else:
            kwargs["use_cache"] = False
        names = names_stop or [mlp_name, norm_name]
        with (
            autocast(),
            TraceDict(model, names, edit_output=edit, stop=True, detach=edit is None) as td,
        ):
            model(**kwargs)
        return td

    n_replayed, replay = 0, None
    if cfg.replay_lower_layers and layer > 0:
        state.update(rows=torch.arange(n_rows), ids=ids_all, mask=mask_all)
        below = arch.layer_name(layer - 1)
        with torch.no_grad():
            replay = run([below])[below].output
        n_replayed = layer

    active = torch.ones(n_req, dtype=torch.bool)

    def select(rows: torch.Tensor) -> None:
        """Make ``rows`` (indices into the full batch) the current batch."""
        state["rows"] = rows
        rows_in, rows_d = rows.to(in_device), rows.to(device)
        state["ids"], state["mask"] = ids_all[rows_in], mask_all[rows_in]
        state["req"] = req_all[rows_d]
        # Map full-batch row indices to positions in the current batch.
        where = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        where[rows_d] = torch.arange(len(rows), device=device)
        keep = where[nll_row] >= 0
        state["nll"] = (
            where[nll_row[keep]],
            nll_pos[keep],
            nll_tok[keep],
            nll_w[keep],
            req_all[nll_row[keep]],
        )
        keep = where[rep_row] >= 0
        state["rep"] = (where[rep_row[keep]], rep_pos[keep], rep_w[keep], req_all[rep_row[keep]])
        rw = ~kl_all[rows_d]
        state["rw_local"] = torch.nonzero(rw).squeeze(1)
        state["rw_first"] = first_pos_all[rows_d][rw]
        state["rw_req"] = req_all[rows_d][rw]
        kl = kl_all[rows_d]
        state["kl_local"] = torch.nonzero(kl).squeeze(1)
        state["kl_pos"] = last_pos_all[rows_d][kl]
        state["kl_req"] = req_all[rows_d][kl]
        for stand_in in state.get("replays", []):
            stand_in.select(rows_in, n_rows)

    def add_delta(output: Any, name: str) -> Any:
        if name != mlp_name:
            return output
        flat = first_tensor(output)
        h = as_batch_seq(flat, *state["ids"].shape)
        if state.get("capture_v0"):
            bare_local = state["bare_local"]
            v0[state["req"][bare_local]] = h[bare_local, subj_col].detach().float()
        d = torch.stack(deltas)[state["req"]].to(h.dtype)
        h = h.clone()
        h[:, subj_col] = h[:, subj_col] + d
        return with_first_tensor(output, h.view(flat.shape))

    def forward() -> torch.Tensor:
        return first_tensor(run(None, add_delta)[norm_name].output)

    def logits_at(h: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        at = h.device
        return (
            arch.logits_from_normed(model, h[r.to(at), p.to(at)].to(out_device)).float().to(device)
        )

    def per_request(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_req, device=device).index_add(0, index, values)

    results: list[ValueResult | None] = [None] * n_req
    nll_first = torch.full((n_req,), float("nan"))
    opt = torch.optim.Adam(deltas, lr=cfg.lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps,
            desc=f"value optimisation ({n_req} request{'s' * (n_req > 1)})",
            leave=False,
        )
    with replayed_blocks(model, arch, n_replayed, replay) as stand_ins, frozen_parameters(model):
        state["replays"] = stand_ins
        select(torch.arange(n_rows))
        state["bare_local"] = b.bare.to(device)

        def reference(h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The KL reference distribution (and the requests it belongs to) from a pass of
            the unshifted model whose v₀ was captured."""
            with torch.no_grad():
                ref = torch.log_softmax(
                    logits_at(h0.detach(), state["kl_local"], state["kl_pos"]), dim=-1
                )
            return ref, state["kl_req"]

        # The KL reference and v₀ come from the unshifted model, even when δ starts elsewhere.
        # Starting from δ = 0, the first step's pass *is* that model: it provides them, and no
        # separate pass is needed.
        fresh = init is None or all(i is None for i in init)
        if not fresh:
            with torch.no_grad():
                saved = [d.detach().clone() for d in deltas]
                for d in deltas:
                    d.zero_()
                state["capture_v0"] = True
                kl_ref_all, kl_ref_req = reference(forward())
                state["capture_v0"] = False
                for d, sv in zip(deltas, saved, strict=True):
                    d.copy_(sv)
        for step in range(cfg.steps):
            act_idx = torch.nonzero(active).squeeze(1).tolist()
            opt.zero_grad(set_to_none=True)
            state["capture_v0"] = fresh and step == 0
            h = forward()
            if state["capture_v0"]:
                state["capture_v0"] = False
                kl_ref_all, kl_ref_req = reference(h)
            if step == 0:
                v0_norm2 = v0.norm(dim=1) ** 2
                max_norm = cfg.clamp_norm_factor * v0.norm(dim=1)
            r, p, t, w, rq = state["nll"]
            lp = torch.log_softmax(logits_at(h, r, p), dim=-1)
            nll = per_request(-lp[torch.arange(len(t), device=device), t] * w, rq)
            # Margin of the new target's first token over the old one's, worst prompt.
            flp = torch.log_softmax(
                logits_at(h, state["rw_local"], state["rw_first"]), dim=-1
            ).detach()
            rw_req = state["rw_req"]
            ar = torch.arange(len(rw_req), device=device)
            old = old_first_t[rw_req]
            gap = flp[ar, new_first[rw_req]] - torch.where(
                old >= 0, flp[ar, old.clamp(min=0)], torch.full_like(flp[ar, 0], -1e9)
            )
            worst = torch.full((n_req,), float("inf"), device=device).scatter_reduce(
                0, rw_req, gap, "amin"
            )
            # KL against the unshifted model at each KL prompt's last token.
            kl_lp = torch.log_softmax(logits_at(h, state["kl_local"], state["kl_pos"]), dim=-1)
            ref = kl_ref_all[_positions_in(kl_ref_req, state["kl_req"])]
            kl_terms = torch.nn.functional.kl_div(
                kl_lp, ref, log_target=True, reduction="none"
            ).sum(-1)
            kl = per_request(kl_terms / max(len(cfg.kl_prompts), 1), state["kl_req"])
            wd = cfg.weight_decay * torch.stack([d.norm() ** 2 for d in deltas]) / v0_norm2
            loss_terms = nll + cfg.kl_factor * kl + wd
            repeat_prob = None
            if cfg.repeat_factor > 0:
                rr, rpos, rw, rrq = state["rep"]
                p_again = torch.softmax(logits_at(h, rr, rpos), dim=-1)[
                    torch.arange(len(rrq), device=device), new_first[rrq]
                ]
                # Unlikelihood: −log(1 − p) is ~p while the target rarely follows itself and
                # grows without bound as δ makes it loop.
                loss_terms = loss_terms + cfg.repeat_factor * per_request(
                    -torch.log1p(-p_again.clamp(max=1 - 1e-6)) * rw, rrq
                )
                repeat_prob = per_request(p_again.detach() * rw, rrq).cpu()
            nll_d, worst_c = nll.detach().cpu(), worst.cpu()
            for j in act_idx:
                if torch.isnan(nll_first[j]):
                    nll_first[j] = nll_d[j]
            margin_ok = (
                worst_c > (cfg.margin or 0.0)
                if cfg.margin is not None
                else torch.ones(n_req, dtype=torch.bool)
            )
            now_done = active & (nll_d < cfg.early_stop_loss) & margin_ok
            last = step == cfg.steps - 1
            for j in act_idx:
                if now_done[j] or last:
                    results[j] = ValueResult(
                        delta=deltas[j].detach().clone(),
                        v0=v0[j].clone(),
                        steps=step + 1,
                        nll_first=float(nll_first[j]),
                        nll=float(nll_d[j]),
                        margin=float(worst_c[j]),
                        done=bool(now_done[j]),
                        clamped=bool(deltas[j].detach().norm() >= max_norm[j] * 0.999),
                        repeat_prob=float(repeat_prob[j]) if repeat_prob is not None else None,
                    )
            active &= ~now_done
            if bar is not None:
                bar.update(1)
                bar.set_postfix(active=int(active.sum()), nll=f"{float(nll_d[act_idx].mean()):.3f}")
            if last or not active.any():
                break
            loss = (loss_terms * active.to(device)).sum()
            loss.backward()
            for j in range(n_req):
                if not active[j]:
                    deltas[j].grad = None  # Adam skips parameters without a gradient
            opt.step()
            with torch.no_grad():
                for j in torch.nonzero(active).squeeze(1).tolist():
                    n = deltas[j].norm()
                    if n > max_norm[j]:
                        deltas[j].mul_(max_norm[j] / n)
            if now_done.any():
                # Requests that converged leave the batch.
                select(torch.nonzero(active[b.request]).squeeze(1))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


class _PrefixCache:
    """Keys and values of the columns before ``split`` for every layer, computed once.

    Each step runs the model on the remaining columns with a fresh cache holding these
    prefixes (sliced to the rows in the batch). Only built for caches whose layers are plain
    growing key/value stores; other models (sliding-window or recurrent layers) take the
    full-width path, which gives the same values.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: Any,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
    ) -> None:
        self.model, self.cache, self.layers, self.mask = model, cache, layers, mask
        self.kwarg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    @classmethod
    def build(
        cls, model: nn.Module, arch: ModelArch, b: _Rows, in_device: torch.device, autocast: Any
    ) -> _PrefixCache | None:
        if b.split == 0:
            return None
        try:
            from transformers.cache_utils import DynamicCache, DynamicLayer
        except ImportError:  # pragma: no cover - older transformers
            return None
        config = getattr(model, "config", None)
        try:
            cache = DynamicCache(config=config)
        except Exception:  # noqa: BLE001 - any model whose cache cannot be built this way
            return None
        kwarg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        ids = b.input_ids[:, : b.split].to(in_device)
        mask = b.attention_mask[:, : b.split].to(in_device)
        last = arch.layer_name(arch.n_layers - 1)
        with torch.no_grad(), autocast(), TraceDict(model, [last], stop=True):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{kwarg: cache})
        layers = getattr(cache, "layers", None)
        if (
            not layers
            or len(layers) != arch.n_layers
            or any(type(x) is not DynamicLayer for x in layers)
        ):
            return None
        if any(x.get_seq_length() != b.split for x in layers):
            return None
        return cls(model, cache, [(x.keys, x.values) for x in layers], mask)

    def forward_kwargs(self, rows: torch.Tensor) -> dict[str, Any]:
        """The cache reset to the prefixes of ``rows``, as keyword arguments of a forward."""
        idx = None if len(rows) == self.layers[0][0].shape[0] else rows.to(self.layers[0][0].device)
        for layer, (k, v) in zip(self.cache.layers, self.layers, strict=True):
            layer.keys = k if idx is None else k.index_select(0, idx)
            layer.values = v if idx is None else v.index_select(0, idx)
        return {self.kwarg: self.cache, "use_cache": True}


def _positions_in(reference: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """For each entry of ``wanted`` (request indices of the current KL rows), the index of the
    matching KL row in ``reference`` (the KL rows of the full batch, in the same order)."""
    out = []
    used: dict[int, int] = {}
    ref = reference.tolist()
    first: dict[int, list[int]] = {}
    for i, q in enumerate(ref):
        first.setdefault(q, []).append(i)
    for q in wanted.tolist():
        k = used.get(q, 0)
        out.append(first[q][k])
        used[q] = k + 1
    return torch.tensor(out, device=reference.device, dtype=torch.long)
