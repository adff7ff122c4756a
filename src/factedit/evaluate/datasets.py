"""Evaluation datasets: CounterFact (ROME's records and the flat EasyEdit/KnowEdit layout) and
zsRE (MEND's layout), loaded from a file the user names into one :class:`EvalCase` type.

Every loader validates each record and raises :class:`DatasetFormatError` naming the record
(its index and ``case_id`` where there is one) and the field at fault.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..requests import EditRequest, InvalidRequestError

log = logging.getLogger(__name__)

#: Dataset kinds accepted by :func:`load_dataset`.
KINDS = ("counterfact", "counterfact-flat", "zsre")
_KIND_ALIASES = {
    "counterfact": "counterfact",
    "cf": "counterfact",
    "rome": "counterfact",
    "counterfact-flat": "counterfact-flat",
    "flat": "counterfact-flat",
    "easyedit": "counterfact-flat",
    "knowedit": "counterfact-flat",
    "zsre": "zsre",
    "mend": "zsre",
}


class DatasetFormatError(ValueError):
    """A dataset file or record does not have the expected layout."""


@dataclass(frozen=True)
class EvalCase:
    """One evaluation case: the edit plus the prompts its effect is measured on.

    Attributes:
        case_id: the record's id (CounterFact's ``case_id``; the record index for zsRE).
        kind: ``"counterfact"`` or ``"zsre"`` (flat CounterFact records become ``"counterfact"``).
        request: the edit (``target_true`` holds the fact being replaced).
        paraphrase_prompts: prompts that state the same fact differently (filled in).
        neighborhood_prompts: prompts about other subjects whose answer must not change.
        neighborhood_answer: the correct answer for the neighbourhood prompts (CounterFact: the
            true target; flat layout: ``locality_ground_truth``; zsRE: ``loc_ans``).
        attribute_prompts: prompts about subjects that hold the new target (ROME only).
        generation_prompts: prompts for the fluency/consistency generations (ROME only).
    """

    case_id: Any
    kind: str
    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answer: str | None = None
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def rewrite_prompt(self) -> str:
        return self.request.text


def _where(index: int, record: Any) -> str:
    cid = record.get("case_id") if isinstance(record, Mapping) else None
    return f"record {index}" + (f" (case_id {cid})" if cid is not None else "")


def _get(record: Mapping, key: str, index: int, types: type | tuple[type, ...] = str) -> Any:
    if key not in record:
        raise DatasetFormatError(f"{_where(index, record)}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DatasetFormatError(
            f"{_where(index, record)}: field {key!r} must be {names}, got {type(value).__name__}"
        )
    if isinstance(value, str) and not value.strip():
        raise DatasetFormatError(f"{_where(index, record)}: field {key!r} is empty")
    return value


def _str_list(record: Mapping, key: str, index: int, required: bool = True) -> tuple[str, ...]:
    if key not in record and not required:
        return ()
    value = _get(record, key, index, (list, tuple, str))
    if isinstance(value, str):
        value = [value]
    bad = [i for i, v in enumerate(value) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DatasetFormatError(
            f"{_where(index, record)}: field {key!r} item {bad[0]} is not a non-empty string"
        )
    return tuple(value)


def _target(record: Mapping, key: str, index: int, where: str) -> str:
    value = _get(record, key, index, (str, Mapping))
    if isinstance(value, Mapping):
        if not isinstance(value.get("str"), str) or not value["str"].strip():
            raise DatasetFormatError(
                f"{_where(index, record)}: field {where}{key!r} needs a non-empty 'str'"
            )
        value = value["str"]
    return value


def _request(index: int, record: Mapping, **kw: Any) -> EditRequest:
    try:
        return EditRequest.from_any(kw)
    except InvalidRequestError as exc:
        raise DatasetFormatError(f"{_where(index, record)}: {exc}") from None


def counterfact_case(record: Mapping, index: int = 0) -> EvalCase:
    """An :class:`EvalCase` from a record in ROME's CounterFact format."""
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"record {index}: expected an object, got {type(record).__name__}")
    rr = _get(record, "requested_rewrite", index, Mapping)
    where = "requested_rewrite."
    for key in ("prompt", "subject"):
        if key not in rr:
            raise DatasetFormatError(f"{_where(index, record)}: missing field {where + key!r}")
        if not isinstance(rr[key], str) or not rr[key].strip():
            raise DatasetFormatError(
                f"{_where(index, record)}: field {where + key!r} must be a non-empty string"
            )
    for key in ("target_new", "target_true"):
        if key not in rr:
            raise DatasetFormatError(f"{_where(index, record)}: missing field {where + key!r}")
    new = _target(rr, "target_new", index, where)
    true = _target(rr, "target_true", index, where)
    case_id = record.get("case_id", index)
    req = _request(index, record, prompt=rr["prompt"], subject=rr["subject"], target_new=new,
                   target_true=true, case_id=case_id)  # fmt: skip
    return EvalCase(
        case_id=case_id,
        kind="counterfact",
        request=req,
        paraphrase_prompts=_str_list(record, "paraphrase_prompts", index),
        neighborhood_prompts=_str_list(record, "neighborhood_prompts", index),
        neighborhood_answer=true,
        attribute_prompts=_str_list(record, "attribute_prompts", index, required=False),
        generation_prompts=_str_list(record, "generation_prompts", index, required=False),
        extra={
            "relation_id": rr.get("relation_id"),
            "target_new_id": rr["target_new"].get("id")
            if isinstance(rr["target_new"], Mapping)
            else None,
        },
    )


def flat_counterfact_case(record: Mapping, index: int = 0) -> EvalCase:
    """An :class:`EvalCase` from a flat EasyEdit/KnowEdit record (``prompt, subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``).

    The flat layout has no generation prompts; the fluency generations (GE) start from the
    rewrite prompt and the rephrase instead, so mass-editing runs on these files still measure
    whether the model degenerates."""
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"record {index}: expected an object, got {type(record).__name__}")
    prompt = _get(record, "prompt", index)
    subject = _get(record, "subject", index)
    new = _target(record, "target_new", index, "")
    true = _target(record, "ground_truth", index, "")
    case_id = record.get("case_id", index)
    req = _request(
        index,
        record,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        case_id=case_id,
    )
    paraphrases = _str_list(record, "rephrase_prompt", index)
    return EvalCase(
        case_id=case_id,
        kind="counterfact",
        request=req,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=_str_list(record, "locality_prompt", index),
        neighborhood_answer=_target(record, "locality_ground_truth", index, ""),
        generation_prompts=(req.text, *paraphrases),
    )


def zsre_case(record: Mapping, index: int = 0) -> EvalCase:
    """An :class:`EvalCase` from a zsRE record in MEND's layout (``src, subject, alt, answers,
    rephrase, loc, loc_ans``). The question is the prompt; ``alt`` the new answer; the first of
    ``answers`` the true one."""
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"record {index}: expected an object, got {type(record).__name__}")
    src = _get(record, "src", index)
    subject = _get(record, "subject", index)
    alt = _get(record, "alt", index)
    answers = _str_list(record, "answers", index)
    if not answers:
        raise DatasetFormatError(f"{_where(index, record)}: field 'answers' is empty")
    rephrase = _get(record, "rephrase", index)
    loc = _get(record, "loc", index)
    loc_ans = _get(record, "loc_ans", index)
    case_id = record.get("case_id", index)
    if subject not in src:
        raise DatasetFormatError(
            f"{_where(index, record)}: field 'subject' {subject!r} does not occur in 'src' {src!r}"
        )
    req = _request(index, record, prompt=src.replace(subject, "{}", 1), subject=subject, target_new=alt,
                   target_true=answers[0], case_id=case_id)  # fmt: skip
    return EvalCase(
        case_id=case_id,
        kind="zsre",
        request=req,
        paraphrase_prompts=(rephrase,),
        neighborhood_prompts=(loc,),
        neighborhood_answer=loc_ans,
        extra={"answers": list(answers)},
    )


_LOADERS = {
    "counterfact": counterfact_case,
    "counterfact-flat": flat_counterfact_case,
    "zsre": zsre_case,
}


def detect_kind(record: Mapping) -> str:
    """The dataset kind a record's fields indicate (raises if none fits)."""
    if isinstance(record, Mapping):
        if "requested_rewrite" in record:
            return "counterfact"
        if {"src", "alt", "loc"} <= set(record):
            return "zsre"
        if {"prompt", "target_new", "ground_truth"} <= set(record):
            return "counterfact-flat"
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise DatasetFormatError(f"record 0: cannot tell the dataset layout from its fields {keys}")


def canonical_kind(kind: str) -> str:
    key = kind.strip().lower().replace("_", "-")
    if key not in _KIND_ALIASES:
        raise DatasetFormatError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    return _KIND_ALIASES[key]


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON list file or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{path} must hold a JSON list of records, got {type(data).__name__}"
        )
    return data


def load_dataset(
    path: str | Path,
    kind: str | None = None,
    limit: int | None = None,
    *,
    skip_invalid: bool = False,
) -> list[EvalCase]:
    """Load the first ``limit`` records of ``path`` (all if ``None``) as :class:`EvalCase` objects.

    ``kind`` is one of :data:`KINDS` (aliases such as ``"cf"``, ``"easyedit"``, ``"mend"`` work);
    ``None`` detects it from the first record. ``"counterfact"`` given for a flat file is
    taken as the flat layout, since both are CounterFact. Raises :class:`DatasetFormatError`
    naming the first malformed record and field; with ``skip_invalid`` such records are left
    out with a logged warning instead (zsRE's ``zsre_train_1k.json`` has two records with an
    empty ``alt``). Case ids must be unique.
    """
    records = read_records(path)
    if not records:
        raise DatasetFormatError(f"{path} holds no records")
    detected = detect_kind(records[0])
    if kind is None:
        kind = detected
    else:
        kind = canonical_kind(kind)
        if kind.startswith("counterfact") and detected.startswith("counterfact"):
            kind = detected
        elif kind != detected:
            raise DatasetFormatError(f"{path} looks like {detected!r} records, not {kind!r}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        records = records[:limit]
    loader = _LOADERS[kind]
    cases = []
    for i, r in enumerate(records):
        try:
            cases.append(loader(r, i))
        except DatasetFormatError as exc:
            if not skip_invalid:
                raise DatasetFormatError(f"{path}: {exc}") from None
            log.warning("skipping invalid %s", exc)
    if not cases:
        raise DatasetFormatError(f"{path}: no valid records")
    seen: dict[Any, int] = {}
    for i, c in enumerate(cases):
        if c.case_id in seen:
            raise DatasetFormatError(
                f"record {i}: case_id {c.case_id!r} repeats record {seen[c.case_id]}"
            )
        seen[c.case_id] = i
    return cases


def cases_from_records(records: Sequence[Mapping], kind: str | None = None) -> list[EvalCase]:
    """Like :func:`load_dataset` for records already in memory."""
    if not records:
        raise DatasetFormatError("no records given")
    kind = canonical_kind(kind) if kind else detect_kind(records[0])
    return [_LOADERS[kind](r, i) for i, r in enumerate(records)]
