"""Edit requests: validated value objects and conversions from the formats users have."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """An edit request that cannot be carried out as written."""


class SubjectAtEndWarning(UserWarning):
    """The subject is the last thing in the prompt, after the relation: editing is unlikely to
    work, because the edited key is read at the subject's last token, before the model has
    seen what is asked about the subject."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` holds exactly one ``{}`` where the subject goes. Targets are kept as written;
    :attr:`target_text` is the string scored after the prompt (with a leading space, as the
    research code uses). Construction validates everything that can be checked without a
    tokenizer; :meth:`check_tokenizer` checks the rest.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: Any = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.subject, str):
            raise InvalidRequestError("prompt and subject must be strings")
        if not self.subject.strip():
            raise InvalidRequestError("subject is empty")
        n = self.prompt.count("{}")
        if n != 1:
            hint = ""
            if n == 0 and self.subject in self.prompt:
                hint = f"; did you mean {self.prompt.replace(self.subject, '{}', 1)!r}?"
            raise InvalidRequestError(
                f"prompt must contain exactly one '{{}}' where the subject goes, "
                f"found {n} in {self.prompt!r}{hint}"
            )
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise InvalidRequestError(
                f"target_new is empty in request for subject {self.subject!r}"
            )
        if self.target_true is not None and not self.target_true.strip():
            raise InvalidRequestError("target_true is empty (leave it out instead)")

    # ---- views ---------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @property
    def subject_at_end(self) -> bool:
        """True when the subject is the prompt's last token (e.g. ``"Steve Jobs was the
        founder of {}"``): the model predicts the target straight after the subject. A
        question such as ``"Who founded {}?"`` is fine: the "?" after the subject is where
        the answer is predicted, and ROME edits such zsRE questions well."""
        return not self.prompt.split("{}", 1)[1].strip()

    @property
    def target_text(self) -> str:
        """The new target as scored after the prompt (leading space added)."""
        return _spaced(self.target_new)

    @property
    def true_text(self) -> str | None:
        return None if self.target_true is None else _spaced(self.target_true)

    def to_dict(self) -> dict[str, Any]:
        """The research code's dict format (``target_new: {"str": ...}``)."""
        d: dict[str, Any] = {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": {"str": self.target_new},
        }
        if self.target_true is not None:
            d["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            d["case_id"] = self.case_id
        return d

    def check_tokenizer(self, tok) -> None:
        """Raise if the tokenizer maps the subject or a target to no tokens."""
        for what, text in (("subject", self.subject), ("target_new", self.target_text)):
            if not tok(text, add_special_tokens=False)["input_ids"]:
                raise InvalidRequestError(f"the tokenizer maps {what} {text!r} to no tokens")

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_filled(cls, prompt: str, subject: str, target_new: str, **kw: Any) -> EditRequest:
        """Build from a prompt in which the subject already stands (EasyEdit's layout)."""
        if not subject or not subject.strip():
            raise InvalidRequestError("subject is empty")
        if "{}" in prompt:
            return cls(prompt, subject, target_new, **kw)
        if subject not in prompt:
            raise InvalidRequestError(f"subject {subject!r} not found in prompt {prompt!r}")
        return cls(prompt.replace(subject, "{}", 1), subject, target_new, **kw)

    @classmethod
    def from_any(cls, obj: EditRequest | Mapping[str, Any]) -> EditRequest:
        """Accept an :class:`EditRequest` or a dict in the research code's format.

        ``target_new`` may be ``{"str": ...}`` or a plain string; CounterFact's
        ``requested_rewrite`` records work too.
        """
        if isinstance(obj, EditRequest):
            return obj
        if not isinstance(obj, Mapping):
            raise InvalidRequestError(
                f"a request must be a dict or EditRequest, got {type(obj).__name__}"
            )
        if "requested_rewrite" in obj:
            rr = dict(obj["requested_rewrite"])
            rr.setdefault("case_id", obj.get("case_id"))
            return cls.from_any(rr)
        missing = [k for k in ("prompt", "subject", "target_new") if k not in obj]
        if missing:
            raise InvalidRequestError(f"request lacks field(s) {missing}: {dict(obj)!r}")
        prompt, subject = obj["prompt"], obj["subject"]
        kw = dict(
            target_new=_target_str(obj["target_new"], "target_new"),
            target_true=_target_str(obj["target_true"], "target_true")
            if obj.get("target_true")
            else None,
            case_id=obj.get("case_id"),
        )
        if (
            isinstance(prompt, str)
            and "{}" not in prompt
            and isinstance(subject, str)
            and subject in prompt
        ):
            return cls.from_filled(prompt, subject, **kw)
        return cls(prompt, subject, **kw)


def _spaced(text: str) -> str:
    return text if text.startswith(" ") else " " + text


def _target_str(value: Any, name: str) -> str:
    if isinstance(value, Mapping):
        if "str" not in value:
            raise InvalidRequestError(
                f"{name} must be a string or {{'str': ...}}, got {dict(value)!r}"
            )
        value = value["str"]
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    return value


def as_requests(requests: EditRequest | Mapping | Iterable) -> list[EditRequest]:
    """Normalise one request or a list of them to a list of :class:`EditRequest`."""
    if isinstance(requests, (EditRequest, Mapping)):
        return [EditRequest.from_any(requests)]
    out = [EditRequest.from_any(r) for r in requests]
    if not out:
        raise InvalidRequestError("no edit requests given")
    return out


def check_conflicts(requests: Iterable[EditRequest]) -> None:
    """Raise :class:`InvalidRequestError` naming both indices if two requests have the same
    subject and prompt but different targets (one batch cannot make a prompt complete to two
    different things)."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, r in enumerate(requests):
        key = (r.prompt, r.subject)
        if key in seen and seen[key][1] != r.target_new:
            j, t = seen[key]
            raise InvalidRequestError(
                f"requests {j} and {i} have the same subject {r.subject!r} and prompt {r.prompt!r} "
                f"but different targets ({t!r} vs {r.target_new!r})"
            )
        seen.setdefault(key, (i, r.target_new))


def parse_requests_text(text: str, source: str = "<text>") -> list[EditRequest]:
    """Requests from a JSON document (one request dict or a list of them) or JSONL (one request
    dict per line), each in the seed's format (see :meth:`EditRequest.from_any`).

    Every record is validated before any is returned: the first invalid one raises
    :class:`InvalidRequestError` naming its index (0-based; for JSONL also the line), and two
    requests with the same subject and prompt but different targets are refused
    (:func:`check_conflicts`).
    """
    import json

    stripped = text.strip()
    if not stripped:
        raise InvalidRequestError(f"{source}: no requests (the file is empty)")
    records: list[tuple[Any, str]]
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"line {n}"))
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"{source}: neither a JSON document nor JSONL; line {n} is not valid JSON ({exc.msg})"
                ) from None
    else:
        items = doc if isinstance(doc, list) else [doc]
        records = [(r, "") for r in items]
    if not records:
        raise InvalidRequestError(f"{source}: no requests (empty list)")
    out = []
    for i, (rec, where) in enumerate(records):
        try:
            out.append(EditRequest.from_any(rec))
        except InvalidRequestError as exc:
            at = f"request {i}" + (f" ({where})" if where else "")
            raise InvalidRequestError(
                f"{source}: {at} is invalid: {exc}; nothing was edited"
            ) from None
    check_conflicts(out)
    return out


def load_requests(path: Any) -> list[EditRequest]:
    """:func:`parse_requests_text` of a file (JSON list, one JSON dict, or JSONL)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"requests file {p} does not exist")
    return parse_requests_text(p.read_text(encoding="utf-8"), str(p))


def requests_to_json(requests: Iterable[EditRequest]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in requests]


__all__ = [
    "EditRequest",
    "InvalidRequestError",
    "SubjectAtEndWarning",
    "as_requests",
    "asdict",
    "check_conflicts",
    "load_requests",
    "parse_requests_text",
    "requests_to_json",
]
