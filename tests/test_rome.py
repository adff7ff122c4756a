"""ROME on the real default model: the edit takes, generalises, stays specific, and undoes exactly."""

from __future__ import annotations

import pytest
import torch

import factedit
from conftest import assert_weights_equal
from factedit import get_parameter
from factedit.methods import NonFiniteUpdateError, edit, edited
from factedit.methods.rome import ROMEHParams
from factedit.requests import EditRequest, InvalidRequestError
from factedit.scoring import next_token_distribution

REQUEST = {
    "prompt": "{} was the founder of",
    "subject": "Steve Jobs",
    "target_new": {"str": "Microsoft"},
}
KNOWN = {
    "The Eiffel Tower is located in the city of": " Paris",
    "The Beatles came from the city of": " Liverpool",
}


def top1(model, tok, prompts):
    return [
        tok.decode([i]) for i in next_token_distribution(model, tok, prompts).argmax(-1).tolist()
    ]


@pytest.fixture(scope="module")
def steve_jobs_edit(model, tok, pristine_state):
    """One default ROME edit, measured, then restored (the model is shared)."""
    known_before = top1(model, tok, list(KNOWN))
    result = edit(model, tok, REQUEST)
    after = {
        "prompt": top1(model, tok, ["Steve Jobs was the founder of"])[0],
        "paraphrase": top1(model, tok, ["Steve Jobs, the founder of"])[0],
        "known": top1(model, tok, list(KNOWN)),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    result.restore()
    assert_weights_equal(model, pristine_state)
    return result, known_before, after


def test_edit_makes_new_target_top1_on_prompt_and_paraphrase(steve_jobs_edit):
    _, _, after = steve_jobs_edit
    assert after["prompt"] == " Microsoft"
    assert after["paraphrase"] == " Microsoft"


def test_edit_keeps_other_facts(steve_jobs_edit):
    _, known_before, after = steve_jobs_edit
    assert known_before == list(KNOWN.values())
    assert after["known"] == known_before


def test_result_diagnostics_and_rank_one_delta(steve_jobs_edit, model):
    result, _, _ = steve_jobs_edit
    hp = result.hparams
    assert isinstance(hp, ROMEHParams)
    (name,) = result.original
    assert name == factedit.describe(model).mlp_out_weight_name(hp.layer)
    (step,) = result.steps
    factors = step[name]
    assert factors.left.shape[1] == factors.right.shape[1] == 1  # stored as rank-one factors
    sv = torch.linalg.svdvals(result.deltas[name].double())
    assert sv[1] < 1e-5 * sv[0]  # and the dense delta is rank one up to float32 rounding
    d = result.diagnostics[0]
    assert d["target_prob_after"] > 10 * d["target_prob_before"]
    assert {"key", "value", "update", "total"} <= set(result.timings)


def test_restore_and_seed_restore_loop_are_bit_exact(model, tok, pristine_state):
    result = edit(model, tok, REQUEST, hparams={"v_num_grad_steps": 3})
    assert not torch.equal(
        get_parameter(model, next(iter(result.original))), next(iter(result.original.values()))
    )
    result.restore()
    assert_weights_equal(model, pristine_state)
    result.restore()  # idempotent
    assert_weights_equal(model, pristine_state)

    # The research code's restore loop, on the returned original weights.
    result = edit(model, tok, REQUEST, hparams={"v_num_grad_steps": 3})
    orig_weights = result.orig_weights
    with torch.no_grad():
        for k, v in orig_weights.items():
            get_parameter(model, k)[...] = v
    assert_weights_equal(model, pristine_state)


def test_edited_context_restores_on_exit_and_on_error(model, tok, pristine_state):
    with edited(model, tok, REQUEST, hparams={"v_num_grad_steps": 2}) as result:
        assert result.steps
    assert_weights_equal(model, pristine_state)
    with (
        pytest.raises(RuntimeError, match="boom"),
        edited(model, tok, REQUEST, hparams={"v_num_grad_steps": 2}),
    ):
        raise RuntimeError("boom")
    assert_weights_equal(model, pristine_state)


def test_sequential_requests_both_take(model, tok, unchanged_after):
    reqs = [
        REQUEST,
        {
            "prompt": "{} is located in the city of",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
        },
    ]
    with edited(model, tok, reqs) as result:
        assert len(result.diagnostics) == 2
        assert top1(model, tok, ["The Eiffel Tower is located in the city of"]) == [" Rome"]
        assert top1(model, tok, ["Steve Jobs was the founder of"]) == [" Microsoft"]


def test_original_key_bug_flag_changes_the_update(model, tok, unchanged_after):
    light = {"v_num_grad_steps": 2, "context_templates": [[5, 2]]}
    with edited(model, tok, REQUEST, hparams=light) as fixed:
        d_fixed = fixed.deltas
    with edited(model, tok, REQUEST, hparams={**light, "original_key_bug": True}) as buggy:
        d_buggy = buggy.deltas
    (name,) = d_fixed
    assert not torch.allclose(d_fixed[name], d_buggy[name])


def test_hparams_from_file_and_unknown_fields(tmp_path, model):
    path = tmp_path / "rome.json"
    path.write_text('{"layer": 4, "v_lr": 0.1}')
    hp = ROMEHParams.from_file(path)
    assert hp.layer == 4 and hp.v_lr == 0.1
    path.write_text('{"layr": 4}')
    with pytest.raises(ValueError, match="layr"):
        ROMEHParams.from_file(path)
    yaml_path = tmp_path / "rome.yaml"
    yaml_path.write_text("layer: 3\nkl_factor: 0.1\n")
    assert ROMEHParams.from_file(yaml_path).kl_factor == 0.1
    assert (
        ROMEHParams.defaults_for("rome", model).layer
        == ROMEHParams.defaults_for("rome", model).layer
    )


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (
            {"prompt": "was the founder of", "subject": "Steve Jobs", "target_new": "Microsoft"},
            "exactly one",
        ),
        (
            {"prompt": "{} founded {}", "subject": "Steve Jobs", "target_new": "Microsoft"},
            "exactly one",
        ),
        (
            {
                "prompt": "{} was the founder of",
                "subject": "Steve Jobs",
                "target_new": {"str": "  "},
            },
            "target_new is empty",
        ),
        (
            {"prompt": "{} was the founder of", "subject": " ", "target_new": "Microsoft"},
            "subject is empty",
        ),
        (
            {
                "prompt": "Bill Gates was the founder of",
                "subject": "Steve Jobs",
                "target_new": "Microsoft",
            },
            "exactly one",
        ),
    ],
)
def test_bad_requests_raise_and_leave_model_unchanged(model, tok, unchanged_after, request_, match):
    with pytest.raises(InvalidRequestError, match=match):
        edit(model, tok, request_)


def test_subject_not_in_prompt(model, tok, unchanged_after):
    with pytest.raises(InvalidRequestError, match="not found in prompt"):
        EditRequest.from_filled("Bill Gates was the founder of", "Steve Jobs", "Microsoft")


def test_target_the_tokenizer_maps_to_nothing(model, tok, unchanged_after):
    class EmptyTargets:
        """The real tokenizer, except that it maps the target to no tokens."""

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            return {"input_ids": []} if text == " Microsoft" else tok(text, **kw)

    with pytest.raises(InvalidRequestError, match="no tokens"):
        edit(model, EmptyTargets(), REQUEST)


def test_layer_out_of_range(model, tok, unchanged_after):
    with pytest.raises(ValueError, match="out of range"):
        edit(model, tok, REQUEST, hparams={"layer": 30})


def test_non_finite_update_is_refused(model, tok, unchanged_after, monkeypatch):
    from factedit.methods import rome
    from factedit.values import ValueResult

    def nan_values(*args, **kwargs):
        hidden = factedit.describe(model).hidden_size
        nan = float("nan")
        return [
            ValueResult(
                torch.full((hidden,), nan), torch.ones(hidden), 0, nan, nan, nan, False, False
            )
        ]

    monkeypatch.setattr(rome, "optimize_values", nan_values)
    with pytest.raises(NonFiniteUpdateError, match="NaN or inf"):
        edit(model, tok, REQUEST, hparams={"v_num_grad_steps": 1})


def test_unknown_and_unavailable_methods(model, tok, tmp_path):
    from factedit.methods import EditContext

    # A learned editor that has not been trained for this model says how to train it.
    with pytest.raises(ValueError, match="factedit train mend"):
        edit(model, tok, REQUEST, method="MEND", context=EditContext(cache_dir=tmp_path))
    with pytest.raises(ValueError, match="unknown editing method"):
        edit(model, tok, REQUEST, method="nope")
    assert "rome" in factedit.available_methods()


def test_rome_runs_on_tiny_architectures(tiny_model, tok):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    light = {"layer": 1, "v_num_grad_steps": 2, "context_templates": [[3, 2]], "mom2_tokens": 256}
    result = edit(tiny_model, tok, REQUEST, hparams=light)
    (name,) = result.original
    assert not torch.equal(tiny_model.state_dict()[name], state[name])
    result.restore()
    assert all(torch.equal(tiny_model.state_dict()[k], v) for k, v in state.items())


def test_each_key_mode_moves_the_bare_prompt(model, tok, unchanged_after):
    """CounterFact case 34: the bare prompt's key differs from the prefixed ones; mapping every
    optimised key to the same shift makes the edit hold on the bare prompt too."""
    from factedit.scoring import mean_target_logprob

    req = {
        "prompt": "{} was employed in",
        "subject": "Laurent Cars",
        "target_new": "Philadelphia",
        "target_true": "Paris",
    }
    text = "Laurent Cars was employed in"
    with edited(model, tok, req, hparams={"key_mode": "each"}):
        new, true = mean_target_logprob(
            model, tok, [text, text], [" Philadelphia", " Paris"]
        ).tolist()
    assert new > true


def test_mom2_solver_matches_solve_and_factorises_once_per_statistics():
    from factedit.methods.rome import mom2_solver

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g)
    c = (a @ a.T + 64 * torch.eye(64)).float()
    b, cols = torch.randn(64, generator=g), torch.randn(64, 3, generator=g)
    memo: dict = {}
    solve = mom2_solver(c, memo)
    assert torch.allclose(solve(b), torch.linalg.solve(c.double(), b.double()), atol=1e-10)
    assert torch.allclose(solve(cols), torch.linalg.solve(c.double(), cols.double()), atol=1e-10)
    (entry,) = memo.values()
    assert mom2_solver(c, memo) and list(memo.values()) == [entry]  # reused, not refactorised
    other = c + torch.eye(64)
    mom2_solver(other, memo)
    assert len(memo) == 2
