"""Trace/TraceDict and the module helpers, on the real default model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factedit.arch import describe
from factedit.hooks import (
    StopForward,
    Trace,
    TraceDict,
    first_tensor,
    get_module,
    get_parameter,
    replace_module,
    set_requires_grad,
    with_first_tensor,
)

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def arch(model):
    return describe(model)


@pytest.fixture(scope="module")
def enc(tok):
    return tok(PROMPT, return_tensors="pt")


def hook_counts(model: nn.Module) -> dict[str, int]:
    """Number of forward (pre-)hooks on every module (transformers installs some of its own)."""
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


def count_block_calls(model, arch):
    calls: list[int] = []
    handles = [
        get_module(model, arch.layer_name(i)).register_forward_hook(lambda *_, i=i: calls.append(i))
        for i in range(arch.n_layers)
    ]
    return calls, handles


@torch.no_grad()
def test_trace_dict_equals_hidden_states(model, arch, enc):
    hidden = model(**enc, output_hidden_states=True).hidden_states
    names = [arch.layer_name(i) for i in range(arch.n_layers)]
    with TraceDict(model, names, retain_input=True) as td:
        model(**enc)
    assert list(td) == names
    for i, name in enumerate(names):
        # hidden_states[i] is the input of block i.
        assert torch.equal(td[name].input, hidden[i])
        if i < arch.n_layers - 1:
            assert torch.equal(first_tensor(td[name].output), hidden[i + 1])
    # transformers reports the last hidden state after the final norm.
    last = first_tensor(td[names[-1]].output)
    torch.testing.assert_close(get_module(model, arch.final_norm)(last), hidden[-1])


@torch.no_grad()
def test_stop_runs_fewer_layers(model, arch, enc):
    calls, handles = count_block_calls(model, arch)
    try:
        model(**enc)
        assert calls == list(range(arch.n_layers))
        calls.clear()
        with Trace(model, arch.layer_name(4), stop=True) as t:
            model(**enc)
        assert calls == [0, 1, 2, 3, 4]
        assert first_tensor(t.output).shape[-1] == arch.hidden_size
        calls.clear()
        # TraceDict stops after whichever traced module runs last, whatever the list's order.
        with TraceDict(model, [arch.layer_name(6), arch.mlp_name(2)], stop=True) as td:
            model(**enc)
        assert calls == list(range(7))
        assert td[arch.mlp_name(2)].output is not None
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_stop_exception_escapes_without_stop(model, arch, enc):
    # A StopForward from elsewhere is not swallowed by a trace that was not asked to stop.
    def raise_stop(output, layer):
        raise StopForward()

    with pytest.raises(StopForward), Trace(model, arch.layer_name(0), edit_output=raise_stop):
        model(**enc)


@torch.no_grad()
def test_edit_output_changes_logits_and_undoes_itself(model, arch, enc, unchanged_after):
    before_hooks = hook_counts(model)
    clean = model(**enc).logits
    seen = []

    def zero_mlp(output, layer):
        seen.append(layer)
        return with_first_tensor(output, torch.zeros_like(first_tensor(output)))

    layers = [arch.mlp_name(3), arch.mlp_name(10)]
    with TraceDict(model, layers, edit_output=zero_mlp) as td:
        edited = model(**enc).logits
        assert hook_counts(model) != before_hooks
    assert seen == layers
    assert (edited - clean).abs().max() > 1e-2
    # What is retained is the edited output.
    assert torch.count_nonzero(first_tensor(td[layers[0]].output)) == 0
    assert hook_counts(model) == before_hooks
    assert torch.equal(model(**enc).logits, clean)


@torch.no_grad()
def test_hooks_removed_on_exception(model, arch, enc):
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"), Trace(model, arch.layer_name(2)):
        raise RuntimeError("boom")
    assert hook_counts(model) == before
    # Stopping is an exception too: swallowed on exit, hooks gone.
    with TraceDict(model, [arch.layer_name(1), arch.mlp_name(2)], stop=True):
        model(**enc)
    assert hook_counts(model) == before

    def bad_edit(output, layer):
        raise RuntimeError("boom in hook")

    with (
        pytest.raises(RuntimeError, match="boom in hook"),
        Trace(model, arch.layer_name(0), edit_output=bad_edit),
    ):
        model(**enc)
    assert hook_counts(model) == before


def test_trace_dict_unknown_layer_adds_no_hooks(model, arch):
    before = hook_counts(model)
    with pytest.raises(LookupError, match="no submodule"):
        TraceDict(model, [arch.layer_name(0), "model.nowhere"])
    with pytest.raises(LookupError, match="no submodule"):
        Trace(model, "model.nowhere")
    assert hook_counts(model) == before


@torch.no_grad()
def test_clone_keeps_a_copy(model, arch, enc):
    """With ``clone`` the retained output survives a later in-place change; without, not."""
    name = arch.mlp_name(1)
    module = get_module(model, name)
    with Trace(model, name, clone=True) as copied, Trace(model, name) as shared:
        # Registered after the traces, so it runs after they retained the output.
        handle = module.register_forward_hook(lambda m, i, o: first_tensor(o).mul_(0))
        try:
            model(**enc)
        finally:
            handle.remove()
    assert torch.count_nonzero(first_tensor(shared.output)) == 0
    assert torch.count_nonzero(first_tensor(copied.output)) > 0


def test_detach_and_retain_grad(model, arch, enc):
    name = arch.layer_name(3)
    with Trace(model, name, retain_grad=True) as kept, Trace(model, name, detach=True) as det:
        logits = model(**enc).logits
    assert first_tensor(kept.output).requires_grad
    assert not first_tensor(det.output).requires_grad
    logits[0, -1].logsumexp(-1).backward()
    grad = first_tensor(kept.output).grad
    assert grad is not None and grad.shape == first_tensor(kept.output).shape
    assert grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_trace_input_of_projection(model, arch, enc):
    # The input of the MLP output projection has the MLP's inner width.
    with Trace(model, arch.mlp_out_name(5), retain_input=True, retain_output=False) as t:
        model(**enc)
    assert t.output is None
    assert t.input.shape == (1, enc["input_ids"].shape[1], arch.mlp_size)


def test_get_module_and_parameter(model, arch):
    assert get_module(model, arch.mlp_out_name(0)) is model.model.layers[0].mlp.down_proj
    assert get_module(model, "") is model
    w = get_parameter(model, arch.mlp_out_weight_name(0))
    assert w is model.model.layers[0].mlp.down_proj.weight
    with pytest.raises(LookupError, match="no submodule 'model.nowhere'"):
        get_module(model, "model.nowhere")
    with pytest.raises(LookupError, match="no parameter"):
        get_parameter(model, "model.layers.0.mlp.down_proj.nowhere")


def test_set_requires_grad(model, arch):
    mlp = get_module(model, arch.mlp_name(0))
    extra = torch.zeros(3)
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        set_requires_grad(False, model)
        assert not any(p.requires_grad for p in model.parameters())
        set_requires_grad(True, mlp, extra)
        assert all(p.requires_grad for p in mlp.parameters())
        assert extra.requires_grad
        assert sum(p.requires_grad for p in model.parameters()) == len(list(mlp.parameters()))
        with pytest.raises(TypeError, match="module or a tensor"):
            set_requires_grad(True, "mlp")
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(original[n])


@torch.no_grad()
def test_replace_module(model, arch, enc, unchanged_after):
    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    clean = model(**enc).logits
    name = arch.mlp_name(2)
    old = replace_module(model, name, Zero())
    try:
        assert isinstance(get_module(model, name), Zero)
        assert (model(**enc).logits - clean).abs().max() > 1e-2
    finally:
        assert isinstance(replace_module(model, name, old), Zero)
    assert get_module(model, name) is old
    assert torch.equal(model(**enc).logits, clean)
    with pytest.raises(LookupError):
        replace_module(model, "model.layers.0.nowhere", Zero())


def test_first_tensor_helpers():
    t, u = torch.ones(2), torch.zeros(2)
    assert first_tensor(t) is t
    assert first_tensor((t, None)) is t
    assert with_first_tensor(t, u) is u
    assert with_first_tensor((t, 1), u) == (u, 1)
    assert with_first_tensor([t, 1], u) == [u, 1]
    with pytest.raises(TypeError):
        first_tensor((None, t))
    with pytest.raises(TypeError):
        with_first_tensor({"a": t}, u)
