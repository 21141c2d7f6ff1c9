"""Seconds per candidate of TAP vs Eval selection on the built-in benchmark, and TAP against its floor.

The floor is T × n student forward passes at the encoder's measured forward throughput: what TAP
cannot go below. Extra Hydra overrides are passed through, e.g.

    python scripts/bench_selection.py                       # task arithmetic, default grid
    python scripts/bench_selection.py method=tsv tap.n_samples=64
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from taskmerge.config import register_configs
from taskmerge.encoders.extract import extract_features
from taskmerge.experiment import StageTimer, _method_space, open_pipeline
from taskmerge.config import to_plain
from taskmerge.selection import evaluation, search
from taskmerge.selection.tap import compute_tap, teacher_features


def main(overrides: list[str]) -> None:
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        cfg = to_plain(compose(config_name="config", overrides=["logger=none", *overrides]))
    pipeline = open_pipeline(cfg, StageTimer())
    setting, tap_cfg = pipeline.setting, cfg["tap"]
    unlabeled = {t.name: t.unlabeled(tap_cfg["n_samples"], tap_cfg["seed"]) for t in setting.tasks}
    teachers = {t.name: teacher_features(setting.load_encoder, setting.zoo.finetuned[t.name], unlabeled[t.name],
                                         tap_cfg["features"], setting.encoder_spec, Path(cfg["paths"]["cache_dir"]))
                for t in setting.tasks}
    fixed, space = _method_space(cfg["method"])
    candidates = search.grid_candidates(cfg["method"]["name"], fixed, space)
    merger = pipeline.mergers[cfg["method"]["name"]]
    student = setting.new_encoder(merger(candidates[0]))
    images = torch.cat([samples.take_all() for samples in unlabeled.values()])
    extract_features(student, images, tap_cfg["features"], tap_cfg["batch_size"])  # warm-up
    start = time.perf_counter()
    extract_features(student, images, tap_cfg["features"], tap_cfg["batch_size"])
    throughput = len(images) / (time.perf_counter() - start)
    floor = len(images) / throughput

    print(f"{cfg['method']['name']} on {len(setting.tasks)} tasks, {tap_cfg['n_samples']} TAP images per task, "
          f"{torch.get_num_threads()} threads; student forward {throughput:.0f} images/s, TAP floor {floor:.3f} s\n")
    print("| candidate | TAP s | Eval s | Eval / TAP | TAP / floor |\n|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for hparams in candidates:
        student.load_state_dict(student.encoder_weights(merger(hparams)))
        start = time.perf_counter()
        compute_tap(student, unlabeled, teachers, tap_cfg["features"], tap_cfg["distance"], tap_cfg["batch_size"])
        tap = time.perf_counter() - start
        start = time.perf_counter()
        evaluation.evaluate_encoder(student, setting.tasks, "val", pipeline.protocol)
        eval_seconds = time.perf_counter() - start
        totals[0] += tap
        totals[1] += eval_seconds
        print(f"| {hparams} | {tap:.3f} | {eval_seconds:.2f} | {eval_seconds / tap:.0f}× | {tap / floor:.2f} |")
    print(f"| **all {len(candidates)}** | {totals[0]:.2f} | {totals[1]:.1f} | {totals[1] / totals[0]:.0f}× | |")


if __name__ == "__main__":
    main(sys.argv[1:])
