"""Knowledge neurons (Dai et al. 2022): attribute a fact to MLP neurons, then edit their values.

Attribution: integrated gradients of the probability of the prompt's answer token with respect
to the MLP intermediate activations (the input of the MLP output projection) at the prompt's
last token, one layer at a time: the layer's activation ``a`` is scaled by ``alpha = k/m``
(``k = 1..m``), the gradients of ``P(answer)`` at the scaled points are averaged, and the
attribution of neuron ``j`` is ``a_j * mean_grad_j``. The ``m`` steps of one layer run as one
batch; the prompt's prefix is encoded once and its key/value cache reused, so each layer costs
one forward and backward of ``m`` single-token rows.

Selection: neurons whose attribution exceeds ``threshold x`` the largest attribution over all
attributed layers (Dai et al.: 0.2), at most ``max_neurons`` of them (highest first).

Edit (Dai et al.'s "updating facts"): each selected neuron's value vector (its column of the
MLP output projection in ``(out, in)`` orientation) moves away from the old answer's
unembedding direction and toward the new target's::

    v_j += sign(a_j) * |v_j| * (lambda_new * e_new / |e_new| - lambda_erase * e_old / |e_old|)

Two adaptations, documented in ``docs/baselines.md``: the embeddings are normalised and scaled
by the value vector's norm, so ``lambda`` means "a fraction of the neuron's own write" on any
model; and the sign of the neuron's activation is applied, because gated MLPs (SwiGLU) have
negative activations, for which adding ``e_new`` to ``v_j`` would push away from the target.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import torch
from torch import nn

from ..arch import ModelArch
from ..hooks import Trace, frozen_parameters, get_module, hooks_removed_on_exit, parameter_value
from ..hparams import HParams
from ..models import model_device
from ..requests import EditRequest
from ..scoring import target_prob
from ..tokens import encode_target
from .base import EditContext, EditError, EditMethod, PhaseTimer, WeightEditor

log = logging.getLogger(__name__)

_ANSWERS = ("target_true", "prediction")


@dataclasses.dataclass
class KNHParams(HParams):
    """Hyperparameters of knowledge-neuron editing.

    Attributes:
        layers: layers whose MLP neurons are attributed (``None``: all layers).
        steps: integrated-gradients steps ``m`` (Riemann sum at ``alpha = k/m``).
        threshold: keep neurons with attribution ``> threshold x`` the maximum attribution.
        max_neurons: at most this many neurons (the highest attributions) are edited.
        lambda_erase: weight of the old answer's direction removed from each value vector.
        lambda_new: weight of the new target's direction added to each value vector.
        answer: the answer to attribute: ``"target_true"`` (the request's true target, falling
            back to the model's prediction when the request has none) or ``"prediction"`` (the
            model's top next token).
    """

    layers: list[int] | None = None
    steps: int = 20
    threshold: float = 0.2
    max_neurons: int = 10
    lambda_erase: float = 1.0
    lambda_new: float = 1.0
    answer: str = "target_true"

    def adapt(self, arch: ModelArch) -> Self:
        return self


@dataclasses.dataclass
class Attribution:
    """Integrated-gradients attribution of one prompt's answer to MLP neurons.

    ``scores[r, j]`` belongs to neuron ``j`` of layer ``layers[r]``; ``activations`` are the
    unscaled activations at the prompt's last token (same shape).
    """

    layers: list[int]
    scores: torch.Tensor
    activations: torch.Tensor
    answer_id: int
    answer_prob: float

    def select(self, threshold: float, max_neurons: int) -> list[tuple[int, int, float]]:
        """``(layer, neuron, score)`` with score ``> threshold x max``, highest first (ties by
        position, so the result is deterministic), at most ``max_neurons``."""
        top = float(self.scores.max())
        if top <= 0:
            return []
        flat = self.scores.flatten()
        idx = torch.nonzero(flat > threshold * top).flatten()
        # Stable sort: equal scores keep index order.
        order = torch.sort(flat[idx], descending=True, stable=True).indices
        width = self.scores.shape[1]
        out = []
        for k in idx[order][:max_neurons].tolist():
            out.append((self.layers[k // width], k % width, float(flat[k])))
        return out


def _prompt_ids(tok: Any, text: str) -> list[int]:
    ids = tok(text)["input_ids"]
    if not ids:
        raise ValueError(f"the prompt {text!r} maps to no tokens")
    return ids


@torch.no_grad()
def _prefix_cache(model: nn.Module, ids: torch.Tensor) -> Any:
    """The key/value cache of ``ids`` (batch 1), or ``None`` for an empty prefix."""
    if ids.shape[1] == 0:
        return None
    out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_token_forward(
    model: nn.Module, last: torch.Tensor, cache: Any, prefix_len: int
) -> torch.Tensor:
    """Logits of the last token for a batch of rows sharing a (deep-copied) prefix cache."""
    rows = last.shape[0]
    mask = torch.ones((rows, prefix_len + 1), dtype=torch.long, device=last.device)
    if cache is None:
        return model(input_ids=last, attention_mask=mask, use_cache=False).logits[:, -1]
    # Forward passes append to a cache in place; each batch gets its own copy.
    past = copy.deepcopy(cache)
    if rows > 1:
        past.batch_repeat_interleave(rows)
    kwargs = {_cache_kwarg(model): past}
    return model(input_ids=last, attention_mask=mask, use_cache=True, **kwargs).logits[:, -1]


def kn_attribution(
    model: nn.Module,
    tok: Any,
    arch: ModelArch,
    text: str,
    answer_id: int | None = None,
    layers: Sequence[int] | None = None,
    steps: int = 20,
) -> Attribution:
    """Integrated-gradients attribution of ``answer_id`` (default: the model's top next token)
    after ``text`` to the MLP intermediate neurons of ``layers`` (default: all).

    Guarantees: deterministic for fixed weights and inputs (no sampling, fixed step points);
    the model's weights and ``requires_grad`` flags are unchanged afterwards.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    layers = list(range(arch.n_layers)) if layers is None else [i % arch.n_layers for i in layers]
    device = model_device(model)
    ids = torch.tensor([_prompt_ids(tok, text)], device=device)
    prefix, last = ids[:, :-1], ids[:, -1:]
    cache = _prefix_cache(model, prefix)
    names = [arch.mlp_out_name(i) for i in layers]

    # Unscaled activations at the last token, and the answer.
    with torch.no_grad():
        traces = {}
        with contextlib.ExitStack() as stack:
            for n in names:
                traces[n] = stack.enter_context(
                    Trace(model, n, retain_output=False, retain_input=True, detach=True)
                )
            logits = _last_token_forward(model, last, cache, prefix.shape[1])
        probs = torch.softmax(logits[0].float(), dim=-1)
        if answer_id is None:
            answer_id = int(probs.argmax())
        # On the inputs' device: layers may compute on several devices under a device map.
        acts = torch.stack([traces[n].input[0, -1].float().to(device) for n in names])

    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    scores = torch.zeros_like(acts)
    with frozen_parameters(model):
        for r, name in enumerate(names):
            scaled = (alphas[:, None] * acts[r][None, :]).requires_grad_(True)

            def replace_input(
                mod: nn.Module, args: tuple, kwargs: dict, scaled: torch.Tensor = scaled
            ) -> Any:
                x = args[0]
                x = torch.cat([x[:, :-1], scaled.to(x.device, x.dtype)[:, None, :]], dim=1)
                return (x, *args[1:]), kwargs

            module = get_module(model, name)
            with hooks_removed_on_exit([]) as handles:
                handles.append(module.register_forward_pre_hook(replace_input, with_kwargs=True))
                out = _last_token_forward(model, last.expand(steps, 1), cache, prefix.shape[1])
            prob = torch.softmax(out.float(), dim=-1)[:, answer_id]
            (grad,) = torch.autograd.grad(prob.sum(), scaled)
            scores[r] = acts[r] * grad.mean(dim=0)
    return Attribution(layers, scores.cpu(), acts.cpu(), answer_id, float(probs[answer_id]))


class KN(EditMethod):
    """Knowledge-neuron editing (Dai et al. 2022), see the module docstring."""

    name: ClassVar[str] = "kn"
    summary: ClassVar[str] = (
        "knowledge neurons: integrated-gradients attribution, then edits their value vectors"
    )
    hparams_class: ClassVar[type[HParams]] = KNHParams

    def check(self, hparams: HParams, arch: ModelArch) -> None:
        hp = hparams
        assert isinstance(hp, KNHParams)
        if hp.layers is not None:
            if not hp.layers:
                raise ValueError("layers is empty: name at least one layer (or null for all)")
            for i in hp.layers:
                arch.layer_name(i)
        if hp.steps < 1 or hp.max_neurons < 1:
            raise ValueError(
                f"need steps >= 1 and max_neurons >= 1, got {hp.steps}, {hp.max_neurons}"
            )
        if not 0 <= hp.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {hp.threshold}")
        if hp.answer not in _ANSWERS:
            raise ValueError(f"answer must be one of {_ANSWERS}, got {hp.answer!r}")

    def execute(
        self,
        model: nn.Module,
        tok: Any,
        requests: list[EditRequest],
        hparams: HParams,
        editor: WeightEditor,
        arch: ModelArch,
        context: EditContext,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        assert isinstance(hparams, KNHParams)
        hp = hparams
        timer = PhaseTimer(timings)
        out = []
        for req in requests:
            new_id = encode_target(tok, req.target_text)[0]
            answer_id = None
            if hp.answer == "target_true" and req.true_text is not None:
                answer_id = encode_target(tok, req.true_text)[0]
            with timer("score"):
                before = float(target_prob(model, tok, [req.text], [req.target_text])[0])
            with timer("attribution"):
                attr = kn_attribution(model, tok, arch, req.text, answer_id, hp.layers, hp.steps)
            neurons = attr.select(hp.threshold, hp.max_neurons)
            if not neurons:
                raise EditError(
                    f"no neuron has a positive attribution for {req.text!r}; nothing to edit"
                )
            with timer("edit"):
                deltas = value_deltas(model, arch, attr, neurons, attr.answer_id, new_id, hp)
                editor.apply(deltas)
            with timer("score"):
                after = float(target_prob(model, tok, [req.text], [req.target_text])[0])
            log.info(
                "kn: %s -> %r: %d neurons, p %.4f -> %.4f",
                req.subject,
                req.target_new,
                len(neurons),
                before,
                after,
            )
            out.append(
                {
                    "answer_token": tok.decode([attr.answer_id]),
                    "answer_prob": attr.answer_prob,
                    "neurons": [[layer, j, s] for layer, j, s in neurons],
                    "max_attribution": float(attr.scores.max()),
                    "layer_max_attribution": {
                        int(li): float(s)
                        for li, s in zip(attr.layers, attr.scores.max(dim=1).values, strict=True)
                    },
                    "target_prob_before": before,
                    "target_prob_after": after,
                }
            )
        return out


@torch.no_grad()
def value_deltas(
    model: nn.Module,
    arch: ModelArch,
    attr: Attribution,
    neurons: Sequence[tuple[int, int, float]],
    old_id: int,
    new_id: int,
    hp: KNHParams,
) -> dict[str, torch.Tensor]:
    """Dense deltas of the MLP output projections that move each selected neuron's value
    vector from the old answer's unembedding direction toward the new target's."""
    # parameter_value: offloaded weights (device maps) are read from their store.
    unembed = parameter_value(model, arch.unembed + ".weight")
    e_old = unembed[old_id].float()
    e_new = unembed[new_id].float()
    direction = hp.lambda_new * e_new / e_new.norm() - hp.lambda_erase * e_old / e_old.norm()
    deltas: dict[str, torch.Tensor] = {}
    row = {layer: r for r, layer in enumerate(attr.layers)}
    for layer, j, _ in neurons:
        name = arch.mlp_out_weight_name(layer)
        stored = parameter_value(model, name)
        w = stored.T if arch.mlp_out_transposed else stored
        d = deltas.setdefault(name, torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        sign = 1.0 if attr.activations[row[layer], j] >= 0 else -1.0
        d[:, j] += sign * w[:, j].float().norm() * direction.to(w.device)
    # Back to the parameter's storage orientation.
    if arch.mlp_out_transposed:
        deltas = {n: d.T.contiguous() for n, d in deltas.items()}
    return deltas
