"""What learned editors compute on the base model.

* :class:`FactorCapture`: the rank-one gradient factors of each edited linear layer (its input
  ``u`` and the gradient ``delta`` of the loss with respect to its output, per token), from
  which the fine-tuning gradient is ``sum_t delta_t u_t^T``.
* :class:`DeltaInjection`: a forward pass *as if* ``W + dW`` were the weights, without touching
  the parameters (so the editor network can be trained through ``dW``).
* :class:`HiddenCache` and :func:`top_hidden`: the blocks below the first edited block never
  change while an editor trains, so the hidden state entering that block is computed once per
  example and later passes run only the top blocks (the lower blocks are swapped for
  pass-throughs that return the cached state).

Everything takes module names from :class:`~factedit.arch.ModelArch`; nothing here spells a
module path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ModelArch
from ..hooks import Trace, as_batch_seq, first_tensor, frozen_parameters, get_module
from ..tokens import PromptTargetBatch, prompt_target_batch


def default_layers(arch: ModelArch, n: int = 3) -> list[int]:
    """The MLP output projections of the last ``n`` blocks (MEND's and KE's default)."""
    return list(range(max(0, arch.n_layers - n), arch.n_layers))


def resolve_layers(arch: ModelArch, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against the model (negative indices count from the top), sorted."""
    if layers is None:
        return default_layers(arch)
    if not layers:
        raise ValueError("layers is empty: name at least one layer to edit")
    out = []
    for i in layers:
        arch.layer_name(i)  # raises IndexError naming the valid range
        out.append(i % arch.n_layers)
    return sorted(set(out))


def layer_shapes(model: nn.Module, arch: ModelArch, layers: Sequence[int]) -> list[tuple[int, int]]:
    """``(out, in)`` of each edited projection."""
    return [tuple(arch.mlp_out_weight_as_out_in(model, i).shape) for i in layers]  # type: ignore[misc]


def to_storage(arch: ModelArch, delta_out_in: torch.Tensor) -> torch.Tensor:
    """A delta in ``(out, in)`` orientation as the parameter stores it."""
    return delta_out_in.T.contiguous() if arch.mlp_out_transposed else delta_out_in


@dataclass
class Factors:
    """Per edited layer: inputs ``u`` ``(tokens, in)`` and output gradients ``delta``
    ``(tokens, out)`` of one row, at its non-padding positions."""

    u: list[torch.Tensor]
    delta: list[torch.Tensor]

    def gradients(self) -> list[torch.Tensor]:
        """The fine-tuning gradient of each layer, ``(out, in)``."""
        return [d.T @ u for u, d in zip(self.u, self.delta, strict=True)]

    def grad_norm(self) -> float:
        return float(sum(float(g.norm()) for g in self.gradients()))


class FactorCapture(contextlib.AbstractContextManager):
    """Record each edited projection's input and make its output's gradient observable.

    Inside the block, a forward pass adds a zero "probe" tensor (requiring grad) to each
    edited projection's output; after ``loss.backward()``, :meth:`factors` returns the inputs
    and the probes' gradients (which are the gradients with respect to the outputs). The model's
    parameters need not require grad. Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, arch: ModelArch, layers: Sequence[int]) -> None:
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.probes: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []
        for j, i in enumerate(layers):
            module = get_module(model, arch.mlp_out_name(i))
            self._handles.append(module.register_forward_hook(self._hook(j)))

    def _hook(self, j: int):
        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self.inputs[j] = first_tensor(args).detach()
            probe = torch.zeros_like(output, requires_grad=True)
            self.probes[j] = probe
            return output + probe

        return hook

    def factors(self, row: int, mask: torch.Tensor) -> Factors:
        """Factors of batch row ``row`` at the positions where ``mask`` (``(seq,)``) is true."""
        us, ds = [], []
        for inp, probe in zip(self.inputs, self.probes, strict=True):
            if inp is None or probe is None:
                raise RuntimeError("no forward pass went through the edited layers")
            grad = probe.grad if probe.grad is not None else torch.zeros_like(probe)
            # Some models (OPT) run their MLP on flattened (batch * seq, width) activations.
            seq = mask.shape[0]
            inp, grad = (
                as_batch_seq(t, t.numel() // (seq * t.shape[-1]), seq) for t in (inp, grad)
            )
            us.append(inp[row][mask].float())
            ds.append(grad[row][mask].float())
        return Factors(us, ds)

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeltaInjection(contextlib.AbstractContextManager):
    """Inside the block, each edited projection computes ``(W + dW) x`` (``dW`` in ``(out, in)``
    orientation, with autograd through ``dW``); the parameters are not touched."""

    def __init__(
        self,
        model: nn.Module,
        arch: ModelArch,
        layers: Sequence[int],
        deltas: Sequence[torch.Tensor],
    ) -> None:
        self._handles = []
        for i, d in zip(layers, deltas, strict=True):
            module = get_module(model, arch.mlp_out_name(i))

            def hook(
                mod: nn.Module, args: tuple, output: torch.Tensor, d: torch.Tensor = d
            ) -> torch.Tensor:
                x = first_tensor(args)
                return output + F.linear(x.to(d.dtype), d).to(output.dtype)

            self._handles.append(module.register_forward_hook(hook))

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


# ---- rows of one training example --------------------------------------------------------------


@dataclass
class ExampleBatch:
    """The rows of one example, left-padded: 0 the edit, 1 its rephrase, 2 the locality prompt.

    Target positions/ids come from :func:`~factedit.tokens.prompt_target_batch`;
    ``hidden`` (optional) is the cached state entering the first edited block.
    """

    batch: PromptTargetBatch
    hidden: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.attention_mask.bool()


def example_batch(tok, rows: Sequence[tuple[str, str]], device: torch.device) -> ExampleBatch:
    """Tokenise ``(prompt, target)`` rows into one :class:`ExampleBatch` on ``device``."""
    b = prompt_target_batch(tok, [p for p, _ in rows], [t for _, t in rows]).to(device)
    return ExampleBatch(b)


@contextlib.contextmanager
def start_at_block(
    model: nn.Module, arch: ModelArch, first: int, hidden: torch.Tensor, tuple_len: int
) -> Iterator[None]:
    """Inside the block, blocks ``0 .. first-1`` do not compute: each returns ``hidden`` (in the
    output structure those blocks have: a tensor when ``tuple_len == 0``, else a tuple of that
    length whose other entries are ``None``), so block ``first`` receives the cached state."""
    blocks = [get_module(model, arch.layer_name(i)) for i in range(first)]
    saved = [b.__dict__.get("forward") for b in blocks]

    def passthrough(*args, **kwargs):
        return hidden if tuple_len == 0 else (hidden, *([None] * (tuple_len - 1)))

    try:
        for b in blocks:
            b.forward = passthrough
        yield
    finally:
        for b, s in zip(blocks, saved, strict=True):
            if s is None:
                del b.forward
            else:
                b.forward = s


@dataclass
class HiddenCache:
    """Where a model's top part starts: the first edited block and its output structure."""

    first: int
    tuple_len: int

    @classmethod
    def fill(
        cls, model: nn.Module, arch: ModelArch, first: int, ex: ExampleBatch
    ) -> HiddenCache | None:
        """Compute ``ex.hidden`` (the input of block ``first``) with one pass of the lower
        blocks; return the structure to skip them later (``None`` when ``first == 0``)."""
        if first == 0:
            return None
        with torch.no_grad(), Trace(model, arch.layer_name(first - 1), stop=True) as tr:
            model(
                input_ids=ex.batch.input_ids,
                attention_mask=ex.batch.attention_mask,
                use_cache=False,
            )
        out = tr.output
        ex.hidden = first_tensor(out).detach()
        return cls(first, 0 if isinstance(out, torch.Tensor) else len(out))


def top_hidden(
    model: nn.Module, arch: ModelArch, ex: ExampleBatch, cache: HiddenCache | None
) -> torch.Tensor:
    """The last block's output for the rows of ``ex`` (lower blocks skipped when cached)."""
    ctx = (
        start_at_block(model, arch, cache.first, ex.hidden, cache.tuple_len)
        if cache is not None and ex.hidden is not None
        else contextlib.nullcontext()
    )
    with ctx, Trace(model, arch.layer_name(arch.n_layers - 1), stop=True) as tr:
        model(input_ids=ex.batch.input_ids, attention_mask=ex.batch.attention_mask, use_cache=False)
    return first_tensor(tr.output)


def row_logits(
    model: nn.Module, arch: ModelArch, hidden: torch.Tensor, row: int, positions: Sequence[int]
) -> torch.Tensor:
    """Float32 logits of ``row`` at ``positions`` (only those go through the unembedding)."""
    return arch.logits_from_hidden(model, hidden[row, list(positions)]).float()


def nll(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Mean negative log-likelihood of ``ids`` under ``logits`` ``(len(ids), vocab)``."""
    lp = torch.log_softmax(logits, dim=-1)
    idx = torch.tensor(list(ids), device=lp.device)
    return -lp[torch.arange(len(idx), device=lp.device), idx].mean()


def token_accuracy(logits: torch.Tensor, ids: Sequence[int]) -> float:
    """Fraction of target tokens that are the argmax (teacher-forced)."""
    idx = torch.tensor(list(ids), device=logits.device)
    return float((logits.argmax(-1) == idx).float().mean())


def positions_of(mask_row: torch.Tensor) -> list[int]:
    return torch.nonzero(mask_row, as_tuple=False).flatten().tolist()


def edit_gradient_factors(
    model: nn.Module,
    arch: ModelArch,
    layers: Sequence[int],
    ex: ExampleBatch,
    cache: HiddenCache | None,
) -> tuple[Factors, torch.Tensor, float]:
    """Gradient factors of the edit row's target NLL (row 0), the last block's output for all
    rows (detached; for pre-edit references) and the edit row's loss."""
    # Parameters frozen: backward must fill only the probes, never the weights' .grad.
    with frozen_parameters(model), FactorCapture(model, arch, layers) as cap, torch.enable_grad():
        hidden = top_hidden(model, arch, ex, cache)
        b = ex.batch
        loss = nll(row_logits(model, arch, hidden, 0, b.target_positions[0]), b.target_ids[0])
        loss.backward()
    return cap.factors(0, ex.mask[0]), hidden.detach(), float(loss.detach())
