"""An edit session: batches of edits applied one after another, with the state that grows
across them.

Sequential editing needs state that outlives one call: the second-moment statistics of the
*unedited* model (MEMIT and AlphaEdit must not recompute them on edited weights, nor spend a
minute on them per batch), and AlphaEdit's keys of earlier edits. :class:`EditSession` holds
both (in its :class:`~factedit.methods.base.EditContext`), applies batches, lists them, reverts
the last k or all of them bit-exactly, and saves everything as one file that
:func:`factedit.apply_edits` reloads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .arch import ModelArch, describe
from .hparams import HParams
from .methods import edit, get_method, resolve_hparams
from .methods.base import EditContext, EditError, EditResult
from .requests import EditRequest, as_requests, check_conflicts

log = logging.getLogger(__name__)


class EditSession:
    """Apply batches of edits to ``model`` in place, one after another.

    Example::

        session = factedit.EditSession(model, tok, method="memit")
        session.apply(requests[:100])
        session.apply(requests[100:200])
        session.save("edits.safetensors")   # one file; factedit.apply_edits(base, path) reloads it
        session.revert(1)                   # take back the last batch (bit-exact)
        session.revert_all()

    Guarantees: a batch that fails leaves the model as it was before that batch; reverting
    restores the weights bit-for-bit to what they were before the reverted batches; statistics
    are those of the model when the session first needed them (normally the unedited model).
    """

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        method: str = "memit",
        hparams: HParams | Mapping | str | Path | None = None,
        *,
        context: EditContext | None = None,
        arch: ModelArch | None = None,
    ) -> None:
        self.model, self.tok = model, tok
        self.arch = arch or describe(model)
        impl = get_method(method)
        self.method = impl.name
        self.hparams = resolve_hparams(impl, model, hparams, self.arch)
        impl.check(self.hparams, self.arch)
        self.context = context or EditContext()
        self._results: list[EditResult] = []
        self._marks: list[int] = []  # AlphaEdit state batches before each apply

    # ---- editing -----------------------------------------------------------------------------
    def apply(self, requests: EditRequest | Mapping | list) -> EditResult:
        """Edit one batch (MEMIT/AlphaEdit: together; ROME and the others: one request after
        another) on top of the batches already applied; return its :class:`EditResult`."""
        reqs = as_requests(requests)
        check_conflicts(reqs)
        mark = self._alpha_batches()
        try:
            result = edit(
                self.model,
                self.tok,
                reqs,
                self.method,
                self.hparams,
                arch=self.arch,
                context=self.context,
            )
        except BaseException:
            self._truncate_alpha(mark)
            raise
        self._results.append(result)
        self._marks.append(mark)
        log.info("session: batch %d (%d requests) applied", len(self._results), len(reqs))
        return result

    @property
    def edits(self) -> list[EditResult]:
        """The batches applied, oldest first."""
        return list(self._results)

    @property
    def requests(self) -> list[EditRequest]:
        """Every request applied, in order."""
        return [r for res in self._results for r in res.requests]

    def __len__(self) -> int:
        return len(self._results)

    def summary(self) -> list[dict[str, Any]]:
        """One entry per batch: number of requests, seconds, the parameters touched."""
        return [
            {
                "batch": i,
                "requests": len(r.requests),
                "seconds": r.timings.get("total"),
                "params": sorted(r.original),
            }
            for i, r in enumerate(self._results)
        ]

    # ---- reverting ---------------------------------------------------------------------------
    def revert(self, k: int = 1) -> None:
        """Take back the last ``k`` batches, newest first, bit-exactly."""
        if not 0 <= k <= len(self._results):
            raise ValueError(f"cannot revert {k} batch(es): the session holds {len(self._results)}")
        for _ in range(k):
            result = self._results.pop()
            result.restore()
            self._truncate_alpha(self._marks.pop())

    def revert_all(self) -> None:
        """Take back every batch: the weights are exactly as before the first one."""
        self.revert(len(self._results))

    # ---- saving ------------------------------------------------------------------------------
    def combined(self) -> EditResult:
        """All batches as one :class:`EditResult` (its ``original`` holds the weights before the
        first batch; its ``steps`` every step in order)."""
        if not self._results:
            raise EditError("the session holds no edits")
        original: dict[str, Any] = {}
        steps, diagnostics, timings = [], [], {}
        for r in self._results:
            for name, value in r.original.items():
                original.setdefault(name, value)
            steps += r.steps
            diagnostics += r.diagnostics
            for key, v in r.timings.items():
                timings[key] = timings.get(key, 0.0) + v
        return EditResult(
            method=self.method, requests=self.requests, hparams=self.hparams, original=original,
            steps=steps, diagnostics=diagnostics, timings=timings, model=self.model,
        )  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Save every batch as one file; ``factedit.apply_edits(base_model, path)`` applies them
        all, bit-identically, to the base model the session started from."""
        return self.combined().save(path)

    # ---- AlphaEdit's preserved keys ----------------------------------------------------------
    def _alpha_batches(self) -> int:
        from .methods.alphaedit import STATE_KEY

        state = self.context.memo.get(STATE_KEY)
        return state.n_batches if state is not None else 0

    def _truncate_alpha(self, n: int) -> None:
        from .methods.alphaedit import STATE_KEY

        state = self.context.memo.get(STATE_KEY)
        if state is not None:
            state.truncate(n)


__all__ = ["EditSession"]
