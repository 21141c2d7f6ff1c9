"""Entry point: `python -m taskmerge.analyze [overrides]` — task-vector analysis of the configured zoo.

Writes `task_vectors.json`, `plots/task_vector_norms.png` and `plots/task_vector_cosine.png` to the
Hydra run directory and prints the norms and cosine similarities. Same config groups as `taskmerge.run`.
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
    """Compute and write the task-vector statistics of the zoo named by `cfg`."""
    from taskmerge.experiment import StageTimer, load_setting
    from taskmerge.task_vectors import task_vector_stats

    validation.check_run(cfg)
    setting = load_setting(cfg, StageTimer())
    names = [t.name for t in setting.tasks]
    pretrained = checkpoints.load_state_dict(setting.zoo.base)
    finetuned = [checkpoints.load_state_dict(setting.zoo.finetuned[n]) for n in names]
    stats = task_vector_stats(pretrained, finetuned, names).to_dict()
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "task_vectors.json", stats)
    plots.plot_layer_norms(stats["layers"], stats["layer_norms"], run_dir / "plots" / "task_vector_norms.png")
    plots.plot_cosine(names, stats["cosine"], stats["cosine_with_mean"], run_dir / "plots" / "task_vector_cosine.png")
    table = Table(title="task vectors")
    for column in ["task", "‖τ‖₂", "cos with mean τ", *names]:
        table.add_column(column, justify="left" if column == "task" else "right")
    for i, name in enumerate(names):
        table.add_row(name, f"{stats['norms'][name]:.3f}", f"{stats['cosine_with_mean'][name]:.3f}", *[f"{c:.3f}" for c in stats["cosine"][i]])
    Console().print(table)
    return stats


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_sigterm()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors_reported():
        analyze(validation.resolve(cfg, HydraConfig.get().runtime.choices), run_dir)
    log.info("task-vector analysis in %s", run_dir)


if __name__ == "__main__":
    main()
