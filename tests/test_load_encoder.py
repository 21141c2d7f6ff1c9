"""`taskmerge.load_encoder`: every encoder option composes; release files of every layout and a run's merged
encoder load into modules equal to the reference code's outputs; bad input is one named UserError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import taskmerge
from taskmerge.checkpoints import save_state_dict
from taskmerge.errors import UserError
from taskmerge.loading import option_config, options
from taskmerge.settings import encoder_from_spec
from taskmerge.settings.dense.encoder import CONFIGS, DenseViT
from taskmerge.settings.dense.releases import LAYOUTS, export, read_release

FIXTURES = Path(__file__).parent / "fixtures" / "dense"
OPTION_OF = {"dune_tiny": "dune_vitb14", "dinov2_tiny": "dinov2_vitb14", "dinov2_reg_tiny": "dinov2_vitb14_reg4"}


def test_every_encoder_option_composes_and_builds_on_meta():
    assert {"builtin_vit", "clip_vit_b32", "dune_vitb14", "dinov2_vitb14", "dinov2_vitb14_reg4"} <= set(options("encoder"))
    for option in options("encoder"):
        spec = option_config("encoder", option)
        if spec["name"] == "clip":
            continue  # open_clip moves the model to a device while building it (not on meta); test_clip_release loads it
        with torch.device("meta"):
            module = encoder_from_spec(spec)
        assert hasattr(module, "features") and hasattr(module, "encoder_weights"), option
    assert option_config("encoder", "dune_vitb14")["image_size"] == 448 and option_config("encoder", "dune_vitb14", image_size=518)["image_size"] == 518
    assert option_config("encoder", "dinov2_vitb14")["native_size"] == CONFIGS["dinov2_vitb14"].native_size


@pytest.mark.parametrize("name", sorted(OPTION_OF))
@pytest.mark.parametrize("size", ["native", "resampled"])
def test_release_equals_reference_x_norm_patchtokens(name: str, size: str):
    """The reference code's own weights file (native layout) through the public API: `features(images, "tokens")`
    equals the reference's `x_norm_patchtokens` to 1e-5, at the release's size and at a resampled one."""
    with safe_open(str(FIXTURES / f"{name}_io.safetensors"), "pt") as handle:
        config = json.loads(handle.metadata()["config"])
    io = load_file(str(FIXTURES / f"{name}_io.safetensors"))
    images = io[f"{size}.images"].float()
    encoder = taskmerge.load_encoder(FIXTURES / f"{name}_weights.safetensors", OPTION_OF[name], image_size=images.shape[-1],
                                     native_size=config["image_size"], embed_dim=config["embed_dim"],
                                     depth=config["depth"], num_heads=config["num_heads"])
    assert not encoder.training
    with torch.no_grad():
        tokens = encoder.features(images, "tokens")
    assert tokens.shape == (len(images), (images.shape[-2] // 14) * (images.shape[-1] // 14), config["embed_dim"])
    torch.testing.assert_close(tokens, io[f"{size}.x_norm_patchtokens"].float(), atol=1e-5, rtol=0)


def test_every_dense_layout_and_a_merged_encoder_load_to_one_function(tmp_path):
    tiny = dict(embed_dim=32, depth=2, num_heads=2, image_size=56, native_size=56)
    torch.manual_seed(0)
    canonical = DenseViT(**tiny, reg_tokens=4).canonical_weights()
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    outputs = []
    paths = [export(canonical, layout, tmp_path / f"enc_{layout}.{'safetensors' if layout == 'safetensors' else 'pth'}")
             for layout in LAYOUTS]
    paths.append(save_state_dict(tmp_path / "merged_encoder.safetensors", canonical))  # what `save_merged=true` writes
    for path in paths:
        with torch.no_grad():
            outputs.append(taskmerge.load_encoder(path, "dune_vitb14", **tiny).features(images, "tokens"))
    assert [read_release(p).layout for p in paths[:4]] == list(LAYOUTS)
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=0, rtol=0)


def test_builtin_merged_encoder_loads(tmp_path):
    spec = option_config("encoder", "builtin_vit")
    torch.manual_seed(0)
    module = encoder_from_spec(spec).eval()
    path = save_state_dict(tmp_path / "merged_encoder.safetensors", module.state_dict())
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(taskmerge.load_encoder(path, "builtin_vit").features(images, "pooled"),
                                   module.features(images, "pooled"), atol=0, rtol=0)


def test_bad_input_is_one_named_error(tmp_path):
    with pytest.raises(UserError, match=r"encoder='dune_vitl14' is not an option of config group 'encoder'; available: \[.*'dune_vitb14'"):
        option_config("encoder", "dune_vitl14")
    with pytest.raises(UserError, match=r"unknown option\(s\) \['img_size'\] for encoder=dune_vitb14"):
        option_config("encoder", "dune_vitb14", img_size=448)
    with pytest.raises(UserError, match=r"encoder.image_size=450 is invalid; expected a multiple of 14"):
        option_config("encoder", "dune_vitb14", image_size=450)
    with pytest.raises(UserError, match=r"nope.pth is not a file"):
        taskmerge.load_encoder(tmp_path / "nope.pth", "dune_vitb14")
    canonical = DenseViT(embed_dim=32, depth=2, num_heads=2, reg_tokens=4, image_size=56).canonical_weights()
    path = export(canonical, "dune", tmp_path / "tiny.pth")
    with pytest.raises(UserError, match=r"tiny.pth: its weights do not fit encoder=dune_vitb14"):
        taskmerge.load_encoder(path, "dune_vitb14", image_size=56, native_size=56)
