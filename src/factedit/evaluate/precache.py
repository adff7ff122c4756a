"""A disk cache of pre-edit measurements.

Every evaluation of a method measures each case twice, before and after the edit, and the
"before" half depends only on the unedited model, the case and the measuring code: two methods
on the same records, or the same method run again with other hyperparameters, measure exactly
the same thing. On CounterFact with generations that is about a third of a 1,000-edit run.
:class:`PreEditCache` keeps those measurements on disk, keyed on everything they depend on, so
only the first run pays for them.

The key (one file per key) holds: the model's exact weights (the run configuration's
``model_fingerprint``) and name (its tokenizer), the dataset file's sha256 and kind, the
generation settings (length, top-k, seed), whether RS is scored, what makes scores
bit-reproducible (torch's thread count and version, the weights' dtype and device), and a
digest of the source of the modules that measure, so a change to the measuring code starts a
new file instead of serving stale numbers. Inside a file, one JSON line per case and
generation flag, appended as soon as it is measured: an interrupted run keeps what it measured.
Floats go through JSON's shortest round-trip form, so a cached measurement is bit-identical to
the one that was measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fingerprint import json_digest
from .metrics import PromptSetScores
from .results import json_id
from .runner import EvalConfig, Measurement, environment

log = logging.getLogger(__name__)

# The modules whose code decides a measurement's numbers.
_MEASURING_MODULES = (
    "factedit.scoring",
    "factedit.generation",
    "factedit.evaluate.metrics",
    "factedit.evaluate.runner",
    "factedit.evaluate.tfidf",
)


def measuring_code_digest() -> str:
    """A digest of the source files of the modules that compute a measurement."""
    import importlib

    from .. import __version__

    h = hashlib.sha256()
    for name in _MEASURING_MODULES:
        module = importlib.import_module(name)
        h.update(name.encode())
        try:
            h.update(Path(module.__file__).read_bytes())
        except (OSError, TypeError):
            # No readable source (a frozen or zipped install): the release has to stand in.
            h.update(f"factedit {__version__}".encode())
    return h.hexdigest()[:16]


class PreEditCache:
    """Pre-edit measurements of one model under one measuring setup, on disk.

    ``get`` returns a stored :class:`~factedit.evaluate.runner.Measurement` (equal to the one
    stored, with ``seconds`` empty because this run spent none on it) or ``None``; ``put``
    stores one and appends it to the file at once. Build one with :meth:`for_run`, which
    derives the key; the object holds no state beyond its file's contents.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, Measurement] = {}
        if self.path.is_file():
            self._load()

    @classmethod
    def for_run(
        cls,
        model: Any,
        config: EvalConfig,
        *,
        reference_scorer: bool,
        root: str | Path | None = None,
    ) -> PreEditCache:
        """The cache for measuring with ``config`` on ``model`` (the unedited model, whose
        exact weights ``config.model_fingerprint`` names); ``reference_scorer``: whether RS is
        scored. ``root`` defaults to ``<factedit cache>/pre-edit``."""
        if root is None:
            from ..models import cache_dir

            root = cache_dir() / "pre-edit"
        env = environment(model)
        key = {
            "model": config.model,
            "model_fingerprint": config.model_fingerprint,
            "dataset_sha256": config.dataset_sha256,
            "kind": config.kind,
            "gen_length": config.gen_length,
            "gen_top_k": config.gen_top_k,
            "seed": config.seed,
            "reference_score": reference_scorer,
            "threads": env["threads"],
            "torch_version": env["torch_version"],
            "dtype": env["dtype"],
            "device": env["device"],
            "code": measuring_code_digest(),
        }
        return cls(Path(root) / f"{json_digest(key)}.jsonl")

    @classmethod
    def from_option(
        cls, option: bool | str | Path, model: Any, config: EvalConfig, *, own_scorer: bool
    ) -> PreEditCache | None:
        """The cache a runner's ``pre_cache`` argument asks for: ``False`` none, ``True`` the
        default folder, else that folder. ``None`` also when the caller brings its own reference
        scorer (``own_scorer``), whose RS the key cannot name."""
        if option is False or own_scorer:
            return None
        root = None if option is True else Path(option)
        return cls.for_run(model, config, reference_scorer=config.kind == "counterfact", root=root)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _entry_key(case_id: Any, generation: bool) -> str:
        return json.dumps([json_id(case_id), bool(generation)])

    def get(self, case_id: Any, generation: bool) -> Measurement | None:
        """The stored measurement of ``case_id`` (with generations when ``generation``)."""
        m = self._entries.get(self._entry_key(case_id, generation))
        if m is None:
            return None
        return Measurement(dict(m.metrics), m.neighborhood, {}, list(m.generations))

    def put(self, case_id: Any, generation: bool, m: Measurement) -> None:
        """Store ``m`` and append it to the file."""
        key = self._entry_key(case_id, generation)
        self._entries[key] = m
        n = m.neighborhood
        line = {
            "key": key,
            "metrics": m.metrics,
            "neighborhood": {
                "new_logprob": list(n.new_logprob),
                "true_logprob": list(n.true_logprob),
                "new_acc": list(n.new_acc),
                "true_acc": list(n.true_acc),
                "true_argmax": [list(a) for a in n.true_argmax],
            },
            "generations": m.generations,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for i, raw in enumerate(f):
                try:
                    line = json.loads(raw)
                    n = line["neighborhood"]
                    scores = PromptSetScores(
                        tuple(n["new_logprob"]),
                        tuple(n["true_logprob"]),
                        tuple(n["new_acc"]),
                        tuple(n["true_acc"]),
                        tuple(tuple(a) for a in n["true_argmax"]),
                    )
                    self._entries[line["key"]] = Measurement(
                        line["metrics"], scores, {}, line["generations"]
                    )
                except (ValueError, KeyError, TypeError):
                    # A line cut short by an interrupted run: measured again when needed.
                    log.warning("%s: line %d unreadable, ignored", self.path, i + 1)


def measure_before(
    cache: PreEditCache | None, case_id: Any, generation: bool, measure: Callable[[], Measurement]
) -> Measurement:
    """The pre-edit measurement of a case: read from ``cache`` when there, else ``measure()``
    (stored in ``cache`` when there is one)."""
    m = None if cache is None else cache.get(case_id, generation)
    if m is None:
        m = measure()
        if cache is not None:
            cache.put(case_id, generation, m)
    return m


__all__ = ["PreEditCache", "measure_before", "measuring_code_digest"]
