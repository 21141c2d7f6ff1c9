"""Reading legacy pickled checkpoints (whole `ImageEncoder` / `ClassificationHead` objects saved with
`torch.save(model)`) without importing or running any code the pickle names.

The restricted unpickler returns real objects only for torch's tensor and storage rebuild functions and a
few containers; every class of a model namespace (the releases' `src.*` modules, old `open_clip.*` class
paths that no longer exist, `torch.nn.*` layers) becomes an inert `nn.Module` stub, so `.state_dict()` of
the stub tree gives the tensors. Anything else — `os.system`, `builtins.eval`, `subprocess.*` — is refused
with an error naming it: a checkpoint from the internet is untrusted input.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("__builtin__", "object"),
    ("__builtin__", "set"),
    ("argparse", "Namespace"),
}
_STUB_NAMESPACES = ("src.", "open_clip.", "torch.nn.modules.", "modeling", "__main__")


class LegacyModule(nn.Module):
    """Inert stand-in for any pickled model class: it only holds the unpickled attributes."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        self.__dict__.update(state)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a legacy checkpoint stub cannot run; build the model and load its state dict")


def _stub(module: str, name: str) -> type:
    return type(name, (LegacyModule,), {"__module__": f"legacy.{module}"})


class RestrictedUnpickler(pickle.Unpickler):
    """`find_class` that never imports code named by the pickle (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "uint8", "bool"):
            return getattr(torch, name)
        if module.startswith(_STUB_NAMESPACES) or module == "modeling":
            return _stub(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor, container or model class")


restricted_pickle = SimpleNamespace(Unpickler=RestrictedUnpickler, load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
                                    __name__="taskmerge.legacy_pickle.restricted_pickle")


def load_legacy(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a pickled model object (or of a pickled state dict) read with the restricted unpickler."""
    try:
        loaded = torch.load(Path(path), map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: unsafe or unreadable checkpoint ({error})") from error
    if isinstance(loaded, nn.Module):
        return {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    raise ValueError(f"{path}: expected a pickled model or a state dict, got {type(loaded).__name__}")
