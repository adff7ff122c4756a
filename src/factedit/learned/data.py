"""Training examples for learned editors: CounterFact (flat layout), zsRE (MEND's layout) and
self-supervised edits made from a text corpus.

Every example is an edit (prompt → new target), an equivalent prompt the edit must also change
(the rephrase), and an unrelated prompt with its answer that must not change (locality).
Builders validate the records and say which one is malformed; they never read evaluation
files unless told to (``exclude_subjects``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class TrainingDataError(ValueError):
    """Training data that cannot be used as given (missing, empty or malformed)."""


@dataclass(frozen=True)
class TrainExample:
    """One training edit. Targets carry their leading space (as scored after a prompt)."""

    prompt: str
    target_new: str
    rephrase: str
    loc_prompt: str
    loc_target: str
    target_old: str | None = None
    subject: str | None = None

    def condition_text(self) -> str:
        """KE's conditioning text: ``"old >> new || prompt"``."""
        old = (self.target_old or "").strip()
        return f"{old} >> {self.target_new.strip()} || {self.prompt}"


def _spaced(s: str) -> str:
    return s if s.startswith(" ") else " " + s


def _read_json_list(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"training data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = (
            json.loads(text)
            if path.suffix != ".jsonl"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as exc:
        raise TrainingDataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise TrainingDataError(
            f"{path} must hold a JSON list of records, found {type(data).__name__}"
        )
    if not data:
        raise TrainingDataError(f"{path} holds no records")
    return data


def _field(rec: Any, key: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise TrainingDataError(
            f"{where}: a record must be a JSON object, got {type(rec).__name__}"
        )
    value = rec.get(key)
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise TrainingDataError(
            f"{where}: field {key!r} is missing or empty (record keys: {sorted(rec)})"
        )
    return value


def counterfact_flat_examples(
    path: str | Path, exclude_subjects: Iterable[str] = ()
) -> tuple[list[TrainExample], int]:
    """Examples from CounterFact in the flat layout (``prompt, subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``).

    Records whose subject is in ``exclude_subjects`` are dropped; returns ``(examples,
    number dropped)``.
    """
    skip = {s.strip().lower() for s in exclude_subjects}
    out, dropped = [], 0
    for n, rec in enumerate(_read_json_list(path)):
        where = f"{Path(path).name} record {n}"
        subject = _field(rec, "subject", where)
        if subject.strip().lower() in skip:
            dropped += 1
            continue
        prompt = _field(rec, "prompt", where)
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject)
        out.append(
            TrainExample(
                prompt=prompt,
                target_new=_spaced(_field(rec, "target_new", where)),
                rephrase=_field(rec, "rephrase_prompt", where),
                loc_prompt=_field(rec, "locality_prompt", where),
                loc_target=_spaced(_field(rec, "locality_ground_truth", where)),
                target_old=_spaced(_field(rec, "ground_truth", where)),
                subject=subject,
            )
        )
    if not out:
        raise TrainingDataError(
            f"{path}: no records left after excluding {dropped} evaluation subject(s)"
        )
    return out, dropped


def zsre_examples(path: str | Path) -> list[TrainExample]:
    """Examples from zsRE in MEND's layout (``src, alt, rephrase, loc, loc_ans, answers``)."""
    out = []
    for n, rec in enumerate(_read_json_list(path)):
        where = f"{Path(path).name} record {n}"
        answers = rec.get("answers") if isinstance(rec, dict) else None
        old = (
            answers[0]
            if isinstance(answers, list) and answers and isinstance(answers[0], str)
            else None
        )
        out.append(
            TrainExample(
                prompt=_field(rec, "src", where),
                target_new=_spaced(_field(rec, "alt", where)),
                rephrase=_field(rec, "rephrase", where),
                loc_prompt=_field(rec, "loc", where),
                loc_target=_spaced(_field(rec, "loc_ans", where)),
                target_old=_spaced(old) if old else None,
                subject=rec.get("subject"),
            )
        )
    return out


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def generated_examples(texts: Sequence[str], n: int, seed: int = 0) -> list[TrainExample]:
    """Self-supervised edits from plain text (the research code's plain MEND/KE were trained
    on edits of Wikipedia continuations).

    From a document's first sentence, the first 4–10 words are the prompt; the new target is
    the 1–3 words that follow the same number of words in *another* document (so the edit is a
    change the model does not already make); the rephrase is the prompt behind an unrelated
    sentence (the edit must survive a different context, as ROME's context templates); locality
    is a third document's prefix with its true continuation.
    """
    rng = random.Random(seed)
    sents = []
    for t in texts:
        first = _SENTENCE.split(t.strip(), maxsplit=1)[0]
        words = first.split()
        if 8 <= len(words) <= 60:
            sents.append(words)
    if len(sents) < 3:
        raise TrainingDataError(
            f"the corpus has only {len(sents)} usable sentences (8-60 words); need at least 3"
        )
    out = []
    for _ in range(n):
        a, b, c, d = (sents[rng.randrange(len(sents))] for _ in range(4))
        k = rng.randint(4, min(10, len(a) - 2, len(b) - 2))
        m = rng.randint(1, 3)
        kc = rng.randint(4, min(10, len(c) - 2))
        target = " ".join(b[k : k + m])
        if not target.strip():
            continue
        prompt = " ".join(a[:k])
        out.append(
            TrainExample(
                prompt=prompt,
                target_new=_spaced(target),
                rephrase=" ".join(d[:12]).rstrip(".,;") + ". " + prompt,
                loc_prompt=" ".join(c[:kc]),
                loc_target=_spaced(" ".join(c[kc : kc + 2])),
                target_old=_spaced(" ".join(a[k : k + m])),
            )
        )
    return out


def evaluation_subjects(path: str | Path) -> set[str]:
    """Subjects of a CounterFact file in either layout (to exclude from training)."""
    subjects = set()
    for n, rec in enumerate(_read_json_list(path)):
        rr = rec.get("requested_rewrite", rec) if isinstance(rec, dict) else rec
        subjects.add(_field(rr, "subject", f"{Path(path).name} record {n}").strip())
    return subjects


def examples_fingerprint(examples: Sequence[TrainExample]) -> str:
    """sha256 over the examples' fields, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(asdict(ex), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()
