"""The value optimisation shared by ROME, MEMIT and AlphaEdit, batched over requests.

For each request a vector δ is added to the output of one MLP at the subject's last token and
optimised so that the new target follows the request's prompt in every context template,
while a KL term keeps the next-token distribution after "{subject} is a" where it was, a
weight decay keeps δ small and a clamp bounds ‖δ‖ (Meng et al. 2022, 2023). v* = v₀ + δ.

Every request has its own δ, its own early stop and its own clamp, but all of them run in
one batched forward/backward pass: the loss is the sum of the requests' losses, and since
each δ only reaches its own rows, its gradient (and Adam's element-wise update) is exactly
what it would be alone. A request that has converged leaves the batch, so the passes get
cheaper as the optimisation proceeds. Public implementations loop over requests instead.

Speed: the blocks below the edited layer do not depend on δ, so their outputs are computed
once and replayed; logits are formed only at the positions a loss reads; the frozen network
can run under bfloat16 autocast with δ and the loss in float32.

Besides the mean target NLL, a request is done only when, on every prompt, the new target's
first token is more likely than the old target's first token (the model's own answer when the
request names none): this is what stops an edit from leaving a strongly known fact in place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import ModelArch
from .hooks import (
    TraceDict,
    as_batch_seq,
    first_tensor,
    frozen_parameters,
    get_module,
    replace_module,
    with_first_tensor,
)
from .models import model_device, parse_dtype
from .requests import EditRequest
from .tokens import encode_target, subject_token_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueConfig:
    """What the value optimisation needs from a method's hyperparameters.

    Attributes:
        steps: Adam steps at most (the last loss is measured, not stepped on).
        lr: Adam's learning rate for δ.
        weight_decay: weight of ‖δ‖² / ‖v₀‖² in the loss.
        clamp_norm_factor: ‖δ‖ is kept at most this times ‖v₀‖.
        kl_factor: weight of the KL term on ``kl_prompts``.
        kl_prompts: prompts (with ``{}`` for the subject) whose distribution must stay.
        early_stop_loss: a request is done once its mean target NLL is below this (and the
            new target's first token beats the old one's on every prompt).
        dtype: autocast dtype for the frozen network (``None``: the model's own).
        replay_lower_layers: compute the blocks below the layer once and replay them.
        margin: the log-probability by which the new target's first token must beat the old
            one's on every prompt before a request counts as done (``None`` disables the check).
    """

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    early_stop_loss: float = 0.05
    dtype: str | None = None
    replay_lower_layers: bool = True
    margin: float | None = 0.0

    @classmethod
    def from_hparams(cls, hp: Any, **overrides: Any) -> ValueConfig:
        """From a method's hyperparameters with the ``v_*`` field names of ROME/MEMIT."""
        margin = getattr(hp, "value_margin", 0.0)
        cfg = cls(
            steps=hp.v_num_grad_steps,
            lr=hp.v_lr,
            weight_decay=hp.v_weight_decay,
            clamp_norm_factor=hp.clamp_norm_factor,
            kl_factor=hp.kl_factor,
            kl_prompts=tuple(hp.kl_prompts),
            early_stop_loss=hp.early_stop_loss,
            dtype=hp.value_dtype,
            replay_lower_layers=hp.replay_lower_layers,
            margin=margin,
        )
        return cls(**{**cfg.__dict__, **overrides}) if overrides else cfg


@dataclass
class ValueResult:
    """The optimised shift for one request.

    ``delta`` is δ (float32, on the edited layer's device); ``v0`` the MLP output it was added
    to at the bare prompt's subject token; ``done`` whether the request met its stopping
    criterion within the step budget; ``clamped`` whether ‖δ‖ ended at its bound.
    """

    delta: torch.Tensor
    v0: torch.Tensor
    steps: int
    nll_first: float
    nll: float
    margin: float
    done: bool
    clamped: bool

    def info(self) -> dict[str, Any]:
        return {
            "v_steps": self.steps,
            "v_nll_first": self.nll_first,
            "v_nll": self.nll,
            "v_margin": self.margin,
            "v_done": self.done,
            "v_clamped": self.clamped,
            "delta_norm": self.delta.norm().item(),
        }


# ---- batches ------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Every request's prompts in one left-padded batch.

    Row kinds: rewrite rows (a template filled with the request's prompt, followed by the new
    target's tokens but the last) and KL rows (a KL prompt filled with the subject).
    """

    input_ids: torch.Tensor  # (rows, width)
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor  # (rows,) the subject's last token
    request: torch.Tensor  # (rows,) request index
    is_kl: torch.Tensor  # (rows,) bool
    bare: torch.Tensor  # (requests,) the row of each request's bare ("{}") prompt
    # Flattened NLL terms: (row, position, token, weight) with weights 1/(len(target)·n_templates).
    nll_row: torch.Tensor
    nll_pos: torch.Tensor
    nll_tok: torch.Tensor
    nll_w: torch.Tensor
    first_pos: torch.Tensor  # (rows,) position predicting the target's first token (rewrite rows)
    new_first: torch.Tensor  # (requests,) first token of the new target
    old_first: torch.Tensor  # (requests,) first token of the old target, -1 if none/same


def _fill(template: str, text: str) -> tuple[str, int]:
    head = template.split("{}")[0]
    return template.replace("{}", text), len(head)


def build_rows(
    tok: Any,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    kl_prompts: Sequence[str],
    old_first: Sequence[int | None],
) -> _Rows:
    """Tokenise every request's rewrite and KL prompts into one batch (see :class:`_Rows`)."""
    rows: list[list[int]] = []
    meta: list[tuple[int, int, bool, int]] = []  # request, subject end (from row end), kl, suffix len
    targets = []
    for j, r in enumerate(requests):
        tid = encode_target(tok, r.target_text)
        if not tid:
            raise ValueError(f"target {r.target_text!r} maps to no tokens")
        targets.append(tid)
        filled = [_fill(t, r.text) for t in templates] + [_fill(p, r.subject) for p in kl_prompts]
        for i, (text, start) in enumerate(filled):
            kl = i >= len(templates)
            ids = tok(text)["input_ids"]
            _, end = subject_token_range(tok, text, r.subject, start_char=start)
            suffix = [] if kl else tid[:-1]
            rows.append(ids + suffix)
            meta.append((j, end - 1 - len(ids) - len(suffix), kl, len(suffix)))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids_t)
    subj, req, is_kl, first = [], [], [], []
    nll_row, nll_pos, nll_tok, nll_w = [], [], [], []
    bare: list[int] = [-1] * len(requests)
    bare_index = list(templates).index("{}") if "{}" in templates else 0
    seen: dict[int, int] = {}
    for i, (row, (j, s_from_end, kl, n_suffix)) in enumerate(zip(rows, meta, strict=True)):
        off = width - len(row)
        ids_t[i, off:] = torch.tensor(row)
        mask[i, off:] = 1
        subj.append(width + s_from_end)
        req.append(j)
        is_kl.append(kl)
        prompt_last = width - 1 - n_suffix
        first.append(prompt_last)
        if not kl:
            k = seen.get(j, 0)
            seen[j] = k + 1
            if k == bare_index:
                bare[j] = i
            tid = targets[j]
            for t, token in enumerate(tid):
                nll_row.append(i)
                nll_pos.append(prompt_last + t)
                nll_tok.append(token)
                nll_w.append(1.0 / (len(tid) * len(templates)))
    new_first = [t[0] for t in targets]
    old = [(-1 if (o is None or o == nf) else o) for o, nf in zip(old_first, new_first, strict=True)]
    return _Rows(
        ids_t, mask, torch.tensor(subj), torch.tensor(req), torch.tensor(is_kl), torch.tensor(bare),
        torch.tensor(nll_row), torch.tensor(nll_pos), torch.tensor(nll_tok), torch.tensor(nll_w),
        torch.tensor(first), torch.tensor(new_first), torch.tensor(old),
    )  # fmt: skip


# ---- replaying the lower blocks -----------------------------------------------------------


class _Replay(nn.Module):
    """Stands in for a block whose output is fixed: returns the recorded output for the rows
    currently in the batch."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.full = output
        self.output = output

    def select(self, rows: torch.Tensor, n_rows: int) -> None:
        self.output = _take_rows(self.full, rows, n_rows)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _take_rows(value: Any, rows: torch.Tensor, n_rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == n_rows:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, n_rows) for v in value)
    return value


@contextlib.contextmanager
def _replayed_blocks(model: nn.Module, arch: ModelArch, outputs: list[Any]) -> Iterator[list[_Replay]]:
    """Replace blocks ``0..len(outputs)-1`` by :class:`_Replay` stand-ins; put them back on exit."""
    originals, stand_ins = [], []
    try:
        for i, out in enumerate(outputs):
            stand_in = _Replay(out)
            originals.append(replace_module(model, arch.layer_name(i), stand_in))
            stand_ins.append(stand_in)
        yield stand_ins
    finally:
        for i, block in enumerate(originals):
            replace_module(model, arch.layer_name(i), block)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (a layer's own device, also under a device map)."""
    for p in module.parameters():
        return p.device
    raise ValueError("module has no parameters")


# ---- the optimisation ---------------------------------------------------------------------


def optimize_values(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    arch: ModelArch,
    layer: int,
    templates: Sequence[str],
    cfg: ValueConfig,
    *,
    old_first: Sequence[int | None] | None = None,
    init: Sequence[torch.Tensor | None] | None = None,
    progress: bool = False,
) -> list[ValueResult]:
    """Optimise one δ per request at the output of ``layer``'s MLP, all in one batch.

    Args:
        old_first: per request, the token id the new target must beat (the old target's first
            token); ``None`` entries (or the argument) skip that criterion.
        init: per request, a δ to start from (to continue an earlier optimisation).

    The model's weights are unchanged when this returns (only activations are altered,
    through hooks and stand-in modules that are removed on exit, however it exits).
    """
    if not requests:
        return []
    old_first = list(old_first) if old_first is not None else [None] * len(requests)
    if cfg.margin is None:
        old_first = [None] * len(requests)
    in_device = model_device(model)
    device = module_device(get_module(model, arch.mlp_name(layer)))
    b = build_rows(tok, requests, templates, cfg.kl_prompts, old_first)
    n_rows, n_req = b.input_ids.shape[0], len(requests)
    ids_all, mask_all = b.input_ids.to(in_device), b.attention_mask.to(in_device)
    subj_all, req_all = b.subject_pos.to(device), b.request.to(device)
    kl_all = b.is_kl.to(device)
    new_first, old_first_t = b.new_first.to(device), b.old_first.to(device)
    nll_row, nll_pos = b.nll_row.to(device), b.nll_pos.to(device)
    nll_tok, nll_w = b.nll_tok.to(device), b.nll_w.to(device)
    first_pos_all = b.first_pos.to(device)

    deltas = [
        (init[j].detach().clone().float().to(device) if init is not None and init[j] is not None
         else torch.zeros(arch.hidden_size, device=device)).requires_grad_(True)
        for j in range(n_req)
    ]  # fmt: skip
    v0 = torch.zeros(n_req, arch.hidden_size, device=device)
    mlp_name, norm_name = arch.mlp_name(layer), arch.final_norm
    autocast_dtype = parse_dtype(cfg.dtype)

    replay: list[Any] = []
    if cfg.replay_lower_layers and layer > 0:
        names = [arch.layer_name(i) for i in range(layer)]
        with torch.no_grad(), TraceDict(model, names, stop=True, detach=True) as td:
            model(input_ids=ids_all, attention_mask=mask_all, use_cache=False)
        replay = [td[n].output for n in names]

    active = torch.ones(n_req, dtype=torch.bool)
    state: dict[str, Any] = {}

    def select(rows: torch.Tensor) -> None:
        """Make ``rows`` (indices into the full batch) the current batch."""
        state["rows"] = rows
        rows_d = rows.to(device)
        state["ids"], state["mask"] = ids_all[rows.to(in_device)], mask_all[rows.to(in_device)]
        state["subj"], state["req"] = subj_all[rows_d], req_all[rows_d]
        # Map full-batch row indices to positions in the current batch.
        where = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        where[rows_d] = torch.arange(len(rows), device=device)
        keep = where[nll_row] >= 0
        state["nll"] = (where[nll_row[keep]], nll_pos[keep], nll_tok[keep], nll_w[keep], req_all[nll_row[keep]])
        rw = ~kl_all[rows_d]
        state["rw_local"] = torch.nonzero(rw).squeeze(1)
        state["rw_first"] = first_pos_all[rows_d][rw]
        state["rw_req"] = req_all[rows_d][rw]
        kl = kl_all[rows_d]
        state["kl_local"] = torch.nonzero(kl).squeeze(1)
        state["kl_req"] = req_all[rows_d][kl]
        for stand_in in state.get("replays", []):
            stand_in.select(rows.to(in_device), n_rows)

    def add_delta(output: Any, name: str) -> Any:
        if name != mlp_name:
            return output
        flat = first_tensor(output)
        h = as_batch_seq(flat, *state["ids"].shape)
        r = torch.arange(h.shape[0], device=h.device)
        if state.get("capture_v0"):
            bare_local = state["bare_local"]
            v0[state["req"][bare_local]] = h[bare_local, state["subj"][bare_local]].detach().float()
        d = torch.stack(deltas)[state["req"]].to(h.dtype)
        h = h.clone()
        h[r, state["subj"]] = h[r, state["subj"]] + d
        return with_first_tensor(output, h.view(flat.shape))

    def forward() -> torch.Tensor:
        ctx = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx, TraceDict(model, [mlp_name, norm_name], edit_output=add_delta, stop=True) as td:
            model(input_ids=state["ids"], attention_mask=state["mask"], use_cache=False)
        return first_tensor(td[norm_name].output)

    def logits_at(h: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return arch.logits_from_normed(model, h[r, p].to(device)).float()

    def per_request(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_req, device=device).index_add(0, index, values)

    results: list[ValueResult | None] = [None] * n_req
    nll_first = torch.full((n_req,), float("nan"))
    steps_taken = torch.zeros(n_req, dtype=torch.long)
    opt = torch.optim.Adam(deltas, lr=cfg.lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"value optimisation ({n_req} request{'s' * (n_req > 1)})", leave=False)
    with _replayed_blocks(model, arch, replay) as stand_ins, frozen_parameters(model):
        state["replays"] = stand_ins
        select(torch.arange(n_rows))
        # The KL reference and v₀ come from the unshifted model, even when δ starts elsewhere.
        with torch.no_grad():
            saved = [d.detach().clone() for d in deltas]
            for d in deltas:
                d.zero_()
            state["bare_local"] = b.bare.to(device)
            state["capture_v0"] = True
            h0 = forward()
            state["capture_v0"] = False
            kl_ref_all = torch.log_softmax(
                logits_at(h0, state["kl_local"], torch.full_like(state["kl_local"], b.input_ids.shape[1] - 1)),
                dim=-1,
            )
            kl_ref_req = state["kl_req"]
            for d, s in zip(deltas, saved, strict=True):
                d.copy_(s)
        v0_norm2 = v0.norm(dim=1) ** 2
        max_norm = cfg.clamp_norm_factor * v0.norm(dim=1)
        for step in range(cfg.steps):
            act_idx = torch.nonzero(active).squeeze(1)
            opt.zero_grad(set_to_none=True)
            h = forward()
            r, p, t, w, rq = state["nll"]
            lp = torch.log_softmax(logits_at(h, r, p), dim=-1)
            nll = per_request(-lp[torch.arange(len(t), device=device), t] * w, rq)
            # Margin of the new target's first token over the old one's, worst prompt.
            flp = torch.log_softmax(logits_at(h, state["rw_local"], state["rw_first"]), dim=-1)
            rw_req = state["rw_req"]
            old = old_first_t[rw_req]
            gap = flp[torch.arange(len(rw_req), device=device), new_first[rw_req]] - torch.where(
                old >= 0, flp[torch.arange(len(rw_req), device=device), old.clamp(min=0)], torch.full_like(old, -1e9, dtype=flp.dtype)
            )
            worst = torch.full((n_req,), float("inf"), device=device).scatter_reduce(0, rw_req, gap.detach(), "amin")
            # KL against the unshifted model at each KL prompt's last position.
            kl_lp = torch.log_softmax(
                logits_at(h, state["kl_local"], torch.full_like(state["kl_local"], b.input_ids.shape[1] - 1)), dim=-1
            )
            ref = kl_ref_all[_positions_in(kl_ref_req, state["kl_req"])]
            kl_terms = torch.nn.functional.kl_div(kl_lp, ref, log_target=True, reduction="none").sum(-1)
            n_kl = max(len(cfg.kl_prompts), 1)
            kl = per_request(kl_terms / n_kl, state["kl_req"])
            dnorm2 = torch.stack([d.norm() ** 2 for d in deltas])
            wd = cfg.weight_decay * dnorm2 / v0_norm2
            nll_d = nll.detach().cpu()
            worst_c = worst.cpu()
            for j in act_idx.tolist():
                if steps_taken[j] == 0 and torch.isnan(nll_first[j]):
                    nll_first[j] = nll_d[j]
                steps_taken[j] = step + 1
            margin_ok = (worst_c > (cfg.margin or 0.0)) if cfg.margin is not None else torch.ones(n_req, dtype=torch.bool)
            now_done = active & (nll_d < cfg.early_stop_loss) & margin_ok
            last = step == cfg.steps - 1
            for j in act_idx.tolist():
                if now_done[j] or last:
                    results[j] = ValueResult(
                        delta=deltas[j].detach().clone(),
                        v0=v0[j].clone(),
                        steps=int(steps_taken[j]),
                        nll_first=float(nll_first[j]),
                        nll=float(nll_d[j]),
                        margin=float(worst_c[j]),
                        done=bool(now_done[j]),
                        clamped=bool(deltas[j].detach().norm() >= max_norm[j] * 0.999),
                    )
            active &= ~now_done
            if bar is not None:
                bar.update(1)
                bar.set_postfix(active=int(active.sum()), nll=f"{float(nll_d[act_idx].mean()):.3f}")
            if last or not active.any():
                break
            mask = active.to(device)
            loss = ((nll + cfg.kl_factor * kl + wd) * mask).sum()
            loss.backward()
            for j in range(n_req):
                if not active[j]:
                    deltas[j].grad = None  # Adam skips parameters without a gradient
            opt.step()
            with torch.no_grad():
                for j in torch.nonzero(active).squeeze(1).tolist():
                    n = deltas[j].norm()
                    if n > max_norm[j]:
                        deltas[j].mul_(max_norm[j] / n)
            if not now_done.any():
                continue
            # Requests that converged leave the batch.
            keep_rows = torch.nonzero(active[b.request]).squeeze(1)
            select(keep_rows)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _positions_in(reference: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """For each entry of ``wanted`` (request indices of the current KL rows), the index of the
    matching KL row in ``reference`` (the KL rows of the full batch, in the same order)."""
    out = []
    used: dict[int, int] = {}
    ref = reference.tolist()
    first: dict[int, list[int]] = {}
    for i, q in enumerate(ref):
        first.setdefault(q, []).append(i)
    for q in wanted.tolist():
        k = used.get(q, 0)
        out.append(first[q][k])
        used[q] = k + 1
    return torch.tensor(out, device=reference.device, dtype=torch.long)
