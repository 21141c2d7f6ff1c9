"""CLIP releases: random-init ViT-B/32 checkpoints saved as the releases save them are found, converted
once to cached safetensors, mapped to open_clip 3.x and built into encoders that match open_clip."""

import os
import shutil

import open_clip
import pytest
import torch

from clip_release import random_clip, save_release
from conftest import CLIP_MODEL, CLIP_NAMES
from taskmerge import checkpoints, merging
from taskmerge.settings.clip import release as release_zoo
from taskmerge.settings import create_encoder
from taskmerge.settings.clip.encoder import TEXT_LEFTOVERS, ClipClassificationHead, random_init_clip, to_open_clip_keys, zeroshot_weights


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_release_converts_once_to_open_clip_keys(clip_releases, clip_cache, fmt):
    root, saved = clip_releases[fmt]
    zoo = release_zoo.get_release_zoo(root, CLIP_MODEL, CLIP_NAMES, fmt, clip_cache)
    for name, path in {"base": zoo.base, **zoo.finetuned}.items():
        converted = checkpoints.load_state_dict(path)
        expected = to_open_clip_keys(saved[name])
        assert sorted(converted) == sorted(expected)
        assert len([k for k in converted if k.startswith("visual.")]) == 152
        assert TEXT_LEFTOVERS <= set(converted), "text leftovers are kept for the parity of global merges"
        assert all(torch.equal(converted[k], expected[k]) for k in expected)
        assert path.stem == checkpoints.fingerprint(path), "converted files are content-addressed"
    head = checkpoints.load_state_dict(zoo.heads["DTD"])
    assert torch.equal(head["weight"], saved["head/DTD"]["weight"]) and head["weight"].shape == (3, 512)

    files = sorted((clip_cache / "release").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = release_zoo.get_release_zoo(root, CLIP_MODEL, CLIP_NAMES, fmt, clip_cache)
    assert again == zoo
    assert sorted((clip_cache / "release").iterdir()) == files and [p.stat().st_mtime_ns for p in files] == mtimes


def test_formats_a_and_b_of_equal_weights_share_their_conversions(clip_releases, clip_cache):
    zoos = [release_zoo.get_release_zoo(clip_releases[f][0], CLIP_MODEL, CLIP_NAMES, f, clip_cache) for f in ("A", "B")]
    assert zoos[0] == zoos[1]


def test_a_replaced_checkpoint_with_the_same_mtime_is_converted_again(tmp_path):
    save_release(tmp_path / "release", CLIP_MODEL, ["DTD"], "B", {"DTD": 3}, seed=0)
    zoo = release_zoo.get_release_zoo(tmp_path / "release", CLIP_MODEL, ["DTD"], "B", tmp_path / "cache")
    other = save_release(tmp_path / "other", CLIP_MODEL, ["DTD"], "B", {"DTD": 3}, seed=7)
    target = tmp_path / "release" / CLIP_MODEL / "DTDVal" / "nonlinear_finetuned.pt"
    stat = target.stat()
    shutil.copyfile(tmp_path / "other" / CLIP_MODEL / "DTDVal" / "nonlinear_finetuned.pt", target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or rsync would leave it
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    again = release_zoo.get_release_zoo(tmp_path / "release", CLIP_MODEL, ["DTD"], "B", tmp_path / "cache")
    assert again.finetuned["DTD"] != zoo.finetuned["DTD"] and again.key != zoo.key
    converted = checkpoints.load_state_dict(again.finetuned["DTD"])
    assert torch.equal(converted["visual.proj"], other["DTD"]["model.visual.proj"])


def test_missing_release_files_are_listed_at_once(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        release_zoo.get_release_zoo(tmp_path, CLIP_MODEL, ["DTD", "MNIST"], "B", tmp_path / "cache")
    message = str(error.value)
    assert "5 checkpoint file(s) missing" in message
    for part in ("MNISTVal/nonlinear_zeroshot.pt", "DTDVal/nonlinear_finetuned.pt", "head_MNISTVal.pt", "format B"):
        assert part in message
    with pytest.raises(ValueError, match="tasks.format='C'"):
        release_zoo.release_files(tmp_path, CLIP_MODEL, ["DTD"], "C")


def test_clip_encoder_matches_open_clip_encode_image(clip_releases, clip_cache):
    root, saved = clip_releases["B"]
    zoo = release_zoo.get_release_zoo(root, CLIP_MODEL, CLIP_NAMES, "B", clip_cache)
    encoder = create_encoder("clip", model=CLIP_MODEL)
    encoder.load_state_dict(encoder.encoder_weights(checkpoints.load_state_dict(zoo.finetuned["DTD"])))
    encoder.eval()
    reference = random_clip(CLIP_MODEL, seed=123)
    reference.load_state_dict({k[len("model."):]: v for k, v in saved["DTD"].items()})
    reference.eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encoder.features(images, "pooled"), reference.encode_image(images))
        assert encoder.features(images, "tokens").shape == (2, 49, 768)
    head = ClipClassificationHead.from_state_dict(checkpoints.load_state_dict(zoo.heads["DTD"]))
    with torch.no_grad():
        features = encoder.features(images, "pooled")
        expected = torch.nn.functional.normalize(features, dim=-1) @ saved["head/DTD"]["weight"].T
        assert torch.allclose(head(features), expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_public_load_encoder_reads_a_release_file_directly(clip_releases, fmt):
    """`taskmerge.load_encoder` on a release's own fine-tuned file (format A: a pickled `ImageEncoder`)."""
    import taskmerge

    root, saved = clip_releases[fmt]
    path = root / CLIP_MODEL / ("DTD/finetuned.pt" if fmt == "A" else "DTDVal/nonlinear_finetuned.pt")
    encoder = taskmerge.load_encoder(path, "clip_vit_b32")
    reference = random_clip(CLIP_MODEL, seed=123)
    reference.load_state_dict({k[len("model."):]: v for k, v in saved["DTD"].items()})
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not encoder.training and torch.equal(encoder.features(images, "pooled"), reference.eval().encode_image(images))


def test_merge_of_release_keys_keeps_text_leftovers(clip_releases, clip_cache):
    root, _ = clip_releases["B"]
    zoo = release_zoo.get_release_zoo(root, CLIP_MODEL, CLIP_NAMES, "B", clip_cache)
    merged = merging.merge("ties", zoo.base, list(zoo.finetuned.values()), k=20, alpha=1.0)
    base = checkpoints.load_state_dict(zoo.base)
    for key in TEXT_LEFTOVERS:
        assert torch.equal(merged[key], base[key])
    encoder = create_encoder("clip", model=CLIP_MODEL)
    encoder.load_state_dict(encoder.encoder_weights(merged))


def test_unexpected_keys_are_named():
    with pytest.raises(ValueError, match=r"ckpt.pt: keys .*model.transformer.resblocks.0.attn.in_proj_weight"):
        to_open_clip_keys({"model.visual.proj": torch.zeros(1), "model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)},
                          "ckpt.pt")


def test_zeroshot_weights_follow_the_release_recipe():
    clip = random_init_clip(CLIP_MODEL)
    with torch.no_grad():
        clip.logit_scale.fill_(torch.log(torch.tensor(100.0)))  # OpenAI CLIP's learned scale
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    weights = zeroshot_weights(clip, tokenizer, ["cat", "dog"], templates)
    assert weights.shape == (2, 512)
    assert torch.allclose(weights.norm(dim=-1), torch.full((2,), 100.0), rtol=1e-5)
    with torch.no_grad():
        per_template = torch.nn.functional.normalize(clip.encode_text(tokenizer([t.format("dog") for t in templates])), dim=-1)
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1) * 100.0
    assert torch.allclose(weights[1], expected, atol=1e-4)
    assert not torch.allclose(weights[0], weights[1])
