"""The research notebook's session: demo_model_editing, the restore loop, interactive
generation (in-process and through ``factedit chat`` with piped input), ``factedit demo``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_weights_equal
from edit_helpers import logits, rank_one, synthetic_edit
from factedit.demo import EXAMPLES, demo_model_editing, generate_interactive
from factedit.generation import generate
from factedit.hooks import get_parameter
from factedit.saving import apply_edits


def test_demo_model_editing_seed_session(model, tok, tmp_path, pristine_state, unchanged_after):
    """The seed's cells: edit Steve Jobs -> Microsoft, print before/after, restore with the
    research code's loop; the ROME edit saved and re-applied gives the same logits."""
    ex = EXAMPLES["steve-jobs"]
    out = io.StringIO()
    model_new, orig_weights = demo_model_editing(
        model, tok, ex.request, ex.generation_prompts, alg_name="ROME", max_new_tokens=6, out=out
    )
    text = out.getvalue()
    assert model_new is model
    assert "Steve Jobs was the founder of -> 'Microsoft'" in text
    for p in ex.generation_prompts:
        assert f"before | {p}" in text and f"after  | {p}" in text
    result = orig_weights.result
    assert result.method == "rome" and set(orig_weights) == set(result.original)
    # The printed probabilities are the real ones and the edit raised the target's.
    before, after = (
        float(x) for x in text.split("Steve Jobs was the founder of Microsoft")[1].split()[:2]
    )
    assert after > before
    diag = result.diagnostics[0]
    assert after == pytest.approx(diag["target_prob_after"], abs=1e-4)
    assert any(not torch.equal(get_parameter(model, k), v) for k, v in orig_weights.items())

    edited = logits(model, tok)
    path = result.save(tmp_path / "rome.safetensors")

    # The research code's restore cell, verbatim in spirit.
    with torch.no_grad():
        for k, v in orig_weights.items():
            get_parameter(model, k)[...] = v
    assert_weights_equal(model, pristine_state)

    applied = apply_edits(model, path)
    try:
        assert torch.equal(logits(model, tok), edited)
    finally:
        applied.revert()


def test_demo_sampling_is_seeded(model, tok, unchanged_after):
    """top_k sampling (the seed's setting) is repeatable with a seed."""
    a = generate(model, tok, ["Steve Jobs worked for"], max_new_tokens=8, top_k=5, seed=3)
    b = generate(model, tok, ["Steve Jobs worked for"], max_new_tokens=8, top_k=5, seed=3)
    assert a == b


def _scripted(lines, check=None):
    """An input function that returns ``lines`` one by one, then raises EOFError."""
    it = iter(lines)

    def read(prompt: str) -> str:
        if check is not None:
            check()
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_generate_interactive_compares_and_keeps_weights(
    model, tok, pristine_state, unchanged_after
):
    prompts = ["Steve Jobs was the founder of", "The Eiffel Tower is in"]
    original_texts = generate(model, tok, prompts, max_new_tokens=8)
    result = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    try:
        edited_state = {n: get_parameter(model, n).detach().clone() for n in result.original}
        edited_texts = generate(model, tok, prompts, max_new_tokens=8)
        assert edited_texts != original_texts, "the test edit should change generations"

        def still_edited() -> None:
            for n, v in edited_state.items():
                assert torch.equal(get_parameter(model, n), v)

        out = io.StringIO()
        n_tokens = [len(tok(p)["input_ids"]) for p in prompts]
        turns = []
        for p, n in zip(prompts, n_tokens, strict=True):
            # max_out_len counts the prompt's tokens too, as in the research code.
            turns += generate_interactive(
                model, tok, max_out_len=n + 8, top_k=None, use_logit_lens=True,
                compare_against=result, input_fn=_scripted([p], check=still_edited), out=out,
            )  # fmt: skip
        still_edited()
        assert [t.edited for t in turns] == edited_texts
        assert [t.original for t in turns] == original_texts
        text = out.getvalue()
        assert "[edited]   " + edited_texts[0] in text and "[original] " + original_texts[0] in text
        assert len(turns[0].lens) == 30 and "layer  29:" in text
    finally:
        result.restore()


def test_generate_interactive_stops_on_empty_line(model, tok):
    out = io.StringIO()
    seen = []
    turns = generate_interactive(
        model, tok, max_out_len=12, top_k=None,
        input_fn=_scripted(["Paris is the capital of", "", "never read"], check=lambda: seen.append(1)), out=out,
    )  # fmt: skip
    assert len(turns) == 1 and len(seen) == 2
    assert turns[0].original is None and turns[0].edited.startswith("Paris is the capital of")


def test_generate_interactive_refuses_undone_edit(model, tok, unchanged_after):
    result = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    result.restore()
    with pytest.raises(ValueError, match="undone"):
        generate_interactive(model, tok, compare_against=result, input_fn=_scripted([]))


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_chat_cli_with_piped_input(model, tok, tmp_path, unchanged_after):
    result = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    path = result.save(tmp_path / "edit.safetensors")
    prompt = "Steve Jobs was the founder of"
    n = len(tok(prompt)["input_ids"])
    edited_text = generate(model, tok, prompt, max_new_tokens=6)[0]
    result.restore()
    original_text = generate(model, tok, prompt, max_new_tokens=6)[0]

    proc = subprocess.run(
        [sys.executable, "-m", "factedit", "chat", "--edits", str(path), "--logit-lens",
         "--max-out-len", str(n + 6), "--top-k", "1"],
        input=f"{prompt}\n", capture_output=True, text=True, env=_cli_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"[edited]   {edited_text}" in proc.stdout
    assert f"[original] {original_text}" in proc.stdout
    assert "layer  29:" in proc.stdout
    assert "applied synthetic edit" in proc.stdout


def test_chat_cli_empty_line_exits(monkeypatch, capsys):
    from factedit.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is\n\nnever read\n"))
    assert main(["chat", "--max-out-len", "10", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("The capital of France is") == 2  # echoed prompt + continuation
    assert "never read" not in out


def test_chat_cli_bad_edit_file_is_a_clear_error(tmp_path, capsys):
    from factedit.cli import main

    bad = tmp_path / "bad.safetensors"
    bad.write_text("nope")
    assert main(["chat", "--edits", str(bad)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err


def test_demo_cli_runs_and_saves(model, tmp_path, capsys):
    """``factedit demo`` end to end (ROME with one optimisation step to stay quick)."""
    from factedit.cli import main
    from factedit.methods.rome import ROMEHParams
    from factedit.saving import load_edit

    # The model's defaults (same layer and templates, so the cached statistics are reused),
    # with a single optimisation step.
    quick = ROMEHParams.defaults_for("rome", model).replace(v_num_grad_steps=1)
    hp = tmp_path / "quick.json"
    hp.write_text(json.dumps(quick.to_dict()))
    saved = tmp_path / "demo.safetensors"
    args = [
        "demo",
        "--hparams",
        str(hp),
        "--max-new-tokens",
        "3",
        "--no-progress",
        "--save",
        str(saved),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "=== steve-jobs ===" in out and "after  | Steve Jobs worked for" in out
    edit = load_edit(saved)
    assert edit.method == "rome" and edit.hparams["v_num_grad_steps"] == 1
    assert edit.requests[0].target_new == "Microsoft"
