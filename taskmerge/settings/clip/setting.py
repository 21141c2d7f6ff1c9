"""The CLIP benchmark assembled from a config: checks of every input, the release zoo and the tasks.

`check_inputs` is cheap and raises the user's errors (unset paths, missing datasets or checkpoint files,
mismatched encoder) before any work; with several processes every rank runs it, so no rank is left waiting
at a barrier for one that failed. `load_zoo` converts the release (rank 0 first, then the others find it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch

from torch import nn

from taskmerge import checkpoints
from taskmerge.errors import UserError
from taskmerge.settings.clip import datasets as clip_datasets
from taskmerge.settings.clip import release as release_zoo
from taskmerge.settings.clip import tasks as clip_tasks
from taskmerge.settings.clip.encoder import ClipImageEncoder, image_size, output_dim, preprocess, pretrained_clip
from taskmerge.tasks import Task
from taskmerge.zoo import Zoo

ENCODERS = {"clip": ClipImageEncoder}
# The reference TSV/Iso/STAR code never treats the text projection a release carries as a matrix to decompose.
MERGE_DEFAULTS: dict[str, Any] = {"exclude": "text_projection"}

ENVIRONMENT = {"data_location": ("paths.data", "TASKMERGE_DATA_DIR"),
               "checkpoints": ("paths.checkpoints", "TASKMERGE_CHECKPOINTS_DIR")}
DECODER_HEADS: dict[str, tuple[str, ...]] = {}  # one classification decoder per task


def required_path(tasks_cfg: Mapping[str, Any], key: str) -> Path:
    """`tasks.<key>` as a path, or an error saying the three ways to set it."""
    if tasks_cfg[key] is None:
        option, env = ENVIRONMENT[key]
        raise UserError(f"tasks.{key} is not set: pass {option}=DIR, set it in configs/local/, or export {env}")
    return Path(tasks_cfg[key])


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """Every user input of a CLIP run exists and fits, or one clear error: dataset names, paths, dataset
    folders (all missing ones listed) and release files (all missing ones listed)."""
    tasks_cfg, encoder_cfg = cfg["tasks"], cfg["encoder"]
    names = list(tasks_cfg["names"])
    unknown = [n for n in names if n not in clip_datasets.CLIP20]
    if unknown:
        raise UserError(f"tasks.names: unknown CLIP benchmark dataset(s) {unknown}; expected names from {list(clip_datasets.CLIP20)}")
    zeroshot = tasks_cfg["heads"] == "zeroshot"
    if zeroshot and (tasks_cfg["zeroshot_weights"] is None or not Path(tasks_cfg["zeroshot_weights"]).is_file()):
        raise UserError(f"tasks.heads=zeroshot needs tasks.zeroshot_weights=PATH to pretrained CLIP weights (text tower); "
                        f"got {tasks_cfg['zeroshot_weights']!r}")
    try:
        clip_datasets.check_layout(names, required_path(tasks_cfg, "data_location"))
        files = release_zoo.release_files(required_path(tasks_cfg, "checkpoints"), encoder_cfg["model"], names, tasks_cfg["format"])
        release_zoo.check_release(files, encoder_cfg["model"], tasks_cfg["format"], with_heads=not zeroshot)
    except FileNotFoundError as error:  # the listing of every missing dataset folder or release file
        raise UserError(str(error)) from error


def load_zoo(cfg: Mapping[str, Any]) -> Zoo:
    """The release zoo of the configured CLIP tasks, with the release's heads or zero-shot heads (the CLIP
    text tower is loaded only if some head is not cached yet)."""
    tasks_cfg, encoder_cfg, cache_dir = cfg["tasks"], cfg["encoder"], cfg["paths"]["cache_dir"]
    names, model = list(tasks_cfg["names"]), encoder_cfg["model"]
    heads = None
    if tasks_cfg["heads"] == "zeroshot":
        weights = tasks_cfg["zeroshot_weights"]
        model_id = {"weights": checkpoints.fingerprint(weights), "model": model, "quick_gelu": encoder_cfg["quick_gelu"],
                    "open_clip": open_clip.__version__}
        heads = clip_tasks.zeroshot_heads(lambda: pretrained_clip(model, weights, encoder_cfg["quick_gelu"]), names,
                                          required_path(tasks_cfg, "data_location"), cache_dir, model_id)
    return release_zoo.get_release_zoo(required_path(tasks_cfg, "checkpoints"), model, names, tasks_cfg["format"],
                                       cache_dir, heads)


def build_tasks(cfg: Mapping[str, Any], zoo: Zoo) -> list[Task]:
    """The CLIP datasets with the release's splits and preprocessing, each with its frozen head."""
    tasks_cfg, model = cfg["tasks"], cfg["encoder"]["model"]
    root, transform = required_path(tasks_cfg, "data_location"), preprocess(image_size(model))
    return [clip_tasks.build_clip_task(name, root, transform, clip_tasks.load_head(zoo.heads[name], output_dim(model)),
                                       tasks_cfg["max_eval_images"], tasks_cfg["num_workers"], cfg["seed"])
            for name in tasks_cfg["names"]]


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """A CLIP image encoder of family `name` with random weights (the release's weights are loaded after)."""
    return ENCODERS[name](**kwargs)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A CLIP encoder file in any release format (A: pickled `ImageEncoder`, B/C: state dicts) or a run's merged one."""
    return checkpoints.load_state_dict(path)
