"""factedit: locate and edit factual knowledge in transformer language models.

The public API is importable from the package root; heavy submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "cache_dir": "models",
    "ModelNotAvailableError": "models",
    "describe": "arch",
    "ModelArch": "arch",
    "UnsupportedArchitectureError": "arch",
    "Trace": "hooks",
    "TraceDict": "hooks",
    "get_module": "hooks",
    "get_parameter": "hooks",
    "set_requires_grad": "hooks",
    "replace_module": "hooks",
    "generate": "generation",
    "logit_lens": "generation",
    "EditRequest": "requests",
    "InvalidRequestError": "requests",
    "edit": "methods",
    "edited": "methods",
    "available_methods": "methods",
    "EditResult": "methods",
    "EditContext": "methods",
    "EditError": "methods",
    "MethodNotAvailableError": "methods",
    "layer_stats": "stats",
    "demo_model_editing": "demo",
    "generate_interactive": "demo",
    "apply_edits": "saving",
    "EditSession": "session",
    "load_requests": "requests",
    "load_edit": "saving",
    "trace": "tracing",
    "TraceResult": "tracing",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'factedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
