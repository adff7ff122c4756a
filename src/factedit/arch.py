"""Where things are inside a decoder-only transformer, found by inspecting its module tree.

:func:`describe` returns a :class:`ModelArch` naming the transformer blocks, each block's MLP,
the MLP output projection (the matrix ROME edits) and whether its weight is stored transposed
(GPT-2's ``Conv1D``), the attention module and its output projection, the input embedding, the
final norm and the unembedding. No other module of factedit spells a module path.

Detection uses structure only: the block list is the ``ModuleList`` with one entry per layer,
the MLP output projection is the linear map from the MLP's inner width back to the hidden
width, and so on. Models it cannot read can be described by hand with
:meth:`ModelArch.from_mapping`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .hooks import get_module, parameter_value


class UnsupportedArchitectureError(ValueError):
    """factedit could not find the parts it needs in this model."""


def _hint(model: nn.Module, problem: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"cannot read the architecture of {type(model).__name__}: {problem}. Describe it by hand: "
        "ModelArch.from_mapping(model, {'layers': 'model.layers', 'mlp': 'mlp', "
        "'mlp_out': 'mlp.down_proj', 'attn': 'self_attn', 'attn_out': 'self_attn.o_proj', "
        "'embed': 'model.embed_tokens', 'final_norm': 'model.norm', 'unembed': 'lm_head'}) "
        "(per-layer names relative to a block) and pass it as arch=..."
    )


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, transposed)`` for a linear-like module, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = getattr(module, "weight", None)
    # GPT-2's Conv1D stores weight as (in, out) and exposes nf = out.
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "nf"):
        return weight.shape[0], weight.shape[1], True
    return None


def _is_norm(module: nn.Module, hidden: int) -> bool:
    if isinstance(module, (nn.Embedding, nn.Linear)) or any(True for _ in module.children()):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (hidden,)


@dataclass(frozen=True)
class ModelArch:
    """Names of a model's parts. Per-layer names are relative to a block (``layers.{i}``).

    Attributes:
        layers: the ``ModuleList`` of transformer blocks.
        n_layers: number of blocks.
        mlp: the module whose output is the block's MLP output (the projection itself when the
            block has no separate MLP module, as in OPT).
        mlp_out: the MLP output projection ROME edits (maps ``mlp_size`` → ``hidden_size``).
        mlp_out_transposed: whether that weight is stored ``(in, out)`` rather than ``(out, in)``.
        attn: the attention module; ``attn_out`` its output projection.
        embed, final_norm, unembed: input embedding, final norm, output projection to the vocabulary.
        tied: whether the unembedding shares the input embedding's weight.
        hidden_size, mlp_size: widths of the residual stream and the MLP's inner layer.
    """

    model_class: str
    layers: str
    n_layers: int
    mlp: str
    mlp_out: str
    mlp_out_transposed: bool
    attn: str
    attn_out: str
    embed: str
    final_norm: str
    unembed: str
    tied: bool
    hidden_size: int
    mlp_size: int
    final_logit_softcapping: float | None = None

    # ---- names -------------------------------------------------------------------------
    def layer_name(self, i: int) -> str:
        """The block ``i`` (negative counts from the top)."""
        return f"{self.layers}.{self._check(i)}"

    def mlp_name(self, i: int) -> str:
        return self._join(i, self.mlp)

    def mlp_out_name(self, i: int) -> str:
        return self._join(i, self.mlp_out)

    def mlp_out_weight_name(self, i: int) -> str:
        """The parameter ROME edits at layer ``i``."""
        return self.mlp_out_name(i) + ".weight"

    def attn_name(self, i: int) -> str:
        return self._join(i, self.attn)

    def attn_out_name(self, i: int) -> str:
        return self._join(i, self.attn_out)

    def module_name(self, kind: str, i: int) -> str:
        """The module of ``kind`` (``"hidden"``/``"layer"``, ``"mlp"``, ``"attn"``) at layer ``i``."""
        if kind in ("hidden", "layer", "block", None):
            return self.layer_name(i)
        if kind == "mlp":
            return self.mlp_name(i)
        if kind == "attn":
            return self.attn_name(i)
        raise ValueError(f"unknown module kind {kind!r}; use 'hidden', 'mlp' or 'attn'")

    def _check(self, i: int) -> int:
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(
                f"layer {i} out of range: this model has layers 0..{self.n_layers - 1}"
            )
        return i % self.n_layers

    def _join(self, i: int, rel: str) -> str:
        return f"{self.layer_name(i)}.{rel}" if rel else self.layer_name(i)

    # ---- computations --------------------------------------------------------------------
    def logits_from_hidden(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the final norm and unembedding (and logit soft-capping, if any) to residuals."""
        return self.logits_from_normed(model, get_module(model, self.final_norm)(hidden))

    def logits_from_normed(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Unembed outputs of the final norm (and soft-cap the logits, if the model does)."""
        unembed = get_module(model, self.unembed)
        out = unembed(normed.to(unembed.weight.dtype))
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            out = torch.tanh(out / cap) * cap
        return out

    def mlp_out_weight_as_out_in(self, model: nn.Module, i: int) -> torch.Tensor:
        """The edited projection's weight as an ``(out, in)`` view, whatever its storage (for a
        weight accelerate offloaded, a view of the value its store holds, not the placeholder)."""
        w = parameter_value(model, self.mlp_out_weight_name(i))
        return w.T if self.mlp_out_transposed else w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, model: nn.Module, mapping: dict[str, str]) -> ModelArch:
        """Describe a model by hand.

        ``mapping`` needs ``layers``, ``mlp_out``, ``attn_out``, ``embed``, ``final_norm`` and
        ``unembed``; ``mlp`` and ``attn`` are optional (per-layer names relative to a block).
        Shapes and orientation are read from the modules.
        """
        required = ("layers", "mlp_out", "attn_out", "embed", "final_norm", "unembed")
        missing = [k for k in required if k not in mapping]
        if missing:
            raise ValueError(f"mapping lacks {missing}")
        unknown = sorted(set(mapping) - {*required, "mlp", "attn"})
        if unknown:
            raise ValueError(
                f"mapping has unknown key(s) {unknown}; known: {sorted(required)} + mlp, attn"
            )
        layers = get_module(model, mapping["layers"])
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"{mapping['layers']!r} is a {type(layers).__name__}, not a ModuleList"
            )
        proj = get_module(layers[0], mapping["mlp_out"])
        shape = _linear_shape(proj)
        if shape is None:
            raise ValueError(f"{mapping['mlp_out']!r} is not a linear layer")
        inner, hidden, transposed = shape
        # Fail now on a misspelt name rather than at the first edit or trace.
        for key in ("attn_out", "mlp", "attn"):
            if key in mapping:
                get_module(layers[0], mapping[key])
        get_module(model, mapping["final_norm"])
        embed = get_module(model, mapping["embed"])
        unembed = get_module(model, mapping["unembed"])
        return cls(
            model_class=type(model).__name__,
            layers=mapping["layers"],
            n_layers=len(layers),
            mlp=mapping.get("mlp", mapping["mlp_out"].rpartition(".")[0] or mapping["mlp_out"]),
            mlp_out=mapping["mlp_out"],
            mlp_out_transposed=transposed,
            attn=mapping.get("attn", mapping["attn_out"].rpartition(".")[0]),
            attn_out=mapping["attn_out"],
            embed=mapping["embed"],
            final_norm=mapping["final_norm"],
            unembed=mapping["unembed"],
            tied=getattr(unembed, "weight", None) is getattr(embed, "weight", 0),
            hidden_size=hidden,
            mlp_size=inner,
            final_logit_softcapping=_softcap(model),
        )


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    return getattr(text, "final_logit_softcapping", None)


def describe(model: nn.Module, mapping: dict[str, str] | None = None) -> ModelArch:
    """Find the parts of ``model`` (see :class:`ModelArch`).

    Raises:
        UnsupportedArchitectureError: naming the model class and how to describe it by hand.
    """
    if mapping is not None:
        return ModelArch.from_mapping(model, mapping)
    names = {id(m): n for n, m in model.named_modules()}

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embed, nn.Module):
        raise _hint(model, "it has no input embedding (get_input_embeddings)")
    hidden = embed.weight.shape[1]
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(unembed, nn.Module):
        raise _hint(model, "it has no output embedding (get_output_embeddings)")

    # The block list: the longest ModuleList of same-class modules that each hold linears.
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(b) for b in m}) == 1
        and any(_linear_shape(x) for x in m[0].modules())
    ]
    if not candidates:
        raise _hint(model, "no list of transformer blocks found")
    # Only outermost lists: a list inside a block (e.g. MoE experts) may be longer than the
    # block list itself.
    outer = [(n, m) for n, m in candidates if not any(n.startswith(c + ".") for c, _ in candidates)]
    layers_name, layers = max(outer, key=lambda nm: len(nm[1]))
    block = layers[0]

    linears = [(n, s) for n, m in block.named_modules() if (s := _linear_shape(m))]
    into_hidden = [(n, s) for n, s in linears if s[1] == hidden]
    if len(into_hidden) < 2:
        raise _hint(model, "could not find both the attention and MLP output projections")
    # The MLP's output projection reads the widest inner layer; attention's reads heads*dim.
    mlp_out, (inner, _, transposed) = max(into_hidden, key=lambda ns: ns[1][0])
    mlp_parent = mlp_out.rpartition(".")[0]
    others = [(n, s) for n, s in into_hidden if n != mlp_out and not n.startswith(mlp_parent + ".")]
    if not others:
        raise _hint(model, "could not tell the attention output projection from the MLP's")
    # Attention modules declare q/k/v before their output projection (Phi-3 declares o_proj
    # first, but its fused qkv does not map into the hidden size), so the last declared
    # candidate is the output projection; tests check this against the forward order.
    attn_out = others[-1][0]
    attn = attn_out.rpartition(".")[0] or attn_out
    mlp = mlp_parent if mlp_parent else mlp_out

    # The final norm: a norm-like module outside the blocks, sibling of the block list.
    parent_name = layers_name.rpartition(".")[0]
    parent = get_module(model, parent_name)
    norms = [
        f"{parent_name}.{n}" if parent_name else n
        for n, m in parent.named_children()
        if _is_norm(m, hidden)
    ]
    if len(norms) != 1:
        raise _hint(model, f"expected one final norm beside {layers_name!r}, found {norms}")

    return ModelArch(
        model_class=type(model).__name__,
        layers=layers_name,
        n_layers=len(layers),
        mlp=mlp,
        mlp_out=mlp_out,
        mlp_out_transposed=transposed,
        attn=attn,
        attn_out=attn_out,
        embed=names[id(embed)],
        final_norm=norms[0],
        unembed=names[id(unembed)],
        tied=unembed.weight is embed.weight,
        hidden_size=hidden,
        mlp_size=inner,
        final_logit_softcapping=_softcap(model),
    )
