"""Helpers for the web page's tests: HTTP calls with the standard library, job polling."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

SEED = {"prompt": "{} was the founder of", "subject": "Steve Jobs", "target": "Microsoft"}


def call(url: str, body: Any = None, *, raw: bytes | None = None, headers: dict | None = None,
         method: str | None = None) -> tuple[int, Any, dict]:  # fmt: skip
    """``(status, parsed JSON or bytes, headers)`` of a request; JSON body when ``body`` is given."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            status, payload, rh = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, payload, rh = e.code, e.read(), dict(e.headers)
    if rh.get("content-type", "").startswith("application/json"):
        payload = json.loads(payload)
    return status, payload, rh


def wait_job(url: str, job_id: str, timeout: float = 600) -> dict:
    """Poll a job until it ends; return its final state (records the progress seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job, _ = call(f"{url}/api/jobs/{job_id}")
        assert status == 200, job
        seen.append((job["status"], job["phase"], job["done"], job["total"]))
        if job["status"] in ("done", "error"):
            job["seen"] = seen
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s; last: {seen[-1:]}")


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    """A multipart/form-data body with one file field."""
    boundary = "----factedit-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(url: str, filename: str, data: bytes) -> tuple[int, Any]:
    body, headers = multipart("file", filename, data)
    status, payload, _ = call(f"{url}/api/upload", raw=body, headers=headers, method="POST")
    return status, payload
