"""Causal tracing: which hidden states carry a fact (the "locating" half of ROME).

The subject's token embeddings are corrupted with Gaussian noise, and single states from the
clean run are restored into the corrupted run; the probability of the correct answer that comes
back measures that state's *indirect effect* (Meng et al. 2022, section 2.1).

* :func:`trace` traces one prompt for one kind of state and returns a :class:`TraceResult`
  holding a ``(tokens x layers)`` grid of restored probabilities.
* :class:`CausalTracer` does the work: one clean run per prompt (it records block, MLP and
  attention outputs at once, so every kind reuses it), one fixed set of noise samples drawn
  from a seeded generator, and restorations batched many cells per forward pass.
* :func:`average_trace` averages indirect effects over many facts (ROME's known-facts format)
  for the paper's token classes, with a resumable JSONL cache of per-fact results.

Kinds: ``"hidden"`` restores one block output per ``(token, layer)`` cell; ``"mlp"`` and
``"attn"`` restore, at one token, a window of ``window`` consecutive MLP / attention outputs
centred on the layer (``max(0, l - window // 2) .. min(L, l + ceil(window / 2))``, as in ROME).

Noise: ``noise`` is a standard deviation. A number (or a numeric string such as ``"0.1"``) is
used as is; ``"sK"`` (default ``"s3"``) means ``K`` times the standard deviation of the input
embedding module's outputs over the whole vocabulary (:func:`embedding_std`; pass ``texts`` to
measure it over a corpus sample instead, as ROME did over its subjects).

Positions before the subject are not affected by the corruption in a causal model, so their
cells are filled with the corrupted probability instead of being computed.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ModelArch, describe
from .fingerprint import json_digest
from .hooks import TraceDict, first_tensor, get_module, with_first_tensor
from .models import model_device, module_device
from .tokens import subject_token_range

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
DEFAULT_NOISE = "s3"

#: The token classes of the paper's averaged figure, in plotting order.
TOKEN_CLASSES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


# ---- noise ---------------------------------------------------------------------------------
@torch.no_grad()
def embedding_std(
    model: nn.Module,
    tok: Any = None,
    texts: Iterable[str] | None = None,
    *,
    arch: ModelArch | None = None,
    chunk: int = 8192,
) -> float:
    """Standard deviation of all elements of the input embedding module's outputs.

    Over every vocabulary id when ``texts`` is ``None``, else over the tokens of ``texts``
    (tokenised with ``tok``). The module itself is applied, so embeddings that scale inside
    the module (Gemma) are measured as the blocks see them. Accumulates in float64.
    """
    arch = arch or describe(model)
    embed = get_module(model, arch.embed)
    device = model_device(model)
    if texts is None:
        n_vocab = embed.weight.shape[0]
        ids = torch.arange(n_vocab)
    else:
        if tok is None:
            raise ValueError("embedding_std over texts needs the tokenizer")
        flat = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
        if not flat:
            raise ValueError("the texts given to embedding_std hold no tokens")
        ids = torch.tensor(flat)
    total, sq, n = 0.0, 0.0, 0
    for s in range(0, len(ids), chunk):
        out = first_tensor(embed(ids[s : s + chunk].to(device)[None])).double()
        total += out.sum().item()
        sq += (out * out).sum().item()
        n += out.numel()
    mean = total / n
    return math.sqrt(max(sq / n - mean * mean, 0.0) * n / max(n - 1, 1))


_SPEC = re.compile(r"^s(\d+(?:\.\d*)?|\.\d+)$")


def resolve_noise(
    noise: float | str | None,
    model: nn.Module,
    tok: Any = None,
    *,
    arch: ModelArch | None = None,
    texts: Iterable[str] | None = None,
) -> float:
    """The noise standard deviation that ``noise`` stands for (see the module docstring).

    Raises:
        ValueError: a negative number or a string that is neither a number nor ``"sK"``.
    """
    if noise is None:
        noise = DEFAULT_NOISE
    if isinstance(noise, bool):
        raise ValueError(f"noise must be a number or a spec such as 's3', not {noise!r}")
    if isinstance(noise, (int, float)):
        value = float(noise)
    else:
        spec = str(noise).strip().lower()
        m = _SPEC.match(spec)
        if m:
            value = float(m.group(1)) * embedding_std(model, tok, texts, arch=arch)
        else:
            try:
                value = float(spec)
            except ValueError:
                raise ValueError(
                    f"noise {noise!r} not understood: give a standard deviation (e.g. 0.1) or "
                    "'sK' for K times the embeddings' standard deviation (e.g. 's3')"
                ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"noise must be a finite, non-negative standard deviation, got {noise!r}")
    return value


# ---- results -------------------------------------------------------------------------------
@dataclass
class TraceResult:
    """One causal trace.

    Attributes:
        grid: ``(len(tokens), len(layers))`` float32 tensor; ``grid[t, j]`` is the mean
            probability of ``answer`` over the corrupted samples when the cell
            ``(token t, layer layers[j])`` is restored from the clean run.
        clean_prob, corrupt_prob: the answer's probability without corruption, and corrupted
            with nothing restored (mean over samples).
        subject_range: ``(start, end)`` token indices of the subject, end exclusive.
        window: how many consecutive layers one cell restores (1 for ``hidden``).
    """

    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    clean_prob: float
    corrupt_prob: float
    grid: torch.Tensor
    kind: str
    window: int
    layers: list[int]
    noise_std: float
    samples: int
    seed: int

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``grid - corrupt_prob``: how much of the answer's probability each cell restores."""
        return self.grid - self.corrupt_prob

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the grid as nested lists); :meth:`from_dict` inverts it."""
        d = asdict(self)
        d["grid"] = self.grid.tolist()
        d["subject_range"] = list(self.subject_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        d = dict(d)
        d["grid"] = torch.tensor(d["grid"], dtype=torch.float32)
        d["subject_range"] = tuple(d["subject_range"])
        return cls(**d)


def _layer_list(layers: Sequence[int], n_layers: int) -> list[int]:
    out = []
    for i in layers:
        i = int(i)
        if not -n_layers <= i < n_layers:
            raise IndexError(f"layer {i} out of range: this model has layers 0..{n_layers - 1}")
        out.append(i % n_layers)
    return out


def _window_layers(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


#: Below this probability, a traced top prediction is warned about (it may not be the fact the
#: user has in mind: "The Space Needle is located in the city of" -> " New", p = 0.12, on the
#: default model).
UNSURE_PROB = 0.3


class AnswerNotPredictedError(ValueError):
    """The given answer is not the model's top prediction after the prompt (tracing it would
    measure how a corruption changes an answer the model does not give). Attributes hold what
    a front end needs to phrase its own message."""

    def __init__(self, prompt: str, answer: str, top: str, top_prob: float, answer_prob: float):
        self.prompt, self.answer, self.top, self.top_prob, self.answer_prob = (
            prompt, answer, top, top_prob, answer_prob,
        )  # fmt: skip
        super().__init__(self.describe("pass allow_any_answer=True"))

    def describe(self, how_to_override: str) -> str:
        """The message, ending with ``how_to_override`` (e.g. ``"give --allow-any-answer"``)."""
        return (
            f"the model does not predict {self.answer!r} after {self.prompt!r}: its top "
            f"prediction is {self.top!r} (p={self.top_prob:.3f}, answer p={self.answer_prob:.3g}); "
            f"{how_to_override} to trace it anyway"
        )


def _answer_token_id(tok: Any, prompt: str, answer: str | int) -> int:
    if isinstance(answer, int):
        return answer
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"answer must be a non-empty string, got {answer!r}")
    # Answers are words that follow the prompt: like edit targets, they get a leading space
    # unless the prompt already ends with one.
    text = answer if answer[0].isspace() or prompt[-1:].isspace() else " " + answer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} maps to no tokens")
    return ids[0]


# ---- the tracer ----------------------------------------------------------------------------
class CausalTracer:
    """Causal tracing of one prompt: a clean run, fixed noise, batched restorations.

    Construction runs the clean forward pass once, recording every block, MLP and attention
    output, and draws ``samples`` noise tensors from ``torch.Generator().manual_seed(seed)``
    (on the CPU, so results do not depend on the device's random generator, and the global
    random state is untouched). The same noise is used for every restoration, so cells are
    compared under identical corruption and equal seeds give identical results.

    Args:
        answer: the answer whose probability is measured; default the model's top prediction.
            Matched by its first token (a leading space is added unless the prompt ends with
            whitespace). An answer that is not the top prediction raises ``ValueError`` unless
            ``allow_any_answer``.
        noise: standard deviation or spec string (see :func:`resolve_noise`).
        samples: corrupted copies per restoration; probabilities are averaged over them.
        batch_size: at most this many rows per forward pass (rounded down to whole cells).

    Raises:
        ValueError: subject not in the prompt, unpredicted answer, bad settings. The model is
            never changed (hooks only, removed on exit).
    """

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        prompt: str,
        subject: str,
        answer: str | int | None = None,
        *,
        noise: float | str | None = DEFAULT_NOISE,
        samples: int = 10,
        seed: int = 0,
        batch_size: int = 128,
        allow_any_answer: bool = False,
        arch: ModelArch | None = None,
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if not isinstance(subject, str) or not subject.strip():
            raise ValueError("subject must be a non-empty string")
        if int(samples) < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tok = model, tok
        self.arch = arch or describe(model)
        self.prompt, self.subject = prompt, subject
        self.samples, self.seed, self.batch_size = int(samples), int(seed), int(batch_size)
        self.subject_range = subject_token_range(tok, prompt, subject)
        self.token_ids: list[int] = list(tok(prompt)["input_ids"])
        self.noise_std = resolve_noise(noise, model, tok, arch=self.arch)
        self._device = model_device(model)
        self._input = torch.tensor([self.token_ids], device=self._device)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

        names = {
            kind: [self.arch.module_name(kind, i) for i in range(self.arch.n_layers)]
            for kind in KINDS
        }
        self._names = names
        self._where = {n: (kind, i) for kind in KINDS for i, n in enumerate(names[kind])}
        with (
            torch.no_grad(),
            TraceDict(model, [n for k in KINDS for n in names[k]], clone=True, detach=True) as td,
        ):
            probs = self._last_probs(self._input)[0]
        # clean[kind]: (layers, tokens, hidden) states of the clean run, on the inputs' device
        # (layers may compute on other devices under a device map).
        self.clean = {
            k: torch.stack([first_tensor(td[n].output)[0].to(self._device) for n in names[k]])
            for k in KINDS
        }
        top = int(probs.argmax())
        #: True when the answer was not given and the model's own top prediction is traced.
        self.answer_is_top_prediction = answer is None
        if answer is None:
            self.answer_id = top
        else:
            self.answer_id = _answer_token_id(tok, prompt, answer)
            if self.answer_id != top and not allow_any_answer:
                raise AnswerNotPredictedError(
                    prompt, str(answer), tok.decode([top]), float(probs[top]),
                    float(probs[self.answer_id]),
                )  # fmt: skip
        self.answer = tok.decode([self.answer_id])
        self.clean_prob = float(probs[self.answer_id])
        if answer is None:
            if self.clean_prob < UNSURE_PROB:
                log.warning(
                    "tracing the model's top prediction %r after %r, but the model is unsure "
                    "(p=%.3f): it may not be the fact you mean; give the expected answer to "
                    "trace it", self.answer, prompt, self.clean_prob,
                )  # fmt: skip
            else:
                log.info(
                    "tracing the model's top prediction %r (p=%.3f)", self.answer, self.clean_prob
                )

        s, e = self.subject_range
        gen = torch.Generator().manual_seed(self.seed)
        noise_t = torch.randn(
            (self.samples, e - s, self.arch.hidden_size), generator=gen, dtype=torch.float32
        )
        self.noise = (noise_t * self.noise_std).to(self._device)
        self.corrupt_prob = float(self.probabilities([[]], kind="hidden")[0])

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def _last_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        kw = {"logits_to_keep": 1} if self._logits_to_keep else {}
        logits = self.model(input_ids=input_ids, use_cache=False, **kw).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def probabilities(
        self, cell_sets: Sequence[Iterable[tuple[int, int]]], kind: str = "hidden"
    ) -> torch.Tensor:
        """The answer's probability in the corrupted run with each set of cells restored.

        ``cell_sets[i]`` is a collection of ``(token, layer)`` pairs; each pair restores the
        clean output of the ``kind`` module of that layer at that token. Returns a float32
        tensor of ``len(cell_sets)`` probabilities, each the mean over the noise samples.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        sets = [list(c) for c in cell_sets]
        n_tok, n_layers = self.n_tokens, self.arch.n_layers
        for cells in sets:
            for t, layer in cells:
                if not (0 <= t < n_tok and 0 <= layer < n_layers):
                    raise IndexError(
                        f"cell {(t, layer)} outside {n_tok} tokens x {n_layers} layers"
                    )
        group = max(1, self.batch_size // self.samples)
        out: list[torch.Tensor] = []
        for start in range(0, len(sets), group):
            out.append(self._run(sets[start : start + group], kind))
        return torch.cat(out) if out else torch.zeros(0)

    def _run(self, sets: list[list[tuple[int, int]]], kind: str) -> torch.Tensor:
        n_sets, k = len(sets), self.samples
        # patches[layer] = (rows, tokens) to overwrite with clean states at that layer.
        patches: dict[int, tuple[list[int], list[int]]] = {}
        for g, cells in enumerate(sets):
            for t, layer in dict.fromkeys(cells):
                rows, toks = patches.setdefault(layer, ([], []))
                rows.extend(range(g * k, (g + 1) * k))
                toks.extend([t] * k)
        index = {}
        for layer, (r, t) in patches.items():
            # Indices and clean states where the patched layer computes, made once per call.
            dev = module_device(get_module(self.model, self._names[kind][layer]))
            toks_t = torch.tensor(t, device=dev)
            clean = self.clean[kind][layer].to(dev)[toks_t]
            index[layer] = (torch.tensor(r, device=dev), toks_t, clean)
        s, e = self.subject_range
        noise = self.noise.repeat(n_sets, 1, 1)
        embed_name = self.arch.embed

        def edit(output: Any, name: str) -> Any:
            h = first_tensor(output)
            if name == embed_name:
                h = h.clone()
                h[:, s:e] += noise.to(h.device, h.dtype)
                return with_first_tensor(output, h)
            rows, toks, clean = index[self._where[name][1]]
            # Out of place: the model may still hold the unpatched tensor (e.g. a residual).
            return with_first_tensor(output, h.index_put((rows, toks), clean))

        names = [embed_name] + [self._names[kind][layer] for layer in sorted(index)]
        with TraceDict(self.model, names, retain_output=False, edit_output=edit):
            probs = self._last_probs(self._input.expand(n_sets * k, -1))
        return probs[:, self.answer_id].view(n_sets, k).mean(dim=1).cpu()

    def grid(
        self,
        kind: str = "hidden",
        window: int = 10,
        *,
        layers: Sequence[int] | None = None,
        progress: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """``(tokens, len(layers))`` restored probabilities (see :class:`TraceResult`).

        ``on_progress(done, total)`` is called after each batch of cells (for front ends that
        show their own progress; ``progress`` draws a tqdm bar)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        if int(window) < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        n_layers = self.arch.n_layers
        layers = (
            list(range(n_layers)) if layers is None else _layer_list(layers, self.arch.n_layers)
        )
        width = 1 if kind == "hidden" else int(window)
        grid = torch.full((self.n_tokens, len(layers)), self.corrupt_prob, dtype=torch.float32)
        # Tokens before the subject see no corruption in a causal model: restoring them is a
        # no-op, so only cells from the subject's first token on are computed.
        cells = [
            (t, j) for t in range(self.subject_range[0], self.n_tokens) for j in range(len(layers))
        ]
        sets = [[(t, w) for w in _window_layers(layers[j], width, n_layers)] for t, j in cells]
        group = max(1, self.batch_size // self.samples)
        chunks = [range(a, min(a + group, len(sets))) for a in range(0, len(sets), group)]
        from tqdm.auto import tqdm

        bar = tqdm(chunks, desc=f"trace {kind}", unit="batch", disable=not progress, leave=False)
        if on_progress is not None:
            on_progress(0, len(sets))
        for chunk in bar:
            probs = self._run([sets[i] for i in chunk], kind)
            for i, p in zip(chunk, probs.tolist(), strict=True):
                grid[cells[i]] = p
            if on_progress is not None:
                on_progress(chunk.stop, len(sets))
        return grid

    def trace(
        self,
        kind: str = "hidden",
        window: int = 10,
        *,
        layers: Sequence[int] | None = None,
        progress: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> TraceResult:
        """Trace one kind of state; the result shares this tracer's clean run and noise.
        ``on_progress(done, total)`` reports batches of cells as :meth:`grid` does."""
        layer_list = (
            list(range(self.arch.n_layers))
            if layers is None
            else _layer_list(layers, self.arch.n_layers)
        )
        grid = self.grid(
            kind, window, layers=layer_list, progress=progress, on_progress=on_progress
        )
        return TraceResult(
            prompt=self.prompt,
            subject=self.subject,
            tokens=[self.tok.decode([i]) for i in self.token_ids],
            token_ids=list(self.token_ids),
            subject_range=self.subject_range,
            answer=self.answer,
            answer_id=self.answer_id,
            clean_prob=self.clean_prob,
            corrupt_prob=self.corrupt_prob,
            grid=grid,
            kind=kind,
            window=1 if kind == "hidden" else int(window),
            layers=layer_list,
            noise_std=self.noise_std,
            samples=self.samples,
            seed=self.seed,
        )


def trace(
    model: nn.Module,
    tok: Any,
    prompt: str,
    subject: str,
    answer: str | int | None = None,
    kind: str = "hidden",
    noise: float | str | None = DEFAULT_NOISE,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 128,
    allow_any_answer: bool = False,
    progress: bool = False,
    arch: ModelArch | None = None,
) -> TraceResult:
    """Causal trace of ``answer`` after ``prompt`` with ``subject`` corrupted.

    Returns a :class:`TraceResult`: clean and corrupted probabilities of the answer (default:
    the model's own top prediction) and a ``(tokens x layers)`` grid of restored
    probabilities for ``kind`` (``"hidden"``, ``"mlp"`` or ``"attn"``; see the module
    docstring). ``layers`` restricts the grid's columns. Same arguments, same result: the noise
    comes from ``seed`` alone. To trace several kinds of one prompt, use
    :class:`CausalTracer` so they share the clean run and noise.

    Raises:
        ValueError: the subject is not in the prompt, the answer is not the model's top
            prediction (unless ``allow_any_answer``), or a setting is out of range.
    """
    tracer = CausalTracer(
        model, tok, prompt, subject, answer, noise=noise, samples=samples, seed=seed,
        batch_size=batch_size, allow_any_answer=allow_any_answer, arch=arch,
    )  # fmt: skip
    return tracer.trace(kind, window, layers=layers, progress=progress)


# ---- averages over many facts ----------------------------------------------------------------
def token_classes(n_tokens: int, subject_range: tuple[int, int]) -> dict[str, list[int]]:
    """Token positions of each class in :data:`TOKEN_CLASSES` (a class may be empty).

    A one-token subject is both the first and the last subject token; the first subsequent
    token and further tokens stop before the prompt's last token, which is its own class.
    """
    s, e = subject_range
    last = n_tokens - 1
    return {
        "first subject token": [s],
        "middle subject tokens": list(range(s + 1, e - 1)),
        "last subject token": [e - 1],
        "first subsequent token": [e] if e < last else [],
        "further tokens": list(range(e + 1, last)),
        "last token": [last],
    }


def class_effects(result: TraceResult) -> dict[str, list[float] | None]:
    """Per-layer indirect effect averaged over each token class's positions (``None``: empty)."""
    ie = result.indirect_effect
    out: dict[str, list[float] | None] = {}
    for name, pos in token_classes(len(result.tokens), result.subject_range).items():
        out[name] = ie[pos].mean(dim=0).tolist() if pos else None
    return out


@dataclass
class AverageTrace:
    """Indirect effects averaged over facts: ``effects[kind][class]`` is a per-layer list.

    ``counts[kind][class]`` is how many facts contributed to that class; ``n_facts`` the
    facts traced (cached or new), ``n_skipped`` those left out (see ``skipped``).
    """

    kinds: list[str]
    n_layers: int
    effects: dict[str, dict[str, list[float]]]
    counts: dict[str, dict[str, int]]
    n_facts: int
    n_skipped: int
    n_cached: int
    mean_clean_prob: float
    mean_corrupt_prob: float
    settings: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def peak_layer(self, kind: str = "mlp", token_class: str = "last subject token") -> int:
        """The layer with the largest average indirect effect for ``kind`` at ``token_class``."""
        values = self.effects[kind][token_class]
        if not values or all(math.isnan(v) for v in values):
            raise ValueError(f"no facts contributed to {kind}/{token_class}")
        return max(
            range(len(values)), key=lambda i: -math.inf if math.isnan(values[i]) else values[i]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_facts(path: str | Path) -> list[dict[str, Any]]:
    """Facts from a JSON list or a JSONL file of records with ``prompt``/``template`` and ``subject``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"facts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix != ".jsonl" else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if data is None:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path} must hold a list of fact records (objects)")
    return data


def _fact_fields(fact: Mapping[str, Any], index: int) -> tuple[str, str, str]:
    subject = fact.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"fact #{index} has no 'subject'")
    prompt = fact.get("prompt")
    if prompt is None and isinstance(fact.get("template"), str):
        prompt = fact["template"].format(subject)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"fact #{index} has neither 'prompt' nor 'template'")
    key = str(fact.get("known_id", fact.get("case_id", index)))
    return key, prompt, subject


def _settings_key(settings: Mapping[str, Any]) -> str:
    return json_digest(settings, 16)


def _read_cache(path: Path, key: str) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # A line cut short by an interrupted run: the fact is simply traced again.
            log.warning("%s:%d is not valid JSON; ignoring it", path, n)
            continue
        if rec.get("settings_key") == key:
            yield rec


def average_trace(
    model: nn.Module,
    tok: Any,
    facts: Iterable[Mapping[str, Any]],
    *,
    kinds: Sequence[str] = KINDS,
    limit: int | None = None,
    cache: str | Path | None = None,
    noise: float | str | None = DEFAULT_NOISE,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    require_known: bool = True,
    progress: bool = True,
    arch: ModelArch | None = None,
) -> AverageTrace:
    """Average indirect effects per layer and token class over ``facts``.

    Each fact needs ``subject`` and ``prompt`` (or a ``template`` with ``{}``); the answer is
    the model's own top prediction. With ``require_known`` a fact is skipped unless that
    prediction's first token is the first token of the fact's ``attribute`` (the model
    knows the fact). ``limit`` caps the facts considered, in file order.

    ``cache`` is a JSONL file of per-fact results: facts already there with the same settings
    (model, noise, samples, window, seed, ``require_known``) are read, not traced again, so an
    interrupted run resumes; new results are appended as they finish. Kinds are cached
    separately per fact: a later run asking for another kind traces only that kind (one
    clean run and the same noise, so the numbers match a run of all kinds at once).
    """
    arch = arch or describe(model)
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown kind(s) {bad}; use some of {KINDS}")
    noise_std = resolve_noise(noise, model, tok, arch=arch)
    # What a cached fact depends on (kinds are stored per fact, so they are not part of it).
    settings = {
        "model": str(
            getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
        ),
        "model_class": arch.model_class,
        "noise_std": round(noise_std, 8),
        "samples": int(samples),
        "window": int(window),
        "seed": int(seed),
        "require_known": bool(require_known),
    }
    skey = _settings_key(settings)
    cache_path = Path(cache) if cache is not None else None
    done: dict[str, dict[str, Any]] = {}
    if cache_path is not None:
        for rec in _read_cache(cache_path, skey):
            prev = done.get(rec["key"])
            if prev is not None and "skipped" not in prev and "skipped" not in rec:
                # A later line for the same fact adds kinds to it.
                rec = {**rec, "effects": {**prev["effects"], **rec["effects"]}}
            done[rec["key"]] = rec
        cache_path.parent.mkdir(parents=True, exist_ok=True)

    facts = list(facts)
    if limit is not None:
        facts = facts[: max(0, int(limit))]
    records: list[dict[str, Any]] = []
    n_cached = 0
    from tqdm.auto import tqdm

    for index, fact in enumerate(
        tqdm(facts, desc="tracing facts", unit="fact", disable=not progress)
    ):
        key, prompt, subject = _fact_fields(fact, index)
        cached = done.get(key)
        missing = kinds if cached is None or "skipped" in cached else [
            k for k in kinds if k not in cached["effects"]
        ]  # fmt: skip
        if cached is not None and ("skipped" in cached or not missing):
            records.append(cached)
            n_cached += 1
            continue
        rec = _trace_fact(
            model, tok, fact, key, prompt, subject, missing, noise_std, samples, window, seed,
            batch_size, require_known, arch,
        )  # fmt: skip
        rec["settings_key"] = skey
        if cached is not None and "skipped" not in rec:
            rec["effects"] = {**cached["effects"], **rec["effects"]}
        records.append(rec)
        if cache_path is not None:
            with cache_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
    return _aggregate(records, kinds, arch.n_layers, {**settings, "kinds": kinds}, n_cached)


def _trace_fact(
    model, tok, fact, key, prompt, subject, kinds, noise_std, samples, window, seed,
    batch_size, require_known, arch,
) -> dict[str, Any]:  # fmt: skip
    try:
        tracer = CausalTracer(
            model, tok, prompt, subject, None, noise=noise_std, samples=samples, seed=seed,
            batch_size=batch_size, arch=arch,
        )  # fmt: skip
    except ValueError as exc:
        return {"key": key, "skipped": str(exc)}
    if require_known:
        attribute = fact.get("attribute")
        if not isinstance(attribute, str) or not attribute.strip():
            return {"key": key, "skipped": "no 'attribute' to check the prediction against"}
        want = _answer_token_id(tok, prompt, attribute)
        if want != tracer.answer_id:
            return {"key": key, "skipped": f"model predicts {tracer.answer!r}, not {attribute!r}"}
    rec: dict[str, Any] = {
        "key": key,
        "prompt": prompt,
        "subject": subject,
        "answer": tracer.answer,
        "clean_prob": tracer.clean_prob,
        "corrupt_prob": tracer.corrupt_prob,
        "n_tokens": tracer.n_tokens,
        "subject_range": list(tracer.subject_range),
        "effects": {},
    }
    for kind in kinds:
        result = tracer.trace(kind, window)
        rec["effects"][kind] = class_effects(result)
    return rec


def _aggregate(records, kinds, n_layers, settings, n_cached) -> AverageTrace:
    sums = {k: {c: [0.0] * n_layers for c in TOKEN_CLASSES} for k in kinds}
    counts = {k: dict.fromkeys(TOKEN_CLASSES, 0) for k in kinds}
    skipped: dict[str, str] = {}
    traced = [r for r in records if "skipped" not in r]
    for r in records:
        if "skipped" in r:
            skipped[r["key"]] = r["skipped"]
    for r in traced:
        for k in kinds:
            for c, values in r["effects"][k].items():
                if values is None:
                    continue
                counts[k][c] += 1
                sums[k][c] = [a + b for a, b in zip(sums[k][c], values, strict=True)]
    effects = {
        k: {
            c: [v / counts[k][c] if counts[k][c] else math.nan for v in sums[k][c]]
            for c in TOKEN_CLASSES
        }
        for k in kinds
    }
    n = len(traced)
    return AverageTrace(
        kinds=list(kinds),
        n_layers=n_layers,
        effects=effects,
        counts=counts,
        n_facts=n,
        n_skipped=len(skipped),
        n_cached=n_cached,
        mean_clean_prob=sum(r["clean_prob"] for r in traced) / n if n else math.nan,
        mean_corrupt_prob=sum(r["corrupt_prob"] for r in traced) / n if n else math.nan,
        settings=dict(settings),
        skipped=skipped,
    )
