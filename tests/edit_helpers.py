"""Helpers shared by the saved-edit and demo tests: synthetic edits made through WeightEditor."""

from __future__ import annotations

import torch

from factedit.arch import describe
from factedit.hparams import HParams
from factedit.methods.base import EditResult, LowRankDelta, WeightEditor
from factedit.requests import EditRequest

PROMPTS = ["Steve Jobs was the founder of", "The Eiffel Tower is located in the city of"]
REQUEST = {
    "prompt": "{} was the founder of",
    "subject": "Steve Jobs",
    "target_new": {"str": "Microsoft"},
}


def logits(model, tok, prompts=PROMPTS) -> torch.Tensor:
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def synthetic_edit(model, steps, request=REQUEST) -> EditResult:
    """An edit made through WeightEditor (the path every method uses), without a method."""
    editor = WeightEditor(model)
    for step in steps:
        editor.apply(step)
    return EditResult(
        method="synthetic",
        requests=[EditRequest.from_any(request)],
        hparams=HParams(),
        original=editor.original,
        steps=editor.steps,
        diagnostics=[{"note": "test"}],
        timings={"total": 0.0},
        model=model,
    )


def rank_one(model, layer: int, seed: int, scale: float = 1.0) -> dict[str, LowRankDelta]:
    name = describe(model).mlp_out_weight_name(layer)
    rows, cols = model.get_parameter(name).shape
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, 1, generator=g) * scale
    right = torch.randn(cols, 1, generator=g) * scale
    return {name: LowRankDelta(left, right)}
