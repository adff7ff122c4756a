"""The one editing interface every method implements, and the result object they all return.

A method subclasses :class:`EditMethod` and implements :meth:`EditMethod.execute`, which
computes weight changes and hands them to a :class:`WeightEditor`. The editor checks them
(shape, finiteness), remembers the original value of every parameter before its first
change, and applies them in place. :func:`factedit.edit` wraps this: on any exception the
editor restores every touched parameter, so a failed edit leaves the model unchanged.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import ModelArch
from ..hooks import get_parameter, is_offloaded, parameter_value, set_parameter_value
from ..hparams import HParams
from ..requests import EditRequest


class EditError(RuntimeError):
    """An edit could not be carried out; the model was left unchanged."""


class NonFiniteUpdateError(EditError):
    """A computed update contains NaN or inf."""


@dataclass(frozen=True)
class LowRankDelta:
    """A weight change ``left @ right.T`` in the parameter's storage orientation.

    ROME's update is rank one (``left`` is ``(rows, 1)``, ``right`` ``(cols, 1)``); keeping the
    factors makes saved edits small and re-application bit-identical, because
    :meth:`materialize` is the only place the product is formed.
    """

    left: torch.Tensor
    right: torch.Tensor

    def materialize(self) -> torch.Tensor:
        return self.left @ self.right.T

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[0])


Delta = torch.Tensor | LowRankDelta


def materialize(delta: Delta) -> torch.Tensor:
    """A dense tensor for ``delta``."""
    return delta.materialize() if isinstance(delta, LowRankDelta) else delta


class WeightEditor:
    """Applies weight changes to a model in place and can undo them exactly.

    Guarantees: :meth:`apply` changes nothing if any delta is malformed or not finite;
    :meth:`restore` puts back the bit-exact original of every parameter ever touched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.original: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, Delta]] = []
        self._undo: dict[str, torch.Tensor] | None = None

    def apply(self, deltas: Mapping[str, Delta], *, undoable: bool = False) -> None:
        """Add ``deltas`` to the parameters. With ``undoable``, :meth:`undo_last` can take this
        step back bit-exactly (it keeps a copy of the touched parameters until the next apply)."""
        dense: dict[str, torch.Tensor] = {}
        for name, delta in deltas.items():
            param = get_parameter(self.model, name)  # a clear LookupError for a wrong name
            mat = materialize(delta)
            if tuple(mat.shape) != tuple(param.shape):
                raise EditError(
                    f"update for {name} has shape {tuple(mat.shape)}, parameter {tuple(param.shape)}"
                )
            if not torch.isfinite(mat).all():
                raise NonFiniteUpdateError(
                    f"the update for {name} contains NaN or inf; nothing was changed"
                )
            dense[name] = mat
        self._undo = (
            {n: parameter_value(self.model, n).detach().clone() for n in dense}
            if undoable
            else None
        )
        with torch.no_grad():
            for name, mat in dense.items():
                value = parameter_value(self.model, name)
                if name not in self.original:
                    self.original[name] = value.detach().clone()
                if is_offloaded(self.model, name):
                    # accelerate reloads offloaded weights for every pass: change its store.
                    new = value + mat.to(device=value.device, dtype=value.dtype)
                    set_parameter_value(self.model, name, new)
                else:
                    value.add_(mat.to(device=value.device, dtype=value.dtype))
            bad = [n for n in dense if not torch.isfinite(parameter_value(self.model, n)).all()]
        if bad:
            self.restore()
            raise NonFiniteUpdateError(f"applying the update made {bad} non-finite; model restored")
        self.steps.append(dict(deltas))

    def undo_last(self) -> None:
        """Take back the last :meth:`apply` made with ``undoable=True``, bit-exactly."""
        if self._undo is None:
            raise EditError("the last step was not applied with undoable=True")
        with torch.no_grad():
            for name, value in self._undo.items():
                set_parameter_value(self.model, name, value)
        self._undo = None
        self.steps.pop()

    def restore(self) -> None:
        with torch.no_grad():
            for name, value in self.original.items():
                set_parameter_value(self.model, name, value)


@dataclass
class EditResult:
    """What an edit did: deltas, original weights, diagnostics and timings.

    Attributes:
        method: canonical method name (``"rome"``, ``"ft-l"``, ...).
        requests: the requests, in the order applied.
        hparams: the hyperparameters used.
        original: parameter name → original value (bit-exact copy), for every touched parameter.
        steps: the deltas applied, in order (one mapping per application).
        diagnostics: one dict per request (loss, target probabilities, steps, ...).
        timings: seconds per phase plus ``"total"``.
    """

    method: str
    requests: list[EditRequest]
    hparams: HParams
    original: dict[str, torch.Tensor]
    steps: list[dict[str, Delta]]
    diagnostics: list[dict[str, Any]]
    timings: dict[str, float]
    model: nn.Module = field(repr=False)
    restored: bool = False

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        """Total dense change per parameter (the sum of all steps)."""
        total: dict[str, torch.Tensor] = {}
        for step in self.steps:
            for name, d in step.items():
                m = materialize(d)
                total[name] = total[name] + m if name in total else m.clone()
        return total

    @property
    def orig_weights(self) -> dict[str, torch.Tensor]:
        """The research code's ``orig_weights`` (same as :attr:`original`)."""
        return self.original

    def restore(self) -> None:
        """Put every touched parameter back bit-for-bit. Idempotent."""
        with torch.no_grad():
            for name, value in self.original.items():
                set_parameter_value(self.model, name, value)
        self.restored = True

    def save(self, path: str | Path) -> Path:
        """Write the edit as safetensors + JSON metadata (see :mod:`factedit.saving`)."""
        from ..saving import save_edit

        return save_edit(self, path)


def memo_by_identity(
    memo: dict[str, Any] | None, kind: str, obj: Any, make: Callable[[Any], Any]
) -> Any:
    """``make(obj)``, computed once per object while ``memo`` (e.g. :attr:`EditContext.memo`)
    keeps it; ``memo=None`` computes it afresh. Keyed by ``kind`` and ``id(obj)``, with ``obj``
    kept beside the result, so a later object that reuses the id never gets this result."""
    if memo is None:
        return make(obj)
    key = f"{kind}/{id(obj)}"
    hit = memo.get(key)
    if hit is None or hit[0] is not obj:
        hit = memo[key] = (obj, make(obj))
    return hit[1]


@dataclass
class EditContext:
    """What methods may need beyond the model: where to cache, whether to show progress.

    ``cache_dir`` is the root of the on-disk caches (statistics under ``stats/``, context
    templates under ``templates/``; default :func:`factedit.models.cache_dir`).
    ``stats_corpus`` overrides the default text corpus for second-moment statistics.
    """

    cache_dir: Path | None = None
    progress: bool = True
    stats_corpus: Any = None
    stats_tokens: int | None = None
    #: In-memory results that stay valid across edits made with this context (statistics
    #: matrices, context templates), keyed like their on-disk caches. Hold one context across
    #: many edits (as the evaluation runner does) to read each only once.
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def corpus(self) -> Any:
        """The statistics corpus (:func:`factedit.corpus.as_corpus` of ``stats_corpus``), read
        once per context: the default corpus takes ~0.1 s to read, a tenth of a second per edit
        otherwise."""
        from ..corpus import as_corpus

        return memo_by_identity(self.memo, "corpus", self.stats_corpus, as_corpus)


class EditMethod(ABC):
    """An editing method. Subclasses set :attr:`name`, :attr:`hparams_class` and implement
    :meth:`execute`."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HParams]]
    #: One line for ``factedit methods``.
    summary: ClassVar[str] = ""

    def check(self, hparams: HParams, arch: ModelArch) -> None:
        """Raise ``ValueError`` for hyperparameters that cannot work on this model."""
        return None

    @abstractmethod
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
        """Compute and apply (through ``editor``) the edits; return one diagnostics dict per
        request. Add seconds per phase into ``timings``. May raise; the caller restores."""


#: Progress of an edit's phases is logged here (INFO): "<phase> ..." when a phase starts and
#: "<phase>: N s" when it ends. Front ends show it by attaching a handler (the CLI does, on
#: stderr); the library itself never prints.
phase_log = logging.getLogger("factedit.phases")

#: How phases are named in progress messages.
PHASE_NAMES = {
    "templates": "context templates",
    "stats": "covariance statistics",
    "key": "key",
    "value": "value optimisation",
    "prior_keys": "earlier edits' keys",
    "probe": "target probability",
    "update": "weight update",
    "score": "target probability",
    "finetune": "fine-tuning",
    "apply": "weight update",
    "attribution": "neuron attribution",
}


class PhaseTimer:
    """Accumulate wall-clock seconds per phase: ``with timer("key"): ...``; each phase's start
    and end are logged on :data:`phase_log`."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    def __call__(self, phase: str) -> _Phase:
        return _Phase(self.timings, phase)


class _Phase:
    def __init__(self, timings: dict[str, float], phase: str) -> None:
        self.timings, self.phase = timings, phase

    def __enter__(self) -> None:
        phase_log.info("%s ...", PHASE_NAMES.get(self.phase, self.phase))
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.t0
        self.timings[self.phase] = self.timings.get(self.phase, 0.0) + seconds
        phase_log.info("%s: %.1f s", PHASE_NAMES.get(self.phase, self.phase), seconds)
