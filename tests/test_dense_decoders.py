"""Dense decoders: a few optimisation steps on tiny random features, SigLoss by hand, DPT key names and size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taskmerge.settings.dense.decoders import (
    FEATURE_SPECS,
    DPTHead,
    LinearDepthHead,
    LinearSegHead,
    SigLoss,
    build_dense_decoder,
    dense_loss,
    load_dinov2_head,
    segmentation_loss,
)

DIM, GRID = 16, (4, 5)


def _features(layers: int, seed: int = 0, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (patch map, cls) pairs of `layers` layers."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, DIM, *GRID, generator=generator), torch.randn(batch, DIM, generator=generator))
            for _ in range(layers)]


def _losses(head: torch.nn.Module, features, target, loss_fn, steps: int, lr: float) -> list[float]:
    """Losses of `steps` Adam steps of `head` on one fixed batch."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss = loss_fn(head(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def test_linear_seg_head_learns_and_ignores_255():
    torch.manual_seed(0)
    features = _features(1)
    patch = features[0][0]
    labels = F.interpolate(patch[:, :3], scale_factor=14, mode="nearest").argmax(1)  # learnable from the features
    labels[:, :5] = 255
    head = LinearSegHead(DIM, num_classes=3)
    assert head(features).shape == (4, 3, *GRID)
    history = _losses(head, features, labels, segmentation_loss, steps=15, lr=0.05)
    assert history[-1] < 0.7 * history[0]
    logits = F.interpolate(head(features), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    keep = labels != 255
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], labels[keep])
    assert segmentation_loss(head(features), labels).item() == pytest.approx(manual.item(), rel=1e-5)


def test_linear_depth_head_outputs_bin_expectation_and_learns():
    torch.manual_seed(0)
    features = _features(1)
    head = LinearDepthHead(DIM, depth_range=(1e-3, 10.0))
    assert head.conv_depth.weight.shape == (256, 2 * DIM, 1, 1)
    out = head(features)
    assert out.shape == (4, 1, 4 * GRID[0], 4 * GRID[1]) and (out > 1e-3).all() and (out < 10.0).all()
    depth = 1.0 + torch.sigmoid(F.interpolate(features[0][0][:, :1], scale_factor=16, mode="bilinear"))[:, 0] * 4
    depth[:, 0] = 0.0  # invalid ground truth rows
    history = _losses(head, features, depth, SigLoss(warm_iter=0), steps=20, lr=0.01)
    assert history[-1] < 0.7 * history[0]


def test_linear_depth_head_concatenates_layers():
    head = LinearDepthHead(DIM, num_layers=4)
    assert head.conv_depth.in_channels == 8 * DIM and head(_features(4)).shape == (4, 1, 16, 20)


def test_sigloss_warm_up_then_full_loss_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    target = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # the last pixel has no depth
    g = torch.log(torch.tensor([1.0, 2.0, 4.0]) + 1e-3) - torch.log(torch.tensor([1.0, 1.0, 1.0]) + 1e-3)
    loss = SigLoss(warm_iter=2)
    for _ in range(2):
        assert loss(pred, target).item() == pytest.approx(torch.sqrt(0.15 * g.mean() ** 2).item())
    assert loss(pred, target).item() == pytest.approx(torch.sqrt(g.var() + 0.15 * g.mean() ** 2).item())
    assert SigLoss(warm_iter=0)(target[:, None].clamp(min=0.5), target).item() == pytest.approx(0.0, abs=1e-6)


def test_dpt_forward_backward_at_tiny_width():
    torch.manual_seed(0)
    head = DPTHead(DIM, channels=8)
    features = [(p.requires_grad_(), c) for p, c in _features(4, batch=2)]
    out = head(features)
    assert out.shape == (2, 1, 32 * 2, 32 * 3) and (out >= 1e-3).all()
    target = torch.full((2, 64, 96), 3.0)
    history = _losses(head, features, target, SigLoss(warm_iter=0), steps=5, lr=1e-3)
    assert all(p.grad is not None for p in head.parameters()) and features[0][0].grad is not None
    assert history[-1] < history[0]
    with pytest.raises(ValueError, match="4 feature layers"):
        head(features[:3])


def _dinov2_dpt_keys() -> list[str]:
    """The parameter names of DINOv2's `DPTHead` (hub/depth/decode_heads.py) with readout "project", no norm."""
    keys = []
    for i in range(4):
        keys += [f"reassemble_blocks.projects.{i}.conv.{p}" for p in ("weight", "bias")]
    for i in (0, 1, 3):
        keys += [f"reassemble_blocks.resize_layers.{i}.{p}" for p in ("weight", "bias")]
    for i in range(4):
        keys += [f"reassemble_blocks.readout_projects.{i}.0.{p}" for p in ("weight", "bias")]
    keys += [f"convs.{i}.conv.weight" for i in range(4)]
    for i in range(4):
        keys += [f"fusion_blocks.{i}.project.conv.{p}" for p in ("weight", "bias")]
        units = ("res_conv_unit2",) if i == 0 else ("res_conv_unit1", "res_conv_unit2")
        keys += [f"fusion_blocks.{i}.{u}.conv{c}.conv.weight" for u in units for c in (1, 2)]
    keys += ["project.conv.weight", "project.conv.bias"]
    keys += [f"conv_depth.head.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    return keys


def test_dpt_at_vitb_width_has_dinov2_keys_and_size_on_meta():
    with torch.device("meta"):
        head = build_dense_decoder("dpt", 768)
    state = head.state_dict()
    assert sorted(state) == sorted(_dinov2_dpt_keys()) and len(state) == 56
    assert sum(p.numel() for p in head.parameters()) == 24_193_921
    shapes = {"reassemble_blocks.readout_projects.0.0.weight": (768, 1536),
              "reassemble_blocks.resize_layers.0.weight": (96, 96, 4, 4),
              "reassemble_blocks.resize_layers.3.weight": (768, 768, 3, 3),
              "convs.3.conv.weight": (256, 768, 3, 3), "conv_depth.head.0.weight": (128, 256, 3, 3)}
    assert all(tuple(state[k].shape) == s for k, s in shapes.items())


def test_load_dinov2_head_is_strict():
    source, target = DPTHead(DIM, channels=8), DPTHead(DIM, channels=8)
    released = {"state_dict": {f"decode_head.{k}": v for k, v in source.state_dict().items()}}
    released["state_dict"]["backbone.cls_token"] = torch.zeros(1)
    load_dinov2_head(target, released)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    released["state_dict"]["decode_head.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra"):
        load_dinov2_head(target, released)


def test_factory_and_losses_by_name():
    assert set(FEATURE_SPECS) == {"linear_seg", "linear_depth", "dpt"}
    assert isinstance(build_dense_decoder("linear_seg", DIM), LinearSegHead)
    assert isinstance(build_dense_decoder("linear_depth", DIM), LinearDepthHead)
    assert dense_loss("linear_seg") is segmentation_loss and isinstance(dense_loss("dpt"), SigLoss)
    with pytest.raises(ValueError, match="unknown dense decoder"):
        build_dense_decoder("mask2former", DIM)


def test_packed_features_round_trip_and_train_with_the_generic_loop():
    from taskmerge.decoders.training import train_module
    from taskmerge.settings.dense.decoders import PackedInput, pack_features, unpack_features

    features = _features(2, batch=8)
    packed = pack_features(features)
    assert packed.shape == (8, 2, DIM, GRID[0] * GRID[1] + 1)
    unpacked = unpack_features(packed, GRID)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(features, unpacked))
    labels = F.interpolate(features[-1][0][:, :3], scale_factor=14, mode="nearest").argmax(1)
    torch.manual_seed(0)
    history = train_module(PackedInput(LinearSegHead(DIM, num_classes=3), GRID), packed, labels, segmentation_loss,
                           epochs=6, lr=0.05, batch_size=4, seed=0)
    assert history[-1] < 0.8 * history[0]
