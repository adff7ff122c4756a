"""Causal tracing: behaviour on the real default model, coverage on tiny models of every family."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_ARCHS, make_tiny_model
from factedit.tracing import (
    KINDS,
    TOKEN_CLASSES,
    CausalTracer,
    TraceResult,
    average_trace,
    class_effects,
    embedding_std,
    resolve_noise,
    token_classes,
    trace,
)

# A fact the default model knows (p(" Paris") is about 0.7), with a short prompt.
PROMPT = "The Eiffel Tower is in the city of"
SUBJECT = "The Eiffel Tower"
LAYERS = [0, 12, 29]  # a few columns keep the real-model tests fast


@pytest.fixture(scope="module")
def tracer(model, tok):
    return CausalTracer(model, tok, PROMPT, SUBJECT, samples=3, seed=0)


def test_default_model_knows_the_fact_and_corruption_hurts(tracer):
    assert tracer.answer.strip() == "Paris"
    assert tracer.clean_prob > 0.3
    assert tracer.clean_prob > 5 * tracer.corrupt_prob


def test_restoring_every_state_gives_back_the_clean_probability(tracer):
    cells = [(t, layer) for t in range(tracer.n_tokens) for layer in range(tracer.arch.n_layers)]
    restored = tracer.probabilities([cells], kind="hidden")[0].item()
    assert restored == pytest.approx(tracer.clean_prob, rel=1e-4)
    # Restoring nothing is the corrupted run.
    assert tracer.probabilities([[]], kind="hidden")[0].item() == pytest.approx(tracer.corrupt_prob)


def test_grid_matches_single_cell_runs_and_batching(model, tok, tracer):
    result = tracer.trace("hidden", layers=LAYERS)
    s, e = result.subject_range
    assert result.grid.shape == (tracer.n_tokens, len(LAYERS))
    # One cell per forward pass (batch_size = samples) gives the same numbers as many per pass.
    single = CausalTracer(model, tok, PROMPT, SUBJECT, samples=3, seed=0, batch_size=3)
    for t, j in [(e - 1, 0), (tracer.n_tokens - 1, 2), (s, 1)]:
        alone = single.probabilities([[(t, LAYERS[j])]], kind="hidden")[0].item()
        assert result.grid[t, j].item() == pytest.approx(alone, rel=1e-4, abs=1e-6)
    # Restoring a subject token's state at the first layer brings back much of the answer
    # (for this model the middle subject token " E|iffel", not the last one, carries it).
    gap = tracer.clean_prob - tracer.corrupt_prob
    assert result.grid[s:e, 0].max() > tracer.corrupt_prob + 0.25 * gap
    # The last token's final block output determines the prediction: it restores it fully.
    assert result.grid[-1, 2].item() == pytest.approx(tracer.clean_prob, rel=1e-4)
    # Restoring non-subject tokens at the first layer changes nothing much.
    assert (result.grid[e:-1, 0] < tracer.corrupt_prob + 0.1 * gap).all()


def test_same_seed_same_result_other_seed_differs(model, tok):
    kw = dict(kind="mlp", samples=2, layers=[4], window=4)
    a = trace(model, tok, PROMPT, SUBJECT, seed=7, **kw)
    b = trace(model, tok, PROMPT, SUBJECT, seed=7, **kw)
    c = trace(model, tok, PROMPT, SUBJECT, seed=8, **kw)
    assert torch.equal(a.grid, b.grid) and a.corrupt_prob == b.corrupt_prob
    assert not torch.equal(a.grid, c.grid)
    # The global random state is not touched.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trace(model, tok, PROMPT, SUBJECT, seed=7, **kw)
    assert torch.equal(torch.rand(3), expected)


def test_package_export_is_the_trace_function(model, tok):
    import factedit
    import factedit.tracing  # importing the module must not shadow the exported function

    result = factedit.trace(model, tok, PROMPT, SUBJECT, layers=[0], samples=1)
    assert isinstance(result, TraceResult) and result.answer == " Paris"


def test_noise_specs(model, tok, tracer):
    std = embedding_std(model)
    assert std > 0
    assert resolve_noise("s3", model) == pytest.approx(3 * std)
    assert resolve_noise(0.25, model) == 0.25 and resolve_noise("0.25", model) == 0.25
    assert tracer.noise_std == pytest.approx(3 * std)
    assert embedding_std(model, tok, ["The Eiffel Tower", "Paris"]) > 0
    for bad in ("loud", "s", -1.0, float("nan")):
        with pytest.raises(ValueError, match="noise"):
            resolve_noise(bad, model)
    # No noise: the corrupted run is the clean run.
    quiet = CausalTracer(model, tok, PROMPT, SUBJECT, noise=0.0, samples=1)
    assert quiet.corrupt_prob == pytest.approx(quiet.clean_prob, rel=1e-5)


def test_unpredicted_answer_and_missing_subject_are_clear_errors(model, tok, pristine_state):
    # transformers installs inert hooks of its own on first use of some outputs; compare with
    # what was there before rather than expecting none.
    hooks_before = {name: list(m._forward_hooks) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="does not predict 'London'.*allow_any_answer"):
        trace(model, tok, PROMPT, SUBJECT, answer="London", layers=[0], samples=1)
    with pytest.raises(ValueError, match="'Big Ben' not found"):
        trace(model, tok, PROMPT, "Big Ben", layers=[0], samples=1)
    with pytest.raises(ValueError, match="kind"):
        trace(model, tok, PROMPT, SUBJECT, kind="neurons", layers=[0], samples=1)
    with pytest.raises(ValueError, match="samples"):
        trace(model, tok, PROMPT, SUBJECT, samples=0)
    # The answer given explicitly (with or without its leading space) and allow_any_answer.
    assert (
        trace(model, tok, PROMPT, SUBJECT, answer="Paris", layers=[0], samples=1).answer == " Paris"
    )
    forced = trace(
        model, tok, PROMPT, SUBJECT, "London", layers=[0], samples=1, allow_any_answer=True
    )
    assert forced.answer.strip() == "London" and forced.clean_prob < 0.3
    from conftest import assert_weights_equal

    assert_weights_equal(model, pristine_state)
    assert {name: list(m._forward_hooks) for name, m in model.named_modules()} == hooks_before


def test_heatmaps_are_written(tracer, tmp_path):
    from factedit.trace_plot import plot_trace

    for kind in KINDS:
        result = tracer.trace(kind, window=3, layers=[2, 20])
        paths = plot_trace(result, tmp_path / f"trace_{kind}")
        assert sorted(p.suffix for p in paths) == [".png", ".svg"]
        assert all(p.stat().st_size > 1000 for p in paths)
    with open(tmp_path / "trace_mlp.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_result_round_trips_through_json(tracer):
    result = tracer.trace("attn", window=2, layers=[1])
    back = TraceResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert torch.equal(back.grid, result.grid) and back.subject_range == result.subject_range
    assert back.tokens == result.tokens and back.answer == result.answer


def test_token_classes():
    # 10 tokens, subject at 1..3 (end exclusive 4): first 1, middle 2, last 3, subsequent 4.
    got = token_classes(10, (1, 4))
    assert got == {
        "first subject token": [1],
        "middle subject tokens": [2],
        "last subject token": [3],
        "first subsequent token": [4],
        "further tokens": [5, 6, 7, 8],
        "last token": [9],
    }
    one = token_classes(3, (0, 1))
    assert one["first subject token"] == one["last subject token"] == [0]
    assert one["middle subject tokens"] == [] and one["further tokens"] == []
    assert list(got) == list(TOKEN_CLASSES)


@pytest.mark.parametrize("arch_name", TINY_ARCHS)
def test_tiny_models_run_all_kinds(arch_name, tok):
    model = make_tiny_model(arch_name)
    tracer = CausalTracer(
        model, tok, "The Eiffel Tower is in the city of", "Eiffel Tower", samples=2, noise=1.0
    )
    n_layers = tracer.arch.n_layers
    for kind in KINDS:
        result = tracer.trace(kind, window=2)
        assert result.grid.shape == (tracer.n_tokens, n_layers)
        assert (
            torch.isfinite(result.grid).all()
            and (result.grid >= 0).all()
            and (result.grid <= 1).all()
        )
        assert len(class_effects(result)) == len(TOKEN_CLASSES)
    # Patching works on this architecture: restoring every block output restores the clean run.
    cells = [(t, i) for t in range(tracer.n_tokens) for i in range(n_layers)]
    assert tracer.probabilities([cells])[0].item() == pytest.approx(
        tracer.clean_prob, rel=1e-4, abs=1e-7
    )
    assert not any(m._forward_hooks for m in model.modules())


def test_average_trace_resumes_from_cache(tok, tmp_path):
    # Mechanics only (cache, resume, aggregation), so a tiny model stands in for the real one.
    model = make_tiny_model("llama")
    facts = [
        {
            "known_id": 0,
            "subject": "Vinson Massif",
            "prompt": "Vinson Massif is located in the continent of",
        },
        {"known_id": 1, "subject": "Beats Music", "template": "{} is owned by"},
        {"known_id": 2, "subject": "Nowhere", "prompt": "This subject is absent"},
    ]
    cache = tmp_path / "cache.jsonl"
    kw = dict(
        kinds=["mlp", "hidden"],
        samples=2,
        window=2,
        cache=cache,
        require_known=False,
        progress=False,
    )
    first = average_trace(model, tok, facts, **kw)
    assert first.n_facts == 2 and first.n_skipped == 1 and first.n_cached == 0
    assert "not found" in first.skipped["2"]
    lines = cache.read_text().splitlines()
    assert len(lines) == 3
    again = average_trace(model, tok, facts, **kw)
    assert again.n_cached == 3 and again.effects == first.effects
    assert len(cache.read_text().splitlines()) == 3
    # Other settings do not reuse the cached facts.
    other = average_trace(model, tok, facts, **{**kw, "seed": 1})
    assert other.n_cached == 0 and other.effects != first.effects
    assert first.counts["mlp"]["last subject token"] == 2
    assert 0 <= first.peak_layer("mlp") < first.n_layers
    # A new kind for the same facts traces only that kind; then everything comes from the cache.
    more = average_trace(model, tok, facts, **{**kw, "kinds": ["attn"]})
    assert more.n_cached == 1 and more.kinds == ["attn"]  # only the skipped fact was cached
    every = average_trace(model, tok, facts, **{**kw, "kinds": ["hidden", "mlp", "attn"]})
    assert every.n_cached == 3 and every.effects["mlp"] == first.effects["mlp"]
    assert every.effects["attn"] == more.effects["attn"]
    # With require_known, facts without the answer the model predicts are skipped.
    known = average_trace(
        model,
        tok,
        facts[:1] + [{**facts[1], "attribute": "Apple"}],
        **{**kw, "cache": None, "require_known": True},
    )
    assert known.n_facts == 0 and known.n_skipped == 2


def test_cli_trace_prompt_and_facts(tok, tmp_path, capsys):
    from factedit.cli import main

    folder = tmp_path / "tiny"
    make_tiny_model("gpt2").save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    rc = main([
        "trace", "The Space Needle is located in the city of", "--subject", "The Space Needle",
        "--out", str(out), "--model", str(folder), "--samples", "2", "--window", "2", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    for kind in KINDS:
        for ext in ("png", "svg"):
            assert (out / f"trace_{kind}.{ext}").stat().st_size > 1000
    data = json.loads((out / "trace.json").read_text())
    assert set(data) == set(KINDS) and len(data["mlp"]["grid"][0]) == 3

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([
        {"known_id": 5, "subject": "Beats Music", "prompt": "Beats Music is owned by", "attribute": "Apple"},
    ]))  # fmt: skip
    out2 = tmp_path / "avg"
    argv = ["trace", "--facts", str(facts), "--limit", "1", "--out", str(out2), "--model", str(folder),
            "--samples", "1", "--window", "2", "--kinds", "mlp", "--all-facts", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (out2 / "average_effects.png").stat().st_size > 1000
    assert json.loads((out2 / "average.json").read_text())["n_facts"] == 1
    assert len((out2 / "trace_cache.jsonl").read_text().splitlines()) == 1
    assert "peak at layer" in capsys.readouterr().out

    assert main(["trace", "--out", str(out), "--model", str(folder)]) == 2
    assert main(["trace", "x y", "--subject", "z", "--out", str(out), "--model", str(folder)]) == 2
    assert "not found" in capsys.readouterr().err
