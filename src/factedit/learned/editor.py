"""A trained editor loaded for use: checks the model, turns one request into weight changes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch
from ..hooks import get_module
from .artifact import EditorFileError, EditorMismatchError, base_fingerprint, read
from .core import (
    ExampleBatch,
    Factors,
    HiddenCache,
    edit_gradient_factors,
    example_batch,
    layer_shapes,
    nll,
    row_logits,
    to_storage,
    top_hidden,
)
from .nets import build_editor


class ZeroGradientError(ValueError):
    """The request's fine-tuning gradient is (numerically) zero: the model already predicts
    the new target, so a gradient-based editor has nothing to transform. Nothing was changed."""


def condition_embeddings(model: nn.Module, arch: ModelArch, tok: Any, text: str) -> torch.Tensor:
    """The base model's (frozen) input embeddings of ``text``, ``(tokens, hidden)``."""
    ids = tok(text, return_tensors="pt")["input_ids"].to(
        get_module(model, arch.embed).weight.device
    )
    with torch.no_grad():
        return get_module(model, arch.embed)(ids)[0].float()


@dataclass
class PreparedRequest:
    """One request's tokens and the hidden state entering the first edited block, computed
    once: valid while the blocks below the edited ones are unchanged (an edit by this editor
    changes only the edited projections)."""

    ex: ExampleBatch
    cache: HiddenCache | None

    @torch.no_grad()
    def target_prob(self, model: nn.Module, arch: ModelArch) -> float:
        """Per-token geometric-mean probability of the target after the prompt, as
        :func:`factedit.scoring.target_prob` gives it, on the weights as they are now; runs only
        the blocks from the first edited one up."""
        hidden = top_hidden(model, arch, self.ex, self.cache)
        b = self.ex.batch
        return math.exp(
            -float(nll(row_logits(model, arch, hidden, 0, b.target_positions[0]), b.target_ids[0]))
        )


@dataclass
class LearnedEditor:
    """A trained MEND or KE editor and what it was trained for (see :mod:`.artifact`)."""

    family: str
    variant: str
    layers: list[int]
    net: nn.Module
    header: dict[str, Any]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path, embed_dim: int | None = None) -> LearnedEditor:
        """Read an editor file (safetensors + JSON header; no pickle)."""
        header, tensors = read(path)
        if "layers" not in header or header.get("kind") != "editor":
            raise EditorFileError(
                f"{path} is not a finished editor (a checkpoint? finish training first)"
            )
        cfg = header["config"]
        shapes = [tuple(s) for s in header["shapes"]]
        net = build_editor(header["family"], shapes, header["embed_dim"], cfg)
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise EditorFileError(
                f"{path}: tensors do not match the editor described in its header: {exc}"
            ) from None
        net.eval()
        return cls(
            header["family"], header["variant"], list(header["layers"]), net, header, Path(path)
        )

    def param_names(self, arch: ModelArch) -> list[str]:
        return [arch.mlp_out_weight_name(i) for i in self.layers]

    def check_model(
        self, model: nn.Module, arch: ModelArch, fingerprint: str | None = None
    ) -> None:
        """Raise :class:`EditorMismatchError` unless this editor was trained for ``model``.
        ``fingerprint``: the model's :func:`base_fingerprint` over this editor's layers, if
        the caller already computed it."""
        made_on = self.header.get("base_model", {})
        where = made_on.get("name_or_path") or made_on.get("model_key") or "another model"
        if max(self.layers) >= arch.n_layers:
            raise EditorMismatchError(
                f"this editor was trained for {where} (edits layers {self.layers}); this model has "
                f"{arch.n_layers} layers. The model was not changed."
            )
        shapes = layer_shapes(model, arch, self.layers)
        if [list(s) for s in shapes] != [list(s) for s in self.header["shapes"]]:
            raise EditorMismatchError(
                f"this editor was trained for {where}: its layers have shapes {self.header['shapes']}, "
                f"here {[list(s) for s in shapes]}. The model was not changed."
            )
        fp = fingerprint or base_fingerprint(model, arch, self.param_names(arch))
        if fp != made_on.get("fingerprint"):
            raise EditorMismatchError(
                f"this editor was trained for a different base model ({where}); its weights differ "
                "from this model's. Train an editor for this model (factedit train ...). "
                "The model was not changed."
            )

    def compute(
        self,
        model: nn.Module,
        tok: Any,
        arch: ModelArch,
        prompt: str,
        target: str,
        old: str | None,
        min_grad_norm: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weight changes (parameter name → dense delta in storage orientation, float32) for
        making ``prompt`` continue with ``target``; the model is not changed."""
        deltas, diag, _ = self.prepare_and_compute(
            model, tok, arch, prompt, target, old, min_grad_norm
        )
        return deltas, diag

    def prepare_and_compute(
        self,
        model: nn.Module,
        tok: Any,
        arch: ModelArch,
        prompt: str,
        target: str,
        old: str | None,
        min_grad_norm: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], PreparedRequest]:
        """:meth:`compute`, and the :class:`PreparedRequest` that scores the target after the
        edit without running the lower blocks again. The model is not changed."""
        device = get_module(model, arch.embed).weight.device
        ex: ExampleBatch = example_batch(tok, [(prompt, target)], device)
        # The blocks below the first edited one run once, without autograd; the gradient pass
        # and the score after the edit start from their output.
        cache = HiddenCache.fill(model, arch, min(self.layers), ex)
        factors, _, loss = edit_gradient_factors(model, arch, self.layers, ex, cache)
        deltas, diag = self.from_factors(
            model, tok, arch, factors, loss, prompt, target, old, min_grad_norm
        )
        return deltas, diag, PreparedRequest(ex, cache)

    def from_factors(
        self,
        model: nn.Module,
        tok: Any,
        arch: ModelArch,
        factors: Factors,
        loss: float,
        prompt: str,
        target: str,
        old: str | None,
        min_grad_norm: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        gnorm = factors.grad_norm()
        if not torch.isfinite(torch.tensor(gnorm)) or gnorm <= min_grad_norm:
            raise ZeroGradientError(
                f"the fine-tuning gradient of {prompt!r} -> {target!r} is {gnorm:.3g} "
                f"(NLL {loss:.3g}): the model already predicts the target, so there is nothing to "
                "edit. The model was not changed."
            )
        cond = None
        if self.family == "ke":
            text = f"{(old or '').strip()} >> {target.strip()} || {prompt}"
            cond = condition_embeddings(model, arch, tok, text)
        with torch.no_grad():
            deltas = self.net(factors, cond)
        out = {n: to_storage(arch, d) for n, d in zip(self.param_names(arch), deltas, strict=True)}
        diag = {
            "nll_before": loss,
            "grad_norm": gnorm,
            "delta_norms": [float(d.norm()) for d in deltas],
        }
        return out, diag
