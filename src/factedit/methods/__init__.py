"""Editing methods and the single entry point :func:`edit`.

Method names are case-insensitive; the research code's names (``"ROME"``, ``"FT-L"``, ...)
work as well as ours.
"""

from __future__ import annotations

import contextlib
import difflib
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import ModelArch, describe
from ..hparams import HParams
from ..requests import EditRequest, SubjectAtEndWarning, as_requests
from .base import (
    EditContext,
    EditError,
    EditMethod,
    EditResult,
    LowRankDelta,
    NonFiniteUpdateError,
    WeightEditor,
)

#: Methods of the research code that factedit does not provide yet.
NOT_YET_AVAILABLE: set[str] = set()


class MethodNotAvailableError(ValueError):
    """The requested method is unknown or not implemented yet."""


def _methods() -> dict[str, type[EditMethod]]:
    # Imported here so that importing factedit does not import every method's dependencies.
    # Every method module is imported unconditionally: one that fails to import is an error
    # for every caller, never a silently missing method.
    from .alphaedit import AlphaEdit
    from .emmet import EMMET
    from .ft import FT, FTL, FTAttnEdit
    from .kn import KN
    from .learned import LEARNED_METHODS
    from .memit import MEMIT
    from .rome import ROME

    classes: list[type[EditMethod]] = [
        ROME,
        FT,
        FTL,
        FTAttnEdit,
        KN,
        MEMIT,
        AlphaEdit,
        EMMET,
        *LEARNED_METHODS,
    ]
    return {c.name: c for c in classes}


def canonical_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def available_methods() -> list[str]:
    """Names accepted by :func:`edit` (canonical spelling)."""
    return sorted(_methods())


def get_method(name: str) -> EditMethod:
    """An instance of the method called ``name`` (e.g. ``"rome"``, ``"FT-L"``)."""
    key = canonical_name(name)
    methods = _methods()
    if key in methods:
        return methods[key]()
    if key in NOT_YET_AVAILABLE:
        raise MethodNotAvailableError(
            f"{name!r} (a hypernetwork editor) is not available in factedit yet; "
            f"available methods: {', '.join(sorted(methods))}"
        )
    raise MethodNotAvailableError(
        f"unknown editing method {name!r}; available: {', '.join(sorted(methods))}"
    )


def resolve_hparams(
    method: EditMethod,
    model: nn.Module,
    hparams: HParams | Mapping | str | Path | None,
    arch: ModelArch,
) -> HParams:
    """``None`` → shipped per-model defaults; a dict → overrides of those; a path → a file."""
    cls = method.hparams_class
    if hparams is None:
        return cls.defaults_for(method.name, model, arch)
    if isinstance(hparams, cls):
        return hparams
    if isinstance(hparams, HParams):
        raise TypeError(f"{method.name} needs {cls.__name__}, got {type(hparams).__name__}")
    if isinstance(hparams, Mapping):
        base = cls.defaults_for(method.name, model, arch).to_dict()
        unknown = sorted(set(hparams) - set(base))
        if unknown:
            raise ValueError(unknown_fields_message(method.name, cls.__name__, unknown, base))
        return cls.from_dict({**base, **hparams})
    return cls.from_file(hparams)


def unknown_fields_message(method: str, cls_name: str, unknown: list[str], valid: Any) -> str:
    """``unknown ROMEHParams field(s) ['lyer'] (did you mean 'layer'?); valid fields of rome:
    ...``: the message for hyperparameter overrides naming no field of the method."""
    valid = sorted(valid)
    hints = [
        f"{u!r} -> {m[0]!r}" for u in unknown if (m := difflib.get_close_matches(u, valid, n=1))
    ]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return (
        f"unknown {cls_name} field(s) {unknown}{hint}; valid fields of {method}: {', '.join(valid)}"
    )


def warn_subject_at_end(requests: list[EditRequest]) -> None:
    """Warn (:class:`~factedit.requests.SubjectAtEndWarning`) for every request whose subject
    ends the prompt: ROME-style methods read the key at the subject's last token, where the
    model has not yet seen the relation, so the edit is unlikely to take."""
    for r in requests:
        if r.subject_at_end:
            warnings.warn(
                SubjectAtEndWarning(
                    f"the subject {r.subject!r} is the last thing in the prompt {r.prompt!r}: "
                    "editing is unlikely to work, because the subject comes after the relation. "
                    "Put the subject first, e.g. '{} was founded by' with subject 'Apple' "
                    "instead of 'Steve Jobs was the founder of {}'."
                ),
                stacklevel=3,
            )


def edit(
    model: nn.Module,
    tok: Any,
    requests: EditRequest | Mapping | list,
    method: str = "rome",
    hparams: HParams | Mapping | str | Path | None = None,
    *,
    arch: ModelArch | None = None,
    context: EditContext | None = None,
) -> EditResult:
    """Write the requested facts into ``model`` in place, one request after another.

    Returns an :class:`EditResult`; ``result.restore()`` puts the weights back bit-for-bit.
    Guarantee: if this raises (bad request, bad hyperparameters, a non-finite update, or any
    other error), the model's weights are exactly as they were. A request whose subject ends
    its prompt is carried out but warned about (:class:`~factedit.requests.SubjectAtEndWarning`).
    """
    t0 = time.perf_counter()
    impl = get_method(method)
    reqs = as_requests(requests)
    for r in reqs:
        r.check_tokenizer(tok)
    warn_subject_at_end(reqs)
    arch = arch or describe(model)
    hp = resolve_hparams(impl, model, hparams, arch)
    impl.check(hp, arch)
    editor = WeightEditor(model)
    timings: dict[str, float] = {}
    try:
        diagnostics = impl.execute(
            model, tok, reqs, hp, editor, arch, context or EditContext(), timings
        )
    except BaseException:
        editor.restore()
        raise
    timings["total"] = time.perf_counter() - t0
    return EditResult(
        method=impl.name,
        requests=reqs,
        hparams=hp,
        original=editor.original,
        steps=editor.steps,
        diagnostics=diagnostics,
        timings=timings,
        model=model,
    )


@contextlib.contextmanager
def edited(
    model: nn.Module, tok: Any, requests: Any, method: str = "rome", hparams: Any = None, **kw: Any
) -> Iterator[EditResult]:
    """``with edited(model, tok, requests) as result:`` the model is edited inside the block
    and restored bit-for-bit on exit (exceptions included)."""
    result = edit(model, tok, requests, method, hparams, **kw)
    try:
        yield result
    finally:
        result.restore()


__all__ = [
    "EditContext",
    "EditError",
    "EditMethod",
    "EditResult",
    "LowRankDelta",
    "MethodNotAvailableError",
    "NonFiniteUpdateError",
    "WeightEditor",
    "available_methods",
    "edit",
    "edited",
    "get_method",
    "resolve_hparams",
    "unknown_fields_message",
    "warn_subject_at_end",
]
