"""Probabilities of target continuations, batched: the numbers every metric is made of."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import model_device
from .tokens import prompt_target_batch


@dataclass
class TargetScores:
    """Teacher-forced scores of one target after its prompt.

    ``logprobs[j]`` is the log-probability of target token ``j``; ``argmax[j]`` the model's most
    likely token at that position; ``target_ids[j]`` the target token itself.
    """

    logprobs: torch.Tensor
    argmax: torch.Tensor
    target_ids: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        """Boolean per target token: is it the model's top-1 prediction?"""
        return self.argmax == self.target_ids


@torch.no_grad()
def target_token_scores(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> list[TargetScores]:
    """For each ``(prompt, target)`` pair, per-token log-probabilities and argmax tokens
    (teacher-forced), in input order.

    At most ``batch_size`` pairs share a forward pass; pairs are grouped by length so that
    short prompts are not padded to the longest one, and logits are formed only at the target
    positions (the last ones of each left-padded row).
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = model_device(model)
    out: list[TargetScores | None] = [None] * len(prompts)
    for group in _length_groups(tok, prompts, targets, batch_size):
        b = prompt_target_batch(tok, [prompts[j] for j in group], [targets[j] for j in group]).to(
            device
        )
        width = b.input_ids.shape[1]
        keep = max(len(ids) for ids in b.target_ids)
        logits = model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=keep
        ).logits
        shift = width - logits.shape[1]  # models that ignore logits_to_keep return every position
        for i, (j, pos, ids) in enumerate(
            zip(group, b.target_positions, b.target_ids, strict=True)
        ):
            lp = torch.log_softmax(logits[i, [p - shift for p in pos]].float(), dim=-1)
            idx = torch.tensor(ids, device=lp.device)
            out[j] = TargetScores(
                logprobs=lp[torch.arange(len(ids), device=lp.device), idx].cpu(),
                argmax=lp.argmax(dim=-1).cpu(),
                target_ids=idx.cpu(),
            )
    return out  # type: ignore[return-value]


def _length_groups(
    tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> list[list[int]]:
    """Indices grouped for batching: sorted by token length, a new group whenever padding would
    exceed a quarter of the group's tokens or ``batch_size`` rows are reached."""
    lengths = [
        len(tok(p)["input_ids"]) + len(tok(t, add_special_tokens=False)["input_ids"])
        for p, t in zip(prompts, targets, strict=True)
    ]
    groups: list[list[int]] = []
    total = 0
    for j in sorted(range(len(prompts)), key=lengths.__getitem__):
        g = groups[-1] if groups else None
        # Sorted ascending, so the new row sets the group's width.
        if (
            g is None
            or len(g) >= batch_size
            or lengths[j] * (len(g) + 1) > 1.25 * (total + lengths[j])
        ):
            groups.append([j])
            total = lengths[j]
        else:
            g.append(j)
            total += lengths[j]
    return groups


def target_token_logprobs(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> list[torch.Tensor]:
    """For each ``(prompt, target)`` pair, the log-probability of each target token (float32)."""
    return [
        s.logprobs for s in target_token_scores(model, tok, prompts, targets, batch_size=batch_size)
    ]


def mean_target_logprob(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], **kw
) -> torch.Tensor:
    """Mean per-token log-probability of each target after its prompt, shape ``(n,)``."""
    return torch.stack(
        [t.mean() for t in target_token_logprobs(model, tok, prompts, targets, **kw)]
    )


def target_prob(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], **kw
) -> torch.Tensor:
    """``exp`` of :func:`mean_target_logprob`: a per-token geometric-mean probability."""
    return mean_target_logprob(model, tok, prompts, targets, **kw).exp()


@torch.no_grad()
def next_token_distribution(model: nn.Module, tok, prompts: Sequence[str]) -> torch.Tensor:
    """Next-token probabilities after each prompt, shape ``(n, vocab)`` (float32)."""
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(model_device(model))
    logits = model(**enc).logits[:, -1].float()
    return torch.softmax(logits, dim=-1)
