"""Evaluation of editing methods with the CounterFact and zsRE metrics of ROME and MEMIT.

* :mod:`.datasets`: loaders for CounterFact (ROME's records, the flat EasyEdit layout) and zsRE
  (MEND's layout) into :class:`EvalCase` objects;
* :mod:`.metrics`: the metrics as pure functions of scores and texts;
* :mod:`.tfidf`: TF-IDF statistics and reference texts for the reference score;
* :mod:`.runner`: edit, measure, record (resumable JSONL), summarise.

Typical use::

    from factedit.evaluate import load_dataset, make_config, run_evaluation
    cases = load_dataset("counterfact_dev.json", limit=10)
    cfg = make_config(model, method="rome", hparams=None, model_name="smollm2-135m",
                      dataset="counterfact_dev.json", kind="counterfact", generation=False)
    summary = run_evaluation(model, tok, cases, cfg, "results.jsonl")
    table = summary.to_markdown()
"""

from __future__ import annotations

from .datasets import (
    KINDS,
    DatasetFormatError,
    EvalCase,
    cases_from_records,
    counterfact_case,
    flat_counterfact_case,
    load_dataset,
    zsre_case,
)
from .metrics import (
    Estimate,
    PromptSetScores,
    counterfact_metrics,
    generation_entropy,
    harmonic_mean,
    mean_ci,
    ngram_entropy,
    paired_changes,
    paired_difference,
    relative_change,
    summarize_cases,
    zsre_metrics,
)
from .results import ResultsFile, Summary, read_results, summarize
from .runner import (
    ConfigMismatchError,
    EvalConfig,
    make_config,
    measure_case,
    model_fingerprint,
    run_evaluation,
    score_case,
)

__all__ = [
    "KINDS",
    "ConfigMismatchError",
    "DatasetFormatError",
    "Estimate",
    "EvalCase",
    "EvalConfig",
    "PromptSetScores",
    "ResultsFile",
    "Summary",
    "cases_from_records",
    "counterfact_case",
    "counterfact_metrics",
    "flat_counterfact_case",
    "generation_entropy",
    "harmonic_mean",
    "load_dataset",
    "make_config",
    "mean_ci",
    "measure_case",
    "model_fingerprint",
    "ngram_entropy",
    "paired_changes",
    "paired_difference",
    "read_results",
    "relative_change",
    "run_evaluation",
    "score_case",
    "summarize",
    "summarize_cases",
    "zsre_case",
    "zsre_metrics",
]
