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
only at the positions a loss reads; the frozen network can run in bfloat16 on a bfloat16 copy
of the weights (``value_dtype``), with δ and the loss in float32.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch
from ..fingerprint import base_model_fingerprint, json_digest
from ..generation import generate
from ..hooks import Trace, as_batch_seq
from ..hparams import HParams
from ..models import cache_dir as default_cache_dir
from ..models import model_device
from ..requests import EditRequest
from ..scoring import target_token_scores
from ..stats import layer_stats
from ..tokens import encode_target
from ..values import ValueConfig, build_rows, check_value_hparams, optimize_values
from .base import EditContext, EditMethod, LowRankDelta, PhaseTimer, WeightEditor, memo_by_identity

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
            value was optimised on gets the same shift δ; ``"min"``: the direction of
            ``"mean"`` (u = C⁻¹k*) scaled so that every optimised prompt gets at least the
            shift δ (the smallest uᵀkᵢ is normalised to 1), which carries the edit further
            into contexts it was not optimised on.
        value_dtype: the dtype the frozen network runs in during the value optimisation:
            ``None`` (the model's), ``"bfloat16"`` (a bfloat16 copy of the weights while it
            runs), or ``"auto"``: bfloat16 on CPUs with bfloat16 matrix units, else the
            model's. The diagnostics' ``v_dtype`` says which ran.
        replay_lower_layers: compute the blocks below ``layer`` once and replay them.
        value_margin: the value optimisation stops only once the new target's first token beats
            the old one's (``target_true``, else the model's own top token) by this log-prob on
            every prompt; ``None`` stops on the NLL alone (the research code).
        prefix_cache: in the value optimisation, compute the tokens before the subject's last
            one once and run only the rest at each step (same values, about 2x faster).
        repeat_factor: weight of the value optimisation's penalty on the target following
            itself (see :class:`factedit.values.ValueConfig`); 0: off.
        efficacy_retries: after the update is applied, the new target must beat the old one on
            the request prompt; if it does not, the update is taken back and retried up to
            this many times: with ``key_mode="mean"`` (or ``"min"``), first as a ``"each"``
            update (every optimised key gets the full shift); when δ had not converged, or
            the ``"each"`` update fails too, the optimisation continues from δ (more steps, a
            looser clamp when the clamp held δ back, a stricter criterion). Then a
            :class:`EditEfficacyWarning` names the probabilities.
        efficacy_min_prob: the update is also retried (same budget) while the new target's
            mean per-token probability on the request prompt stays below this, even when it
            already beats the old one: the mean-key update can carry only a small part of the
            optimised shift to the request prompt itself (P(new) 0.003 against 0.002 is a
            "success" that no user wants). ``0`` accepts any update that beats the old target.
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
    value_margin: float | None = 0.0
    efficacy_retries: int = 2
    efficacy_min_prob: float = 0.0
    prefix_cache: bool = True
    repeat_factor: float = 0.0

    def adapt(self, arch: ModelArch) -> ROMEHParams:
        # ROME's sweeps put the best layer in the lower third of the network (17 of 48 in
        # GPT-2 XL, 5 of 28 in GPT-J); without a measured default, take the same proportion.
        return self.replace(layer=max(0, round(arch.n_layers * 0.2)))


class ROME(EditMethod):
    name = "rome"
    summary = "rank-one update of one MLP output projection (r-ROME key fix on by default)"
    hparams_class = ROMEHParams

    def check(self, hparams: ROMEHParams, arch: ModelArch) -> None:
        if hparams.key_mode not in ("mean", "each", "min"):
            raise ValueError(f"key_mode must be 'mean', 'each' or 'min', got {hparams.key_mode!r}")
        if not 0 <= hparams.layer < arch.n_layers:
            raise ValueError(
                f"ROME layer {hparams.layer} out of range: this model has layers 0..{arch.n_layers - 1}"
            )
        if hparams.mom2_tokens < 1:
            raise ValueError("mom2_tokens must be positive")
        if hparams.efficacy_retries < 0:
            raise ValueError("efficacy_retries must be >= 0")
        if not 0.0 <= hparams.efficacy_min_prob < 1.0:
            raise ValueError(
                f"efficacy_min_prob must be in [0, 1), got {hparams.efficacy_min_prob}"
            )
        check_value_hparams(hparams)

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
                    model, tok, hparams.layer, arch=arch, corpus=context.corpus(),
                    tokens=context.stats_tokens or hparams.mom2_tokens,
                    cache_dir=Path(context.cache_dir) / "stats" if context.cache_dir else None,
                    progress=context.progress, memo=context.memo,
                ).mom2  # fmt: skip
        for request in requests:
            diagnostics.append(
                _edit_one(model, tok, request, hparams, arch, templates, c, editor, context, timer)
            )
        return diagnostics


class EditEfficacyWarning(UserWarning):
    """An edit was applied but the new target still does not beat the old one on the request
    prompt (the probabilities are in the message and in the result's diagnostics)."""


def _edit_one(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    hp: ROMEHParams,
    arch: ModelArch,
    templates: list[str],
    mom2: torch.Tensor | None,
    editor: WeightEditor,
    context: EditContext,
    timer: PhaseTimer,
) -> dict[str, Any]:
    """Write one request and check that it holds on its own prompt; see
    :attr:`ROMEHParams.efficacy_retries`."""
    solve = mom2_solver(mom2, context.memo) if mom2 is not None else None
    with timer("probe"):
        (before,) = target_token_scores(model, tok, [request.text], [request.target_text])
        new_ids = encode_target(tok, request.target_text)
        if request.true_text is not None:
            old_text = request.true_text
        elif int(before.argmax[0]) != new_ids[0]:
            old_text = tok.decode([int(before.argmax[0])])
        else:
            old_text = None  # the model already starts the new target
        old_ids = encode_target(tok, old_text) if old_text else []
        old_first = old_ids[0] if old_ids and old_ids[0] != new_ids[0] else None
    with timer("key"):
        keys = compute_key(model, tok, request, arch, hp.layer, templates)
    cfg = ValueConfig.from_hparams(hp)
    with timer("value"):
        (values,) = optimize_values(
            model,
            tok,
            [request],
            arch,
            hp.layer,
            templates,
            cfg,
            old_first=[old_first],
            progress=context.progress,
        )
    name = arch.mlp_out_weight_name(hp.layer)
    attempts, steps, update_hp = 0, values.steps, hp
    while True:
        with timer("update"):
            delta = rome_delta(keys, templates, values.delta, mom2, update_hp, arch, solve)
            editor.apply({name: delta}, undoable=True)
        with timer("probe"):
            check = _efficacy(model, tok, request, templates, old_text, hp.efficacy_min_prob)
        if check["holds"] or attempts >= hp.efficacy_retries:
            break
        attempts += 1
        editor.undo_last()
        log.info(
            "ROME: %r does not hold over %r yet (%s); retrying",
            request.target_text,
            old_text,
            check,
        )
        if update_hp.key_mode in ("mean", "min") and not hp.original_key_bug:
            # The mean-key update scales the shift by uᵀkᵢ/uᵀk* at each prompt, which can be
            # far below 1 at the bare prompt: give every optimised key the full shift instead
            # (key_mode="each"); keep δ if it had converged, else optimise further too.
            update_hp = hp.replace(key_mode="each")
            if values.done:
                continue
        # The update did not carry the optimised shift far enough on the request prompt (the
        # other tokens of the subject moved too, or the clamp held δ back): continue from δ,
        # with a looser clamp if it was binding and a stricter criterion.
        cfg = ValueConfig.from_hparams(
            hp,
            clamp_norm_factor=cfg.clamp_norm_factor * (1.5 if values.clamped else 1.0),
            early_stop_loss=cfg.early_stop_loss * 0.5,
            margin=None if cfg.margin is None else cfg.margin + 1.0,
        )
        with timer("value"):
            (values,) = optimize_values(
                model, tok, [request], arch, hp.layer, templates, cfg, old_first=[old_first],
                init=[values.delta], progress=context.progress,
            )  # fmt: skip
        steps += values.steps
    if not check["efficacy"]:
        warnings.warn(
            f"ROME could not make {request.target_text!r} more likely than {old_text!r} after "
            f"{request.text!r}: P(new) {check['p_new']:.4f} vs P(old) {check['p_old']:.4f} after "
            f"{attempts + 1} attempt(s) and {steps} optimisation steps; the edit is in place "
            "but weak (try another layer or more v_num_grad_steps)",
            EditEfficacyWarning,
            stacklevel=4,
        )
    elif not check["holds"]:
        log.info(
            "ROME: %r beats %r after %r but stays at P(new) %.3f < efficacy_min_prob %.3f",
            request.target_text, old_text, request.text, check["p_new"], hp.efficacy_min_prob,
        )  # fmt: skip
    info = values.info()
    info.update(
        {
            "layer": hp.layer,
            "key_norm": keys.mean(0).norm().item(),
            "v_steps": steps,
            "efficacy_retries": attempts,
            "key_mode_used": update_hp.key_mode,
            "old_target": old_text,
            "target_prob_before": float(before.logprobs.sum().exp()),
            "target_prob_after": check["p_new_total"],
            **check,
        }
    )
    return info


@torch.no_grad()
def _efficacy(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    templates: list[str],
    old_text: str | None,
    min_prob: float = 0.0,
) -> dict[str, Any]:
    """Does the new target beat the old one on the request prompt (mean per-token
    log-probability, as CounterFact's ES), and does it reach ``min_prob`` there (``holds``)?
    The prefixed forms were already required to prefer the new target's first token during
    the value optimisation (``value_margin``)."""
    texts = [request.target_text] + ([old_text] if old_text is not None else [])
    scores = target_token_scores(model, tok, [request.text] * len(texts), texts)
    new = scores[0].logprobs
    # With no old target (the model already starts the new one) the new target wins by default.
    efficacy = old_text is None or bool(new.mean() > scores[1].logprobs.mean())
    p_new = float(new.mean().exp())
    return {
        "efficacy": efficacy,
        "holds": efficacy and p_new >= min_prob,
        "p_new": p_new,
        "p_old": float(scores[1].logprobs.mean().exp()) if old_text is not None else float("nan"),
        "p_new_total": float(new.sum().exp()),
    }


# ---- context templates -------------------------------------------------------------------


def context_templates(
    model: nn.Module, tok: Any, hparams: ROMEHParams, context: EditContext
) -> list[str]:
    """``["{}"]`` plus generated prefixes ``"<text>. {}"``, seeded and cached on disk (and in
    ``context.memo``).

    The cache key covers the base model (:func:`factedit.fingerprint.base_model_fingerprint`,
    which edits of its blocks do not change), the tokenizer's vocabulary size, the lengths and
    the seed. So, as in the research code, an edited model keeps the prefixes of its base model
    and a sequence of edits uses the same prompts; a different model gets its own.
    """
    spec = {"lengths": hparams.context_templates, "seed": hparams.template_seed, "version": 2}
    fp = base_model_fingerprint(model)
    key = json_digest({**spec, "weights": fp, "vocab": len(tok)})
    memo_key = f"templates/{key}"
    if memo_key in context.memo:
        return list(context.memo[memo_key])
    folder = Path(context.cache_dir or default_cache_dir()) / "templates"
    path = folder / f"{key}.json"
    if path.is_file():
        templates = json.loads(path.read_text())["templates"]
        context.memo[memo_key] = templates
        return list(templates)
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
    context.memo[memo_key] = templates
    return list(templates)


# ---- the update --------------------------------------------------------------------------


@torch.no_grad()
def compute_key(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    arch: ModelArch,
    layer: int,
    templates: list[str],
) -> torch.Tensor:
    """The projection input at the subject's last token for each prefixed prompt, ``(n, d)``
    in template order (k* is their mean; template ``"{}"`` gives the bare prompt's key)."""
    b = build_rows(tok, [request], templates, [], [None])
    device = model_device(model)
    with Trace(
        model, arch.mlp_out_name(layer), retain_input=True, retain_output=False, stop=True
    ) as tr:
        model(
            input_ids=b.input_ids.to(device),
            attention_mask=b.attention_mask.to(device),
            use_cache=False,
        )
    x = as_batch_seq(tr.input, *b.input_ids.shape)
    return x[torch.arange(len(templates), device=x.device), b.subject_pos.to(x.device)].float()


def mom2_solver(
    mom2: torch.Tensor, memo: dict[str, Any] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``b ↦ C⁻¹ b`` in float64 for the second moment ``C = mom2`` (``b`` a vector or columns),
    through C's LU factorisation, computed once per statistics tensor when a ``memo`` (e.g.
    :attr:`EditContext.memo`, which also holds that tensor) keeps it: a 1,536² factorisation
    in float64 is ~35 ms, done for every update otherwise."""
    lu, pivots = memo_by_identity(
        memo, "rome/mom2-lu", mom2, lambda c: torch.linalg.lu_factor(c.to(torch.float64))
    )

    def solve(b: torch.Tensor) -> torch.Tensor:
        b = b.to(lu.device, torch.float64)
        x = torch.linalg.lu_solve(lu, pivots, b[:, None] if b.dim() == 1 else b)
        return x[:, 0] if b.dim() == 1 else x

    return solve


def rome_delta(
    keys: torch.Tensor,
    templates: list[str],
    delta_v: torch.Tensor,
    mom2: torch.Tensor | None,
    hparams: ROMEHParams,
    arch: ModelArch,
    solve: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LowRankDelta:
    """The rank-one ΔW that shifts the projection's output by ``delta_v`` at the keys, as
    factors in the weight's storage orientation. ``solve`` (default: :func:`mom2_solver` of
    ``mom2``) applies C⁻¹."""
    k_star = keys.mean(0)
    k_bare = keys[templates.index("{}")] if "{}" in templates else keys[0]
    with torch.no_grad():
        # The optimisation shifted the MLP output by δ at every prompt, so the update must
        # map the key to W k + δ: the residual is δ itself. Dividing by uᵀk* makes the shift
        # exactly δ for k* (the mean of the prefixed keys) and δ on average over them; the
        # research code divided by uᵀk₀ (the bare prompt's key), which mis-scales the edit.
        k = k_bare if hparams.original_key_bug else k_star
        if mom2 is not None and solve is None:
            solve = mom2_solver(mom2)
        if hparams.key_mode == "each" and not hparams.original_key_bug:
            kk = keys.to(mom2.device, torch.float64) if mom2 is not None else keys.double()
            cinv_k = solve(kk.T) if solve is not None else kk.T  # (d, n)
            gram = kk @ cinv_k
            ridge = (
                1e-6
                * gram.diagonal().mean()
                * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            )
            alpha = torch.linalg.solve(
                gram + ridge, torch.ones(len(gram), dtype=gram.dtype, device=gram.device)
            )
            left_in = (cinv_k @ alpha).float()
        else:
            u = solve(k_star) if solve is not None else k_star.double()
            if hparams.key_mode == "min" and not hparams.original_key_bug:
                # Scale so that every optimised prompt gets at least the full shift δ.
                norm = (keys.to(u.device, torch.float64) @ u).min()
            else:
                norm = torch.dot(u, k.to(u.device, torch.float64))
            left_in = (u / norm).float()  # (in,)
        resid = delta_v.to(left_in.device).float()
        if arch.mlp_out_transposed:
            return LowRankDelta(left=left_in[:, None], right=resid[:, None])
        return LowRankDelta(left=resid[:, None], right=left_in[:, None])


def compute_rome_update(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    hparams: ROMEHParams,
    arch: ModelArch,
    templates: list[str],
    mom2: torch.Tensor | None,
) -> tuple[LowRankDelta, dict[str, Any]]:
    """The rank-one ΔW for one request (no efficacy check), and the optimisation's diagnostics.

    The model is unchanged when this returns.
    """
    keys = compute_key(model, tok, request, arch, hparams.layer, templates)
    (values,) = optimize_values(
        model,
        tok,
        [request],
        arch,
        hparams.layer,
        templates,
        ValueConfig.from_hparams(hparams, margin=None),
    )
    return rome_delta(keys, templates, values.delta, mom2, hparams, arch), {
        **values.info(),
        "layer": hparams.layer,
    }
