"""Figures of a run: TAP vs Eval scatter per task and on average (the paper's Fig. 3)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from taskmerge.checkpoints import atomic_path  # noqa: E402


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
    fig.tight_layout()
    path = Path(path)
    tmp = atomic_path(path.with_suffix(".png"))
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
