"""Training MEND and KE editors for the model at hand.

One step takes one training example: the edit row's fine-tuning gradient factors (through the
top blocks only: the hidden state entering the first edited block is computed once per
example and cached), the editor's weight change, and the loss of the edited model (applied
through forward hooks, never written to the weights):
``edit_weight * NLL(edit + rephrase targets) + loc_weight * KL(pre || post on the locality row)``.

Every ``eval_every`` steps a validation split gives edit and rephrase token accuracy and
locality (argmax agreement with the unedited model); the best editor is kept, training stops
after ``patience`` validations without improvement, and a checkpoint is written. A rerun with
the same inputs resumes from the checkpoint (or returns the finished editor at once).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelArch, describe
from ..fingerprint import json_digest
from ..hooks import frozen_parameters
from ..hparams import model_key
from ..models import cache_dir as default_cache_dir
from ..models import model_device
from . import artifact
from .config import FAMILIES, VARIANTS, KEHParams, LearnedHParams, MENDHParams
from .core import (
    DeltaInjection,
    ExampleBatch,
    HiddenCache,
    edit_gradient_factors,
    example_batch,
    layer_shapes,
    nll,
    positions_of,
    resolve_layers,
    row_logits,
    token_accuracy,
    top_hidden,
)
from .data import (
    TrainExample,
    TrainingDataError,
    counterfact_flat_examples,
    evaluation_subjects,
    examples_fingerprint,
    generated_examples,
    zsre_examples,
)
from .editor import LearnedEditor, condition_embeddings
from .nets import build_editor

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or a gradient became NaN/inf; no editor was written (the last checkpoint stays)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted; a checkpoint was written and a rerun continues from it."""


@dataclass
class TrainResult:
    """A finished training run: where the editor is and its header (curve included)."""

    path: Path
    header: dict[str, Any]
    from_cache: bool = False

    def load(self) -> LearnedEditor:
        return LearnedEditor.load(self.path)


def hparams_for(
    family: str,
    variant: str,
    model: nn.Module,
    arch: ModelArch,
    overrides: Mapping | LearnedHParams | None,
) -> LearnedHParams:
    """Shipped defaults for ``family``/``variant`` on this model, with ``overrides`` applied."""
    if family not in FAMILIES:
        raise ValueError(f"unknown learned editor {family!r}; use one of {FAMILIES}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    cls = MENDHParams if family == "mend" else KEHParams
    if isinstance(overrides, LearnedHParams):
        hp = overrides.replace(variant=variant, family=family)
    else:
        hp = cls.defaults_for(family if variant == "gen" else f"{family}-{variant}", model, arch)
        if overrides:
            unknown = sorted(set(overrides) - set(hp.to_dict()))
            if unknown:
                raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
            hp = hp.replace(**dict(overrides))
    hp.check()
    return hp


def build_examples(
    variant: str,
    data: str | Path | Iterable[str] | None,
    n_needed: int,
    seed: int,
    exclude_subjects: Iterable[str] | None = None,
) -> tuple[list[TrainExample], dict[str, Any]]:
    """The training examples of ``variant`` and a description of where they came from.

    ``cf``: a CounterFact file in the flat layout (``data``); subjects in ``exclude_subjects``
    are dropped; when that is ``None`` and a ``counterfact_dev.json`` lies beside the file, its
    subjects are excluded. ``zsre``: a zsRE file in MEND's layout. ``gen``: ``data`` is a
    corpus (path or texts; ``None``: the packaged Wikipedia leads).
    """
    info: dict[str, Any] = {"variant": variant}
    if variant in ("cf", "zsre"):
        if data is None:
            raise TrainingDataError(
                f"the {variant} variant needs training data: pass --data PATH "
                f"({artifact.train_command('mend', variant).split('--data ')[1]})"
            )
        if not isinstance(data, (str, Path)):
            raise TrainingDataError(
                f"the {variant} variant reads a JSON file; got {type(data).__name__}"
            )
        path = Path(data)
        info["source"] = path.name
        if variant == "cf":
            if exclude_subjects is None:
                dev = path.parent / "counterfact_dev.json"
                exclude_subjects = evaluation_subjects(dev) if dev.is_file() else set()
                info["excluded_from"] = dev.name if dev.is_file() else None
            excl = set(exclude_subjects)
            examples, dropped = counterfact_flat_examples(path, excl)
            info.update(excluded_subjects=len(excl), excluded_records=dropped)
        else:
            examples = zsre_examples(path)
    else:
        from ..corpus import as_corpus

        corpus = as_corpus(data)
        info["source"] = corpus.identity
        examples = generated_examples(list(corpus.documents), n_needed, seed)
    info["records"] = len(examples)
    return examples, info


def _key(*parts: Any) -> str:
    return json_digest(parts, 64)


class _Trainer:
    """The state of one training run (model frozen; only the editor network learns)."""

    def __init__(self, model, tok, arch, hp: LearnedHParams, layers, net, train, val, progress):
        self.model, self.tok, self.arch, self.hp = model, tok, arch, hp
        self.layers, self.net, self.train, self.val = layers, net, train, val
        self.device = model_device(model)
        self.progress = progress
        self.cache: dict[
            tuple[str, int], tuple[ExampleBatch, HiddenCache | None, torch.Tensor | None]
        ] = {}
        self.first = min(layers)

    def batch(
        self, split: str, i: int
    ) -> tuple[ExampleBatch, HiddenCache | None, torch.Tensor | None]:
        """The example's rows with their lower-block state, computed on first use only."""
        key = (split, i)
        if key not in self.cache:
            ex = (self.train if split == "train" else self.val)[i]
            rows = [
                (ex.prompt, ex.target_new),
                (ex.rephrase, ex.target_new),
                (ex.loc_prompt, ex.loc_target),
            ]
            try:
                eb = example_batch(self.tok, rows, self.device)
            except ValueError as exc:
                raise TrainingDataError(
                    f"{split} example {i} ({ex.prompt!r} -> {ex.target_new!r}): {exc}"
                ) from None
            hc = HiddenCache.fill(self.model, self.arch, self.first, eb)
            cond = (
                condition_embeddings(self.model, self.arch, self.tok, ex.condition_text())
                if self.hp.family == "ke"
                else None
            )
            self.cache[key] = (eb, hc, cond)
        return self.cache[key]

    def losses(self, split: str, i: int, train: bool) -> dict[str, Any] | None:
        """One example's loss (with grad into the editor when ``train``) and its figures;
        ``None`` when its gradient is zero (the target is already predicted)."""
        eb, hc, cond = self.batch(split, i)
        factors, hid0, _ = edit_gradient_factors(self.model, self.arch, self.layers, eb, hc)
        if factors.grad_norm() <= self.hp.min_grad_norm:
            return None
        b = eb.batch
        loc_pos = positions_of(eb.mask[2])
        with torch.no_grad():
            pre = torch.log_softmax(row_logits(self.model, self.arch, hid0, 2, loc_pos), -1)
        self.net.train(train)
        with torch.set_grad_enabled(train):
            deltas = self.net(factors, cond)
            with DeltaInjection(self.model, self.arch, self.layers, deltas):
                hid = top_hidden(self.model, self.arch, eb, hc)
            lg_edit = row_logits(self.model, self.arch, hid, 0, b.target_positions[0])
            lg_reph = row_logits(self.model, self.arch, hid, 1, b.target_positions[1])
            post = torch.log_softmax(row_logits(self.model, self.arch, hid, 2, loc_pos), -1)
            l_edit = (nll(lg_edit, b.target_ids[0]) + nll(lg_reph, b.target_ids[1])) / 2
            kl = (pre.exp() * (pre - post)).sum(-1).mean()
            loss = self.hp.edit_weight * l_edit + self.hp.loc_weight * kl
        return {
            "loss": loss,
            "edit_acc": token_accuracy(lg_edit.detach(), b.target_ids[0]),
            "rephrase_acc": token_accuracy(lg_reph.detach(), b.target_ids[1]),
            "locality": float((pre.argmax(-1) == post.detach().argmax(-1)).float().mean()),
        }

    def validate(self) -> dict[str, float]:
        figs = [
            f for i in range(len(self.val)) if (f := self.losses("val", i, train=False)) is not None
        ]
        if not figs:
            return {
                "edit_acc": 0.0,
                "rephrase_acc": 0.0,
                "locality": 0.0,
                "val_loss": math.inf,
                "score": 0.0,
            }
        out = {
            k: sum(f[k] for f in figs) / len(figs) for k in ("edit_acc", "rephrase_acc", "locality")
        }
        out["val_loss"] = sum(float(f["loss"]) for f in figs) / len(figs)
        out["score"] = (out["edit_acc"] + out["rephrase_acc"] + out["locality"]) / 3
        return out


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def train_editor(
    model: nn.Module,
    tok: Any,
    method: str,
    variant: str = "gen",
    data: str | Path | Iterable[str] | None = None,
    *,
    hparams: Mapping | LearnedHParams | None = None,
    steps: int | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    exclude_subjects: Iterable[str] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Train a MEND (``method="mend"``) or KE (``"ke"``) editor for ``model``.

    Guarantees: the model's weights are never changed; the editor file (at ``out``, or keyed on
    base model, data and configuration under ``<cache>/learned/``) is written atomically and
    only when training finished; an existing editor for the same inputs is returned without
    training; an interrupted run (Ctrl-C) leaves a checkpoint and a rerun continues from it
    (``resume=False`` starts over). Raises :class:`TrainingDataError` for missing, empty or
    malformed data and :class:`TrainingDivergedError` when the loss becomes NaN/inf.
    """
    from tqdm.auto import tqdm

    from .. import __version__

    family = method.strip().lower()
    arch = describe(model)
    over = dict(hparams) if isinstance(hparams, Mapping) else hparams
    if steps is not None:
        over = (
            over.replace(steps=steps)
            if isinstance(over, LearnedHParams)
            else {**(over or {}), "steps": steps}
        )
    hp = hparams_for(family, variant, model, arch, over)
    layers = resolve_layers(arch, hp.layers)
    param_names = [arch.mlp_out_weight_name(i) for i in layers]
    shapes = layer_shapes(model, arch, layers)
    base_fp = artifact.base_fingerprint(model, arch, param_names)

    examples, data_info = build_examples(
        variant, data, hp.max_examples + hp.val_size, hp.seed, exclude_subjects
    )
    if len(examples) < hp.val_size + 1:
        raise TrainingDataError(
            f"{len(examples)} examples are too few for a validation split of {hp.val_size}"
        )
    data_fp = examples_fingerprint(examples)
    order = list(range(len(examples)))
    random.Random(hp.seed).shuffle(order)
    val = [examples[i] for i in order[: hp.val_size]]
    train = [examples[i] for i in order[hp.val_size : hp.val_size + hp.max_examples]]
    config = hp.training_config()
    key = _key(artifact.FORMAT_VERSION, family, variant, base_fp, data_fp, config, param_names)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = (
        Path(out)
        if out is not None
        else artifact.artifact_path(root, family, variant, base_fp, key)
    )
    ckpt = path.with_name(path.name + ".ckpt")
    if path.is_file():
        try:
            header, _ = artifact.read(path)
        except artifact.EditorFileError:
            header = {}
        if header.get("key") == key:
            log.info("editor already trained: %s", path)
            artifact.write_pointer(root, family, variant, base_fp, path)
            return TrainResult(path, header, from_cache=True)

    embed_dim = arch.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        net = build_editor(family, shapes, embed_dim, config).to(model_device(model))
    lr_params = [p for n, p in net.named_parameters() if n == "log_lr"]
    other = [p for n, p in net.named_parameters() if n != "log_lr"]
    opt = torch.optim.Adam(
        [{"params": other, "lr": hp.meta_lr}, {"params": lr_params, "lr": hp.lr_lr}]
    )

    start, curve, best_score, best_step, bad, skipped = 0, [], -1.0, 0, 0, 0
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if resume and ckpt.is_file():
        try:
            ck_header, ck = artifact.read(ckpt)
        except artifact.EditorFileError as exc:
            log.warning("ignoring unreadable checkpoint %s: %s", ckpt, exc)
            ck_header, ck = {}, {}
        if ck_header.get("key") == key:
            net.load_state_dict({k[4:]: v for k, v in ck.items() if k.startswith("net.")})
            best_state = {k[5:]: v for k, v in ck.items() if k.startswith("best.")}
            _load_opt(opt, ck)
            start, curve = ck_header["step"], ck_header["curve"]
            best_score, best_step, bad, skipped = (
                ck_header["best_score"],
                ck_header["best_step"],
                ck_header["bad"],
                ck_header["skipped"],
            )
            log.info("resuming from %s at step %d", ckpt, start)
        else:
            log.warning("checkpoint %s is for other inputs; starting over", ckpt)

    def checkpoint(step: int) -> None:
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
        tensors.update(_opt_tensors(opt))
        artifact.atomic_save(tensors, {
            "kind": "checkpoint", "key": key, "step": step, "curve": curve, "best_score": best_score,
            "best_step": best_step, "bad": bad, "skipped": skipped,
        }, ckpt)  # fmt: skip

    trainer = _Trainer(model, tok, arch, hp, layers, net, train, val, progress)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    step = start
    stopped_early = False
    window: list[float] = []
    bar = tqdm(
        total=hp.steps,
        initial=start,
        disable=not progress,
        desc=f"train {family}-{variant}",
        unit="step",
    )
    updating = False
    try:
        with frozen_parameters(model):
            if start == 0 and not curve:
                v = trainer.validate()
                curve.append({"step": 0, "train_loss": None, **v})
                best_score = v["score"]
            while step < hp.steps and bad < hp.patience:
                epoch, pos = divmod(step, len(train))
                perm = list(range(len(train)))
                random.Random(hp.seed * 1_000_003 + epoch).shuffle(perm)
                figs = trainer.losses("train", perm[pos], train=True)
                if figs is None:
                    skipped += 1
                else:
                    loss = figs["loss"]
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(
                            f"the training loss became {float(loss.detach())} at step {step}; no editor was written "
                            f"(lower meta_lr/lr_lr; the last checkpoint {ckpt} is intact)"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    grads = [p.grad for p in net.parameters() if p.grad is not None]
                    if not all(torch.isfinite(g).all() for g in grads):
                        raise TrainingDivergedError(
                            f"a gradient of the editor became NaN/inf at step {step}; no editor was written "
                            f"(lower meta_lr/lr_lr; the last checkpoint {ckpt} is intact)"
                        )
                    updating = True
                    opt.step()
                    updating = False
                    window.append(float(loss.detach()))
                step += 1
                bar.update(1)
                if step % hp.eval_every == 0 or step == hp.steps:
                    v = trainer.validate()
                    curve.append(
                        {
                            "step": step,
                            "train_loss": sum(window) / len(window) if window else None,
                            **v,
                        }
                    )
                    window = []
                    if v["score"] > best_score:
                        best_score, best_step, bad = v["score"], step, 0
                        best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
                    else:
                        bad += 1
                    bar.set_postfix(loss=f"{curve[-1]['train_loss'] or 0:.3f}", edit=f"{v['edit_acc']:.2f}",
                                    reph=f"{v['rephrase_acc']:.2f}", loc=f"{v['locality']:.2f}")  # fmt: skip
                    checkpoint(step)
            stopped_early = step < hp.steps
    except KeyboardInterrupt:
        bar.close()
        if not updating:
            checkpoint(step)
            raise TrainingInterrupted(
                f"training interrupted at step {step}; checkpoint {ckpt}; rerun the same command to continue"
            ) from None
        raise
    finally:
        bar.close()
        model.train(was_training)

    net.load_state_dict(best_state)
    header = {
        "kind": "editor",
        "key": key,
        "family": family,
        "variant": variant,
        "layers": layers,
        "params": param_names,
        "shapes": [list(s) for s in shapes],
        "embed_dim": embed_dim,
        "config": config,
        "base_model": {
            "fingerprint": base_fp,
            "model_key": model_key(model, arch),
            "class": type(model).__name__,
            "name_or_path": model_name
            or getattr(getattr(model, "config", None), "_name_or_path", None)
            or None,
        },
        "data": {**data_info, "fingerprint": data_fp, "train": len(train), "val": len(val)},
        "curve": curve,
        "steps_done": step,
        "best_step": best_step,
        "best_score": best_score,
        "stopped_early": stopped_early,
        "skipped_zero_gradient": skipped,
        "seconds": time.perf_counter() - t0,
        "factedit_version": __version__,
        "torch_version": torch.__version__,
    }
    artifact.atomic_save(dict(net.state_dict()), header, path)
    artifact.write_pointer(root, family, variant, base_fp, path)
    ckpt.unlink(missing_ok=True)
    log.info("trained %s-%s editor in %.0f s -> %s", family, variant, header["seconds"], path)
    return TrainResult(path, header)
