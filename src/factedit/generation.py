"""Batched generation and the logit lens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import ModelArch, describe
from .hooks import TraceDict, first_tensor
from .models import model_device


@torch.no_grad()
def generate(
    model: nn.Module,
    tok,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 30,
    top_k: int | None = None,
    seed: int | None = None,
    temperature: float = 1.0,
) -> list[str]:
    """Continue each prompt; return ``prompt + continuation`` strings in prompt order.

    Greedy when ``top_k`` is ``None`` (or 1); otherwise samples from the ``top_k`` most likely
    tokens. ``seed`` makes sampling repeatable without touching the global random state.
    A continuation ends at the model's end-of-sequence token or after ``max_new_tokens``.
    Uses the model's KV cache; prompts are batched with left padding.
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    if not batch:
        return []
    new = _generate_ids(
        model, tok, batch, max_new_tokens, top_k, seed, temperature, stop_at_eos=True
    )
    return [p + tok.decode(n, skip_special_tokens=True) for p, n in zip(batch, new, strict=True)]


@dataclass(frozen=True)
class FullLengthGenerations:
    """Continuations generated to their full length (see :func:`generate_full_length`)."""

    #: ``prompt + continuation``, ``max_new_tokens`` tokens each, sampled on past any
    #: end-of-sequence token (special tokens are left out of the text, as ROME drops
    #: ``<|endoftext|>``).
    texts: list[str]
    #: The same continuations cut after their first end-of-sequence token: what
    #: :func:`generate` returns with the same seed.
    ended: list[str]


@torch.no_grad()
def generate_full_length(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    top_k: int | None = None,
    seed: int | None = None,
    temperature: float = 1.0,
) -> FullLengthGenerations:
    """Continue each prompt for exactly ``max_new_tokens`` tokens, sampling on past
    end-of-sequence tokens, as ROME's evaluation generates (its ``generate_fast`` has no stop
    token and drops ``<|endoftext|>`` from the text). Also returns each continuation cut at its
    first end-of-sequence token: up to that token the two are the same samples (the sampler
    draws for every row at every step, finished or not), so one generation gives both."""
    batch = list(prompts)
    if not batch:
        return FullLengthGenerations([], [])
    new = _generate_ids(
        model, tok, batch, max_new_tokens, top_k, seed, temperature, stop_at_eos=False
    )
    return _full_length_texts(tok, batch, new.tolist(), set(end_token_ids(model, tok)))


def _full_length_texts(
    tok, prompts: Sequence[str], new: list[list[int]], ends: set[int]
) -> FullLengthGenerations:
    """Each prompt with its new tokens, whole and cut after the first end token."""
    texts, ended = [], []
    for p, ids in zip(prompts, new, strict=True):
        # Up to and including the end token, decoded as generate() decodes it (a special
        # token drops out of the text).
        cut = next((i + 1 for i, t in enumerate(ids) if t in ends), len(ids))
        texts.append(p + tok.decode(ids, skip_special_tokens=True))
        ended.append(p + tok.decode(ids[:cut], skip_special_tokens=True))
    return FullLengthGenerations(texts, ended)


@dataclass(frozen=True)
class GenerationGroup:
    """Prompts sampled together under one seed (one evaluation case's generation prompts)."""

    prompts: Sequence[str]
    max_new_tokens: int
    seed: int


class _GroupSampler:
    """A logits processor that draws each row's next token itself, every group of rows from
    its own generator, and hands ``generate`` a score row that is ``-inf`` everywhere but the
    drawn token (so greedy decoding takes it). The draws are those of ``generate``'s own
    sampler on the group alone: top-k filtering, a softmax in float32 and one
    ``torch.multinomial`` call per group and step, in row order."""

    def __init__(self, groups: list[tuple[int, int, int]], top_k: int, temperature: float) -> None:
        #: (first row, end row, seed) of each group.
        self.groups = groups
        self.top_k = top_k
        self.temperature = temperature
        self._generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._generators is None:
            # On the device the logits come out on (the last one of a model split over several).
            self._generators = [
                torch.Generator(device=scores.device).manual_seed(s) for _, _, s in self.groups
            ]
        if self.temperature != 1.0:
            scores = scores / self.temperature
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for (start, stop, _), gen in zip(self.groups, self._generators, strict=True):
            chosen[start:stop] = torch.multinomial(probs[start:stop], 1, generator=gen).squeeze(1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


@torch.no_grad()
def generate_full_length_groups(
    model: nn.Module,
    tok,
    groups: Sequence[GenerationGroup],
    *,
    top_k: int | None = None,
    temperature: float = 1.0,
    batch_rows: int = 128,
) -> list[FullLengthGenerations]:
    """:func:`generate_full_length` for many groups of prompts in few ``generate`` calls.

    Each group is continued for its own ``max_new_tokens`` and sampled from its own generator
    seeded with its ``seed``, so it gets the samples ``generate_full_length(model, tok,
    group.prompts, max_new_tokens=..., top_k=..., seed=group.seed)`` gives, up to the
    floating-point effect of a larger padded batch on the logits (a draw that falls within
    about 1e-6 of a token's probability boundary can go the other way; the equivalence test
    counts such texts). Groups are packed whole into calls of at most ``batch_rows`` rows (a
    larger group gets a call of its own): decoding a small model is bound by reading the
    weights, so a call with many rows costs little more than one with two. Greedy when
    ``top_k`` is ``None`` or 1. The global random state is not touched.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    out: list[FullLengthGenerations] = []
    chunk: list[GenerationGroup] = []
    for g in groups:
        if chunk and sum(len(c.prompts) for c in chunk) + len(g.prompts) > batch_rows:
            out += _generate_group_chunk(model, tok, chunk, top_k, temperature)
            chunk = []
        chunk.append(g)
    if chunk:
        out += _generate_group_chunk(model, tok, chunk, top_k, temperature)
    return out


def _generate_group_chunk(
    model: nn.Module, tok, chunk: list[GenerationGroup], top_k: int | None, temperature: float
) -> list[FullLengthGenerations]:
    """The generations of the groups ``chunk``, from one ``generate`` call."""
    from transformers import LogitsProcessorList

    prompts = [p for g in chunk for p in g.prompts]
    if not prompts:
        return [FullLengthGenerations([], []) for _ in chunk]
    processors = None
    if top_k is not None and top_k > 1:
        spans, start = [], 0
        for g in chunk:
            if g.prompts:
                spans.append((start, start + len(g.prompts), g.seed))
            start += len(g.prompts)
        processors = LogitsProcessorList([_GroupSampler(spans, top_k, temperature)])
    # Greedy decoding of the sampler's one-hot scores (generate's own sampling stays off).
    longest = max(g.max_new_tokens for g in chunk)
    new = _generate_ids(model, tok, prompts, longest, top_k=None, seed=None, temperature=1.0,
                        stop_at_eos=False, logits_processor=processors).tolist()  # fmt: skip
    ends = set(end_token_ids(model, tok))
    out, row = [], 0
    for g in chunk:
        n = len(g.prompts)
        # Sampling is causal, so the first max_new_tokens of a longer run are the samples a
        # run of exactly max_new_tokens draws.
        out.append(
            _full_length_texts(
                tok, g.prompts, [r[: g.max_new_tokens] for r in new[row : row + n]], ends
            )
        )
        row += n
    return out


def end_token_ids(model: nn.Module, tok) -> list[int]:
    """The token ids that end a generation: the model's generation config's
    ``eos_token_id`` (an id or a list), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _generate_ids(
    model: nn.Module,
    tok,
    batch: list[str],
    max_new_tokens: int,
    top_k: int | None,
    seed: int | None,
    temperature: float,
    *,
    stop_at_eos: bool,
    logits_processor: Any = None,
) -> torch.Tensor:
    """The new token ids ``(len(batch), new)`` of one batched ``model.generate`` call (rows that
    ended early are padded with ``tok.pad_token_id``). ``logits_processor`` (a transformers
    ``LogitsProcessorList``) runs after the model's own processors."""
    enc = tok(batch, return_tensors="pt", padding=True).to(model_device(model))
    sample = top_k is not None and top_k > 1
    kwargs: dict = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    if not stop_at_eos:
        # No stop token: every row runs to max_new_tokens (transformers stops at none).
        kwargs["eos_token_id"] = None
    if sample:
        kwargs.update(top_k=top_k, temperature=temperature)
    else:
        # Neutralise sampling settings a model's generation_config may carry.
        kwargs.update(top_k=None, top_p=None, temperature=None)
    # Fork the RNG of the model's own device too (CPU's is always forked); no device-type
    # literals, so any accelerator torch knows works.
    device = model_device(model)
    on_accel = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if on_accel else [],
        device_type=device.type if on_accel else None,
        enabled=seed is not None,
    ):
        if seed is not None:
            # Seed only the forked generators (torch.manual_seed would also reseed every
            # other accelerator, outside the fork).
            torch.default_generator.manual_seed(seed)
            if on_accel:
                _seed_device(device, seed)
        out = model.generate(**enc, **kwargs)
    return out[:, enc["input_ids"].shape[1] :]


def _seed_device(device: torch.device, seed: int) -> None:
    """Seed the random generator of one accelerator device."""
    mod = torch.get_device_module(device.type)
    if device.index is not None and hasattr(mod, "device"):
        with mod.device(device.index):
            mod.manual_seed(seed)
    else:
        mod.manual_seed(seed)


@dataclass
class LensRow:
    """The logit lens at one layer: top tokens and their probabilities."""

    layer: int
    tokens: list[str]
    token_ids: list[int]
    probs: list[float]


@torch.no_grad()
def logit_lens(
    model: nn.Module,
    tok,
    prompt: str,
    *,
    top_k: int = 5,
    arch: ModelArch | None = None,
) -> list[LensRow]:
    """Top-``k`` next tokens read from every block's output at the prompt's last position.

    Each block's residual output goes through the final norm and the unembedding, as the
    model does for its last layer, so the last row equals the model's own next-token
    distribution.
    """
    arch = arch or describe(model)
    enc = tok(prompt, return_tensors="pt").to(model_device(model))
    names = [arch.layer_name(i) for i in range(arch.n_layers)]
    with TraceDict(model, names) as td:
        model(**enc)
    rows = []
    for i, name in enumerate(names):
        h = first_tensor(td[name].output)[:, -1:]
        probs = torch.softmax(arch.logits_from_hidden(model, h)[0, -1].float(), dim=-1)
        p, ids = probs.topk(top_k)
        rows.append(
            LensRow(
                layer=i,
                tokens=[tok.decode([t]) for t in ids.tolist()],
                token_ids=ids.tolist(),
                probs=p.tolist(),
            )
        )
    return rows


def format_lens(rows: list[LensRow]) -> str:
    """A small text table of logit-lens rows (for the CLI and notebooks)."""
    lines = []
    for r in rows:
        cells = "  ".join(f"{t!r} {p:.2f}" for t, p in zip(r.tokens, r.probs, strict=True))
        lines.append(f"layer {r.layer:>3}: {cells}")
    return "\n".join(lines)
