"""EMMET: batched ROME with equality constraints (Gupta et al. 2024, "A Unified Framework for
Model Editing").

ROME writes one fact as an equality constraint (ΔW k = r) while keeping ‖ΔW‖ small in the
metric of the preserved keys' second moment C₀. EMMET writes a batch the same way, on one
layer:

    min ‖ΔW C₀^½‖²  subject to  ΔW K = R   ⇒   ΔW = R (Kᵀ C₀⁻¹ K)⁻¹ Kᵀ C₀⁻¹

with C₀ = λ_m·E[kkᵀ] (``mom2_update_weight``) and K the batch's keys (columns). Keys of a batch
can be nearly dependent (two requests about one subject), so ``emmet_lambda`` δ is added to
the n×n matrix Kᵀ C₀⁻¹ K (δ = 0: the exact constraints, where they are independent).

With δ > 0 this is MEMIT's least-squares update on that one layer with λ = λ_m·δ (the
push-through identity (δI + KᵀC⁻¹K)⁻¹KᵀC⁻¹ = Kᵀ(δC + KKᵀ)⁻¹); the equality-constrained limit
δ → 0 is what MEMIT's form cannot reach (λC + KKᵀ is singular at λ = 0). Values, keys and
everything else are MEMIT's (:mod:`factedit.methods.memit`) with a one-layer range; the default
layer is ROME's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import ModelArch
from .base import LowRankDelta
from .memit import MEMIT, MEMITHParams, as_weight_delta


@dataclass
class EMMETHParams(MEMITHParams):
    """MEMIT's hyperparameters with a one-layer range, plus EMMET's.

    Attributes:
        layers: exactly one layer (ROME's).
        mom2_update_weight: λ_m, the scale of C₀ = λ_m·E[kkᵀ] (E[kkᵀ] normalised by the token
            count).
        emmet_lambda: δ, added to the diagonal of Kᵀ C₀⁻¹ K (0: exact equality constraints).
    """

    layers: list[int] = field(default_factory=lambda: [5])
    mom2_update_weight: float = 10000.0
    emmet_lambda: float = 0.1

    def adapt(self, arch: ModelArch) -> EMMETHParams:
        # ROME's proportion of the depth (see ROMEHParams.adapt).
        return self.replace(layers=[max(0, round(arch.n_layers * 0.2))])


def emmet_delta(
    keys: torch.Tensor,
    resid: torch.Tensor,
    mom2: torch.Tensor,
    weight: float,
    reg: float,
    arch: ModelArch,
) -> LowRankDelta | torch.Tensor:
    """ΔW = R (Kᵀ C₀⁻¹ K + δ I)⁻¹ Kᵀ C₀⁻¹ with C₀ = ``weight``·``mom2``, δ = ``reg``, for keys
    ``(n, in)`` and residuals ``(n, out)``, in float64, in the weight's storage orientation.
    With δ = 0 and independent keys, ΔW K = R exactly."""
    c0 = weight * mom2.to(torch.float64)
    k = keys.to(c0.device, torch.float64)  # (n, in): the keys are rows here
    ck = torch.linalg.solve(c0, k.T)  # (in, n) = C₀⁻¹ K
    a = k @ ck + reg * torch.eye(k.shape[0], dtype=c0.dtype, device=c0.device)  # Kᵀ C₀⁻¹ K + δ I
    x = torch.linalg.solve(a, ck.T)  # (n, in) = (Kᵀ C₀⁻¹ K + δ I)⁻¹ Kᵀ C₀⁻¹ (C₀ symmetric)
    return as_weight_delta(resid.to(c0.device, torch.float64).T, x.T, arch)


class EMMET(MEMIT):
    name = "emmet"
    summary = "batched ROME: one layer, each fact an equality constraint (mass editing)"
    hparams_class = EMMETHParams

    def check(self, hparams: EMMETHParams, arch: ModelArch) -> None:  # type: ignore[override]
        super().check(hparams, arch)
        if len(hparams.layers) != 1:
            raise ValueError(
                f"EMMET edits one layer; layers must have one entry, got {list(hparams.layers)}"
            )
        if hparams.mom2_update_weight <= 0 or hparams.emmet_lambda < 0:
            raise ValueError("mom2_update_weight must be > 0 and emmet_lambda >= 0")

    def layer_update(  # type: ignore[override]
        self,
        layer: int,
        keys: torch.Tensor,
        resid: torch.Tensor,
        mom2: torch.Tensor,
        hp: EMMETHParams,
        arch: ModelArch,
    ) -> LowRankDelta | torch.Tensor:
        return emmet_delta(keys, resid, mom2, hp.mom2_update_weight, hp.emmet_lambda, arch)
