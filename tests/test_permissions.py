"""Everything written through the atomic-write path honours the umask (a cache on a shared disk stays readable
by colleagues under umask 022; private under 077): files 0o666 & ~umask, folders 0o777 & ~umask."""

import os
import stat

import pytest
import torch

from taskmerge import cache, checkpoints, plots
from taskmerge.settings.clip import release as release_zoo
from taskmerge.settings.builtin.tasks import build_builtin_task
from taskmerge.settings.builtin.zoo import get_builtin_zoo

ENCODER = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
RECIPE = {"pretrain": {"n_images": 64, "epochs": 1, "lr": 1e-3, "batch_size": 32},
          "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 32}}


def _identity(state, source):
    return state


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_files_and_folders_get_the_umask_permissions(tmp_path, umask):
    out = tmp_path / "out"
    assert checkpoints.umask() == umask
    cache.atomic_write_text(out / "run" / "report.md", "# report\n")
    cache.atomic_write_json(out / "run" / "selection.json", {"a": 1})
    checkpoints.save_state_dict(out / "run" / "merged_encoder.safetensors", {"w": torch.ones(2)})
    plots.plot_layer_norms(["blocks.0", "blocks.1"], {"digits": {"blocks.0": 1.0, "blocks.1": 2.0}}, out / "run" / "plots" / "norms.png")
    cache.write_json_entry(out / "cache" / "references" / "r.json", {"b": 2})
    cache.write_tensors_entry(out / "cache" / "teacher" / "t.safetensors", {"features": torch.ones(3)})
    get_builtin_zoo(ENCODER, RECIPE, [build_builtin_task("digits", 32, 8, 8, 32, seed=0)], 0, out / "cache")
    source = out / "release" / "ft.pt"
    source.parent.mkdir()
    torch.save({"w": torch.ones(2)}, source)
    release_zoo.convert(source, out / "cache", _identity)

    files = [p for p in out.rglob("*") if p.is_file() and p != source]
    folders = [p for p in out.rglob("*") if p.is_dir()] + [out]
    assert len(files) > 20 and any(p.suffix == ".png" for p in files) and any(p.parent.name == "release" for p in files)
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask} == {}
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders if stat.S_IMODE(p.stat().st_mode) != 0o777 & ~umask} == {}
