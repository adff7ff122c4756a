"""Watch and change activations with forward hooks that undo themselves.

This is factedit's take on the research code's ``nethook``: :class:`Trace` retains one
module's input/output (and may replace the output), :class:`TraceDict` does the same for
several modules, and either can stop the forward pass after the last traced module so that
callers who only need early activations do not pay for the layers above.

Every hook is removed when the ``with`` block exits, including when it exits by exception, so
a model is never left with stray hooks.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

EditFn = Callable[[Any, str], Any]


class StopForward(Exception):
    """Raised inside a hook to abandon the rest of a forward pass.

    A :class:`Trace` or :class:`TraceDict` created with ``stop=True`` catches it when its
    ``with`` block exits, so user code normally never sees it.
    """


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (a dotted path as in ``named_modules``)."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError as exc:
        raise LookupError(f"{type(model).__name__} has no submodule {name!r}") from exc


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Return the parameter called ``name`` (a dotted path as in ``named_parameters``)."""
    try:
        return model.get_parameter(name)
    except AttributeError as exc:
        raise LookupError(f"{type(model).__name__} has no parameter {name!r}") from exc


def _offload_store(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """``(mapping, key)`` holding the value of a parameter that accelerate offloaded, else None.

    accelerate's offloading hook keeps such a parameter on the ``meta`` device between forward
    passes and loads it from its ``weights_map`` for each pass; the map is the parameter's
    real storage.
    """
    module_name, _, local = name.rpartition(".")
    module = get_module(model, module_name)
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        wmap = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and wmap is not None and local in wmap:
            return wmap, local
    return None


def is_offloaded(model: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` lives in an accelerate offload store (CPU or disk)."""
    return _offload_store(model, name) is not None


def parameter_value(model: nn.Module, name: str) -> torch.Tensor:
    """The current value of parameter ``name``: the parameter itself, or for a parameter that
    accelerate offloaded, the tensor its offload store holds (on the store's device)."""
    store = _offload_store(model, name)
    if store is None:
        return get_parameter(model, name)
    wmap, key = store
    return wmap[key]


def named_parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``named_parameters()`` with each offloaded parameter's stored value in place of its
    ``meta`` placeholder (see :func:`parameter_value`); shared parameters once."""
    for name, param in model.named_parameters():
        store = _offload_store(model, name)
        yield name, param if store is None else store[0][store[1]]


def set_parameter_value(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the parameter's value, bit-exactly (same dtype as the parameter).

    An ordinary parameter is overwritten in place. An offloaded one gets a new entry in its
    offload store's in-memory dictionary, which accelerate reads before its files, so the
    user's checkpoint and offload files are never written.
    """
    store = _offload_store(model, name)
    if store is None:
        param = get_parameter(model, name)
        with torch.no_grad():
            param.copy_(value)
        return
    wmap, key = store
    current = wmap[key]
    new = value.detach().to(device=current.device, dtype=current.dtype).clone()
    dataset, full = getattr(wmap, "dataset", wmap), getattr(wmap, "prefix", "") + key
    state = getattr(dataset, "state_dict", None)
    if isinstance(state, dict):
        state[full] = new
    elif hasattr(dataset, "__setitem__"):
        dataset[full] = new
    else:
        raise TypeError(f"cannot write the offloaded parameter {name!r}: its store is read-only")


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` where ``name`` was and return the module it replaced."""
    old = get_module(model, name)  # a clear LookupError for a wrong name
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new_module)
    return old


def set_requires_grad(requires_grad: bool, *objects: nn.Module | torch.Tensor) -> None:
    """Set ``requires_grad`` on every parameter of the given modules and on given tensors."""
    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                p.requires_grad_(requires_grad)
        elif isinstance(obj, torch.Tensor):
            obj.requires_grad_(requires_grad)
        else:
            raise TypeError(f"expected a module or a tensor, got {type(obj).__name__}")


def first_tensor(value: Any) -> torch.Tensor:
    """The main tensor of a module's input or output (the first element of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"no tensor found in {type(value).__name__}")


def with_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its main tensor (see :func:`first_tensor`) replaced by ``tensor``."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    raise TypeError(f"cannot replace the tensor in {type(value).__name__}")


def _keep(value: Any, clone: bool, detach: bool, retain_grad: bool) -> Any:
    if isinstance(value, torch.Tensor):
        if retain_grad and value.requires_grad:
            value.retain_grad()
        if detach:
            value = value.detach()
        if clone:
            value = value.clone()
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_keep(v, clone, detach, retain_grad) for v in value)
    return value


class Trace(contextlib.AbstractContextManager):
    """Retain (and optionally replace) one module's output and/or input during forward passes.

    Args:
        module: the module, or ``(model, name)`` through the ``model``/``layer`` arguments.
        retain_output: keep the output in ``self.output`` (the latest forward pass wins).
        retain_input: keep the main input tensor in ``self.input``.
        clone, detach: copy / detach what is retained (so in-place changes later don't alter it).
        retain_grad: call ``retain_grad()`` on the retained output so ``.grad`` is filled.
        edit_output: ``f(output, layer_name) -> new_output`` replaces the output.
        stop: raise :class:`StopForward` after this module runs; the exception is swallowed on exit.

    Guarantee: the hook is removed when the ``with`` block exits, however it exits.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
        _after: Callable[[str], None] | None = None,
    ) -> None:
        self.layer = layer or ""
        module = get_module(model, layer) if layer is not None else model
        self.output: Any = None
        self.input: torch.Tensor | None = None

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if retain_input:
                main = args[0] if args else next(iter(kwargs.values()), None)
                self.input = _keep(main, clone, detach, False)
            if edit_output is not None:
                output = edit_output(output, self.layer)
            if retain_output:
                self.output = _keep(output, clone, detach, retain_grad)
            if _after is not None:
                _after(self.layer)
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook, with_kwargs=True)
        self._stop = stop

    def close(self) -> None:
        self._handle.remove()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return self._stop and exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """A :class:`Trace` for each of several modules, as an ordered dict ``name -> Trace``.

    With ``stop=True`` the forward pass stops after whichever of the named modules runs last
    (in forward order), so layers above it are not computed. Same arguments as
    :class:`Trace`; ``edit_output`` receives the layer name so one function can serve all.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        missing = [n for n in names if n not in order]
        if missing:
            raise LookupError(f"{type(model).__name__} has no submodule(s) {missing}")
        self._stop = stop
        # Stop once every traced module has produced its output in this pass: registration
        # order is not execution order (a block is registered before its own MLP finishes).
        fired: set[str] = set()

        def after(name: str) -> None:
            fired.add(name)
            if stop and len(fired) == len(names):
                fired.clear()
                raise StopForward()

        try:
            for name in names:
                self[name] = Trace(
                    model,
                    name,
                    retain_output=retain_output,
                    retain_input=retain_input,
                    clone=clone,
                    detach=detach,
                    retain_grad=retain_grad,
                    edit_output=edit_output,
                    _after=after,
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return self._stop and exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def hooks_removed_on_exit(handles: list) -> Iterator[list]:
    """Collect raw hook handles in ``handles`` and remove them all on exit."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def as_batch_seq(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """View an activation as ``(batch, seq, width)``.

    Some models (OPT's MLP) run their linears on flattened ``(batch * seq, width)`` tensors;
    code that indexes token positions goes through this view.
    """
    if t.dim() == 3:
        return t
    if t.dim() == 2 and t.shape[0] == batch * seq:
        return t.view(batch, seq, t.shape[-1])
    raise ValueError(
        f"cannot view an activation of shape {tuple(t.shape)} as ({batch}, {seq}, width)"
    )


def parameters_castable(model: nn.Module) -> bool:
    """Whether :func:`cast_parameters` can run on ``model``: no parameter is offloaded (on the
    meta device, where accelerate's hooks would load the original dtype back)."""
    return not any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block every floating-point parameter holds a copy of its values in ``dtype``
    (a ``dtype`` forward then runs native ``dtype`` kernels, with no per-operation casts as
    under autocast). On exit each parameter gets its original tensor back, so the weights are
    bit-for-bit what they were, however the block exits. Buffers are left alone. The copies
    cost the parameters' size in ``dtype`` while the block runs."""
    saved = []
    try:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                saved.append((p, p.data))
                p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


@contextlib.contextmanager
def frozen_parameters(model: nn.Module, trainable: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Inside the block only ``trainable`` require grad (so backward computes nothing else);
    every parameter's ``requires_grad`` flag is restored on exit, however it exits."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
