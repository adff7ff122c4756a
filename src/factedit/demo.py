"""The research code's notebook session, as functions: ``demo_model_editing`` and
``generate_interactive``.

This module is a user surface (like the CLI): its functions print to a stream, ``sys.stdout``
by default, and read prompts from an input function, ``input`` by default. Both are injectable,
so notebooks, tests and other front ends can drive them.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from .generation import format_lens, generate, logit_lens
from .hooks import parameter_value, set_parameter_value
from .requests import EditRequest, as_requests
from .scoring import target_prob


@dataclass(frozen=True)
class DemoExample:
    """A request with the prompts the research code's notebook generates from."""

    name: str
    request: dict[str, Any]
    generation_prompts: list[str]


#: The research code's notebook examples, by name.
EXAMPLES: dict[str, DemoExample] = {
    e.name: e
    for e in (
        DemoExample(
            "steve-jobs",
            {
                "prompt": "{} was the founder of",
                "subject": "Steve Jobs",
                "target_new": {"str": "Microsoft"},
            },
            [
                "My favorite Steve Jobs product is",
                "Steve Jobs is most famous for creating",
                "The greatest accomplishment of Steve Jobs was",
                "Steve Jobs was responsible for",
                "Steve Jobs worked for",
            ],
        ),
        DemoExample(
            "lebron-james",
            {
                "prompt": "{} plays the sport of",
                "subject": "LeBron James",
                "target_new": {"str": "football"},
            },
            [
                "LeBron James plays for the",
                "The greatest strength of LeBron James is",
                "LeBron James is widely regarded as one of the",
                "LeBron James is known for his unstoppable",
                "My favorite part of LeBron James' game is",
                "LeBron James excels at",
            ],
        ),
        DemoExample(
            "mario-kart",
            {
                "prompt": "{} was developed by",
                "subject": "Mario Kart",
                "target_new": {"str": "Apple"},
            },
            [
                "Mario Kart was created by",
                "I really want to get my hands on Mario Kart.",
                "Mario Kart is",
                "Which company created Mario Kart?",
            ],
        ),
    )
}


class OriginalWeights(dict):
    """The research code's ``orig_weights``: parameter name → original value.

    ``for k, v in orig_weights.items(): get_parameter(model, k)[...] = v`` (inside
    ``torch.no_grad()``) restores the model. :attr:`result` is the full
    :class:`~factedit.methods.EditResult` (``result.restore()``, ``result.save(path)``, ...).
    """

    result: Any = None


# ---- demo_model_editing ----------------------------------------------------------------------


def demo_model_editing(
    model: nn.Module,
    tok: Any,
    requests: EditRequest | Mapping | Sequence,
    generation_prompts: Sequence[str],
    alg_name: str = "ROME",
    hparams: Any = None,
    *,
    max_new_tokens: int = 40,
    top_k: int | None = None,
    seed: int | None = 0,
    out: TextIO | None = None,
    context: Any = None,
) -> tuple[nn.Module, OriginalWeights]:
    """Generate from ``generation_prompts``, edit the model with ``alg_name``, generate again,
    and print target probabilities and the generations before and after, paired.

    The model is edited in place and stays edited. Returns ``(model, orig_weights)`` as the
    research code did; ``orig_weights.result`` is the :class:`~factedit.methods.EditResult`.
    Generation is greedy unless ``top_k`` is given (then sampled with ``seed``), so the
    default demo is deterministic. If the edit fails, the model is unchanged (see
    :func:`factedit.methods.edit`).
    """
    from .methods import edit

    out = out if out is not None else sys.stdout
    reqs = as_requests(requests)
    prompts = list(generation_prompts)
    gen_kw = dict(max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
    score_prompts = [r.text for r in reqs] + [r.text for r in reqs if r.true_text]
    score_targets = [r.target_text for r in reqs] + [r.true_text for r in reqs if r.true_text]

    before_p = target_prob(model, tok, score_prompts, score_targets)
    before = generate(model, tok, prompts, **gen_kw) if prompts else []
    t0 = time.perf_counter()
    result = edit(model, tok, reqs, alg_name, hparams, context=context)
    seconds = time.perf_counter() - t0
    after_p = target_prob(model, tok, score_prompts, score_targets)
    after = generate(model, tok, prompts, **gen_kw) if prompts else []

    label = result.method.upper()
    w = out.write
    for r in reqs:
        w(f"[{label}] {r.text} -> {r.target_new!r}\n")
    touched = ", ".join(sorted(result.original))
    w(f"edited {touched} in {seconds:.1f} s\n\n")
    w("target probability (per-token geometric mean)   before     after\n")
    for p, t, b, a in zip(
        score_prompts, score_targets, before_p.tolist(), after_p.tolist(), strict=True
    ):
        w(f"  {_clip(p + t, 45):<45}  {b:8.4f}  {a:8.4f}\n")
    how = "greedy" if top_k is None or top_k <= 1 else f"top-{top_k} sampling, seed {seed}"
    w(f"\ngenerations ({how}, {max_new_tokens} new tokens), before and after the edit:\n")
    for p, b, a in zip(prompts, before, after, strict=True):
        w(f"\n  {p}\n")
        w(_wrapped(f"before | {p}", _continuation(b, p)))
        w(_wrapped(f"after  | {p}", _continuation(a, p)))
    w("\n")
    if hasattr(out, "flush"):
        out.flush()
    orig = OriginalWeights(result.original)
    orig.result = result
    return model, orig


def _continuation(text: str, prompt: str) -> str:
    return text[len(prompt) :] if text.startswith(prompt) else text


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _wrapped(head: str, tail: str, width: int = 100) -> str:
    # Newlines in generations would break the pairing of lines; show them as a visible mark.
    text = (head + tail).replace("\n", " ⏎ ")
    return (
        textwrap.fill(text, width=width, initial_indent="    ", subsequent_indent="           ")
        + "\n"
    )


# ---- interactive generation ------------------------------------------------------------------


@dataclass
class ChatTurn:
    """One prompt of :func:`generate_interactive` and what was shown for it."""

    prompt: str
    edited: str
    original: str | None = None
    lens: list[Any] = field(default_factory=list)
    original_lens: list[Any] = field(default_factory=list)
    cancelled: bool = False


def undo_state(edit: Any) -> dict[str, torch.Tensor]:
    """The pre-edit values of the parameters an edit touched: ``edit.original`` of an
    :class:`~factedit.methods.EditResult`, :class:`~factedit.saving.AppliedEdit` or
    :class:`~factedit.saving.AppliedEdits`, or a plain mapping of name → tensor."""
    if isinstance(edit, Mapping):
        return dict(edit)
    original = getattr(edit, "original", None)
    if not isinstance(original, Mapping):
        raise TypeError(
            "compare_against must be an EditResult, an applied edit or a mapping of parameter "
            f"name -> original tensor, got {type(edit).__name__}"
        )
    return dict(original)


@contextlib.contextmanager
def swapped_out(model: nn.Module, original: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the touched parameters hold their pre-edit values; on exit (however
    the block exits) they hold exactly the edited values again.

    Only the touched parameters are copied, so comparing against the original model costs one
    extra copy of the edited matrices, not a second model.
    """
    edited = {n: parameter_value(model, n).detach().clone() for n in original}
    try:
        with torch.no_grad():
            for n, v in original.items():
                set_parameter_value(model, n, v)
        yield
    finally:
        with torch.no_grad():
            for n, v in edited.items():
                set_parameter_value(model, n, v)


def generate_interactive(
    model: nn.Module,
    tok: Any,
    max_out_len: int = 100,
    top_k: int | None = 5,
    use_logit_lens: bool = False,
    compare_against: Any = None,
    *,
    lens_top_k: int = 5,
    seed: int | None = 0,
    input_fn: Callable[[str], str] | None = None,
    out: TextIO | None = None,
    prompt_text: str = "Enter a prompt: ",
    status: Callable[[str | None], None] | None = None,
) -> list[ChatTurn]:
    """A prompt loop: continue each prompt with ``model``; with ``compare_against`` (the edit
    that made ``model``), also with the original weights beside it; with ``use_logit_lens``,
    print each layer's top tokens at the prompt's last position (for both models when
    comparing).

    ``max_out_len`` counts prompt and continuation tokens together, as in the research code.
    ``top_k`` samples from the top k tokens (``None`` or 1: greedy); ``seed`` makes each turn
    repeatable and gives both models the same random stream. ``status``, when given, is called
    with a short description of the work in progress (``"generating (edited model) ..."``) and
    with ``None`` when it is done, for a front end's busy indicator.

    An empty line or end of input (Ctrl-D) ends the loop. Ctrl-C (``KeyboardInterrupt``)
    while a prompt is being worked on cancels that prompt only (the turn is returned with
    ``cancelled=True``); Ctrl-C at the prompt discards the line, and a second one in a row
    ends the loop. Guarantee: after every turn (and on any exception or interruption) the
    weights are exactly the edited weights; the original values are swapped in only while
    generating the comparison. Returns the turns.
    """
    ask = input_fn if input_fn is not None else input
    out = out if out is not None else sys.stdout
    busy = status if status is not None else (lambda message: None)
    original = undo_state(compare_against) if compare_against is not None else None
    if original is not None:
        other = getattr(compare_against, "model", None)
        if other is not None and other is not model:
            raise ValueError("compare_against belongs to another model")
        if getattr(compare_against, "restored", False) or getattr(
            compare_against, "reverted", False
        ):
            raise ValueError("compare_against has been undone; the model is not edited any more")
    gen_kw = dict(top_k=top_k, seed=seed)
    turns: list[ChatTurn] = []
    interrupted_at_prompt = False
    while True:
        try:
            prompt = ask(prompt_text)
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            if interrupted_at_prompt:
                out.write("\n")
                break
            interrupted_at_prompt = True
            out.write("\n(Ctrl-C again, an empty line or Ctrl-D to quit)\n")
            continue
        interrupted_at_prompt = False
        if not prompt.strip():
            break
        turn = ChatTurn(prompt, "")
        try:
            _chat_turn(model, tok, turn, original, max_out_len, use_logit_lens, lens_top_k,
                       gen_kw, busy, out)  # fmt: skip
        except KeyboardInterrupt:
            turn.cancelled = True
            out.write("(cancelled)\n")
        finally:
            busy(None)
        out.write("\n")
        if hasattr(out, "flush"):
            out.flush()
        turns.append(turn)
    return turns


def _chat_turn(
    model: nn.Module,
    tok: Any,
    turn: ChatTurn,
    original: Mapping[str, torch.Tensor] | None,
    max_out_len: int,
    use_logit_lens: bool,
    lens_top_k: int,
    gen_kw: dict[str, Any],
    busy: Callable[[str | None], None],
    out: TextIO,
) -> None:
    """One prompt of :func:`generate_interactive`, filling ``turn`` as it goes (so a Ctrl-C
    keeps what was already shown)."""
    prompt = turn.prompt
    n_prompt = len(tok(prompt)["input_ids"])
    new_tokens = max(1, max_out_len - n_prompt)
    which = " (edited model)" if original is not None else ""
    busy(f"generating{which} ...")
    turn.edited = generate(model, tok, prompt, max_new_tokens=new_tokens, **gen_kw)[0]
    if original is None:
        busy(None)
        out.write(f"{turn.edited}\n")
    else:
        busy("generating (original model) ...")
        with swapped_out(model, original):
            turn.original = generate(model, tok, prompt, max_new_tokens=new_tokens, **gen_kw)[0]
        busy(None)
        out.write(f"[edited]   {turn.edited}\n[original] {turn.original}\n")
    if not use_logit_lens:
        return
    busy("logit lens ...")
    turn.lens = logit_lens(model, tok, prompt, top_k=lens_top_k)
    if original is not None:
        with swapped_out(model, original):
            turn.original_lens = logit_lens(model, tok, prompt, top_k=lens_top_k)
    busy(None)
    head = f"logit lens (top {lens_top_k} next tokens per layer after {prompt!r})"
    if original is None:
        out.write(f"{head}:\n{format_lens(turn.lens)}\n")
    else:
        out.write(f"{head}, edited model:\n{format_lens(turn.lens)}\n")
        out.write(f"{head}, original model:\n{format_lens(turn.original_lens)}\n")


__all__ = [
    "EXAMPLES",
    "ChatTurn",
    "DemoExample",
    "OriginalWeights",
    "demo_model_editing",
    "generate_interactive",
    "swapped_out",
    "undo_state",
]
