"""Fine-tuning baselines: FT, FT-L (L-inf constrained) and FT-AttnEdit.

All three are one loop (:func:`finetune`): minimise the negative log-likelihood of the new
target's tokens after the request's prompt with Adam over a chosen set of weight matrices,
stopping early once the loss is below a threshold. They differ only in which weights are
trained and whether each weight is projected back into an L-inf ball of radius ``eps`` around
its original value after every step (Zhu et al. 2020, as in ROME's FT-L comparison):

* ``FT``: the MLP output projection (the matrix ROME edits) of ``layers``, unconstrained.
* ``FT-L``: the same with the L-inf constraint ``norm_constraint``.
* ``FT-AttnEdit``: the attention output projections of a range of late layers.

Training happens on the live parameters inside ``try/finally`` that copies the originals back,
so the model is unchanged when the difference is handed to the :class:`WeightEditor` (which is
what makes ``EditResult.restore()`` exact and a failed edit harmless).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import torch
from torch import nn

from ..arch import ModelArch, describe
from ..hooks import Trace, first_tensor, frozen_parameters, get_parameter, is_offloaded
from ..hparams import HParams
from ..models import model_device
from ..requests import EditRequest
from ..scoring import target_prob
from ..tokens import prompt_target_batch
from .base import EditContext, EditError, EditMethod, PhaseTimer, WeightEditor

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FTHParams(HParams):
    """Hyperparameters of the fine-tuning baselines.

    Attributes:
        layers: indices of the layers whose weights are trained. ``None`` means "the layer ROME
            edits on this model" (its shipped default), or about 20% of the depth when ROME
            has no default for the model.
        module: which weight of each layer: ``"mlp_out"`` (the MLP output projection ROME
            edits) or ``"attn_out"`` (the attention output projection).
        lr: Adam learning rate.
        num_steps: maximum number of optimisation steps per request.
        norm_constraint: radius ``eps`` of the L-inf ball around each original weight that the
            trained weight is projected into after every step; ``None`` for no constraint.
        early_stop_loss: stop once the mean NLL of the target tokens is below this.
        weight_decay: Adam's (L2) weight decay.
    """

    layers: list[int] | None = None
    module: str = "mlp_out"
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2
    weight_decay: float = 0.0

    @classmethod
    def defaults_for(cls, method: str, model: nn.Module, arch: ModelArch | None = None) -> Self:
        """Shipped (or adapted) defaults with ``layers`` resolved for ``model``."""
        arch = arch or describe(model)
        return resolve_layers(super().defaults_for(method, model, arch), model, arch)


@dataclasses.dataclass
class FTLHParams(FTHParams):
    """FT-L: :class:`FTHParams` with an L-inf constraint by default."""

    norm_constraint: float | None = 5e-4


@dataclasses.dataclass
class FTAttnEditHParams(FTHParams):
    """FT-AttnEdit: attention output projections of late layers (``None``: the top quarter)."""

    module: str = "attn_out"
    lr: float = 1e-3

    def adapt(self, arch: ModelArch) -> Self:
        if self.layers is not None:
            return self
        n = arch.n_layers
        return self.replace(layers=list(range(n - max(1, n // 4), n)))


_MODULES = ("mlp_out", "attn_out")


def rome_layer(model: nn.Module, arch: ModelArch) -> int:
    """The layer ROME edits on ``model`` by default, or ``round(0.2 * n_layers)`` without one.

    ROME's hyperparameters are read only if the ROME method is installed; its absence is not
    an error (the fallback is about where causal tracing puts factual recall in GPT-2/GPT-J).
    """
    try:
        from .rome import ROMEHParams

        rome = ROMEHParams.defaults_for("rome", model, arch)
    except ImportError:
        rome = None
    layer = getattr(rome, "layer", None)
    if layer is None and getattr(rome, "layers", None):
        layer = rome.layers[0]
    if isinstance(layer, int):
        return layer % arch.n_layers
    return round(0.2 * arch.n_layers)


def resolve_layers(hp: FTHParams, model: nn.Module, arch: ModelArch) -> FTHParams:
    """``hp`` with ``layers`` filled in (see :attr:`FTHParams.layers`)."""
    hp = hp.adapt(arch)
    if hp.layers is None:
        hp = hp.replace(layers=[rome_layer(model, arch)])
    return hp


def param_names(hp: FTHParams, arch: ModelArch) -> list[str]:
    """Names of the parameters that fine-tuning trains for ``hp``."""
    if hp.module not in _MODULES:
        raise ValueError(f"module must be one of {_MODULES}, got {hp.module!r}")
    if not hp.layers:
        raise ValueError("layers is empty: name at least one layer to fine-tune")
    names = []
    for i in hp.layers:
        base = arch.mlp_out_name(i) if hp.module == "mlp_out" else arch.attn_out_name(i)
        names.append(base + ".weight")
    return list(dict.fromkeys(names))


def target_logits(
    model: nn.Module, arch: ModelArch, batch, positions: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Logits at ``positions[i]`` of row ``i``, computed only there.

    The forward pass stops after the last block and only the requested positions go through
    the final norm and unembedding: the vocabulary projection is the costliest single matrix
    of a small model, and fine-tuning needs just a handful of positions.
    """
    with Trace(model, arch.layer_name(arch.n_layers - 1), stop=True) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = first_tensor(tr.output)
    rows = [hidden[i, list(pos)] for i, pos in enumerate(positions)]
    flat = arch.logits_from_hidden(model, torch.cat(rows, dim=0))
    return list(flat.split([len(p) for p in positions], dim=0))


def target_nll(model: nn.Module, arch: ModelArch, batch) -> torch.Tensor:
    """Mean over rows of each row's mean NLL of its target tokens (a scalar with grad)."""
    logits = target_logits(model, arch, batch, batch.target_positions)
    losses = []
    for lg, ids in zip(logits, batch.target_ids, strict=True):
        lp = torch.log_softmax(lg.float(), dim=-1)
        idx = torch.tensor(ids, device=lp.device)
        losses.append(-lp[torch.arange(len(ids), device=lp.device), idx].mean())
    return torch.stack(losses).mean()


def finetune(
    model: nn.Module,
    tok: Any,
    arch: ModelArch,
    request: EditRequest,
    names: Sequence[str],
    hp: FTHParams,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fine-tune the parameters ``names`` on one request; return ``(deltas, diagnostics)``.

    Guarantees: on return (or exception) every parameter of ``model`` holds its value from
    before the call and every ``requires_grad`` flag is as before; ``deltas`` maps each name
    to ``trained - original`` (float32 on the parameter's device), and with
    ``hp.norm_constraint = eps`` every entry satisfies ``|delta| <= eps``.
    """
    eps = hp.norm_constraint
    offloaded = [n for n in names if is_offloaded(model, n)]
    if offloaded:
        # Gradient steps need the weights resident; accelerate reloads offloaded ones from
        # their store for every pass, which would discard each step.
        raise EditError(
            f"{offloaded[0]} is offloaded by the device map (CPU/disk offload); fine-tuning needs "
            "the trained layers on a device: give them a GPU (or 'cpu' on a CPU-only map) in "
            "--device-map, or use ROME, whose edits work on offloaded layers"
        )
    params = {n: get_parameter(model, n) for n in names}
    originals = {n: p.detach().clone() for n, p in params.items()}
    device = model_device(model)
    batch = prompt_target_batch(tok, [request.text], [request.target_text]).to(device)
    losses: list[float] = []
    was_training = model.training
    trained = list(params.values())
    try:
        with frozen_parameters(model, trained):
            # Dropout off: the edit must be a deterministic function of the weights.
            model.eval()
            opt = torch.optim.Adam(trained, lr=hp.lr, weight_decay=hp.weight_decay)
            for _ in range(hp.num_steps):
                opt.zero_grad(set_to_none=True)
                loss = target_nll(model, arch, batch)
                losses.append(float(loss.detach()))
                if losses[-1] < hp.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                if eps is not None:
                    with torch.no_grad():
                        for n, p in params.items():
                            o = originals[n]
                            p.copy_(torch.minimum(torch.maximum(p, o - eps), o + eps))
        with torch.no_grad():
            deltas = {n: (p.detach() - originals[n]).float() for n, p in params.items()}
            if eps is not None:
                # Rounding in (o - eps) can overshoot by an ulp, and float32(eps) may exceed
                # eps itself; the stored delta must satisfy |delta| <= eps exactly.
                bound = torch.tensor(eps, dtype=torch.float32)
                if float(bound) > eps:
                    bound = torch.nextafter(bound, torch.zeros_like(bound))
                deltas = {n: d.clamp(-float(bound), float(bound)) for n, d in deltas.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
        model.train(was_training)
    diag = {
        "params": list(names),
        "steps": len(losses),
        "loss_initial": losses[0] if losses else None,
        "loss_final": losses[-1] if losses else None,
        "early_stopped": bool(losses) and losses[-1] < hp.early_stop_loss,
        "max_abs_delta": max(float(d.abs().max()) for d in deltas.values()),
    }
    return deltas, diag


class FT(EditMethod):
    """Fine-tune the MLP output projection of the chosen layer(s), unconstrained."""

    name: ClassVar[str] = "ft"
    summary: ClassVar[str] = (
        "fine-tunes one MLP output projection on the new target (unconstrained)"
    )
    hparams_class: ClassVar[type[HParams]] = FTHParams

    def check(self, hparams: HParams, arch: ModelArch) -> None:
        hp = hparams
        assert isinstance(hp, FTHParams)
        if hp.module not in _MODULES:
            raise ValueError(f"module must be one of {_MODULES}, got {hp.module!r}")
        if hp.layers is not None:
            if not hp.layers:
                raise ValueError("layers is empty: name at least one layer to fine-tune")
            for i in hp.layers:
                arch.layer_name(i)  # raises IndexError naming the valid range
        if hp.lr <= 0 or hp.num_steps < 1:
            raise ValueError(
                f"need lr > 0 and num_steps >= 1, got lr={hp.lr}, num_steps={hp.num_steps}"
            )
        if hp.norm_constraint is not None and hp.norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be positive or null, got {hp.norm_constraint}")

    def execute(
        self,
        model: nn.Module,
        tok: Any,
        requests: list[EditRequest],
        hparams: HParams,
        editor: WeightEditor,
        arch: ModelArch,
        context: EditContext,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        assert isinstance(hparams, FTHParams)
        hp = resolve_layers(hparams, model, arch)
        names = param_names(hp, arch)
        timer = PhaseTimer(timings)
        out = []
        for req in requests:
            with timer("score"):
                before = float(target_prob(model, tok, [req.text], [req.target_text])[0])
            with timer("finetune"):
                deltas, diag = finetune(model, tok, arch, req, names, hp)
            with timer("apply"):
                editor.apply(deltas)
            with timer("score"):
                after = float(target_prob(model, tok, [req.text], [req.target_text])[0])
            log.info(
                "%s: %s -> %r: p %.4f -> %.4f in %d steps",
                self.name,
                req.subject,
                req.target_new,
                before,
                after,
                diag["steps"],
            )
            out.append(
                {
                    **diag,
                    "layers": list(hp.layers or []),
                    "target_prob_before": before,
                    "target_prob_after": after,
                }
            )
        return out


class FTL(FT):
    """FT with every trained weight kept within ``norm_constraint`` (L-inf) of its original."""

    name: ClassVar[str] = "ft-l"
    summary: ClassVar[str] = (
        "fine-tuning kept within an L-inf ball of radius epsilon around the weights"
    )
    hparams_class: ClassVar[type[HParams]] = FTLHParams


class FTAttnEdit(FT):
    """Fine-tune the attention output projections of a range of late layers."""

    name: ClassVar[str] = "ft-attnedit"
    summary: ClassVar[str] = "fine-tunes the attention output projections of late layers"
    hparams_class: ClassVar[type[HParams]] = FTAttnEditHParams
