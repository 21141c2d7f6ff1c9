"""WaffleIron point encoders (valeoai/WaffleIron v0.3.1, as ScaLR pretrains them), written from spec lidar §1.

One class serves the tiny test model and WI-48-768: an embedding of each point and its K nearest
neighbours, then `depth` layers of (SpatialMix on one of the 2D projections, ChannelMix), no final norm.
Parameter and buffer names are those of the reference `Segmenter` minus its `classif` head
(`embed.*`, `waffleiron.*`), so a release's encoder loads strictly.

Points are kept channels-last (`[B, N, C]`) inside the backbone: the channel mixes are then plain matrix
products and LayerNorm needs no transposes. The weights keep the reference's Conv shapes.
A SpatialMix averages the normalised tokens of the valid points falling in each 2D cell (sum / (count +
1e-6), empty cells 0, padded points excluded), runs two depthwise 3x3 convolutions on the grid and hands
every point its cell's value back as a residual.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["relu", "gelu"]
FeatureKind = Literal["pooled", "tokens"]

ENCODER_PREFIXES = ("embed.", "waffleiron.")
_COUNT_EPS = 1e-6  # the reference's scatter-mean denominator: count + 1e-6
_LN_EPS = 1e-5


@dataclass(frozen=True)
class WaffleIronConfig:
    """Architecture and the preprocessing it was trained with (the preprocessing does not change any weight's
    shape: grids and FOV only set how points map to cells)."""

    input_channels: int = 5  # [normalised intensity, x, y, z, radius]
    channels: int = 768
    depth: int = 48
    grids: tuple[tuple[int, int], ...] = ((256, 256), (256, 32), (256, 32))
    projections: tuple[int, ...] = (2, 1, 0)  # the axis each grid drops: 0 -> (y, z), 1 -> (x, z), 2 -> (x, y)
    fov: tuple[tuple[float, float, float], tuple[float, float, float]] = ((-64.0, -64.0, -8.0), (64.0, 64.0, 8.0))
    neighbors: int = 16  # K, not counting the point itself
    voxel_size: float = 0.1
    activation: Activation = "relu"  # in both mixes (GELU for the ScaLR+ checkpoints); the embedding always ReLU
    drop_path: float = 0.0  # the same rate in every layer, as the reference; training only

    def __post_init__(self) -> None:
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        if len(self.grids) != len(self.projections) or not self.grids:
            raise ValueError(f"one grid per projection is needed, got grids {self.grids} for projections {self.projections}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if min(self.input_channels, self.channels, self.depth, self.neighbors) < 1:
            raise ValueError("input_channels, channels, depth and neighbors must be positive")


CONFIGS: dict[str, WaffleIronConfig] = {
    # SC configs/pretrain/WI_768_pretrain.yaml (ScaLR v0.1.0 releases)
    "waffleiron_768": WaffleIronConfig(),
    # the CPU-sized configuration of spec lidar §6, built by the same code
    "waffleiron_tiny": WaffleIronConfig(channels=32, depth=4, grids=((64, 64), (64, 8), (64, 8)),
                                        fov=((-32.0, -32.0, -4.0), (32.0, 32.0, 4.0)), neighbors=8),
}


@dataclass
class ScanBatch:
    """Preprocessed scans, zero-padded to one point count N (the reference's collated batch).

    features  `[B, C_in, N]` float: per-point inputs (padded points 0)
    cell_ind  `[B, P, N]` long: each point's flat cell index `row * W + col` on each of the P projections
    neighbors `[B, K+1, N]` long: kNN indices, row 0 the point itself (skipped by the embedding)
    valid     `[B, N]` bool: real points (the reference's `occupied_cells`)
    probe     `[B, S]` long or None: the points whose tokens `features(batch, "tokens")` returns (TAP's fixed,
              seeded point subset per scan, so teacher features stay small); None: every point
    """

    features: torch.Tensor
    cell_ind: torch.Tensor
    neighbors: torch.Tensor
    valid: torch.Tensor
    probe: torch.Tensor | None = None
    grids: tuple[tuple[int, int], ...] | None = None  # the grids `cell_ind` was computed for; None: the encoder's

    def __post_init__(self) -> None:
        batch, _, points = self.features.shape
        for name, tensor, rank in (("cell_ind", self.cell_ind, 3), ("neighbors", self.neighbors, 3), ("valid", self.valid, 2)):
            if tensor.dim() != rank or tensor.shape[0] != batch or tensor.shape[-1] != points:
                raise ValueError(f"ScanBatch.{name} has shape {tuple(tensor.shape)}; expected [{batch}, ..., {points}] "
                                 f"to match features {tuple(self.features.shape)}")
        if self.probe is not None and (self.probe.dim() != 2 or self.probe.shape[0] != batch):
            raise ValueError(f"ScanBatch.probe has shape {tuple(self.probe.shape)}; expected [{batch}, S]")

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> ScanBatch:
        """The scans at `index` (a slice or index tensor), as a batch (AdaMerging draws its minibatches this way)."""
        return ScanBatch(self.features[index], self.cell_ind[index], self.neighbors[index], self.valid[index],
                         None if self.probe is None else self.probe[index], self.grids)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: torch.device | str) -> ScanBatch:
        """The same scans on `device` (indices stay long, the mask bool)."""
        return ScanBatch(self.features.to(device), self.cell_ind.to(device, torch.long),
                         self.neighbors.to(device, torch.long), self.valid.to(device, torch.bool),
                         None if self.probe is None else self.probe.to(device, torch.long), self.grids)

    @classmethod
    def collate(cls, scans: Sequence[ScanBatch], num_points: int | None = None) -> ScanBatch:
        """Single scans (B = 1 each) zero-padded to the largest N (or `num_points`) as the reference pads them:
        padded points are invalid, sit in cell 0 and take the last padded point as every neighbour. Probe subsets,
        if the scans have them, must have one size."""
        sizes = [scan.features.shape[-1] for scan in scans]
        total = max(sizes) if num_points is None else num_points
        if total < max(sizes):
            raise ValueError(f"num_points={num_points} is below the largest scan ({max(sizes)} points)")
        out = []
        for scan, size in zip(scans, sizes):
            pad = total - size
            out.append((F.pad(scan.features, (0, pad)),
                        F.pad(scan.cell_ind, (0, pad)),
                        F.pad(scan.neighbors, (0, pad), value=total - 1),
                        F.pad(scan.valid.bool(), (0, pad), value=False)))
        probes = [scan.probe for scan in scans]
        if any(probe is None for probe in probes) and any(probe is not None for probe in probes):
            raise ValueError("some scans have a probe subset and others not")
        probe = None if probes[0] is None else torch.cat(probes)  # indices stay valid: padding goes at the end
        if len({scan.grids for scan in scans}) > 1:
            raise ValueError(f"scans prepared for different grids cannot share a batch: {sorted({str(s.grids) for s in scans})}")
        return cls(*(torch.cat(parts) for parts in zip(*out)), probe=probe, grids=scans[0].grids)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zero a whole sample's residual with probability `rate`, rescale the rest."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


def _activation(name: Activation) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU()


class Embedding(nn.Module):
    """Point branch (1x1 on the normalised inputs) and neighbourhood branch (max over K of an MLP of the
    neighbours' inputs relative to the centre's), fused by a 1x1 on their concatenation; `[B, C, N]` out."""

    def __init__(self, channels_in: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels_in)
        self.conv1 = nn.Conv1d(channels_in, channels, 1)
        self.conv2 = nn.Sequential(
            nn.BatchNorm2d(channels_in),
            nn.Conv2d(channels_in, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.final = nn.Conv1d(2 * channels, channels, 1)

    def forward(self, features: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        x = self.norm(features)  # [B, Cin, N]
        batch, channels_in, points = x.shape
        others = neighbors[:, 1:]  # [B, K, N]; row 0 is the centre itself
        index = others.reshape(batch, 1, -1).expand(-1, channels_in, -1)
        around = torch.gather(x, 2, index).view(batch, channels_in, others.shape[1], points)  # [B, Cin, K, N]
        local = self.conv2(around - x.unsqueeze(2)).amax(dim=2)  # [B, C, N]
        return self.final(torch.cat((self.conv1(x), local), dim=1))


class ChannelMix(nn.Module):
    """tokens + LayerScale(1x1 -> act -> 1x1 of LN(tokens)), on channels-last tokens `[B, N, C]`."""

    def __init__(self, channels: int, activation: Activation, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=_LN_EPS)
        self.mlp = nn.Sequential(nn.Conv1d(channels, channels, 1), _activation(activation), nn.Conv1d(channels, channels, 1))
        self.scale = nn.Conv1d(channels, channels, 1, bias=False, groups=channels)  # LayerScale, weight [C, 1, 1]
        self.drop_path = drop_path

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        first, act, second = self.mlp
        hidden = act(F.linear(self.norm(tokens), first.weight[:, :, 0], first.bias))
        residual = F.linear(hidden, second.weight[:, :, 0], second.bias) * self.scale.weight[:, 0, 0]
        return tokens + _drop_path(residual, self.drop_path, self.training)


@dataclass(frozen=True)
class Projection:
    """Where each point lands on one grid and its weight in its cell's mean (valid / (count + 1e-6))."""

    cells: torch.Tensor  # [B, N] long
    weight: torch.Tensor  # [B, N] float
    grid: tuple[int, int]  # (H, W)


class SpatialMix(nn.Module):
    """tokens + LayerScale(dw3x3 -> act -> dw3x3 on the H x W grid of cell means of LN(tokens)), gathered back.
    `grid` is the configured one; a batch prepared for another extent (PandaSet's 512-grids) brings its own: the
    weights do not depend on it."""

    def __init__(self, channels: int, grid: tuple[int, int], activation: Activation, drop_path: float) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.norm = nn.LayerNorm(channels, eps=_LN_EPS)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            _activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
        )
        self.scale = nn.Conv1d(channels, channels, 1, bias=False, groups=channels)
        self.drop_path = drop_path

    def extra_repr(self) -> str:
        return f"grid={self.grid}"

    def forward(self, tokens: torch.Tensor, projection: Projection) -> torch.Tensor:
        batch, _, channels = tokens.shape
        height, width = projection.grid
        index = projection.cells.unsqueeze(-1).expand(-1, -1, channels)  # [B, N, C]
        weighted = self.norm(tokens) * projection.weight.unsqueeze(-1).to(tokens.dtype)
        cells = tokens.new_zeros(batch, height * width, channels).scatter_add_(1, index, weighted)
        image = cells.view(batch, height, width, channels).permute(0, 3, 1, 2)  # [B, C, H, W]
        image = self.ffn(image) * self.scale.weight[:, 0, 0].view(1, channels, 1, 1)
        cells = image.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        return tokens + _drop_path(torch.gather(cells, 1, index), self.drop_path, self.training)


class Backbone(nn.Module):
    """`depth` layers of SpatialMix (grid d mod P) then ChannelMix; no final norm."""

    def __init__(self, channels: int, depth: int, grids: Sequence[tuple[int, int]], activation: Activation, drop_path: float) -> None:
        super().__init__()
        self.grids = [tuple(grid) for grid in grids]
        self.channel_mix = nn.ModuleList([ChannelMix(channels, activation, drop_path) for _ in range(depth)])
        self.spatial_mix = nn.ModuleList(
            [SpatialMix(channels, self.grids[d % len(self.grids)], activation, drop_path) for d in range(depth)])

    def projections(self, cell_ind: torch.Tensor, valid: torch.Tensor,
                    grids: Sequence[tuple[int, int]] | None = None) -> list[Projection]:
        """Per grid (the batch's `grids`, else the configured ones): cell indices checked against the grid and each
        point's averaging weight."""
        grids = self.grids if grids is None else [tuple(grid) for grid in grids]
        if cell_ind.shape[1] != len(grids) or len(grids) != len(self.grids):
            raise ValueError(f"the batch has cell indices for {cell_ind.shape[1]} projections on grids {grids}; the "
                             f"encoder has {len(self.grids)} projections")
        out = []
        mask = valid.to(torch.float32)
        for p, (height, width) in enumerate(grids):
            cells = cell_ind[:, p]
            if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= height * width):
                raise ValueError(f"cell indices of projection {p} span [{int(cells.min())}, {int(cells.max())}], "
                                 f"outside the {height}x{width} grid: preprocessing and encoder disagree on the grids")
            count = torch.zeros(mask.shape[0], height * width, dtype=mask.dtype, device=mask.device)
            count.scatter_add_(1, cells, mask)
            out.append(Projection(cells, mask / (torch.gather(count, 1, cells) + _COUNT_EPS), (int(height), int(width))))
        return out

    def forward(self, tokens: torch.Tensor, cell_ind: torch.Tensor, valid: torch.Tensor,
                grids: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        projections = self.projections(cell_ind, valid, grids)
        for d, (spatial, channel) in enumerate(zip(self.spatial_mix, self.channel_mix)):
            tokens = channel(spatial(tokens, projections[d % len(projections)]))
        return tokens


class WaffleIronEncoder(nn.Module):
    """The reference `Segmenter` without `classif`, with the framework's feature contract on `ScanBatch`es."""

    def __init__(self, config: WaffleIronConfig = WaffleIronConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.channels
        self.embed = Embedding(config.input_channels, config.channels)
        self.waffleiron = Backbone(config.channels, config.depth, config.grids, config.activation, config.drop_path)

    def forward(self, batch: ScanBatch) -> torch.Tensor:
        """Per-point tokens `[B, N, C]` (padded points 0)."""
        if batch.features.shape[1] != self.config.input_channels:
            raise ValueError(f"the batch has {batch.features.shape[1]} input channels per point; the encoder takes "
                             f"{self.config.input_channels}")
        if batch.neighbors.shape[1] < 2:
            raise ValueError("the batch's neighbour indices hold only the point itself; at least one neighbour is needed")
        tokens = self.embed(batch.features, batch.neighbors).transpose(1, 2)
        tokens = self.waffleiron(tokens, batch.cell_ind, batch.valid, batch.grids)
        return tokens * batch.valid.unsqueeze(-1).to(tokens.dtype)

    def features(self, batch: ScanBatch, kind: FeatureKind = "tokens") -> torch.Tensor:
        """Backbone output per point: `[B, S, D]` at the batch's probe points (`tokens` with `batch.probe`), `[B, N,
        D]` at every point (`tokens` without; padded points 0, `batch.valid` tells them apart), or its mean over
        each scan's valid points `[B, D]` (`pooled`)."""
        if kind not in ("pooled", "tokens"):
            raise ValueError(f"feature kind must be 'pooled' or 'tokens', got {kind!r}")
        tokens = self(batch)
        if kind == "tokens":
            if batch.probe is None:
                return tokens
            return torch.gather(tokens, 1, batch.probe.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        count = batch.valid.sum(1, keepdim=True).clamp(min=1).to(tokens.dtype)
        return tokens.sum(1) / count

    def encoder_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors this module loads strictly from a zoo state dict (Segmenter names): `embed.*` and
        `waffleiron.*`; a `classif.*` head, if present, is left out. BatchNorm running variances are clamped at 0
        (BN adds its eps): a merge that extrapolates (α > 1, TIES' rescaling) can drive them negative."""
        return {key: value.clamp_min(0.0) if key.endswith("running_var") else value
                for key, value in state_dict.items() if key.startswith(ENCODER_PREFIXES)}

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """These weights in the zoo's key space (the inverse of `encoder_weights`): the state dict itself."""
        return {key: value.detach().clone() for key, value in self.state_dict().items()}


BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_statistic(key: str) -> bool:
    """A BatchNorm running statistic (the embedding's three BatchNorms hold the only ones)."""
    return key.rsplit(".", 1)[-1] in BN_STATISTICS


@torch.no_grad()
def recalibrate_batchnorm(encoder: WaffleIronEncoder, scans: Iterable[ScanBatch]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over `scans` (one scan per pass, so
    no padded point counts), the rest of the encoder in eval mode."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    encoder.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    device = next(encoder.parameters()).device
    for scan in scans:
        encoder(scan.to(device))
    for norm in norms:
        norm.momentum = 0.1
        norm.eval()


def encoder_config(name: str, **overrides: Any) -> WaffleIronConfig:
    """The named configuration with some fields replaced (e.g. `activation="gelu"`, `drop_path=0.2`)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown WaffleIron configuration {name!r}; available: {sorted(CONFIGS)}")
    known = {field.name for field in fields(WaffleIronConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown WaffleIron options {unknown}; available: {sorted(known)}")
    values = {key: _tupled(value) for key, value in overrides.items()}
    return replace(CONFIGS[name], **values)


def _tupled(value: Any) -> Any:
    """Lists (as YAML gives them) as nested tuples, so configs stay hashable and compare equal."""
    return tuple(_tupled(item) for item in value) if isinstance(value, (list, tuple)) else value


def create_lidar_encoder(name: str = "waffleiron_768", **overrides: Any) -> WaffleIronEncoder:
    """A named WaffleIron encoder with random weights (the reference's default PyTorch initialisation)."""
    return WaffleIronEncoder(encoder_config(name, **overrides))


def parameter_count(config: WaffleIronConfig) -> dict[str, int]:
    """Parameters of the embedding and of one layer, computed from the dimensions (spec lidar §1)."""
    c_in, c = config.input_channels, config.channels
    embed = 2 * c_in + c_in * c + c + 2 * c_in + c_in * c + 2 * c + c * c + 2 * c * c + c
    channel = 2 * c + 2 * (c * c + c) + c
    spatial = 2 * c + 2 * (9 * c + c) + c
    return {"embed": embed, "layer": channel + spatial, "total": embed + config.depth * (channel + spatial)}


__all__ = ["CONFIGS", "ScanBatch", "WaffleIronConfig", "WaffleIronEncoder", "create_lidar_encoder", "encoder_config",
           "parameter_count"]
