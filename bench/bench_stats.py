"""Throughput of the second-moment statistics against a plain forward pass truncated at the
same layer over the same tokens (the floor any implementation pays).

    python bench/bench_stats.py --layer 4 --tokens 20000
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import factedit
from factedit.arch import describe
from factedit.corpus import wikipedia
from factedit.hooks import Trace
from factedit.stats import compute_second_moment, packed_token_rows


@torch.no_grad()
def truncated_forward(model, rows: torch.Tensor, name: str, batch_rows: int = 8) -> None:
    for s in range(0, rows.shape[0], batch_rows):
        b = rows[s : s + batch_rows]
        mask = b >= 0
        with Trace(model, name, retain_output=False, stop=True):
            model(input_ids=b.clamp(min=0), attention_mask=mask.long(), use_cache=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    model, tok = factedit.load_model()
    arch = describe(model)
    corpus = wikipedia()
    rows = packed_token_rows(tok, corpus, args.tokens, 256)
    n = int((rows >= 0).sum())
    stats_t, plain_t = [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine conditions
        t0 = time.perf_counter()
        compute_second_moment(
            model, tok, args.layer, arch=arch, corpus=corpus, tokens=args.tokens, progress=False
        )
        stats_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        truncated_forward(model, rows, arch.mlp_out_name(args.layer))
        plain_t.append(time.perf_counter() - t0)
    s, p = min(stats_t), min(plain_t)
    print(f"layer {args.layer}, {n} tokens, threads={torch.get_num_threads()}")
    print(
        f"statistics (tokenise + forward to the layer + k kᵀ accumulation): {n / s:,.0f} tokens/s"
    )
    print(
        f"plain forward truncated at the same layer:                        {n / p:,.0f} tokens/s"
    )
    print(f"ratio: {p / s:.2f}x of the truncated forward")
    print("command: python " + " ".join(["bench/bench_stats.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
