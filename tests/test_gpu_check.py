"""bench/gpu_check.sh in its CPU smoke mode: the GPU script's code paths run in every suite."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_smoke_mode(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", OUT=str(tmp_path))
    proc = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--no-cli"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for shape in ("gpt2-xl", "llama-7b"):
        for dtype in ("float32", "bfloat16"):
            assert f"{shape} (" in out and f"), {dtype}, layer" in out
    assert out.count("rome: ") == 4 and "FAILED" not in out
    assert out.count("statistics: ") == 4
    # MEMIT is timed when this factedit has it, and skipped with a note otherwise.
    from factedit.methods import available_methods

    assert (
        ("memit: " in out)
        if "memit" in available_methods()
        else ("'memit' is not available" in out)
    )
    assert (tmp_path / "gpu_check.json").is_file()
