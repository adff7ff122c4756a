"""Causal tracing throughput: known facts traced per minute on a model (default: SmolLM2-135M).

Picks the first ``--facts-n`` facts of ROME's known-facts file that the model predicts
correctly (first token of ``attribute`` is its top next token), traces them for the chosen
kinds with the full ``tokens x layers`` grid, and prints facts/minute, forward rows/second and
the command that reproduces the figure.

    python bench/bench_trace.py --facts-n 3 --kinds mlp --samples 3
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def default_facts() -> Path:
    data = Path(os.environ.get("FACTEDIT_DATA_DIR", REPO.parent / "shared" / "data"))
    return data / "knowns" / "known_1000.json"


def known_facts(model, tok, facts: list[dict], n: int) -> list[dict]:
    """The first ``n`` facts whose attribute's first token is the model's top prediction."""
    from factedit.scoring import next_token_distribution

    chosen: list[dict] = []
    for start in range(0, len(facts), 32):
        chunk = facts[start : start + 32]
        top = next_token_distribution(model, tok, [f["prompt"] for f in chunk]).argmax(-1).tolist()
        for fact, pred in zip(chunk, top, strict=True):
            if tok(" " + fact["attribute"], add_special_tokens=False)["input_ids"][0] == pred:
                chosen.append(fact)
                if len(chosen) == n:
                    return chosen
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model (default: the packaged SmolLM2-135M)")
    p.add_argument("--dtype", default=None, help="weights' dtype (default float32)")
    p.add_argument("--facts", type=Path, default=default_facts(), help="known-facts JSON")
    p.add_argument("--facts-n", type=int, default=3, help="known facts to trace (default 3)")
    p.add_argument("--kinds", default="mlp", help="comma-separated kinds (default mlp)")
    p.add_argument("--samples", type=int, default=3, help="noise samples (default 3)")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)

    from factedit import describe, load_model
    from factedit.tokens import subject_token_range
    from factedit.tracing import average_trace, load_facts

    model, tok = load_model(args.model, dtype=args.dtype)
    facts = known_facts(model, tok, load_facts(args.facts), args.facts_n)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    start = time.perf_counter()
    avg = average_trace(
        model, tok, facts, kinds=kinds, samples=args.samples, window=args.window,
        batch_size=args.batch_size, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # Rows: one corrupted copy per (cell, sample), cells from the subject's first token on.
    rows = 0
    for f in facts:
        ids = tok(f["prompt"])["input_ids"]
        s, _ = subject_token_range(tok, f["prompt"], f["subject"])
        rows += (len(ids) - s) * describe(model).n_layers * args.samples * len(kinds)
    print(
        f"model {type(model).__name__}, {torch.get_num_threads()} threads, dtype {args.dtype or 'float32'}"
    )
    print(
        f"traced {avg.n_facts} facts ({avg.n_skipped} skipped), kinds {kinds}, samples {args.samples}"
    )
    print(
        f"{seconds:.1f} s: {60 * avg.n_facts / seconds:.2f} facts/minute, {rows / seconds:.0f} rows/s"
    )
    cmd = " ".join(
        shlex.quote(a) for a in ["python", "bench/bench_trace.py", *(argv or sys.argv[1:])]
    )
    print(f"reproduce: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
