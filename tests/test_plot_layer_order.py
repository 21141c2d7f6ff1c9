"""Task-vector layers come from the key structure alone: the embedding parameters as one group, blocks by number
(`blocks.9` before `blocks.10`), then the final norm and head; the norms plot joins only the blocks."""

import pytest

from taskmerge import plots
from taskmerge.settings import encoder_from_spec
from taskmerge.task_vectors import block_of, depth_order, layer_of

BUILTIN = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 12, "num_heads": 2, "mlp_ratio": 2.0}
CLIP_KEYS = ["visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
             "visual.ln_post.weight", "visual.proj", *[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight" for i in (0, 2, 10)],
             "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection", "logit_scale"]
# DINOv2 / DUNE canonical names (spec dense §1), as the dense zoo hands them to the analysis.
DINOV2_KEYS = ["cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
               *[f"blocks.{i}.{p}" for i in range(12) for p in ("norm1.weight", "attn.qkv.weight", "ls1.gamma", "mlp.fc2.bias")],
               "norm.weight", "norm.bias"]


def _layers(keys):
    """The layer names as `task_vector_stats` gives them (depth order)."""
    return sorted({layer_of(k) for k in keys}, key=depth_order)


def test_dinov2_keys_group_as_the_paper_does():
    assert {layer_of(k) for k in DINOV2_KEYS[:6]} == {"embeddings"}, "patch_embed, cls/pos/register/mask tokens: one group"
    assert _layers(DINOV2_KEYS) == ["embeddings", *[f"blocks.{i}" for i in range(12)], "norm"]


def test_builtin_layers_in_depth_order():
    assert _layers(encoder_from_spec(BUILTIN).state_dict()) == ["embeddings", *[f"blocks.{i}" for i in range(12)], "norm"]


def test_clip_blocks_in_numeric_order_between_embeddings_and_the_rest():
    assert _layers(CLIP_KEYS) == ["embeddings", "visual.embeddings", *[f"visual.transformer.resblocks.{i}" for i in (0, 2, 10)],
                                  "ln_final", "logit_scale", "text_projection", "visual.ln_post", "visual.proj"]
    assert block_of("visual.transformer.resblocks.10") == ("visual.transformer.resblocks", 10)
    assert block_of("visual.embeddings") is None and block_of("norm") is None


def test_only_blocks_are_joined_by_lines(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    layers = ["blocks.0", "blocks.1", "blocks.10", "blocks.2", "embeddings", "norm"]
    plots.plot_layer_norms(layers, {"a": {layer: 1.0 + i for i, layer in enumerate(layers)}}, tmp_path / "n.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embeddings", "0", "1", "2", "10", "norm"]
    assert "blocks.N" in ax.get_xlabel()
    joined = [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() != "None" and len(line.get_xdata())]
    markers = [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "None" and len(line.get_xdata())]
    assert joined == [[1, 2, 3, 4]] and markers == [[0, 5]]
    assert list(ax.lines[0].get_ydata()) == [1.0, 2.0, 4.0, 3.0], "each block keeps its own value"


PAPER_RANGES = {"ade20k": (3.4, 6.8), "nyud": (1.6, 3.4), "bedlam": (47.0, 70.0), "mapfree": (22.0, 26.0)}  # App. F


def _paper_norms(ranges):
    layers = ["embeddings", *[f"blocks.{i}" for i in range(12)], "norm"]
    norms = {t: {"embeddings": lo / 2, **{f"blocks.{i}": lo + (hi - lo) * i / 11 for i in range(12)}, "norm": 0.0}
             for t, (lo, hi) in ranges.items()}
    return layers, norms


def test_twelve_blocks_four_tasks_one_line_each_on_a_log_axis(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    layers, norms = _paper_norms(PAPER_RANGES)
    plots.plot_layer_norms(layers, norms, tmp_path / "n.png")
    (ax,) = figures[0].axes
    assert ax.get_yscale() == "log", "BEDLAM ≈ 50 against NYUd ≈ 2 per block"
    lines = [line for line in ax.lines if line.get_linestyle() != "None" and len(line.get_xdata())]
    assert [line.get_label() for line in lines] == list(PAPER_RANGES) and all(len(line.get_xdata()) == 12 for line in lines)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [*PAPER_RANGES, "outside the blocks"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embeddings", *map(str, range(12))], "a layer no task changes is not drawn"
    assert "unchanged by every task (not drawn): norm" in ax.get_xlabel()


def test_linear_axis_when_the_block_norms_are_alike(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    layers, norms = _paper_norms({"ade20k": (3.4, 6.8), "nyud": (1.6, 3.4)})
    for task in norms:
        norms[task]["norm"] = 0.01  # a tiny final-norm change does not turn the block lines logarithmic
    plots.plot_layer_norms(layers, norms, tmp_path / "n.png")
    assert figures[0].axes[0].get_yscale() == "linear"


@pytest.mark.parametrize("values, log", [([1.0, 9.0], False), ([1.0, 11.0], True), ([0.0, 0.0], False), ([0.0, 2.0, 30.0], True)])
def test_log_scale_rule(values, log):
    assert plots.log_scale_wanted(values) is log


def test_plots_are_written(tmp_path):
    layers, norms = _paper_norms(PAPER_RANGES)
    assert plots.plot_layer_norms(layers, norms, tmp_path / "n.png").stat().st_size > 10_000
    tasks = list(PAPER_RANGES)
    cosine = [[1.0 if i == j else 0.05 for j in range(4)] for i in range(4)]
    assert plots.plot_cosine(tasks, cosine, dict.fromkeys(tasks, 0.5), tmp_path / "c.png").stat().st_size > 5_000
