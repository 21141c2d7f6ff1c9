"""Figures: TAP vs Eval scatter per task and on average (paper Fig. 3), task-vector norms per layer and
cosine similarities (paper Fig. 6, 12–14). Every figure is written atomically as PNG."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from taskmerge.checkpoints import atomic_write  # noqa: E402


# A transformer block: `blocks.N` (timm ViTs) or `transformer.resblocks.N` (CLIP), possibly under a prefix.
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks)\.(\d+)$")
# Parameters before the first block: patch/token/position embeddings, class token, CLIP's conv1 and ln_pre.
_EMBEDDING = re.compile(r"embed|cls_token|reg_token|class_embedding|conv1|ln_pre")


def depth_order(layer: str) -> tuple[int, int, str]:
    """Sort key of a layer by depth: embedding parameters first, then blocks by number, then the rest (final
    norm, head, projections)."""
    block = _BLOCK.search(layer)
    if block:
        return 1, int(block.group(1)), layer
    return (0 if _EMBEDDING.search(layer) else 2), 0, layer


def _label(hparams: Mapping[str, Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in hparams.values())


def plot_tap_vs_eval(
    rows: Sequence[Mapping[str, Any]],
    metric_names: Mapping[str, str],
    tap_pick: Mapping[str, Any] | None,
    eval_pick: Mapping[str, Any] | None,
    path: str | Path,
) -> Path:
    """One panel per task (TAP_t vs the task's validation metric) and one for the mean TAP vs the mean
    normalized performance; the TAP pick is circled in red, the Eval pick in green."""
    rows = [r for r in rows if r.get("eval") and r.get("tap")]
    panels = [*metric_names, "mean"]
    cols = min(len(panels), 3)
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4.2 * cols, 3.6 * math.ceil(len(panels) / cols)), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        ykey = "normalized" if panel == "mean" else panel
        xs = [r["tap"][panel] for r in rows]
        ys = [r["eval"][ykey] for r in rows]
        ax.scatter(xs, ys, c=range(len(rows)), cmap="viridis", s=28, zorder=2)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(_label(r["hparams"]), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for pick, colour, name, size in ((tap_pick, "red", "TAP pick", 220), (eval_pick, "green", "Eval pick", 110)):
            if pick is not None and pick.get("eval"):
                ax.scatter([pick["tap"][panel]], [pick["eval"][ykey]], s=size, facecolors="none", edgecolors=colour, linewidths=1.8, label=name, zorder=3)
        ax.set_xlabel(f"TAP ({panel})")
        ax.set_ylabel("mean normalized performance" if panel == "mean" else f"{panel}: val {metric_names[panel]}")
        ax.set_title("average" if panel == "mean" else panel)
        ax.grid(alpha=0.3)
    axes.flat[len(panels) - 1].legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, path)


def _save(fig: "plt.Figure", path: str | Path) -> Path:
    """Write `fig` as PNG through the atomic-write path (no torn file, the umask's permissions) and close it."""
    try:
        fig.tight_layout()
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_layer_norms(layers: Sequence[str], layer_norms: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Norm of every task vector per layer, layers in depth order; per task a line joins the blocks and the other
    layers (embeddings before, final norm and head after) are lone markers, since no curve runs through them
    (log scale when norms span a decade)."""
    order = sorted(layers, key=depth_order)
    blocks = [i for i, layer in enumerate(order) if _BLOCK.search(layer)]
    others = [i for i, layer in enumerate(order) if not _BLOCK.search(layer)]
    longest = max((len(layer) for layer in order), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(order)), 3.0 + 0.06 * longest))  # room for the slanted names
    for task, norms in layer_norms.items():
        (line,) = ax.plot(blocks, [norms[order[i]] for i in blocks], marker="o", ms=3, label=task)
        ax.plot(others, [norms[order[i]] for i in others], linestyle="none", marker="D", ms=4, color=line.get_color())
    if blocks and others:
        ax.plot([], [], linestyle="none", marker="D", ms=4, color="grey", label="outside the blocks")
    values = [v for norms in layer_norms.values() for v in norms.values() if v > 0]
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖τ_t‖₂ per layer")
    ax.set_title("task-vector norms per layer (by depth)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cosine(tasks: Sequence[str], cosine: Sequence[Sequence[float]], with_mean: Mapping[str, float], path: str | Path) -> Path:
    """Heatmap of cosine similarities between task vectors, with a last column for the mean task vector."""
    matrix = [list(row) + [with_mean[t]] for t, row in zip(tasks, cosine)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * (len(tasks) + 1), 0.9 + 0.6 * len(tasks)))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "mean τ"], rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_title("cosine similarity of task vectors")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_coefficients(keys: Sequence[str], coefficients: Sequence[Sequence[float]], tasks: Sequence[str], path: str | Path) -> Path:
    """Learned merge coefficients: one line per task over the parameter tensors (layer-wise) or bars (task-wise)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(keys)), 3.8))
    columns = list(zip(*coefficients))
    if len(keys) == 1:
        ax.bar(range(len(tasks)), columns and [c[0] for c in columns], tick_label=list(tasks))
    else:
        for task, values in zip(tasks, columns):
            ax.plot(range(len(keys)), values, marker=".", ms=3, label=task)
        ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=5)
        ax.legend(fontsize=7)
    ax.set_ylabel("λ")
    ax.set_title("learned merge coefficients")
    ax.grid(alpha=0.3)
    return _save(fig, path)
