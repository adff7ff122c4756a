"""Where fluency (GE) falls in a results file with generations: per case, before and after.

Reads a results JSONL written by ``factedit eval`` or ``bench/bench_mass_editing.py --out``
and the CounterFact file it was made from, and prints for the cases with generations: GE before
and after, the mean word count of the generated texts, GE at matched length (each pair of
texts cut to the shorter one's words, which separates shorter texts from repetition), how
often the texts name the new and the true target, the median change and the share of cases
whose GE fell, and GE's change where the texts name the new target often or not. Cross-talk:
how many mentions per text of another edit's new target (any request of the run other than
the case's own, its true target excepted), and GE's change where those are frequent or not.

    python bench/ge_breakdown.py RESULTS.jsonl ../shared/data/counterfact/counterfact-train.json
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics as st
import sys
from pathlib import Path


def mentions(texts: list[str], pattern: re.Pattern[str], besides: tuple[str, ...]) -> float:
    """Mean number of matches of ``pattern`` per text, not counting those (lower-cased) in
    ``besides``."""
    return st.mean(sum(m.lower() not in besides for m in pattern.findall(t)) for t in texts)


def print_split(rows: list[dict], key: str, at: float, names: tuple[str, str]) -> None:
    """Mean GE change of the rows whose ``key`` after the edit is at least ``at`` and of the
    others."""
    for name, group in (
        (names[0], [x for x in rows if x[key][1] >= at]),
        (names[1], [x for x in rows if x[key][1] < at]),
    ):
        if group:
            print(
                f"{name}: {len(group)} cases, mean GE change {st.mean(x['GE'][1] - x['GE'][0] for x in group):+.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("data", type=Path, help="the CounterFact file the results were made from")
    args = ap.parse_args()

    from factedit.evaluate import load_dataset
    from factedit.evaluate.metrics import ngram_entropy, words
    from factedit.evaluate.results import read_results

    every = read_results(args.results).cases
    recs = [r for r in every if r.get("generations")]
    if not recs:
        sys.exit(f"{args.results}: no case with generations")
    cases = {c.case_id: c for c in load_dataset(args.data)}
    edited = {cases[r["case_id"]].request.target_text.strip() for r in every}
    # Longest first, so that a target inside a longer one is not matched in its place.
    targets_re = re.compile(
        r"\b(?:" + "|".join(map(re.escape, sorted(edited, key=len, reverse=True))) + r")\b"
    )
    rows = []
    for r in recs:
        req = cases[r["case_id"]].request
        pre, post = r["generations"]["pre"], r["generations"]["post"]
        new = req.target_text.strip().lower()
        true = (req.true_text or "").strip().lower()
        matched = []
        for a, b in zip(pre, post, strict=True):
            wa, wb = words(a), words(b)
            n = min(len(wa), len(wb))
            matched.append((ngram_entropy(" ".join(wa[:n])), ngram_entropy(" ".join(wb[:n]))))

        def share(texts: list[str], s: str) -> float:
            return sum(s in t.lower() for t in texts) / len(texts) if s else 0.0

        own = (new, true)
        rows.append({
            "GE": (r["pre"]["GE"], r["post"]["GE"]),
            "words": (st.mean(len(words(t)) for t in pre), st.mean(len(words(t)) for t in post)),
            "GE, matched length": (st.mean(m[0] for m in matched), st.mean(m[1] for m in matched)),
            "texts naming the new target": (share(pre, new), share(post, new)),
            "texts naming the true target": (share(pre, true), share(post, true)),
            "other edits' targets named per text": (mentions(pre, targets_re, own), mentions(post, targets_re, own)),
            "texts under 50 words": (st.mean(len(words(t)) < 50 for t in pre), st.mean(len(words(t)) < 50 for t in post)),
        })  # fmt: skip
        if (
            "GE-eos" in r["pre"] and "GE-eos" in r["post"]
        ):  # results format 2: texts cut at end of sequence
            rows[-1]["GE-eos"] = (r["pre"]["GE-eos"], r["post"]["GE-eos"])
    print(f"{args.results.name}: {len(rows)} cases with generations")
    print("| per case (mean) | before | after |\n| --- | ---: | ---: |")
    for k in rows[0]:
        print(
            f"| {k} | {st.mean(x[k][0] for x in rows):.3f} | {st.mean(x[k][1] for x in rows):.3f} |"
        )
    d = [x["GE"][1] - x["GE"][0] for x in rows]
    print(
        f"\nGE change per case: median {st.median(d):+.3f}; fell in {sum(v < 0 for v in d)} of {len(d)} cases"
    )
    # A few texts falling into a loop (a sentence or a name repeated to the end) lose most of a
    # case's GE at once; this says how much of the mean change such cases carry.
    big = [v for v in d if v < -0.5]
    print(f"cases losing more than 0.5: {len(big)}, carrying {sum(big) / len(d):+.3f} of the mean change "
          f"{sum(d) / len(d):+.3f}")  # fmt: skip
    print_split(
        rows,
        "texts naming the new target",
        0.5,
        ("naming the new target in at least half the texts", "the others"),
    )
    print_split(
        rows,
        "other edits' targets named per text",
        1,
        ("naming other edits' targets at least once per text", "the others"),
    )
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
