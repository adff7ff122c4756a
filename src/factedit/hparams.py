"""Hyperparameters as typed dataclasses loaded from JSON/YAML, with per-model defaults.

Every method's hyperparameters subclass :class:`HParams`. Defaults for a model live in
``factedit/configs/<method>/<model key>.json`` inside the package, where the model key is a
structural description (``model_type-n_layers x hidden``, e.g. ``llama-30x576`` for
SmolLM2-135M), never a path. Fields missing from a file keep the dataclass defaults.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Self

from torch import nn

from .arch import ModelArch, describe


def model_key(model: nn.Module, arch: ModelArch | None = None) -> str:
    """A structural key for per-model defaults, e.g. ``"llama-30x576"``."""
    arch = arch or describe(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__.lower())
    return f"{model_type}-{arch.n_layers}x{arch.hidden_size}"


@dataclasses.dataclass
class HParams:
    """Base class: JSON/YAML round trips with unknown-field checking."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    @classmethod
    def defaults_for(cls, method: str, model: nn.Module, arch: ModelArch | None = None) -> Self:
        """The shipped defaults of ``method`` for this model, or the dataclass defaults
        adapted by :meth:`adapt` when no file matches."""
        arch = arch or describe(model)
        key = model_key(model, arch)
        folder = resources.files("factedit") / "configs" / method
        candidate = folder / f"{key}.json"
        if candidate.is_file():
            return cls.from_dict(json.loads(candidate.read_text()))
        return cls().adapt(arch)

    def adapt(self, arch: ModelArch) -> Self:
        """Generic defaults for a model without a shipped file (override per method)."""
        return self
