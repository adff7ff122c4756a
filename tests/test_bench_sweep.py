"""bench/memit_sweep.py at a few edits: the sweep's measuring path runs in every suite (it broke
once unnoticed when batch records changed shape, and its GE sample was once silently cut to
the --measure cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_memit_sweep_smoke(tmp_path, data_dir):
    out = tmp_path / "sweep.json"
    hp = {
        "layers": [4, 5],
        "context_templates": [[5, 2]],
        "v_num_grad_steps": 3,
        "mom2_tokens": 2000,
    }
    env = dict(os.environ, FACTEDIT_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memit_sweep.py"), "--n", "2", "--offset", "2000",
         "--threads", "1", "--measure", "1", "--gen-sample", "2", "--gen-unedited", "1", "--hparams", json.dumps(hp),
         "--set", '{"retry_rounds": 2}', "--set", '{"clamp_norm_factor": 1.0, "retry_rounds": 0}', "--final-only", "--json", str(out),
         "--cache", str(tmp_path / "values")],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    # --final-only: the retry setting gets one row, after the last retry that ran (the second,
    # or the first if it left no failure); the setting without retries one after its write.
    assert len(rows) == 2 and rows[0]["setting"]["retry_rounds"] in (1, 2), rows
    # The retries act after the values, so the first setting used the base values; the clamp
    # changes the value stage, so the second optimised (and cached) its own.
    assert len(list((tmp_path / "values").glob("values-*.safetensors"))) == 2
    assert rows[1]["setting"] == {"clamp_norm_factor": 1.0, "retry_rounds": 0}, rows[1]["setting"]
    for key in ("ES", "PS", "NS", "GE", "pre_GE", "GE_unedited", "pre_GE_unedited"):
        assert 0 <= rows[0][key] <= 10, (key, rows[0])
    assert "GE of 1 unedited cases" in proc.stdout
    # GE's sample is drawn from every edited case, not only the ones --measure keeps.
    assert ", 2 cases)" in proc.stdout, proc.stdout[-2000:]
    # Per-case GE, paired with the unedited model's over the same cases.
    assert len(rows[0]["GE_cases"]) == len(rows[0]["pre_GE_cases"]) == 2
    assert "paired over the same cases" in proc.stdout


def test_paired_change():
    sys.path.insert(0, str(REPO / "bench"))  # bench/ is scripts, not a package
    from memit_sweep import paired_change

    # differences -0.1 and -0.3: mean -0.2 (-3.3 % of 6.0), SE 0.1414 / sqrt(2) = 0.1 (1.7 %)
    assert paired_change([6.0, 6.0], [5.9, 5.7]) == "-3.3 % ± 1.7 %"
    assert paired_change([6.0, 6.0], [6.0, 6.0]) == "+0.0 % ± 0.0 %"


def test_value_fields_cover_what_the_value_stage_reads():
    sys.path.insert(0, str(REPO / "bench"))
    from factedit.methods.memit import MEMITHParams
    from factedit.values import ValueConfig
    from memit_sweep import VALUE_FIELDS, value_fields

    class Spy:
        """Hyperparameters that record which fields the value stage reads."""

        def __init__(self, hp):
            self.hp, self.read = hp, set()

        def __getattr__(self, name):
            self.read.add(name)
            return getattr(self.hp, name)

    spy = Spy(MEMITHParams())
    ValueConfig.from_hparams(spy)
    fields = set(MEMITHParams.__dataclass_fields__)
    # A field the values depend on but the sweep treats as write-only would let two settings
    # share values they should not.
    assert spy.read & fields <= VALUE_FIELDS, (spy.read & fields) - VALUE_FIELDS
    assert fields >= VALUE_FIELDS, VALUE_FIELDS - fields
    assert value_fields({"mom2_update_weight": 1.0, "layers": [1], "kl_factor": 0.5}) == {
        "kl_factor": 0.5
    }
