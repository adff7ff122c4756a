"""Plots of causal traces: per-prompt heatmaps and averaged indirect-effect lines.

matplotlib is imported on first use with the non-interactive Agg backend, so importing this
module (or factedit) never opens a window or needs a display.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tracing import TOKEN_CLASSES, AverageTrace, TraceResult

#: Colour scale per kind, as in the paper's figure (hidden purple, MLP green, attention red).
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_LABELS = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}
LINE_COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
FORMATS = ("png", "svg")


def _pyplot() -> Any:
    import matplotlib

    # Agg unless the user already chose a backend by importing pyplot (e.g. in a notebook).
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, stem: str | Path, formats: Sequence[str]) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, bbox_inches="tight", dpi=150 if fmt == "png" else None)
        paths.append(path)
    return paths


def _window_label(result: TraceResult) -> str:
    if result.kind == "hidden":
        return "single restored layer"
    return f"center of interval of {result.window} restored {KIND_LABELS[result.kind]} layers"


def plot_trace(
    result: TraceResult,
    stem: str | Path | None = None,
    *,
    formats: Sequence[str] = FORMATS,
    ax: Any = None,
) -> list[Path]:
    """Heatmap of one trace: tokens down, layers across, subject tokens marked with ``*``.

    Writes ``stem.<fmt>`` for each format (PNG and SVG by default) and returns the paths;
    with ``ax`` it draws into that axes instead and writes nothing unless ``stem`` is given.
    """
    plt = _pyplot()
    own = ax is None
    fig = None
    if own:
        fig, ax = plt.subplots(
            figsize=(3.5 + 0.12 * len(result.layers), 0.8 + 0.3 * len(result.tokens))
        )
    else:
        fig = ax.figure
    s, e = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if s <= i < e else "") for i, t in enumerate(result.tokens)]
    grid = result.grid.numpy()
    image = ax.pcolormesh(grid, cmap=CMAPS.get(result.kind, "Greys"), vmin=result.corrupt_prob)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(labels))])
    ax.set_yticklabels(labels)
    step = max(1, math.ceil(len(result.layers) / 10))
    ticks = list(range(0, len(result.layers), step))
    ax.set_xticks([i + 0.5 for i in ticks])
    ax.set_xticklabels([str(result.layers[i]) for i in ticks])
    ax.set_xlabel(_window_label(result))
    name = KIND_LABELS[result.kind] if result.kind != "hidden" else "hidden state"
    ax.set_title(f"Impact of restoring {name} after corrupted input", fontsize=10)
    bar = fig.colorbar(image, ax=ax)
    bar.ax.set_title(f"p({result.answer.strip()})", fontsize=9, y=-0.12, va="top")
    paths = _save(fig, stem, formats) if stem is not None else []
    if own:
        plt.close(fig)
    return paths


def plot_average(
    average: AverageTrace,
    stem: str | Path | None = None,
    *,
    formats: Sequence[str] = FORMATS,
    classes: Sequence[str] = TOKEN_CLASSES,
) -> list[Path]:
    """Average indirect effect per layer: one panel per kind, one line per token class."""
    plt = _pyplot()
    kinds = average.kinds
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds) + 2.4, 3.4), squeeze=False)
    styles = ["-", "--", "-", ":", "-.", "-"]
    widths = [1.2, 1.2, 2.4, 1.2, 1.2, 1.8]
    for ax, kind in zip(axes[0], kinds, strict=True):
        for j, cls in enumerate(classes):
            values = average.effects[kind][cls]
            if all(math.isnan(v) for v in values):
                continue
            ax.plot(
                range(average.n_layers), values, styles[j % len(styles)],
                lw=widths[j % len(widths)], label=f"{cls} (n={average.counts[kind][cls]})",
            )  # fmt: skip
        ax.set_title(f"Average indirect effect: {KIND_LABELS[kind]}", fontsize=10)
        ax.set_xlabel(
            "layer" if kind == "hidden" else f"center of {average.settings['window']}-layer window"
        )
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AIE (restored p - corrupted p)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    # The model setting may be a cache path: its last part names the model.
    model = Path(str(average.settings["model"])).name
    known = "known facts" if average.settings.get("require_known", True) else "facts"
    fig.suptitle(
        f"{model}: {average.n_facts} {known}, "
        f"{average.settings['samples']} noise sample(s), noise std {average.settings['noise_std']:.3g}",
        fontsize=9,
    )
    fig.tight_layout()
    paths = _save(fig, stem, formats) if stem is not None else []
    plt.close(fig)
    return paths
