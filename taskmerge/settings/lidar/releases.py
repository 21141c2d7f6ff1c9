"""ScaLR releases (spec lidar §2) read into the zoo's key space: the reference `Segmenter` names without `module.`.

Layouts, told apart by the container:
- `ckpt_last.pth` of fine-tuning and linear probing: `{epoch, net, optim, scheduler, scaler}`; `net` is the state
  dict of the DDP model (every key `module.`-prefixed), its head `classif.0.*` (BatchNorm1d) + `classif.1.*` (Conv1d);
- the pretrained `model.pth` (and the distiller's own `ckpt_last.pth`): the model under `model_points` (tried
  first, as ScaLR's finetune.py does) or `model_point`, `module.`-prefixed, with the distillation head
  `classif.{weight, bias}` (1024 outputs for WI-768), which is dropped;
- a plain state dict, with or without `module.`, in a `.pth/.pt` or `.safetensors` file (what this project writes);
- a folder holding one of these (`ckpt_last.pth`, then `model.pth`, then a single weights file), as the release
  archives unpack.
Encoder = `embed.*` + `waffleiron.*`; head = `classif.*`. `.pth` files go through `torch.load(weights_only=True)`
with numpy's number rebuilders allow-listed (the optimiser and scheduler states hold numpy scalars), falling back
to the project's restricted unpickler; neither runs pickled code. Every error names the file and what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from taskmerge.checkpoints import load_container
from taskmerge.errors import UserError
from taskmerge.legacy_pickle import NUMPY_SAFE_GLOBALS

from .encoder import ENCODER_PREFIXES, WaffleIronConfig

Layout = Literal["finetuned", "pretrained", "state_dict"]

HEAD_PREFIX = "classif."
_MODEL_KEYS = ("model_points", "model_point")  # ScaLR finetune.py's order
_FOLDER_FILES = ("ckpt_last.pth", "model.pth")
_SUFFIXES = (".pth", ".pt", ".safetensors")
_REQUIRED = ("embed.norm.running_mean", "embed.conv1.weight", "embed.final.weight", "waffleiron.channel_mix.0.mlp.0.weight")
_LAYER = re.compile(r"^waffleiron\.channel_mix\.(\d+)\.")


@dataclass(frozen=True)
class Release:
    """One release file: its encoder and head tensors (Segmenter names, no `module.`) and where they came from."""

    path: Path
    layout: Layout
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # `classif.*` of a fine-tuned or linear-probe file; empty for a pretrained one
    state_key: str | None  # "net", "model_points", "model_point", or None for a plain state dict
    epoch: int | None = None
    dropped: tuple[str, ...] = field(default=())  # the distillation head's keys, left out

    @property
    def num_classes(self) -> int | None:
        """Classes of the segmentation head (`classif.1.weight` rows), None without one."""
        weight = self.head.get("classif.1.weight", self.head.get("classif.weight"))
        return None if weight is None else int(weight.shape[0])


def read_release(path: str | Path) -> Release:
    """Read any layout above; refuse a file without a complete WaffleIron encoder."""
    path = release_file(Path(path))
    container = load_container(path, safe_globals=NUMPY_SAFE_GLOBALS, suffixes=(".pth", ".pt"))
    state, state_key = _state_dict_of(container, path)
    encoder, head = split_state(state, path)
    layout: Layout = "state_dict" if state_key is None else ("finetuned" if state_key == "net" else "pretrained")
    dropped: tuple[str, ...] = ()
    if layout == "pretrained":
        dropped, head = tuple(sorted(head)), {}
    epoch = container.get("epoch") if state_key is not None else None
    return Release(path, layout, encoder, head, state_key, int(epoch) if isinstance(epoch, int) else None, dropped)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder state dict of a release (the zoo's key space, what `WaffleIronEncoder.encoder_weights` takes)."""
    return read_release(path).encoder


def split_state(state: Mapping[str, Any], path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, head) of a Segmenter state dict read from `path` (named in errors), `module.` prefixes stripped."""
    encoder: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for key, value in state.items():
        name = key[len("module."):] if isinstance(key, str) and key.startswith("module.") else key
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            other.append(repr(key))
            continue
        target = encoder if name.startswith(ENCODER_PREFIXES) else head if name.startswith(HEAD_PREFIX) else None
        if target is None:
            other.append(key)
        elif name in target:
            raise UserError(f"{path}: two tensors map to {name!r} (with and without the 'module.' prefix)")
        else:
            target[name] = value
    if other:
        raise UserError(f"{path}: not a WaffleIron Segmenter state dict: {len(other)} entries outside "
                        f"embed.*, waffleiron.*, classif.* (e.g. {other[:4]})")
    missing = [key for key in _REQUIRED if key not in encoder]
    if missing:
        raise UserError(f"{path}: the WaffleIron encoder lacks {missing} ({len(encoder)} encoder keys found, "
                        f"e.g. {sorted(encoder)[:3]})")
    return encoder, head


def architecture(encoder: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Input channels, width and depth read off an encoder state dict."""
    weight = encoder["embed.conv1.weight"]
    layers = {int(match.group(1)) for key in encoder if (match := _LAYER.match(key))}
    return {"input_channels": int(weight.shape[1]), "channels": int(weight.shape[0]), "depth": len(layers)}


def check_architecture(encoder: Mapping[str, torch.Tensor], config: WaffleIronConfig, path: str | Path) -> None:
    """Refuse a release whose shapes disagree with the configured encoder, naming both."""
    found = architecture(encoder)
    wanted = {"input_channels": config.input_channels, "channels": config.channels, "depth": config.depth}
    if found != wanted:
        raise UserError(f"{path}: a WaffleIron with {found}, but the encoder is configured with {wanted}")


def release_file(path: Path) -> Path:
    """The weights file itself, or the one a release folder holds."""
    if path.is_dir():
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if len(files) != 1:
            raise UserError(f"{path}: a release folder should hold {' or '.join(_FOLDER_FILES)} or a single weights "
                            f"file ({', '.join(_SUFFIXES)}); found {[p.name for p in files] or 'none'}")
        return files[0]
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    return path


def _state_dict_of(container: Any, path: Path) -> tuple[Mapping[str, Any], str | None]:
    """The Segmenter state dict inside a container and the key it sits under (None for a plain state dict)."""
    if not isinstance(container, Mapping):
        raise UserError(f"{path}: expected a checkpoint dict, found a pickled {type(container).__name__}")
    for key in _MODEL_KEYS + ("net",):
        if container.get(key) is not None:
            if not isinstance(container[key], Mapping):
                raise UserError(f"{path}: {key!r} holds a {type(container[key]).__name__}, not a state dict")
            return container[key], key
    if container and all(isinstance(value, torch.Tensor) for value in container.values()):
        return container, None
    raise UserError(f"{path}: no WaffleIron state dict found; top-level keys {sorted(map(str, container))[:12]} "
                    "(expected ScaLR's {epoch, net, optim, scheduler, scaler}, a pretrained {model_points | model_point, "
                    "…} or a plain state dict)")
