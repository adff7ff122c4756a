"""Dataset loaders on the real files, and their errors on malformed records."""

from __future__ import annotations

import json

import pytest

from factedit.evaluate.datasets import DatasetFormatError, load_dataset


def test_counterfact_rome_format(data_dir):
    path = data_dir / "counterfact" / "counterfact_dev.json"
    raw = json.loads(path.read_text())
    cases = load_dataset(path)
    assert len(cases) == len(raw)
    c, r = cases[0], raw[0]
    rr = r["requested_rewrite"]
    assert c.kind == "counterfact" and c.case_id == r["case_id"]
    assert c.request.text == rr["prompt"].format(rr["subject"])
    assert (c.request.target_new, c.request.target_true) == (
        rr["target_new"]["str"],
        rr["target_true"]["str"],
    )
    assert list(c.paraphrase_prompts) == r["paraphrase_prompts"]
    assert list(c.neighborhood_prompts) == r["neighborhood_prompts"]
    assert c.neighborhood_answer == rr["target_true"]["str"]
    assert list(c.generation_prompts) == r["generation_prompts"]
    assert len(load_dataset(path, "counterfact", limit=7)) == 7


def test_counterfact_flat_layout(data_dir):
    path = data_dir / "counterfact" / "counterfact-val.json"
    raw = json.loads(path.read_text())
    cases = load_dataset(path, "counterfact", limit=50)
    assert len(cases) == 50
    for c, r in zip(cases, raw, strict=False):
        assert c.request.text == r["prompt"] and c.request.subject == r["subject"]
        assert c.request.target_true == r["ground_truth"]
        assert c.paraphrase_prompts == (r["rephrase_prompt"],)
        assert c.neighborhood_prompts == (r["locality_prompt"],)
        assert c.neighborhood_answer == r["locality_ground_truth"]
        # No generation prompts in this layout: GE starts from the rewrite and the rephrase.
        assert c.generation_prompts == (r["prompt"], r["rephrase_prompt"])


def test_zsre_mend_layout(data_dir):
    path = data_dir / "zsre" / "zsre_train_1k.json"
    raw = json.loads(path.read_text())
    cases = load_dataset(path, "zsre", limit=200)
    assert len(cases) == 200
    c, r = cases[0], raw[0]
    assert c.kind == "zsre" and c.request.text == r["src"] and c.request.subject == r["subject"]
    assert c.request.target_new == r["alt"] and c.request.target_true == r["answers"][0]
    assert c.paraphrase_prompts == (r["rephrase"],)
    assert c.neighborhood_prompts == (r["loc"],) and c.neighborhood_answer == r["loc_ans"]
    # The full file has records with an empty "alt": a clear error, or skipped on request.
    with pytest.raises(DatasetFormatError, match=r"record 534: field 'alt' is empty"):
        load_dataset(path)
    assert len(load_dataset(path, skip_invalid=True)) == len(raw) - 2


def test_malformed_records_name_record_and_field(tmp_path, data_dir):
    raw = json.loads((data_dir / "counterfact" / "counterfact_dev.json").read_text())[:3]
    bad = json.loads(json.dumps(raw))
    del bad[1]["requested_rewrite"]["target_true"]
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(
        DatasetFormatError,
        match=rf"record 1 \(case_id {raw[1]['case_id']}\).*requested_rewrite.target_true",
    ):
        load_dataset(p)
    bad = json.loads(json.dumps(raw))
    bad[2]["paraphrase_prompts"] = [7]
    p.write_text(json.dumps(bad))
    with pytest.raises(DatasetFormatError, match=r"record 2 .*'paraphrase_prompts' item 0"):
        load_dataset(p)
    bad = json.loads(json.dumps(raw))
    bad[0]["requested_rewrite"]["prompt"] = "no placeholder here"
    p.write_text(json.dumps(bad))
    with pytest.raises(DatasetFormatError, match=r"record 0 .*exactly one"):
        load_dataset(p)
    z = [
        {
            "src": "Who made X?",
            "subject": "Y",
            "alt": "a",
            "answers": ["b"],
            "rephrase": "r",
            "loc": "l",
            "loc_ans": "m",
        }
    ]
    p.write_text(json.dumps(z))
    with pytest.raises(
        DatasetFormatError, match=r"record 0: field 'subject' 'Y' does not occur in 'src'"
    ):
        load_dataset(p, "zsre")
    with pytest.raises(DatasetFormatError, match="looks like 'zsre'"):
        load_dataset(p, "counterfact")
    p.write_text(json.dumps([raw[0], raw[0]]))
    with pytest.raises(DatasetFormatError, match="repeats record 0"):
        load_dataset(p)
    p.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        load_dataset(p)
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.json")
