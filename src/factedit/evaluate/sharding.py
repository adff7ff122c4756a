"""Evaluations split over processes or machines: shards of the cases, merged results files.

* :func:`shard_cases` picks shard ``k`` of ``n`` (every ``n``-th case from the ``k``-th), so
  a user's scheduler can run ``factedit eval --shard K/N`` on several machines;
  :func:`merge_results` joins their results files into one, ordered like the dataset.
* :func:`run_distributed_evaluation` does both inside one torch.distributed launch
  (``torchrun ... -m factedit eval``): each rank runs its shard into a part file beside the
  results file; when all are done, rank 0 merges the parts into the results file and removes
  them. An interrupted launch leaves its part files; the next launch (with any number of
  processes) folds them into the results file first and skips their cases, so runs resume
  like single-process ones.

Independent-mode evaluations only: a sequential run's edits depend on every earlier case.
Each case's metrics do not depend on which process measured it (edits are restored between
cases and generations are seeded per case), so a sharded run's per-case lines equal a
single-process run's, apart from the seconds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .datasets import EvalCase
from .results import ResultsFile, Summary, json_id, read_results, summarize
from .runner import ConfigMismatchError, EvalConfig, config_differences, run_evaluation

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``0 <= K < N`` (shards are numbered from 0)."""
    try:
        k_s, n_s = text.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise ValueError(
            f"--shard takes K/N (e.g. 0/4 for the first of four shards), got {text!r}"
        ) from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text}: need N >= 1 and 0 <= K < N (shards are numbered 0..N-1)")
    return k, n


def shard_cases(cases: Sequence[EvalCase], k: int, n: int) -> list[EvalCase]:
    """Shard ``k`` of ``n``: cases ``k, k+n, k+2n, ...`` (interleaved, so shards of a dataset
    whose hard cases cluster still take similar time)."""
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {k} of {n}: need n >= 1 and 0 <= k < n")
    return list(cases[k::n])


def merge_results(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    order: Sequence[Any] | None = None,
) -> ResultsFile:
    """Join results files of one configuration into ``out`` (written atomically; ``out`` may
    be one of ``paths``).

    Case lines keep their content; a case present in several files is kept once (the first
    file's line; a differing duplicate is logged). Cases are ordered by ``order`` (case ids,
    e.g. the dataset's), else by id when all ids are numbers, else in file order.

    Raises:
        ConfigMismatchError: the files hold different configurations.
        ValueError: no file has a header, or a file holds sequential checkpoints (a
            sequential run cannot be split).
    """
    out = Path(out)
    files = [(Path(p), read_results(p)) for p in paths]
    headed = [(p, r) for p, r in files if r.header is not None]
    if not headed:
        raise ValueError("none of the files to merge is a results file with a header")
    first_path, first = headed[0]
    for p, r in headed[1:]:
        if r.config != first.config:
            raise ConfigMismatchError(p, config_differences(first.config or {}, r.config or {}))
    if any(r.checkpoints for _, r in files) or (first.config or {}).get("sequential"):
        raise ValueError("sequential runs cannot be merged: each edit depends on all earlier cases")
    cases: dict[Any, dict[str, Any]] = {}
    for p, r in files:
        for c in r.cases:
            key = json.dumps(c["case_id"], sort_keys=True)
            if key in cases:
                if _without_seconds(cases[key]) != _without_seconds(c):
                    log.warning(
                        "case %r appears twice with different results; keeping the first (%s)",
                        c["case_id"],
                        p,
                    )
                continue
            cases[key] = c
    rows = list(cases.values())
    if order is not None:
        rank = {json.dumps(json_id(cid), sort_keys=True): i for i, cid in enumerate(order)}
        rows.sort(key=lambda c: rank.get(json.dumps(c["case_id"], sort_keys=True), len(rank)))
    elif all(
        isinstance(c["case_id"], (int, float)) and not isinstance(c["case_id"], bool) for c in rows
    ):
        rows.sort(key=lambda c: c["case_id"])
    header = dict(first.header or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.merging")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for obj in [header, *rows]:
                f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ResultsFile(header, rows, [])


def _without_seconds(case: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in case.items() if k != "seconds"}


def part_path(out: Path, rank: int, world: int) -> Path:
    """The part file rank ``rank`` of ``world`` writes beside ``out``."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world}")


def leftover_parts(out: Path) -> list[Path]:
    """Part files of earlier (interrupted) launches beside ``out``."""
    return sorted(out.parent.glob(f"{out.name}.rank*-of-*"))


def run_distributed_evaluation(
    model: nn.Module,
    tok: Any,
    cases: Sequence[EvalCase],
    config: EvalConfig,
    out: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    **kwargs: Any,
) -> Summary:
    """:func:`~factedit.evaluate.runner.run_evaluation` with the cases shared among the ranks
    of the initialised torch.distributed group; every rank must call it with the same
    arguments. Returns the summary of all ``cases`` (on every rank).

    Guarantees: ``out`` ends up holding one header and one line per finished case, in
    dataset order, whatever the number of ranks; a rank's failure stops every rank with an
    error after the finished cases were merged; each rank's model is unchanged on return.
    """
    import torch.distributed as dist

    if config.sequential:
        raise ValueError("a sequential evaluation cannot be split over processes")
    out = Path(out)
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = [c.case_id for c in cases]

    # Rank 0 checks the results file and folds in parts left by an interrupted launch.
    problem: list[Any] = [None]
    if rank == 0:
        try:
            if overwrite:
                out.unlink(missing_ok=True)
                for p in leftover_parts(out):
                    p.unlink()
            _prepare(out, config, ids)
        except Exception as exc:  # sent to the other ranks, then raised everywhere
            problem = [f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise RuntimeError(f"rank 0 could not prepare {out}: {problem[0]}")

    done = (
        {json.dumps(c["case_id"], sort_keys=True) for c in read_results(out).cases}
        if out.is_file()
        else set()
    )
    mine = [
        c
        for c in shard_cases(cases, rank, world)
        if json.dumps(json_id(c.case_id), sort_keys=True) not in done
    ]
    part = part_path(out, rank, world)
    failure = None
    try:
        run_evaluation(model, tok, mine, config, part, progress=progress and rank == 0, **kwargs)
    except Exception as exc:  # reported after every rank has finished its share
        failure = f"rank {rank}: {type(exc).__name__}: {exc}"
        log.error("%s", failure)
    failures: list[Any] = [None] * world
    dist.all_gather_object(failures, failure)

    merged_problem: list[Any] = [None]
    if rank == 0:
        try:
            parts = [p for p in leftover_parts(out) if p.is_file()]
            merge_results([p for p in [out, *parts] if p.is_file()], out, order=ids)
            for p in parts:
                p.unlink()
        except Exception as exc:
            merged_problem = [f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(merged_problem, src=0)
    errors = [f for f in failures if f] + (
        [f"merging: {merged_problem[0]}"] if merged_problem[0] else []
    )
    if errors:
        raise RuntimeError("the distributed evaluation failed: " + "; ".join(errors))
    return summarize(read_results(out), ids)


def _prepare(out: Path, config: EvalConfig, ids: Sequence[Any]) -> None:
    """Check ``out``'s configuration and fold leftover part files into it (rank 0)."""
    cfg = config.to_dict()
    inputs = [p for p in [out, *leftover_parts(out)] if p.is_file() and p.stat().st_size > 0]
    for p in inputs:
        existing = read_results(p, repair=True)
        if existing.config is not None and existing.config != cfg:
            raise ConfigMismatchError(p, config_differences(existing.config, cfg))
    if len(inputs) > 1 or (inputs and inputs[0] != out):
        merge_results(inputs, out, order=ids)
        for p in inputs:
            if p != out:
                p.unlink()
