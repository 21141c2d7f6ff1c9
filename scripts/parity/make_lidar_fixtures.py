"""Golden fixtures for the WaffleIron encoder, computed by the reference code (run once, outside the package).

Imports the authors' own modules from checkouts given on the command line (nothing is copied):
- valeoai/WaffleIron @bcd387c (v0.3.1): `waffleiron.Segmenter` (ReLU mixes, LayerNorm, scatter-sum / (count +
  1e-6) projection), what the ScaLR v0.1.0 releases were trained with;
- valeoai/ScaLR @53c474d: `datasets/pc_dataset.py` (`PCDataset.__getitem__` in the `val` phase: input features,
  deterministic 0.1 m voxels, FOV crop, cell indices, cKDTree neighbours, upsampling indices) and its `Collate`
  (zero padding, `occupied_cells`);
- valeoai/ScaLR branch `scalr_plus` @7cf02a2: its own `waffleiron` copy (`gelu=True`, scatter "mean").

Writes under the output folder (default tests/fixtures/lidar/), per reference model `<name>`:
  <name>_weights.safetensors  the reference `Segmenter` state dict, its own key names (`classif.*` included);
  <name>_io.safetensors       raw scans (x, y, z, intensity), the reference's per-scan preprocessing, the collated
                              batch, and per-point outputs: backbone tokens `[B, C, N]` and `classif` logits;
                              the configuration in the metadata.
Small random weights (PyTorch's default init, then BatchNorm statistics and norm affines perturbed so nothing
is an identity), tiny grids; a few KB each.

    python scripts/parity/make_lidar_fixtures.py --waffleiron-root /tmp/wi --scalr-root /tmp/sc --scalr-plus-root /tmp/scp
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

ARCH = {
    "input_channels": 5,
    "channels": 16,
    "depth": 4,
    "grids": [[16, 16], [16, 4], [16, 4]],
    "projections": [2, 1, 0],
    "fov": [[-8.0, -8.0, -2.0], [8.0, 8.0, 2.0]],
    "neighbors": 6,
    "voxel_size": 0.1,
    "nb_class": 3,
}
INTENSITY = (18.742355, 22.04632)  # nuScenes mean / std (ScaLR datasets/nuscenes_for_scalr.py)
SCAN_SIZES = (260, 190)


def _import_waffleiron(root: Path) -> types.ModuleType:
    """The `waffleiron` package of one checkout (another checkout's copy is forgotten first)."""
    for name in [name for name in sys.modules if name == "waffleiron" or name.startswith("waffleiron.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("waffleiron")
    finally:
        sys.path.remove(str(root))


def _import_pc_dataset(scalr_root: Path) -> types.ModuleType:
    """ScaLR's `datasets/pc_dataset.py` alone (the package `__init__` pulls the nuScenes devkit)."""
    sys.path.insert(0, str(scalr_root))  # for its `import utils.transforms`
    spec = importlib.util.spec_from_file_location("scalr_pc_dataset", scalr_root / "datasets" / "pc_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_scan(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` points (x, y, z, intensity): most inside the FOV, a few outside (cropped), some sharing a voxel."""
    low, high = np.array(ARCH["fov"][0]), np.array(ARCH["fov"][1])
    xyz = rng.uniform(low * 1.1, high * 1.1, size=(size, 3))
    twins = rng.choice(size, 2 * (size // 20), replace=False)
    xyz[twins[: len(twins) // 2]] = xyz[twins[len(twins) // 2 :]] + 0.01  # same 0.1 m voxel as another point
    intensity = rng.uniform(0.0, 60.0, size=(size, 1))
    return np.concatenate([xyz, intensity], 1).astype(np.float32)


def _preprocess(pc_dataset: types.ModuleType, scans: list[np.ndarray]) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    """The reference's `val`-phase `__getitem__` on each scan, and its `Collate` on all of them."""

    class Scans(pc_dataset.PCDataset):
        def __init__(self) -> None:
            super().__init__(rootdir=None, phase="val", input_feat=["intensity", "xyz", "radius"],
                             voxel_size=ARCH["voxel_size"], dim_proj=ARCH["projections"], grids_shape=ARCH["grids"],
                             fov_xyz=ARCH["fov"], num_neighbors=ARCH["neighbors"])
            self.mean_int, self.std_int = INTENSITY

        def __len__(self) -> int:
            return len(scans)

        def load_pc(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
            return scans[index], np.zeros(len(scans[index]), dtype=np.int64), f"scan{index}"

    dataset = Scans()
    items = [dataset[index] for index in range(len(scans))]
    return items, pc_dataset.Collate()(items)


def _perturb(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and norm affines (default init makes them identities)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))


def _run(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone tokens `[B, C, N]` and classif logits of the reference model, in eval mode."""
    model.eval()
    with torch.no_grad():
        inputs = (batch["feat"], batch["cell_ind"], batch["occupied_cells"], batch["neighbors_emb"])
        tokens = model.waffleiron(model.embed(inputs[0], inputs[3]), inputs[1], inputs[2])
        logits = model(*inputs)
    return tokens, logits


def _write(out: Path, name: str, model: nn.Module, items: list[tuple], batch: dict[str, torch.Tensor],
           scans: list[np.ndarray], meta: dict[str, Any]) -> None:
    tokens, logits = _run(model, batch)
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()},
              str(out / f"{name}_weights.safetensors"), metadata={"source": meta["source"]})
    io: dict[str, torch.Tensor] = {}
    for index, (scan, item) in enumerate(zip(scans, items)):
        feat, _, cell_ind, neighbors, upsample, _ = item
        io[f"scan{index}.raw"] = torch.from_numpy(scan)
        io[f"scan{index}.feat"] = torch.from_numpy(feat[0]).float()
        io[f"scan{index}.cell_ind"] = torch.from_numpy(cell_ind[0]).to(torch.int32)
        io[f"scan{index}.neighbors"] = torch.from_numpy(neighbors[0]).to(torch.int32)
        io[f"scan{index}.upsample"] = torch.from_numpy(upsample).to(torch.int32)
    io["batch.feat"] = batch["feat"]
    io["batch.cell_ind"] = batch["cell_ind"].to(torch.int32)
    io["batch.neighbors"] = batch["neighbors_emb"].to(torch.int32)
    io["batch.occupied"] = batch["occupied_cells"].bool()
    io["out.tokens"] = tokens
    io["out.logits"] = logits
    save_file({key: value.contiguous() for key, value in io.items()}, str(out / f"{name}_io.safetensors"),
              metadata={"config": json.dumps(meta)})
    sizes = {path.name: path.stat().st_size for path in sorted(out.glob(f"{name}_*"))}
    print(f"{name}: tokens {tuple(tokens.shape)} |max| {tokens.abs().max():.3f}; files {sizes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waffleiron-root", type=Path, required=True, help="valeoai/WaffleIron checkout (v0.3.1)")
    parser.add_argument("--scalr-root", type=Path, required=True, help="valeoai/ScaLR checkout (main)")
    parser.add_argument("--scalr-plus-root", type=Path, help="valeoai/ScaLR checkout of branch scalr_plus (optional)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "lidar")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(12)
    scans = [_random_scan(rng, size) for size in SCAN_SIZES]
    items, batch = _preprocess(_import_pc_dataset(args.scalr_root), scans)
    common = {**ARCH, "intensity_mean_std": list(INTENSITY)}

    wi = _import_waffleiron(args.waffleiron_root)
    torch.manual_seed(0)
    model = wi.Segmenter(input_channels=ARCH["input_channels"], feat_channels=ARCH["channels"], nb_class=ARCH["nb_class"],
                         depth=ARCH["depth"], grid_shape=ARCH["grids"], drop_path_prob=0.0, layer_norm=True)
    _perturb(model, 1)
    _write(args.out, "wi_tiny", model, items, batch, scans,
           {**common, "activation": "relu", "source": "valeoai/WaffleIron@bcd387c waffleiron.Segmenter"})

    if args.scalr_plus_root is not None:
        # ScaLR+ averages cells with scatter "mean" over every point, padded ones included: one unpadded scan
        plus = _import_waffleiron(args.scalr_plus_root)
        torch.manual_seed(1)
        model = plus.Segmenter(input_channels=ARCH["input_channels"], feat_channels=ARCH["channels"],
                               nb_class=ARCH["nb_class"], depth=ARCH["depth"], grid_shape=ARCH["grids"],
                               drop_path_prob=0.0, gelu=True)
        _perturb(model, 2)
        single = {key: value[:1, ..., : items[0][0].shape[-1]] if torch.is_tensor(value) and value.dim() > 1 else value
                  for key, value in batch.items()}
        single["occupied_cells"] = batch["occupied_cells"][:1, : items[0][0].shape[-1]]
        _write(args.out, "scalr_plus_tiny", model, items[:1], single, scans[:1],
               {**common, "activation": "gelu", "source": "valeoai/ScaLR@7cf02a2 (scalr_plus) waffleiron.Segmenter"})


if __name__ == "__main__":
    main()
