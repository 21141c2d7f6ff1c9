"""Entry point: `python -m taskmerge.run [overrides]` (Hydra). Checks the config, then runs the experiment.

Each run returns its selected candidate's own TAP score (`tap.aggregate` where it scores a candidate alone, else
the mean TAP), so Hydra sweepers (e.g. Optuna) can minimise it. A bad option, value or file ends the run with
one line naming it (exit status 2), before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from taskmerge.config import register_configs
from taskmerge.entry import exit_on_sigterm, user_errors_reported

register_configs()
log = logging.getLogger(__name__)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from taskmerge import validation
    from taskmerge.distributed import from_environment
    from taskmerge.experiment import run_experiment

    exit_on_sigterm()
    hydra_cfg = HydraConfig.get()
    with user_errors_reported():
        plain = validation.resolve(cfg, hydra_cfg.runtime.choices)
        distributed = from_environment()
        run_dir = Path(distributed.broadcast(hydra_cfg.runtime.output_dir))  # one run directory for all ranks
        if plain["sweep_name"] is None and hydra_cfg.mode == RunMode.MULTIRUN:
            plain["sweep_name"] = Path(hydra_cfg.sweep.dir).name
        selection = run_experiment(plain, run_dir, distributed)
        distributed.close()
    log.info("outputs in %s", run_dir)
    return float(selection["selected_tap_score"])


if __name__ == "__main__":
    main()
