"""Models spread by a device map (accelerate's big-model loading), exercised on CPU.

A tiny Llama is loaded with some blocks on "cpu" and the others offloaded to "disk": the
offloaded blocks' parameters sit on the ``meta`` device between passes and accelerate loads
them for each pass. Every computation must find each layer's device from the layer, and edits
of offloaded weights must go to accelerate's store. Results are compared with the same model
loaded plainly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from factedit import load_model
from factedit.arch import describe
from factedit.corpus import Corpus
from factedit.hooks import get_module, get_parameter, is_offloaded, parameter_value
from factedit.methods import EditContext, EditError, edit
from factedit.models import model_device, module_device
from factedit.saving import apply_edit
from factedit.stats import compute_second_moment
from factedit.tracing import trace

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "The Beatles were an English rock band formed in Liverpool in 1960.",
    "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
] * 5
REQUEST = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": {"str": "Rome"},
}
LIGHT = {"layer": 1, "v_num_grad_steps": 3, "context_templates": [[3, 2]], "mom2_tokens": 300}
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",  # the edited layer is offloaded
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok):
    """(plain model, the same weights loaded with DEVICE_MAP) from one saved folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    plain = make_tiny_model("llama", seed=3)
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    mapped, _ = load_model(folder, device_map=DEVICE_MAP, offload_folder=folder / "offload")
    plain, _ = load_model(folder)
    return plain, mapped


def _logits(model, tok, text="The Eiffel Tower is located in the city of"):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids.to(model_device(model))).logits[0, -1].float().cpu()


def test_the_map_offloads_and_devices_come_from_layers(pair, tok):
    plain, mapped = pair
    arch = describe(mapped)
    name = arch.mlp_out_weight_name(1)
    assert get_parameter(mapped, name).device.type == "meta"  # really offloaded
    assert is_offloaded(mapped, name) and not is_offloaded(mapped, arch.mlp_out_weight_name(0))
    assert model_device(mapped) == torch.device("cpu")
    assert module_device(get_module(mapped, arch.mlp_out_name(1))) == torch.device("cpu")
    assert torch.equal(parameter_value(mapped, name), parameter_value(plain, name))
    torch.testing.assert_close(_logits(mapped, tok), _logits(plain, tok))


def test_statistics_of_an_offloaded_layer(pair, tok):
    plain, mapped = pair
    corpus = Corpus.from_texts(TEXTS, name="tiny")
    kw = dict(corpus=corpus, tokens=200, seq_len=32, progress=False)
    a = compute_second_moment(plain, tok, 2, **kw)
    b = compute_second_moment(mapped, tok, 2, **kw)
    assert a[2] == b[2]
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-8)


def test_trace_on_a_mapped_model(pair, tok):
    plain, mapped = pair
    kw = dict(kind="mlp", samples=3, window=1, allow_any_answer=True, answer=" Paris")
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    a = trace(plain, tok, prompt, subject, **kw)
    b = trace(mapped, tok, prompt, subject, **kw)
    torch.testing.assert_close(b.grid, a.grid, rtol=1e-4, atol=1e-6)
    assert b.corrupt_prob == pytest.approx(a.corrupt_prob, rel=1e-4)


def test_rome_edit_restore_and_saved_edit_on_offloaded_layer(pair, tok, tmp_path):
    plain, mapped = pair
    arch = describe(mapped)
    name = arch.mlp_out_weight_name(1)
    before = parameter_value(mapped, name).clone()
    ctx = EditContext(
        cache_dir=tmp_path, progress=False, stats_corpus=Corpus.from_texts(TEXTS, name="tiny")
    )
    ref = edit(plain, tok, REQUEST, hparams=LIGHT, context=ctx)
    ref_logits = _logits(plain, tok)
    saved = ref.save(tmp_path / "edit.safetensors")
    ref.restore()

    result = edit(mapped, tok, REQUEST, hparams=LIGHT, context=ctx)
    # The edit reached the weights accelerate loads for each pass, and acts like the plain one.
    assert not torch.equal(parameter_value(mapped, name), before)
    torch.testing.assert_close(_logits(mapped, tok), ref_logits, rtol=1e-4, atol=1e-5)
    result.restore()
    assert torch.equal(parameter_value(mapped, name), before)  # bit-exact

    applied = apply_edit(mapped, saved)
    torch.testing.assert_close(_logits(mapped, tok), ref_logits, rtol=1e-4, atol=1e-5)
    applied.revert()
    assert torch.equal(parameter_value(mapped, name), before)


def test_memit_on_offloaded_layers_matches_the_plain_model(tok, tmp_path):
    # MEMIT carries block inputs past each update by the weight change as applied: for an
    # offloaded layer that change must be read from accelerate's store, not the meta tensor.
    # Four blocks: the carried layer (1) is offloaded, and the top one (2) is not the last (a
    # shift at the subject in the last block cannot reach the later tokens the target follows).
    make_tiny_model("llama", seed=3, num_hidden_layers=4).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    device_map = {**DEVICE_MAP, "model.layers.3": "cpu"}
    mapped, _ = load_model(
        tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    plain, _ = load_model(tmp_path / "m")
    arch = describe(mapped)
    names = [arch.mlp_out_weight_name(i) for i in (1, 2)]
    assert all(get_parameter(mapped, n).device.type == "meta" for n in names)
    before = {n: parameter_value(mapped, n).clone() for n in names}
    hp = {
        "layers": [1, 2],
        "context_templates": [[3, 1]],
        "v_num_grad_steps": 3,
        "mom2_tokens": 300,
    }
    ctx = EditContext(
        cache_dir=tmp_path, progress=False, stats_corpus=Corpus.from_texts(TEXTS, name="tiny")
    )
    ref = edit(plain, tok, REQUEST, method="memit", hparams=hp, context=ctx)
    ref_logits = _logits(plain, tok)
    ref.restore()
    result = edit(mapped, tok, REQUEST, method="memit", hparams=hp, context=ctx)
    assert all(not torch.equal(parameter_value(mapped, n), before[n]) for n in names)
    torch.testing.assert_close(_logits(mapped, tok), ref_logits, rtol=1e-4, atol=1e-5)
    result.restore()
    assert all(torch.equal(parameter_value(mapped, n), before[n]) for n in names)


def test_fine_tuning_an_offloaded_layer_is_a_clear_error(pair, tok):
    _, mapped = pair
    name = describe(mapped).mlp_out_weight_name(1)
    before = parameter_value(mapped, name).clone()
    with pytest.raises(EditError, match="offloaded"):
        edit(mapped, tok, REQUEST, method="ft", hparams={"layers": [1], "num_steps": 2})
    assert torch.equal(parameter_value(mapped, name), before)


def test_device_and_device_map_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="device_map"):
        load_model(None, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map"):
        load_model(None, device_map="everywhere")
