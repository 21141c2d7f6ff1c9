"""Entry point: `python -m taskmerge.analyze [overrides]` — task-vector analysis of the configured zoo.

Writes `task_vectors.json` (norms overall, per block and per layer; cosine similarities),
`plots/task_vector_norms.png` and `plots/task_vector_cosine.png` to the Hydra run directory and prints the
norms, the per-block norms and the cosine similarities. Same config groups as `taskmerge.run`; only the zoo
is loaded. Layers are grouped from the key structure (`taskmerge.task_vectors.layer_of`), for every setting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from taskmerge import checkpoints, plots, validation
from taskmerge.cache import atomic_write_json
from taskmerge.config import register_configs
from taskmerge.entry import exit_on_sigterm, user_errors_reported

register_configs()
log = logging.getLogger(__name__)


def analyze(cfg: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Compute and write the task-vector statistics of the zoo named by `cfg`.

    Only the zoo is loaded (no task data is read); safetensors checkpoints are read lazily, slice by slice, so
    the peak memory holds one slice of each model rather than T + 1 full state dicts."""
    from taskmerge.settings import get_setting
    from taskmerge.task_vectors import task_vector_stats

    validation.check_run(cfg)
    zoo = get_setting(cfg["tasks"]["setting"]).load_zoo(cfg)
    names = list(cfg["tasks"]["names"])
    pretrained = checkpoints.open_state_dict(zoo.base)
    finetuned = [checkpoints.open_state_dict(zoo.finetuned[n]) for n in names]
    stats = task_vector_stats(pretrained, finetuned, names).to_dict()
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "task_vectors.json", stats)
    plots.plot_layer_norms(stats["layers"], stats["layer_norms"], run_dir / "plots" / "task_vector_norms.png")
    plots.plot_cosine(names, stats["cosine"], stats["cosine_with_mean"], run_dir / "plots" / "task_vector_cosine.png")
    console = Console()
    console.print(summary_table(stats))
    if stats["blocks"]:
        console.print(layer_table(stats))
    console.print(cosine_table(stats))
    return stats


def _fmt(value: float) -> str:
    """A norm in three significant digits (two below 1), without exponent."""
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.2g}"


def summary_table(stats: Mapping[str, Any]) -> Table:
    """Per task: ‖τ‖₂, the range of its per-block norms (App. F) where the encoder has blocks, and the cosine
    with the mean task vector τ̄."""
    names, blocks = stats["tasks"], stats["blocks"]
    table = Table(title="task vectors")
    table.add_column("task", no_wrap=True)
    table.add_column("‖τ‖₂", justify="right", no_wrap=True)
    if blocks:
        table.add_column(f"‖τ‖₂ per block ({len(blocks)}): min–max", justify="right", no_wrap=True)
    table.add_column("cos(τ, τ̄)", justify="right", no_wrap=True)
    for name in names:
        span = [f"{_fmt(min(stats['block_norms'][name]))} – {_fmt(max(stats['block_norms'][name]))}"] if blocks else []
        table.add_row(name, f"{stats['norms'][name]:.3f}", *span, f"{stats['cosine_with_mean'][name]:.3f}")
    return table


def cosine_table(stats: Mapping[str, Any]) -> Table:
    """Cosine similarity between every two task vectors."""
    names = stats["tasks"]
    table = Table(title="cosine similarities")
    table.add_column("task", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for name, row in zip(names, stats["cosine"]):
        table.add_row(name, *[f"{c:.3f}" for c in row])
    return table


def layer_table(stats: Mapping[str, Any]) -> Table:
    """‖τ_t‖₂ per layer in depth order, one column per task; layers that no task changes are named in the
    caption instead of taking a row."""
    names, norms = stats["tasks"], stats["layer_norms"]
    changed = [layer for layer in stats["layers"] if any(norms[t][layer] > 0 for t in names)]
    unchanged = [layer for layer in stats["layers"] if layer not in changed]
    table = Table(title="‖τ_t‖₂ per layer (by depth)",
                  caption=f"unchanged by every task: {', '.join(unchanged)}" if unchanged else None)
    table.add_column("layer")
    for name in names:
        table.add_column(name, justify="right")
    for layer in changed:
        table.add_row(layer, *[_fmt(norms[t][layer]) for t in names])
    return table


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_sigterm()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors_reported():
        analyze(validation.resolve(cfg, HydraConfig.get().runtime.choices), run_dir)
    log.info("task-vector analysis in %s", run_dir)


if __name__ == "__main__":
    main()
