"""Reading legacy pickled checkpoints (whole `ImageEncoder` / `ClassificationHead` objects saved with
`torch.save(model)`) without importing or running any code the pickle names.

A pickle is a program: `find_class` resolves each name it mentions, and the pickle may then call the result.
The restricted unpickler returns a real object only for an allow-list of harmless builders (torch's tensor,
parameter and storage rebuilders, dtypes, `torch.Size`, `torch.device`, a few containers and builtins).
Every other name — a model class of `src.*`, `open_clip.*` (old class paths that no longer exist included),
`torch.nn.*` or `__main__`, a torchvision transform, an enum, a function such as
`open_clip.transform._convert_to_rgb` — becomes an inert `Placeholder` class made on the fly, without
importing anything: calling it only stores the arguments, building it only stores the attributes, so
`.state_dict()` of the placeholder tree gives the tensors. Nothing but the allow-list is ever a real
callable, so no pickled code can run. Names that only an attack needs — the rest of the standard library
(`posix.system`, `builtins.eval`, `subprocess.Popen`, `functools.partial`, …) and of `torch` outside
`torch.nn` (`torch.load`, `torch.hub.*`, `torch._C.*`) — are refused with an error naming them, so an attack
fails loudly instead of loading half inert. A checkpoint from the internet is untrusted input.

Training checkpoints (ScaLR's `ckpt_last.pth`) hold numpy scalars in their optimiser and scheduler states:
numpy's scalar rebuilder (`numpy.core.multiarray.scalar`, `numpy._core.multiarray.scalar` since numpy 2) and
`numpy.dtype` are allow-listed in checked forms that rebuild numbers only (a dtype from a type string, a
boolean, integer, float or complex scalar from its bytes). `NUMPY_SAFE_GLOBALS` offers the same builders to
`torch.serialization.safe_globals` for `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import pickle
import sys
import types
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from codecs import encode
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch
from torch import nn


class Placeholder(nn.Module):
    """Inert stand-in for a pickled class, function or enum: it keeps what the pickle gives it and runs nothing."""

    pickled_as: ClassVar[str]  # the `module.name` the pickle gave

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        """REDUCE (`cls(*args)`, as enums pickle) and NEWOBJ (`cls.__new__(cls, *args)`): an empty module keeping
        the arguments."""
        self = super().__new__(cls)
        nn.Module.__init__(self)
        self.__dict__.update(pickled_args=args, pickled_kwargs=kwargs)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: `__new__`, which NEWOBJ calls alone, built the object."""

    def __setstate__(self, state: Any) -> None:
        """BUILD: a dict or `(dict, slots)` state becomes attributes, any other state `pickled_state`. The module's
        own empty hooks are kept: pickled hooks would be placeholders standing in for `state_dict()` results."""
        if isinstance(state, tuple) and len(state) == 2 and all(part is None or isinstance(part, dict) for part in state):
            state = {**(state[0] or {}), **(state[1] or {})}
        hooks = {key: value for key, value in self.__dict__.items() if "hook" in key}
        self.__dict__.update(state if isinstance(state, dict) else {"pickled_state": state})
        self.__dict__.update(hooks)

    def extend(self, items: list[Any]) -> None:
        """APPENDS onto a pickled list subclass: the items are kept as `pickled_items`."""
        self.__dict__.setdefault("pickled_items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        """SETITEMS onto a pickled dict subclass: the entries are kept as `pickled_entries`."""
        self.__dict__.setdefault("pickled_entries", {})[key] = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse to run: a placeholder has no code, only the pickled attributes."""
        raise RuntimeError(f"{self.pickled_as} is a placeholder read from a legacy checkpoint and cannot run; "
                           "build the real model and load the checkpoint's state dict into it")


def _reconstruct(cls: Any, base: type, state: Any) -> Any:
    """`copyreg._reconstructor` (protocols 0 and 1 build objects with it), building placeholders through their
    own `__new__`: `state` is then the value of the builtin base (list, dict, …), if any."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls() if state is None else cls(state)
    return copyreg._reconstructor(cls, base, state)


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's own rebuilder, wherever this numpy version keeps it
_NUMERIC_KINDS = "biufc"


def _numpy_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """`numpy.dtype` as pickles call it (`dtype('f8', False, True)`), for a type string only."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refusing numpy.dtype({spec!r}): only a dtype named by a string is rebuilt")
    return np.dtype(spec, bool(align), bool(copy))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar rebuilder for a numeric dtype and the scalar's bytes only (an object dtype would hand back
    any pickled object as a 'scalar')."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {dtype!r} from {type(data).__name__}: only "
                                     "boolean, integer, float and complex scalars are rebuilt")
    return _NUMPY_SCALAR(dtype, data)


NUMPY_SAFE_GLOBALS: list[Any] = [
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_numpy_dtype, "numpy.dtype"),
    # `torch.load(weights_only=True)` sets a rebuilt dtype's state only for allow-listed types
    *sorted({type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"}, key=lambda t: t.__name__),
]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1 pickles
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2 pickles
    ("numpy", "dtype"): _numpy_dtype,
    **{("torch", name): value for name, value in vars(torch).items()
       if isinstance(value, torch.dtype) or (isinstance(value, type) and name.endswith("Storage"))},
    **{("torch._utils", f.__name__): f for f in (torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2,
                                                 torch._utils._rebuild_tensor_v3, torch._utils._rebuild_parameter,
                                                 torch._utils._rebuild_parameter_with_state)},
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _reconstruct,
    ("_codecs", "encode"): encode,  # bytes, as protocol 2 pickles them
    ("argparse", "Namespace"): argparse.Namespace,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    **{("builtins", t.__name__): t for t in (object, bool, int, float, complex, str, bytes, bytearray, tuple, list,
                                             dict, set, frozenset, slice)},
}


class RestrictedUnpickler(pickle.Unpickler):
    """`find_class` that returns allow-listed builders, refuses other standard-library and torch names, and turns
    every remaining name into a placeholder class (see the module docstring)."""

    def __init__(self, file: BinaryIO, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._placeholders: dict[str, type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 writes Python 2 names (`__builtin__.eval`, `commands.Popen`): judge the Python 3 ones
        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        root = module.split(".")[0]
        if root in sys.stdlib_module_names or (root == "torch" and module.split(".")[:2] != ["torch", "nn"]):
            kind = "torch name outside torch.nn" if root == "torch" else "standard-library name"
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a {kind} that is not on the allow-list "
                                         "of tensor and container builders")
        path = f"{module}.{name}"
        if path not in self._placeholders:
            self._placeholders[path] = type(name, (Placeholder,), {"__module__": f"legacy.{module}", "__qualname__": name,
                                                                   "pickled_as": path})
        return self._placeholders[path]


restricted_pickle = types.SimpleNamespace(__name__=f"{__name__}.restricted_pickle", Unpickler=RestrictedUnpickler,
                                          load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load())


def load_legacy_object(path: str | Path) -> Any:
    """The object `torch.save` wrote to `path`, rebuilt with placeholders; a refused name (or another unpickling
    error) is a `ValueError` naming the file and the culprit."""
    try:
        return torch.load(Path(path), map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: unsafe or unreadable checkpoint ({error})") from error


def load_legacy(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a pickled model object (the state dict of its placeholder tree) or of a pickled state dict."""
    loaded = load_legacy_object(path)
    if isinstance(loaded, nn.Module):
        return {key: value.clone() for key, value in loaded.state_dict().items()}
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    raise ValueError(f"{path}: expected a pickled model or a state dict, got {type(loaded).__name__}")
