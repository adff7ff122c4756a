"""Saved edits: one safetensors file per edit, applied to (and reverted from) a base model.

File format (``format_version`` 1), see ``docs/saved_edits.md``:

* tensors: the deltas of every step, ``step{i}.{j}.left``/``.right`` for a
  :class:`~factedit.methods.base.LowRankDelta` (ROME's rank-one factors) and ``step{i}.{j}.dense``
  for a dense delta, stored in the dtype they were computed in;
* header metadata: ``"format": "factedit.edit"``, ``"format_version": "1"`` and ``"edit"``, a
  JSON document with the method, requests, hyperparameters, library version, the layout of the
  steps, a sha256 of the tensor payload (so corruption is detected, not only truncation) and
  the *fingerprint*: a sha256 of each touched parameter's value before the edit (with its name,
  shape and dtype).

:func:`apply_edits` applies a file only to a model whose touched parameters hash to that
fingerprint, so an edit never lands on a different base model, nor out of order on top of
another edit. It re-applies the deltas through the same :class:`WeightEditor.apply` the method
used, so the edited weights (and logits) are bit-identical to the in-memory edit. Nothing here
unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fingerprint import tensor_digest
from .hooks import get_module, get_parameter, parameter_value, set_parameter_value
from .models import module_device
from .requests import EditRequest, requests_to_json

log = logging.getLogger(__name__)

FORMAT_NAME = "factedit.edit"
FORMAT_VERSION = 1
#: Attribute on a model listing the saved edits applied to it, oldest first (for revert order).
_STACK_ATTR = "_factedit_applied_edits"


class EditFileError(ValueError):
    """A saved-edit file that cannot be read: missing, not safetensors, truncated, corrupted,
    not a factedit edit, or written by a newer format version."""


class BaseModelMismatchError(ValueError):
    """A saved edit does not fit this model: a parameter is missing, has another shape or
    dtype, or holds other values than the weights the edit was computed on. The model was not
    changed."""


class RevertOrderError(RuntimeError):
    """Applied edits must be reverted newest first; the model was not changed."""


# ---- fingerprints ----------------------------------------------------------------------------


def _sha256_tensor(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256()
    tensor_digest(h, name, t)
    return h.hexdigest()


def fingerprint(named: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The fingerprint of named parameter values: per parameter its shape, dtype and sha256
    (of name, dtype, shape and exact bytes), plus one sha256 over all of them (sorted by name)."""
    params = []
    total = hashlib.sha256()
    for name in sorted(named):
        t = named[name]
        digest = _sha256_tensor(name, t)
        params.append(
            {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "sha256": digest}
        )
        total.update(f"{name}:{digest};".encode())
    return {"algorithm": "sha256", "sha256": total.hexdigest(), "params": params}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        tensor_digest(h, key, tensors[key])
    return h.hexdigest()


# ---- the saved edit ------------------------------------------------------------------------


@dataclass
class SavedEdit:
    """An edit read from a file by :func:`load_edit` (validated; tensors on the CPU).

    ``steps`` has the same shape as :attr:`EditResult.steps`: one mapping per application,
    parameter name → dense tensor or ``LowRankDelta``. ``fingerprint`` describes the touched
    parameters' values *before* the edit.
    """

    path: Path | None
    method: str
    requests: list[EditRequest]
    hparams: dict[str, Any]
    steps: list[dict[str, Any]]
    fingerprint: dict[str, Any]
    factedit_version: str
    base_model: dict[str, Any] = field(default_factory=dict)
    applied_before: list[str] = field(default_factory=list)
    edit_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        """Names of the parameters the edit touches."""
        return [p["name"] for p in self.fingerprint["params"]]

    def describe(self) -> str:
        """One line: method, requests and where the edit goes."""
        reqs = "; ".join(f"{r.text} -> {r.target_new}" for r in self.requests)
        return f"{self.method} edit {self.edit_id[:12]} ({reqs}) touching {', '.join(self.params)}"


def _metadata_for_result(result: Any) -> dict[str, Any]:
    from . import __version__

    model = result.model
    return {
        "method": result.method,
        "requests": requests_to_json(result.requests),
        "hparams": result.hparams.to_dict()
        if hasattr(result.hparams, "to_dict")
        else dict(result.hparams),
        "factedit_version": __version__,
        "torch_version": torch.__version__,
        "base_model": _model_info(model),
        "fingerprint": fingerprint(result.original),
        # Saved edits that were applied to the model when this edit was computed: its
        # fingerprint was taken on top of them, so they must be applied first.
        "applied_before": [a.edit_id for a in getattr(model, _STACK_ATTR, [])],
        "diagnostics": _jsonable(result.diagnostics),
        "timings": _jsonable(result.timings),
    }


def _model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def describe_base_model(info: Mapping[str, Any]) -> str:
    """A model's name for messages, from :func:`_model_info`'s record: its type and size, and
    its hub id when it has one (never a local path: for packaged models that is a cache
    folder, which says nothing to the user), e.g. ``"a llama model with 134.5M parameters"``."""
    kind = info.get("model_type") or info.get("class") or "unknown"
    n = info.get("num_parameters")
    size = f" with {n / 1e6:.1f}M parameters" if isinstance(n, (int, float)) and n else ""
    text = f"a {kind} model{size}"
    name = info.get("name_or_path")
    if isinstance(name, str) and name and not _is_local_path(name):
        text += f" ({name})"
    return text


def _is_local_path(name: str) -> bool:
    # Hub ids are "org/name" or "name"; anything absolute, relative-with-dots, multi-level or
    # existing on disk is a path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or os.path.exists(name)
    )


def _jsonable(value: Any) -> Any:
    # Diagnostics may hold tensors or numpy scalars; keep what JSON can say, stringify the rest.
    return json.loads(
        json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def save_edit(result: Any, path: str | os.PathLike) -> Path:
    """Write ``result`` (an :class:`~factedit.methods.EditResult` or a :class:`SavedEdit`) to
    ``path`` as one safetensors file with JSON metadata in its header; return the path.

    Guarantees: the file is written atomically (a partial file never has the final name);
    the deltas are stored exactly (same dtype and bits), so :func:`apply_edits` reproduces the
    in-memory edit bit-for-bit; nothing is pickled.
    """
    from safetensors.torch import save_file

    from .methods.base import LowRankDelta

    path = Path(path)
    if isinstance(result, SavedEdit):
        meta = _metadata_for_saved(result)
    else:
        meta = _metadata_for_result(result)
    tensors: dict[str, torch.Tensor] = {}
    layout: list[list[dict[str, Any]]] = []
    for i, step in enumerate(result.steps):
        entries = []
        for j, (name, delta) in enumerate(step.items()):
            key = f"step{i}.{j}"
            if isinstance(delta, LowRankDelta):
                tensors[f"{key}.left"] = _cpu_copy(delta.left)
                tensors[f"{key}.right"] = _cpu_copy(delta.right)
                entries.append({"param": name, "kind": "lowrank", "key": key})
            elif isinstance(delta, torch.Tensor):
                tensors[f"{key}.dense"] = _cpu_copy(delta)
                entries.append({"param": name, "kind": "dense", "key": key})
            else:
                raise TypeError(f"cannot save a delta of type {type(delta).__name__} for {name}")
        layout.append(entries)
    if not tensors:
        raise ValueError("the edit has no deltas to save")
    meta["steps"] = layout
    meta["tensors_sha256"] = _payload_sha256(tensors)
    meta["edit_id"] = hashlib.sha256(
        (meta["tensors_sha256"] + meta["fingerprint"]["sha256"]).encode()
    ).hexdigest()
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "edit": json.dumps(meta, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("saved %s edit to %s (%d tensors)", meta["method"], path, len(tensors))
    return path


def _metadata_for_saved(saved: SavedEdit) -> dict[str, Any]:
    meta = dict(saved.extra)
    meta.update(
        method=saved.method,
        requests=requests_to_json(saved.requests),
        hparams=saved.hparams,
        factedit_version=saved.factedit_version,
        base_model=saved.base_model,
        fingerprint=saved.fingerprint,
        applied_before=saved.applied_before,
    )
    return meta


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # A private contiguous copy: safetensors refuses views that share storage.
    return t.detach().to("cpu", copy=True).contiguous()


_REQUIRED = (
    "method",
    "requests",
    "hparams",
    "factedit_version",
    "fingerprint",
    "steps",
    "tensors_sha256",
)


def load_edit(path: str | os.PathLike, *, verify: bool = True) -> SavedEdit:
    """Read and validate a saved edit.

    Raises :class:`EditFileError` with the reason when the file is missing, is not a
    safetensors file, is truncated, is not a factedit edit, was written by a newer format
    version, lacks metadata fields or tensors, or (with ``verify``) when its tensors do not
    match the recorded sha256 (a corrupted file).
    """
    from safetensors import SafetensorError, safe_open

    from .methods.base import LowRankDelta

    path = Path(path)
    if not path.is_file():
        raise EditFileError(f"saved edit {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EditFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None
    if header.get("format") != FORMAT_NAME:
        raise EditFileError(
            f"{path} is a safetensors file but not a factedit edit (no '{FORMAT_NAME}' header)"
        )
    try:
        version = int(header.get("format_version", ""))
    except ValueError:
        raise EditFileError(
            f"{path}: bad format_version {header.get('format_version')!r}"
        ) from None
    if version > FORMAT_VERSION:
        raise EditFileError(
            f"{path} uses saved-edit format {version}; this factedit reads up to {FORMAT_VERSION} "
            "(upgrade factedit)"
        )
    try:
        meta = json.loads(header["edit"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise EditFileError(
            f"{path}: the edit metadata is missing or not valid JSON ({exc})"
        ) from None
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise EditFileError(f"{path}: the edit metadata lacks field(s) {missing}")
    if verify and _payload_sha256(tensors) != meta["tensors_sha256"]:
        raise EditFileError(f"{path} is corrupted: its tensors do not match the recorded sha256")

    expected_keys: set[str] = set()
    steps: list[dict[str, Any]] = []
    shapes = {p["name"]: tuple(p["shape"]) for p in meta["fingerprint"].get("params", [])}
    for entries in meta["steps"]:
        step: dict[str, Any] = {}
        for e in entries:
            name, kind, key = e.get("param"), e.get("kind"), e.get("key")
            if name not in shapes:
                raise EditFileError(f"{path}: step parameter {name!r} is not in the fingerprint")
            names = [f"{key}.left", f"{key}.right"] if kind == "lowrank" else [f"{key}.dense"]
            if kind not in ("lowrank", "dense"):
                raise EditFileError(f"{path}: unknown delta kind {kind!r} for {name}")
            absent = [n for n in names if n not in tensors]
            if absent:
                raise EditFileError(f"{path}: tensor(s) {absent} for {name} are missing")
            expected_keys.update(names)
            if kind == "lowrank":
                delta = LowRankDelta(tensors[names[0]], tensors[names[1]])
            else:
                delta = tensors[names[0]]
            if tuple(delta.shape) != shapes[name]:
                raise EditFileError(
                    f"{path}: the delta for {name} has shape {tuple(delta.shape)}, "
                    f"the parameter {shapes[name]}"
                )
            step[name] = delta
        steps.append(step)
    extra_keys = sorted(set(tensors) - expected_keys)
    if extra_keys:
        raise EditFileError(f"{path}: unexpected tensor(s) {extra_keys[:5]}")
    if not steps:
        raise EditFileError(f"{path}: the edit has no steps")
    try:
        requests = [EditRequest.from_any(r) for r in meta["requests"]]
    except ValueError as exc:
        raise EditFileError(f"{path}: bad request in metadata: {exc}") from None
    known = {*_REQUIRED, "base_model", "applied_before", "edit_id"}
    return SavedEdit(
        path=path,
        method=meta["method"],
        requests=requests,
        hparams=meta["hparams"],
        steps=steps,
        fingerprint=meta["fingerprint"],
        factedit_version=meta["factedit_version"],
        base_model=meta.get("base_model", {}),
        applied_before=list(meta.get("applied_before", [])),
        edit_id=meta.get("edit_id", ""),
        extra={k: v for k, v in meta.items() if k not in known},
    )


# ---- applying and reverting ------------------------------------------------------------------


def check_base(model: nn.Module, saved: SavedEdit) -> None:
    """Raise :class:`BaseModelMismatchError`, naming the first offending parameter, unless every
    parameter the edit touches exists in ``model`` with the recorded shape, dtype and values."""
    made_on = describe_base_model(saved.base_model)
    here = describe_base_model(_model_info(model))
    for p in saved.fingerprint["params"]:
        name = p["name"]
        try:
            param = get_parameter(model, name)
        except LookupError:
            raise BaseModelMismatchError(
                f"this edit was made on {made_on}; this model ({here}) has no parameter {name!r}"
            ) from None
        if list(param.shape) != list(p["shape"]) or _dtype_name(param.dtype) != p["dtype"]:
            raise BaseModelMismatchError(
                f"this edit was made on {made_on}, not on this model ({here}): parameter "
                f"{name!r} there is {p['dtype']}{tuple(p['shape'])}, here "
                f"{_dtype_name(param.dtype)}{tuple(param.shape)}"
            )
        if _sha256_tensor(name, parameter_value(model, name)) != p["sha256"]:
            hint = (
                f"; apply the edit(s) it was made on top of first ({len(saved.applied_before)} recorded)"
                if saved.applied_before
                else ""
            )
            raise BaseModelMismatchError(
                f"parameter {name!r} differs from the weights this edit was made on ({made_on}; "
                f"this model: {here}): "
                f"a different base model, another edit already applied, or a changed model{hint}. "
                "The model was not changed."
            )


class AppliedEdit:
    """A saved edit applied to a model; :meth:`revert` puts the touched parameters back
    bit-for-bit. Edits applied one after another must be reverted newest first."""

    def __init__(
        self, model: nn.Module, saved: SavedEdit, original: dict[str, torch.Tensor]
    ) -> None:
        self.model = model
        self.saved = saved
        #: Parameter name → value before this edit (bit-exact copies), as in ``EditResult``.
        self.original = original
        self.edit_id = saved.edit_id
        self.reverted = False
        self._after = {n: _sha256_tensor(n, parameter_value(model, n)) for n in original}

    @property
    def orig_weights(self) -> dict[str, torch.Tensor]:
        return self.original

    def revert(self) -> None:
        """Undo the edit. Raises :class:`RevertOrderError` (changing nothing) if an edit applied
        after this one is still applied, or if the touched weights were changed since. Idempotent."""
        if self.reverted:
            return
        stack: list[AppliedEdit] = getattr(self.model, _STACK_ATTR, [])
        if self in stack and stack[-1] is not self:
            later = stack[stack.index(self) + 1 :]
            raise RevertOrderError(
                f"revert the edits applied after this one first (newest first): "
                f"{', '.join(a.saved.describe() for a in reversed(later))}"
            )
        changed = [
            n
            for n, h in self._after.items()
            if _sha256_tensor(n, parameter_value(self.model, n)) != h
        ]
        if changed:
            raise RevertOrderError(
                f"parameter(s) {changed} changed since this edit was applied (another edit on top?); "
                "revert or restore that first"
            )
        with torch.no_grad():
            for name, value in self.original.items():
                set_parameter_value(self.model, name, value)
        if self in stack:
            stack.remove(self)
        self.reverted = True

    # ``restore`` as in EditResult, so either can be used wherever an undoable edit is expected.
    restore = revert

    def __repr__(self) -> str:
        state = "reverted" if self.reverted else "applied"
        return f"AppliedEdit({self.saved.describe()}, {state})"


class AppliedEdits(list):
    """Several :class:`AppliedEdit` in application order; :meth:`revert` undoes them all,
    newest first. ``original`` maps each touched parameter to its value before the first edit."""

    @property
    def original(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for applied in self:
            for name, value in applied.original.items():
                out.setdefault(name, value)
        return out

    @property
    def model(self) -> nn.Module | None:
        return self[0].model if self else None

    def revert(self) -> None:
        for applied in reversed(self):
            applied.revert()

    restore = revert


def apply_edit(model: nn.Module, edit: SavedEdit | str | os.PathLike) -> AppliedEdit:
    """Apply one saved edit in place and return an :class:`AppliedEdit` that can revert it.

    Guarantee: on any error (unreadable file, a different base model, a non-finite result)
    the model is unchanged.
    """
    from .methods.base import LowRankDelta, WeightEditor

    saved = edit if isinstance(edit, SavedEdit) else load_edit(edit)
    check_base(model, saved)
    editor = WeightEditor(model)
    try:
        for step in saved.steps:
            # Same device as the in-memory edit had (the device that computes the parameter's
            # layer), so the product is formed identically.
            devices = {n: module_device(get_module(model, n.rpartition(".")[0])) for n in step}
            moved = {
                n: LowRankDelta(d.left.to(devices[n]), d.right.to(devices[n]))
                if isinstance(d, LowRankDelta)
                else d.to(devices[n])
                for n, d in step.items()
            }
            editor.apply(moved)
    except BaseException:
        editor.restore()
        raise
    applied = AppliedEdit(model, saved, editor.original)
    stack = getattr(model, _STACK_ATTR, None)
    if stack is None:
        stack = []
        # A plain attribute on the model (not a module-level registry): the stack lives and
        # dies with the model it describes.
        object.__setattr__(model, _STACK_ATTR, stack)
    stack.append(applied)
    log.info("applied %s", saved.describe())
    return applied


def apply_edits(
    model: nn.Module, paths: str | os.PathLike | SavedEdit | Sequence[str | os.PathLike | SavedEdit]
) -> AppliedEdit | AppliedEdits:
    """Apply one saved edit (a path or :class:`SavedEdit`), or several in the given order.

    Returns an :class:`AppliedEdit` for one, an :class:`AppliedEdits` for a list; either has
    ``revert()``. Each edit is checked against the model's current weights (see
    :func:`check_base`), so an edit made on top of another must come after it. Guarantee: if
    any edit fails, those applied by this call are reverted and the model is as before.
    """
    if isinstance(paths, (str, os.PathLike, SavedEdit)):
        return apply_edit(model, paths)
    items = list(paths)
    # Read and validate every file first, so a bad file later in the list changes nothing.
    saved = [p if isinstance(p, SavedEdit) else load_edit(p) for p in items]
    done = AppliedEdits()
    try:
        for s in saved:
            done.append(apply_edit(model, s))
    except BaseException:
        done.revert()
        raise
    return done


def applied_edits(model: nn.Module) -> list[AppliedEdit]:
    """The saved edits currently applied to ``model``, oldest first."""
    return list(getattr(model, _STACK_ATTR, []))


def edits_summary(edits: Iterable[SavedEdit]) -> list[dict[str, Any]]:
    """JSON-ready provenance of saved edits (written beside exported models)."""
    return [
        {
            "edit_id": s.edit_id,
            "method": s.method,
            "requests": requests_to_json(s.requests),
            "params": s.params,
            "factedit_version": s.factedit_version,
            "source": str(s.path) if s.path else None,
        }
        for s in edits
    ]


def combine_edits(edits: Sequence[Any]) -> SavedEdit:
    """One :class:`SavedEdit` that re-applies several edits, in the given (application) order.

    ``edits`` are :class:`~factedit.methods.EditResult`, :class:`AppliedEdit` or
    :class:`SavedEdit` objects, oldest first, each computed on top of the ones before it. The
    result's steps are all their steps in order and its fingerprint is, per parameter, the one
    recorded by the first edit touching it (the weights before any of them), so
    :func:`apply_edit` accepts the file exactly where the first edit was made and replays the
    same additions in the same order: the weights come out bit-identical to the stacked edits.
    """
    items = list(edits)
    if not items:
        raise ValueError("no edits to combine")
    first_seen: dict[str, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    requests: list[EditRequest] = []
    methods: list[str] = []
    parts: list[dict[str, Any]] = []
    for item in items:
        saved = item.saved if isinstance(item, AppliedEdit) else item
        if isinstance(saved, SavedEdit):
            fp, hparams = saved.fingerprint, saved.hparams
        else:  # an EditResult: its originals are the weights it was computed on
            fp = fingerprint(saved.original)
            hp = saved.hparams
            hparams = hp.to_dict() if hasattr(hp, "to_dict") else dict(hp)
        for p in fp["params"]:
            first_seen.setdefault(p["name"], p)
        steps.extend(dict(step) for step in saved.steps)
        requests.extend(saved.requests)
        methods.append(saved.method)
        parts.append(
            {"method": saved.method, "hparams": _jsonable(hparams), "steps": len(saved.steps)}
        )
    total = hashlib.sha256()
    for name in sorted(first_seen):
        total.update(f"{name}:{first_seen[name]['sha256']};".encode())
    combined_fp = {
        "algorithm": "sha256",
        "sha256": total.hexdigest(),
        "params": [first_seen[n] for n in sorted(first_seen)],
    }
    first = items[0]
    first_saved = first.saved if isinstance(first, AppliedEdit) else first
    if isinstance(first_saved, SavedEdit):
        base_model, applied_before = first_saved.base_model, first_saved.applied_before
    else:
        base_model = _model_info(first_saved.model)
        # Informational: saved edits on the model that are not part of this combination.
        applied_before = [
            a.edit_id for a in getattr(first_saved.model, _STACK_ATTR, []) if a not in items
        ]
    from . import __version__

    return SavedEdit(
        path=None,
        method="+".join(dict.fromkeys(methods)),
        requests=requests,
        hparams={"combined": parts},
        steps=steps,
        fingerprint=combined_fp,
        factedit_version=__version__,
        base_model=base_model,
        applied_before=list(applied_before),
    )


__all__ = [
    "AppliedEdit",
    "AppliedEdits",
    "BaseModelMismatchError",
    "EditFileError",
    "RevertOrderError",
    "SavedEdit",
    "apply_edit",
    "apply_edits",
    "applied_edits",
    "check_base",
    "combine_edits",
    "edits_summary",
    "fingerprint",
    "load_edit",
    "save_edit",
]
