"""MEMIT: mass-editing memory in a transformer (Meng et al. 2023, "Mass-Editing Memory in a
Transformer").

A batch of facts is written into the MLP output projections of a range of layers:

1. **Values**: for every request a shift δ of the residual stream at the subject's last token,
   after the range's top layer, is optimised so that the new target follows the prompt in every
   context template (:func:`factedit.values.optimize_values`: all requests of a chunk in one
   batched forward/backward, each with its own δ, early stop and clamp). The target hidden
   state is z = h_top + δ (h_top measured on the bare prompt).
2. **Spreading**, bottom-up over the range: at layer l the keys K (the projection's inputs at the
   subject's last token, averaged over the templates) and the current top-layer hidden state are
   recomputed on the model as edited so far; the remaining residual R = (z − h_top) is divided by
   the number of layers left, and
   ΔW = R Kᵀ (λ·E[kkᵀ] + K Kᵀ)⁻¹ (solved in float64) is applied to layer l's projection in its
   storage orientation. With ``spread_rounds`` > 1 the range is written again, bottom-up, with
   what the rounds before left of z − h_top (λ keeps every layer from writing its whole share).
   The passes never recompute what an update did not change: each starts from the recorded
   inputs of the lowest block that did change, and where the MLP output reaches the residual
   stream as it is, the input of the block above an edited layer is brought up to date by the
   weight change applied to the recorded projection inputs (``carry_block_inputs``).
3. **Retries** (``retry_rounds`` > 0, not in the paper): the requests that do not hold on the
   edited model get a new δ optimised there, and the range is written once more for them,
   with every other request pinned (residual 0) by the keys the last write read.

E[kkᵀ] are the statistics of the *unedited* model (:mod:`factedit.stats`, all layers of the
range from one truncated pass). Once layers of the range are edited, the statistics' cache key
(which hashes the weights below each layer) changes; so all statistics are read before the
first update of a call, and an :class:`~factedit.methods.base.EditContext` (or an
:class:`~factedit.session.EditSession`) keeps them, pinned to the base model, across calls.

AlphaEdit (:mod:`factedit.methods.alphaedit`) reuses everything here but the update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch
from ..fingerprint import base_model_fingerprint
from ..hooks import TraceDict, as_batch_seq, first_tensor, with_first_tensor
from ..hparams import HParams
from ..models import model_device
from ..requests import EditRequest, check_conflicts
from ..scoring import target_token_scores
from ..stats import layers_stats
from ..tokens import encode_target
from ..values import ValueConfig, build_rows, check_value_hparams, optimize_values, replayed_blocks
from .base import EditContext, EditMethod, LowRankDelta, PhaseTimer, WeightEditor
from .rome import context_templates

log = logging.getLogger(__name__)


@dataclass
class MEMITHParams(HParams):
    """MEMIT's hyperparameters (defaults: the research code's GPT-J settings; the shipped file
    for SmolLM2 was chosen by measurement, see ``docs/mass_editing.md``).

    Attributes:
        layers: the range of blocks whose MLP output projections are edited (ascending); the
            values are optimised after the top one.
        context_templates, template_seed: generated prefixes (as ROME's).
        v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompts,
            early_stop_loss, value_dtype, replay_lower_layers, value_margin, repeat_factor: the value
            optimisation (see :class:`factedit.values.ValueConfig`); the clamp is relative to
            the norm of the top layer's MLP output.
        value_batch_size: requests optimised together in one batch (memory grows with it).
        key_batch_rows: prompt rows per forward pass when computing keys.
        mom2_update_weight: λ, the weight of E[kkᵀ] (normalised by the token count) against
            K Kᵀ of the batch.
        mom2_tokens: corpus tokens for E[kkᵀ].
        spread_rounds: how many times the range is written bottom-up (1: the paper). The
            penalty λ·E[kkᵀ] keeps each layer from writing its whole share, so one round leaves
            part of z − h_top unwritten; a second round spreads that remainder again (on
            SmolLM2, 200 edits: ES 94.5 → 97.5, PS 80.0 → 87.0, NS unchanged; one more set of
            key passes). More rounds add cross-talk between the batch's keys: at 1,000 edits a
            third round costs 3.7 points of NS for one of ES, and AlphaEdit's 10 × 100
            sequence is better with one.
        retry_rounds: after the write, the requests whose new target does not yet beat the old
            one on their own prompt (CounterFact's efficacy test: P(new) > P(true), or the new
            first token greedy when no true target is given) get their δ optimised again on
            the edited model, and the range is written once more for them, with every other
            request pinned (residual 0) by the keys the last write read (no key passes over
            the others; see :meth:`MEMIT.retry`). 0: the paper. Each round costs an efficacy
            probe of the batch plus the value optimisation and key passes of the failures.
        carry_block_inputs: after a layer's update, bring the recorded input of the block above
            up to date by adding the weight change applied to the recorded projection inputs,
            instead of running the edited block again (the same keys up to float rounding;
            about a block less per key pass). Used only at layers where a probe shows the MLP
            output reaching the residual stream as it is (not behind a norm, as in Gemma's
            blocks); ``False``: recompute every block, the paper's procedure.
    """

    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    template_seed: int = 0
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    early_stop_loss: float = 0.05
    value_dtype: str | None = None
    replay_lower_layers: bool = True
    value_margin: float | None = 0.0
    repeat_factor: float = 0.0
    value_batch_size: int = 16
    key_batch_rows: int = 128
    mom2_update_weight: float = 15000.0
    mom2_tokens: int = 200_000
    spread_rounds: int = 1
    retry_rounds: int = 0
    carry_block_inputs: bool = True

    def adapt(self, arch: ModelArch) -> MEMITHParams:
        # The research code edits layers 3..8 of GPT-J's 28 (11 %-29 % of the depth).
        lo = max(0, round(arch.n_layers * 0.11))
        hi = max(lo, min(arch.n_layers - 1, round(arch.n_layers * 0.29)))
        return self.replace(layers=list(range(lo, hi + 1)))


@dataclass
class Spread:
    """What :meth:`MEMIT.spread` returns: per-layer information (the mean residual norm each
    update wrote), the recorded inputs of the top layer's bare-prompt pass (valid after the
    last update; a later pass over the same requests resumes from them) and, per layer, the
    keys of the written requests as the last round read them."""

    layer_info: list[dict[str, Any]]
    top_from: BlockInputs | None
    keys: dict[int, torch.Tensor]


@dataclass
class Write:
    """What the writes of one MEMIT call share: the model and its tokenizer, the call's
    hyperparameters, architecture, context, editor (every update goes through it), E[kkᵀ] per
    layer, the context templates and the phase timer. ``keys``: per layer, the keys of every
    request of the call as the last full write read them (set from :meth:`MEMIT.spread`'s
    result; the retries pin by them and bring the rows they rewrite up to date)."""

    model: nn.Module
    tok: Any
    hparams: MEMITHParams
    arch: ModelArch
    context: EditContext
    editor: WeightEditor
    mom2: dict[int, torch.Tensor]
    templates: list[str]
    timer: PhaseTimer
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    additive: dict[int, bool] = field(default_factory=dict)

    def carries(self, layer: int) -> bool:
        """Whether the block input above ``layer`` can be carried past an update of its
        projection (:meth:`BlockInputs.carried`) instead of recomputed: ``carry_block_inputs``
        is on and the model passed :func:`update_adds_to_residual` at this layer (checked once
        per call)."""
        if not self.hparams.carry_block_inputs:
            return False
        if layer not in self.additive:
            self.additive[layer] = update_adds_to_residual(self.model, self.tok, self.arch, layer)
            if not self.additive[layer]:
                log.info("layer %d: the MLP output does not reach the residual stream as it is; "
                         "block inputs are recomputed after its update", layer)  # fmt: skip
        return self.additive[layer]


class MEMIT(EditMethod):
    name = "memit"
    summary = "batched edits spread over a range of MLP layers (mass editing)"
    hparams_class = MEMITHParams

    def check(self, hparams: MEMITHParams, arch: ModelArch) -> None:
        layers = list(hparams.layers)
        if not layers:
            raise ValueError("layers is empty")
        if layers != sorted(set(layers)):
            raise ValueError(f"layers must be ascending and distinct, got {layers}")
        bad = [i for i in layers if not 0 <= i < arch.n_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: this model has layers 0..{arch.n_layers - 1}"
            )
        if hparams.mom2_tokens < 1 or hparams.value_batch_size < 1 or hparams.key_batch_rows < 1:
            raise ValueError("mom2_tokens, value_batch_size and key_batch_rows must be positive")
        if hparams.spread_rounds < 1:
            raise ValueError(f"spread_rounds must be >= 1, got {hparams.spread_rounds}")
        if hparams.retry_rounds < 0:
            raise ValueError(f"retry_rounds must be >= 0, got {hparams.retry_rounds}")
        if hparams.mom2_update_weight < 0:
            raise ValueError("mom2_update_weight must be >= 0")
        check_value_hparams(hparams)

    def execute(
        self,
        model: nn.Module,
        tok: Any,
        requests: list[EditRequest],
        hparams: MEMITHParams,
        editor: WeightEditor,
        arch: ModelArch,
        context: EditContext,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        check_conflicts(requests)
        timer = PhaseTimer(timings)
        with timer("templates"):
            templates = context_templates(model, tok, hparams, context)
        with timer("stats"):
            # Before any update: the statistics must be those of the unedited model.
            mom2 = base_stats(model, tok, hparams.layers, arch, context, hparams.mom2_tokens)
        self.prepare(model, tok, hparams, arch, context, mom2)
        with timer("probe"):
            before, old_first = probe(model, tok, requests)
        with timer("value"):
            values, z = compute_targets(
                model, tok, requests, hparams, arch, templates, old_first, context.progress
            )
        layers, top = list(hparams.layers), hparams.layers[-1]
        w = Write(model, tok, hparams, arch, context, editor, mom2, templates, timer)
        written = self.spread(w, requests, z, hparams.spread_rounds)
        w.keys, layer_info, top_from = written.keys, written.layer_info, written.top_from
        retried: list[list[int]] = []
        for _ in range(hparams.retry_rounds):
            failed = self.retry(w, requests, old_first, among=retried[-1] if retried else None)
            if not failed:
                break
            retried.append(failed)
            top_from = None  # the retries' passes covered the failures only
        if self.after_write(w, requests):
            top_from = None  # the lower layers changed since that recording
        self.finish(w, requests)
        with timer("probe"):
            (after, _) = probe(model, tok, requests, old=False)
            _, h_final, _ = keys_and_hidden(
                model,
                tok,
                requests,
                arch,
                None,
                top,
                ["{}"],
                hparams.key_batch_rows,
                resume=top_from,
            )
        diagnostics = []
        for j, v in enumerate(values):
            info = v.info()
            info.update(
                {
                    "layers": layers,
                    "target_prob_before": before[j],
                    "target_prob_after": after[j],
                    "z_error": float(
                        (z[j] - h_final[j]).norm() / max(float(v.delta.norm()), 1e-12)
                    ),
                    "retried": sum(j in f for f in retried),
                }
            )
            diagnostics.append(info)
        if diagnostics:
            diagnostics[0]["layer_residuals"] = layer_info
            diagnostics[0].update(self.call_diagnostics())
        return diagnostics

    def spread(
        self,
        w: Write,
        requests: list[EditRequest],
        z: torch.Tensor,
        rounds: int,
        pinned: dict[int, torch.Tensor] | None = None,
    ) -> Spread:
        """Write the target hidden states ``z`` ``(n, hidden)`` of ``requests`` into the range,
        bottom-up (step 2 of the module docstring), ``rounds`` times (each round spreads what
        the rounds before left of z − h_top).

        ``pinned`` (layer → keys ``(m, in)``): keys of other requests that every layer's update
        must leave where they are (residual 0), written together with ``requests``."""
        hp, arch = w.hparams, w.arch
        layers, top = list(hp.layers), hp.layers[-1]
        layer_info: list[dict[str, Any]] = []
        # Each layer's keys and the top block's output are recomputed on the model as edited so
        # far, but the blocks below the layer edited last did not change: each pass starts from
        # the inputs of that layer, recorded by the pass before. The inputs of the bottom layer
        # never change, so later rounds start from those the first round recorded.
        #
        # Where the model allows it (``Write.carries``), a pass records instead the input of the
        # block above the layer it edits next, with that layer's projection inputs, and after
        # the update carries it forward (:meth:`BlockInputs.carried`): the next pass then starts
        # one block higher. The first pass of a multi-round spread records the bottom layer's
        # own input, which later rounds start from.
        rows = hp.key_batch_rows
        bottom: tuple[BlockInputs | None, BlockInputs | None] = (None, None)
        top_from: BlockInputs | None = None
        read: dict[int, torch.Tensor] = {}
        for r in range(rounds):
            key_from, top_from = bottom
            for i, layer in enumerate(layers):
                keep_bottom = r == 0 and i == 0 and rounds > 1
                carry = not keep_bottom and layer != top and w.carries(layer)
                rec = layer + 1 if carry else layer
                with w.timer("key"):
                    keys, _, key_from = keys_and_hidden(
                        w.model, w.tok, requests, arch, layer, None, w.templates, rows,
                        resume=key_from, record=rec, carry=carry,
                    )  # fmt: skip
                    _, h_top, top_from = keys_and_hidden(
                        w.model, w.tok, requests, arch, None, top, ["{}"], rows,
                        resume=top_from, record=rec, carry=carry,
                    )  # fmt: skip
                assert keys is not None and h_top is not None
                if keep_bottom:
                    bottom = (key_from, top_from)
                resid = (z - h_top) / (len(layers) - i)  # (n, hidden): spread over the layers left
                read[layer] = keys
                if pinned is not None:
                    keys = torch.cat([keys, pinned[layer].to(keys)])
                    resid = torch.cat([resid, resid.new_zeros(len(pinned[layer]), resid.shape[1])])
                if carry:
                    before = arch.mlp_out_weight_as_out_in(w.model, layer).detach().float().clone()
                self.before_update(w, layer, follow_up=pinned is not None)
                with w.timer("update"):
                    delta = self.layer_update(layer, keys, resid, w.mom2[layer], hp, arch)
                    w.editor.apply({arch.mlp_out_weight_name(layer): delta})
                if carry:
                    assert key_from is not None and top_from is not None
                    with w.timer("key"):
                        # The change as applied (in the weight's dtype), not as computed.
                        change = (
                            arch.mlp_out_weight_as_out_in(w.model, layer).detach().float() - before
                        )
                        key_from, top_from = key_from.carried(change), top_from.carried(change)
                layer_info.append({"layer": layer, "resid_norm": float(resid.norm(dim=1).mean())})
        return Spread(layer_info, top_from, read)

    def retry(
        self,
        w: Write,
        requests: list[EditRequest],
        old_first: list[int | None],
        among: list[int] | None = None,
    ) -> list[int]:
        """One retry round (see ``retry_rounds``) after :meth:`spread` wrote ``requests``: returns
        the indices of the requests that did not hold on the model as edited so far, checking
        only those in ``among`` when given (a later round checks the requests the round before
        retried: the others were pinned, and checking a thousand requests again costs as
        much as optimising sixty values). With none the model is unchanged when this returns.

        The failures get a new δ and are written in one spreading round; every other request is
        pinned by its keys from ``w.keys``. Those are exact for the first retry (a layer's keys
        depend neither on its own update nor on the layers above, so the last round's keys are
        the current ones); after the retry's own updates of the layers below they are stale by
        what a few requests' write moved them, which saves re-reading a thousand requests'
        keys at every layer. The failures' keys in ``w.keys`` are brought up to date."""
        check = list(range(len(requests))) if among is None else among
        failed, z_failed = failing_targets(w, requests, check, old_first)
        if z_failed is None:
            return []
        sub = [requests[j] for j in failed]
        keep = torch.ones(len(requests), dtype=torch.bool)
        keep[failed] = False
        pinned = {layer: k[keep.to(k.device)] for layer, k in w.keys.items()}
        fresh = self.spread(w, sub, z_failed, 1, pinned=pinned).keys
        for layer, k in w.keys.items():
            k[torch.tensor(failed, device=k.device)] = fresh[layer].to(k)
        return failed

    # ---- what AlphaEdit overrides ---------------------------------------------------------
    def prepare(self, model: nn.Module, tok: Any, hp: MEMITHParams, arch: ModelArch,
                context: EditContext, mom2: dict[int, torch.Tensor]) -> None:  # fmt: skip
        """Called once per edit, after the statistics are read and before any update."""

    def before_update(self, w: Write, layer: int, follow_up: bool = False) -> None:
        """Called before each update of ``layer``, on the model as edited so far;
        ``follow_up``: the write is a retry or repair (it has pinned requests) after the
        batch's main write."""

    def layer_update(
        self,
        layer: int,
        keys: torch.Tensor,
        resid: torch.Tensor,
        mom2: torch.Tensor,
        hp: MEMITHParams,
        arch: ModelArch,
    ) -> LowRankDelta | torch.Tensor:
        """ΔW = R Kᵀ (λ·E[kkᵀ] + K Kᵀ)⁻¹ in the weight's storage orientation."""
        return memit_delta(keys, resid, mom2, hp.mom2_update_weight, arch)

    def after_write(self, w: Write, requests: list[EditRequest]) -> bool:
        """Called after the writes and retries of ``requests``, before :meth:`finish`; may
        write more (AlphaEdit's repair of earlier edits). Returns whether it changed the model."""
        return False

    def call_diagnostics(self) -> dict[str, Any]:
        """What the call as a whole adds to the first request's diagnostics."""
        return {}

    def finish(self, w: Write, requests: list[EditRequest]) -> None:
        """Called after every update of the call (writes and retries of ``requests``) was
        applied."""


# ---- pieces shared with AlphaEdit --------------------------------------------------------


def base_stats(
    model: nn.Module,
    tok: Any,
    layers: list[int],
    arch: ModelArch,
    context: EditContext,
    tokens: int,
) -> dict[int, torch.Tensor]:
    """E[kkᵀ] of each layer, pinned in ``context.memo`` to the base model.

    The pin is keyed on :func:`~factedit.fingerprint.base_model_fingerprint` (which edits do not
    change), the corpus and the token budget: a context that has seen the unedited model keeps
    its statistics however many edits follow (the research code does the same through its
    on-disk cache keyed on the model's name). Layers not pinned yet are read from the per-layer
    cache or computed in one truncated pass on the model as it is now.
    """
    corpus = context.corpus()
    tokens = context.stats_tokens or tokens
    prefix = f"base-stats/{base_model_fingerprint(model)}/{corpus.identity}/{tokens}"
    missing = [i for i in layers if f"{prefix}/{i}" not in context.memo]
    if missing:
        got = layers_stats(
            model, tok, missing, arch=arch, corpus=corpus, tokens=tokens,
            cache_dir=Path(context.cache_dir) / "stats" if context.cache_dir else None,
            progress=context.progress,
        )  # fmt: skip
        for i in missing:
            context.memo[f"{prefix}/{i}"] = got[i].mom2
    return {i: context.memo[f"{prefix}/{i}"] for i in layers}


@torch.no_grad()
def probe(
    model: nn.Module, tok: Any, requests: list[EditRequest], old: bool = True
) -> tuple[list[float], list[int | None]]:
    """P(new target) after each request's prompt, and (with ``old``) the token the new target
    must beat: ``target_true``'s first token, else the model's own first choice."""
    scores = target_token_scores(
        model, tok, [r.text for r in requests], [r.target_text for r in requests]
    )
    probs = [float(s.logprobs.sum().exp()) for s in scores]
    if not old:
        return probs, []
    firsts: list[int | None] = []
    for r, s in zip(requests, scores, strict=True):
        new_first = encode_target(tok, r.target_text)[0]
        if r.true_text is not None:
            ids = encode_target(tok, r.true_text)
            o = ids[0] if ids else None
        else:
            o = int(s.argmax[0])
        firsts.append(None if o is None or o == new_first else o)
    return probs, firsts


@torch.no_grad()
def holds(model: nn.Module, tok: Any, requests: list[EditRequest]) -> list[bool]:
    """Whether each request's new target wins after its own prompt: a higher mean per-token
    log-probability than ``target_true`` (CounterFact's efficacy test) when that is given, else
    the new target's first token is the model's greedy choice."""
    prompts = [r.text for r in requests]
    new = target_token_scores(model, tok, prompts, [r.target_text for r in requests])
    with_true = [j for j, r in enumerate(requests) if r.true_text is not None]
    true = target_token_scores(
        model, tok, [prompts[j] for j in with_true], [str(requests[j].true_text) for j in with_true]
    )
    out = [
        bool(s.argmax[0] == encode_target(tok, r.target_text)[0])
        for r, s in zip(requests, new, strict=True)
    ]
    for j, s in zip(with_true, true, strict=True):
        out[j] = float(new[j].logprobs.mean()) > float(s.logprobs.mean())
    return out


def failing_targets(
    w: Write,
    requests: list[EditRequest],
    check: list[int],
    old_first: list[int | None] | None = None,
) -> tuple[list[int], torch.Tensor | None]:
    """Of ``requests`` at the indices ``check``, those whose new target does not win on the
    model as it is (:func:`holds`), and their target states z (:func:`compute_targets`)
    optimised again there, so that δ sees the cross-talk that kept them from holding.
    ``old_first`` (per request) gives the tokens to beat; without it they are probed on the
    failures. ``([], None)`` when all hold. The model is unchanged."""
    with w.timer("probe"):
        ok = holds(w.model, w.tok, [requests[j] for j in check])
    failed = [j for j, good in zip(check, ok, strict=True) if not good]
    if not failed:
        return [], None
    sub = [requests[j] for j in failed]
    if old_first is None:
        with w.timer("probe"):
            _, firsts = probe(w.model, w.tok, sub)
    else:
        firsts = [old_first[j] for j in failed]
    with w.timer("value"):
        _, z = compute_targets(
            w.model, w.tok, sub, w.hparams, w.arch, w.templates, firsts, w.context.progress
        )
    return failed, z


def compute_targets(
    model: nn.Module,
    tok: Any,
    requests: list[EditRequest],
    hp: MEMITHParams,
    arch: ModelArch,
    templates: list[str],
    old_first: list[int | None],
    progress: bool,
) -> tuple[list[Any], torch.Tensor]:
    """Optimise δ for every request at the top layer (chunks of ``value_batch_size``, each in
    one batched optimisation) and return the value results and the target hidden states
    z = h_top + δ ``(n, hidden)``, float32."""
    top = hp.layers[-1]
    cfg = ValueConfig.from_hparams(hp)
    values = []
    chunks = range(0, len(requests), hp.value_batch_size)
    bar = None
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="MEMIT values", unit="req")
    for s in chunks:
        part = requests[s : s + hp.value_batch_size]
        values += optimize_values(
            model, tok, part, arch, top, templates, cfg, old_first=old_first[s : s + hp.value_batch_size],
            progress=progress and bar is None,
        )  # fmt: skip
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    # z: the top block's output with δ added at its MLP output (for Llama-style blocks simply
    # h_top + δ; measured, so blocks with a norm after the MLP are right too).
    delta = torch.stack([v.delta for v in values])
    _, z, _ = keys_and_hidden(
        model, tok, requests, arch, None, top, ["{}"], hp.key_batch_rows, shift=delta
    )
    assert z is not None
    return values, z


@dataclass
class BlockInputs:
    """Per chunk of rows of a :func:`keys_and_hidden` pass, the input of block ``block`` (the
    output of the block below, as that block returns it). A later pass over the same requests,
    templates and ``batch_rows`` starts there instead of at the embeddings, which is exact as
    long as no block below ``block`` changed in between (MEMIT edits its range bottom-up, so the
    input of the layer just edited stays valid for the next one)."""

    block: int
    chunks: list[Any] = field(default_factory=list)
    acts: list[torch.Tensor] | None = None

    def carried(self, weight_change: torch.Tensor) -> BlockInputs:
        """These inputs after block ``block − 1``'s edited projection changed by
        ``weight_change`` ``(out, in)``, without running the block again: each chunk plus the
        change applied to the projection's recorded inputs ``acts`` (recorded with
        ``carry=True``). Exact where the projection's output is added to the residual stream
        as it is (see :func:`update_adds_to_residual`); the acts are dropped."""
        if self.acts is None:
            raise ValueError(
                "these block inputs were recorded without the projection inputs (carry=False)"
            )
        chunks = []
        for chunk, act in zip(self.chunks, self.acts, strict=True):
            h = first_tensor(chunk)
            change = act.to(weight_change.device, weight_change.dtype) @ weight_change.T
            chunks.append(with_first_tensor(chunk, h + change.to(h.device, h.dtype).view(h.shape)))
        return BlockInputs(self.block, chunks)


@torch.no_grad()
def keys_and_hidden(
    model: nn.Module,
    tok: Any,
    requests: list[EditRequest],
    arch: ModelArch,
    layer: int | None,
    top: int | None,
    templates: list[str],
    batch_rows: int = 128,
    shift: torch.Tensor | None = None,
    *,
    resume: BlockInputs | None = None,
    record: int | None = None,
    carry: bool = False,
    template_rows: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, BlockInputs | None]:
    """For each request: the key at ``layer`` (the MLP output projection's input at the subject's
    last token, averaged over ``templates``) ``(n, mlp_size)``, and the output of block ``top``
    at the subject's last token of the bare prompt ``(n, hidden)``; both float32 (``None`` where
    ``layer`` or ``top`` is ``None``).

    Rows of all requests are batched ``batch_rows`` at a time; the forward pass stops after the
    deepest module it needs. ``shift`` ``(n, hidden)``: added to block ``top``'s MLP output at
    the subject's last token of every row (the value optimisation's δ), to read the target
    hidden state. ``resume``: start from the block inputs an earlier call recorded (see
    :class:`BlockInputs`); ``record``: record the input of block ``record`` (at least
    ``resume.block``, at most one above the deepest block this pass runs) and return it third;
    ``carry``: with it, the inputs of block ``record − 1``'s edited projection at every
    position, so that the recording can be carried past an update of that projection
    (:meth:`BlockInputs.carried`); ``template_rows``: the keys of every template, not their
    mean, ``(n, len(templates), mlp_size)``.
    """
    if layer is None and top is None:
        raise ValueError("keys_and_hidden needs a layer, a top block or both")
    device = model_device(model)
    n_t = len(templates)
    bare_t = templates.index("{}") if "{}" in templates else 0
    per_chunk = max(1, batch_rows // n_t)
    start = resume.block if resume is not None else 0
    if record is not None and record < start:
        raise ValueError(
            f"cannot record the input of block {record} in a pass starting at block {start}"
        )
    names = []
    if layer is not None:
        names.append(arch.mlp_out_name(layer))
    if top is not None:
        names += [arch.layer_name(top)] + ([arch.mlp_name(top)] if shift is not None else [])
    record_name = arch.layer_name(record - 1) if record else None
    if record_name is not None:
        names.append(record_name)
    if carry and not record:
        raise ValueError("carry needs the recording of a block above block 0")
    carry_name = arch.mlp_out_name(record - 1) if carry and record is not None else None
    if carry_name is not None and carry_name not in names:
        names.append(carry_name)
    recorded = BlockInputs(record, acts=[] if carry else None) if record is not None else None
    keys, hidden = [], []
    cur: dict[str, torch.Tensor] = {}

    def add_shift(output: Any, name: str) -> Any:
        if top is None or name != arch.mlp_name(top) or shift is None:
            return output
        flat = first_tensor(output)
        h = as_batch_seq(flat, *cur["ids"].shape).clone()
        r = torch.arange(h.shape[0], device=h.device)
        h[r, cur["pos"].to(h.device)] += cur["shift"].to(h.device, h.dtype)
        return with_first_tensor(output, h.view(flat.shape))

    for c, s in enumerate(range(0, len(requests), per_chunk)):
        part = requests[s : s + per_chunk]
        b = build_rows(tok, part, templates, [], [None] * len(part))
        # Only the subject's last token (column ``split`` of every row) is read and the model is
        # causal: the columns after it (the rest of the prompt, the target) are not computed.
        ids, mask = (
            b.input_ids[:, : b.split + 1].to(device),
            b.attention_mask[:, : b.split + 1].to(device),
        )
        cur["ids"], cur["pos"] = ids, b.subject_pos
        if shift is not None:
            cur["shift"] = shift[s : s + per_chunk].repeat_interleave(n_t, dim=0)
        below = resume.chunks[c] if resume is not None and start > 0 else None
        with replayed_blocks(model, arch, start, below), TraceDict(
            model, names, retain_input=True, stop=True, edit_output=add_shift
        ) as td:  # fmt: skip
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        rows = torch.arange(ids.shape[0], device=device)
        pos = b.subject_pos.to(device)
        if layer is not None:
            k = as_batch_seq(td[arch.mlp_out_name(layer)].input, *ids.shape)
            k = k[rows.to(k.device), pos.to(k.device)].float().view(len(part), n_t, -1)
            keys.append(k if template_rows else k.mean(1))
        if top is not None:
            h = as_batch_seq(first_tensor(td[arch.layer_name(top)].output), *ids.shape)
            h = h[rows.to(h.device), pos.to(h.device)].float().view(len(part), n_t, -1)
            hidden.append(h[:, bare_t])
        if recorded is not None:
            recorded.chunks.append(td[record_name].output if record_name is not None else None)
            if recorded.acts is not None:
                recorded.acts.append(as_batch_seq(td[carry_name].input, *ids.shape))
    return (torch.cat(keys) if keys else None), (torch.cat(hidden) if hidden else None), recorded


@torch.no_grad()
def update_adds_to_residual(model: nn.Module, tok: Any, arch: ModelArch, layer: int) -> bool:
    """Whether a change of block ``layer``'s edited projection output reaches the block's output
    as it is (the residual stream adds it, no norm or gate after it), probed on a short prompt:
    the block output must move by exactly a random shift added to the projection output. Then
    :meth:`BlockInputs.carried` is exact for that layer. The model is unchanged."""
    device = model_device(model)
    enc = tok("The Eiffel Tower is located in", return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    out_name, block_name = arch.mlp_out_name(layer), arch.layer_name(layer)

    def block_output(shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        def add(output: Any, name: str) -> Any:
            if name != out_name or shift is None:
                return output
            flat = first_tensor(output)
            return with_first_tensor(
                output, flat + shift.to(flat.device, flat.dtype).view(flat.shape)
            )

        with TraceDict(model, [out_name, block_name], stop=True, edit_output=add) as td:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return first_tensor(td[out_name].output).float(), first_tensor(
            td[block_name].output
        ).float()

    projected, plain = block_output(None)
    gen = torch.Generator().manual_seed(0)
    shift = (torch.randn(projected.shape, generator=gen) * float(projected.std())).to(
        projected.device
    )
    _, shifted = block_output(shift)
    expected = shift.view(plain.shape)
    scale = float(plain.abs().max()) + float(expected.abs().max())
    return bool(torch.allclose(shifted - plain, expected, rtol=0.0, atol=1e-3 * scale))


def as_weight_delta(
    left_out: torch.Tensor, right_in: torch.Tensor, arch: ModelArch
) -> LowRankDelta | torch.Tensor:
    """``left_out @ right_in.T`` (``(out, n)`` and ``(in, n)``) in the projection weight's storage
    orientation, as factors when that is smaller than the dense matrix."""
    left_out, right_in = left_out.float().contiguous(), right_in.float().contiguous()
    if arch.mlp_out_transposed:
        left_out, right_in = right_in, left_out
    rows, cols, n = left_out.shape[0], right_in.shape[0], left_out.shape[1]
    if n * (rows + cols) < rows * cols:
        return LowRankDelta(left=left_out, right=right_in)
    return left_out @ right_in.T


def memit_delta(
    keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor, weight: float, arch: ModelArch
) -> LowRankDelta | torch.Tensor:
    """ΔW = R Kᵀ (λ·C + K Kᵀ)⁻¹ for keys ``(n, in)`` and residuals ``(n, out)``, solved in
    float64, in the weight's storage orientation."""
    c = mom2.to(torch.float64)
    k = keys.to(c.device, torch.float64)  # (n, in)
    a = weight * c + k.T @ k
    x = torch.linalg.solve(a, k.T)  # (in, n) = (λC + KKᵀ)⁻¹ K  (A is symmetric)
    return as_weight_delta(resid.to(c.device, torch.float64).T, x, arch)
