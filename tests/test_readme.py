"""Every snippet of README.md runs, so the documentation cannot drift from the code.

Python blocks run in order in one subprocess (a fresh interpreter, as a reader's would be)
with the real default model. Shell blocks run through the CLI, in order, in one scratch
folder, with the small-input substitutions of :data:`SHELL_RULES`. A README shell line that no
rule knows fails the test: a new snippet must be made runnable here.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
#: Shell commands start with one of these words; other unlabelled blocks are text (trees, ...).
COMMANDS = ("factedit", "make", "python", "pip")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence


def blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file."""
    out, lang, start, buf = [], None, 0, []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, buf = line[3:].strip().lower(), i, []
            else:
                out.append(Block(lang, "\n".join(buf), start))
                lang = None
        elif lang is not None:
            buf.append(line)
    assert lang is None, f"{path}: unclosed code block at line {start}"
    return out


def shell_lines(block: Block) -> list[str]:
    """Commands of a shell block: continuations joined, comments and blank lines dropped."""
    joined = block.text.replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            cmds.append(shlex.join(words))
    return cmds


def is_shell(block: Block) -> bool:
    if block.lang in ("bash", "sh", "shell", "console"):
        return True
    first = next((x.strip() for x in block.text.splitlines() if x.strip()), "")
    return block.lang == "" and first.split(" ")[0] in COMMANDS


@dataclass
class Rule:
    """How to run README shell lines matching ``pattern`` on small inputs."""

    pattern: str
    add: list[str] = field(default_factory=list)  # arguments appended
    replace: dict[str, str] = field(default_factory=dict)  # regex -> replacement, on the args
    skip: str = ""  # not run, and why
    stdin: str | None = None
    expect: str = ""  # text the command's stdout must contain
    files: dict[str, str] = field(default_factory=dict)  # written to the working folder first


QUICK_ROME = '{"v_num_grad_steps": 1}'
FACTS_JSONL = (
    '{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}}\n'
    '{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}\n'
)

SHELL_RULES: list[Rule] = [
    Rule(
        r"^make (demo|test)$",
        skip="builds .venv; 'make test' is this suite, "
        "'make demo' is factedit demo (tests/test_demo.py)",
    ),  # fmt: skip
    Rule(r"^factedit --help$", expect="usage: factedit"),
    Rule(r"^factedit methods\b", expect="rome"),
    Rule(r"^factedit info\b", expect="architecture"),
    Rule(r"^factedit generate ", add=["--max-new-tokens", "3"]),
    # One optimisation step: the edit is saved and used by apply and chat below; its quality
    # is tested elsewhere.
    # A requests file of two facts (JSONL); one batch, one optimisation step.
    Rule(
        r"^factedit edit --method memit --requests facts.jsonl",
        files={"facts.jsonl": FACTS_JSONL},
        add=["--max-new-tokens", "3", "--hparams", QUICK_ROME],
        expect="[after]",
    ),  # fmt: skip
    Rule(
        r"^factedit edit ", add=["--max-new-tokens", "3", "--hparams", QUICK_ROME], expect="[after]"
    ),
    Rule(r"^factedit apply ", expect="wrote the edited model"),
    Rule(
        r"^factedit chat ",
        add=["--max-out-len", "12"],
        stdin="Steve Jobs worked for\n",
        expect="[original] Steve Jobs worked for",
    ),  # fmt: skip
    Rule(
        r"^factedit trace ",
        add=["--samples", "1", "--kinds", "mlp", "--formats", "png"],
        expect="answer ' Paris': clean p=",
    ),  # fmt: skip
    Rule(
        r"^factedit serve\b",
        skip="serves until stopped; tests/test_web.py runs the CLI end to end and "
        "tests/test_web_browser.py drives the page in Chromium",
    ),  # fmt: skip
    Rule(
        r"^torchrun ",
        skip="several processes; tests/test_distributed.py runs 2 gloo ranks "
        "of stats and eval on the real model",
    ),  # fmt: skip
    # Two shards of two records, then their merge.
    Rule(
        r"^factedit eval --method rome .*--shard ",
        replace={r"--limit \d+": "--limit 2"},
        add=["--no-progress", "--hparams", QUICK_ROME],
        expect="| E",
    ),  # fmt: skip
    Rule(r"^factedit merge ", expect="| E"),
    Rule(
        r"^factedit eval --method rome ",
        replace={r"--limit \d+": "--limit 1"},
        add=["--no-generation", "--no-progress", "--hparams", QUICK_ROME],
        expect="| E",
    ),  # fmt: skip
    Rule(
        r"^factedit eval --method (alphaedit|memit) .*--batch-size",
        replace={r"--limit \d+": "--limit 2", r"--batch-size \d+": "--batch-size 1"},
        add=["--no-generation", "--no-progress", "--hparams", QUICK_ROME],
        expect="| E",
    ),  # fmt: skip
    Rule(
        r"^factedit eval --method ft",
        replace={r"--limit \d+": "--limit 1"},
        add=["--no-generation", "--no-progress", "--hparams", '{"num_steps": 2}'],
        expect="| E",
    ),  # fmt: skip
    Rule(r"^factedit stats ", add=["--tokens", "2000", "--recompute"], expect="tokens, computed"),
    Rule(
        r"^factedit eval --method (mend|ke)",
        skip="needs a trained editor (about 30 min of "
        "training); tests/test_learned.py trains a small one and edits with it",
    ),  # fmt: skip
    Rule(r"^factedit train ", skip="minutes of training; tests/test_learned.py runs short ones"),
]


def _rule(line: str) -> Rule:
    matches = [r for r in SHELL_RULES if re.search(r.pattern, line)]
    if not matches:
        pytest.fail(
            f"README shell line {line!r} has no rule in tests/test_readme.py SHELL_RULES: "
            "add one that runs it on small inputs"
        )
    return matches[0]


def _argv(line: str, rule: Rule, data_dir: Path) -> list[str]:
    text = line.replace("../shared/data", str(data_dir))
    for pattern, repl in rule.replace.items():
        text = re.sub(pattern, repl, text)
    args = shlex.split(text, comments=True)
    assert args[0] == "factedit", line
    extra = [a for a in rule.add if a != "--no-generation" or a not in args]
    return args[1:] + extra


def test_readme_shell_lines_all_have_rules():
    """Fast: every shell line of the README is known (the slow test below runs them)."""
    lines = [c for b in blocks(README) if is_shell(b) for c in shell_lines(b)]
    assert any(c.startswith("factedit eval") for c in lines)
    for c in lines:
        _rule(c)


def test_readme_shell_snippets_run(tmp_path, data_dir, monkeypatch, capsys):
    from factedit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FACTEDIT_THREADS", "1")
    ran, timings = 0, []
    for block in blocks(README):
        if not is_shell(block):
            continue
        for line in shell_lines(block):
            rule = _rule(line)
            if rule.skip:
                continue
            for name, text in rule.files.items():
                (tmp_path / name).write_text(text, encoding="utf-8")
            argv = _argv(line, rule, data_dir)
            monkeypatch.setattr(sys, "stdin", io.StringIO(rule.stdin or ""))
            t0 = time.perf_counter()
            try:
                rc = main(argv)
            except SystemExit as exc:  # --help
                rc = exc.code
            captured = capsys.readouterr()
            timings.append(f"{time.perf_counter() - t0:6.1f} s  {line}")
            where = f"README.md line {block.line}: {line!r} (ran factedit {shlex.join(argv)})"
            assert rc == 0, f"{where} failed:\n{captured.err[-3000:]}"
            assert rule.expect in captured.out, (
                f"{where}: {rule.expect!r} not in\n{captured.out[-3000:]}"
            )
            if line.startswith("factedit trace "):
                # The README's example traces a fact the model knows, and says so.
                assert "no --answer given" not in captured.err, captured.err
            ran += 1
    assert ran >= 8
    print("\n".join(timings))


def test_readme_python_snippets_run(tmp_path):
    """All Python blocks, in order, in one fresh interpreter (as a reader would paste them)."""
    parts = []
    for i, block in enumerate(b for b in blocks(README) if b.lang == "python"):
        parts.append(f"print('--- README python block {i} (line {block.line})', flush=True)")
        parts.append(block.text)
    assert len(parts) >= 4
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(parts) + "\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    # The 30-second example printed the edited model's generation and saved the edit.
    assert "Steve Jobs worked for" in proc.stdout and "target_prob_after" in proc.stdout
    assert (tmp_path / "jobs-microsoft.safetensors").is_file()
