"""Entry point: `python -m taskmerge.run [overrides]` (Hydra). Composes the config, then runs the experiment.

Each run returns the mean TAP of its selected candidate, so Hydra sweepers (e.g. Optuna) can minimise it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from taskmerge.config import register_configs
from taskmerge.distributed import from_environment

register_configs()
log = logging.getLogger(__name__)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python values (enums as strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from taskmerge.experiment import run_experiment

    hydra_cfg = HydraConfig.get()
    distributed = from_environment()
    run_dir = Path(distributed.broadcast(hydra_cfg.runtime.output_dir))  # one run directory for all ranks
    plain = to_plain(cfg)
    if plain["sweep_name"] is None and hydra_cfg.mode == RunMode.MULTIRUN:
        plain["sweep_name"] = Path(hydra_cfg.sweep.dir).name
    selection = run_experiment(plain, run_dir, distributed)
    distributed.close()
    log.info("outputs in %s", run_dir)
    return float(selection["selected_tap"]["mean"])


if __name__ == "__main__":
    main()
