"""Results files and their summary.

A results file is JSONL: a header line with the run's configuration, then one line per
finished case and, for sequential runs, checkpoint lines (format: :mod:`factedit.evaluate.runner`).
:func:`read_results` parses one (an interrupted last line is ignored); :func:`summarize` turns
one into a :class:`Summary` of means, paired changes and 95 % CIs.

This module only reads and reports what the runners measured. It is kept apart from the
measuring code on purpose: the pre-edit cache (:mod:`~factedit.evaluate.precache`) keys its
files on a digest of the measuring modules' source, and a change to how results are printed
must not throw away measurements that are still valid.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import (
    COUNTERFACT_METRICS,
    GENERATION_METRICS,
    RAW_METRICS,
    ZSRE_METRICS,
    Estimate,
    mean_ci,
    paired_changes,
    relative_change,
    summarize_cases,
    table_format,
)

log = logging.getLogger(__name__)


# ---- results file ------------------------------------------------------------------------
@dataclass
class ResultsFile:
    """The parsed content of a results JSONL file."""

    header: dict[str, Any] | None
    cases: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]

    @property
    def config(self) -> dict[str, Any] | None:
        return None if self.header is None else self.header.get("config")


def read_results(path: str | Path, *, repair: bool = False) -> ResultsFile:
    """Parse a results file. A last line cut short by an interruption is ignored (and, with
    ``repair``, removed from the file); any other unreadable line is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    header, cases, checkpoints = None, [], []
    good_end = 0
    offset = 0
    for i, line in enumerate(lines):
        end = offset + len(line) + 1
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 or not any(x.strip() for x in lines[i + 1 :]):
                    log.warning("ignoring an incomplete last line in %s (interrupted run)", path)
                    break
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
            kind = obj.get("type")
            if kind == "header":
                header = obj
            elif kind == "case":
                cases.append(obj)
            elif kind == "checkpoint":
                checkpoints.append(obj)
            else:
                raise ValueError(f"{path}: line {i + 1} has unknown type {kind!r}")
        good_end = min(end, len(raw))
        offset = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if header is None and (cases or checkpoints):
        raise ValueError(f"{path} has no header line; it is not a factedit results file")
    return ResultsFile(header, cases, checkpoints)


def append_line(path: Path, obj: Mapping[str, Any]) -> None:
    """Append ``obj`` as one JSON line to ``path``, flushed and synced, so an interruption
    loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def json_id(case_id: Any) -> Any:
    """``case_id`` as it reads back from a results file (what JSON makes of it)."""
    return json.loads(json.dumps(case_id, default=str))


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    return str(x)


# ---- summary ---------------------------------------------------------------------------------
@dataclass
class Summary:
    """Means and 95 % CIs per metric, before and after the edits.

    ``change``: per metric, the mean change after against before, paired case by case, with
    the 95 % CI of the differences (the CI a change must beat; the ``pre`` and ``post`` CIs
    side by side overstate it, since they include how cases differ from each other).
    ``relative_change``: the same for the fluency metrics, as a fraction of the mean before
    over the same cases (the issue bars' "GE drop").
    """

    kind: str
    n_cases: int
    n_errors: int
    pre: dict[str, Estimate]
    post: dict[str, Estimate]
    seconds: dict[str, Estimate]
    config: dict[str, Any]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    change: dict[str, Estimate] = field(default_factory=dict)
    relative_change: dict[str, Estimate] = field(default_factory=dict)

    def metric_names(self) -> list[str]:
        order = ZSRE_METRICS if self.kind == "zsre" else COUNTERFACT_METRICS
        names = [m for m in order if m in self.pre or m in self.post]
        for m in [*self.pre, *self.post]:
            if m not in names:
                names.append(m)
        return names

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_cases": self.n_cases,
            "n_errors": self.n_errors,
            "ci": "95% normal approximation 1.96*sd/sqrt(n); Score: percentile bootstrap (1000 resamples)",
            "pre": {k: v.to_dict() for k, v in self.pre.items()},
            "post": {k: v.to_dict() for k, v in self.post.items()},
            "change": {k: v.to_dict() for k, v in self.change.items()},
            "relative_change": {k: v.to_dict() for k, v in self.relative_change.items()},
            "seconds_per_case": {k: v.to_dict() for k, v in self.seconds.items()},
            "checkpoints": self.checkpoints,
            "config": self.config,
            "environment": self.environment,
            "notes": self.notes,
        }

    def _fluency_table(self, checkpoints: list[dict[str, Any]]) -> list[str]:
        """Markdown lines for a sequential mass-editing run's fluency checkpoints
        (:func:`~factedit.evaluate.batch.batch_checkpoint`), framed by the values before the
        edits and after the last batch."""
        none = Estimate(float("nan"), float("nan"), 0)
        lines = ["Fluency along the sequence (GE on the sampled cases; change paired against before the edits):", "",
                 "| after batch | edits | GE | change, cases edited so far | change, cases not edited yet |",
                 "| ---: | ---: | ---: | ---: | ---: |",
                 f"| 0 | 0 | {self.pre.get('GE', none).format(1.0, 2)} | - | - |"]  # fmt: skip
        for cp in checkpoints:
            cells = [_estimate(cp["summary"]["GE"]).format(1.0, 2)]
            for group in ("edited", "unedited"):
                g = cp["groups"][group]
                est = _estimate(g["GE change"])
                cells.append(f"{est.format(1.0, 2, signed=True)} (n {g['n']})" if g["n"] else "-")
            lines.append(f"| {cp['after_batch']} | {cp['n_edits']} | " + " | ".join(cells) + " |")
        if "GE" in self.post:
            n = self.change.get("GE", none).n
            lines.append(f"| end | {self.n_cases} | {self.post['GE'].format(1.0, 2)} | "
                         f"{self.change.get('GE', none).format(1.0, 2, signed=True)} (n {n}) | - |")  # fmt: skip
        return lines

    def to_markdown(self) -> str:
        """A Markdown table: metric | pre | post | change (percent for rates, ± the 95 % CI;
        the change paired case by case, for fluency also in percent of the value before)."""
        c = self.config
        lines = [
            f"**{c.get('method')}** on `{c.get('model')}`, {self.kind} `{Path(str(c.get('dataset'))).name}`: "
            f"{self.n_cases} case{'s' if self.n_cases != 1 else ''}"
            + (f" ({self.n_errors} failed edits excluded)" if self.n_errors else "")
            + (", sequential" if c.get("sequential") else ""),
            "",
            "| metric | pre | post | change, paired |",
            "| --- | ---: | ---: | ---: |",
        ]
        for m in self.metric_names():
            scale, digits = table_format(m)
            none = Estimate(float("nan"), float("nan"), 0)  # shows as "-"
            change = self.change.get(m, none).format(scale, digits, signed=True)
            rel = self.relative_change.get(m, none).format(100.0, 1, signed=True, unit=" %")
            if change != "-" and rel != "-":
                change += f" ({rel})"
            pre, post = (e.get(m, none).format(scale, digits) for e in (self.pre, self.post))
            lines.append(f"| {m} | {pre} | {post} | {change} |")
        if self.seconds:
            lines += ["", "| seconds per case | mean ± 95 % CI |", "| --- | ---: |"]
            lines += [f"| {k} | {v.format(1.0, 2)} |" for k, v in self.seconds.items()]
        # Mass-editing runs' checkpoints measure fluency by group; the sequential runner's
        # re-measure every edit so far.
        fluency = [cp for cp in self.checkpoints if "groups" in cp]
        rescored = [cp for cp in self.checkpoints if "groups" not in cp]
        if fluency:
            lines += ["", *self._fluency_table(fluency)]
        if rescored:
            names = [m for m in self.metric_names() if m not in RAW_METRICS]
            names += [m for m in GENERATION_METRICS if any(m in cp["summary"] for cp in rescored)]
            lines += ["", "Sequential checkpoints (all edits so far, re-measured):", ""]
            lines += ["| edits | " + " | ".join(names) + " |", "|" + " ---: |" * (len(names) + 1)]
            for cp in rescored:
                est = cp["summary"]
                cells = [
                    _estimate(est[m]).format(*table_format(m)) if m in est else "-" for m in names
                ]
                lines.append(f"| {cp['n_edits']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Rates in %, ± half-width of the 95 % CI (normal approximation; Score: bootstrap); "
            "the change is post − pre case by case, its CI that of the differences.",
        ]
        e = self.environment
        if e:
            lines.append(
                f"Run with {e.get('threads')} thread(s), {e.get('dtype')} on {e.get('device')}, "
                f"torch {e.get('torch_version')} (results repeat exactly with the same threads, "
                "dtype, device and torch version)."
            )
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def _estimate(d: Mapping[str, Any]) -> Estimate:
    nan = float("nan")
    return Estimate(
        nan if d["mean"] is None else d["mean"], nan if d["ci95"] is None else d["ci95"], d["n"]
    )


def summarize(results: ResultsFile, case_ids: Sequence[Any] | None = None) -> Summary:
    """The :class:`Summary` of a results file (finished cases only; only those in
    ``case_ids`` when given)."""
    config = results.config or {}
    kind = config.get("kind", "counterfact")
    order = ZSRE_METRICS if kind == "zsre" else COUNTERFACT_METRICS
    rows = results.cases
    if case_ids is not None:
        wanted = {json_id(c) for c in case_ids}
        rows = [c for c in rows if c["case_id"] in wanted]
    ok = [c for c in rows if "error" not in c]
    pre = summarize_cases([c["pre"] for c in ok], order)
    post = summarize_cases([c["post"] for c in ok], order)
    seconds: dict[str, Estimate] = {}
    for key in ("edit", "pre_eval", "post_eval", "generation", "case"):
        vals = [c["seconds"][key] for c in ok if key in c.get("seconds", {})]
        if vals:
            seconds[key] = mean_ci(vals)
    notes = list(results.header.get("notes", [])) if results.header else []
    if kind == "zsre":
        notes.append(
            "Specificity: agreement of post- with pre-edit argmax tokens on the NQ answer (MEMIT/EasyEdit)."
        )
    env = dict(results.header.get("environment") or {}) if results.header else {}
    change = paired_changes([c["pre"] for c in ok], [c["post"] for c in ok])
    relative = {
        m: relative_change([c["pre"].get(m) for c in ok], [c["post"].get(m) for c in ok])
        for m in GENERATION_METRICS
        if m in change
    }
    return Summary(kind, len(ok), len(rows) - len(ok), pre, post, seconds, config,
                   results.checkpoints, notes, env, change, relative)  # fmt: skip


__all__ = ["ResultsFile", "Summary", "append_line", "json_id", "read_results", "summarize"]
