"""Batched generation and the logit lens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    Uses the model's KV cache; prompts are batched with left padding.
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    if not batch:
        return []
    enc = tok(batch, return_tensors="pt", padding=True).to(model_device(model))
    sample = top_k is not None and top_k > 1
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )
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
    new = out[:, enc["input_ids"].shape[1] :]
    texts = [p + tok.decode(n, skip_special_tokens=True) for p, n in zip(batch, new, strict=True)]
    return texts


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
