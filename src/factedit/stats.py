"""Second-moment statistics C = E[k kᵀ] of the inputs k of a layer's MLP output projection.

ROME uses C to turn a key into the direction ``C⁻¹k`` that changes the projection's output
for that key while disturbing other keys least. Statistics are computed over a text corpus,
stopping the forward pass right after the projection (layers above it are never computed),
accumulated in float64 whatever the model's dtype, and cached on disk under a key made of
everything the value depends on: the weights that feed the projection's input, the layer,
the corpus identity, the token budget, the sequence length and the model's dtype.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import ModelArch, describe
from .corpus import Corpus, as_corpus
from .fingerprint import json_digest, module_params_fingerprint
from .hooks import Trace, as_batch_seq, get_module
from .models import cache_dir as default_cache_dir
from .models import max_positions, model_device, model_dtype, module_device

log = logging.getLogger(__name__)

#: Bump when the computation changes, so old cache files are not reused.
STATS_VERSION = 1
DEFAULT_TOKENS = 200_000
DEFAULT_SEQ_LEN = 256


@dataclass
class SecondMoment:
    """``mom2`` = E[k kᵀ] (float64, ``(d, d)``), ``mean`` = E[k], over ``count`` tokens."""

    mom2: torch.Tensor
    mean: torch.Tensor
    count: int
    key: str
    seconds: float = 0.0
    from_cache: bool = False


def stats_inputs_fingerprint(model: nn.Module, arch: ModelArch, layer: int) -> str:
    """Fingerprint of the weights the projection's input at ``layer`` depends on.

    The projection's own weight is excluded: editing it (ROME's whole point) does not change
    its inputs, so statistics stay valid across edits at that layer.
    """
    prefixes = [arch.embed] + [arch.layer_name(i) for i in range(layer + 1)]
    proj = arch.mlp_out_name(layer)
    exclude = [f"{proj}.weight", f"{proj}.bias"]
    return module_params_fingerprint(model, prefixes, exclude)


def stats_key(
    model: nn.Module, arch: ModelArch, layer: int, corpus: Corpus, tokens: int, seq_len: int
) -> str:
    parts = {
        "version": STATS_VERSION,
        "weights": stats_inputs_fingerprint(model, arch, layer),
        "layer": layer,
        "module": arch.mlp_out_name(layer),
        "corpus": corpus.identity,
        "tokens": tokens,
        "seq_len": seq_len,
        "model_dtype": str(model_dtype(model)),
    }
    return json_digest(parts)


def packed_token_rows(tok: Any, corpus: Corpus, tokens: int, seq_len: int) -> torch.Tensor:
    """Token rows of ``seq_len`` made by concatenating corpus documents (separated by the BOS
    or EOS token), ``ceil(tokens / seq_len)`` rows at most.

    Packing wastes no compute on padding; every row starts at a document boundary or inside one.
    """
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    n_rows = -(-tokens // seq_len)
    rows: list[list[int]] = []
    buf: list[int] = []
    for doc in corpus:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        buf.extend(([sep] if sep is not None else []) + ids)
        while len(buf) >= seq_len and len(rows) < n_rows:
            rows.append(buf[:seq_len])
            buf = buf[seq_len:]
        if len(rows) >= n_rows:
            break
    if len(rows) < n_rows and len(buf) > 16:
        rows.append(buf)  # a last, shorter row
    if not rows:
        raise ValueError(f"corpus {corpus.name!r} yields no tokens")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _fit_seq_len(model: nn.Module, seq_len: int) -> int:
    # Rows longer than the model's position table would fail (GPT-2 style) or extrapolate.
    limit = max_positions(model)
    return min(seq_len, limit) if limit else seq_len


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default torch.distributed group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sums(
    acc: torch.Tensor, total: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The reduction step: sum every rank's partial sums (float64) and token counts."""
    import torch.distributed as dist

    n = torch.tensor([float(count)], dtype=torch.float64, device=acc.device)
    for t in (acc, total, n):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return acc, total, int(n.item())


@torch.no_grad()
def compute_second_moment(
    model: nn.Module,
    tok: Any,
    layer: int,
    *,
    arch: ModelArch | None = None,
    corpus: Corpus | str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_rows: int = 8,
    progress: bool = True,
    distributed: bool = False,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Compute ``(E[k kᵀ], E[k], count)`` for the projection input at ``layer``, uncached.

    The model is unchanged; its forward pass stops right after the projection. Inputs go to
    the device that runs the embedding; the sums are kept on the device that computes the
    projection (they differ when a device map spreads the model), in float64 whatever the
    model's dtype.

    ``distributed``: when a torch.distributed process group is initialised, each rank
    measures every ``world``-th token row and the partial sums are all-reduced, so every rank
    returns the statistics of all rows (the same as one process, up to float32 rounding of
    the per-batch products). All ranks must call it with the same arguments.

    ``rows``: token rows already made by :func:`packed_token_rows` (``-1`` = padding), to
    skip tokenising (``corpus``, ``tokens`` and ``seq_len`` are then ignored).
    """
    arch = arch or describe(model)
    arch.layer_name(layer)  # range check
    if rows is None:
        rows = packed_token_rows(tok, as_corpus(corpus), tokens, _fit_seq_len(model, seq_len))
    rank, world = _process_group() if distributed else (0, 1)
    # Strided rows: every rank gets the same number of full rows, give or take one.
    rows = rows[rank::world]
    device = model_device(model)
    d = arch.mlp_size
    name = arch.mlp_out_name(layer)
    acc_device = module_device(get_module(model, name))
    acc = torch.zeros(d, d, dtype=torch.float64, device=acc_device)
    total = torch.zeros(d, dtype=torch.float64, device=acc_device)
    count = 0
    bar = tqdm(
        total=int((rows >= 0).sum()), unit="tok", desc=f"stats layer {layer}", disable=not progress
    )
    for s in range(0, rows.shape[0], batch_rows):
        batch = rows[s : s + batch_rows]
        mask = batch >= 0
        n_tok = int(mask.sum())  # counted on the host, before the batch moves
        ids = batch.clamp(min=0).to(device, non_blocking=True)
        with Trace(model, name, retain_input=True, retain_output=False, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask.long().to(device), use_cache=False)
        # Zeroing padded positions instead of selecting the valid ones avoids a device-to-host
        # synchronisation per batch; padded rows add zeros to the sums.
        weight = mask.reshape(-1, 1).to(acc_device, torch.float32, non_blocking=True)
        kf = (
            as_batch_seq(tr.input, *ids.shape).reshape(-1, d).to(acc_device, torch.float32) * weight
        )
        # Per-batch products in float32 are exact enough; the running sum is float64.
        acc += (kf.T @ kf).double()
        total += kf.sum(0).double()
        count += n_tok
        bar.update(n_tok)
    bar.close()
    if world > 1:
        acc, total, count = _all_reduce_sums(acc, total, count)
    return (acc / count), (total / count), count


def layer_stats(
    model: nn.Module,
    tok: Any,
    layer: int,
    *,
    arch: ModelArch | None = None,
    corpus: Corpus | str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    memo: dict[str, Any] | None = None,
    distributed: bool = False,
) -> SecondMoment:
    """E[k kᵀ] of the MLP output projection's inputs at ``layer``, from the cache when possible.

    The cache file is ``<cache_dir>/stats/<key>.safetensors``; ``key`` covers everything the
    value depends on (see the module docstring) and not the number of processes. Writes are
    atomic, so concurrent or interrupted runs never leave a half-written file. The result is
    on the device that computes the projection.

    ``memo`` (a dict the caller holds, e.g. :attr:`EditContext.memo`) keeps the result in
    memory, valid while none of the weights it depends on is modified in place (tracked
    through the tensors' version counters), so repeated edits neither re-read the file nor
    re-hash the weights.

    ``distributed``: with an initialised torch.distributed process group, the ranks share
    the work (see :func:`compute_second_moment`); they use the cache when rank 0 finds it,
    and only rank 0 writes it. Every rank must call this with the same arguments.
    """
    arch = arch or describe(model)
    arch.layer_name(layer)
    corpus = as_corpus(corpus)
    seq_len = _fit_seq_len(model, seq_len)
    memo_key = None
    if memo is not None and use_cache:
        prefixes = [arch.embed] + [arch.layer_name(i) for i in range(layer + 1)]
        proj = arch.mlp_out_name(layer)
        state = tuple(
            (n, p.data_ptr(), p._version)
            for n, p in model.named_parameters()
            if n not in (f"{proj}.weight", f"{proj}.bias")
            and any(n == pre or n.startswith(pre + ".") for pre in prefixes)
        )
        memo_key = f"stats/{id(model)}/{layer}/{corpus.identity}/{tokens}/{seq_len}/{hash(state)}"
        if memo_key in memo:
            return memo[memo_key]
    key = stats_key(model, arch, layer, corpus, tokens, seq_len)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    path = folder / f"{key}.safetensors"
    device = module_device(get_module(model, arch.mlp_out_name(layer)))
    rank, world = _process_group() if distributed else (0, 1)
    cached = use_cache and path.is_file()
    if world > 1:
        # Every rank must take the same branch (the computation is collective); rank 0's
        # view of the cache decides, for ranks on machines that do not share it.
        import torch.distributed as dist

        flag = [cached]
        dist.broadcast_object_list(flag, src=0)
        cached = bool(flag[0]) and path.is_file()
        if rank != 0 and bool(flag[0]) and not cached:
            raise FileNotFoundError(
                f"rank 0 has the statistics {path} in its cache but rank {rank} does not see it"
            )
    if cached:
        data = load_file(path)
        meta = (
            json.loads((folder / f"{key}.json").read_text())
            if (folder / f"{key}.json").is_file()
            else {}
        )
        result = SecondMoment(
            data["mom2"].to(device), data["mean"].to(device), int(data["count"].item()), key,
            meta.get("seconds", 0.0), from_cache=True,
        )  # fmt: skip
        if memo_key is not None:
            memo[memo_key] = result
        return result
    t0 = time.perf_counter()
    mom2, mean, count = compute_second_moment(
        model, tok, layer, arch=arch, corpus=corpus, tokens=tokens, seq_len=seq_len,
        progress=progress and rank == 0, distributed=distributed,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    log.info(
        "layer %d statistics: %d tokens in %.1f s (%.0f tokens/s)",
        layer,
        count,
        seconds,
        count / seconds,
    )
    if use_cache and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(
            {
                "mom2": mom2.cpu().contiguous(),
                "mean": mean.cpu().contiguous(),
                "count": torch.tensor(count),
            },
            str(tmp),
        )
        meta = {
            "layer": layer, "module": arch.mlp_out_name(layer), "corpus": corpus.identity,
            "tokens": tokens, "seq_len": seq_len, "count": count, "seconds": seconds,
            "model_class": arch.model_class, "model_dtype": str(model_dtype(model)),
        }  # fmt: skip
        (folder / f"{key}.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path)
    result = SecondMoment(mom2, mean, count, key, seconds, from_cache=False)
    if memo_key is not None:
        memo[memo_key] = result
    return result


# ---- several layers in one pass ----------------------------------------------------------------


@torch.no_grad()
def compute_second_moments(
    model: nn.Module,
    tok: Any,
    layers: list[int] | tuple[int, ...],
    *,
    arch: ModelArch | None = None,
    corpus: Corpus | str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_rows: int = 8,
    progress: bool = True,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
    """:func:`compute_second_moment` for several layers in ONE pass over the corpus, uncached.

    The forward pass stops right after the highest layer's projection, so the statistics of
    MEMIT's layers 3..8 cost one truncated pass instead of six. Returns ``{layer: (E[k kᵀ],
    E[k], count)}``; each layer's numbers equal what :func:`compute_second_moment` gives alone
    (same rows, same accumulation order). The model is unchanged.
    """
    from .hooks import TraceDict

    arch = arch or describe(model)
    layers = sorted(set(int(i) for i in layers))
    if not layers:
        return {}
    for i in layers:
        arch.layer_name(i)  # range check
    corpus = as_corpus(corpus)
    seq_len = _fit_seq_len(model, seq_len)
    rows = packed_token_rows(tok, corpus, tokens, seq_len)
    device = model_device(model)
    d = arch.mlp_size
    names = {i: arch.mlp_out_name(i) for i in layers}
    acc = {i: torch.zeros(d, d, dtype=torch.float64, device=device) for i in layers}
    total = {i: torch.zeros(d, dtype=torch.float64, device=device) for i in layers}
    count = 0
    bar = tqdm(
        total=int((rows >= 0).sum()),
        unit="tok",
        desc=f"stats layers {layers}",
        disable=not progress,
    )
    for s in range(0, rows.shape[0], batch_rows):
        batch = rows[s : s + batch_rows]
        mask = batch >= 0
        ids = batch.clamp(min=0).to(device)
        # stop=True stops after the last traced module in execution order: the top layer.
        with TraceDict(
            model, list(names.values()), retain_input=True, retain_output=False, stop=True
        ) as td:
            model(input_ids=ids, attention_mask=mask.long().to(device), use_cache=False)
        n = 0
        for i, name in names.items():
            k = as_batch_seq(td[name].input, *ids.shape)[mask.to(device)]
            kf = k.float()
            acc[i] += (kf.T @ kf).double()
            total[i] += kf.sum(0).double()
            n = k.shape[0]
        count += n
        bar.update(n)
    bar.close()
    return {i: (acc[i] / count, total[i] / count, count) for i in layers}


def layers_stats(
    model: nn.Module,
    tok: Any,
    layers: list[int] | tuple[int, ...],
    *,
    arch: ModelArch | None = None,
    corpus: Corpus | str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    memo: dict[str, Any] | None = None,
) -> dict[int, SecondMoment]:
    """:func:`layer_stats` for several layers: each read from its per-layer cache file when
    there is one, and all missing layers computed in one truncated pass
    (:func:`compute_second_moments`) and cached per layer, under the same keys
    :func:`layer_stats` uses (so either function reads what the other wrote)."""
    arch = arch or describe(model)
    layers = sorted(set(int(i) for i in layers))
    corpus = as_corpus(corpus)
    seq_len = _fit_seq_len(model, seq_len)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    out: dict[int, SecondMoment] = {}
    missing = []
    for i in layers:
        arch.layer_name(i)
        key = stats_key(model, arch, i, corpus, tokens, seq_len)
        if use_cache and (folder / f"{key}.safetensors").is_file():
            out[i] = layer_stats(model, tok, i, arch=arch, corpus=corpus, tokens=tokens, seq_len=seq_len,
                                 cache_dir=folder, progress=progress, memo=memo)  # fmt: skip
        else:
            missing.append((i, key))
    if not missing:
        return out
    t0 = time.perf_counter()
    computed = compute_second_moments(
        model, tok, [i for i, _ in missing], arch=arch, corpus=corpus, tokens=tokens, seq_len=seq_len,
        progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    log.info("statistics of layers %s: one pass in %.1f s", [i for i, _ in missing], seconds)
    device = model_device(model)
    for i, key in missing:
        mom2, mean, count = computed[i]
        if use_cache:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{key}.safetensors"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file(
                {
                    "mom2": mom2.cpu().contiguous(),
                    "mean": mean.cpu().contiguous(),
                    "count": torch.tensor(count),
                },
                str(tmp),
            )
            meta = {
                "layer": i, "module": arch.mlp_out_name(i), "corpus": corpus.identity,
                "tokens": tokens, "seq_len": seq_len, "count": count, "seconds": seconds,
                "model_class": arch.model_class, "model_dtype": str(model_dtype(model)),
                "pass_layers": [j for j, _ in missing],
            }  # fmt: skip
            (folder / f"{key}.json").write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path)
        out[i] = SecondMoment(
            mom2.to(device), mean.to(device), count, key, seconds, from_cache=False
        )
    return out
