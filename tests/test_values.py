"""The shared value optimiser on the real default model: batching and the prefix cache change
nothing but speed; ROME's efficacy check continues or warns instead of a silent non-edit."""

from __future__ import annotations

import warnings

import pytest
import torch

import factedit
from factedit.methods import EditContext, edit
from factedit.methods.rome import EditEfficacyWarning, ROMEHParams, context_templates
from factedit.requests import EditRequest
from factedit.scoring import mean_target_logprob
from factedit.values import ValueConfig, build_rows, optimize_values

REQUESTS = [
    EditRequest("{} was the founder of", "Steve Jobs", "Microsoft"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} plays the", "Miles Davis", "violin"),
]


@pytest.fixture(scope="module")
def setup(model, tok):
    arch = factedit.describe(model)
    hp = ROMEHParams.defaults_for("rome", model, arch)
    templates = context_templates(model, tok, hp, EditContext(progress=False))
    return arch, hp, templates


def test_rows_align_the_subject_and_mark_targets(tok, setup):
    _, hp, templates = setup
    b = build_rows(tok, REQUESTS[:2], templates, hp.kl_prompts, [None, None])
    n_rows = 2 * (len(templates) + len(hp.kl_prompts))
    assert b.input_ids.shape[0] == n_rows
    for i in range(n_rows):
        # The token at the split column is the subject's last token in every row.
        subject = REQUESTS[int(b.request[i])].subject
        assert (
            tok.decode(b.input_ids[i, b.split]).strip()
            == tok.decode(tok(" " + subject)["input_ids"][-1:]).strip()
        )
    # The NLL terms of each request predict its target's tokens, in order.
    target = tok(" Microsoft", add_special_tokens=False)["input_ids"]
    rows0 = b.nll_row[b.request[b.nll_row] == 0]
    assert b.nll_tok[b.request[b.nll_row] == 0].tolist() == target * len(templates)
    assert len(set(rows0.tolist())) == len(templates)


def test_repeat_rows_carry_the_whole_target_and_keep_the_nll_terms(tok, setup):
    """With ``repeat`` every rewrite row ends with the whole target, and its last column (the
    target's last token) is where the target following itself is penalised; the NLL terms are
    the ones without it."""
    _, hp, templates = setup
    plain = build_rows(tok, REQUESTS[:2], templates, hp.kl_prompts, [None, None])
    rep = build_rows(tok, REQUESTS[:2], templates, hp.kl_prompts, [None, None], repeat=True)
    assert plain.rep_row.numel() == 0
    assert rep.split == plain.split
    for name in ("nll_row", "nll_pos", "nll_tok", "nll_w", "first_pos", "request", "is_kl"):
        assert torch.equal(getattr(rep, name), getattr(plain, name)), name
    assert rep.rep_row.numel() == 2 * len(templates)
    assert not rep.is_kl[rep.rep_row].any()
    for row, pos in zip(rep.rep_row.tolist(), rep.rep_pos.tolist(), strict=True):
        target = tok(REQUESTS[int(rep.request[row])].target_text, add_special_tokens=False)[
            "input_ids"
        ]
        # The column predicting what follows the target holds the target's last token, right
        # after the column of the last NLL term (which predicts that token).
        assert int(rep.input_ids[row, pos]) == target[-1]
        assert pos == int(rep.nll_pos[rep.nll_row == row].max()) + 1
        assert int(rep.last_pos[row]) == pos
    assert torch.allclose(rep.rep_w.sum(), torch.tensor(2.0))


def test_repeat_factor_keeps_the_target_from_following_itself(model, tok, setup, pristine_state):
    """Without the term, the δ that makes "actor" Mary Renault's occupation also makes "actor"
    follow "actor" (P ≈ 0.14 on the default model); with ``repeat_factor`` that probability
    falls by far more than half while the target still reaches the early stop."""
    arch, hp, templates = setup
    req = [EditRequest("The occupation of {} is", "Mary Renault", "actor")]
    # A negligible weight measures the probability without steering δ.
    (ref,) = optimize_values(
        model, tok, req, arch, hp.layer, templates, ValueConfig.from_hparams(hp, repeat_factor=1e-6)
    )
    (pen,) = optimize_values(
        model, tok, req, arch, hp.layer, templates, ValueConfig.from_hparams(hp, repeat_factor=20.0)
    )
    assert ref.repeat_prob is not None and pen.repeat_prob is not None
    assert ref.repeat_prob > 0.05, ref.repeat_prob
    assert pen.repeat_prob < 0.2 * ref.repeat_prob, (pen.repeat_prob, ref.repeat_prob)
    assert ref.done and pen.done and pen.nll < hp.early_stop_loss
    assert pen.info()["v_repeat_prob"] == pen.repeat_prob
    (off,) = optimize_values(
        model, tok, req, arch, hp.layer, templates, ValueConfig.from_hparams(hp, steps=2)
    )
    assert off.repeat_prob is None and "v_repeat_prob" not in off.info()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pristine_state.items())


def test_batched_equals_one_at_a_time(model, tok, setup, pristine_state):
    """Each request's δ gets exactly its own gradient in the batch, so batching three requests
    gives the same values as three separate optimisations (float32, up to summation order)."""
    arch, hp, templates = setup
    cfg = ValueConfig.from_hparams(hp, steps=6, dtype=None)
    batched = optimize_values(model, tok, REQUESTS, arch, hp.layer, templates, cfg)
    for req, b in zip(REQUESTS, batched, strict=True):
        (single,) = optimize_values(model, tok, [req], arch, hp.layer, templates, cfg)
        assert single.steps == b.steps
        assert torch.allclose(
            single.delta, b.delta, rtol=1e-3, atol=1e-3 * single.delta.norm().item()
        )
        assert single.nll == pytest.approx(b.nll, rel=1e-3, abs=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pristine_state.items())


def test_prefix_cache_gives_the_same_values(model, tok, setup):
    arch, hp, templates = setup
    cfg = ValueConfig.from_hparams(hp, steps=4, dtype=None)
    (cached,) = optimize_values(model, tok, REQUESTS[:1], arch, hp.layer, templates, cfg)
    (full,) = optimize_values(
        model,
        tok,
        REQUESTS[:1],
        arch,
        hp.layer,
        templates,
        cfg.__class__(**{**cfg.__dict__, "prefix_cache": False}),
    )
    assert cached.steps == full.steps
    assert torch.allclose(cached.delta, full.delta, rtol=1e-4, atol=1e-4 * full.delta.norm().item())
    assert cached.delta.norm() > 0


def test_bfloat16_values_run_on_a_weight_copy_and_agree_with_float32(
    model, tok, setup, pristine_state
):
    """value_dtype="bfloat16" runs the network on a bfloat16 copy of the weights: the float32
    weights come back bit-for-bit (the same tensors), and the optimised shift is the float32
    one up to bfloat16 rounding."""
    arch, hp, templates = setup
    tensors = {n: p.data_ptr() for n, p in model.named_parameters()}
    cfg = ValueConfig.from_hparams(hp, steps=6, dtype=None)
    (fp32,) = optimize_values(model, tok, REQUESTS[:1], arch, hp.layer, templates, cfg)
    (bf16,) = optimize_values(
        model,
        tok,
        REQUESTS[:1],
        arch,
        hp.layer,
        templates,
        ValueConfig.from_hparams(hp, steps=6, dtype="bfloat16"),
    )
    assert all(
        p.data_ptr() == tensors[n] and p.dtype == torch.float32 for n, p in model.named_parameters()
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pristine_state.items())
    assert bf16.delta.dtype == torch.float32 and bf16.steps == fp32.steps
    cos = torch.nn.functional.cosine_similarity(bf16.delta, fp32.delta, dim=0)
    assert cos > 0.97, float(cos)
    assert bf16.delta.norm() == pytest.approx(float(fp32.delta.norm()), rel=0.05)
    assert bf16.nll == pytest.approx(fp32.nll, rel=0.2, abs=0.05)


def test_cast_parameters_restores_the_original_tensors_on_error(model):
    from factedit.hooks import cast_parameters

    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), cast_parameters(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        raise RuntimeError("boom")
    assert all((p.data_ptr(), p.dtype) == before[n] for n, p in model.named_parameters())


def test_converged_requests_leave_the_batch(model, tok, setup):
    """A request the model already answers stops at once; the others go on."""
    arch, hp, templates = setup
    easy = EditRequest("{} is located in the city of", "The Eiffel Tower", "Paris")
    cfg = ValueConfig.from_hparams(hp, steps=5, early_stop_loss=1.0, dtype=None)
    res = optimize_values(model, tok, [easy, REQUESTS[0]], arch, hp.layer, templates, cfg)
    assert res[0].done and res[0].steps == 1 and res[0].delta.norm() == 0
    assert res[1].steps > 1


def test_a_failed_edit_warns_with_probabilities(model, tok, unchanged_after):
    """One optimisation step measures and never steps: δ = 0, the fact cannot move. The user
    is told, with the probabilities, instead of getting a silent non-edit."""
    req = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": "Rome", "target_true": "Paris"}  # fmt: skip
    with pytest.warns(EditEfficacyWarning, match=r"P\(new\) .* vs P\(old\)"):
        result = edit(model, tok, req, hparams={"v_num_grad_steps": 1, "efficacy_retries": 0})
    d = result.diagnostics[0]
    assert d["efficacy"] is False and d["p_old"] > d["p_new"]
    result.restore()


def test_efficacy_retries_continue_the_optimisation(model, tok, unchanged_after):
    """One small Adam step is too little for a fact the model knows strongly; the check after
    the update sends the optimisation back, step by step, until the new target wins."""
    req = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": "Rome", "target_true": "Paris"}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", EditEfficacyWarning)
        result = edit(
            model,
            tok,
            req,
            hparams={"v_num_grad_steps": 2, "v_lr": 0.2, "efficacy_retries": 8},
            context=EditContext(progress=False),
        )
    d = result.diagnostics[0]
    assert d["efficacy_retries"] >= 1 and d["efficacy"] is True
    assert d["v_steps"] > 2
    text = "The Eiffel Tower is located in the city of"
    new, old = mean_target_logprob(model, tok, [text, text], [" Rome", " Paris"]).tolist()
    assert new > old
    # Retried updates were taken back exactly: one rank-one step remains.
    assert len(result.steps) == 1
    result.restore()


def test_a_weak_win_is_retried_until_the_new_target_reaches_the_floor(model, tok, unchanged_after):
    """Beating the old target by a hair is not an edit a user wants: with
    ``efficacy_min_prob`` the update is retried until the new target's mean per-token
    probability on the request prompt reaches the floor, and the diagnostics say so."""
    req = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": "Rome", "target_true": "Paris"}  # fmt: skip
    hp = {"v_num_grad_steps": 3, "v_lr": 0.3, "efficacy_retries": 8}
    weak = edit(
        model,
        tok,
        req,
        hparams={**hp, "efficacy_min_prob": 0.0},
        context=EditContext(progress=False),
    )
    d0 = weak.diagnostics[0]
    weak.restore()
    floor = min(0.9, d0["p_new"] + 0.3)
    strong = edit(
        model,
        tok,
        req,
        hparams={**hp, "efficacy_min_prob": floor},
        context=EditContext(progress=False),
    )
    d1 = strong.diagnostics[0]
    assert d1["holds"] is True and d1["p_new"] >= floor > d0["p_new"]
    assert d1["efficacy_retries"] > d0["efficacy_retries"]
    text = "The Eiffel Tower is located in the city of"
    (p_new,) = mean_target_logprob(model, tok, [text], [" Rome"]).exp().tolist()
    assert p_new == pytest.approx(d1["p_new"], rel=1e-4)
    assert len(strong.steps) == 1
    strong.restore()
