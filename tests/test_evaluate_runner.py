"""The evaluation runner on the real default model: records, resume, config checks, sequential
mode, generation metrics, and an end-to-end ROME run through ``factedit eval``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

import factedit.methods as methods
from factedit.cli import main
from factedit.evaluate import (
    ConfigMismatchError,
    load_dataset,
    make_config,
    read_results,
    run_evaluation,
    summarize,
)
from factedit.evaluate.tfidf import load_reference_scorer
from factedit.methods.base import EditResult, WeightEditor

NORM = "model.norm.weight"


class ToyEdit:
    """A throwaway edit function (not a real method): adds a fixed random change to the final
    norm's weight through the same WeightEditor every method uses. Counts its calls."""

    def __init__(self, scale: float = 0.05) -> None:
        self.scale = scale
        self.calls: list = []

    def __call__(self, model, tok, request, method, hparams=None):
        t0 = time.perf_counter()
        self.calls.append(request.case_id)
        editor = WeightEditor(model)
        param = dict(model.named_parameters())[NORM]
        g = torch.Generator().manual_seed(len(self.calls))
        editor.apply({NORM: self.scale * torch.randn(param.shape, generator=g)})
        return EditResult(
            "toy",
            [request],
            None,
            editor.original,
            editor.steps,
            [],
            {"total": time.perf_counter() - t0},
            model,
        )


@pytest.fixture(scope="module")
def cf_path(data_dir):
    return data_dir / "counterfact" / "counterfact_dev.json"


@pytest.fixture(scope="module")
def flat_path(data_dir):
    """Flat CounterFact: one paraphrase and one neighbour per case, so quick to score."""
    return data_dir / "counterfact" / "counterfact-val.json"


def _config(model, path, **kw):
    return make_config(model, method="toy", hparams=None, model_name="smollm2-135m", dataset=path,
                       kind=kw.pop("kind", "counterfact"), generation=kw.pop("generation", False), **kw)  # fmt: skip


def test_records_resume_and_config_check(model, tok, flat_path, tmp_path, unchanged_after):
    cf_path = flat_path
    cases = load_dataset(cf_path, limit=2)
    out = tmp_path / "r.jsonl"
    cfg = _config(model, cf_path)
    toy = ToyEdit()
    summary = run_evaluation(model, tok, cases, cfg, out, edit_fn=toy, progress=False)
    res = read_results(out)
    assert res.config == cfg.to_dict() and [c["case_id"] for c in res.cases] == [
        c.case_id for c in cases
    ]
    assert toy.calls == [c.case_id for c in cases]
    for rec in res.cases:
        assert {"ES", "PS", "NS", "EM", "ES-acc"} <= set(rec["pre"]) and "NS-agree" in rec["post"]
        assert rec["seconds"]["edit"] >= 0 and rec["seconds"]["pre_eval"] > 0
    assert summary.n_cases == 2 and "Score" in summary.post
    # The toy change of the final norm moves the scores: pre and post must differ.
    assert any(r["pre"]["EM"] != r["post"]["EM"] for r in res.cases)

    # Resume: nothing is redone; an interrupted last line is dropped and the table is the same.
    with open(out, "a") as f:
        f.write('{"type": "case", "case_id": 99, "pre": {"ES"')
    again = run_evaluation(model, tok, cases, cfg, out, edit_fn=toy, progress=False)
    assert len(toy.calls) == 2
    assert again.to_dict()["post"] == summary.to_dict()["post"]
    assert out.read_text().endswith("\n") and len(read_results(out).cases) == 2

    # A different configuration is refused with the differing fields named.
    with pytest.raises(ConfigMismatchError, match="generation"):
        run_evaluation(
            model,
            tok,
            cases,
            _config(model, cf_path, generation=True),
            out,
            edit_fn=toy,
            progress=False,
        )
    # So is a file of results format 1, whose GE stopped at the end-of-sequence token.
    old = tmp_path / "format1.jsonl"
    header = json.loads(out.read_text().splitlines()[0])
    header["config"]["format_version"] = 1
    old.write_text("\n".join([json.dumps(header), *out.read_text().splitlines()[1:]]) + "\n")
    with pytest.raises(ConfigMismatchError, match="format_version"):
        run_evaluation(model, tok, cases, cfg, old, edit_fn=toy, progress=False)
    md = summary.to_markdown()
    assert "| ES |" in md and "± " in md and "change, paired" in md
    # The paired change is the mean of each case's own change.
    em = [r["post"]["EM"] - r["pre"]["EM"] for r in res.cases]
    assert summary.change["EM"].mean == pytest.approx(sum(em) / len(em))
    assert "Score" not in summary.change and summary.to_dict()["change"]["EM"]["n"] == 2


def test_summary_paired_change_and_relative_fluency(tmp_path):
    """GE's change is shown signed, paired and in percent of GE before (the bars' "GE drop")."""
    out = tmp_path / "hand.jsonl"
    rows = [{"type": "header", "config": {"method": "m", "model": "x", "dataset": "d.json"}}]
    for i, (ge0, ge1, es0, es1) in enumerate(
        [(6.0, 5.9, 0.0, 1.0), (6.0, 5.7, 0.0, 1.0), (5.0, 5.0, 1.0, 1.0)]
    ):
        pre, post = {"ES": es0}, {"ES": es1}
        if i < 2:  # GE on a sample of two cases
            pre["GE"], post["GE"] = ge0, ge1
        rows.append({"type": "case", "case_id": i, "pre": pre, "post": post, "seconds": {}})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(read_results(out))
    assert s.change["GE"].n == 2 and s.change["GE"].mean == pytest.approx(-0.2)
    assert s.relative_change["GE"].mean == pytest.approx(-0.2 / 6.0)
    assert s.change["ES"].n == 3 and s.change["ES"].mean == pytest.approx(2 / 3)
    md = s.to_markdown()
    assert "| GE | 6.00 ± 0.00 | 5.80 ± 0.20 | -0.20 ± 0.20 (-3.3 % ± 3.3 %) |" in md
    assert "| ES | 33.3 ± " in md and "| +66.7 ± " in md


def test_sequential_keeps_edits_until_the_end(model, tok, flat_path, tmp_path, unchanged_after):
    cf_path = flat_path
    cases = load_dataset(cf_path, limit=3)
    pristine = dict(model.named_parameters())[NORM].detach().clone()
    seen_changed = []

    toy = ToyEdit()

    def edit_fn(model, tok, request, method, hparams=None):
        seen_changed.append(not torch.equal(dict(model.named_parameters())[NORM], pristine))
        return toy(model, tok, request, method, hparams)

    cfg = _config(
        model, cf_path, sequential=True, checkpoint_every=2, checkpoint_gen=1, gen_length=24
    )
    summary = run_evaluation(
        model, tok, cases, cfg, tmp_path / "s.jsonl", edit_fn=edit_fn, progress=False
    )
    assert seen_changed == [False, True, True]  # earlier edits stay in place
    # A fluency baseline before the first edit, then every 2 edits and at the end.
    assert [cp["n_edits"] for cp in summary.checkpoints] == [0, 2, 3]
    assert set(summary.checkpoints[0]["summary"]) == {"GE", "GE-eos"}
    assert "NS" in summary.checkpoints[-1]["summary"]
    ges = [cp["summary"]["GE"]["mean"] for cp in summary.checkpoints]
    assert all(g > 0 for g in ges) and ges[0] != ges[-1]  # the toy edits change the generations
    md = summary.to_markdown()
    assert "Sequential checkpoints" in md and "| GE |" in md


def test_failed_edit_is_recorded_and_skipped(model, tok, flat_path, tmp_path, unchanged_after):
    cf_path = flat_path
    cases = load_dataset(cf_path, limit=2)

    def failing(model, tok, request, method, hparams=None):
        raise methods.EditError("no can do")

    summary = run_evaluation(
        model,
        tok,
        cases,
        _config(model, cf_path),
        tmp_path / "f.jsonl",
        edit_fn=failing,
        progress=False,
    )
    assert summary.n_cases == 0 and summary.n_errors == 2
    assert "EditError: no can do" in read_results(tmp_path / "f.jsonl").cases[0]["error"]


def test_generation_metrics(model, tok, cf_path, tmp_path, unchanged_after):
    cases = load_dataset(cf_path, limit=1)
    target = cases[0].request.target_new
    scorer = load_reference_scorer(
        [
            (target, f"{target} is a language spoken by many people in many countries."),
            ("Other", "Unrelated text."),
        ],
        cache=tmp_path / "tfidf",
    )
    cfg = _config(model, cf_path, generation=True, gen_length=20)
    run_evaluation(
        model,
        tok,
        cases,
        cfg,
        tmp_path / "g.jsonl",
        edit_fn=ToyEdit(),
        reference_scorer=scorer,
        progress=False,
    )
    rec = read_results(tmp_path / "g.jsonl").cases[0]
    gens = rec["generations"]["pre"]
    assert len(gens) == len(cases[0].generation_prompts)
    assert all(
        g.startswith(p) and len(g) > len(p)
        for g, p in zip(gens, cases[0].generation_prompts, strict=True)
    )
    for when in ("pre", "post"):
        assert rec[when]["GE"] > 0 and rec[when]["GE-eos"] > 0 and 0.0 <= rec[when]["RS"] <= 1.0
    assert rec["seconds"]["generation"] > 0


def test_zsre_runner(model, tok, data_dir, tmp_path, unchanged_after):
    path = data_dir / "zsre" / "zsre_train_1k.json"
    cases = load_dataset(path, limit=2)
    summary = run_evaluation(model, tok, cases, _config(model, path, kind="zsre"), tmp_path / "z.jsonl",
                             edit_fn=ToyEdit(scale=0.0), progress=False)  # fmt: skip
    assert set(summary.post) == {"Efficacy", "Paraphrase", "Specificity", "NQ-acc"}
    # A zero change: the argmax tokens cannot move, so specificity is exactly 1.
    assert summary.post["Specificity"].mean == 1.0
    assert summary.pre["Efficacy"].mean == summary.post["Efficacy"].mean


# ---- end to end: ROME through the command line, interrupted and resumed ------------------------
# Light ROME settings keep this under a minute on 2 cores: no covariance statistics, few steps.
ROME_LIGHT = {"mom2_adjustment": False, "v_num_grad_steps": 4, "context_templates": [[5, 2]]}


def _tables(summary_json: dict) -> dict:
    return {k: summary_json[k] for k in ("pre", "post", "n_cases")}


def test_rome_end_to_end_with_resume(cf_path, tmp_path, monkeypatch, capsys):
    assert "rome" in methods.available_methods()
    base = ["eval", "--method", "rome", "--data", "counterfact", str(cf_path), "--limit", "3",
            "--no-generation", "--no-progress", "--hparams", json.dumps(ROME_LIGHT)]  # fmt: skip
    real_edit = methods.edit

    # Uninterrupted reference run.
    assert (
        main([*base, "--out", str(tmp_path / "a.jsonl"), "--json", str(tmp_path / "a.json")]) == 0
    )
    ref = json.loads((tmp_path / "a.json").read_text())

    # Interrupted run: Ctrl-C arrives while the second case is being edited.
    calls = []

    def interrupting(*a, **kw):
        calls.append(a[2].case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_edit(*a, **kw)

    monkeypatch.setattr(methods, "edit", interrupting)
    assert main([*base, "--out", str(tmp_path / "b.jsonl")]) == 130
    assert len(read_results(tmp_path / "b.jsonl").cases) == 1

    # Resumed: only the two unfinished cases are edited; the table equals the reference.
    calls.clear()
    monkeypatch.setattr(
        methods, "edit", lambda *a, **kw: calls.append(a[2].case_id) or real_edit(*a, **kw)
    )
    assert main([*base, "--out", str(tmp_path / "b.jsonl"), "--json", str(tmp_path / "b.json"),
                 "--markdown", str(tmp_path / "b.md")]) == 0  # fmt: skip
    cases = load_dataset(cf_path, limit=3)
    assert calls == [cases[1].case_id, cases[2].case_id]
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert _tables(resumed) == _tables(ref)
    assert resumed["config"]["hparams"]["v_num_grad_steps"] == 4

    # ROME raises the new target's probability on the rewrite prompt.
    assert resumed["post"]["EM"]["mean"] > resumed["pre"]["EM"]["mean"]
    md = (tmp_path / "b.md").read_text()
    assert re.search(r"\| ES \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|", md)
    assert "edit" in md and "3 cases" in md
    capsys.readouterr()


def test_skip_selects_a_record_range(cf_path, tmp_path):
    """--skip 400 --limit 2 evaluates records 400 and 401 of the file, nothing else."""
    records = json.loads(Path(cf_path).read_text())
    out = tmp_path / "r.jsonl"
    args = ["eval", "--method", "rome", "--data", "counterfact", str(cf_path), "--skip", "400",
            "--limit", "2", "--no-generation", "--no-progress", "--out", str(out),
            "--hparams", json.dumps({**ROME_LIGHT, "v_num_grad_steps": 1})]  # fmt: skip
    assert main(args) == 0
    ids = [json.loads(line)["case_id"] for line in out.read_text().splitlines()[1:]]
    assert ids == [records[400]["case_id"], records[401]["case_id"]]
    assert main([*args[:-2], "--skip", "-1"]) == 2
