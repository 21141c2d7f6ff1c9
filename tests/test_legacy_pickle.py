"""Legacy pickled checkpoints (task_vectors format A, pickled heads) load without running pickled code."""

import os
import sys
import types

import pytest
import torch
from torch import nn

from taskmerge import checkpoints


def _install(module_name: str, **classes: type) -> None:
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = module_name, name
        setattr(sys.modules[module_name], name, cls)


def _uninstall(*roots: str) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in roots]:
        del sys.modules[name]


def test_format_a_image_encoder_and_pickled_head_load_as_state_dicts(tmp_path):
    class VisualTransformer(nn.Module):  # the old open_clip class path that no longer exists
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 4, 4, bias=False)
            self.class_embedding = nn.Parameter(torch.randn(8))
            self.ln_post = nn.LayerNorm(8)

    class CLIP(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = VisualTransformer()
            self.logit_scale = nn.Parameter(torch.tensor(4.6))

    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = CLIP()
            self.cache_dir = None

    class ClassificationHead(nn.Linear):
        def __init__(self):
            super().__init__(8, 3)
            self.normalize = True

    _install("open_clip.model", VisualTransformer=VisualTransformer, CLIP=CLIP)
    _install("src.modeling", ImageEncoder=ImageEncoder)
    _install("src.models.modeling", ClassificationHead=ClassificationHead)
    encoder, head = ImageEncoder(), ClassificationHead()
    torch.save(encoder, tmp_path / "finetuned.pt")
    torch.save(head, tmp_path / "head_MNIST.pt")
    _uninstall("open_clip", "src")  # the loader must not need (or import) these classes

    loaded = checkpoints.load_state_dict(tmp_path / "finetuned.pt")
    expected = encoder.state_dict()
    assert sorted(loaded) == sorted(expected) and "model.visual.conv1.weight" in loaded
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    loaded_head = checkpoints.load_state_dict(tmp_path / "head_MNIST.pt")
    assert torch.equal(loaded_head["weight"], head.weight) and torch.equal(loaded_head["bias"], head.bias)


class _Malicious:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_loads_nothing_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Malicious()
    evil.marker = marker
    torch.save({"weight": torch.zeros(2), "payload": evil}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: unsafe or unreadable checkpoint .*refusing to load (posix|os|nt)\.system"):
        checkpoints.load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists(), "the payload must never run"
