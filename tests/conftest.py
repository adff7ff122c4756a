"""Shared fixtures: the real default model (loaded once per session), data paths, tiny models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$FACTEDIT_DATA_DIR`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("FACTEDIT_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"benchmark data not found at {d}; set FACTEDIT_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), float32, shared by the session.

    Tests that change its weights must restore them (``edited(...)`` or ``result.restore()``);
    ``pristine_weights`` checks that they did.
    """
    from factedit import load_model

    return load_model()


@pytest.fixture(scope="session")
def model(default_model):
    return default_model[0]


@pytest.fixture(scope="session")
def tok(default_model):
    return default_model[1]


@pytest.fixture(scope="session")
def pristine_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_equal(model, reference: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``model.state_dict()`` equals ``reference`` bit-for-bit."""
    state = model.state_dict()
    changed = [k for k, v in reference.items() if not torch.equal(state[k], v)]
    assert not changed, f"weights changed: {changed[:5]}"


@pytest.fixture()
def unchanged_after(model, pristine_state):
    """Use in tests that edit the shared model: fails the test if weights are not restored."""
    yield
    assert_weights_equal(model, pristine_state)


def tiny_configs() -> dict:
    """Small randomly initialised configs of every supported architecture family."""
    import transformers as T

    # The real tokenizer's vocabulary size, so tiny models run on real tokenised text.
    common = dict(vocab_size=49152)
    return {
        "gpt2": T.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common),
        "gptj": T.GPTJConfig(n_layer=3, n_embd=32, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0, **common),
        "gpt_neox": T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=80, **common),
        "llama": T.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80, **common),
        "mistral": T.MistralConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80, **common),
        "qwen2": T.Qwen2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80, **common),
        "gemma3": T.Gemma3TextConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=80, **common),
        "opt": T.OPTConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, ffn_dim=80, word_embed_proj_dim=32, **common),
        "falcon": T.FalconConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, **common),
        "phi3": T.Phi3Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common),
    }  # fmt: skip


TINY_ARCHS = sorted(tiny_configs())


def make_tiny_model(name: str, seed: int = 0, **config: Any):
    """A tiny randomly initialised model of architecture family ``name`` (eval mode);
    ``config``: attributes of its config to override (e.g. ``num_hidden_layers``)."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = tiny_configs()[name]
    for key, value in config.items():
        setattr(cfg, key, value)
    model = T.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request):
    """Each tiny architecture in turn (for coverage, never for claims about edit quality)."""
    return make_tiny_model(request.param)
