"""Figures: TAP vs Eval scatter per task and on average (paper Fig. 3), task-vector norms per layer and
cosine similarities (paper Fig. 6, 12–14). Every figure is written atomically as PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from taskmerge.checkpoints import atomic_write  # noqa: E402
from taskmerge.task_vectors import block_of, depth_order  # noqa: E402


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


_MARKERS = "osD^vP*Xph<>"


def log_scale_wanted(values: Sequence[float], ratio: float = 10.0) -> bool:
    """A log axis when the positive values span more than `ratio`× (e.g. BEDLAM ≈ 50 against NYUd ≈ 2)."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > ratio * min(positive)


def _two_and_five(ax: "plt.Axes") -> ticker.Formatter:
    """Minor tick labels of a log axis: 2·10^k and 5·10^k, so values can be read between the decades, as long
    as the axis spans at most four decades (beyond, they would crowd)."""

    def label(value: float, _position: int) -> str:
        low, high = ax.get_ylim()
        mantissa = f"{value:.6e}"
        return f"{value:g}" if high <= 1e4 * low and mantissa[0] in "25" and mantissa[1:8] == ".000000" else ""

    return ticker.FuncFormatter(label)


def plot_layer_norms(layers: Sequence[str], layer_norms: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Norm of every task vector per layer, layers by depth (embeddings, blocks by number, then final norm and
    head). Per task one line joins the blocks of each stack (block ticks show the block number, the stack is
    named on the axis); the other layers are lone markers of the task's colour. Layers that no task changes
    are left out and named below the axis. The y-axis is logarithmic when the block norms (all norms without
    blocks) span more than 10×."""
    changed = [layer for layer in layers if any(norms.get(layer, 0.0) > 0 for norms in layer_norms.values())]
    unchanged = [layer for layer in layers if layer not in changed]
    order = sorted(changed, key=depth_order)
    stacks: dict[str, list[int]] = {}
    for i, layer in enumerate(order):
        block = block_of(layer)
        if block is not None:
            stacks.setdefault(block[0], []).append(i)
    in_blocks = {i for positions in stacks.values() for i in positions}
    others = [i for i in range(len(order)) if i not in in_blocks]
    one_stack = len(stacks) == 1
    labels = [str(block_of(layer)[1]) if one_stack and i in in_blocks else layer for i, layer in enumerate(order)]
    longest = max((len(label) for label in labels), default=0)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.42 * len(order) + 2.5), 3.2 + 0.05 * longest))
    log = log_scale_wanted([norms.get(order[i], 0.0) for norms in layer_norms.values() for i in in_blocks] if stacks
                           else [v for norms in layer_norms.values() for v in norms.values()])

    def shown(value: float) -> float:
        return value if value > 0 or not log else math.nan  # a zero has no place on a log axis

    for n, (task, norms) in enumerate(layer_norms.items()):
        colour, marker = f"C{n % 10}", _MARKERS[n % len(_MARKERS)]
        for s, positions in enumerate(stacks.values()):
            ax.plot(positions, [shown(norms.get(order[i], 0.0)) for i in positions], color=colour, marker=marker, ms=4,
                    lw=1.5, label=task if s == 0 else None)
        ax.plot(others, [shown(norms.get(order[i], 0.0)) for i in others], linestyle="none", marker=marker, ms=6,
                color=colour, mfc="none", mew=1.3, label=None if stacks else task)
    if stacks and others:
        ax.plot([], [], linestyle="none", marker="o", ms=6, mfc="none", color="grey", label="outside the blocks")
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(_two_and_five(ax))
    ax.set_xticks(range(len(order)), labels, fontsize=8)
    for label, text in zip(ax.get_xticklabels(), labels):
        if len(text) > 3:  # names slant, block numbers stay upright
            label.set_rotation(45)
            label.set_ha("right")
    xlabel = f"block ({next(iter(stacks))}.N)" if one_stack else "layer"
    if unchanged:
        names = ", ".join(unchanged[:6]) + (f", … ({len(unchanged)} in all)" if len(unchanged) > 6 else "")
        xlabel += f"\nunchanged by every task (not drawn): {names}"
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("‖τ_t‖₂ per layer" + (" (log scale)" if log else ""))
    ax.set_title("task-vector norms per layer (by depth)")
    ax.grid(alpha=0.3, which="both" if log else "major")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_cosine(tasks: Sequence[str], cosine: Sequence[Sequence[float]], with_mean: Mapping[str, float], path: str | Path) -> Path:
    """Heatmap of cosine similarities between task vectors, with a last column (set apart by a line) for the
    mean task vector; values printed in every cell, white on the dark ones."""
    matrix = [list(row) + [with_mean[t]] for t, row in zip(tasks, cosine)]
    fig, ax = plt.subplots(figsize=(max(3.8, 1.6 + 0.75 * (len(tasks) + 1)), max(2.6, 1.2 + 0.6 * len(tasks))))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if abs(value) > 0.6 else "black")
    ax.axvline(len(tasks) - 0.5, color="black", lw=1.5)
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "mean τ"], rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_title("cosine similarity of task vectors", fontsize=10)
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
