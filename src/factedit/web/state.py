"""What one ``factedit serve`` process holds: the model, the edits applied to it, running jobs.

Concurrency model: one :class:`threading.Lock` guards the model. Every operation that reads
or writes weights (edits, reverts, uploads, generation, tracing, the logit lens, downloads)
takes it for its whole duration, so changes run one at a time in arrival order and no reader
sees a half-applied edit. Long operations (edits, traces) run as background :class:`Job` s
that the page polls for progress; the list of edits has its own short lock so the page can
read it while a long job holds the model.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import describe
from ..demo import EXAMPLES
from ..generation import generate, logit_lens
from ..methods import EditContext, available_methods, edit, get_method
from ..requests import EditRequest
from ..saving import AppliedEdit, apply_edit, combine_edits, load_edit, save_edit
from ..scoring import target_prob
from ..tracing import KINDS, CausalTracer

log = logging.getLogger(__name__)

#: Limits on what one request may ask for (the server is for one person's exploration).
MAX_TEST_PROMPTS = 10
MAX_NEW_TOKENS = 100
DEFAULT_NEW_TOKENS = 30
MAX_PROMPT_CHARS = 500
MAX_UPLOAD_BYTES = 256 * 1024 * 1024
MAX_TRACE_SAMPLES = 50
#: Finished jobs kept for polling; older ones are forgotten.
KEEP_JOBS = 50


class WebInputError(ValueError):
    """Input the server refuses; the message is shown on the page. Nothing was changed."""


class NotFoundError(LookupError):
    """An unknown job or edit id."""


@dataclass
class Job:
    """A long operation the page polls: status, a phase label, progress counts, the result."""

    id: str
    kind: str
    status: str = "queued"  # queued, running, done, error
    phase: str = "waiting for the model"
    done: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        now = time.time()
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "elapsed": (self.finished or now) - (self.started or now),
            "waited": (self.started or now) - self.created,
            "result": self.result,
            "error": self.error,
        }


@dataclass
class EditEntry:
    """One edit in place: made on the page (an ``EditResult``) or uploaded (an ``AppliedEdit``)."""

    id: str
    source: str  # "edit" or "upload"
    handle: Any  # EditResult or AppliedEdit: both have .restore(), .original, .requests via saved
    method: str
    requests: list[EditRequest]
    params: list[str]
    created: float = field(default_factory=time.time)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    filename: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "method": self.method,
            "requests": [
                {"prompt": r.text, "subject": r.subject, "target": r.target_new}
                for r in self.requests
            ],
            "params": self.params,
            "filename": self.filename,
            "created": self.created,
            "diagnostics": self.diagnostics,
        }


def _text(payload: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = payload.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise WebInputError(f"{key} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise WebInputError(f"{key.replace('_', ' ')} is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise WebInputError(f"{key} is longer than {MAX_PROMPT_CHARS} characters")
    return value


def _int(payload: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = payload.get(key, default)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise WebInputError(f"{key} must be a whole number, got {value!r}") from None
    if not lo <= number <= hi:
        raise WebInputError(f"{key} must be between {lo} and {hi}, got {number}")
    return number


class ServerState:
    """The model of one server and everything done to it.

    Guarantees: weight-changing operations run one at a time; a failed or refused operation
    leaves the weights as they were; reverting restores the weights bit-for-bit (edits are
    undone newest first, each putting back the exact values it found).
    """

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        *,
        model_name: str = "",
        max_waiting: int = 8,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.tok = tok
        self.arch = describe(model)
        self.model_name = model_name or _model_label(model)
        self.progress = progress
        self.model_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._edits: list[EditEntry] = []
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        # Generations keyed on (edits in place, prompts, tokens): the weights are determined by
        # the loaded model and the edits in place, since only this object changes them.
        self._generations: OrderedDict[tuple, list[str]] = OrderedDict()
        self._max_waiting = max_waiting
        self._closed = False
        # One context for every edit of this server: statistics and context templates are read
        # once and kept in its memo (used only under model_lock).
        self._context = EditContext(progress=progress)

    def close(self) -> None:
        """Stop accepting jobs. The model keeps its edits; a job still running goes on in its
        (daemon) thread, which does not keep the process alive: stopping the server with Ctrl-C
        is prompt, and nothing is lost since edits live in memory only."""
        self._closed = True

    def busy(self) -> bool:
        """Whether a job is queued or running."""
        with self._state_lock:
            return any(j.status in ("queued", "running") for j in self._jobs.values())

    def _submit(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        if self._closed:
            raise WebInputError("the server is shutting down")
        with self._state_lock:
            waiting = sum(j.status in ("queued", "running") for j in self._jobs.values())
        if waiting > self._max_waiting:
            with self._state_lock:
                self._jobs.pop(job.id, None)
            raise WebInputError(
                f"the server is busy: {waiting - 1} requests are running or waiting for the "
                "model; try again when they have finished"
            )
        threading.Thread(
            target=self._run_job, args=(job, work), name=f"factedit-web-{job.kind}", daemon=True
        ).start()

    # ---- information ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        ex = EXAMPLES["steve-jobs"]
        return {
            "model": self.model_name,
            "layers": self.arch.n_layers,
            "methods": available_methods(),
            "default_method": "rome",
            "example": {
                "prompt": ex.request["prompt"],
                "subject": ex.request["subject"],
                "target": ex.request["target_new"]["str"],
                "test_prompts": ex.generation_prompts,
            },
            "limits": {
                "test_prompts": MAX_TEST_PROMPTS,
                "max_new_tokens": MAX_NEW_TOKENS,
                "upload_bytes": MAX_UPLOAD_BYTES,
                "trace_samples": MAX_TRACE_SAMPLES,
            },
        }

    def edits(self) -> list[dict[str, Any]]:
        """The edits in place, oldest first."""
        with self._state_lock:
            return [e.to_dict() for e in self._edits]

    def job(self, job_id: str) -> dict[str, Any]:
        with self._state_lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r} (finished jobs are kept for a while only)")
            return job.to_dict()

    def _new_job(self, kind: str) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind)
        with self._state_lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.status in ("done", "error")]
            for old in finished[: max(0, len(finished) - KEEP_JOBS)]:
                del self._jobs[old.id]
        return job

    def _run_job(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        try:
            job.result = work(job)
            job.status = "done"
        except Exception as exc:  # every failure becomes a message on the page
            if not isinstance(exc, (ValueError, LookupError, RuntimeError)):
                log.exception("job %s failed", job.id)
            job.error = str(exc) or type(exc).__name__
            job.status = "error"
        finally:
            job.finished = time.time()

    def _start(self, job: Job) -> None:
        job.started = time.time()
        job.status = "running"

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy generations of the model as it is now, cached. Caller holds model_lock."""
        with self._state_lock:
            key = (tuple(e.id for e in self._edits), tuple(prompts), max_new_tokens)
            hit = self._generations.get(key)
        if hit is not None:
            return list(hit)
        texts = generate(self.model, self.tok, prompts, max_new_tokens=max_new_tokens)
        with self._state_lock:
            self._generations[key] = list(texts)
            while len(self._generations) > 64:
                self._generations.popitem(last=False)
        return texts

    def warm_up(self) -> str:
        """Queue the unedited model's generations for the example's test prompts (the page's
        defaults), so the first edit shows its "before" column without generating it; return
        the job id."""
        prompts = list(EXAMPLES["steve-jobs"].generation_prompts)

        def work(job: Job) -> dict[str, Any]:
            with self.model_lock:
                self._start(job)
                job.phase = "generating the example's test prompts"
                self._generate(prompts, DEFAULT_NEW_TOKENS)
            return {"prompts": prompts}

        job = self._new_job("warm-up")
        self._submit(job, work)
        return job.id

    # ---- editing -------------------------------------------------------------------------
    def parse_edit(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Validate an edit request from the page; raise :class:`WebInputError` naming the problem."""
        prompt = _text(payload, "prompt")
        subject = _text(payload, "subject")
        target = _text(payload, "target")
        method = _text(payload, "method", required=False).strip() or "rome"
        prompts_raw = payload.get("test_prompts") or []
        if isinstance(prompts_raw, str):
            prompts_raw = prompts_raw.splitlines()
        if not isinstance(prompts_raw, list) or not all(isinstance(p, str) for p in prompts_raw):
            raise WebInputError("test prompts must be a list of texts")
        prompts = [p.strip() for p in prompts_raw if p.strip()]
        if len(prompts) > MAX_TEST_PROMPTS:
            raise WebInputError(f"at most {MAX_TEST_PROMPTS} test prompts, got {len(prompts)}")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise WebInputError(f"a test prompt is longer than {MAX_PROMPT_CHARS} characters")
        max_new = _int(payload, "max_new_tokens", DEFAULT_NEW_TOKENS, 1, MAX_NEW_TOKENS)
        hparams = payload.get("hparams")
        if hparams is not None and not isinstance(hparams, dict):
            raise WebInputError("hparams must be a JSON object of overrides")
        if "{}" not in prompt:
            hint = ""
            if subject.strip() and subject in prompt:
                hint = f" (did you mean {prompt.replace(subject, '{}', 1)!r}?)"
            raise WebInputError(
                f"the prompt template must contain {{}} where the subject goes{hint}"
            )
        try:
            request = EditRequest(prompt, subject, target)
            request.check_tokenizer(self.tok)
            get_method(method)  # unknown or unavailable methods are refused before queueing
        except (ValueError, LookupError, RuntimeError) as exc:
            # Bad requests, unknown methods, methods that need training first: all refused
            # before anything is queued.
            raise WebInputError(str(exc)) from None
        if not prompts:
            prompts = [request.text]
        return {
            "request": request,
            "method": method,
            "prompts": prompts,
            "max_new_tokens": max_new,
            "hparams": hparams,
        }

    def submit_edit(self, payload: Mapping[str, Any]) -> str:
        """Validate and queue an edit; return the job id. Raises :class:`WebInputError`."""
        spec = self.parse_edit(payload)
        job = self._new_job("edit")
        self._submit(job, lambda j: self._do_edit(j, **spec))
        return job.id

    def _do_edit(
        self,
        job: Job,
        *,
        request: EditRequest,
        method: str,
        prompts: list[str],
        max_new_tokens: int,
        hparams: dict[str, Any] | None,
    ) -> dict[str, Any]:
        with self.model_lock:
            self._start(job)
            job.total = 4
            job.phase = "target probability and generations before the edit"
            p_before = float(
                target_prob(self.model, self.tok, [request.text], [request.target_text])[0]
            )
            before = self._generate(prompts, max_new_tokens)
            job.done, job.phase = 1, f"editing with {method}"
            t0 = time.perf_counter()
            with _phases_to(job, f"editing with {method}"):
                result = edit(
                    self.model, self.tok, [request], method=method, hparams=hparams,
                    arch=self.arch, context=self._context,
                )  # fmt: skip
            seconds = time.perf_counter() - t0
            try:
                job.done, job.phase = 2, "target probability and generations after the edit"
                p_after = float(
                    target_prob(self.model, self.tok, [request.text], [request.target_text])[0]
                )
                after = generate(self.model, self.tok, prompts, max_new_tokens=max_new_tokens)
                job.done, job.phase = 3, "recording the edit"
                entry = EditEntry(
                    id=f"e{next(self._ids)}",
                    source="edit",
                    handle=result,
                    method=result.method,
                    requests=list(result.requests),
                    params=sorted(result.original),
                    diagnostics=_plain(result.diagnostics),
                )
                with self._state_lock:
                    self._edits.append(entry)
                    key = (tuple(e.id for e in self._edits), tuple(prompts), max_new_tokens)
                    self._generations[key] = list(after)
            except BaseException:
                result.restore()  # the page never learnt of this edit: do not leave it in place
                raise
            job.done, job.phase = 4, "done"
        return {
            "edit": entry.to_dict(),
            "prompt": request.text,
            "target": request.target_new,
            "method": result.method,
            "target_prob_before": p_before,
            "target_prob_after": p_after,
            "seconds": seconds,
            "timings": _plain(result.timings),
            "generations": [
                {
                    "prompt": p,
                    "original": b[len(p) :] if b.startswith(p) else b,
                    "edited": a[len(p) :] if a.startswith(p) else a,
                }
                for p, b, a in zip(prompts, before, after, strict=True)
            ],  # fmt: skip
        }

    # ---- reverting -----------------------------------------------------------------------
    def revert(self, edit_id: str) -> list[str]:
        """Revert ``edit_id`` and every edit applied after it, newest first; return their ids."""
        with self.model_lock:
            with self._state_lock:
                ids = [e.id for e in self._edits]
            if edit_id not in ids:
                raise NotFoundError(f"no edit {edit_id!r} in place (already reverted?)")
            return self._revert_from(ids.index(edit_id))

    def revert_all(self) -> list[str]:
        """Revert every edit in place, newest first; return their ids."""
        with self.model_lock:
            return self._revert_from(0)

    def _revert_from(self, index: int) -> list[str]:
        # Caller holds model_lock. Newest first: each edit's saved originals are the weights
        # it found, so undoing in reverse order restores every earlier state exactly.
        reverted = []
        with self._state_lock:
            doomed = list(reversed(self._edits[index:]))
        for entry in doomed:
            entry.handle.restore()
            with self._state_lock:
                self._edits.remove(entry)
            reverted.append(entry.id)
        return reverted

    # ---- saving and loading --------------------------------------------------------------
    def download(self) -> bytes:
        """All edits in place as one saved-edit file (safetensors bytes)."""
        with self.model_lock:
            with self._state_lock:
                handles = [e.handle for e in self._edits]
            if not handles:
                raise WebInputError("there are no edits in place to download")
            combined = combine_edits(handles)
            with tempfile.TemporaryDirectory(prefix="factedit-web-") as tmp:
                path = save_edit(combined, Path(tmp) / "edits.safetensors")
                return path.read_bytes()

    def upload(self, data: bytes, filename: str = "upload.safetensors") -> dict[str, Any]:
        """Apply a saved edit given as file bytes; return its entry. A file that cannot be read
        or does not fit this model (another base model, or other edits in place) is refused with
        :class:`WebInputError` and the model is unchanged."""
        from ..saving import BaseModelMismatchError, EditFileError

        if not data:
            raise WebInputError("the uploaded file is empty")
        if len(data) > MAX_UPLOAD_BYTES:
            raise WebInputError(f"the uploaded file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        name = Path(filename or "upload.safetensors").name
        with tempfile.TemporaryDirectory(prefix="factedit-web-") as tmp:
            path = Path(tmp) / "upload.safetensors"
            path.write_bytes(data)
            try:
                saved = load_edit(path)
            except EditFileError as exc:
                raise WebInputError(str(exc).replace(str(path), repr(name))) from None
        saved.path = None
        with self.model_lock:
            try:
                applied: AppliedEdit = apply_edit(self.model, saved)
            except BaseModelMismatchError as exc:
                raise WebInputError(f"{name} does not fit this model: {exc}") from None
            entry = EditEntry(
                id=f"e{next(self._ids)}",
                source="upload",
                handle=applied,
                method=saved.method,
                requests=list(saved.requests),
                params=saved.params,
                filename=name,
            )
            with self._state_lock:
                self._edits.append(entry)
        return entry.to_dict()

    # ---- looking inside ------------------------------------------------------------------
    def lens(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The logit lens at the prompt's last position (every layer, top-k tokens)."""
        prompt = _text(payload, "prompt")
        top_k = _int(payload, "top_k", 5, 1, 20)
        with self.model_lock:
            rows = logit_lens(self.model, self.tok, prompt, top_k=top_k, arch=self.arch)
            n_edits = len(self._edits)
        return {
            "prompt": prompt,
            "edits_in_place": n_edits,
            "rows": [{"layer": r.layer, "tokens": r.tokens, "probs": r.probs} for r in rows],
        }

    def generate(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Greedy continuations of prompts by the model as it is now."""
        raw = payload.get("prompts")
        if (
            not isinstance(raw, list)
            or not raw
            or not all(isinstance(p, str) and p.strip() for p in raw)
        ):
            raise WebInputError("prompts must be a non-empty list of non-empty texts")
        if len(raw) > MAX_TEST_PROMPTS:
            raise WebInputError(f"at most {MAX_TEST_PROMPTS} prompts, got {len(raw)}")
        max_new = _int(payload, "max_new_tokens", DEFAULT_NEW_TOKENS, 1, MAX_NEW_TOKENS)
        with self.model_lock:
            texts = self._generate(list(raw), max_new)
        return {"generations": texts}

    def parse_trace(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        prompt = _text(payload, "prompt").rstrip()
        subject = _text(payload, "subject")
        if subject not in prompt:
            raise WebInputError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
        answer = _text(payload, "answer", required=False).strip() or None
        samples = _int(payload, "samples", 10, 1, MAX_TRACE_SAMPLES)
        window = _int(payload, "window", 10, 1, self.arch.n_layers)
        kinds = payload.get("kinds") or list(KINDS)
        if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds):
            raise WebInputError(f"kinds must be some of {list(KINDS)}")
        return {"prompt": prompt, "subject": subject, "answer": answer, "samples": samples,
                "window": window, "kinds": kinds}  # fmt: skip

    def submit_trace(self, payload: Mapping[str, Any]) -> str:
        """Validate and queue a causal trace; return the job id."""
        spec = self.parse_trace(payload)
        job = self._new_job("trace")
        self._submit(job, lambda j: self._do_trace(j, **spec))
        return job.id

    def _do_trace(
        self,
        job: Job,
        *,
        prompt: str,
        subject: str,
        answer: str | None,
        samples: int,
        window: int,
        kinds: Sequence[str],
    ) -> dict[str, Any]:
        results = []
        with self.model_lock:
            self._start(job)
            job.phase = "clean run and noise"
            tracer = CausalTracer(
                self.model, self.tok, prompt, subject, answer, samples=samples,
                allow_any_answer=answer is not None, arch=self.arch,
            )  # fmt: skip
            n_edits = len(self._edits)
            for i, kind in enumerate(kinds):
                job.phase = f"restoring {kind} states ({i + 1} of {len(kinds)})"

                def report(done: int, total: int, i: int = i) -> None:
                    # Every kind has the same number of cells: total for all = total * kinds.
                    job.total = total * len(kinds)
                    job.done = i * total + done

                results.append(tracer.trace(kind, window, on_progress=report))
        job.phase = "drawing the heatmaps"
        images = {r.kind: _heatmap_png(r) for r in results}
        first = results[0]
        return {
            "prompt": prompt,
            "subject": subject,
            "answer": first.answer,
            "clean_prob": first.clean_prob,
            "corrupt_prob": first.corrupt_prob,
            "tokens": first.tokens,
            "subject_range": list(first.subject_range),
            "edits_in_place": n_edits,
            "kinds": [
                {
                    "kind": r.kind,
                    "window": r.window,
                    "image": images[r.kind],
                    "grid": r.grid.tolist(),
                    "layers": r.layers,
                }
                for r in results
            ],  # fmt: skip
        }


class _PhaseHandler(logging.Handler):
    """Shows an edit's phases (the ``factedit.phases`` log) as its job's phase."""

    def __init__(self, job: Job, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.job, self.prefix, self.thread = job, prefix, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:  # only the edit this job runs
            self.job.phase = f"{self.prefix}: {record.getMessage()}"


@contextlib.contextmanager
def _phases_to(job: Job, prefix: str) -> Iterator[None]:
    # Called under model_lock, so no other edit changes the logger meanwhile.
    logger = logging.getLogger("factedit.phases")
    handler = _PhaseHandler(job, prefix)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the page shows them; the server's log stays quiet
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _model_label(model: nn.Module) -> str:
    """A short name for the page: the config's name, or the last part of a local path."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name).name if Path(name).is_absolute() else name or type(model).__name__


def _heatmap_png(result: Any) -> str:
    """A ``data:`` URL of the trace's heatmap, drawn by :func:`factedit.trace_plot.plot_trace`."""
    from matplotlib.figure import Figure

    from ..trace_plot import plot_trace

    # A bare Figure (no pyplot): no global figure registry, safe from worker threads.
    fig = Figure(figsize=(3.5 + 0.12 * len(result.layers), 0.8 + 0.3 * len(result.tokens)))
    ax = fig.subplots()
    plot_trace(result, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(value: Any) -> Any:
    """JSON-ready copy of diagnostics/timings (tensors and numpy scalars to numbers)."""
    import json

    return json.loads(
        json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )
