"""ScaLR release files, written in the test exactly as ScaLR writes them (DDP `module.` prefixes, AdamW + LambdaLR
states holding numpy scalars under numpy 1 or numpy 2 names, BatchNorm buffers, the pretrained file's
`model_points` / `model_point` with a distillation head), load strictly into the WaffleIron encoder; pickles that
would run code are refused naming the file and the culprit, and nothing runs."""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from taskmerge.errors import UserError
from taskmerge.legacy_pickle import NUMPY_SAFE_GLOBALS, load_legacy_object
from taskmerge.settings.lidar.encoder import create_lidar_encoder
from taskmerge.settings.lidar.releases import architecture, check_architecture, read_release, read_weights

NUMPY_SCALAR = np.float64(0).__reduce__()[0]


class WarmupCosine:
    """ScaLR's scheduler factor (utils/scheduler.py): numpy arithmetic, so the learning rates become np.float64."""

    def __init__(self, warmup_end: int, max_iter: int, factor_min: float) -> None:
        self.warmup_end, self.max_iter, self.factor_min = warmup_end, max_iter, factor_min

    def __call__(self, step: int) -> float:
        if step < self.warmup_end:
            return step / self.warmup_end
        angle = (step - self.warmup_end) / (self.max_iter - self.warmup_end) * np.pi
        return self.factor_min + 0.5 * (1 - self.factor_min) * (np.cos(angle) + 1)


class Segmenter(nn.Module):
    """The reference module tree: our encoder's `embed` and `waffleiron` plus a `classif` head."""

    def __init__(self, classif: nn.Module) -> None:
        super().__init__()
        encoder = create_lidar_encoder("waffleiron_tiny")
        self.embed, self.waffleiron, self.classif = encoder.embed, encoder.waffleiron, classif


class Numpy1Pickler(pickle._Pickler):
    """Writes numpy's scalar rebuilder under its numpy 1 name, as the 2024 releases were pickled."""

    def save_global(self, obj, name=None):  # noqa: ANN001 - pickle's signature
        if obj is NUMPY_SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1 = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=Numpy1Pickler, Unpickler=pickle.Unpickler,
                               load=pickle.load)


def _training_state(model: nn.Module) -> tuple[dict, dict]:
    """AdamW and LambdaLR(WarmupCosine) states after two steps, as ScaLR's finetuner holds them."""
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.003)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, WarmupCosine(2, 10, 0.01))
    for _ in range(3):
        optim.step()
        scheduler.step()
    return optim.state_dict(), scheduler.state_dict()


def _ddp(model: nn.Module) -> dict[str, torch.Tensor]:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(123)
    return {f"module.{key}": value for key, value in model.state_dict().items()}


def _finetuned(path: Path, numpy1: bool = False, classes: int = 5) -> Segmenter:
    torch.manual_seed(0)
    model = Segmenter(nn.Sequential(nn.BatchNorm1d(32), nn.Conv1d(32, classes, 1)))
    optim, scheduler = _training_state(model)
    container = {"epoch": 19, "net": _ddp(model), "optim": optim, "scheduler": scheduler,
                 "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 0}}
    assert isinstance(scheduler["_last_lr"][0], np.float64)
    torch.save(container, path, **({"pickle_module": NUMPY1} if numpy1 else {}))
    return model


def _pretrained(path: Path, key: str) -> Segmenter:
    torch.manual_seed(1)
    model = Segmenter(nn.Conv1d(32, 48, 1))  # the distillation head (1024 outputs for WI-768)
    optim, scheduler = _training_state(model)
    torch.save({"epoch": 24, key: _ddp(model), "optim": optim, "scheduler": scheduler, "scaler": None}, path)
    return model


def _strict_load(encoder_state: dict[str, torch.Tensor], model: Segmenter) -> None:
    encoder = create_lidar_encoder("waffleiron_tiny")
    encoder.load_state_dict(encoder.encoder_weights(encoder_state), strict=True)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2_names", "numpy1_names"])
def test_finetuned_ckpt_last_loads_strictly(tmp_path: Path, numpy1: bool) -> None:
    path = tmp_path / "ckpt_last.pth"
    model = _finetuned(path, numpy1=numpy1)
    raw = path.read_bytes()
    assert (b"numpy.core.multiarray" in raw) == numpy1 and b"scalar" in raw
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain weights-only refuses the numpy scalars
    release = read_release(path)
    assert (release.layout, release.state_key, release.epoch, release.num_classes) == ("finetuned", "net", 19, 5)
    assert sorted(release.head) == ["classif.0.bias", "classif.0.num_batches_tracked", "classif.0.running_mean",
                                    "classif.0.running_var", "classif.0.weight", "classif.1.bias", "classif.1.weight"]
    assert len(release.encoder) + len(release.head) == len(model.state_dict())
    assert release.encoder["embed.norm.num_batches_tracked"].dtype == torch.int64
    _strict_load(release.encoder, model)
    # a folder holding the file reads the same
    assert read_weights(tmp_path).keys() == release.encoder.keys()


def test_numpy_scalars_come_back_as_numbers(tmp_path: Path) -> None:
    """Both load paths (weights-only with the allow-list, and the restricted unpickler) give real numpy floats."""
    path = tmp_path / "ckpt_last.pth"
    _finetuned(path, numpy1=True)
    with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
        weights_only = torch.load(path, weights_only=True)
    restricted = load_legacy_object(path)
    for loaded in (weights_only, restricted):
        last_lr = loaded["scheduler"]["_last_lr"][0]
        assert type(last_lr) is np.float64 and 0 < last_lr <= 1e-3
        assert loaded["scheduler"]["lr_lambdas"][0]["max_iter"] == 10


@pytest.mark.parametrize("key", ["model_points", "model_point"])
def test_pretrained_drops_the_distillation_head(tmp_path: Path, key: str) -> None:
    path = tmp_path / "model.pth"
    model = _pretrained(path, key)
    release = read_release(path)
    assert (release.layout, release.state_key, release.head, release.num_classes) == ("pretrained", key, {}, None)
    assert release.dropped == ("classif.bias", "classif.weight")
    _strict_load(release.encoder, model)
    assert architecture(release.encoder) == {"input_channels": 5, "channels": 32, "depth": 4}


def test_model_points_preferred_and_plain_state_dicts(tmp_path: Path) -> None:
    """`model_points` is tried first (ScaLR's finetune.py); plain state dicts with or without `module.` and our
    own safetensors read the same tensors."""
    torch.manual_seed(2)
    first, second = Segmenter(nn.Conv1d(32, 4, 1)), Segmenter(nn.Conv1d(32, 4, 1))
    torch.save({"model_points": _ddp(first), "model_point": _ddp(second)}, tmp_path / "both.pth")
    _strict_load(read_weights(tmp_path / "both.pth"), first)
    plain = {key: value.clone() for key, value in first.state_dict().items()}
    torch.save(plain, tmp_path / "plain.pt")
    save_file(plain, str(tmp_path / "plain.safetensors"))
    for name in ("plain.pt", "plain.safetensors"):
        release = read_release(tmp_path / name)
        assert release.layout == "state_dict" and sorted(release.head) == ["classif.bias", "classif.weight"]
        _strict_load(release.encoder, first)


def test_errors_name_the_file_and_what_was_found(tmp_path: Path) -> None:
    torch.save({"epoch": 1, "optim": {}}, tmp_path / "no_model.pth")
    with pytest.raises(UserError, match=r"no_model\.pth: no WaffleIron state dict found; top-level keys \['epoch', 'optim'\]"):
        read_release(tmp_path / "no_model.pth")
    torch.save({"module.blocks.0.weight": torch.zeros(1)}, tmp_path / "vit.pth")
    with pytest.raises(UserError, match=r"vit\.pth: not a WaffleIron Segmenter state dict.*blocks\.0\.weight"):
        read_release(tmp_path / "vit.pth")
    torch.save({"net": {"module.embed.conv1.weight": torch.zeros(2, 5, 1)}}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"partial\.pth: the WaffleIron encoder lacks"):
        read_release(tmp_path / "partial.pth")
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match=r"broken\.pth: cannot read"):
        read_release(tmp_path / "broken.pth")
    with pytest.raises(UserError, match="checkpoint not found"):
        read_release(tmp_path / "missing.pth")
    empty = tmp_path / "release"
    empty.mkdir()
    with pytest.raises(UserError, match=r"release: a release folder should hold ckpt_last\.pth or model\.pth"):
        read_release(empty)
    model = _pretrained(tmp_path / "model.pth", "model_points")
    with pytest.raises(UserError, match=r"configured with .*'channels': 768"):
        check_architecture(read_weights(tmp_path / "model.pth"), create_lidar_encoder("waffleiron_768").config,
                           tmp_path / "model.pth")
    del model


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return os.system, (f"touch {self.marker}",)


class _ObjectScalar:
    def __reduce__(self):  # noqa: ANN204
        return NUMPY_SCALAR, (np.dtype(object), {"not": "a number"})


def test_malicious_release_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    """A ckpt_last.pth whose optimiser state would run a shell command: refused by name, the command never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt_last.pth"
    model = _finetuned(path)
    container = torch.load(path, weights_only=False)
    container["optim"]["state"][0]["evil"] = _RunsCommand(marker)
    torch.save(container, path)
    with pytest.raises(UserError, match=r"ckpt_last\.pth: .*refusing to load posix\.system"):
        read_release(path)
    assert not marker.exists()
    # numpy's scalar rebuilder with an object dtype would hand back any pickled object: refused too
    container["optim"]["state"][0]["evil"] = _ObjectScalar()
    torch.save(container, path)
    with pytest.raises(UserError, match=r"ckpt_last\.pth: .*(refusing a numpy scalar|ObjectDType)"):
        read_release(path)
    del model
