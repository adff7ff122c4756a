"""Mass and sequential editing: batched value optimisation, MEMIT, AlphaEdit, EditSession,
requests from files. Edits run on the real default model with small budgets."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_weights_equal
from factedit import EditSession, apply_edits, edit
from factedit.arch import describe
from factedit.methods.alphaedit import alphaedit_delta, nullspace_projector
from factedit.methods.emmet import emmet_delta
from factedit.methods.memit import holds, keys_and_hidden, memit_delta, update_adds_to_residual
from factedit.requests import EditRequest, InvalidRequestError, load_requests, parse_requests_text
from factedit.scoring import target_token_scores
from factedit.values import ValueConfig, optimize_values

REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": {"str": "Rome"},
    },
    {
        "prompt": "{} plays the sport of",
        "subject": "LeBron James",
        "target_new": {"str": "football"},
    },
    {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
    },
    {"prompt": "{} is a product of", "subject": "iPhone", "target_new": {"str": "Nokia"}},
]
# Small budgets so the tests stay short; the shipped defaults are measured in bench/.
SMALL = {"layers": [4, 5], "context_templates": [[5, 2]], "v_num_grad_steps": 12}
# AlphaEdit as one write per batch (the shipped defaults before stop 49, with no retries,
# repairs, total-change penalty, held outputs or repeat penalty): the tests of one mechanism
# start from it and turn on only what they test.
ONE_WRITE = {"mom2_update_weight": 150.0, "retry_rounds": 0, "penalise_total_change": False,
             "hold_prior_outputs": False, "repair_prior_rounds": 0, "repeat_factor": 0.0}  # fmt: skip


def p_new(model, tok, reqs) -> list[float]:
    reqs = [EditRequest.from_any(r) for r in reqs]
    scores = target_token_scores(model, tok, [r.text for r in reqs], [r.target_text for r in reqs])
    return [float(s.logprobs.mean().exp()) for s in scores]


# ---- batched value optimisation ----------------------------------------------------------------


def test_batched_and_single_value_optimisation_agree(model, tok, unchanged_after):
    arch = describe(model)
    reqs = [EditRequest.from_any(r) for r in REQUESTS[:3]]
    templates = ["{}", "The river. {}"]
    # float32 and no early stop, so both runs take the same steps and differ only by batching.
    cfg = ValueConfig(steps=6, lr=0.5, early_stop_loss=0.0, margin=None, dtype=None)
    batched = optimize_values(model, tok, reqs, arch, 5, templates, cfg)
    for r, b in zip(reqs, batched, strict=True):
        (single,) = optimize_values(model, tok, [r], arch, 5, templates, cfg)
        assert single.steps == b.steps
        assert single.delta.norm() > 0
        rel = (single.delta - b.delta).norm() / single.delta.norm()
        assert rel < 1e-3, f"{r.subject}: batched δ differs from the single one by {rel:.2e}"
        assert abs(single.nll - b.nll) < 1e-3


# ---- the updates on matrices -------------------------------------------------------------------


class _Arch:
    mlp_out_transposed = False


def test_memit_delta_solves_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 40, 12, 5
    c = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c = c @ c.T / d_in + torch.eye(d_in, dtype=torch.float64)
    k = torch.randn(n, d_in, generator=g)
    r = torch.randn(n, d_out, generator=g)
    lam = 0.3
    dw = memit_delta(k, r, c, lam, _Arch())
    dw = dw.materialize() if hasattr(dw, "materialize") else dw
    kd, rd = k.double(), r.double()
    # ΔW (λC + K Kᵀ) = R Kᵀ  (K, R as columns)
    lhs = dw.double() @ (lam * c + kd.T @ kd)
    assert torch.allclose(lhs, rd.T @ kd, atol=1e-4)
    # With λ → 0 and n < d the batch's keys are mapped exactly to their residuals.
    exact = memit_delta(k, r, c, 1e-9, _Arch())
    exact = exact.materialize() if hasattr(exact, "materialize") else exact
    assert torch.allclose(exact.double() @ kd.T, rd.T, atol=1e-3)


def test_alphaedit_projector_annihilates_preserved_keys():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, rank = 30, 8, 10
    basis = torch.randn(d_in, rank, generator=g, dtype=torch.float64)
    preserved = (
        basis @ torch.randn(rank, 200, generator=g, dtype=torch.float64)
    ).T  # (200, d_in), rank 10
    c = preserved.T @ preserved / 200
    p = nullspace_projector(c, 1e-8)
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T)
    assert torch.linalg.matrix_rank(p) == d_in - rank
    assert (p @ preserved.T).abs().max() < 1e-8
    # New keys with a component outside the preserved span: the update changes their outputs
    # but leaves every preserved key's output unchanged.
    k = torch.randn(4, d_in, generator=g)
    r = torch.randn(4, d_out, generator=g)
    dw = alphaedit_delta(k, r, p, None, 1e-3, _Arch())
    dw = dw.materialize() if hasattr(dw, "materialize") else dw
    assert (dw.double() @ preserved.T).abs().max() < 1e-4
    assert (dw.double() @ k.double().T - r.double().T).abs().max() < 0.05 * r.abs().max()


def _alphaedit_problem(seed: int, d_in: int, d_out: int, *, n: int, p_rank: int, n_prior: int):
    """A random AlphaEdit update problem: C (SPD, float64), a projector P of rank ``p_rank``,
    keys K ``(n, d_in)``, earlier keys K_p ``(n_prior, d_in)`` and residuals R ``(n, d_out)``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(d_in, p_rank, generator=g, dtype=torch.float64))[0]
    k = torch.randn(n, d_in, generator=g)
    kp = torch.randn(n_prior, d_in, generator=g, dtype=torch.float64)
    r = torch.randn(n, d_out, generator=g)
    return c @ c.T / d_in, u @ u.T, k, kp, r


def test_alphaedit_total_change_penalty_solves_its_normal_equations():
    # λ tr((D + ΔW) C (D + ΔW)ᵀ): ΔW (G P + α I) = (R Kᵀ − λ D C) P with G = K Kᵀ + K_p K_pᵀ + λ C;
    # the rows stay in P's range, and with D = 0 the update is the one without the option.
    d_in, d_out = 20, 7
    c, p, k, kp, r = _alphaedit_problem(5, d_in, d_out, n=4, p_rank=12, n_prior=6)
    drift = 0.3 * torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(6))
    lam, alpha = 0.9, 0.3
    args = (k, r, p, kp.T @ kp, alpha, _Arch())
    dw = alphaedit_delta(*args, mom2=c, mom2_weight=lam, drift=drift).double()
    kd, eye = k.double(), torch.eye(d_in, dtype=torch.float64)
    lhs = dw @ ((kd.T @ kd + kp.T @ kp + lam * c) @ p + alpha * eye)
    assert torch.allclose(lhs, (r.double().T @ kd - lam * drift.double() @ c) @ p, atol=1e-5)
    assert (dw @ (eye - p)).abs().max() < 1e-5 * dw.abs().max()
    plain = alphaedit_delta(*args, mom2=c, mom2_weight=lam)
    plain = (plain.materialize() if hasattr(plain, "materialize") else plain).double()
    zero = alphaedit_delta(*args, mom2=c, mom2_weight=lam, drift=torch.zeros(d_out, d_in)).double()
    assert torch.allclose(zero, plain, atol=1e-6) and not torch.allclose(dw, plain, atol=1e-3)

    # It takes back part of the change so far: the total change's penalty is smaller than
    # with the batch's update added on top of D as it is.
    def penalty(total):
        return float(torch.trace(total @ c @ total.T))

    assert penalty(drift.double() + dw) < penalty(drift.double() + plain)


def test_alphaedit_held_outputs_solve_their_normal_equations():
    # γ‖(W + ΔW) K_pᵀ − O_pᵀ‖² instead of γ‖ΔW K_pᵀ‖²: ΔW (G P + α I) = (R Kᵀ + γ E_pᵀ K_p − λ D C) P
    # with E_p = O_p − K_p Wᵀ; with the earlier rows at their outputs (E_p = 0) the plain update.
    from factedit.methods.alphaedit import AlphaEditState

    d_in, d_out = 20, 7
    c, p, k, kp, r = _alphaedit_problem(7, d_in, d_out, n=4, p_rank=12, n_prior=6)
    g = torch.Generator().manual_seed(8)
    w, held = torch.randn(d_out, d_in, generator=g), torch.randn(6, d_out, generator=g)
    drift = 0.3 * torch.randn(d_out, d_in, generator=g)
    state = AlphaEditState(keys={3: [kp.float()[:2], kp.float()[2:]]}, outputs={3: [held[:2], held[2:]]},
                           requests=[[None] * 2, [None] * 4])  # type: ignore[list-item]  # fmt: skip
    pull = state.held_outputs_pull(3, w)
    kpd, e_p = kp.float().double(), held.double() - kp.float().double() @ w.double().T
    torch.testing.assert_close(pull, kpd.T @ e_p)
    lam, alpha, gamma = 0.9, 0.3, 2.0
    args = (k, r, p, kpd.T @ kpd, alpha, _Arch())
    dw = alphaedit_delta(
        *args, mom2=c, mom2_weight=lam, preserved_weight=gamma, drift=drift, held_pull=pull
    ).double()
    kd, eye = k.double(), torch.eye(d_in, dtype=torch.float64)
    lhs = dw @ ((kd.T @ kd + gamma * kpd.T @ kpd + lam * c) @ p + alpha * eye)
    rhs = (r.double().T @ kd + gamma * e_p.T @ kpd - lam * drift.double() @ c) @ p
    torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-5)
    at_rest = AlphaEditState(keys={3: [kp.float()]}, outputs={3: [kp.float() @ w.T]}, requests=[[None] * 6])  # type: ignore[list-item]  # fmt: skip
    plain = alphaedit_delta(*args, preserved_weight=gamma)
    plain = (plain.materialize() if hasattr(plain, "materialize") else plain).double()
    rest = alphaedit_delta(
        *args, preserved_weight=gamma, held_pull=at_rest.held_outputs_pull(3, w)
    ).double()
    torch.testing.assert_close(rest, plain, atol=1e-5, rtol=1e-5)
    # Leaving a request out drops its rows from the pull as from the Gram matrix.
    torch.testing.assert_close(
        state.held_outputs_pull(3, w, [1]), kpd[[0, 2, 3, 4, 5]].T @ e_p[[0, 2, 3, 4, 5]]
    )


def test_alphaedit_holds_earlier_edits_to_the_outputs_their_batch_left(model, tok, pristine_state):
    """``hold_prior_outputs``: an earlier batch whose edits were lost (its weights put back by
    hand while the sequence's state still holds it) is given back by the next batch's write,
    which asks the earlier keys for the outputs their batch left; with the paper's rows
    (residual 0) the next batch keeps them lost. The next batch's own edits are the same
    either way."""
    from factedit.methods import EditContext
    from factedit.methods.alphaedit import STATE_KEY

    first = [EditRequest.from_any(r) for r in REQUESTS[:2]]
    second = [EditRequest.from_any(r) for r in REQUESTS[2:]]
    hp = {**SMALL, **ONE_WRITE, "v_num_grad_steps": 20, "nullspace_threshold": 0.05, "l2": 1.0}
    outcome = {}
    try:
        for hold in (False, True):
            ctx = EditContext(progress=False)
            lost = edit(model, tok, first, method="alphaedit", hparams=hp, context=ctx)
            edited = p_new(model, tok, first)
            state = ctx.memo[STATE_KEY]
            assert [len(o) for o in state.outputs.values()] == [1, 1]
            lost.restore()  # the weights forget the first batch; the state does not
            assert holds(model, tok, first) == [False, False]
            result = edit(
                model,
                tok,
                second,
                method="alphaedit",
                hparams={**hp, "hold_prior_outputs": hold},
                context=ctx,
            )
            outcome[hold] = (
                p_new(model, tok, first),
                holds(model, tok, first),
                holds(model, tok, second),
            )
            assert [len(o) for o in state.outputs.values()] == [2, 2]
            result.restore()
            assert_weights_equal(model, pristine_state)
    finally:
        with torch.no_grad():
            model.load_state_dict(pristine_state)
    assert outcome[False][1] == [False, False], outcome
    assert outcome[True][1] == [True, True], (edited, outcome)
    assert all(b > 5 * a for a, b in zip(outcome[False][0], outcome[True][0], strict=True)), outcome
    assert outcome[True][2] == outcome[False][2] and any(outcome[True][2]), outcome


def test_alphaedit_total_change_penalty_anchors_at_the_sequence_start(tok, tmp_path):
    """The reference weights are those before the session's first batch; they stay through
    later batches and a partial revert, and a full revert starts a new sequence."""
    from conftest import make_tiny_model
    from factedit.methods import EditContext
    from factedit.methods.alphaedit import STATE_KEY

    tiny = make_tiny_model("llama")
    arch = describe(tiny)
    hp = {"layers": [0, 1], "context_templates": [[3, 1]], "v_num_grad_steps": 3, "mom2_tokens": 2000,
          "mom2_update_weight": 50.0, "penalise_total_change": True}  # fmt: skip
    start = {i: arch.mlp_out_weight_as_out_in(tiny, i).detach().clone() for i in (0, 1)}
    ctx = EditContext(cache_dir=tmp_path, progress=False)
    session = EditSession(tiny, tok, method="alphaedit", hparams=hp, context=ctx)
    session.apply(REQUESTS[:1])
    session.apply(REQUESTS[1:2])
    state = ctx.memo[STATE_KEY]
    for i in (0, 1):
        assert torch.equal(state.anchors[i], start[i])
        assert not torch.equal(arch.mlp_out_weight_as_out_in(tiny, i), start[i])
    session.revert(1)
    assert torch.equal(state.anchors[0], start[0])
    session.revert_all()
    assert state.anchors == {}
    # The option changes the second batch's write (the first has no change to take back).
    plain_ctx = EditContext(cache_dir=tmp_path, progress=False)
    plain = EditSession(
        tiny,
        tok,
        method="alphaedit",
        hparams={**hp, "penalise_total_change": False},
        context=plain_ctx,
    )
    plain.apply(REQUESTS[:1])
    first_plain = arch.mlp_out_weight_as_out_in(tiny, 1).detach().clone()
    plain.apply(REQUESTS[1:2])
    second_plain = arch.mlp_out_weight_as_out_in(tiny, 1).detach().clone()
    plain.revert_all()
    session.apply(REQUESTS[:1])
    assert torch.equal(arch.mlp_out_weight_as_out_in(tiny, 1), first_plain)
    session.apply(REQUESTS[1:2])
    # (the tiny model's writes are ~1e-5, so any difference shows the drift reached the solve)
    assert not torch.equal(arch.mlp_out_weight_as_out_in(tiny, 1), second_plain)
    session.revert_all()
    for i in (0, 1):
        assert torch.equal(arch.mlp_out_weight_as_out_in(tiny, i), start[i])


def test_alphaedit_state_gram_leaves_out_requests_with_all_their_template_rows():
    from factedit.methods.alphaedit import AlphaEditState

    g = torch.Generator().manual_seed(0)
    for rows_per_request in (1, 3):
        # Two batches of 2 and 3 requests, each request ``rows_per_request`` consecutive rows.
        parts = [torch.randn(n * rows_per_request, 6, generator=g) for n in (2, 3)]
        state = AlphaEditState(keys={4: parts}, requests=[[None] * 2, [None] * 3])  # type: ignore[list-item]
        every = torch.cat(parts).double()
        torch.testing.assert_close(state.gram(4, torch.device("cpu")), every.T @ every)
        # Requests 1 (first batch) and 3 (second batch's second) laid end to end.
        kept = [j for j in range(5) if j not in (1, 3)]
        rows = torch.cat([every[j * rows_per_request : (j + 1) * rows_per_request] for j in kept])
        torch.testing.assert_close(state.gram(4, torch.device("cpu"), [1, 3]), rows.T @ rows)
    assert AlphaEditState().gram(4, torch.device("cpu"), [0]) is None


@pytest.mark.parametrize("bad", [{"repair_prior_rounds": -1}, {"prior_keys_weight": -1.0}, {"retry_rounds": -1},
                                 {"repair_update_weight": -1.0}, {"repeat_factor": -1.0}])  # fmt: skip
def test_alphaedit_refuses_negative_counts_and_weights_before_editing(
    model, tok, unchanged_after, bad
):
    with pytest.raises(ValueError, match=next(iter(bad))):
        edit(model, tok, REQUESTS[:1], method="alphaedit", hparams={**SMALL, **bad})


def test_alphaedit_statistics_penalty_solves_its_normal_equations():
    # ΔW (K Kᵀ P + K_p K_pᵀ P + λ C P + α I) = R Kᵀ P; with P = I and α → 0 this is MEMIT's update
    # with the earlier keys in the normal equations.
    d_in = 24
    c, p, k, kp, r = _alphaedit_problem(2, d_in, 6, n=5, p_rank=16, n_prior=7)
    lam, alpha = 0.7, 0.2
    dw = alphaedit_delta(k, r, p, kp.T @ kp, alpha, _Arch(), mom2=c, mom2_weight=lam)
    dw = dw.materialize() if hasattr(dw, "materialize") else dw
    kd = k.double()
    lhs = dw.double() @ (
        (kd.T @ kd + kp.T @ kp + lam * c) @ p + alpha * torch.eye(d_in, dtype=torch.float64)
    )
    assert torch.allclose(lhs, r.double().T @ kd @ p, atol=1e-6)
    assert (
        dw.double() @ (torch.eye(d_in, dtype=torch.float64) - p)
    ).abs().max() < 1e-5 * dw.abs().max()  # rows in P's range
    memit = memit_delta(k, r, c + kp.T @ kp / lam, lam, _Arch())
    memit = memit.materialize() if hasattr(memit, "materialize") else memit
    same = alphaedit_delta(
        k,
        r,
        torch.eye(d_in, dtype=torch.float64),
        kp.T @ kp,
        1e-12,
        _Arch(),
        mom2=c,
        mom2_weight=lam,
    )
    same = same.materialize() if hasattr(same, "materialize") else same
    assert torch.allclose(same.double(), memit.double(), atol=1e-6)
    # γ weighs the earlier keys: (K Kᵀ + γ K_p K_pᵀ + λ C) P + α I, and a larger γ moves the
    # outputs of the earlier keys less.
    gamma = 20.0
    dg = alphaedit_delta(
        k, r, p, kp.T @ kp, alpha, _Arch(), mom2=c, mom2_weight=lam, preserved_weight=gamma
    )
    dg = (dg.materialize() if hasattr(dg, "materialize") else dg).double()
    lhs = dg @ (
        (kd.T @ kd + gamma * kp.T @ kp + lam * c) @ p + alpha * torch.eye(d_in, dtype=torch.float64)
    )
    # ΔW comes back in float32, and γ = 20 scales the left side up.
    assert torch.allclose(lhs, r.double().T @ kd @ p, atol=1e-4)
    assert (dg @ kp.T).norm() < 0.5 * (dw.double() @ kp.T).norm()


# ---- MEMIT on the real model -------------------------------------------------------------------


def test_key_passes_resumed_above_an_edited_layer_match_full_passes(model, tok, unchanged_after):
    # MEMIT's keys after a lower layer's update, computed from the recorded inputs of that layer,
    # equal a full pass; so do the top block's outputs.
    arch = describe(model)
    reqs = [EditRequest.from_any(r) for r in REQUESTS]
    templates = ["{}", "The river. {}", "Today, {}"]
    _, _, inputs = keys_and_hidden(model, tok, reqs, arch, 4, None, templates, 8, record=4)
    _, _, top_inputs = keys_and_hidden(model, tok, reqs, arch, None, 6, ["{}"], 8, record=4)
    assert (
        inputs is not None and len(inputs.chunks) == 2
    )  # 8 rows per pass: 2 requests × 3 templates
    weight = model.get_parameter(arch.mlp_out_weight_name(4))
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.05 * torch.randn_like(weight))
    try:
        full_k, _, _ = keys_and_hidden(model, tok, reqs, arch, 5, None, templates, 8)
        resumed_k, _, _ = keys_and_hidden(
            model, tok, reqs, arch, 5, None, templates, 8, resume=inputs
        )
        _, full_h, _ = keys_and_hidden(model, tok, reqs, arch, None, 6, ["{}"], 8)
        _, resumed_h, _ = keys_and_hidden(
            model, tok, reqs, arch, None, 6, ["{}"], 8, resume=top_inputs
        )
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.allclose(full_k, resumed_k, atol=1e-5, rtol=1e-4)
    assert torch.allclose(full_h, resumed_h, atol=1e-5, rtol=1e-4)
    before_k, _, _ = keys_and_hidden(model, tok, reqs, arch, 5, None, templates, 8)
    assert not torch.allclose(before_k, full_k, atol=1e-3)  # the update did reach layer 5's keys


def test_block_inputs_carried_past_an_update_match_passes_on_the_edited_model(
    model, tok, unchanged_after
):
    # Recording the input of block 5 with layer 4's projection inputs, then adding layer 4's
    # weight change to them, gives the keys and top outputs a pass on the edited model gives.
    arch = describe(model)
    reqs = [EditRequest.from_any(r) for r in REQUESTS]
    templates = ["{}", "The river. {}", "Today, {}"]
    _, _, inputs = keys_and_hidden(
        model, tok, reqs, arch, 4, None, templates, 8, record=5, carry=True
    )
    _, _, top_inputs = keys_and_hidden(
        model, tok, reqs, arch, None, 6, ["{}"], 8, record=5, carry=True
    )
    assert inputs is not None and inputs.block == 5 and inputs.acts is not None
    assert inputs.acts[0].shape[-1] == arch.mlp_size
    weight = model.get_parameter(arch.mlp_out_weight_name(4))
    original = weight.detach().clone()
    before = arch.mlp_out_weight_as_out_in(model, 4).detach().clone()
    with torch.no_grad():
        weight.add_(0.05 * torch.randn_like(weight))
    try:
        change = arch.mlp_out_weight_as_out_in(model, 4).detach() - before
        full_k, _, _ = keys_and_hidden(model, tok, reqs, arch, 5, None, templates, 8)
        carried_k, _, _ = keys_and_hidden(
            model, tok, reqs, arch, 5, None, templates, 8, resume=inputs.carried(change)
        )
        _, full_h, _ = keys_and_hidden(model, tok, reqs, arch, None, 6, ["{}"], 8)
        _, carried_h, _ = keys_and_hidden(
            model, tok, reqs, arch, None, 6, ["{}"], 8, resume=top_inputs.carried(change)
        )
        stale_k, _, _ = keys_and_hidden(
            model, tok, reqs, arch, 5, None, templates, 8, resume=inputs
        )
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.allclose(full_k, carried_k, atol=1e-5, rtol=1e-4)
    assert torch.allclose(full_h, carried_h, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stale_k, full_k, atol=1e-3)  # without the change the keys are wrong
    with pytest.raises(ValueError, match="carry=False"):
        keys_and_hidden(model, tok, reqs, arch, 4, None, templates, 8, record=5)[2].carried(change)


@pytest.mark.parametrize("arch_name", ["gemma3", "gpt2", "gpt_neox", "llama"])
def test_the_carry_probe_tells_residual_mlp_outputs_from_normed_ones(tok, arch_name):
    # Gemma's blocks norm the MLP output before adding it (a carried input would be wrong
    # there); the others add it as it is (GPT-NeoX in parallel with attention).
    from conftest import make_tiny_model

    tiny = make_tiny_model(arch_name)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    arch = describe(tiny)
    assert [update_adds_to_residual(tiny, tok, arch, i) for i in range(arch.n_layers)] == [
        arch_name != "gemma3"
    ] * 3
    assert_weights_equal(tiny, before)


def test_memit_writes_the_same_weights_with_and_without_carried_block_inputs(
    model, tok, unchanged_after
):
    # Two spreading rounds and a retry exercise every path: the recorded bottom, carried key
    # and top passes, the pinned retry. Values in float32: the retry optimises δ again on the
    # edited model, and in bfloat16 the two paths' 1e-6 differences can round apart and grow
    # over the steps (2.6 % of the change on one CPU, under 1e-4 on another).
    hp = {**SMALL, "layers": [3, 4, 5], "spread_rounds": 2, "retry_rounds": 1, "mom2_update_weight": 20000.0,
          "value_dtype": "float32"}  # fmt: skip
    written = {}
    for carry in (False, True):
        result = edit(
            model, tok, REQUESTS[:3], method="memit", hparams={**hp, "carry_block_inputs": carry}
        )
        try:
            written[carry] = {n: model.get_parameter(n).detach().clone() for n in result.original}
            retried = [d["retried"] for d in result.diagnostics]
        finally:
            result.restore()
    assert sorted(written[True]) == sorted(written[False])
    for n, w in written[True].items():
        change = (w - model.get_parameter(n)).norm()
        assert change > 0
        assert (w - written[False][n]).norm() < 1e-4 * change, n
    assert sum(retried) >= 1  # the retry path ran


def test_emmet_delta_meets_its_constraints_and_is_memit_on_one_layer():
    g = torch.Generator().manual_seed(2)
    d_in, d_out, n = 40, 12, 6
    c = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c = c @ c.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    k = torch.randn(n, d_in, generator=g)
    r = torch.randn(n, d_out, generator=g)

    def dense(d):
        return (d.materialize() if hasattr(d, "materialize") else d).double()

    # δ = 0: every key is mapped exactly to its residual (equality constraints) ...
    exact = dense(emmet_delta(k, r, c, 50.0, 0.0, _Arch()))
    assert torch.allclose(exact @ k.double().T, r.double().T, atol=1e-8)
    # ... by the smallest change in C's metric: any other solution of ΔW K = R costs more.
    other = exact + torch.randn(d_out, d_in, generator=g, dtype=torch.float64) @ (
        torch.eye(d_in, dtype=torch.float64) - k.double().T @ torch.linalg.pinv(k.double().T)
    )
    assert torch.allclose(other @ k.double().T, r.double().T, atol=1e-8)
    cost = lambda d: torch.trace(d @ c @ d.T)  # noqa: E731
    assert cost(exact) < cost(other)
    # δ > 0: MEMIT's least-squares update with λ = λ_m · δ.
    soft = dense(emmet_delta(k, r, c, 50.0, 0.02, _Arch()))
    assert torch.allclose(soft, dense(memit_delta(k, r, c, 50.0 * 0.02, _Arch())), atol=1e-8)
    assert not torch.allclose(soft @ k.double().T, r.double().T, atol=1e-3)


def test_emmet_raises_every_target_on_one_layer_and_restores_exactly(model, tok, unchanged_after):
    before = p_new(model, tok, REQUESTS)
    hp = {**SMALL, "layers": [4], "emmet_lambda": 0.0}  # the exact constraints
    result = edit(model, tok, REQUESTS, method="emmet", hparams=hp)
    try:
        after = p_new(model, tok, REQUESTS)
        for r, b, a in zip(REQUESTS, before, after, strict=True):
            assert a > 2 * b, f"{r['subject']}: P({r['target_new']['str']}) {b:.4f} -> {a:.4f}"
        assert sorted(result.original) == [describe(model).mlp_out_weight_name(4)]
    finally:
        result.restore()
    with pytest.raises(ValueError, match="EMMET edits one layer"):
        edit(model, tok, REQUESTS, method="emmet", hparams=SMALL)


def test_memit_raises_every_target_and_restores_exactly(model, tok, unchanged_after):
    before = p_new(model, tok, REQUESTS)
    result = edit(model, tok, REQUESTS, method="memit", hparams=SMALL)
    try:
        after = p_new(model, tok, REQUESTS)
        for r, b, a, d in zip(REQUESTS, before, after, result.diagnostics, strict=True):
            assert a > 2 * b, f"{r['subject']}: P({r['target_new']['str']}) {b:.4f} -> {a:.4f}"
            assert d["layers"] == [4, 5] and d["target_prob_after"] > d["target_prob_before"]
        touched = sorted(result.original)
        assert touched == [describe(model).mlp_out_weight_name(i) for i in (4, 5)]
    finally:
        result.restore()


def test_a_second_spreading_round_writes_more_of_the_residual(model, tok, unchanged_after):
    # Same values both times (deterministic); the second round writes what λ held back.
    errors = {}
    for rounds in (1, 2):
        result = edit(
            model, tok, REQUESTS[:2], method="memit", hparams={**SMALL, "spread_rounds": rounds}
        )
        try:
            errors[rounds] = [d["z_error"] for d in result.diagnostics]
            assert len(result.diagnostics[0]["layer_residuals"]) == 2 * rounds
        finally:
            result.restore()
    for one, two in zip(errors[1], errors[2], strict=True):
        assert two < one


def test_a_retry_round_raises_the_requests_that_did_not_hold_and_pins_the_others(
    model, tok, unchanged_after
):
    # A strong penalty leaves some requests short of their new target after one write.
    hp = {**SMALL, "mom2_update_weight": 20000.0}
    reqs = [EditRequest.from_any(r) for r in REQUESTS]
    runs = {}
    for retry in (0, 1, 2):
        result = edit(model, tok, REQUESTS, method="memit", hparams={**hp, "retry_rounds": retry})
        try:
            runs[retry] = (holds(model, tok, reqs), p_new(model, tok, REQUESTS), result.diagnostics)
        finally:
            result.restore()
    held, p0, d0 = runs[0]
    _, p1, d1 = runs[1]
    assert any(held) and not all(held), f"the setting must leave some requests failing: {held}"
    assert [d["retried"] for d in d0] == [0] * len(reqs)
    assert [d["retried"] for d in d1] == [int(not h) for h in held]
    for r, h, a, b in zip(REQUESTS, held, p0, p1, strict=True):
        if h:  # pinned: where it was
            assert b == pytest.approx(a, abs=0.02), r["subject"]
        else:
            assert b > a, f"{r['subject']}: P(new) {a:.4f} -> {b:.4f} after a retry"
    failing = [j for j, h in enumerate(held) if not h]
    assert sum(p1[j] for j in failing) > 1.1 * sum(p0[j] for j in failing)
    # A second round checks (and retries) only what the first retried; the pinned stay out.
    d2 = runs[2][2]
    assert all(d["retried"] == 0 for d, h in zip(d2, held, strict=True) if h)
    assert all(d["retried"] >= 1 for d, h in zip(d2, held, strict=True) if not h)


def test_alphaedit_retries_under_the_total_change_penalty_keep_the_pinned_edits(
    model, tok, unchanged_after
):
    """With ``penalise_total_change`` the batch's main write pulls the earlier change back; a
    retry penalises only its own change, so the requests that held stay where they were and
    the failing ones rise. ``total_change_in_follow_ups`` (the behaviour before the fix) makes
    the retry pull back this batch's own first write too, and the pinned edits fall."""
    hp = {**SMALL, "mom2_update_weight": 2000.0, "penalise_total_change": True}
    reqs = [EditRequest.from_any(r) for r in REQUESTS]
    runs = {}
    for label, extra in {"none": {"retry_rounds": 0}, "fixed": {"retry_rounds": 1},
                         "old": {"retry_rounds": 1, "total_change_in_follow_ups": True}}.items():  # fmt: skip
        result = edit(model, tok, REQUESTS, method="alphaedit", hparams={**hp, **extra})
        try:
            runs[label] = (holds(model, tok, reqs), p_new(model, tok, REQUESTS))
        finally:
            result.restore()
    held, p0 = runs["none"]
    assert any(held) and not all(held), f"the setting must leave some requests failing: {held}"
    pinned = [j for j, h in enumerate(held) if h]
    failing = [j for j, h in enumerate(held) if not h]
    fixed, old = runs["fixed"][1], runs["old"][1]
    for j in pinned:
        assert fixed[j] == pytest.approx(p0[j], abs=0.02), REQUESTS[j]["subject"]
    assert all(runs["fixed"][0][j] for j in pinned)
    assert sum(fixed[j] for j in failing) > 1.5 * sum(p0[j] for j in failing)
    # Pulled back twice, the pinned edits lose what the main write gave them.
    assert sum(old[j] for j in pinned) < sum(fixed[j] for j in pinned) - 0.05


def test_alphaedit_held_outputs_pull_in_the_main_write_only(
    model, tok, pristine_state, monkeypatch
):
    """With ``hold_prior_outputs`` the earlier batch's rows are pulled to their held outputs once
    per batch, in its main write: a retry holds them where they are, as it does the pinned
    requests. ``held_outputs_in_follow_ups`` (the behaviour before the fix) pulls them again in
    every retry."""
    from factedit.methods import EditContext
    from factedit.methods.alphaedit import AlphaEditState

    pulls: list[int] = []
    original = AlphaEditState.held_outputs_pull

    def counting(self, layer, weight, leave_out=()):
        pulls.append(layer)
        return original(self, layer, weight, leave_out)

    monkeypatch.setattr(AlphaEditState, "held_outputs_pull", counting)
    first, second = REQUESTS[:2], REQUESTS[2:]
    hp = {**SMALL, **ONE_WRITE, "v_num_grad_steps": 20, "nullspace_threshold": 0.05, "l2": 1.0, "mom2_update_weight": 2000.0,
          "penalise_total_change": True, "hold_prior_outputs": True, "retry_rounds": 1}  # fmt: skip
    runs = {}
    try:
        for label, extra in {"fixed": {}, "old": {"held_outputs_in_follow_ups": True}}.items():
            ctx = EditContext(progress=False)
            edit(model, tok, first, method="alphaedit", hparams=hp, context=ctx)
            pulls.clear()
            result = edit(
                model, tok, second, method="alphaedit", hparams={**hp, **extra}, context=ctx
            )
            runs[label] = (list(pulls), [d["retried"] for d in result.diagnostics],
                           holds(model, tok, [EditRequest.from_any(r) for r in second]))  # fmt: skip
            with torch.no_grad():
                model.load_state_dict(pristine_state)
    finally:
        with torch.no_grad():
            model.load_state_dict(pristine_state)
    layers = SMALL["layers"]
    # The setting leaves one request of the second batch failing after its main write: one retry.
    assert runs["fixed"][1] == runs["old"][1] and 0 in runs["fixed"][1] and 1 in runs["fixed"][1], (
        runs
    )
    assert runs["fixed"][0] == layers, runs
    assert runs["old"][0] == layers + layers, runs
    # The request the retry pinned still holds after it.
    assert all(h for h, r in zip(runs["fixed"][2], runs["fixed"][1], strict=True) if r == 0), runs


def test_memit_refuses_conflicting_requests(model, tok, unchanged_after):
    clash = [REQUESTS[0], {**REQUESTS[0], "target_new": {"str": "Berlin"}}]
    with pytest.raises(InvalidRequestError, match="requests 0 and 1 .*different targets"):
        edit(model, tok, clash, method="memit", hparams=SMALL)


# ---- AlphaEdit in a session --------------------------------------------------------------------


def test_alphaedit_session_keeps_first_batch_reverts_and_saves(
    model, tok, pristine_state, tmp_path
):
    first, second = REQUESTS[:2], REQUESTS[2:]
    before = p_new(model, tok, REQUESTS)
    # The shipped defaults: the second batch's retries, repair and held outputs are part of its
    # write, so reverting it must put back exactly the weights the first batch left.
    session = EditSession(model, tok, method="alphaedit")
    try:
        session.apply(first)
        after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}
        p_first = p_new(model, tok, first)
        session.apply(second)
        assert len(session) == 2 and [r.subject for r in session.requests] == [
            r["subject"] for r in REQUESTS
        ]
        p_all = p_new(model, tok, REQUESTS)
        # The second batch is written and the first one is kept.
        for i, (b, a) in enumerate(zip(before, p_all, strict=True)):
            assert a > 2 * b, f"request {i}: {b:.4f} -> {a:.4f}"
        for pf, pa in zip(p_first, p_all[:2], strict=True):
            assert pa > 0.5 * pf
        assert holds(model, tok, [EditRequest.from_any(r) for r in first]) == [True, True]
        logits_edited = model(**tok(["The Eiffel Tower is located in"], return_tensors="pt")).logits
        path = session.save(tmp_path / "session.safetensors")

        session.revert(1)
        assert_weights_equal(model, after_first)
        session.revert_all()
        assert_weights_equal(model, pristine_state)

        applied = apply_edits(model, path)
        try:
            again = model(**tok(["The Eiffel Tower is located in"], return_tensors="pt")).logits
            assert torch.equal(again, logits_edited)
        finally:
            applied.revert()
        assert_weights_equal(model, pristine_state)
    finally:
        session.revert_all()
    assert_weights_equal(model, pristine_state)


def test_a_one_request_batch_saves_and_reloads_bit_identically(
    model, tok, pristine_state, tmp_path
):
    """A batch of one request writes rank-1 factors (a column whose last dimension has size 1,
    which the file's checksum must hash like any other tensor)."""
    session = EditSession(model, tok, method="alphaedit", hparams=SMALL)
    try:
        session.apply(REQUESTS[:1])
        edited = {k: v.clone() for k, v in model.state_dict().items()}
        path = session.save(tmp_path / "one.safetensors")
    finally:
        session.revert_all()
    assert_weights_equal(model, pristine_state)
    applied = apply_edits(model, path)
    try:
        assert_weights_equal(model, edited)
    finally:
        applied.revert()
    assert_weights_equal(model, pristine_state)


def _first_batch_keys(model, tok, hp, tmp_path=None):
    """Two AlphaEdit batches (REQUESTS[:2], then REQUESTS[2:]) in a session: per layer, the keys
    of the first batch as the state stores them and as the first batch's subjects have them on
    the model the second batch left (``(n, templates, in)``); the session is reverted."""
    from factedit.methods import EditContext
    from factedit.methods.alphaedit import STATE_KEY

    first = [EditRequest.from_any(r) for r in REQUESTS[:2]]
    ctx = (
        EditContext(cache_dir=tmp_path, progress=False) if tmp_path else EditContext(progress=False)
    )
    session = EditSession(model, tok, method="alphaedit", hparams=hp, context=ctx)
    try:
        session.apply(first)
        session.apply(REQUESTS[2:])
        state = ctx.memo[STATE_KEY]
        assert state.n_batches == 2 and [len(b) for b in state.requests] == [2, 2]
        templates = next(t for k, t in ctx.memo.items() if k.startswith("templates/"))
        out = {}
        for layer in hp["layers"]:
            now, _, _ = keys_and_hidden(
                model, tok, first, describe(model), layer, None, templates, template_rows=True
            )
            out[layer] = (state.keys[layer][0], now)
    finally:
        session.revert_all()
    assert session._alpha_batches() == 0
    return out


def test_alphaedit_refreshed_prior_keys_are_the_keys_on_the_edited_model(
    model, tok, pristine_state
):
    """With ``refresh_prior_keys`` the first batch's keys that the second batch's updates
    preserve are those its subjects have on the model as edited so far (a layer's keys depend
    only on the layers below it, all updated before it); without, those its own write read,
    which the second batch's update of layer 4 moved at layer 5."""
    drift = {}
    for refresh in (False, True):
        # One key per request (the shipped SmolLM2 file keeps one per template).
        hp = {**SMALL, "refresh_prior_keys": refresh, "prior_keys_per_template": False}
        keys = _first_batch_keys(model, tok, hp)
        assert_weights_equal(model, pristine_state)
        for layer, (stored, now) in keys.items():
            drift[refresh, layer] = float((stored - now.mean(1)).norm() / now.mean(1).norm())
    assert drift[True, 4] < 1e-5 and drift[True, 5] < 1e-5
    assert drift[False, 4] < 1e-5  # nothing below the range's bottom layer changed
    assert drift[False, 5] > 1e-3, drift


def test_alphaedit_repairs_earlier_edits_that_no_longer_hold(model, tok, pristine_state):
    """``repair_prior_rounds``: an earlier batch whose edits were lost (here its weights put
    back by hand while the sequence's state still holds it) is written again by the next
    batch's call, which keeps its own edits; with no repair the earlier batch stays lost."""
    from factedit.methods import EditContext

    first = [EditRequest.from_any(r) for r in REQUESTS[:2]]
    second = [EditRequest.from_any(r) for r in REQUESTS[2:]]
    hp = {**SMALL, **ONE_WRITE, "v_num_grad_steps": 20}
    outcome = {}
    try:
        for rounds in (0, 1):
            ctx = EditContext(progress=False)
            lost = edit(model, tok, first, method="alphaedit", hparams=hp, context=ctx)
            assert holds(model, tok, first) == [True, True]
            lost.restore()  # the weights forget the first batch; the state does not
            assert holds(model, tok, first) == [False, False]
            result = edit(
                model,
                tok,
                second,
                method="alphaedit",
                hparams={**hp, "repair_prior_rounds": rounds},
                context=ctx,
            )
            outcome[rounds] = (
                holds(model, tok, first),
                holds(model, tok, second),
                result.diagnostics[0],
            )
            result.restore()
            assert_weights_equal(model, pristine_state)
    finally:
        with torch.no_grad():
            model.load_state_dict(pristine_state)
    assert outcome[0][0] == [False, False] and "repaired_prior" not in outcome[0][2]
    assert outcome[1][0] == [True, True], outcome[1]
    # The batch's own edits are what they are without the repair (pinned through it).
    assert outcome[1][1] == outcome[0][1] and any(outcome[1][1]), (outcome[0], outcome[1])
    assert outcome[1][2]["repaired_prior"] == 2 and outcome[1][2]["repaired_prior_rounds"] == [2]


def test_alphaedit_repair_writes_with_its_own_statistics_weight(tok, tmp_path):
    """``repair_update_weight`` is λ for the repair's write only: a huge one makes the repair
    write (almost) nothing, so the batch's weights are those of no repair; ``None`` repairs
    with the batch's λ. Tiny random model: this checks the arithmetic, not editing quality."""
    from conftest import make_tiny_model
    from factedit.methods import EditContext

    tiny = make_tiny_model("llama")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    hp = {"layers": [0, 1], "context_templates": [[3, 2]], "v_num_grad_steps": 3, "mom2_tokens": 2000,
          "mom2_update_weight": 1.0}  # fmt: skip
    deltas = {}
    for label, extra in {"none": {"repair_prior_rounds": 0}, "same": {"repair_prior_rounds": 1},
                         "huge": {"repair_prior_rounds": 1, "repair_update_weight": 1e12}}.items():  # fmt: skip
        ctx = EditContext(cache_dir=tmp_path, progress=False)
        lost = edit(tiny, tok, REQUESTS[:2], method="alphaedit", hparams=hp, context=ctx)
        lost.restore()  # the weights forget the first batch; the sequence's state does not
        result = edit(
            tiny, tok, REQUESTS[2:], method="alphaedit", hparams={**hp, **extra}, context=ctx
        )
        deltas[label] = torch.cat([(p - before[n]).flatten() for n, p in tiny.state_dict().items()])
        repaired = result.diagnostics[0].get("repaired_prior", 0)
        result.restore()
        assert_weights_equal(tiny, before)
        assert (repaired > 0) == (label != "none"), (label, repaired)
    moved = (deltas["same"] - deltas["none"]).norm()
    assert moved > 1e-3 * deltas["none"].norm()
    assert (deltas["huge"] - deltas["none"]).norm() < 1e-3 * moved


def test_alphaedit_prior_keys_per_template_store_the_templates_second_moment(tok, tmp_path):
    from conftest import make_tiny_model

    tiny = make_tiny_model("llama")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    hp = {"layers": [0, 1], "context_templates": [[3, 2]], "v_num_grad_steps": 3, "mom2_tokens": 2000,
          "prior_keys_per_template": True}  # fmt: skip
    for refresh in (False, True):
        keys = _first_batch_keys(tiny, tok, {**hp, "refresh_prior_keys": refresh}, tmp_path)
        for stored, now in keys.values():
            n, n_t, d = now.shape
            assert n_t == 3 and stored.shape == (n * n_t, d)
            # Kᵀ K of the stored rows is the mean over templates of k kᵀ, summed over requests.
            expected = torch.einsum("ntd,nte->de", now, now) / n_t
            torch.testing.assert_close(stored.T @ stored, expected, rtol=1e-4, atol=1e-7)
        assert_weights_equal(tiny, before)


# ---- requests from files -----------------------------------------------------------------------


def test_requests_file_formats_and_errors(tmp_path):
    as_list = tmp_path / "reqs.json"
    as_list.write_text(json.dumps(REQUESTS))
    assert [r.subject for r in load_requests(as_list)] == [r["subject"] for r in REQUESTS]
    jsonl = tmp_path / "reqs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n")
    assert load_requests(jsonl) == load_requests(as_list)

    bad = [
        REQUESTS[0],
        {"prompt": "no placeholder here", "subject": "X", "target_new": "Y"},
        REQUESTS[1],
    ]
    with pytest.raises(InvalidRequestError, match=r"request 1 is invalid"):
        parse_requests_text(json.dumps(bad))
    lines = "\n".join(json.dumps(r) for r in [REQUESTS[0], {"prompt": "{} is", "subject": "A"}])
    with pytest.raises(InvalidRequestError, match=r"request 1 \(line 2\) is invalid.*target_new"):
        parse_requests_text(lines)
    clash = [REQUESTS[0], {**REQUESTS[0], "target_new": {"str": "Berlin"}}]
    with pytest.raises(InvalidRequestError, match="requests 0 and 1"):
        parse_requests_text(json.dumps(clash))
    # The same request twice is not a conflict.
    assert len(parse_requests_text(json.dumps([REQUESTS[0], REQUESTS[0]]))) == 2


def test_cli_edit_stops_on_an_invalid_request_file(model, pristine_state, tmp_path, capsys):
    from factedit.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(REQUESTS[0]) + "\n" + json.dumps({**REQUESTS[1], "target_new": ""}) + "\n"
    )
    code = main(
        ["edit", "--method", "memit", "--requests", str(path), "--batch-size", "1", "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "request 1 (line 2) is invalid" in err and "nothing was edited" in err
    assert_weights_equal(model, pristine_state)


# ---- the mass-editing evaluation ---------------------------------------------------------------


def test_batch_evaluation_sequential_measures_all_at_the_end(
    model, tok, pristine_state, data_dir, tmp_path
):
    from factedit.evaluate import load_dataset, make_config, read_results
    from factedit.evaluate.batch import run_batch_evaluation

    path = data_dir / "counterfact" / "counterfact_dev.json"
    cases = load_dataset(path, limit=4)[2:4]
    cfg = make_config(model, method="memit", hparams=SMALL, model_name="smollm2", dataset=path,
                      kind="counterfact", sequential=True, generation=False)  # fmt: skip
    out = tmp_path / "r.jsonl"
    summary = run_batch_evaluation(
        model, tok, cases, cfg, out, batch_size=1, hparams=SMALL, progress=False
    )
    assert_weights_equal(model, pristine_state)
    res = read_results(out)
    assert res.config["batch_size"] == 1 and res.config["sequential"] is True
    assert [c["case_id"] for c in res.cases] == [c.case_id for c in cases]
    # Without generations the header says so rather than naming a sample that was not measured.
    assert "no generations" in res.header["notes"][0], res.header["notes"]
    assert summary.n_cases == 2
    # Both edits were measured on the model holding both: each rewrite now prefers the new target.
    assert summary.post["ES"].mean > summary.pre["ES"].mean
    assert summary.post["ES"].mean >= 0.5
    # Each record keeps its request's scalar diagnostics from the edit (lists are dropped).
    for c in res.cases:
        d = c["diagnostics"]
        assert d["v_steps"] >= 1 and 0 < d["target_prob_after"] <= 1 and "layers" not in d
    # The same configuration resumes (nothing to do), another is refused.
    run_batch_evaluation(model, tok, cases, cfg, out, batch_size=1, hparams=SMALL, progress=False)
    from factedit.evaluate import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="batch_size"):
        run_batch_evaluation(
            model, tok, cases, cfg, out, batch_size=2, hparams=SMALL, progress=False
        )


def test_batch_evaluation_generates_for_the_sample_across_cases(
    model, tok, pristine_state, data_dir, tmp_path
):
    """The GE sample's texts are generated many cases per call (each case from its own seed)
    and are the ones a case generated alone gets; the pre-edit cache skips them next time."""
    from factedit.evaluate import load_dataset, make_config, read_results
    from factedit.evaluate.batch import generation_sample, run_batch_evaluation
    from factedit.evaluate.runner import case_generations

    path = data_dir / "counterfact" / "counterfact_dev.json"
    cases = load_dataset(path, limit=7)[4:7]
    cfg = make_config(model, method="memit", hparams=SMALL, model_name="smollm2", dataset=path,
                      kind="counterfact", gen_length=40)  # fmt: skip
    sample = generation_sample(cases, 2, cfg.seed)
    run = dict(
        batch_size=3,
        hparams=SMALL,
        progress=False,
        gen_sample=2,
        pre_cache=tmp_path / "pre",
        gen_batch_rows=8,
    )
    summary = run_batch_evaluation(model, tok, cases, cfg, tmp_path / "a.jsonl", **run)
    assert_weights_equal(model, pristine_state)
    res = read_results(tmp_path / "a.jsonl")
    with_gen = {c["case_id"] for c in res.cases if "GE" in c["pre"]}
    assert "GE/RS on a fixed sample of 2 cases" in res.header["notes"][0], res.header["notes"]
    assert with_gen == sample and all(
        "GE" in c["post"] for c in res.cases if c["case_id"] in sample
    )
    by_id = {c.case_id: c for c in cases}
    same = total = 0
    for rec in res.cases:
        if rec["case_id"] in sample:
            alone = case_generations(model, tok, by_id[rec["case_id"]], cfg).texts
            same += sum(a == b for a, b in zip(rec["generations"]["pre"], alone, strict=True))
            total += len(alone)
    # Batching moves the logits by ~1e-6; a draw at a probability boundary may flip, rarely.
    assert total == 20 and same >= total - 1
    assert summary.post["ES"].mean > summary.pre["ES"].mean
    # A second run reads the pre-edit measurements, generations included, from the cache.
    run_batch_evaluation(model, tok, cases, cfg, tmp_path / "b.jsonl", **run)
    again = read_results(tmp_path / "b.jsonl")
    for a, b in zip(res.cases, again.cases, strict=True):
        assert a["pre"] == b["pre"] and b["seconds"]["pre_eval"] == 0


def test_sequential_batches_measure_fluency_along_the_way(
    model, tok, pristine_state, data_dir, tmp_path
):
    """``gen_checkpoints``: after the listed batches the sample's GE is measured again, split
    into cases edited so far and not yet, each paired against its own value before the edits."""
    from factedit.evaluate import load_dataset, make_config, read_results, summarize
    from factedit.evaluate.batch import generation_sample, run_batch_evaluation

    path = data_dir / "counterfact" / "counterfact_dev.json"
    cases = load_dataset(path, limit=11)[8:11]
    cfg = make_config(model, method="memit", hparams=SMALL, model_name="smollm2", dataset=path,
                      kind="counterfact", sequential=True, gen_length=30)  # fmt: skip
    run = dict(batch_size=1, hparams=SMALL, progress=False, gen_sample=3, gen_batch_rows=16)
    # Refused before anything is written: no checkpoint at or past the last batch, none
    # without the sequence.
    with pytest.raises(ValueError, match=r"\[3\] out of range.*1\.\.2"):
        run_batch_evaluation(
            model, tok, cases, cfg, tmp_path / "x.jsonl", gen_checkpoints=[3], **run
        )
    batch_cfg = make_config(model, method="memit", hparams=SMALL, model_name="smollm2", dataset=path,
                            kind="counterfact", gen_length=30)  # fmt: skip
    with pytest.raises(ValueError, match="sequential"):
        run_batch_evaluation(
            model, tok, cases, batch_cfg, tmp_path / "x.jsonl", gen_checkpoints=[1], **run
        )
    assert not (tmp_path / "x.jsonl").exists()

    out = tmp_path / "r.jsonl"
    summary = run_batch_evaluation(model, tok, cases, cfg, out, gen_checkpoints=[2, 1], **run)
    assert_weights_equal(model, pristine_state)
    res = read_results(out)
    assert res.config["gen_checkpoints"] == [1, 2]
    assert generation_sample(cases, 3, cfg.seed) == {c.case_id for c in cases}
    pre_ge = {c["case_id"]: c["pre"]["GE"] for c in res.cases}
    assert [cp["after_batch"] for cp in res.checkpoints] == [1, 2]
    for k, cp in enumerate(res.checkpoints, start=1):
        rows = cp["per_case"]
        assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
        assert [r["edited"] for r in rows] == [i < k for i in range(3)]
        assert (
            cp["n_edits"] == k
            and cp["groups"]["edited"]["n"] == k
            and cp["groups"]["unedited"]["n"] == 3 - k
        )
        for group, flag in (("edited", True), ("unedited", False)):
            mine = [r for r in rows if r["edited"] is flag]
            change = sum(r["GE"] - pre_ge[r["case_id"]] for r in mine) / len(mine)
            assert cp["groups"][group]["GE change"]["mean"] == pytest.approx(change)
            assert all(r["GE pre"] == pre_ge[r["case_id"]] for r in mine)
        assert cp["summary"]["GE"]["mean"] == pytest.approx(sum(r["GE"] for r in rows) / 3)
        assert all(0 < r["GE"] < 10 and 0 < r["GE-eos"] < 10 for r in rows)
    # The table frames the checkpoints by the values before and at the end.
    table = summarize(read_results(out)).to_markdown()
    assert "Fluency along the sequence" in table and "| 0 | 0 |" in table and "| 1 | 1 |" in table
    assert "| end | 3 |" in table
    assert summary.post["ES"].mean > summary.pre["ES"].mean


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["memit", "alphaedit", "emmet"])
def test_mass_editing_runs_on_tiny_architectures(tok, arch_name, method, tmp_path):
    """Coverage of the storage orientations (GPT-2's Conv1D is transposed), not of quality."""
    from conftest import make_tiny_model
    from factedit.methods import EditContext

    tiny = make_tiny_model(arch_name)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    layers = [1] if method == "emmet" else [0, 1]
    hp = {
        "layers": layers,
        "context_templates": [[3, 1]],
        "v_num_grad_steps": 3,
        "mom2_tokens": 2000,
    }
    ctx = EditContext(cache_dir=tmp_path, progress=False)
    result = edit(tiny, tok, REQUESTS[:2], method=method, hparams=hp, context=ctx)
    arch = describe(tiny)
    names = [arch.mlp_out_weight_name(i) for i in layers]
    assert sorted(result.original) == sorted(names)
    for n in names:
        assert (
            not torch.equal(tiny.get_parameter(n), before[n])
            and torch.isfinite(tiny.get_parameter(n)).all()
        )
    result.restore()
    assert_weights_equal(tiny, before)
