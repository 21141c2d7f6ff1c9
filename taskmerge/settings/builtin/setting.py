"""The built-in benchmark's checks of a run's inputs, before anything is generated or trained."""

from __future__ import annotations

from typing import Any, Mapping

from taskmerge.errors import UserError
from taskmerge.tasks import builtin_task_kind, builtin_task_names


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """Known task names, enough training images for TAP's and AdaMerging's unlabeled sets, an encoder whose
    patches tile the image, and frozen classification heads for entropy AdaMerging."""
    tasks_cfg, encoder_cfg, method_cfg = cfg["tasks"], cfg["encoder"], cfg["method"]
    unknown = [n for n in tasks_cfg["names"] if n not in builtin_task_names()]
    if unknown:
        raise UserError(f"tasks.names: unknown task(s) {unknown}; the built-in benchmark has {builtin_task_names()}")
    if cfg["tap"]["n_samples"] > tasks_cfg["n_train"]:
        raise UserError(f"tap.n_samples={cfg['tap']['n_samples']} is more than the {tasks_cfg['n_train']} training images "
                        f"per task (tasks.n_train); expected at most tasks.n_train")
    if encoder_cfg["img_size"] % encoder_cfg["patch_size"]:
        raise UserError(f"encoder.img_size={encoder_cfg['img_size']} is not a multiple of encoder.patch_size="
                        f"{encoder_cfg['patch_size']}")
    if encoder_cfg["embed_dim"] % encoder_cfg["num_heads"]:
        raise UserError(f"encoder.embed_dim={encoder_cfg['embed_dim']} is not a multiple of encoder.num_heads="
                        f"{encoder_cfg['num_heads']}")
    if method_cfg["name"] == "adamerging" and method_cfg["loss"] == "entropy":
        headless = [n for n in tasks_cfg["names"] if builtin_task_kind(n) != "classification"]
        if headless:
            raise UserError(f"method.loss=entropy needs a frozen classification head for every task; {headless} have "
                            f"none (dense tasks): use method.loss=tap, or tasks.names without them")
