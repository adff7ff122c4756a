"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025, "AlphaEdit: Null-Space
Constrained Knowledge Editing for Language Models").

AlphaEdit is MEMIT (same values, same spreading over a layer range) with another update:

    ΔW = R Kᵀ P (K Kᵀ P + γ·K_p K_pᵀ P + λ·E[kkᵀ] P + α·I)⁻¹

where P projects onto the (approximate) null space of the preserved knowledge, the span of the
eigenvectors of E[kkᵀ] whose eigenvalues are below ``nullspace_threshold``: ΔW = (…) P, so
ΔW k ≈ 0 for the keys the corpus statistics describe. K_p are the keys of the edits made
earlier in the same sequence, so a new batch is fitted without undoing them (they enter the
normal equations) while P keeps general knowledge in place.

The λ·E[kkᵀ] P term is not in the paper (λ = ``mom2_update_weight``, 0 by default, which is the
paper's update). It is MEMIT's penalty on the keys the statistics describe, applied inside P's
range: it matters where E[kkᵀ] has no real null space. On SmolLM2 the eigenvectors below the
paper's threshold still carry 5-29 % of the keys' energy (layers 8 to 3; the spectrum is flat,
smallest eigenvalue ≈ 0.003), so P alone does not keep general knowledge in place.

Two options (off in the class defaults, the paper's way; on in SmolLM2's shipped file, chosen by
measurement, docs/mass_editing.md) change which keys K_p are: ``refresh_prior_keys``
reads them again on the model as edited so far, before each layer's update, instead of keeping
those each batch's own write read; ``prior_keys_per_template`` keeps every context template's
key, so that K_p K_pᵀ is their second moment rather than the square of their mean.

A third (``repair_prior_rounds``, not in the paper, off by default) re-asserts the earlier
edits that later batches wore down: after a batch is written, the earlier requests that no
longer hold get a new δ on the model as it is and are written again, in the same call.

A fourth (``penalise_total_change``, not in the paper, off by default) applies the λ·E[kkᵀ]
penalty to the change of the weight since the sequence's first batch instead of to each
batch's own update: a batch's update then also takes back the part of the earlier batches'
change that ordinary text sees and the earlier edits' keys do not need, as one joint write of
all the batches would (λ·tr((D + ΔW) C (D + ΔW)ᵀ), D the change so far; the update gains the
term −λ D C P in its numerator).

A fifth (``hold_prior_outputs``, not in the paper, off by default) changes what K_p's rows ask
for: the outputs their own batch left at each layer (γ‖(W + ΔW) K_p − O_p‖², O_p recorded when
that batch finished) instead of the outputs they have now (γ‖ΔW K_p‖²). Why: with the paper's
rows every batch re-anchors the earlier edits where the batches since left them, so what one
batch wears off (by the λ penalty, the total change's pull-back or the keys' drift) is never
asked back, and the losses compound along the sequence; with O_p a batch also restores them,
and the sequence solves the problem one joint write of all its batches would (the update gains
γ (O_p − W K_p)ᵀ K_p in its numerator).

The requests and keys of earlier batches are state that grows across calls: they live in an
:class:`AlphaEditState` kept in the :class:`~factedit.methods.base.EditContext` (an
:class:`~factedit.session.EditSession` holds that context and takes keys back out when it
reverts batches). Without a shared context each call starts with no earlier keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch
from ..requests import EditRequest
from .base import EditContext, LowRankDelta, materialize
from .memit import (
    MEMIT,
    BlockInputs,
    MEMITHParams,
    Write,
    as_weight_delta,
    failing_targets,
    keys_and_hidden,
)

#: Where an :class:`AlphaEditState` lives in :attr:`EditContext.memo`.
STATE_KEY = "alphaedit/state"


@dataclass
class AlphaEditHParams(MEMITHParams):
    """MEMIT's hyperparameters plus AlphaEdit's.

    Attributes:
        nullspace_threshold: eigenvalues of E[kkᵀ] (normalised by the token count) below this
            span the null space P projects onto. AlphaEdit uses 1e-2 (Llama-3, GPT-J).
        l2: α, the ridge on the projected normal equations (AlphaEdit's ``L2``: 10 for
            Llama-3-8B).
        mom2_update_weight: λ of MEMIT's penalty λ·E[kkᵀ], here inside P's range; 0 (the
            default) is the paper's update.
        prior_keys_weight: γ, the weight of the earlier batches' keys in the normal equations
            (γ K_p K_pᵀ; 1 is the paper's). Above 1 a new batch leaves the earlier edits'
            outputs more firmly where they were, at the price of its own fit.
        refresh_prior_keys: read the earlier batches' keys again, on the model as edited so
            far, before each layer's update (``False``: the keys as each batch's own write read
            them, the paper's). Later batches' updates of the lower layers move the earlier
            subjects' keys at the upper ones; the refreshed K_p hold the keys they have now.
            Costs about one pass to the range's top layer over every earlier request per batch.
        prior_keys_per_template: the earlier edits enter K_p K_pᵀ as their keys' second moment
            over the context templates, (1/T) Σ_t k_t k_tᵀ, instead of the square of the
            templates' mean (``False``, the paper's): the keys of the prompts that are not the
            mean are preserved too.
        repair_prior_rounds: after a batch's write (and its retries), check every request of
            the earlier batches; those that no longer hold get a new δ, optimised on the model
            as it is, and are written again in one spreading round, with this batch's requests
            pinned and the other earlier edits preserved through K_p (the repaired ones are
            left out of K_p for that write). A later round checks only the requests the round
            before repaired. 0: the paper. Each round costs an efficacy check of every earlier
            request plus the values of the failures; the repair writes belong to the batch
            that made them (reverting it reverts them).
        repair_update_weight: λ for the repair's writes only (``None``: ``mom2_update_weight``).
            Larger than λ, the repair moves the model less for the requests it writes again,
            which keeps more of the unedited neighbours where they were.
        penalise_total_change: the λ·E[kkᵀ] penalty acts on the weight's change since the
            first batch of the sequence (D + ΔW, D the change the earlier batches left) rather
            than on this batch's ΔW alone (``False``: the latter, as MEMIT's and AlphaEdit's
            updates are written). A sequence of batches is then penalised as one joint write
            would be, instead of once per batch. The reference weights are those the state
            saw before its first batch (:attr:`AlphaEditState.anchors`). The pull-back acts in
            the batch's main write only; its follow-up writes (retries, repairs) penalise their
            own change, see ``total_change_in_follow_ups``.
        total_change_in_follow_ups: with ``penalise_total_change``, the follow-up writes
            (retries, repairs) penalise the whole change since the anchors too (``False``, the
            default: their own change only). On, each follow-up pulls the batch's own main
            write back too, at a weight (λ·E[kkᵀ]) far above that of the pinned rows, and
            undoes edits its check just found holding: the behaviour before stop 46's fix,
            kept to reproduce earlier measurements (docs/mass_editing.md).
        hold_prior_outputs: the earlier edits' rows in the normal equations ask for the outputs
            the edited projection gave their keys when their batch finished
            (:attr:`AlphaEditState.outputs`), not for those it gives them now (``False``: the
            paper's, residual 0). A batch then also gives back what the batches since took from
            the earlier edits at each layer; with ``refresh_prior_keys`` the layer is asked to
            give the subject's key as it is now the output its batch left, which undoes the
            keys' drift too. The pull acts in the batch's main write only; its follow-up
            writes hold the earlier rows where they are (residual 0), see
            ``held_outputs_in_follow_ups``.
        held_outputs_in_follow_ups: with ``hold_prior_outputs``, the follow-up writes (retries,
            repairs) pull the earlier rows to their held outputs too (``False``, the default:
            the main write only). On, each retry asks again for what the main write left
            (which the projector keeps it from meeting) and moves the pinned requests to give
            it: the behaviour before stop 47's fix, kept to reproduce earlier measurements.
    """

    nullspace_threshold: float = 1e-2
    l2: float = 10.0
    mom2_update_weight: float = 0.0
    prior_keys_weight: float = 1.0
    refresh_prior_keys: bool = False
    prior_keys_per_template: bool = False
    repair_prior_rounds: int = 0
    repair_update_weight: float | None = None
    penalise_total_change: bool = False
    total_change_in_follow_ups: bool = False
    hold_prior_outputs: bool = False
    held_outputs_in_follow_ups: bool = False


@dataclass
class AlphaEditState:
    """The edits made so far in a sequence: their requests, one list per batch, and their keys,
    per layer, one tensor per batch (float32, ``(rows, in)``, on the CPU, rows in the order of
    the batch's requests: one row per request, or with ``prior_keys_per_template`` one per
    request and template, scaled so that ``k.T @ k`` is the mean over templates), the
    projectors, per layer, and (``penalise_total_change``) ``anchors``: per layer, the edited
    projection's weight ``(out, in)`` (float32, CPU) before the first batch written with that option.

    ``outputs`` (per layer, one tensor per batch, ``(rows, out)``, float32, CPU) are the edited
    projection's outputs for the batch's key rows as they were when the batch finished (after its
    repair of earlier edits, if any, whose rows are brought up to date then too), row for row
    with ``keys`` as first stored (the same 1/√T scaling); ``hold_prior_outputs`` asks for them."""

    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    requests: list[list[EditRequest]] = field(default_factory=list)
    projectors: dict[tuple[int, float, int], torch.Tensor] = field(default_factory=dict)
    anchors: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def n_batches(self) -> int:
        return len(self.requests)

    def truncate(self, n_batches: int) -> None:
        """Forget the requests and keys of all batches after the first ``n_batches`` (with none
        left, the anchors too: the next batch starts a new sequence)."""
        del self.requests[n_batches:]
        for per_layer in (self.keys, self.outputs):
            for layer in per_layer:
                del per_layer[layer][n_batches:]
        if not self.requests:
            self.anchors.clear()

    def _kept_rows(
        self, parts: list[torch.Tensor], leave_out: Sequence[int]
    ) -> torch.Tensor | None:
        """A mask over the rows of ``parts`` (one tensor per batch, laid end to end) without the
        rows of the requests at the positions ``leave_out``; ``None`` keeps them all."""
        if not leave_out:
            return None
        n = sum(len(batch) for batch in self.requests[: len(parts)])
        rows = sum(len(part) for part in parts)
        keep = torch.ones(n, dtype=torch.bool)
        keep[list(leave_out)] = False
        return keep.repeat_interleave(rows // n)

    def gram(
        self, layer: int, device: torch.device, leave_out: Sequence[int] = ()
    ) -> torch.Tensor | None:
        """Σ K_p K_pᵀ over the earlier batches at ``layer`` (float64), or ``None``; without the
        keys of the requests at the positions ``leave_out`` of the batches' requests laid end
        to end."""
        parts = self.keys.get(layer, [])
        if not parts:
            return None
        k = torch.cat(parts)
        keep = self._kept_rows(parts, leave_out)
        if keep is not None:
            k = k[keep]
        k = k.to(device, torch.float64)
        return k.T @ k

    def held_outputs_pull(
        self, layer: int, weight: torch.Tensor, leave_out: Sequence[int] = ()
    ) -> torch.Tensor | None:
        """K_pᵀ (O_p − K_p Wᵀ) ``(in, out)`` (float64, on ``weight``'s device): the earlier
        batches' stored key rows at ``layer`` times how far the projection ``weight``
        ``(out, in)`` now puts their outputs from :attr:`outputs`; without the rows of the
        requests at the positions ``leave_out``. ``None`` without earlier batches."""
        parts = self.keys.get(layer, [])
        if not parts:
            return None
        outs = self.outputs.get(layer, [])
        if len(outs) != len(parts):
            raise RuntimeError(
                f"layer {layer}: {len(parts)} earlier batches have keys but {len(outs)} have outputs"
            )
        k, o = torch.cat(parts), torch.cat(outs)
        keep = self._kept_rows(parts, leave_out)
        if keep is not None:
            k, o = k[keep], o[keep]
        w = weight.to(torch.float64)
        k, o = k.to(w.device, torch.float64), o.to(w.device, torch.float64)
        return k.T @ (o - k @ w.T)

    def record_outputs(
        self, layer: int, weight: torch.Tensor, requests: Sequence[int] | None = None
    ) -> None:
        """Set :attr:`outputs` at ``layer`` from the stored keys and the projection ``weight``
        ``(out, in)``: for the last batch (``requests`` ``None``: its keys' rows appended), or
        for the requests at the positions ``requests`` of the earlier batches laid end to end
        (their rows overwritten)."""
        parts = self.keys[layer]
        w = weight.detach().float().cpu()
        outs = self.outputs.setdefault(layer, [])
        if requests is None:
            outs.append(parts[-1] @ w.T)
            return
        per_request = len(torch.cat(parts)) // sum(
            len(batch) for batch in self.requests[: len(parts)]
        )
        start = 0
        for b, batch in enumerate(self.requests[: len(parts)]):
            local = [j - start for j in requests if start <= j < start + len(batch)]
            if local:
                rows = torch.cat(
                    [torch.arange(j * per_request, (j + 1) * per_request) for j in local]
                )
                outs[b][rows] = parts[b][rows] @ w.T
            start += len(batch)


def state_of(context: EditContext) -> AlphaEditState:
    """The :class:`AlphaEditState` of ``context`` (created on first use)."""
    state = context.memo.get(STATE_KEY)
    if state is None:
        state = AlphaEditState()
        context.memo[STATE_KEY] = state
    return state


def prior_keys(
    w: Write, layer: int, requests: list[EditRequest], resume: BlockInputs | None = None
) -> tuple[torch.Tensor, BlockInputs | None]:
    """The keys of ``requests`` at ``layer`` on the model as it is now, as
    :class:`AlphaEditState` stores them: ``(n, in)``, or with ``prior_keys_per_template``
    ``(n · T, in)`` scaled by 1/√T (T templates); and the recorded input of block ``layer``,
    from which a pass at a higher layer can resume as long as no block below ``layer`` changes
    (``resume``: such a recording of a lower block). The model is unchanged."""
    per_template = w.hparams.prior_keys_per_template  # type: ignore[attr-defined]
    k, _, rec = keys_and_hidden(
        w.model, w.tok, requests, w.arch, layer, None, w.templates, w.hparams.key_batch_rows,
        resume=resume, record=layer, template_rows=per_template,
    )  # fmt: skip
    assert k is not None
    if per_template:
        k = k.reshape(-1, k.shape[-1]) / math.sqrt(len(w.templates))
    return k.float().cpu(), rec


def nullspace_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ, U₀ the eigenvectors of the symmetric ``mom2`` with eigenvalues below
    ``threshold`` (float64). P is symmetric and idempotent; P k = 0 for every k in the span of
    the other eigenvectors."""
    c = mom2.to(torch.float64)
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    u0 = evecs[:, evals < threshold]
    return u0 @ u0.T


def alphaedit_delta(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor,
    preserved_gram: torch.Tensor | None,
    l2: float,
    arch: ModelArch,
    mom2: torch.Tensor | None = None,
    mom2_weight: float = 0.0,
    preserved_weight: float = 1.0,
    drift: torch.Tensor | None = None,
    held_pull: torch.Tensor | None = None,
) -> LowRankDelta | torch.Tensor:
    """ΔW = R Kᵀ P (K Kᵀ P + γ K_p K_pᵀ P + λ C P + α I)⁻¹ for keys ``(n, in)`` and residuals
    ``(n, out)`` (C = ``mom2``, λ = ``mom2_weight``, γ = ``preserved_weight``; with λ = 0 and
    γ = 1 the paper's update), in
    float64, in the weight's storage orientation. Its row space lies in P's range, so
    ΔW k = 0 for keys that P annihilates.

    ``drift`` D ``(out, in)``, the change the weight already carries: the penalty is then
    λ tr((D + ΔW) C (D + ΔW)ᵀ), which puts −λ D C beside R Kᵀ:
    ΔW = (R Kᵀ − λ D C) P (K Kᵀ P + γ K_p K_pᵀ P + λ C P + α I)⁻¹ (dense).

    ``held_pull`` ``(in, out)``, K_pᵀ E_p with E_p = O_p − K_p Wᵀ the earlier rows' distance from
    the outputs they are held to (:meth:`AlphaEditState.held_outputs_pull`): the earlier rows'
    term is then γ‖(W + ΔW) K_p − O_p‖², which puts γ E_pᵀ K_p beside R Kᵀ (dense)."""
    p = projector.to(torch.float64)
    k = keys.to(p.device, torch.float64)  # (n, in)
    g = k.T @ k
    if preserved_gram is not None:
        g = g + preserved_weight * preserved_gram.to(p.device, torch.float64)
    if mom2 is not None and mom2_weight > 0:
        g = g + mom2_weight * mom2.to(p.device, torch.float64)
    # Transposed form of the update (P, C and the Gram matrices are symmetric):
    # ΔWᵀ = (P G + α I)⁻¹ P K Rᵀ, i.e. ΔW = R Xᵀ with X = (P G + α I)⁻¹ P K.
    a = p @ g + l2 * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    x = torch.linalg.solve(a, p @ k.T)  # (in, n)
    delta = as_weight_delta(resid.to(p.device, torch.float64).T, x, arch)
    # The other terms of the numerator, each (in, out) in the transposed form: −λ C Dᵀ for the
    # total change, γ K_pᵀ E_p for the held outputs. With either, the update is dense.
    pull = None
    if drift is not None and mom2 is not None and mom2_weight > 0:
        pull = -mom2_weight * (
            mom2.to(p.device, torch.float64) @ drift.to(p.device, torch.float64).T
        )
    if held_pull is not None and preserved_weight > 0:
        held = preserved_weight * held_pull.to(p.device, torch.float64)
        pull = held if pull is None else pull + held
    if pull is None:
        return delta
    extra = torch.linalg.solve(a, p @ pull)  # (in, out)
    dense = materialize(delta).to(torch.float64)
    return (dense + (extra if arch.mlp_out_transposed else extra.T)).float()


class AlphaEdit(MEMIT):
    name = "alphaedit"
    summary = (
        "MEMIT with updates projected onto the null space of preserved keys (sequential editing)"
    )
    hparams_class = AlphaEditHParams

    def check(self, hparams: AlphaEditHParams, arch: ModelArch) -> None:  # type: ignore[override]
        super().check(hparams, arch)
        if hparams.nullspace_threshold <= 0 or hparams.l2 <= 0:
            raise ValueError("nullspace_threshold and l2 must be positive")
        if hparams.prior_keys_weight < 0:
            raise ValueError(f"prior_keys_weight must be >= 0, got {hparams.prior_keys_weight}")
        if hparams.repair_prior_rounds < 0:
            raise ValueError(f"repair_prior_rounds must be >= 0, got {hparams.repair_prior_rounds}")
        if hparams.repair_update_weight is not None and hparams.repair_update_weight < 0:
            raise ValueError(
                f"repair_update_weight must be >= 0, got {hparams.repair_update_weight}"
            )

    def prepare(self, model: nn.Module, tok: Any, hp: AlphaEditHParams, arch: ModelArch,  # type: ignore[override]
                context: EditContext, mom2: dict[int, torch.Tensor]) -> None:  # fmt: skip
        self._state = state_of(context)
        self._prior_from: BlockInputs | None = None
        self._leave_out: list[int] = []
        self._repairing = False
        self.repaired: list[int] = []
        self._projectors = {}
        self._drift: dict[int, torch.Tensor] = {}
        self._held: dict[int, torch.Tensor] = {}
        for layer in hp.layers:
            if hp.penalise_total_change and layer not in self._state.anchors:
                self._state.anchors[layer] = (
                    arch.mlp_out_weight_as_out_in(model, layer).detach().float().cpu().clone()
                )
            # Keyed on the statistics tensor too (pinned in the context, so its address is stable).
            key = (layer, hp.nullspace_threshold, mom2[layer].data_ptr())
            if key not in self._state.projectors:
                self._state.projectors[key] = nullspace_projector(
                    mom2[layer], hp.nullspace_threshold
                )
            self._projectors[layer] = self._state.projectors[key]

    def layer_update(  # type: ignore[override]
        self,
        layer: int,
        keys: torch.Tensor,
        resid: torch.Tensor,
        mom2: torch.Tensor,
        hp: AlphaEditHParams,
        arch: ModelArch,
    ) -> LowRankDelta | torch.Tensor:
        p = self._projectors[layer]
        gram = self._state.gram(layer, p.device, self._leave_out)
        weight = hp.mom2_update_weight
        if self._repairing and hp.repair_update_weight is not None:
            weight = hp.repair_update_weight
        return alphaedit_delta(keys, resid, p, gram, hp.l2, arch, mom2=mom2, mom2_weight=weight,
                               preserved_weight=hp.prior_keys_weight, drift=self._drift.pop(layer, None),
                               held_pull=self._held.pop(layer, None))  # fmt: skip

    def before_update(self, w: Write, layer: int, follow_up: bool = False) -> None:  # type: ignore[override]
        state = self._state
        hp: AlphaEditHParams = w.hparams  # type: ignore[assignment]
        # The pulls toward earlier states (the total change's pull-back, the held outputs)
        # act once per batch, in its main write. A follow-up (retry, repair) that pulled again
        # would trade the requests it pins for what the main write could not give back (the
        # projector keeps it from giving it all); each flag restores that old behaviour.
        total_change = hp.penalise_total_change and (not follow_up or hp.total_change_in_follow_ups)
        held = (
            hp.hold_prior_outputs
            and bool(state.requests)
            and (not follow_up or hp.held_outputs_in_follow_ups)
        )
        if total_change:
            # The change so far, this call's earlier writes of the layer included: the penalty
            # is on the weight's whole change since the anchor.
            now = w.arch.mlp_out_weight_as_out_in(w.model, layer).detach().float()
            self._drift[layer] = now - state.anchors[layer].to(now.device)
        if hp.refresh_prior_keys and state.requests:
            self._refresh_prior_keys(w, layer)
        if held:
            # After the refresh: the earlier subjects' keys as they are now are held to the
            # outputs their batch left.
            weight = w.arch.mlp_out_weight_as_out_in(w.model, layer).detach()
            pull = state.held_outputs_pull(layer, weight, self._leave_out)
            if pull is not None:
                self._held[layer] = pull

    def _refresh_prior_keys(self, w: Write, layer: int) -> None:
        state = self._state
        # The passes go up the range as the writes do: each resumes from the block input the
        # pass below recorded (valid: only the layers below it changed since, and those before
        # the recording), so a batch's refresh costs about one pass to the top layer. A new
        # round (or a retry) starts again at the bottom layer, under updated layers.
        if self._prior_from is not None and layer <= self._prior_from.block:
            self._prior_from = None
        with w.timer("prior_keys"):
            k, self._prior_from = prior_keys(
                w, layer, [r for batch in state.requests for r in batch], self._prior_from
            )
        rows = [len(batch) for batch in state.requests]
        if w.hparams.prior_keys_per_template:  # type: ignore[attr-defined]
            rows = [n * len(w.templates) for n in rows]
        state.keys[layer] = list(k.split(rows))

    def call_diagnostics(self) -> dict[str, Any]:
        if not self.repaired:
            return {}
        # The earlier edits this batch found lost (a scalar, so results records keep it), and
        # how many each repair round wrote.
        return {"repaired_prior": self.repaired[0], "repaired_prior_rounds": list(self.repaired)}

    def after_write(self, w: Write, requests: list[EditRequest]) -> bool:  # type: ignore[override]
        """``repair_prior_rounds`` (see :class:`AlphaEditHParams`); the counts of requests
        repaired per round are left in :attr:`repaired`."""
        state = self._state
        rounds = w.hparams.repair_prior_rounds  # type: ignore[attr-defined]
        if not rounds or not state.requests:
            return False
        earlier = [r for batch in state.requests for r in batch]
        among: list[int] | None = None
        repaired: set[int] = set()
        for _ in range(rounds):
            check = list(range(len(earlier))) if among is None else among
            failed, z = failing_targets(w, earlier, check)
            if z is None:
                break
            self.repaired.append(len(failed))
            sub = [earlier[j] for j in failed]
            # The repaired requests leave K_p for this write (kept there, their keys would hold
            # the outputs this write must move); this batch's requests are pinned by the keys
            # its write read (stale by what the repair moved the layers below, as in a retry).
            self._leave_out, self._prior_from, self._repairing = failed, None, True
            try:
                self.spread(w, sub, z, 1, pinned=w.keys)
            finally:
                self._leave_out, self._prior_from, self._repairing = [], None, False
            among = failed
            repaired.update(failed)
        if repaired:
            # The repaired edits are held from now on to the outputs the repair wrote (their
            # stored keys are those its write read: current unless later rounds moved the
            # layers below, as for the batch's own keys).
            for layer in w.keys:
                weight = w.arch.mlp_out_weight_as_out_in(w.model, layer)
                state.record_outputs(layer, weight, sorted(repaired))
        return bool(self.repaired)

    def finish(self, w: Write, requests: list[EditRequest]) -> None:  # type: ignore[override]
        # Only a batch that was applied completely joins the preserved keys.
        state = self._state
        keys = {layer: k.detach().float().cpu() for layer, k in w.keys.items()}
        if w.hparams.prior_keys_per_template:  # type: ignore[attr-defined]
            # Read once more, per template, on the model as the whole batch left it (a layer's
            # keys do not depend on its own update or those above it), in one pass up the range.
            rec: BlockInputs | None = None
            with w.timer("prior_keys"):
                for layer in sorted(keys):
                    keys[layer], rec = prior_keys(w, layer, requests, rec)
        for layer, k in keys.items():
            state.keys.setdefault(layer, []).append(k)
            # Recorded whether or not this call holds outputs, so that a later batch may.
            state.record_outputs(layer, w.arch.mlp_out_weight_as_out_in(w.model, layer))
        state.requests.append(list(requests))
        self._prior_from = None
