"""Decoders of the dense tasks, written from specs/dense.md §4 (DINOv2's evaluation heads, Apache-2.0 design).

Every decoder takes the encoder's features of its layers as `[(patch map [B, D, h, w], cls [B, D]), ...]`
(spec §3; `FEATURE_SPECS` says which layers, norm and cls each one consumes):

- `LinearSegHead` (ADE20k linear): BN(D) → 1×1 conv to 150 classes; logits at the patch grid, upsampled
  bilinearly to the label size by `segmentation_loss` and the mIoU metric.
- `LinearDepthHead` (NYU linear, DINOv2's depth BNHead; it has no norm): per layer patch ⊕ cls, upsample ×4,
  1×1 conv to 256 bins, ReLU + 0.1, normalised, Σ p·linspace(min, max).
- `DPTHead`: DINOv2's DPT depth head with identical parameter names and shapes, so a released
  `*_nyu_dpt_head.pth` (keys under `decode_head.`) loads strictly through `load_dinov2_head`.

Module names (`bn`, `conv_seg`, `conv_depth`, …) follow the released heads so their weights load as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from taskmerge.settings.dense.datasets import ADE_NUM_CLASSES, IGNORE_INDEX, NYU_DEPTH_RANGE

Features = Sequence[tuple[torch.Tensor, torch.Tensor]]

# per decoder: which blocks (of a 12-block ViT-B), final norm or not, and whether it reads the cls token
FEATURE_SPECS = {
    "linear_seg": {"layers": (11,), "norm": True, "with_cls": False},
    "linear_depth": {"layers": (11,), "norm": False, "with_cls": True},
    "dpt": {"layers": (2, 5, 8, 11), "norm": False, "with_cls": True},
}


class LinearSegHead(nn.Module):
    """ADE20k linear head: BatchNorm over the last layer's patch map, then a 1×1 conv to class logits.

    As DINOv2's ADE20k linear config: no dropout, the conv initialised as mmseg's (normal, std 0.01, zero bias).
    """

    def __init__(self, embed_dim: int, num_classes: int = ADE_NUM_CLASSES) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Features) -> torch.Tensor:
        """Logits `[B, C, h, w]` at the patch grid of the last feature layer."""
        return self.conv_seg(self.bn(features[-1][0]))


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled bilinearly (align_corners False) to the `[B, H, W]` labels; 255 ignored."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)


def _bin_depth(logits: torch.Tensor, depth_range: tuple[float, float]) -> torch.Tensor:
    """Depth `[B, 1, H, W]` from bin logits: ReLU + 0.1, normalised over bins, expectation over uniform bin centres."""
    weights = torch.relu(logits) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    bins = torch.linspace(*depth_range, logits.shape[1], device=logits.device, dtype=logits.dtype)
    return torch.einsum("bkhw,k->bhw", weights, bins).unsqueeze(1)


class LinearDepthHead(nn.Module):
    """NYU linear depth head (DINOv2 BNHead, classify mode): each layer's patch map ⊕ its cls token, upsampled ×4
    and concatenated, a 1×1 conv to `n_bins` depth bins, their expectation."""

    def __init__(self, embed_dim: int, num_layers: int = 1, n_bins: int = 256,
                 depth_range: tuple[float, float] = NYU_DEPTH_RANGE, upsample: int = 4) -> None:
        super().__init__()
        self.depth_range, self.upsample = depth_range, upsample
        self.conv_depth = nn.Conv2d(2 * embed_dim * num_layers, n_bins, kernel_size=1)

    def forward(self, features: Features) -> torch.Tensor:
        """Depth in metres `[B, 1, 4h, 4w]`."""
        size = [s * self.upsample for s in features[0][0].shape[-2:]]
        maps = [torch.cat([patch, cls[:, :, None, None].expand_as(patch)], dim=1) for patch, cls in features]
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return _bin_depth(self.conv_depth(torch.cat(maps, dim=1)), self.depth_range)


class SigLoss(nn.Module):
    """Scale-invariant log loss (AdaBins; DINOv2 `SigLoss` with warm-up) on ground truth > 0.

    g = log(pred + 1e-3) − log(gt + 1e-3); loss = sqrt(var g + 0.15·mean(g)²), or sqrt(0.15·mean(g)²) for the
    first `warm_iter` calls (the warm-up trains the global scale first). Predictions are resized bilinearly
    to the ground truth `[B, H, W]`. The call counter makes the loss stateful: use one instance per training run.
    """

    def __init__(self, warm_iter: int = 100, variance_focus: float = 0.15, eps: float = 1e-3) -> None:
        super().__init__()
        self.warm_iter, self.variance_focus, self.eps = warm_iter, variance_focus, eps
        self.calls = 0

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        valid = target > 0
        g = torch.log(pred[valid] + self.eps) - torch.log(target[valid] + self.eps)
        warming = self.calls < self.warm_iter
        self.calls += 1
        mean_term = self.variance_focus * g.mean() ** 2
        return torch.sqrt(mean_term if warming else torch.var(g) + mean_term)


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """mmcv ConvModule's initialisation: Kaiming normal (fan_out, ReLU) weights, zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class ConvModule(nn.Module):
    """A conv with an optional ReLU before (`act="pre"`) or after (`act="post"`) it; no norm (DINOv2's DPT has none).

    The conv lives at `.conv`, as mmcv's ConvModule, so parameter names match released heads.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True,
                 act: str | None = None) -> None:
        super().__init__()
        self.act = act
        self.conv = _kaiming(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "pre":
            x = torch.relu(x)
        x = self.conv(x)
        return torch.relu(x) if self.act == "post" else x


class ReassembleBlocks(nn.Module):
    """DPT reassembly: cls readout projected into every patch, 1×1 conv per layer, resized ×4, ×2, ×1, ×½."""

    def __init__(self, embed_dim: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        self.projects = nn.ModuleList([ConvModule(embed_dim, c, 1) for c in out_channels])
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
            nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
        ])
        self.readout_projects = nn.ModuleList(
            [nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) for _ in out_channels]
        )

    def forward(self, features: Features) -> list[torch.Tensor]:
        out = []
        for i, (patch, cls) in enumerate(features):
            tokens = patch.flatten(2).transpose(1, 2)
            tokens = self.readout_projects[i](torch.cat([tokens, cls[:, None].expand_as(tokens)], dim=-1))
            x = tokens.transpose(1, 2).reshape(patch.shape)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class PreActResidualConvUnit(nn.Module):
    """Two pre-activation 3×3 convs (no bias, no norm) with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3, padding=1, bias=False, act="pre")
        self.conv2 = ConvModule(channels, channels, 3, padding=1, bias=False, act="pre")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class FeatureFusionBlock(nn.Module):
    """Adds the residual-refined skip (resized to match), refines, upsamples ×2 (align_corners True), 1×1 conv."""

    def __init__(self, channels: int, with_skip: bool) -> None:
        super().__init__()
        self.project = ConvModule(channels, channels, 1)
        self.res_conv_unit1 = PreActResidualConvUnit(channels) if with_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = F.interpolate(self.res_conv_unit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class HeadDepth(nn.Module):
    """DPT output head: 3×3 conv to C/2, upsample ×2 (align_corners True), 3×3 conv to 32, ReLU, 1×1 conv to 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class DPTHead(nn.Module):
    """DINOv2's DPT depth head (readout "project", 4 fusion blocks, no norm); depth = ReLU(HeadDepth) + min_depth.

    Post-process channels default to D/8, D/4, D/2, D ([96, 192, 384, 768] at ViT-B); the output is
    32·⌈h/2⌉ × 32·⌈w/2⌉ for an h × w patch grid (16× an even grid).
    """

    def __init__(self, embed_dim: int, channels: int = 256, post_process_channels: Sequence[int] | None = None,
                 depth_range: tuple[float, float] = NYU_DEPTH_RANGE) -> None:
        super().__init__()
        post = list(post_process_channels or [embed_dim // 2 ** (3 - i) for i in range(4)])
        self.min_depth = depth_range[0]
        self.reassemble_blocks = ReassembleBlocks(embed_dim, post)
        self.convs = nn.ModuleList([ConvModule(c, channels, 3, padding=1, bias=False) for c in post])
        self.fusion_blocks = nn.ModuleList([FeatureFusionBlock(channels, with_skip=i > 0) for i in range(len(post))])
        self.project = ConvModule(channels, channels, 3, padding=1, act="post")
        self.conv_depth = HeadDepth(channels)

    def forward(self, features: Features) -> torch.Tensor:
        """Depth in metres `[B, 1, ≈16h, ≈16w]` from the four layers' (patch map, cls) pairs."""
        if len(features) != len(self.convs):
            raise ValueError(f"DPTHead takes {len(self.convs)} feature layers, got {len(features)}")
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(features))]
        out = self.fusion_blocks[0](maps[-1])
        for block, skip in zip(self.fusion_blocks[1:], reversed(maps[:-1])):
            out = block(out, skip)
        return torch.relu(self.conv_depth(self.project(out))) + self.min_depth


def pack_features(features: Features) -> torch.Tensor:
    """One tensor `[B, L, D, h·w + 1]` holding every layer's patch map and (last) cls token, so cached features
    can be indexed by sample like any tensor (e.g. by `taskmerge.decoders.training.train_module`)."""
    return torch.stack([torch.cat([patch.flatten(2), cls[:, :, None]], dim=2) for patch, cls in features], dim=1)


def unpack_features(packed: torch.Tensor, grid: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (patch map `[B, D, h, w]`, cls `[B, D]`) pairs of `pack_features`' output for an `h × w` patch grid."""
    return [(packed[:, i, :, :-1].unflatten(2, grid), packed[:, i, :, -1]) for i in range(packed.shape[1])]


class PackedInput(nn.Module):
    """Runs a dense decoder on packed features (`pack_features`), for training loops that take one input tensor."""

    def __init__(self, decoder: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.decoder, self.grid = decoder, tuple(grid)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.decoder(unpack_features(packed, self.grid))


def load_dinov2_head(head: nn.Module, checkpoint: Mapping[str, torch.Tensor]) -> None:
    """Load a released DINOv2 head state dict (keys under `decode_head.`, optionally inside `state_dict`) strictly."""
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "decode_head."
    head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


def build_dense_decoder(name: str, embed_dim: int, num_classes: int = ADE_NUM_CLASSES) -> nn.Module:
    """Decoder factory by `FEATURE_SPECS` name: `linear_seg` (ADE20k, `num_classes`), `linear_depth` or `dpt` (NYU)."""
    if name == "linear_seg":
        return LinearSegHead(embed_dim, num_classes)
    if name == "linear_depth":
        return LinearDepthHead(embed_dim, num_layers=len(FEATURE_SPECS[name]["layers"]))
    if name == "dpt":
        return DPTHead(embed_dim)
    raise ValueError(f"unknown dense decoder {name!r}; expected one of {list(FEATURE_SPECS)}")


def dense_loss(name: str, warm_iter: int = 100) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of a decoder: cross-entropy (ignore 255) for `linear_seg`, a fresh `SigLoss` (mean term
    only for its first `warm_iter` steps) for depth."""
    if name == "linear_seg":
        return segmentation_loss
    if name in ("linear_depth", "dpt"):
        return SigLoss(warm_iter)
    raise ValueError(f"unknown dense decoder {name!r}; expected one of {list(FEATURE_SPECS)}")
