"""Legacy pickled checkpoints (task_vectors format A, pickled heads) load as exact tensors without importing or
running any code the pickle names; pickles that would run code are refused with the file and the culprit named."""

import builtins
import contextlib
import functools
import io
import os
import pickle
import pickletools
import re
import subprocess
import sys
import zipfile
from typing import Iterator

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from clip_release import ClassificationHead, ImageEncoder, old_class_paths
from taskmerge import checkpoints
from taskmerge.legacy_pickle import Placeholder, RestrictedUnpickler, load_legacy_object

BLOCKED = ("torchvision", "open_clip", "src")


def _tiny_clip() -> CLIP:
    """A real open_clip CLIP (its own attributes, non-persistent `attn_mask` included), small enough for a fast
    test, text transformer deleted as the release's ImageEncoder does."""
    torch.manual_seed(0)
    clip = CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(layers=2, width=16, head_width=8, patch_size=8, image_size=16),
                text_cfg=CLIPTextCfg(context_length=4, vocab_size=10, width=8, heads=1, layers=1), quick_gelu=True)
    del clip.transformer
    return clip


def _save_release(path, obj, clip) -> None:
    """`torch.save` as the release did: open_clip 2.0.2 class paths, `src.modeling` / `src.models.modeling` stand-ins."""
    with old_class_paths([clip]):
        torch.save(obj, path)


def _globals(path) -> set[str]:
    """The `module.name`s a `torch.save` file's pickle refers to."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@contextlib.contextmanager
def blocked_imports() -> Iterator[list[str]]:
    """torchvision, open_clip and src cannot be imported meanwhile; the list receives every import attempted."""
    imported: list[str] = []
    real_import = builtins.__import__
    with pytest.MonkeyPatch.context() as patch:
        for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED] + list(BLOCKED):
            patch.setitem(sys.modules, name, None)
        patch.setattr(builtins, "__import__",
                      lambda name, *args, **kwargs: imported.append(name) or real_import(name, *args, **kwargs))
        yield imported


def state_dict_hook(module, state_dict, prefix, local_metadata):
    """A state-dict hook pickled by reference: loaded, it is a placeholder and must never stand in for the result."""


def test_format_a_with_the_release_attributes_and_a_pickled_head_load_exact_tensors(tmp_path):
    clip = _tiny_clip()
    encoder, head = ImageEncoder(clip), ClassificationHead(True, torch.randn(3, 8))
    encoder.register_state_dict_post_hook(state_dict_hook)
    _save_release(tmp_path / "finetuned.pt", encoder, clip)
    _save_release(tmp_path / "head_MNIST.pt", head, clip)
    names = _globals(tmp_path / "finetuned.pt")
    assert {"src.modeling.ImageEncoder", "open_clip.model.CLIP", "open_clip.model.VisualTransformer",
            "torchvision.transforms.transforms.Compose", "torchvision.transforms.functional.InterpolationMode",
            "open_clip.transform._convert_to_rgb", "torch.nn.modules.activation.MultiheadAttention"} <= names

    with blocked_imports() as imported:
        loaded = checkpoints.load_state_dict(tmp_path / "finetuned.pt")
        loaded_head = checkpoints.load_state_dict(tmp_path / "head_MNIST.pt")
        obj = load_legacy_object(tmp_path / "finetuned.pt")
    assert not [name for name in imported if name.split(".")[0] in BLOCKED], "nothing the pickle names is imported"

    expected = encoder.state_dict()
    assert sorted(loaded) == sorted(expected) and "model.visual.conv1.weight" in loaded and "model.logit_scale" in loaded
    assert "model.attn_mask" not in loaded, "non-persistent buffers are not weights"
    assert all(torch.equal(loaded[k], expected[k]) and loaded[k].dtype == expected[k].dtype for k in expected)
    assert sorted(loaded_head) == ["bias", "weight"]
    assert torch.equal(loaded_head["weight"], head.weight) and torch.equal(loaded_head["bias"], head.bias)

    assert isinstance(obj, Placeholder) and type(obj).pickled_as == "src.modeling.ImageEncoder"
    assert type(obj.model.visual).__name__ == "VisualTransformer" and obj.model.context_length == 4
    assert obj.cache_dir == encoder.cache_dir and obj.model.training
    resize, crop, to_rgb, to_tensor, normalize = obj.val_preprocess.transforms
    assert type(obj.val_preprocess).pickled_as == "torchvision.transforms.transforms.Compose"
    assert all(isinstance(t, Placeholder) and type(t).__module__.startswith("legacy.torchvision") for t in (resize, crop, to_tensor))
    assert issubclass(to_rgb, Placeholder) and to_rgb.pickled_as == "open_clip.transform._convert_to_rgb"
    assert resize.interpolation.pickled_args == ("bicubic",) and normalize.mean == encoder.val_preprocess.transforms[-1].mean
    assert type(obj.train_preprocess.transforms[0]).pickled_as == "torchvision.transforms.transforms.RandomResizedCrop"
    with pytest.raises(RuntimeError, match="src.modeling.ImageEncoder is a placeholder .* cannot run"):
        obj(torch.zeros(1, 3, 16, 16))


class Slotted:
    """Pickles a `(dict, slots)` state."""

    __slots__ = ("a", "__dict__")


class Opaque:
    """Pickles a state that is neither a dict nor a `(dict, slots)` pair."""

    def __getstate__(self):
        return [1, 2]


class Items(list):
    """Pickles its items with APPENDS."""


class Entries(dict):
    """Pickles its entries with SETITEMS."""


def test_placeholders_survive_every_way_pickle_builds_objects():
    from open_clip.transform import _convert_to_rgb
    from torchvision.transforms import InterpolationMode, ToTensor

    def load(obj, protocol):
        return RestrictedUnpickler(io.BytesIO(pickle.dumps(obj, protocol))).load()

    slotted = Slotted()
    slotted.a, slotted.b = 1, 2
    rgb, mode, to_tensor, slots, state, items, entries, raw = load(
        [_convert_to_rgb, InterpolationMode.BICUBIC, ToTensor(), slotted, Opaque(), Items([1, 2]), Entries(k=3), b"\x00\xff"], 2)
    assert issubclass(rgb, Placeholder) and rgb.pickled_as == "open_clip.transform._convert_to_rgb"  # GLOBAL as a value
    assert isinstance(mode, Placeholder) and mode.pickled_args == ("bicubic",)  # REDUCE
    assert type(to_tensor).pickled_as == "torchvision.transforms.transforms.ToTensor"  # NEWOBJ
    assert (slots.a, slots.b) == (1, 2) and state.pickled_state == [1, 2]  # BUILD with (dict, slots) and other states
    assert items.pickled_items == [1, 2] and entries.pickled_entries == {"k": 3} and raw == b"\x00\xff"  # APPENDS, SETITEMS

    assert b"copy_reg\n_reconstructor" in pickle.dumps(ToTensor(), 1)
    to_tensor, state, items = load([ToTensor(), Opaque(), Items([1, 2])], 1)
    assert type(to_tensor).pickled_as.endswith("ToTensor") and to_tensor.state_dict() == {}
    assert state.pickled_state == [1, 2] and items.pickled_args == ([1, 2],)
    with pytest.raises(RuntimeError, match="ToTensor is a placeholder"):
        to_tensor(torch.zeros(1))


class Call:
    """Pickles as `func(*args)`, the shape of every pickle payload (callable, so that pickle accepts it as a function)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):
        raise AssertionError("never called")


PAYLOADS = {
    f"{os.system.__module__}.system": lambda marker: Call(os.system, f"touch {marker}"),
    "builtins.eval": lambda marker: Call(eval, f"__import__('os').system('touch {marker}')"),
    "subprocess.Popen": lambda marker: Call(subprocess.Popen, ["touch", str(marker)]),
    "subprocess.call": lambda marker: Call(subprocess.call, ["touch", str(marker)]),
    "functools.partial": lambda marker: Call(functools.partial(os.system, f"touch {marker}")),
    "builtins.getattr": lambda marker: Call(Call(getattr, Call(__import__, "os"), "system"), f"touch {marker}"),
    "torch.serialization.load": lambda marker: Call(torch.load, str(marker)),
}


@pytest.mark.parametrize("culprit", [c for c in PAYLOADS if c != "torch.serialization.load"])
def test_the_payloads_run_under_plain_pickle(tmp_path, culprit):
    marker = tmp_path / "ran"
    result = pickle.loads(pickle.dumps(PAYLOADS[culprit](marker), protocol=2))
    getattr(result, "wait", lambda: None)()  # Popen
    assert marker.exists()


@pytest.mark.parametrize("culprit", PAYLOADS)
def test_a_payload_hidden_in_a_transform_is_refused_by_name_and_never_runs(tmp_path, culprit):
    marker = tmp_path / "pwned"
    clip = _tiny_clip()
    encoder = ImageEncoder(clip)
    encoder.val_preprocess.transforms.insert(2, PAYLOADS[culprit](marker))
    _save_release(tmp_path / "finetuned.pt", encoder, clip)
    python2_name = culprit.replace("subprocess.", "commands.").replace("builtins.", "__builtin__.")  # as protocol 2 writes it
    assert python2_name in _globals(tmp_path / "finetuned.pt")
    message = re.escape(f"{tmp_path / 'finetuned.pt'}: unsafe or unreadable checkpoint (refusing to load {culprit}: ")
    with pytest.raises(ValueError, match=message):
        checkpoints.load_state_dict(tmp_path / "finetuned.pt")
    assert not marker.exists(), "the payload must never run"
