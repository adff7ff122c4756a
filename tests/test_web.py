"""``factedit serve`` at the HTTP level: the page, bad input, uploads, lens, tracing, and two
clients editing at once. A real server (uvicorn in a thread) on the real default model."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from conftest import assert_weights_equal, make_tiny_model
from edit_helpers import rank_one, synthetic_edit
from factedit.arch import describe
from factedit.cli import main
from factedit.hooks import get_parameter
from factedit.methods.base import materialize
from factedit.web import ServerState, bind, running_server
from web_helpers import SEED, call, upload, wait_job


@pytest.fixture(scope="module")
def server(model, tok, pristine_state):
    state = ServerState(model, tok, model_name="SmolLM2-135M-Instruct")
    with running_server(state) as url:
        yield url, state
    state.close()
    state.revert_all()
    assert_weights_equal(model, pristine_state)


def test_page_is_served_locally_with_no_outside_resources(server):
    url, _ = server
    status, html, headers = call(url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    page = html.decode()
    for name in ("app.js", "style.css"):
        assert f"/static/{name}" in page
        s, body, _ = call(f"{url}/static/{name}")
        assert s == 200 and len(body) > 500
        page += body.decode()
    # No CDN, web font, analytics or any absolute URL: everything comes from this server.
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, re.I), (
        "outside URL on the page"
    )
    assert "@import" not in page and "@font-face" not in page
    assert call(url + "/static/../pyproject.toml")[0] == 404
    status, info, _ = call(url + "/api/info")
    assert "rome" in info["methods"] and info["layers"] == 30


BAD_EDITS = [
    ({**SEED, "prompt": "Steve Jobs was the founder of"}, "must contain {}"),
    ({**SEED, "subject": "  "}, "subject is empty"),
    ({**SEED, "target": ""}, "target is empty"),
    ({**SEED, "method": "no-such-method"}, "unknown editing method"),
    ({**SEED, "prompt": "{} and {} founded"}, "exactly one"),
    ({**SEED, "test_prompts": ["x"] * 11}, "at most 10"),
    ({**SEED, "max_new_tokens": "many"}, "whole number"),
]


@pytest.mark.parametrize(("body", "message"), BAD_EDITS, ids=[m for _, m in BAD_EDITS])
def test_bad_edit_is_refused_with_a_message(server, model, pristine_state, body, message):
    url, state = server
    status, payload, _ = call(url + "/api/edit", body)
    assert status == 400
    assert message in payload["error"]
    assert state.edits() == []
    assert_weights_equal(model, pristine_state)


def test_untrained_learned_editor_shows_its_message(server, model, pristine_state):
    """MEND needs a trained editor: without one the page gets its message, the model is unchanged."""
    url, state = server
    status, payload, _ = call(
        url + "/api/edit",
        {**SEED, "method": "mend", "test_prompts": ["Steve Jobs worked for"], "max_new_tokens": 2},
    )
    if status == 400:
        assert payload["error"]
    else:
        job = wait_job(url, payload["job"])
        if job["status"] == "error":
            assert "train" in job["error"], job["error"]
        else:  # a trained MEND editor is in this machine's cache: then it edits like any method
            assert state.edits() and call(url + "/api/revert-all", {})[0] == 200
    assert state.edits() == []
    assert_weights_equal(model, pristine_state)


def test_malformed_bodies_get_messages(server):
    url, _ = server
    status, payload, _ = call(
        url + "/api/edit", raw=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "not valid JSON" in payload["error"]
    status, payload, _ = call(url + "/api/edit", [1, 2])
    assert status == 400 and "JSON object" in payload["error"]
    status, payload, _ = call(url + "/api/jobs/nope")
    assert status == 404 and "no job" in payload["error"]
    status, payload, _ = call(url + "/api/edits/e999/revert", {})
    assert status == 404 and "no edit" in payload["error"]
    status, payload, _ = call(url + "/api/edits.safetensors")
    assert status == 400 and "no edits in place" in payload["error"]


def test_bad_uploads_are_refused_and_change_nothing(server, model, tok, pristine_state, tmp_path):
    url, state = server
    status, payload = upload(url, "garbage.safetensors", b"this is not a safetensors file")
    assert status == 400 and "garbage.safetensors" in payload["error"]
    assert "not a readable safetensors file" in payload["error"]
    status, payload = upload(url, "empty.safetensors", b"")
    assert status == 400 and "empty" in payload["error"]

    # A valid edit of another base model (a tiny Llama): refused, naming the parameter.
    tiny = make_tiny_model("llama")
    path = synthetic_edit(tiny, [rank_one(tiny, 0, seed=1)]).save(tmp_path / "tiny.safetensors")
    status, payload = upload(url, "tiny.safetensors", path.read_bytes())
    assert status == 400 and "does not fit this model" in payload["error"]
    assert "model.layers.0.mlp.down_proj.weight" in payload["error"]

    # A corrupted copy of a real edit (one payload byte flipped): the sha256 catches it.
    result = synthetic_edit(model, [rank_one(model, 4, seed=2, scale=1e-3)])
    good = result.save(tmp_path / "real.safetensors").read_bytes()
    result.restore()
    bad = bytearray(good)
    bad[-3] ^= 0xFF
    status, payload = upload(url, "real.safetensors", bytes(bad))
    assert status == 400 and "corrupted" in payload["error"]
    assert state.edits() == []
    assert_weights_equal(model, pristine_state)

    # The intact file applies, shows in the list, and reverts exactly.
    status, payload = upload(url, "real.safetensors", good)
    assert status == 200 and payload["edit"]["source"] == "upload"
    assert [e["filename"] for e in state.edits()] == ["real.safetensors"]
    name = describe(model).mlp_out_weight_name(4)
    assert not torch.equal(get_parameter(model, name), pristine_state[name])
    status, payload, _ = call(f"{url}/api/edits/{payload['edit']['id']}/revert", {})
    assert status == 200 and payload["edits"] == []
    assert_weights_equal(model, pristine_state)


def test_other_sites_cannot_drive_the_model(server, model, pristine_state):
    """A page of another origin open in the same browser, or a DNS-rebound name, is refused."""
    url, state = server
    status, payload, _ = call(url + "/api/edit", SEED, headers={"Origin": "http://evil.example"})
    assert status == 403 and "not accepted" in payload["error"]
    status, payload, _ = call(
        url + "/api/revert-all", {}, headers={"Origin": "http://evil.example"}
    )
    assert status == 403
    status, payload, _ = call(url + "/api/info", headers={"Host": "evil.example"})
    assert status == 403 and "only to 127.0.0.1" in payload["error"]
    port = url.rsplit(":", 1)[1]
    status, payload, _ = call(url + "/api/info", headers={"Host": f"localhost:{port}"})
    assert status == 200
    assert state.edits() == []
    assert_weights_equal(model, pristine_state)


def test_logit_lens_table(server, model, tok):
    url, _ = server
    status, r, _ = call(url + "/api/lens", {"prompt": "The Eiffel Tower is located in the city of"})
    assert status == 200 and len(r["rows"]) == 30
    enc = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0, -1], -1)
    top = probs.topk(5)
    last = r["rows"][-1]
    assert last["tokens"] == [tok.decode([i]) for i in top.indices.tolist()]
    assert last["probs"] == pytest.approx(top.values.tolist(), abs=1e-5)
    status, r, _ = call(url + "/api/lens", {"prompt": ""})
    assert status == 400 and "prompt is empty" in r["error"]
    status, r, _ = call(
        url + "/api/generate",
        {"prompts": ["The Eiffel Tower is located in the city of"], "max_new_tokens": 3},
    )
    assert status == 200 and r["generations"][0].startswith(
        "The Eiffel Tower is located in the city of "
    )
    continuation = r["generations"][0].split(" of ", 1)[1]  # greedy: the lens' top token first
    assert continuation.startswith(tok.decode([top.indices[0].item()]).strip())
    status, r, _ = call(url + "/api/generate", {"prompts": []})
    assert status == 400 and "non-empty list" in r["error"]


def test_trace_job_reports_progress_and_draws_three_heatmaps(server):
    url, _ = server
    status, r, _ = call(
        url + "/api/trace", {"prompt": "The Space Needle is located in", "subject": "The Moon"}
    )
    assert status == 400 and "does not occur in the prompt" in r["error"]
    body = {"prompt": "Paris is the capital of", "subject": "Paris", "samples": 2}
    status, r, _ = call(url + "/api/trace", body)
    assert status == 200
    job = wait_job(url, r["job"])
    assert job["status"] == "done", job["error"]
    res = job["result"]
    assert [k["kind"] for k in res["kinds"]] == ["hidden", "mlp", "attn"]
    for k in res["kinds"]:
        assert k["image"].startswith("data:image/png;base64,") and len(k["image"]) > 2000
        assert len(k["grid"]) == len(res["tokens"]) and len(k["grid"][0]) == 30
    assert res["clean_prob"] > res["corrupt_prob"]
    # Progress went up to the total (cells of all three kinds).
    done = [(d, t) for s, _, d, t in job["seen"] if s == "running" and t]
    assert done and all(d <= t for d, t in done)
    assert job["done"] == job["total"] > 0


def test_serve_command_reports_a_taken_port(capsys):
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    finally:
        sock.close()
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_two_clients_editing_at_once_leave_the_model_consistent(server, model, tok, pristine_state):
    """Two edits submitted at the same moment (two threads, two HTTP clients) while a third
    client keeps reading the logit lens: each edit is applied exactly once, one after the other;
    every read sees a whole state (before, after one edit, after both); reverts are exact."""
    url, state = server
    name = describe(model).mlp_out_weight_name(4)
    requests = [
        {**SEED, "test_prompts": ["Steve Jobs worked for"], "max_new_tokens": 5},
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome",
         "test_prompts": ["The Eiffel Tower is in"], "max_new_tokens": 5},
    ]  # fmt: skip
    barrier = threading.Barrier(3)
    jobs: list = [None, None]
    reads: list = []
    stop = threading.Event()

    def submit(i: int) -> None:
        barrier.wait()
        status, r, _ = call(url + "/api/edit", requests[i])
        assert status == 200, r
        jobs[i] = wait_job(url, r["job"])

    def reader() -> None:
        barrier.wait()
        while not stop.is_set():
            status, r, _ = call(
                url + "/api/lens", {"prompt": "Steve Jobs was the founder of", "top_k": 3}
            )
            assert status == 200
            reads.append((tuple(r["rows"][-1]["tokens"]), tuple(r["rows"][-1]["probs"])))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    lens_thread = threading.Thread(target=reader)
    for t in [*threads, lens_thread]:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    lens_thread.join(timeout=60)
    assert all(j is not None and j["status"] == "done" for j in jobs), jobs
    for j in jobs:
        assert j["result"]["target_prob_after"] > 0.5 > j["result"]["target_prob_before"]
    # The progress line named the edit's own phases (from the factedit.phases log).
    phases = {p for j in jobs for _, p, _, _ in j["seen"]}
    assert any(p.startswith("editing with rome: value optimisation") for p in phases), phases

    # Exactly two edits in place, applied one after the other on top of each other.
    entries = list(state._edits)
    assert len(entries) == 2 and {e.requests[0].target_new for e in entries} == {
        "Microsoft",
        "Rome",
    }
    first, second = (e.handle for e in entries)
    assert torch.equal(first.original[name], pristine_state[name])
    expected = pristine_state[name].clone()
    for result in (first, second):
        for step in result.steps:
            expected.add_(materialize(step[name]).to(expected.dtype))
        if result is first:
            assert torch.equal(second.original[name], expected)
    assert torch.equal(get_parameter(model, name), expected)  # each delta added exactly once

    # Every concurrent read saw a whole state: before, after the first edit, or after both.
    lens = lambda: (lambda r: (tuple(r["rows"][-1]["tokens"]), tuple(r["rows"][-1]["probs"])))(  # noqa: E731
        call(url + "/api/lens", {"prompt": "Steve Jobs was the founder of", "top_k": 3})[1]
    )
    both = lens()
    status, data, _ = call(url + "/api/edits.safetensors")
    assert status == 200 and data[:8] != b"{"  # safetensors bytes
    status, r, _ = call(f"{url}/api/edits/{entries[1].id}/revert", {})
    assert status == 200 and r["reverted"] == [entries[1].id]
    after_first = lens()
    status, r, _ = call(url + "/api/revert-all", {})
    assert status == 200 and len(r["reverted"]) == 1 and r["edits"] == []
    assert_weights_equal(model, pristine_state)
    before = lens()
    assert reads  # the reader waits for the lock like everyone: under load it may read once
    assert set(reads) <= {before, after_first, both}, "a read saw a half-applied edit"

    # The downloaded file holds both edits: applied to the base model it reproduces them exactly.
    status, payload = upload(url, "both.safetensors", data)
    assert status == 200, payload
    assert [r["target"] for r in payload["edit"]["requests"]] == [
        e.requests[0].target_new for e in entries
    ]
    assert torch.equal(get_parameter(model, name), expected)
    status, payload = upload(url, "both.safetensors", data)  # on top of itself: refused
    assert status == 400 and "does not fit this model" in payload["error"]
    call(url + "/api/revert-all", {})
    assert_weights_equal(model, pristine_state)


def test_serve_command_serves_the_page_until_interrupted():
    """``factedit serve --port 0`` in a subprocess: it says where it listens, serves the page
    and the API, and stops cleanly on Ctrl-C (SIGINT)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "factedit", "serve", "--port", "0", "--threads", "1"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    try:
        url = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)/", line)
            url = m.group(1) if m else None
        assert url, "factedit serve did not say where it listens"
        status, html, _ = call(url + "/")
        assert status == 200 and b"factedit" in html
        status, info, _ = call(url + "/api/info")
        assert status == 200 and info["model"] == "SmolLM2-135M-Instruct"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
