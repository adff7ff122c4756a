"""Statistics and evaluation across processes: torchrun with 2 CPU processes (gloo) on the real
default model, against one process; sharded results files and their merge."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, shared_data_dir
from factedit.arch import describe
from factedit.corpus import wikipedia
from factedit.evaluate.results import read_results
from factedit.evaluate.sharding import merge_results, parse_shard, shard_cases
from factedit.models import cache_dir
from factedit.stats import compute_second_moment, stats_key

TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _factedit(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "factedit"]  # fmt: skip
    else:
        launcher = [sys.executable, "-m", "factedit"]
    proc = subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_statistics_equal_one_process(model, tok):
    layer, tokens = 2, 4096  # a budget no other run uses, so its cache entry is this test's
    arch = describe(model)
    corpus = wikipedia()
    key = stats_key(model, arch, layer, corpus, tokens, 256)
    path = cache_dir() / "stats" / f"{key}.safetensors"
    for p in (path, path.with_suffix(".json")):
        p.unlink(missing_ok=True)
    try:
        proc = _factedit(
            "stats", "--layer", str(layer), "--tokens", str(tokens), "--threads", "1", nproc=2
        )
        assert "computed by 2 processes" in proc.stdout and key in proc.stdout
        assert proc.stdout.count("tokens,") == 1  # only rank 0 prints
        saved = load_file(path)
        mom2, mean, count = compute_second_moment(
            model, tok, layer, corpus=corpus, tokens=tokens, progress=False
        )
        assert int(saved["count"]) == count
        torch.testing.assert_close(saved["mom2"], mom2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved["mean"], mean, rtol=1e-5, atol=1e-7)
        # The same cache entry serves one process afterwards.
        again = _factedit("stats", "--layer", str(layer), "--tokens", str(tokens), "--threads", "1")
        assert "read from the cache" in again.stdout and key in again.stdout
    finally:
        for p in (path, path.with_suffix(".json")):
            p.unlink(missing_ok=True)


def _case_lines(path: Path) -> dict:
    return {
        json.dumps(c["case_id"]): {k: v for k, v in c.items() if k != "seconds"}
        for c in read_results(path).cases
    }


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path):
    data = shared_data_dir() / "counterfact" / "counterfact_dev.json"
    common = ["eval", "--method", "rome", "--data", "counterfact", str(data), "--limit", "3",
              "--no-generation", "--no-progress", "--threads", "1",
              "--hparams", '{"v_num_grad_steps": 4}']  # fmt: skip
    single = tmp_path / "single.jsonl"
    _factedit(*common, "--out", str(single))
    one = read_results(single)
    assert len(one.cases) == 3

    # An interrupted earlier launch (3 processes) left a part file holding the first case:
    # the new launch folds it in and computes only the other two, one per rank.
    dist = tmp_path / "dist.jsonl"
    (tmp_path / "dist.jsonl.rank0-of-3").write_text(
        json.dumps(one.header) + "\n" + json.dumps(one.cases[0]) + "\n", encoding="utf-8"
    )
    proc = _factedit(*common, "--out", str(dist), nproc=2)
    assert proc.stdout.count("| ES |") == 1  # one table, from rank 0
    two = read_results(dist)
    assert two.config == one.config
    assert [c["case_id"] for c in two.cases] == [c["case_id"] for c in one.cases]  # dataset order
    assert _case_lines(dist) == _case_lines(single)
    assert not list(tmp_path.glob("dist.jsonl.rank*"))  # parts merged and removed


def _fake_results(path: Path, ids: list, config: dict | None = None) -> None:
    header = {
        "type": "header",
        "config": config or {"method": "rome", "kind": "counterfact"},
        "notes": [],
    }
    lines = [header] + [
        {
            "type": "case",
            "case_id": i,
            "pre": {"ES": 0.0},
            "post": {"ES": 1.0},
            "seconds": {"case": 1.0},
        }
        for i in ids
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def test_shards_and_merge(tmp_path):
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    cases = list(range(10))
    shards = [shard_cases(cases, k, 3) for k in range(3)]
    assert sorted(sum(shards, [])) == cases and shards[1] == [1, 4, 7]

    _fake_results(tmp_path / "a.jsonl", [1, 4, 7])
    _fake_results(tmp_path / "b.jsonl", [0, 3, 6, 9, 4])  # case 4 twice
    merged = merge_results([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m.jsonl")
    assert [c["case_id"] for c in merged.cases] == [0, 1, 3, 4, 6, 7, 9]
    assert [c["case_id"] for c in read_results(tmp_path / "m.jsonl").cases] == [0, 1, 3, 4, 6, 7, 9]

    _fake_results(tmp_path / "c.jsonl", [2], config={"method": "ft", "kind": "counterfact"})
    from factedit.evaluate.runner import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="method"):
        merge_results([tmp_path / "a.jsonl", tmp_path / "c.jsonl"], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_merge_command(tmp_path, capsys):
    from factedit.cli import main

    _fake_results(tmp_path / "a.jsonl", [2, 0])
    _fake_results(tmp_path / "b.jsonl", [1])
    out = tmp_path / "m.jsonl"
    assert (
        main(["merge", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(out)])
        == 0
    )
    assert [c["case_id"] for c in read_results(out).cases] == [0, 1, 2]
    assert "| ES |" in capsys.readouterr().out
    # An existing output that is not an input is not silently replaced.
    assert main(["merge", str(tmp_path / "a.jsonl"), "--out", str(out)]) == 2
    assert len(read_results(out).cases) == 3
