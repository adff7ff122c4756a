"""Saved edits: round trip, base-model check, corrupted files, stacking, export."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_weights_equal, make_tiny_model
from edit_helpers import REQUEST, logits, rank_one, synthetic_edit
from factedit.arch import describe
from factedit.methods.base import LowRankDelta
from factedit.requests import EditRequest
from factedit.saving import (
    BaseModelMismatchError,
    EditFileError,
    RevertOrderError,
    applied_edits,
    apply_edits,
    load_edit,
)


@pytest.fixture()
def saved_rank_one(model, tok, tmp_path, unchanged_after):
    """A rank-one edit of layer 5's MLP output: (path, edited logits, edited weights)."""
    result = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    edited = logits(model, tok)
    weights = {n: model.get_parameter(n).detach().clone() for n in result.original}
    path = result.save(tmp_path / "edit.safetensors")
    result.restore()
    return path, edited, weights


def test_reapplied_edit_gives_identical_logits(model, tok, saved_rank_one, pristine_state):
    path, edited_logits, edited_weights = saved_rank_one
    before = logits(model, tok)
    assert not torch.equal(before, edited_logits), "the test edit should change the logits"
    applied = apply_edits(model, path)
    try:
        for name, w in edited_weights.items():
            assert torch.equal(model.get_parameter(name), w)
        assert torch.equal(logits(model, tok), edited_logits)
        assert applied_edits(model) == [applied]
    finally:
        applied.revert()
    assert_weights_equal(model, pristine_state)
    assert applied_edits(model) == []


def test_metadata_round_trip(model, saved_rank_one):
    path, _, _ = saved_rank_one
    saved = load_edit(path)
    import factedit

    assert saved.method == "synthetic"
    assert saved.requests == [EditRequest.from_any(REQUEST)]
    assert saved.factedit_version == factedit.__version__
    assert saved.params == [describe(model).mlp_out_weight_name(5)]
    (step,) = saved.steps
    (delta,) = step.values()
    assert isinstance(delta, LowRankDelta) and delta.left.shape[1] == 1
    assert len(saved.fingerprint["params"][0]["sha256"]) == 64
    assert saved.base_model["model_type"] == "llama"


def test_dense_multi_step_round_trip(model, tok, tmp_path, unchanged_after):
    arch = describe(model)
    names = [arch.mlp_out_weight_name(3), arch.mlp_out_weight_name(8)]
    g = torch.Generator().manual_seed(1)
    steps = [
        {n: torch.randn(model.get_parameter(n).shape, generator=g) * 0.02 for n in names},
        {names[0]: torch.randn(model.get_parameter(names[0]).shape, generator=g) * 0.02},
    ]
    result = synthetic_edit(model, steps)
    edited = logits(model, tok)
    path = result.save(tmp_path / "dense.safetensors")
    result.restore()
    applied = apply_edits(model, path)
    try:
        assert torch.equal(logits(model, tok), edited)
    finally:
        applied.revert()


def test_wrong_model_refused_and_unchanged(saved_rank_one):
    path, _, _ = saved_rank_one
    tiny = make_tiny_model("llama")
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(BaseModelMismatchError, match="model.layers.5.mlp.down_proj.weight"):
        apply_edits(tiny, path)
    assert_weights_equal(tiny, state)
    assert applied_edits(tiny) == []


def test_changed_weights_refused_and_unchanged(model, saved_rank_one, pristine_state):
    path, _, _ = saved_rank_one
    other = describe(model).mlp_out_weight_name(5)
    param = model.get_parameter(other)
    with torch.no_grad():
        param[0, 0] += 1.0  # same architecture, different weights: a different base model
    try:
        changed = param.detach().clone()
        with pytest.raises(BaseModelMismatchError, match="differs from the weights"):
            apply_edits(model, path)
        assert torch.equal(param, changed)
    finally:
        with torch.no_grad():
            param.copy_(pristine_state[other])
    assert_weights_equal(model, pristine_state)


def test_other_dtype_refused(tmp_path):
    tiny = make_tiny_model("llama")
    result = synthetic_edit(tiny, [rank_one(tiny, 1, seed=2, scale=0.1)])
    path = result.save(tmp_path / "tiny.safetensors")
    result.restore()
    tiny = tiny.to(torch.bfloat16)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(BaseModelMismatchError, match="bfloat16"):
        apply_edits(tiny, path)
    assert_weights_equal(tiny, state)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_gets_clear_error(saved_rank_one, tmp_path, damage, model, pristine_state):
    path, _, _ = saved_rank_one
    data = bytearray(path.read_bytes())
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncate":
        bad.write_bytes(bytes(data[: len(data) // 2]))
        match = "truncated or corrupted"
    elif damage == "flip":
        data[-100] ^= 0xFF  # inside the tensor payload: safetensors itself cannot notice
        bad.write_bytes(bytes(data))
        match = "corrupted"
    elif damage == "garbage":
        bad.write_text("this is not a safetensors file at all" * 10)
        match = "not a readable safetensors"
    else:
        bad.write_bytes(b"")
        match = "not a readable safetensors"
    with pytest.raises(EditFileError, match=match):
        load_edit(bad)
    with pytest.raises(EditFileError):
        apply_edits(model, bad)
    assert_weights_equal(model, pristine_state)


def test_foreign_safetensors_and_future_version(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(EditFileError, match="not a factedit edit"):
        load_edit(plain)
    future = tmp_path / "future.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        str(future),
        metadata={"format": "factedit.edit", "format_version": "99", "edit": "{}"},
    )
    with pytest.raises(EditFileError, match="format 99"):
        load_edit(future)
    with pytest.raises(EditFileError, match="does not exist"):
        load_edit(tmp_path / "missing.safetensors")


def test_stacked_edits_apply_in_order_and_revert_newest_first(
    model, tok, tmp_path, pristine_state, unchanged_after
):
    # Two edits touching the same matrix: B was computed on top of A.
    first = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    path_a = first.save(tmp_path / "a.safetensors")
    second = synthetic_edit(model, [rank_one(model, 5, seed=1)])
    both = logits(model, tok)
    path_b = second.save(tmp_path / "b.safetensors")
    first.restore()  # restores the pre-A values (B's originals are the post-A values)
    assert_weights_equal(model, pristine_state)

    # B alone does not fit the base model: its fingerprint was taken with A applied.
    with pytest.raises(BaseModelMismatchError):
        apply_edits(model, path_b)
    assert_weights_equal(model, pristine_state)
    # Wrong order in one call: nothing stays applied.
    with pytest.raises(BaseModelMismatchError):
        apply_edits(model, [path_b, path_a])
    assert_weights_equal(model, pristine_state)

    stack = apply_edits(model, [path_a, path_b])
    assert torch.equal(logits(model, tok), both)
    with pytest.raises(RevertOrderError, match="newest first"):
        stack[0].revert()
    assert torch.equal(logits(model, tok), both)
    stack[1].revert()
    stack[0].revert()
    assert_weights_equal(model, pristine_state)


def test_stacked_edits_on_different_layers_revert_order_enforced(
    model, tmp_path, pristine_state, unchanged_after
):
    a = synthetic_edit(model, [rank_one(model, 2, seed=3)])
    pa = a.save(tmp_path / "a.safetensors")
    a.restore()
    b = synthetic_edit(model, [rank_one(model, 9, seed=4)])
    pb = b.save(tmp_path / "b.safetensors")
    b.restore()
    first = apply_edits(model, pa)
    second = apply_edits(model, pb)
    with pytest.raises(RevertOrderError):
        first.revert()
    second.revert()
    first.revert()
    assert_weights_equal(model, pristine_state)


def test_apply_cli_exports_edited_model(model, tok, saved_rank_one, tmp_path, pristine_state):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factedit.cli import main

    path, edited_logits, _ = saved_rank_one
    out = tmp_path / "edited-model"
    assert main(["apply", str(path), "--out", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    tok2.padding_side = "left"
    assert torch.equal(logits(reloaded, tok2), edited_logits)
    provenance = json.loads((out / "factedit_edits.json").read_text())
    assert provenance["edits"][0]["method"] == "synthetic"
    # Refuses to overwrite a model folder.
    assert main(["apply", str(path), "--out", str(out)]) == 2
    assert_weights_equal(model, pristine_state)


def test_apply_cli_wrong_base_is_an_error(tok, saved_rank_one, tmp_path, capsys):
    from factedit.cli import main

    path, _, _ = saved_rank_one
    tiny = make_tiny_model("llama")
    tiny_dir = tmp_path / "tiny"
    tiny.save_pretrained(tiny_dir)
    tok.save_pretrained(tiny_dir)
    rc = main(["apply", str(path), "--model", str(tiny_dir), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "no parameter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tensor_digest_hashes_a_column_with_a_non_unit_last_stride():
    """``(n, 1)`` transposed from ``(1, n)`` is contiguous but keeps stride n in its last
    dimension; its digest is that of the same values laid out plainly."""
    import hashlib

    from factedit.fingerprint import tensor_digest

    row = torch.arange(6, dtype=torch.float32).reshape(1, 6)
    column = row.T
    assert column.is_contiguous() and column.stride(-1) == 6
    a, b = hashlib.sha256(), hashlib.sha256()
    tensor_digest(a, "w", column)
    tensor_digest(b, "w", row.reshape(6, 1).clone())
    assert a.hexdigest() == b.hexdigest()
