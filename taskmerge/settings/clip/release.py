"""A zoo read from released CLIP checkpoints (task_vectors format A, TSV / tall_masks format B, checkpoints.md §1).

Every release file is checked first (one error lists all missing files and the expected layout), then
converted once into a content-addressed safetensors file under `cache_dir/release/` — keys mapped to
open_clip 3.x, pickles read through the restricted unpickler — so later runs read them lazily. An
index maps each source's (path, size, mtime, inode, ctime) to its converted file, so unchanged sources are
not reread. Converted files and the index are checksummed cache entries: a damaged one is reported and
converted again; a damaged release file is the user's, and is named in the error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from taskmerge import checkpoints
from taskmerge.cache import content_key, read_json_entry, seal, verified, write_json_entry
from taskmerge.settings.clip.encoder import ClipClassificationHead, to_open_clip_keys
from taskmerge.zoo import Zoo

FORMATS = ("A", "B")
CONVERSION_VERSION = 2  # 2: converted files and the index carry checksums
INDEX = f"index.v{CONVERSION_VERSION}.json"


@dataclass(frozen=True)
class ReleaseFiles:
    """Where one release keeps the base encoder, each task's fine-tuned encoder and each task's head."""

    base: Path
    finetuned: dict[str, Path]
    heads: dict[str, Path]


def release_files(root: str | Path, model: str, names: Sequence[str], fmt: str) -> ReleaseFiles:
    """The release's paths for `model` and datasets `names` in format A (task_vectors) or B (TSV/tall_masks)."""
    folder = Path(root) / model
    if fmt == "A":
        return ReleaseFiles(folder / "zeroshot.pt", {n: folder / n / "finetuned.pt" for n in names},
                            {n: folder / f"head_{n}.pt" for n in names})
    if fmt == "B":
        return ReleaseFiles(folder / "MNISTVal" / "nonlinear_zeroshot.pt",
                            {n: folder / f"{n}Val" / "nonlinear_finetuned.pt" for n in names},
                            {n: folder / f"head_{n}Val.pt" for n in names})
    raise ValueError(f"tasks.format={fmt!r}: expected one of {FORMATS} (A = task_vectors, B = TSV / tall_masks)")


def expected_release_layout(model: str, fmt: str) -> str:
    """A one-paragraph description of the release layout, for errors and the README."""
    if fmt == "A":
        return (f"format A (mlfoundations/task_vectors): {model}/zeroshot.pt, {model}/<Dataset>/finetuned.pt, "
                f"{model}/head_<Dataset>.pt")
    return (f"format B (TSV / tall_masks): {model}/MNISTVal/nonlinear_zeroshot.pt, "
            f"{model}/<Dataset>Val/nonlinear_finetuned.pt, {model}/head_<Dataset>Val.pt")


def check_release(files: ReleaseFiles, model: str, fmt: str, with_heads: bool = True) -> None:
    """Raise one FileNotFoundError naming every missing file of the release, with the expected layout."""
    wanted = [files.base, *files.finetuned.values(), *(files.heads.values() if with_heads else ())]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} checkpoint file(s) missing:\n  " + "\n  ".join(missing)
                                + f"\nexpected under paths.checkpoints: {expected_release_layout(model, fmt)}")


def _source_id(path: Path, mapping: Callable) -> str:
    """Identity of a source file's current version: a copy that keeps the mtime (`cp -p`, rsync) still gets a
    new inode or ctime, so a replaced checkpoint is always converted again."""
    stat = path.resolve().stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}|{mapping.__name__}"


def convert(source: Path, cache_dir: str | Path, mapping: Callable[[dict[str, torch.Tensor], str], Mapping[str, torch.Tensor]]) -> Path:
    """The converted safetensors of `source`, named by the SHA-256 of its bytes (equal weights share one file),
    converting it first if the index has no intact entry for the source's current version."""
    folder = Path(cache_dir) / "release"
    source_id = _source_id(source, mapping)
    known = (read_json_entry(folder / INDEX) or {}).get(source_id)
    if known and verified(folder / f"{known}.safetensors"):
        return folder / f"{known}.safetensors"
    target = _save_content_addressed(folder, mapping(checkpoints.load_state_dict(source), str(source)))
    index = read_json_entry(folder / INDEX) or {}
    index[source_id] = target.stem
    write_json_entry(folder / INDEX, index)
    return target


def _save_content_addressed(folder: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Save `state` under `folder` as `<sha256 of its bytes>.safetensors`, sealed with that checksum."""
    with checkpoints.temporary_path(folder / "conversion.safetensors") as staging:
        checkpoints.save_state_dict(staging, state)
        digest = checkpoints.fingerprint(staging)
        target = folder / f"{digest}.safetensors"
        os.replace(staging, target)
    return seal(target, digest)


def encoder_mapping(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """An encoder checkpoint in open_clip 3.x names (text leftovers kept for merge parity)."""
    return to_open_clip_keys(state, source)


def head_mapping(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A head checkpoint reduced to its `weight` [C, E] and `bias` [C] (zero if absent)."""
    head = ClipClassificationHead.from_state_dict(state, source)
    return {"weight": head.weight.detach(), "bias": head.bias.detach()}


def get_release_zoo(root: str | Path, model: str, names: Sequence[str], fmt: str, cache_dir: str | Path,
                    heads: Mapping[str, Path] | None = None) -> Zoo:
    """The zoo of a release: base, fine-tuned encoders and heads converted to cached safetensors. `heads`,
    when given, replaces the release's head files (zero-shot heads built from the text tower)."""
    files = release_files(root, model, names, fmt)
    check_release(files, model, fmt, with_heads=heads is None)
    base = convert(files.base, cache_dir, encoder_mapping)
    finetuned = {n: convert(p, cache_dir, encoder_mapping) for n, p in files.finetuned.items()}
    head_paths = dict(heads) if heads is not None else {n: convert(p, cache_dir, head_mapping) for n, p in files.heads.items()}
    key = content_key("release", base.stem, {n: p.stem for n, p in finetuned.items()},
                      {n: checkpoints.fingerprint(p) for n, p in head_paths.items()})
    return Zoo(key=key, base=base, finetuned=finetuned, heads=head_paths)
