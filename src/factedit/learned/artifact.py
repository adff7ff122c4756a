"""Trained editors on disk: one safetensors file with a JSON header, never pickle.

The header records the method family, variant, the base model's fingerprint, the training
data's fingerprint, the full training configuration and the training curve. Editors live in
``<cache>/learned/`` under a name keyed on all of that; a small JSON pointer per (family,
variant, base model) names the editor to use when the user gives no path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch

FORMAT_NAME = "factedit-learned-editor"
FORMAT_VERSION = 1
_SAMPLE = 4096


class EditorNotTrainedError(ValueError):
    """No trained editor exists for this model, method and variant."""


class EditorMismatchError(ValueError):
    """The editor was trained for another base model (or other layers); nothing was changed."""


class EditorFileError(ValueError):
    """An editor file that is not a valid factedit editor."""


def base_fingerprint(model: nn.Module, arch: ModelArch, edited_params: list[str]) -> str:
    """A fingerprint of the base model an editor depends on.

    Every parameter except the edited ones (so an editor keeps working while its own edits
    accumulate) contributes its name, dtype, shape and 4,096 evenly spaced values. Any
    differently trained model differs in them; computing it takes milliseconds, so it is
    checked before every edit.
    """
    skip = set(edited_params)
    h = hashlib.sha256()
    h.update(f"{arch.model_class}|{arch.n_layers}|{arch.hidden_size}|".encode())
    for name, p in model.named_parameters():
        if name in skip:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].float().cpu().contiguous()
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def editors_dir(root: Path) -> Path:
    return Path(root) / "learned"


def artifact_path(root: Path, family: str, variant: str, base_fp: str, key: str) -> Path:
    """Where the editor keyed on ``key`` (config + data fingerprint) is cached."""
    return editors_dir(root) / f"{family}-{variant}-{base_fp[:16]}-{key[:16]}.safetensors"


def pointer_path(root: Path, family: str, variant: str, base_fp: str) -> Path:
    return editors_dir(root) / f"{family}-{variant}-{base_fp[:16]}.json"


def train_command(family: str, variant: str, model_name: str | None = None) -> str:
    """The exact command that trains the editor for ``family``/``variant``."""
    data = {
        "cf": " --data ../shared/data/counterfact/counterfact-train.json",
        "zsre": " --data ../shared/data/zsre/zsre_extra_2500.json",
        "gen": "",
    }[variant]
    model = f" --model {model_name}" if model_name else ""
    return f"factedit train {family} --variant {variant}{data}{model}"


def atomic_save(tensors: dict[str, torch.Tensor], header: dict[str, Any], path: Path) -> Path:
    """Write safetensors with ``header`` (JSON) atomically: a partial file never has the name."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "header": json.dumps(header, sort_keys=True),
    }
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of an editor or checkpoint file (validated format, CPU tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EditorFileError(f"editor file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME:
                raise EditorFileError(
                    f"{path} is not a factedit editor (format {meta.get('format')!r})"
                )
            header = json.loads(meta["header"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except EditorFileError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise EditorFileError(f"cannot read editor file {path}: {exc}") from None
    return header, tensors


def write_pointer(root: Path, family: str, variant: str, base_fp: str, target: Path) -> None:
    p = pointer_path(root, family, variant, base_fp)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps({"path": str(Path(target).resolve())}))
    os.replace(tmp, p)


def find_editor(
    root: Path, family: str, variant: str, base_fp: str, model_name: str | None = None
) -> Path:
    """The editor trained last for this base model, family and variant, or
    :class:`EditorNotTrainedError` with the command that trains it."""
    p = pointer_path(root, family, variant, base_fp)
    if p.is_file():
        target = Path(json.loads(p.read_text())["path"])
        if target.is_file():
            return target
    name = f"{family}-{variant}" if variant != "gen" else family
    raise EditorNotTrainedError(
        f"no trained {name.upper()} editor for this model in {editors_dir(root)}; train it with:\n"
        f"  {train_command(family, variant, model_name)}\n"
        "(or pass the path of a trained editor as hparams={'editor': PATH})"
    )
