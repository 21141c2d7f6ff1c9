"""Generated dense data trees in the real layouts, for the dense tests (ADE20k, NYU, BEDLAM, MapFree)."""

from __future__ import annotations

from pathlib import Path

from taskmerge.settings.dense import demo_data


def write_dense_trees(data: Path, n_train: int, n_val: int, n_people: int, n_scenes: int) -> Path:
    """ADE20k and NYU trees of `n_train`/`n_val` images, BEDLAM of `n_people`/`n_val`, MapFree of `n_scenes` scenes."""
    demo_data.write_ade20k_tree(data, n_train, n_val, 0)
    demo_data.write_nyu_tree(data, n_train, n_val, 0)
    demo_data.write_bedlam_tree(data, n_people, n_val, 0)
    demo_data.write_mapfree_tree(data, n_scenes, 0)
    return data
