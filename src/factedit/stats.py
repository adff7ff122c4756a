"""Second-moment statistics C = E[k kᵀ] of the inputs k of a layer's MLP output projection.

ROME uses C to turn a key into the direction ``C⁻¹k`` that changes the projection's output
for that key while disturbing other keys least. Statistics are computed over a text corpus,
stopping the forward pass right after the projection (layers above it are never computed),
accumulated in float64 whatever the model's dtype, and cached on disk under a key made of
everything the value depends on: the weights that feed the projection's input, the layer,
the corpus identity, the token budget, the sequence length and the model's dtype.
"""

from __future__ import annotations

import hashlib
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
from .fingerprint import module_params_fingerprint
from .hooks import Trace, as_batch_seq
from .models import cache_dir as default_cache_dir
from .models import max_positions, model_device, model_dtype

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


def stats_key(model: nn.Module, arch: ModelArch, layer: int, corpus: Corpus, tokens: int, seq_len: int) -> str:
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
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


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
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Compute ``(E[k kᵀ], E[k], count)`` for the projection input at ``layer``, uncached.

    The model is unchanged; its forward pass stops right after the projection.
    """
    arch = arch or describe(model)
    arch.layer_name(layer)  # range check
    corpus = as_corpus(corpus)
    seq_len = _fit_seq_len(model, seq_len)
    rows = packed_token_rows(tok, corpus, tokens, seq_len)
    device = model_device(model)
    d = arch.mlp_size
    acc = torch.zeros(d, d, dtype=torch.float64, device=device)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    count = 0
    name = arch.mlp_out_name(layer)
    bar = tqdm(total=int((rows >= 0).sum()), unit="tok", desc=f"stats layer {layer}", disable=not progress)
    for s in range(0, rows.shape[0], batch_rows):
        batch = rows[s : s + batch_rows]
        mask = batch >= 0
        ids = batch.clamp(min=0).to(device)
        with Trace(model, name, retain_input=True, retain_output=False, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask.long().to(device), use_cache=False)
        k = as_batch_seq(tr.input, *ids.shape)[mask.to(device)]
        # Per-batch products in float32 are exact enough; the running sum is float64.
        kf = k.float()
        acc += (kf.T @ kf).double()
        total += kf.sum(0).double()
        count += k.shape[0]
        bar.update(k.shape[0])
    bar.close()
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
) -> SecondMoment:
    """E[k kᵀ] of the MLP output projection's inputs at ``layer``, from the cache when possible.

    The cache file is ``<cache_dir>/stats/<key>.safetensors``; ``key`` covers everything the
    value depends on (see the module docstring). Writes are atomic, so concurrent or
    interrupted runs never leave a half-written file.

    ``memo`` (a dict the caller holds, e.g. :attr:`EditContext.memo`) keeps the result in
    memory, valid while none of the weights it depends on is modified in place (tracked
    through the tensors' version counters), so repeated edits neither re-read the file nor
    re-hash the weights.
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
    device = model_device(model)
    if use_cache and path.is_file():
        data = load_file(path)
        meta = json.loads((folder / f"{key}.json").read_text()) if (folder / f"{key}.json").is_file() else {}
        result = SecondMoment(
            data["mom2"].to(device), data["mean"].to(device), int(data["count"].item()), key,
            meta.get("seconds", 0.0), from_cache=True,
        )  # fmt: skip
        if memo_key is not None:
            memo[memo_key] = result
        return result
    t0 = time.perf_counter()
    mom2, mean, count = compute_second_moment(
        model, tok, layer, arch=arch, corpus=corpus, tokens=tokens, seq_len=seq_len, progress=progress
    )
    seconds = time.perf_counter() - t0
    log.info("layer %d statistics: %d tokens in %.1f s (%.0f tokens/s)", layer, count, seconds, count / seconds)
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(
            {"mom2": mom2.cpu().contiguous(), "mean": mean.cpu().contiguous(), "count": torch.tensor(count)},
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
