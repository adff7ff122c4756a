"""Tokenisation helpers shared by editing, tracing and evaluation.

Prompts and targets are batched with left padding, so position ``-1`` of every row is the last
prompt token; subject positions are found through the tokenizer's character offsets, so they
are right whatever the tokenizer does at word boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def subject_token_range(
    tok, text: str, subject: str, occurrence: int = 0, *, start_char: int = 0
) -> tuple[int, int]:
    """``(start, end)`` token indices (end exclusive) of ``subject`` inside ``text``.

    Indices refer to ``tok(text)["input_ids"]`` (special tokens such as BOS included). The
    ``occurrence``-th match at or after character ``start_char`` is used.
    Raises ``ValueError`` if the subject does not occur in the text.
    """
    start_char -= 1
    for _ in range(occurrence + 1):
        start_char = text.find(subject, start_char + 1)
        if start_char < 0:
            raise ValueError(f"subject {subject!r} not found in {text!r}")
    end_char = start_char + len(subject)
    enc = tok(text, return_offsets_mapping=True)
    hits = [
        i
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if b > a and a < end_char and b > start_char
    ]
    if not hits:
        raise ValueError(f"subject {subject!r} maps to no tokens in {text!r}")
    return hits[0], hits[-1] + 1


def encode_target(tok, target: str) -> list[int]:
    """Token ids of a target continuation, without special tokens."""
    return tok(target, add_special_tokens=False)["input_ids"]


@dataclass
class PromptTargetBatch:
    """Prompts followed by target continuations, left-padded.

    ``input_ids``/``attention_mask`` hold ``prompt + target[:-1]`` (the last target token is
    only predicted, never read). ``target_positions[i]`` are the positions whose logits predict
    target ``i``'s tokens ``target_ids[i]``; ``prompt_last[i]`` is the position of the prompt's
    last token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_positions: list[list[int]]
    target_ids: list[list[int]]
    prompt_last: list[int]

    def to(self, device: torch.device) -> PromptTargetBatch:
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self


def prompt_target_batch(tok, prompts: Sequence[str], targets: Sequence[str]) -> PromptTargetBatch:
    """Build a :class:`PromptTargetBatch` (see there)."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    rows, tpos, tids, plast = [], [], [], []
    for p, t in zip(prompts, targets, strict=True):
        pid = tok(p)["input_ids"]
        if not pid:
            raise ValueError(f"prompt {p!r} maps to no tokens; the target needs a prompt to follow")
        tid = encode_target(tok, t)
        if not tid:
            raise ValueError(f"target {t!r} maps to no tokens")
        rows.append(pid + tid[:-1])
        tids.append(tid)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, tid) in enumerate(zip(rows, tids, strict=True)):
        off = width - len(r)
        ids[i, off:] = torch.tensor(r)
        mask[i, off:] = 1
        n_prompt = len(r) - len(tid) + 1
        first = off + n_prompt - 1
        plast.append(first)
        tpos.append(list(range(first, first + len(tid))))
    return PromptTargetBatch(ids, mask, tpos, tids, plast)
