"""Learned editors (MEND, KE): training on the real default model, editing, artifacts, refusals.

The real-model runs are short (tens of steps on a handful of CounterFact records): enough to
show that the training loss falls and that a trained editor raises P(new target); the
figures of properly trained editors are in docs/learned.md.
"""

from __future__ import annotations

import json

import pytest
import torch

import factedit
from conftest import assert_weights_equal, make_tiny_model
from factedit.arch import describe
from factedit.learned import (
    EditorMismatchError,
    EditorNotTrainedError,
    LearnedEditor,
    TrainingDataError,
    TrainingDivergedError,
    TrainingInterrupted,
    ZeroGradientError,
    train_editor,
)
from factedit.learned import train as train_mod
from factedit.learned.core import HiddenCache, example_batch, top_hidden
from factedit.methods import EditContext, edit, get_method
from factedit.saving import apply_edits

REQUEST = {
    "prompt": "{} was the founder of",
    "subject": "Steve Jobs",
    "target_new": {"str": "Microsoft"},
}
QUICK = {"val_size": 3, "eval_every": 10, "max_examples": 20, "patience": 10}

TEXTS = [
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "The Danube is the second-longest river in Europe, after the Volga in Russia, flowing through many countries.",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period, known for his music.",
    "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa above sea level.",
    "The Amazon rainforest covers much of the Amazon basin of South America and is home to many species.",
    "Marie Curie was a Polish and naturalised French physicist and chemist who conducted research on radioactivity.",
]


@pytest.fixture(scope="module")
def cf_path(data_dir):
    return data_dir / "counterfact" / "counterfact-train.json"


@pytest.fixture(scope="module")
def mend_cf(model, tok, cf_path, tmp_path_factory):
    """A MEND-CF editor trained for 20 steps on the real default model."""
    root = tmp_path_factory.mktemp("cache")
    result = train_editor(
        model, tok, "mend", "cf", cf_path, steps=20, hparams=QUICK, cache_dir=root, progress=False
    )
    return root, result


def test_names_resolve():
    for given, name in [("MEND", "mend"), ("MEND-CF", "mend-cf"), ("MEND-zsRE", "mend-zsre"),
                        ("KE", "ke"), ("KE-CF", "ke-cf"), ("KE-zsRE", "ke-zsre")]:  # fmt: skip
        assert get_method(given).name == name
    assert "mend-cf" in factedit.available_methods()


def test_top_blocks_from_cached_state_match_full_pass(model, tok):
    arch = describe(model)
    ex = example_batch(
        tok, [("Steve Jobs was the founder of", " Apple"), ("Paris is in", " France")], model.device
    )
    full = top_hidden(model, arch, ex, None)
    cache = HiddenCache.fill(model, arch, arch.n_layers - 3, ex)
    assert cache is not None and ex.hidden is not None
    skipped = top_hidden(model, arch, ex, cache)
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-5)


def test_training_loss_falls_and_edit_raises_target(model, tok, mend_cf, unchanged_after):
    root, result = mend_cf
    curve = result.header["curve"]
    assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 0.3, curve
    assert (
        result.header["data"]["excluded_subjects"] > 500
    )  # counterfact_dev.json lies beside the file
    assert result.header["base_model"]["fingerprint"]
    with factedit.edited(
        model, tok, REQUEST, method="MEND-CF", context=EditContext(cache_dir=root)
    ) as r:
        d = r.diagnostics[0]
        p_after = factedit.scoring.target_prob(
            model, tok, ["Steve Jobs was the founder of"], [" Microsoft"]
        )[0]
        assert float(p_after) == pytest.approx(d["target_prob_after"], rel=1e-4)
        assert d["target_prob_after"] > 3 * d["target_prob_before"], d
        assert set(r.deltas) == {describe(model).mlp_out_weight_name(i) for i in (27, 28, 29)}
        assert set(r.original) == set(r.deltas)
    # restore is exact: checked by unchanged_after


def test_cached_editor_is_reused_and_reload_is_bit_identical(
    model, tok, cf_path, mend_cf, tmp_path, unchanged_after
):
    root, result = mend_cf
    again = train_editor(
        model, tok, "mend", "cf", cf_path, steps=20, hparams=QUICK, cache_dir=root, progress=False
    )
    assert again.from_cache and again.path == result.path
    arch = describe(model)
    a = LearnedEditor.load(result.path).compute(
        model, tok, arch, "Steve Jobs was the founder of", " Microsoft", None
    )[0]
    b = LearnedEditor.load(result.path).compute(
        model, tok, arch, "Steve Jobs was the founder of", " Microsoft", None
    )[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the edit saves and re-applies bit-for-bit like any other method's
    r = edit(model, tok, REQUEST, method="mend-cf", hparams={"editor": str(result.path)})
    edited = {k: v.detach().clone() for k, v in model.state_dict().items() if k in r.deltas}
    r.save(tmp_path / "e.safetensors")
    r.restore()
    applied = apply_edits(model, tmp_path / "e.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in edited.items())
    applied.revert()


def test_a_held_context_reads_the_editor_once_and_rechecks_the_model(
    model, tok, mend_cf, monkeypatch, unchanged_after
):
    root, _ = mend_cf
    reads, checks = [], []
    load, check = LearnedEditor.load.__func__, LearnedEditor.check_model
    monkeypatch.setattr(
        LearnedEditor,
        "load",
        classmethod(lambda cls, *a, **k: reads.append(a) or load(cls, *a, **k)),
    )
    monkeypatch.setattr(
        LearnedEditor, "check_model", lambda self, *a: checks.append(a) or check(self, *a)
    )
    ctx = EditContext(cache_dir=root, progress=False)
    for target in ("Microsoft", "Google"):
        edit(
            model, tok, {**REQUEST, "target_new": {"str": target}}, method="mend-cf", context=ctx
        ).restore()
    assert len(reads) == 1 and len(checks) == 2


def test_untrained_variant_names_the_training_command(model, tok, tmp_path, pristine_state):
    with pytest.raises(EditorNotTrainedError, match="factedit train ke --variant zsre --data"):
        edit(model, tok, REQUEST, method="KE-zsRE", context=EditContext(cache_dir=tmp_path))
    with pytest.raises(EditorNotTrainedError, match="factedit train mend --variant gen"):
        factedit.demo_model_editing(
            model, tok, [REQUEST], [], alg_name="MEND", context=EditContext(cache_dir=tmp_path)
        )
    assert_weights_equal(model, pristine_state)


def test_zero_gradient_is_refused(model, tok, mend_cf, pristine_state):
    root, result = mend_cf
    with pytest.raises(ZeroGradientError, match="already predicts"):
        edit(
            model,
            tok,
            REQUEST,
            method="mend-cf",
            hparams={"editor": str(result.path), "min_grad_norm": 1e12},
        )
    assert_weights_equal(model, pristine_state)


def test_editor_of_another_base_model_is_refused(model, tok, mend_cf, tmp_path, pristine_state):
    # Same architecture and shapes, different weights: refused by the fingerprint.
    tiny_a, tiny_b = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    res = train_editor(tiny_a, tok, "ke", "gen", TEXTS, steps=2, out=tmp_path / "ke.safetensors",
                       hparams={"val_size": 2, "max_examples": 4, "eval_every": 2, "layers": [1, 2]},
                       cache_dir=tmp_path, progress=False)  # fmt: skip
    state_b = {k: v.clone() for k, v in tiny_b.state_dict().items()}
    with pytest.raises(EditorMismatchError, match="different base model"):
        edit(tiny_b, tok, REQUEST, method="ke", hparams={"editor": str(res.path)})
    assert_weights_equal(tiny_b, state_b)
    # A tiny model's editor on the real model, and the real model's editor on a tiny model.
    with pytest.raises(EditorMismatchError):
        edit(model, tok, REQUEST, method="ke", hparams={"editor": str(res.path)})
    with pytest.raises(EditorMismatchError):
        edit(tiny_a, tok, REQUEST, method="mend-cf", hparams={"editor": str(mend_cf[1].path)})
    assert_weights_equal(model, pristine_state)
    # On its own model the tiny editor edits and restores exactly.
    state_a = {k: v.clone() for k, v in tiny_a.state_dict().items()}
    with factedit.edited(tiny_a, tok, REQUEST, method="ke", hparams={"editor": str(res.path)}) as r:
        assert any(float(d.abs().max()) > 0 for d in r.deltas.values())
    assert_weights_equal(tiny_a, state_a)


@pytest.mark.parametrize("arch_name", ["gpt2", "opt"])
def test_tiny_architectures_train_and_edit(tok, arch_name, tmp_path):
    tiny = make_tiny_model(arch_name)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    res = train_editor(tiny, tok, "mend", "gen", TEXTS, steps=3, hparams={"val_size": 2, "max_examples": 4,
                       "eval_every": 3, "layers": [1, 2]}, cache_dir=tmp_path, progress=False)  # fmt: skip
    assert_weights_equal(tiny, state)  # training never writes the weights
    # Found in the cache for this model and these layers.
    r = edit(
        tiny,
        tok,
        REQUEST,
        method="mend",
        hparams={"layers": [1, 2]},
        context=EditContext(cache_dir=tmp_path),
    )
    assert r.diagnostics[0]["editor"] == str(res.path)
    r.restore()
    assert_weights_equal(tiny, state)


def test_interrupted_training_resumes(tok, tmp_path, monkeypatch):
    tiny = make_tiny_model("llama")
    hp = {"val_size": 2, "max_examples": 6, "eval_every": 2, "patience": 10}
    calls = {"n": 0}
    real = train_mod._Trainer.losses

    def flaky(self, split, i, train):
        if train:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real(self, split, i, train)

    monkeypatch.setattr(train_mod._Trainer, "losses", flaky)
    out = tmp_path / "mend.safetensors"
    with pytest.raises(TrainingInterrupted, match="rerun the same command"):
        train_editor(
            tiny,
            tok,
            "mend",
            "gen",
            TEXTS,
            steps=6,
            hparams=hp,
            out=out,
            cache_dir=tmp_path,
            progress=False,
        )
    assert not out.exists() and (tmp_path / "mend.safetensors.ckpt").is_file()
    res = train_editor(
        tiny,
        tok,
        "mend",
        "gen",
        TEXTS,
        steps=6,
        hparams=hp,
        out=out,
        cache_dir=tmp_path,
        progress=False,
    )
    assert (
        calls["n"] == 4 + 3
    )  # steps 3..5 only: the run continued from the checkpoint at step 2... and step 3
    assert [c["step"] for c in res.header["curve"]] == [0, 2, 4, 6]
    assert not (tmp_path / "mend.safetensors.ckpt").exists()


def test_bad_training_data(model, tok, tmp_path, pristine_state):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps(
            [{"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano"}]
        )
    )
    notjson = tmp_path / "bad.json"
    notjson.write_text("{not json")
    with pytest.raises(TrainingDataError, match="holds no records"):
        train_editor(model, tok, "mend", "cf", empty, cache_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDataError, match="'rephrase_prompt' is missing"):
        train_editor(model, tok, "mend", "cf", broken, cache_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDataError, match="not valid JSON"):
        train_editor(model, tok, "ke", "zsre", notjson, cache_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDataError, match="needs training data"):
        train_editor(model, tok, "ke", "zsre", None, cache_dir=tmp_path, progress=False)
    assert not list((tmp_path).glob("learned/*.safetensors"))
    assert_weights_equal(model, pristine_state)


def test_nan_during_training_writes_nothing(tok, tmp_path):
    tiny = make_tiny_model("llama")
    out = tmp_path / "nan.safetensors"
    with pytest.raises(TrainingDivergedError, match="no editor was written"):
        train_editor(tiny, tok, "mend", "gen", TEXTS, steps=3, out=out, cache_dir=tmp_path, progress=False,
                     hparams={"val_size": 2, "max_examples": 4, "eval_every": 3, "init_lr": 1e38, "layers": [1, 2]})  # fmt: skip
    assert not out.exists()
