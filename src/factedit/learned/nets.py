"""The editor networks: MEND's gradient transform and KE's conditioned gradient rescaling.

Both map what one request gives (the rank-one gradient factors of each edited layer, and for KE
the request's text) to a weight change ``dW`` per edited layer, in ``(out, in)`` orientation
and float32. Both start as (scaled) gradient descent, so an untrained editor makes a small
fine-tuning step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .core import Factors


class _LowRankResidual(nn.Module):
    """``x + B relu(A x + a) + b`` with ``A: (rank, dim)`` and ``B`` initialised to zero, so the
    block starts as the identity (MEND's "IDMLP")."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class MENDEditor(nn.Module):
    """MEND (Mitchell et al. 2022): per edited layer, ``z_t = [u_t; delta_t]`` is normalised
    (running mean/variance per layer, frozen outside training), scaled and shifted per layer,
    transformed by a low-rank residual MLP shared by the layers of one shape, and split into a
    pseudo-activation and pseudo-delta; the update is ``-lr_l sum_t delta~_t u~_t^T`` with a
    learned per-layer learning rate.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        rank: int = 192,
        n_blocks: int = 2,
        init_lr: float = 1e-4,
    ) -> None:
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.nets = nn.ModuleDict()
        for out, inp in dict.fromkeys(self.shapes):
            self.nets[f"{out}x{inp}"] = nn.Sequential(
                *[_LowRankResidual(out + inp, rank) for _ in range(n_blocks)]
            )
        n = len(self.shapes)
        self.scale = nn.ParameterList([nn.Parameter(torch.ones(o + i)) for o, i in self.shapes])
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(o + i)) for o, i in self.shapes])
        self.log_lr = nn.Parameter(torch.full((n,), math.log(init_lr)))
        for j, (o, i) in enumerate(self.shapes):
            self.register_buffer(f"mean{j}", torch.zeros(o + i))
            self.register_buffer(f"m2_{j}", torch.zeros(o + i))
            self.register_buffer(f"count{j}", torch.zeros((), dtype=torch.float64))

    def _normalise(self, j: int, z: torch.Tensor) -> torch.Tensor:
        mean, m2, count = (
            getattr(self, f"mean{j}"),
            getattr(self, f"m2_{j}"),
            getattr(self, f"count{j}"),
        )
        if self.training:
            # Chan et al.'s parallel update of the running mean and sum of squares.
            with torch.no_grad():
                n_b = z.shape[0]
                mean_b = z.mean(0)
                m2_b = ((z - mean_b) ** 2).sum(0)
                n_a = float(count)
                tot = n_a + n_b
                d = mean_b - mean
                mean.add_(d * (n_b / tot))
                m2.add_(m2_b + d**2 * (n_a * n_b / tot))
                count.fill_(tot)
        var = m2 / max(float(count) - 1.0, 1.0)
        return (z - mean) / (var.sqrt() + 1e-8) if float(count) > 1 else z

    def forward(self, factors: Factors, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        out = []
        for j, ((o, i), u, d) in enumerate(zip(self.shapes, factors.u, factors.delta, strict=True)):
            z = torch.cat([u, d], dim=1)
            z = self._normalise(j, z) * self.scale[j] + self.shift[j]
            h = self.nets[f"{o}x{i}"](z)
            u_t, d_t = h[:, :i], h[:, i:]
            out.append(-self.log_lr[j].exp() * (d_t.T @ u_t))
        return out


class KEEditor(nn.Module):
    """KnowledgeEditor (De Cao et al. 2021): a bidirectional LSTM over the base model's frozen
    input embeddings of ``"old >> new || prompt"`` gives a condition vector ``c``; per edited
    layer, heads map ``c`` to ``alpha, beta`` (rows) and ``gamma, eta`` (columns), and the update
    is ``-lr_l (sigmoid(alpha) gamma^T * G^ + sigmoid(beta) eta^T)``, where ``G^`` is the
    fine-tuning gradient scaled to unit RMS.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        embed_dim: int,
        hidden: int = 128,
        init_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, hidden)
        self.heads = nn.ModuleList()
        for o, i in self.shapes:
            head = nn.Linear(hidden, 2 * o + 2 * i)
            # Start as plain (rescaled) gradient descent: sigmoid(0) * 1 on the gradient, no bias.
            nn.init.normal_(head.weight, std=1e-3)
            with torch.no_grad():
                head.bias.zero_()
                head.bias[2 * o : 2 * o + i] = 1.0  # gamma
            self.heads.append(head)
        self.log_lr = nn.Parameter(torch.full((len(self.shapes),), math.log(init_lr)))

    def forward(self, factors: Factors, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        if cond is None:
            raise ValueError("KE needs the condition text's embeddings")
        seq, _ = self.lstm(cond.float().unsqueeze(0))
        c = torch.tanh(self.proj(seq.mean(1)))[0]
        out = []
        for j, ((o, i), g) in enumerate(zip(self.shapes, factors.gradients(), strict=True)):
            p = self.heads[j](c)
            alpha, beta, gamma, eta = p[:o], p[o : 2 * o], p[2 * o : 2 * o + i], p[2 * o + i :]
            g_hat = g / (g.pow(2).mean().sqrt() + 1e-12)
            upd = (
                torch.sigmoid(alpha)[:, None] * gamma[None, :] * g_hat
                + torch.sigmoid(beta)[:, None] * eta[None, :]
            )
            out.append(-self.log_lr[j].exp() * upd)
        return out


def build_editor(
    family: str, shapes: Sequence[tuple[int, int]], embed_dim: int, config: dict
) -> nn.Module:
    """A fresh editor network of ``family`` (``"mend"`` or ``"ke"``) for layers of ``shapes``."""
    if family == "mend":
        return MENDEditor(
            shapes, rank=config["rank"], n_blocks=config["n_blocks"], init_lr=config["init_lr"]
        )
    if family == "ke":
        return KEEditor(shapes, embed_dim, hidden=config["rank"], init_lr=config["init_lr"])
    raise ValueError(f"unknown learned editor family {family!r}; use 'mend' or 'ke'")
