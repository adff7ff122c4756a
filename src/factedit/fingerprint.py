"""Content fingerprints of model weights, for cache keys and for checking saved edits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from .hooks import named_parameter_values


def tensor_digest(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and exact bytes into ``h``."""
    t = t.detach().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        # Hash the array's buffer in place: ``tobytes()`` would first copy every weight, which
        # cost more than the hash itself (3.5 s against 1.0 s for 540 MB on this machine).
        h.update(t.cpu().view(torch.uint8).numpy())


def params_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hex digest of named tensors (order-sensitive; names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        tensor_digest(h, name, t)
    return h.hexdigest()


def module_params_fingerprint(model: nn.Module, prefixes: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """Fingerprint of every parameter whose name starts with one of ``prefixes`` (the prefix
    ``""`` selects all), minus ``exclude``.

    Shared (tied) parameters count once, under their first name. Parameters offloaded by a
    device map count with their stored values.
    """
    prefixes = tuple(prefixes)
    skip = set(exclude)
    chosen = [
        (n, p)
        for n, p in named_parameter_values(model)
        if n not in skip and any(pre == "" or n == pre or n.startswith(pre + ".") for pre in prefixes)
    ]
    return params_fingerprint(chosen)
