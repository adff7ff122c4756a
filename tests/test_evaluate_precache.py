"""The disk cache of pre-edit measurements: a second run reads what the first measured, bit for
bit, and measures only after the edits; the key moves with everything a measurement depends on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import factedit.evaluate.runner as runner
from factedit.evaluate import load_dataset, metrics, results, run_evaluation
from factedit.evaluate.precache import PreEditCache, measuring_code_digest
from test_evaluate_runner import ToyEdit, _config


@pytest.fixture(scope="module")
def flat_path(data_dir):
    return data_dir / "counterfact" / "counterfact-val.json"


def _table(estimates) -> str:
    # As JSON, so that a NaN interval (one case) compares equal to itself.
    return json.dumps({k: v.to_dict() for k, v in estimates.items()}, sort_keys=True)


def _counting(monkeypatch):
    calls = []
    real = runner.measure_case

    def counted(*a, **kw):
        calls.append("post" if kw.get("pre") is not None else "pre")
        return real(*a, **kw)

    monkeypatch.setattr(runner, "measure_case", counted)
    return calls


def test_second_run_reads_pre_edit_measurements(
    model, tok, flat_path, tmp_path, monkeypatch, unchanged_after
):
    cases = load_dataset(flat_path, limit=2)
    cfg = _config(model, flat_path, generation=True, gen_length=24)
    root = tmp_path / "pre"
    calls = _counting(monkeypatch)
    first = run_evaluation(model, tok, cases, cfg, tmp_path / "a.jsonl", edit_fn=ToyEdit(), progress=False,
                           pre_cache=root)  # fmt: skip
    assert calls == ["pre", "post"] * 2
    files = list(root.glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 2

    calls.clear()
    second = run_evaluation(model, tok, cases, cfg, tmp_path / "b.jsonl", edit_fn=ToyEdit(), progress=False,
                            pre_cache=root)  # fmt: skip
    assert calls == ["post", "post"]
    # The cached measurements are the measured ones, bit for bit: the same tables, the same
    # pre-edit generations, and the agreement metrics (which read the pre-edit argmax) agree.
    assert _table(first.pre) == _table(second.pre) and _table(first.post) == _table(second.post)
    assert "GE" in second.pre and "NS-agree" in second.post
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()[1:]]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()[1:]]
    assert [r["generations"]["pre"] for r in a] == [r["generations"]["pre"] for r in b]
    assert [r["pre_neighborhood_argmax"] for r in a] == [r["pre_neighborhood_argmax"] for r in b]
    # This run spent no time on measurements it read.
    assert all(r["seconds"]["pre_eval"] == 0 for r in b) and all(
        r["seconds"]["pre_eval"] > 0 for r in a
    )

    # Without the cache every case is measured again.
    calls.clear()
    run_evaluation(model, tok, cases, cfg, tmp_path / "c.jsonl", edit_fn=ToyEdit(), progress=False)
    assert calls == ["pre", "post"] * 2


def test_a_sequential_run_does_not_use_the_cache(model, tok, flat_path, tmp_path, unchanged_after):
    """In a sequential run the second case's "before" is measured on the model holding the
    first edit, which is not the unedited model the cache is keyed on."""
    cases = load_dataset(flat_path, limit=2)
    cfg = _config(model, flat_path, sequential=True)
    run_evaluation(model, tok, cases, cfg, tmp_path / "s.jsonl", edit_fn=ToyEdit(), progress=False,
                   pre_cache=tmp_path / "pre")  # fmt: skip
    assert not (tmp_path / "pre").exists()


def test_key_follows_what_a_measurement_depends_on(model, flat_path, tmp_path):
    cfg = _config(model, flat_path, generation=True)

    def path(c=cfg, scorer=True):
        return PreEditCache.for_run(model, c, reference_scorer=scorer, root=tmp_path).path

    assert path() == path()
    assert path(dataclasses.replace(cfg, model_fingerprint="0" * 16)) != path()
    assert path(dataclasses.replace(cfg, gen_length=50)) != path()
    assert path(dataclasses.replace(cfg, seed=1)) != path()
    assert path(scorer=False) != path()
    # Not part of the key: the method and its hyperparameters (pre-edit is before any edit).
    assert path(dataclasses.replace(cfg, method="memit", hparams={"layers": [3]})) == path()
    # Scores repeat bit for bit only with the same thread count.
    threads = torch.get_num_threads()
    here = path()
    try:
        torch.set_num_threads(threads + 1)
        assert path() != here
    finally:
        torch.set_num_threads(threads)


def test_code_digest_follows_the_measuring_code_not_the_reporting(monkeypatch):
    """An edit to the metrics starts a new cache file; an edit to how results are read or
    printed (the results module: Summary, summarize) keeps the measurements already cached."""
    before = measuring_code_digest()
    real = Path.read_bytes

    def edit_source(module):
        target = Path(module.__file__).resolve()

        def read_bytes(self):
            data = real(self)
            return data + b"\n# an edit\n" if self.resolve() == target else data

        monkeypatch.setattr(Path, "read_bytes", read_bytes)

    edit_source(results)
    assert measuring_code_digest() == before
    edit_source(metrics)
    assert measuring_code_digest() != before


def test_an_interrupted_line_is_ignored(model, tok, flat_path, tmp_path, unchanged_after):
    cases = load_dataset(flat_path, limit=1)
    cfg = _config(model, flat_path)
    cache = PreEditCache(tmp_path / "c.jsonl")
    m = runner.measure_case(model, tok, cases[0], cfg)
    cache.put(cases[0].case_id, False, m)
    with open(cache.path, "a") as f:
        f.write('{"key": "[1, false]", "metrics": {"ES"')  # cut short by Ctrl-C
    again = PreEditCache(cache.path)
    assert len(again) == 1 and again.get(cases[0].case_id, True) is None
    got = again.get(cases[0].case_id, False)
    assert got.metrics == m.metrics and got.neighborhood == m.neighborhood and got.seconds == {}
