"""Probabilities of target continuations, batched: the numbers every metric is made of."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import model_device
from .tokens import prompt_target_batch


@torch.no_grad()
def target_token_logprobs(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> list[torch.Tensor]:
    """For each ``(prompt, target)`` pair, the log-probability of each target token (float32)."""
    out: list[torch.Tensor] = []
    device = model_device(model)
    for s in range(0, len(prompts), batch_size):
        b = prompt_target_batch(tok, prompts[s : s + batch_size], targets[s : s + batch_size]).to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        for i, (pos, ids) in enumerate(zip(b.target_positions, b.target_ids, strict=True)):
            lp = torch.log_softmax(logits[i, pos].float(), dim=-1)
            out.append(lp[torch.arange(len(ids)), torch.tensor(ids, device=lp.device)].cpu())
    return out


def mean_target_logprob(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], **kw) -> torch.Tensor:
    """Mean per-token log-probability of each target after its prompt, shape ``(n,)``."""
    return torch.stack([t.mean() for t in target_token_logprobs(model, tok, prompts, targets, **kw)])


def target_prob(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], **kw) -> torch.Tensor:
    """``exp`` of :func:`mean_target_logprob`: a per-token geometric-mean probability."""
    return mean_target_logprob(model, tok, prompts, targets, **kw).exp()


@torch.no_grad()
def next_token_distribution(model: nn.Module, tok, prompts: Sequence[str]) -> torch.Tensor:
    """Next-token probabilities after each prompt, shape ``(n, vocab)`` (float32)."""
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(model_device(model))
    logits = model(**enc).logits[:, -1].float()
    return torch.softmax(logits, dim=-1)
