"""CLIP releases: random-init ViT-B/32 checkpoints saved as the releases save them are found, converted
once to cached safetensors, mapped to open_clip 3.x and built into encoders that match open_clip."""

import logging

import open_clip
import pytest
import torch

from clip_release import random_clip, save_release
from taskmerge import checkpoints, merging, release_zoo
from taskmerge.encoders import create_encoder
from taskmerge.encoders.clip import TEXT_LEFTOVERS, ClipClassificationHead, to_open_clip_keys, zeroshot_weights

MODEL = "ViT-B-32"
NAMES = ["DTD", "MNIST"]
CLASSES = {"DTD": 3, "MNIST": 10}


@pytest.fixture(scope="module", params=["A", "B"])
def release(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"release{request.param}")
    saved = save_release(root, MODEL, NAMES, request.param, CLASSES)
    return request.param, root, saved


def test_release_converts_once_to_open_clip_keys(release, tmp_path):
    fmt, root, saved = release
    zoo = release_zoo.get_release_zoo(root, MODEL, NAMES, fmt, tmp_path)
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

    files = sorted((tmp_path / "release").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = release_zoo.get_release_zoo(root, MODEL, NAMES, fmt, tmp_path)
    assert again == zoo
    assert sorted((tmp_path / "release").iterdir()) == files and [p.stat().st_mtime_ns for p in files] == mtimes


def test_missing_release_files_are_listed_at_once(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        release_zoo.get_release_zoo(tmp_path, MODEL, NAMES, "B", tmp_path / "cache")
    message = str(error.value)
    assert "5 checkpoint file(s) missing" in message
    for part in ("MNISTVal/nonlinear_zeroshot.pt", "DTDVal/nonlinear_finetuned.pt", "head_MNISTVal.pt", "format B"):
        assert part in message
    with pytest.raises(ValueError, match="tasks.format='C'"):
        release_zoo.release_files(tmp_path, MODEL, NAMES, "C")


def test_clip_encoder_matches_open_clip_encode_image(release, tmp_path):
    fmt, root, saved = release
    zoo = release_zoo.get_release_zoo(root, MODEL, NAMES, fmt, tmp_path)
    encoder = create_encoder("clip", model=MODEL)
    encoder.load_state_dict(encoder.encoder_weights(checkpoints.load_state_dict(zoo.finetuned["DTD"])))
    encoder.eval()
    reference = random_clip(MODEL, seed=123)
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


def test_merge_of_release_keys_keeps_text_leftovers(release, tmp_path):
    fmt, root, _ = release
    zoo = release_zoo.get_release_zoo(root, MODEL, NAMES, fmt, tmp_path)
    merged = merging.merge("ties", zoo.base, list(zoo.finetuned.values()), k=20, alpha=1.0)
    base = checkpoints.load_state_dict(zoo.base)
    for key in TEXT_LEFTOVERS:
        assert torch.equal(merged[key], base[key])
    encoder = create_encoder("clip", model=MODEL)
    encoder.load_state_dict(encoder.encoder_weights(merged))


def test_unexpected_keys_are_named():
    with pytest.raises(ValueError, match=r"ckpt.pt: keys .*model.transformer.resblocks.0.attn.in_proj_weight"):
        to_open_clip_keys({"model.visual.proj": torch.zeros(1), "model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)},
                          "ckpt.pt")


def test_zeroshot_weights_follow_the_release_recipe():
    logging.disable(logging.WARNING)
    try:
        clip = open_clip.create_model(MODEL, pretrained=None, force_quick_gelu=True, load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(MODEL)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    weights = zeroshot_weights(clip, tokenizer, ["cat", "dog"], templates)
    assert weights.shape == (2, 512)
    scale = clip.logit_scale.exp().item()
    assert torch.allclose(weights.norm(dim=-1), torch.full((2,), scale), rtol=1e-5)
    with torch.no_grad():
        per_template = torch.nn.functional.normalize(clip.encode_text(tokenizer([t.format("dog") for t in templates])), dim=-1)
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1) * scale
    assert torch.allclose(weights[1], expected, atol=1e-5)
