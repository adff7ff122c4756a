"""What every subcommand shares: model options, loading, thread control, progress lines."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("factedit")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--device`` and ``--threads`` for a command that loads a model."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="model: packaged name (smollm2-135m [default], gemma3-270m), a folder, a .gguf file or a hub id",
    )
    g.add_argument(
        "--dtype", default=None, help="weights' dtype: float32 (default), bfloat16, float16"
    )
    g.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda or cuda:1 (default cpu; under torchrun, cuda means "
        "each process's own GPU, cuda:LOCAL_RANK)",
    )
    g.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="spread a model too large for one device over GPUs, CPU memory and disk "
        "(accelerate): auto, balanced, sequential, or JSON {module: device}",
    )
    g.add_argument(
        "--offload-folder", default=None, help="folder for layers a device map puts on disk"
    )
    add_threads_arg(g)


def add_threads_arg(p: Any) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: $FACTEDIT_THREADS, else the cores not already busy "
        "by the 1-minute load average, at least 1). Too many threads on a busy machine make "
        "torch 5-10x slower; results are reproducible for the same thread count and dtype",
    )


def default_threads() -> int:
    """Cores this process may use, minus those other processes keep busy (load average).

    torch's own default takes every core; with another job running, its threads then
    wait on each other and a forward pass gets many times slower.
    """
    env = os.environ.get("FACTEDIT_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"FACTEDIT_THREADS must be a whole number, got {env!r}") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, cores - busy)


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to ``requested`` (or :func:`default_threads`); returns it."""
    import torch

    n = requested if requested is not None else default_threads()
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    log.info("using %d CPU thread(s)", n)
    return n


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Set threads and load ``(model, tokenizer)`` from the common options, saying so."""
    from ..models import load_model

    set_threads(getattr(args, "threads", None))
    if getattr(args, "device_map", None) and torch_distributed_world() > 1:
        raise ValueError(
            "--device-map with several processes is not supported; give each process its own --device"
        )
    device = process_device(args.device)
    if is_main_process():
        status(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    return load_model(
        args.model, dtype=args.dtype, device=device,
        device_map=parse_device_map(getattr(args, "device_map", None)),
        offload_folder=getattr(args, "offload_folder", None),
    )  # fmt: skip


def parse_device_map(value: str | None) -> Any:
    """``--device-map``: a strategy name, or a JSON object from module names to devices."""
    import json

    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--device-map is not valid JSON: {exc}") from None


# ---- several processes (torchrun) -------------------------------------------------------------


def torch_distributed_world() -> int:
    """Processes in this launch: torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 under torchrun, always true otherwise: only it prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str | None) -> str | None:
    """Under torchrun, an accelerator named without an index (``cuda``, ``xpu``, ...) means this
    process's own one (index ``LOCAL_RANK``)."""
    if device is None or torch_distributed_world() <= 1:
        return device
    import torch

    dev = torch.device(device)
    if dev.type == "cpu" or dev.index is not None:
        return device
    return str(torch.device(dev.type, int(os.environ.get("LOCAL_RANK", "0"))))


def init_distributed(device: str | None) -> bool:
    """Join torchrun's process group (NCCL for GPUs, gloo on CPU); ``False`` without torchrun.

    The group's timeout is long: ranks of an evaluation wait for each other at the end, and
    their shares of the cases can take hours.
    """
    if torch_distributed_world() <= 1:
        return False
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    dev = torch.device(process_device(device) or "cpu")
    if dev.type != "cpu":
        torch.accelerator.set_device_index(dev.index)
    timeout = datetime.timedelta(hours=float(os.environ.get("FACTEDIT_DIST_TIMEOUT_HOURS", "48")))
    # torch's own choice per device type: NCCL for CUDA, gloo on CPU.
    dist.init_process_group(backend=dist.get_default_backend_for_device(dev), timeout=timeout)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def finish_distributed() -> None:
    """Leave the process group (a no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_corpus_arg(p: argparse.ArgumentParser) -> None:
    """``--corpus`` for commands whose methods may compute covariance statistics."""
    p.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="text/JSON/JSONL corpus of the covariance statistics (default: the packaged Wikipedia lead paragraphs; needed where that package is not installed)",
    )


def check_corpus(path: Any) -> None:
    """Refuse a --corpus that is not a file before anything is loaded or written."""
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"--corpus {path} is not a file")


def status(message: str) -> None:
    """A progress line for the user (stderr, so stdout stays the command's output)."""
    print(message, file=sys.stderr, flush=True)


def parse_hparams(value: str | None) -> Any:
    """``--hparams``: inline JSON overrides (``{...}``), a JSON/YAML file, or ``None``."""
    import json
    from pathlib import Path

    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--hparams is not valid JSON: {exc}") from None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(
            f"--hparams: file {path} does not exist (give a file or inline JSON)"
        )
    return path


@contextlib.contextmanager
def show_phases(enabled: bool = True) -> Iterator[None]:
    """While active, an edit's phases (``factedit.phases`` log: "value optimisation ...",
    "value optimisation: 5.2 s") are printed on stderr."""
    logger = logging.getLogger("factedit.phases")
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # -v would print every line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class Indicator:
    """A busy indicator on stderr: ``indicator("generating ...")`` shows the text,
    ``indicator(None)`` clears it. On a terminal the text is overwritten in place; otherwise
    each message is a line of its own."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False

    def __call__(self, message: str | None) -> None:
        if message is None:
            if self.shown and self.tty:
                self.stream.write("\r\033[K")
                self.stream.flush()
            self.shown = False
            return
        if self.tty:
            self.stream.write("\r\033[K" + message)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()
        self.shown = True
