"""Knowledge neurons: attribution and editing on the real default model; tiny-model coverage."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from factedit import edit
from factedit.arch import describe
from factedit.hooks import get_module, hooks_removed_on_exit
from factedit.methods import get_method
from factedit.methods.kn import KNHParams, kn_attribution
from factedit.scoring import next_token_distribution, target_prob
from factedit.tokens import encode_target

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": {"str": "Rome"},
    "target_true": {"str": "Paris"},
}
TEXT = "The Eiffel Tower is located in the city of"
LATE = list(range(22, 30))  # a few layers keep the attribution tests fast


def test_attribution_deterministic_and_selects_neurons(model, tok):
    arch = describe(model)
    paris = encode_target(tok, " Paris")[0]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a = kn_attribution(model, tok, arch, TEXT, paris, LATE, steps=10)
    b = kn_attribution(model, tok, arch, TEXT, paris, LATE, steps=10)
    assert torch.equal(a.scores, b.scores)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert a.scores.shape == (len(LATE), arch.mlp_size)
    # Paris is the model's answer, so some neuron supports it.
    assert a.answer_prob > 0.3
    neurons = a.select(0.2, 50)
    assert neurons, "no knowledge neurons for a fact the model knows"
    assert neurons == b.select(0.2, 50)
    assert all(layer in LATE for layer, _, _ in neurons)
    assert [s for *_, s in neurons] == sorted((s for *_, s in neurons), reverse=True)


def test_attribution_satisfies_completeness(model, tok):
    """Integrated gradients: a layer's attributions sum to P(answer) minus P(answer) with that
    layer's activations at the last token zeroed (up to the Riemann-sum error)."""
    arch = describe(model)
    layer = 27
    paris = encode_target(tok, " Paris")[0]
    attr = kn_attribution(model, tok, arch, TEXT, paris, [layer], steps=20)

    def zero_last(mod, args):
        x = args[0].clone()
        x[:, -1] = 0
        return (x, *args[1:])

    full = float(next_token_distribution(model, tok, [TEXT])[0, paris])
    with hooks_removed_on_exit([]) as handles:
        handles.append(
            get_module(model, arch.mlp_out_name(layer)).register_forward_pre_hook(zero_last)
        )
        zeroed = float(next_token_distribution(model, tok, [TEXT])[0, paris])
    assert attr.answer_prob == pytest.approx(full, abs=1e-4)
    assert float(attr.scores.sum()) == pytest.approx(
        full - zeroed, abs=0.02 + 0.1 * abs(full - zeroed)
    )


def test_kn_edit_raises_target_and_restores(model, tok, unchanged_after):
    text, new = TEXT, " Rome"
    before = float(target_prob(model, tok, [text], [new])[0])
    # Fewer layers and steps than the defaults keep the test fast; the behaviour is the same.
    result = edit(model, tok, EIFFEL, method="KN", hparams={"layers": LATE, "steps": 10})
    try:
        diag = result.diagnostics[0]
        after = float(target_prob(model, tok, [text], [new])[0])
        assert after > before
        assert diag["answer_token"] == " Paris"
        assert 0 < len(diag["neurons"]) <= result.hparams.max_neurons
        # Only value vectors (columns) of the selected neurons changed.
        for name, delta in result.deltas.items():
            cols = set(torch.nonzero(delta.abs().sum(0)).flatten().tolist())
            layer = int(name.split(".")[2])
            assert cols == {j for li, j, _ in diag["neurons"] if li == layer}
    finally:
        result.restore()


def test_kn_name_and_bad_hparams(model, tok, unchanged_after):
    assert get_method("KN").name == "kn"
    for bad in ({"threshold": 1.5}, {"steps": 0}, {"answer": "nope"}, {"layers": [40]}):
        with pytest.raises((ValueError, IndexError)):
            edit(model, tok, EIFFEL, method="kn", hparams=bad)


def test_kn_defaults_shipped(model):
    hp = KNHParams.defaults_for("kn", model)
    assert hp.layers and hp.steps >= 10 and 0 < hp.threshold < 1


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "gemma3"])
def test_kn_tiny_architectures(tok, arch_name):
    tiny = make_tiny_model(arch_name)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = edit(tiny, tok, EIFFEL, method="kn", hparams={"steps": 4, "answer": "prediction"})
    assert result.diagnostics[0]["neurons"]
    assert any(not torch.equal(v, state[k]) for k, v in tiny.state_dict().items())
    result.restore()
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())
