"""The run directory's lock, and a restarted run resuming its W&B run instead of leaving a second one."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from taskmerge.config import register_configs, to_plain
from taskmerge.errors import UserError
from taskmerge.experiment import run_experiment
from taskmerge.tracking import WandbLogger, run_directory_lock


def test_run_experiment_refuses_a_run_directory_held_by_another_run(tmp_path):
    run_dir = tmp_path / "run"
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        cfg = to_plain(compose(config_name="config", overrides=["method.alpha=0.3", "tasks.names=[digits]", "tasks.n_train=8",
                                                                "tap.n_samples=4", "device=cpu", "logger=none"]))
    with run_directory_lock(run_dir):
        with pytest.raises(UserError, match=f"hydra.run.dir={run_dir} is in use by another run \\(pid \\d+"):
            run_experiment(cfg, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".taskmerge.lock"], "refused before writing anything"


def test_restarted_run_resumes_its_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for attempt in range(2):  # the first attempt is "killed" after one row, the second logs both rows
        logger = WandbLogger(tmp_path, {"seed": 0}, project="taskmerge", mode="offline", entity=None, group="g",
                             job_type="tap", name="run")
        for row in range(attempt + 1):
            logger.log_candidate({"hparams": {"alpha": row}, "tap": {"mean": float(row)}})
        ids.append(logger.run.id)
        logger.finish()
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert ids[0] == ids[1] and len(runs) == 1 and runs[0].name.endswith(ids[0])
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == ids[0]
