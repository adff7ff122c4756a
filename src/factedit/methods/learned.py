"""MEND and KE as editing methods: thin adapters over :mod:`factedit.learned`.

``mend``/``ke`` use the editor trained on self-supervised Wikipedia edits, ``-cf`` on
CounterFact, ``-zsre`` on zsRE. The editor comes from ``hparams.editor`` (a path) or from the
factedit cache; it is checked against the model before anything changes. One request: one
forward/backward pass for the gradient factors, one pass of the editor network.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..arch import ModelArch
from ..hparams import HParams
from ..learned import artifact
from ..learned.config import KEHParams, LearnedHParams, MENDHParams
from ..learned.core import resolve_layers
from ..learned.editor import LearnedEditor
from ..models import cache_dir as default_cache_dir
from ..requests import EditRequest
from .base import EditContext, EditMethod, PhaseTimer, WeightEditor

log = logging.getLogger(__name__)


def _load(path: str | Path, memo: dict[str, Any] | None) -> LearnedEditor:
    """Read an editor file, or take it from ``memo`` when the same file (path, size, mtime) was
    read before with this memo."""
    if memo is None:
        return LearnedEditor.load(path)
    st = Path(path).stat()
    key = f"learned-editor/{Path(path).resolve()}/{st.st_size}/{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = LearnedEditor.load(path)
    return memo[key]


def load_editor_for(
    model: nn.Module,
    arch: ModelArch,
    hp: LearnedHParams,
    cache_root: Path | None,
    memo: dict[str, Any] | None = None,
) -> LearnedEditor:
    """The editor ``hp`` names (or the cached one for this model), checked against ``model``.

    ``memo`` (e.g. :attr:`EditContext.memo`) keeps read editor files in memory between edits;
    the check against the model runs every time. Raises
    :class:`~factedit.learned.EditorNotTrainedError` (with the command that trains it) or
    :class:`~factedit.learned.EditorMismatchError`; changes nothing.
    """
    fp, layers = None, None
    if hp.editor is not None:
        editor = _load(hp.editor, memo)
    else:
        layers = resolve_layers(arch, hp.layers)
        names = [arch.mlp_out_weight_name(i) for i in layers]
        fp = artifact.base_fingerprint(model, arch, names)
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        model_name = (
            None if not name_or_path or "smollm2" in str(name_or_path).lower() else name_or_path
        )
        path = artifact.find_editor(
            cache_root or default_cache_dir(), hp.family, hp.variant, fp, model_name
        )
        editor = _load(path, memo)
    if editor.family != hp.family:
        raise artifact.EditorMismatchError(
            f"{hp.editor or editor.path} is a {editor.family.upper()} editor, not {hp.family.upper()}"
        )
    if hp.layers is not None and resolve_layers(arch, hp.layers) != editor.layers:
        raise artifact.EditorMismatchError(
            f"the editor edits layers {editor.layers}, hparams ask for {hp.layers}; train one for those layers"
        )
    # The fingerprint that found the editor is the one to check, if it covers the same layers.
    editor.check_model(model, arch, fp if layers == editor.layers else None)
    return editor


class _Learned(EditMethod):
    hparams_class: ClassVar[type[HParams]] = MENDHParams

    def check(self, hparams: HParams, arch: ModelArch) -> None:
        assert isinstance(hparams, LearnedHParams)
        hparams.check()
        if hparams.layers is not None:
            resolve_layers(arch, hparams.layers)

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
        assert isinstance(hparams, LearnedHParams)
        timer = PhaseTimer(timings)
        with timer("load_editor"):
            learned = load_editor_for(model, arch, hparams, context.cache_dir, context.memo)
        out = []
        for req in requests:
            with timer("editor"):
                deltas, diag, prepared = learned.prepare_and_compute(
                    model,
                    tok,
                    arch,
                    req.text,
                    req.target_text,
                    req.true_text,
                    hparams.min_grad_norm,
                )
            # The gradient pass already scored the target on the unedited model: no extra pass.
            before = math.exp(-diag["nll_before"])
            with timer("apply"):
                editor.apply(deltas)
            with timer("score"):
                # Only the edited blocks and above changed: they alone run again.
                after = prepared.target_prob(model, arch)
            log.info(
                "%s: %s -> %r: p %.4f -> %.4f",
                self.name,
                req.subject,
                req.target_new,
                before,
                after,
            )
            out.append(
                {
                    **diag,
                    "editor": str(learned.path),
                    "layers": learned.layers,
                    "target_prob_before": before,
                    "target_prob_after": after,
                }
            )
        return out


class MEND(_Learned):
    """MEND trained on self-supervised Wikipedia edits."""

    name: ClassVar[str] = "mend"
    summary: ClassVar[str] = (
        "hypernetwork editor (MEND) trained on Wikipedia edits; factedit train mend"
    )
    hparams_class: ClassVar[type[HParams]] = MENDHParams


class MENDCF(MEND):
    name: ClassVar[str] = "mend-cf"
    summary: ClassVar[str] = "MEND trained on CounterFact edits; factedit train mend --variant cf"


class MENDZsRE(MEND):
    name: ClassVar[str] = "mend-zsre"
    summary: ClassVar[str] = (
        "MEND trained on zsRE question edits; factedit train mend --variant zsre"
    )


class KE(_Learned):
    """KnowledgeEditor trained on self-supervised Wikipedia edits."""

    name: ClassVar[str] = "ke"
    summary: ClassVar[str] = (
        "hypernetwork editor (KnowledgeEditor) trained on Wikipedia edits; factedit train ke"
    )
    hparams_class: ClassVar[type[HParams]] = KEHParams


class KECF(KE):
    name: ClassVar[str] = "ke-cf"
    summary: ClassVar[str] = "KE trained on CounterFact edits; factedit train ke --variant cf"


class KEZsRE(KE):
    name: ClassVar[str] = "ke-zsre"
    summary: ClassVar[str] = "KE trained on zsRE question edits; factedit train ke --variant zsre"


LEARNED_METHODS: list[type[EditMethod]] = [MEND, MENDCF, MENDZsRE, KE, KECF, KEZsRE]
