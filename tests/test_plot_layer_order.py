"""Task-vector norms are drawn by depth: embeddings, blocks by number, then the final norm and head; only the
blocks are joined by lines."""

from taskmerge import plots
from taskmerge.settings import encoder_from_spec
from taskmerge.task_vectors import layer_of, natural_key

BUILTIN = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 12, "num_heads": 2, "mlp_ratio": 2.0}
CLIP_KEYS = ["visual.class_embedding", "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_post.weight", "visual.proj",
             *[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight" for i in (0, 2, 10)], "token_embedding.weight", "ln_final.weight"]


def _layers(keys):
    """The layer names as `task_vector_stats` gives them (natural order)."""
    return sorted({layer_of(k) for k in keys}, key=natural_key)


def test_builtin_layers_in_depth_order():
    layers = _layers(encoder_from_spec(BUILTIN).state_dict())
    assert sorted(layers, key=plots.depth_order) == [
        "cls_token", "patch_embed.proj", "pos_embed", *[f"blocks.{i}" for i in range(12)], "norm"]


def test_clip_blocks_in_numeric_order_between_embeddings_and_the_rest():
    ordered = sorted(_layers(CLIP_KEYS), key=plots.depth_order)
    assert ordered == ["token_embedding", "visual.class_embedding", "visual.conv1", "visual.ln_pre",
                       *[f"visual.transformer.resblocks.{i}" for i in (0, 2, 10)], "ln_final", "visual.ln_post", "visual.proj"]


def test_only_blocks_are_joined_by_lines(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    layers = ["blocks.0", "blocks.1", "blocks.10", "blocks.2", "cls_token", "norm", "pos_embed"]
    plots.plot_layer_norms(layers, {"a": {layer: 1.0 + i for i, layer in enumerate(layers)}}, tmp_path / "n.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cls_token", "pos_embed", "blocks.0", "blocks.1", "blocks.2",
                                                           "blocks.10", "norm"]
    joined = [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() != "None" and len(line.get_xdata())]
    markers = [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "None" and len(line.get_xdata())]
    assert joined == [[2, 3, 4, 5]] and markers == [[0, 1, 6]]
    assert list(ax.lines[0].get_ydata()) == [1.0, 2.0, 4.0, 3.0], "each block keeps its own value"
