"""Hyperparameters of the learned editors (editing and training in one typed dataclass)."""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from torch import nn

from ..arch import ModelArch, describe
from ..hparams import HParams

VARIANTS = ("gen", "cf", "zsre")
FAMILIES = ("mend", "ke")

#: Fields that only say where to find an editor or how to run; they do not change what is trained.
NOT_IN_KEY = ("editor", "min_grad_norm")


@dataclasses.dataclass
class LearnedHParams(HParams):
    """Hyperparameters of MEND and KE.

    Attributes:
        variant: training data: ``"gen"`` (self-supervised edits from the Wikipedia corpus),
            ``"cf"`` (CounterFact) or ``"zsre"`` (zsRE questions).
        layers: blocks whose MLP output projection is edited (``None``: the last three).
        editor: path of a trained editor artifact; ``None`` takes the one trained for this
            model, method and variant from the factedit cache.
        rank: MEND: rank of the residual MLP's blocks; KE: width of the condition encoder.
        n_blocks: MEND: residual blocks of the MLP.
        init_lr: initial per-layer edit learning rate (learned during training).
        steps: training steps (one edit example per step).
        meta_lr: Adam learning rate of the editor's weights; ``lr_lr`` that of its log learning rates.
        edit_weight, loc_weight: weights of the edit NLL (mean of edit and rephrase rows) and
            of the locality KL in the training loss.
        val_size: examples held out for validation (edit success and locality figures).
        eval_every: steps between validations (and checkpoints).
        patience: validations without improvement before stopping early.
        max_examples: most training examples used (each one's lower-block activations are
            cached in memory once).
        seed: data order, validation split and initialisation.
        min_grad_norm: an edit whose fine-tuning gradient is smaller (the target is already
            predicted) is refused.
    """

    variant: str = "gen"
    layers: list[int] | None = None
    editor: str | None = None
    rank: int = 192
    n_blocks: int = 2
    init_lr: float = 1e-3
    steps: int = 600
    meta_lr: float = 1e-3
    lr_lr: float = 5e-2
    edit_weight: float = 1.0
    loc_weight: float = 1.0
    val_size: int = 50
    eval_every: int = 100
    patience: int = 4
    max_examples: int = 2000
    seed: int = 0
    min_grad_norm: float = 1e-8

    #: "mend" or "ke"; set by the subclasses.
    family: str = dataclasses.field(default="mend", repr=False)

    @classmethod
    def defaults_for(cls, method: str, model: nn.Module, arch: ModelArch | None = None) -> Self:
        """Shipped defaults of the method's family (``configs/mend`` or ``configs/ke``) with
        ``variant`` taken from the method name (``mend-cf`` → ``cf``)."""
        arch = arch or describe(model)
        family, _, variant = method.partition("-")
        hp = super().defaults_for(family, model, arch)
        return hp.replace(variant=variant or "gen", family=family)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        positive = (
            "rank",
            "n_blocks",
            "init_lr",
            "steps",
            "meta_lr",
            "lr_lr",
            "eval_every",
            "patience",
            "max_examples",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.edit_weight < 0 or self.loc_weight < 0 or self.val_size < 1:
            raise ValueError("edit_weight and loc_weight must be >= 0 and val_size >= 1")

    def training_config(self) -> dict[str, Any]:
        """What the trained editor depends on (everything but where it is stored)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IN_KEY}


@dataclasses.dataclass
class MENDHParams(LearnedHParams):
    family: str = dataclasses.field(default="mend", repr=False)


@dataclasses.dataclass
class KEHParams(LearnedHParams):
    family: str = dataclasses.field(default="ke", repr=False)
    rank: int = 128
