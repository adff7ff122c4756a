"""``combine_edits``: several stacked edits saved as one file that replays them exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_weights_equal
from edit_helpers import logits, rank_one, synthetic_edit
from factedit.saving import (
    BaseModelMismatchError,
    apply_edits,
    combine_edits,
    load_edit,
    save_edit,
)


def test_combined_file_replays_stacked_edits_bit_for_bit(model, tok, pristine_state, tmp_path):
    first = synthetic_edit(model, [rank_one(model, 4, seed=1, scale=1e-2)])
    # An uploaded-style edit in the middle (AppliedEdit), then another in-memory edit on the
    # same parameter and a new one.
    mid = synthetic_edit(model, [rank_one(model, 4, seed=2, scale=1e-2)])
    mid_file = mid.save(tmp_path / "mid.safetensors")
    mid.restore()
    applied = apply_edits(model, mid_file)
    last = synthetic_edit(
        model, [rank_one(model, 4, seed=3, scale=1e-2), rank_one(model, 6, seed=4, scale=1e-2)]
    )
    stacked = {k: v.clone() for k, v in model.state_dict().items()}
    stacked_logits = logits(model, tok)
    try:
        path = save_edit(combine_edits([first, applied, last]), tmp_path / "all.safetensors")
    finally:
        last.restore()
        applied.revert()
        first.restore()
    assert_weights_equal(model, pristine_state)

    saved = load_edit(path)
    assert len(saved.steps) == 4 and [r.target_new for r in saved.requests] == ["Microsoft"] * 3
    assert sorted(saved.params) == sorted({*first.original, *last.original})
    done = apply_edits(model, path)
    try:
        assert_weights_equal(model, stacked)
        assert torch.equal(logits(model, tok), stacked_logits)
        with pytest.raises(BaseModelMismatchError):  # not on top of itself
            apply_edits(model, path)
    finally:
        done.revert()
    assert_weights_equal(model, pristine_state)


def test_combine_needs_edits():
    with pytest.raises(ValueError, match="no edits"):
        combine_edits([])
