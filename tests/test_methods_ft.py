"""FT, FT-L and FT-AttnEdit: behaviour on the real default model, architecture coverage on tiny ones."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from factedit import edit
from factedit.arch import describe
from factedit.hooks import get_parameter
from factedit.hparams import model_key
from factedit.methods import MethodNotAvailableError, canonical_name, get_method
from factedit.methods.ft import FTAttnEditHParams, FTHParams, FTLHParams, rome_layer
from factedit.scoring import target_prob

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": {"str": "Rome"},
    "target_true": {"str": "Paris"},
}


def _p_new(model, tok, req=EIFFEL) -> float:
    text = req["prompt"].format(req["subject"])
    return float(target_prob(model, tok, [text], [" " + req["target_new"]["str"]])[0])


@pytest.mark.parametrize("method", ["FT", "FT-L", "FT-AttnEdit"])
def test_edit_raises_target_and_restores_exactly(model, tok, unchanged_after, method):
    before = _p_new(model, tok)
    # At most 10 steps keeps the test fast; the shipped step counts are measured in the bench.
    steps = min(
        10, get_method(method).hparams_class.defaults_for(canonical_name(method), model).num_steps
    )
    result = edit(model, tok, EIFFEL, method=method, hparams={"num_steps": steps})
    try:
        after = _p_new(model, tok)
        diag = result.diagnostics[0]
        assert after > before * 2, f"{method}: p(new) {before:.4f} -> {after:.4f}"
        assert diag["target_prob_after"] == pytest.approx(after, rel=1e-4)
        assert diag["loss_final"] < diag["loss_initial"]
        # Only the trained weights were touched, and they did change.
        assert sorted(result.original) == sorted(diag["params"])
        assert all(
            not torch.equal(get_parameter(model, n), result.original[n]) for n in result.original
        )
    finally:
        result.restore()
    # unchanged_after checks every weight bit-for-bit


def test_ft_l_stays_within_eps(model, tok, unchanged_after):
    eps = 1e-3
    result = edit(
        model, tok, EIFFEL, method="ft-l", hparams={"norm_constraint": eps, "num_steps": 3}
    )
    try:
        assert result.hparams.norm_constraint == eps
        for name, orig in result.original.items():
            stored = result.deltas[name]
            assert float(stored.abs().max()) <= eps
            # The constraint binds (Adam moves every weight by ~lr per step), so the test can fail.
            assert float(stored.abs().max()) == pytest.approx(eps, rel=1e-3)
            diff = (get_parameter(model, name).detach() - orig).abs().max()
            # Applying the delta rounds once: allow one ulp of the largest weight.
            ulp = torch.finfo(orig.dtype).eps * float(orig.abs().max())
            assert float(diff) <= eps + ulp
    finally:
        result.restore()


def test_requires_grad_flags_restored(model, tok, unchanged_after):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = edit(model, tok, EIFFEL, method="ft", hparams={"num_steps": 2})
    result.restore()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_sequential_requests_each_applied(model, tok, unchanged_after):
    second = {
        "prompt": "{} plays the sport of",
        "subject": "LeBron James",
        "target_new": "football",
    }
    before = _p_new(model, tok, second | {"target_new": {"str": "football"}})
    result = edit(model, tok, [EIFFEL, second], method="ft-attnedit")
    try:
        assert len(result.steps) == 2 and len(result.diagnostics) == 2
        assert _p_new(model, tok, second | {"target_new": {"str": "football"}}) > before
    finally:
        result.restore()


def test_defaults_for_default_model(model):
    arch = describe(model)
    assert model_key(model, arch) == "llama-30x576"
    ft = FTHParams.defaults_for("ft", model, arch)
    ftl = FTLHParams.defaults_for("ft-l", model, arch)
    attn = FTAttnEditHParams.defaults_for("ft-attnedit", model, arch)
    # FT and FT-L train the layer ROME edits; FT-L is constrained, FT is not.
    assert ft.layers == ftl.layers == [rome_layer(model, arch)]
    assert ft.norm_constraint is None and ftl.norm_constraint and ftl.norm_constraint > 0
    assert attn.module == "attn_out" and min(attn.layers) >= arch.n_layers // 2


@pytest.mark.parametrize(
    ("overrides", "error"),
    [({"layers": [99]}, IndexError), ({"layers": []}, ValueError), ({"lr": -1.0}, ValueError),
     ({"module": "embed"}, ValueError), ({"no_such_field": 1}, ValueError)],
)  # fmt: skip
def test_bad_hparams_rejected_model_unchanged(model, tok, unchanged_after, overrides, error):
    with pytest.raises(error):
        edit(model, tok, EIFFEL, method="ft", hparams=overrides)


def test_names_and_unavailable_methods():
    for given, name in [
        ("FT", "ft"),
        ("FT-L", "ft-l"),
        ("FT-AttnEdit", "ft-attnedit"),
        ("ft_l", "ft-l"),
    ]:
        assert get_method(given).name == name
    for missing in ["MEND-XL", "SERAC"]:
        with pytest.raises(MethodNotAvailableError, match="unknown editing method"):
            get_method(missing)


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("method", ["ft-l", "ft-attnedit"])
def test_tiny_architectures_edit_and_restore(tok, arch_name, method):
    tiny = make_tiny_model(arch_name)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = edit(tiny, tok, EIFFEL, method=method, hparams={"num_steps": 3, "lr": 1e-2})
    assert result.hparams.layers, "layers resolved for a model without shipped defaults"
    changed = [k for k, v in tiny.state_dict().items() if not torch.equal(v, state[k])]
    assert changed, "the edit changed nothing"
    result.restore()
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())
