"""The ``generate`` and ``info`` commands, in process, and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factedit.cli import main

EIFFEL = "The Eiffel Tower is located in the city of"


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: factedit" in out and "generate" in out and "info" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: factedit" in out and "edit" in out and "methods" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("factedit ")


def test_every_command_and_flag_has_help():
    from factedit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = []
    for name, p in sub.choices.items():
        if not p.description and not any(c.dest == name and c.help for c in sub._choices_actions):
            missing.append(name)
        missing += [
            f"{name} {a.option_strings or a.dest}" for a in p._actions if a.help in (None, "")
        ]
    assert not missing, missing


def test_methods_lists_and_shows_hparams(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "rome" in out and "ft-l" in out
    assert main(["methods", "--show-hparams", "ROME"]) == 0
    hp = json.loads(capsys.readouterr().out)
    assert hp["layer"] == 4 and "v_lr" in hp


def test_generate(model, capsys):
    assert main(["generate", EIFFEL, "The Beatles were a band from", "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(EIFFEL + " Paris")
    assert lines[1].startswith("The Beatles were a band from")


def test_generate_logit_lens(model, capsys):
    from factedit.arch import describe

    n_layers = describe(model).n_layers
    assert (
        main(["generate", EIFFEL, "--max-new-tokens", "1", "--logit-lens", "--lens-top-k", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"logit lens for {EIFFEL!r}:" in out
    lens = [line for line in out.splitlines() if line.startswith("layer ")]
    assert len(lens) == n_layers
    assert lens[-1].startswith(f"layer {n_layers - 1:>3}:") and "' Paris'" in lens[-1]


def test_info(model, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "mlp.down_proj" in out
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out


def test_info_json(model, capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "llama"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["architecture"]["n_layers"] == model.config.num_hidden_layers
    assert info["architecture"]["mlp_out"] == "mlp.down_proj"


def test_bad_model_is_a_clear_error(capsys):
    assert main(["info", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "factedit: error:" in err and "does not exist" in err
    assert "Traceback" not in err


def test_console_script():
    script = Path(sys.executable).with_name("factedit")
    exe = str(script) if script.exists() else shutil.which("factedit")
    assert exe, "the factedit console script is not installed (pip install -e .)"
    # --help keeps it quick; the commands themselves are tested in process above.
    run = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: factedit") and "generate" in run.stdout
