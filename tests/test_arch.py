"""Architecture lookup: the real model, tiny random models of every family, hand descriptions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factedit.arch import ModelArch, UnsupportedArchitectureError, describe
from factedit.hooks import Trace, first_tensor, get_module


def expected_mlp_size(config) -> int:
    """The MLP's inner width as each config family spells it."""
    for attr in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"):
        value = getattr(config, attr, None)
        if value:
            return value
    return 4 * config.hidden_size  # GPT-2 / GPT-J leave n_inner unset


def test_default_model(model):
    arch = describe(model)
    cfg = model.config
    assert arch.model_class == "LlamaForCausalLM"
    assert arch.n_layers == cfg.num_hidden_layers
    assert arch.hidden_size == cfg.hidden_size
    assert arch.mlp_size == cfg.intermediate_size
    assert get_module(model, arch.layers) is model.model.layers
    assert get_module(model, arch.mlp_out_name(0)) is model.model.layers[0].mlp.down_proj
    assert get_module(model, arch.attn_out_name(0)) is model.model.layers[0].self_attn.o_proj
    assert get_module(model, arch.final_norm) is model.model.norm
    assert arch.tied == cfg.tie_word_embeddings
    assert not arch.mlp_out_transposed


@torch.no_grad()
def test_logits_from_hidden_matches_model(model, tok):
    arch = describe(model)
    enc = tok("The capital of France is", return_tensors="pt")
    with Trace(model, arch.layer_name(-1)) as t:
        logits = model(**enc).logits
    torch.testing.assert_close(arch.logits_from_hidden(model, first_tensor(t.output)), logits)


def test_layer_names(model):
    arch = describe(model)
    assert arch.layer_name(-1) == arch.layer_name(arch.n_layers - 1)
    assert arch.module_name("mlp", 3) == arch.mlp_name(3) == "model.layers.3.mlp"
    assert arch.module_name("attn", 3) == arch.attn_name(3)
    assert arch.module_name("hidden", 3) == arch.layer_name(3)
    with pytest.raises(IndexError, match="out of range"):
        arch.layer_name(arch.n_layers)
    with pytest.raises(ValueError, match="unknown module kind"):
        arch.module_name("ffn", 0)


def test_from_mapping_reproduces_describe(model):
    arch = describe(model)
    mapping = {k: getattr(arch, k) for k in ("layers", "mlp", "mlp_out", "attn", "attn_out", "embed", "final_norm", "unembed")}  # fmt: skip
    assert ModelArch.from_mapping(model, mapping) == arch
    assert describe(model, mapping) == arch


# ---- tiny random models of every listed architecture ----------------------------------------


def test_tiny_roles_and_shapes(tiny_model):
    model = tiny_model
    arch = describe(model)
    cfg = model.config.get_text_config()
    assert arch.model_class == type(model).__name__
    assert arch.n_layers == cfg.num_hidden_layers == len(get_module(model, arch.layers))
    assert arch.hidden_size == cfg.hidden_size
    assert arch.mlp_size == expected_mlp_size(cfg)
    assert get_module(model, arch.embed) is model.get_input_embeddings()
    assert get_module(model, arch.unembed) is model.get_output_embeddings()
    assert arch.tied == (
        model.get_input_embeddings().weight is model.get_output_embeddings().weight
    )
    norm = get_module(model, arch.final_norm)
    assert tuple(norm.weight.shape) == (arch.hidden_size,)
    for i in (0, arch.n_layers - 1):
        for name in (
            arch.layer_name(i),
            arch.mlp_name(i),
            arch.attn_name(i),
            arch.attn_out_name(i),
        ):
            get_module(model, name)  # every role resolves
        w = arch.mlp_out_weight_as_out_in(model, i)
        assert tuple(w.shape) == (arch.hidden_size, arch.mlp_size)
        stored = get_module(model, arch.mlp_out_name(i)).weight
        assert (tuple(stored.shape) == (arch.mlp_size, arch.hidden_size)) == arch.mlp_out_transposed


@torch.no_grad()
def test_tiny_activation_shapes(tiny_model, tok):
    model, arch = tiny_model, describe(tiny_model)
    enc = tok(["The Eiffel Tower is in"], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with (
        Trace(model, arch.mlp_out_name(1), retain_input=True) as proj,
        Trace(model, arch.mlp_name(1)) as mlp,
        Trace(model, arch.attn_name(1)) as attn,
        Trace(model, arch.layer_name(-1)) as last,
    ):
        logits = model(**enc).logits
    # OPT runs its MLP on flattened (tokens, width) activations, so compare sizes, not shapes.
    assert proj.input.shape[-1] == arch.mlp_size and proj.input.numel() == n * arch.mlp_size
    for out in (proj.output, mlp.output):
        out = first_tensor(out)
        assert out.shape[-1] == arch.hidden_size and out.numel() == n * arch.hidden_size
    assert first_tensor(attn.output).shape == (1, n, arch.hidden_size)
    torch.testing.assert_close(
        arch.logits_from_hidden(model, first_tensor(last.output)), logits, atol=1e-4, rtol=1e-4
    )


@torch.no_grad()
def test_tiny_editing_mlp_out_changes_output(tiny_model, tok):
    model, arch = tiny_model, describe(tiny_model)
    ids = tok(["The Eiffel Tower is in"], return_tensors="pt")["input_ids"]
    clean = model(input_ids=ids).logits
    w = arch.mlp_out_weight_as_out_in(model, 1)  # a view: writing it writes the parameter
    saved = w.clone()
    u = torch.randn(arch.hidden_size, 1, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, arch.mlp_size, generator=torch.Generator().manual_seed(1))
    w += u @ v  # a rank-one update, as ROME writes it
    try:
        assert (model(input_ids=ids).logits - clean).abs().max() > 1e-3
    finally:
        w.copy_(saved)
    assert torch.equal(model(input_ids=ids).logits, clean)


def test_tiny_attn_out_runs_after_qkv(tiny_model, tok):
    """The attention output projection is the last linear map of attention in forward order,
    and the MLP output projection the last of the MLP's."""
    model, arch = tiny_model, describe(tiny_model)
    block = get_module(model, arch.layer_name(0))
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda *_, n=n: order.append(n))
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) or hasattr(m, "nf")
    ]
    try:
        with torch.no_grad():
            model(**tok(["The Eiffel Tower is in"], return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    attn_prefix = arch.attn + "."
    attn_linears = [n for n in order if n.startswith(attn_prefix)]
    assert arch.attn_out in attn_linears and len(attn_linears) >= 2, order
    assert attn_linears[-1] == arch.attn_out, order
    assert order.index(arch.attn_out) < order.index(arch.mlp_out), order
    mlp_linears = (
        [n for n in order if n.startswith(arch.mlp + ".")] if arch.mlp != arch.mlp_out else []
    )
    if mlp_linears:
        assert mlp_linears[-1] == arch.mlp_out, order
    else:  # OPT: fc1/fc2 sit directly in the block; fc2 is the last linear map
        assert order[-1] == arch.mlp_out, order


# ---- hand-described and unsupported models --------------------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, inner: int, n_experts: int = 0) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(hidden, hidden) for _ in range(3))
        self.wo = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        # A per-block list longer than the block list, like MoE experts.
        self.experts = nn.ModuleList(nn.Linear(hidden, inner) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.wq(x) @ self.wk(x).transpose(-1, -2), -1) @ self.wv(x)
        x = x + self.wo(a)
        return x + self.down(torch.relu(self.up(x)))


class ToyLM(nn.Module):
    """A decoder written from scratch (not a transformers model), with odd names."""

    def __init__(self, n_layers: int = 2, hidden: int = 8, inner: int = 24, n_experts: int = 0):
        super().__init__()
        self.tok_emb = nn.Embedding(50, hidden)
        self.stack = nn.ModuleList(ToyBlock(hidden, inner, n_experts) for _ in range(n_layers))
        self.ln = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 50, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        for block in self.stack:
            x = block(x)
        return self.head(self.ln(x))


TOY_MAPPING = {
    "layers": "stack", "mlp_out": "down", "attn_out": "wo", "embed": "tok_emb",
    "final_norm": "ln", "unembed": "head",
}  # fmt: skip


def test_from_mapping_hand_described():
    model = ToyLM(n_layers=3, hidden=8, inner=24)
    arch = ModelArch.from_mapping(model, TOY_MAPPING)
    assert (arch.n_layers, arch.hidden_size, arch.mlp_size) == (3, 8, 24)
    assert arch.model_class == "ToyLM"
    assert arch.mlp_out_weight_name(2) == "stack.2.down.weight"
    assert arch.attn_out_name(0) == "stack.0.wo"
    assert not arch.tied and not arch.mlp_out_transposed
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), Trace(model, arch.layer_name(-1)) as t:
        logits = model(ids)
        torch.testing.assert_close(arch.logits_from_hidden(model, t.output), logits)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"unembed": None}, ValueError, r"lacks \['unembed'\]"),
        ({"final_norm": "lnf"}, LookupError, "'lnf'"),
        ({"attn_out": "w_o"}, LookupError, "'w_o'"),
        ({"mlp_out": "up.weight"}, LookupError, "up.weight"),
        ({"layers": "ln"}, ValueError, "not a ModuleList"),
        ({"mlp_out": ""}, ValueError, "not a linear layer"),
        ({"blocks": "stack"}, ValueError, "unknown key"),
    ],
)
def test_from_mapping_errors(change, error, match):
    mapping = {**TOY_MAPPING, **change}
    mapping = {k: v for k, v in mapping.items() if v is not None}
    with pytest.raises(error, match=match):
        ModelArch.from_mapping(ToyLM(), mapping)


def test_describe_picks_the_block_list_not_a_longer_inner_list():
    model = ToyLM(n_layers=2, n_experts=5)
    arch = describe(model)
    assert arch.layers == "stack" and arch.n_layers == 2
    assert (arch.mlp_out, arch.attn_out) == ("down", "wo")
    assert arch.final_norm == "ln"


class NotATransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.GRU(4, 4)
        self.out = nn.Linear(4, 10)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def get_output_embeddings(self) -> nn.Module:
        return self.out


def test_describe_non_transformer_names_the_class():
    with pytest.raises(UnsupportedArchitectureError, match="NotATransformer") as info:
        describe(NotATransformer())
    assert "from_mapping" in str(info.value)  # tells how to describe it by hand
    with pytest.raises(UnsupportedArchitectureError, match="Sequential.*get_input_embeddings"):
        describe(nn.Sequential(nn.Linear(2, 2)))
