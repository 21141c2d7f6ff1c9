"""Config composition: every group option composes; bad keys, types and options fail at compose time."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import taskmerge
from taskmerge.config import register_configs

CONFIG_DIR = Path(taskmerge.__file__).parent / "configs"
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIG_DIR / g).glob("*.yaml"))]
EXPERIMENTS = [f.stem for f in sorted((CONFIG_DIR / "experiment").glob("*.yaml"))]


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_default_config_is_the_builtin_ta_tap_run():
    cfg = _compose([])
    assert cfg.method.name == "ta" and cfg.selector.name == "tap" and cfg.tasks.name == "builtin"
    assert list(cfg.method.search.alpha) == pytest.approx([0.1 * i for i in range(1, 11)])
    assert cfg.tap.n_samples == 128 and cfg.tap.distance == "l2"
    assert cfg.tasks.image_size == cfg.encoder.img_size


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes(group, option):
    # each encoder family composes with its own task sets (CLIP with clip8, DUNE/DINOv2 with dune4, WaffleIron with lidar4)
    families = {"clip_": "clip8", "dune_": "dune4", "dinov2_": "dune4", "waffleiron_": "lidar4"}
    setting = [f"tasks={tasks}" for prefix, tasks in families.items() if option.startswith(prefix)]
    cfg = _compose([*setting, f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)


def test_clip_tasks_default_to_vit_b32_and_frozen_heads():
    cfg = _compose(["tasks=clip20", "paths.data=/data", "paths.checkpoints=/ckpt"])
    assert cfg.encoder.model == "ViT-B-32" and cfg.decoder.name == "frozen_head"
    assert cfg.tasks.names[:3] == ["Cars", "DTD", "EuroSAT"] and len(cfg.tasks.names) == 20
    assert cfg.tasks.data_location == "/data" and cfg.tasks.checkpoints == "/ckpt"
    assert _compose(["tasks=clip14", "encoder=clip_vit_l14"]).encoder.model == "ViT-L-14"
    with pytest.raises(ConfigCompositionException, match="tasks.format=C"):
        _compose(["tasks=clip8", "tasks.format=C"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    OmegaConf.to_container(_compose([f"experiment={experiment}"]), resolve=True)


def test_fixed_value_and_search_override():
    cfg = _compose(["method.alpha=0.3", "method.search.alpha=[0.2,0.4]"])
    assert cfg.method.alpha == 0.3 and list(cfg.method.search.alpha) == [0.2, 0.4]


@pytest.mark.parametrize(
    ("override", "error", "fragment"),
    [
        ("method.alpah=0.3", ConfigCompositionException, "alpah"),
        ("method.alpha=abc", ConfigCompositionException, "alpha"),
        ("method=nonexistent", ConfigCompositionException, "nonexistent"),
        ("tap.distance=manhattan", ConfigCompositionException, "manhattan"),
        ("selector=oracle", ConfigCompositionException, "oracle"),
        ("seeed=1", ConfigCompositionException, "seeed"),
        ("tasks.n_train=many", ConfigCompositionException, "n_train"),
    ],
)
def test_bad_override_fails_at_compose_time(override, error, fragment):
    with pytest.raises((error, ConfigKeyError, ValidationError)) as info:
        _compose([override])
    text = str(info.value) + str(info.value.__cause__ or "")
    assert fragment in text
