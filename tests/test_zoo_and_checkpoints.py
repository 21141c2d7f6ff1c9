import pytest
import torch

from taskmerge import checkpoints
from taskmerge.settings.builtin.tasks import build_builtin_task
from taskmerge.settings.builtin.zoo import get_builtin_zoo

ENCODER = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
RECIPE = {"pretrain": {"n_images": 64, "epochs": 1, "lr": 1e-3, "batch_size": 32},
          "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 32}}


def _tasks():
    return [build_builtin_task(n, 32, 8, 8, 32, seed=0) for n in ("digits", "scenes")]


def test_zoo_is_built_once_reused_and_rebuilt_when_the_recipe_changes(tmp_path):
    tasks = _tasks()
    zoo, built = get_builtin_zoo(ENCODER, RECIPE, tasks, 0, tmp_path)
    assert built and zoo.base.is_file() and all(p.is_file() for p in zoo.finetuned.values())
    again, built_again = get_builtin_zoo(ENCODER, RECIPE, tasks, 0, tmp_path)
    assert not built_again and again == zoo
    changed = {**RECIPE, "finetune": {**RECIPE["finetune"], "lr": 2e-3}}
    other, built_other = get_builtin_zoo(ENCODER, changed, tasks, 0, tmp_path)
    assert built_other and other.key != zoo.key
    assert not list(tmp_path.joinpath("zoo").glob(".*")), "no staging directory is left behind"


def test_same_seed_same_zoo(tmp_path):
    a, _ = get_builtin_zoo(ENCODER, RECIPE, _tasks(), 0, tmp_path / "a")
    b, _ = get_builtin_zoo(ENCODER, RECIPE, _tasks(), 0, tmp_path / "b")
    for path_a, path_b in [(a.base, b.base), (a.finetuned["scenes"], b.finetuned["scenes"])]:
        sa, sb = checkpoints.load_state_dict(path_a), checkpoints.load_state_dict(path_b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    base, ft = checkpoints.load_state_dict(a.base), checkpoints.load_state_dict(a.finetuned["digits"])
    assert any(not torch.equal(base[k], ft[k]) for k in base), "fine-tuning must move the weights"


def test_checkpoint_io_errors_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        checkpoints.load_state_dict(tmp_path / "missing.safetensors")
    state = {"w": torch.arange(6.0).view(2, 3)}
    torch.save(state, tmp_path / "sd.pt")
    assert torch.equal(checkpoints.load_state_dict(tmp_path / "sd.pt")["w"], state["w"])
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint suffix '.npz'"):
        checkpoints.load_state_dict(tmp_path / "weights.npz")
    path = checkpoints.save_state_dict(tmp_path / "out.safetensors", state)
    assert torch.equal(checkpoints.load_state_dict(path)["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_lazy_state_dict_reads_every_dtype_and_shape(tmp_path):
    weight = torch.randn(3, 4)
    state = {"bf16": torch.ones(2, dtype=torch.bfloat16), "f64": torch.arange(3, dtype=torch.float64),
             "scalar": torch.tensor(2.5), "steps": torch.tensor(7), "empty": torch.empty(0, 3),
             "w": weight, "w_tied": weight, "mask": torch.tensor([True, False])}
    path = checkpoints.save_state_dict(tmp_path / "m.safetensors", state)
    lazy = checkpoints.open_state_dict(path)
    assert isinstance(lazy, checkpoints.LazyStateDict) and sorted(lazy) == sorted(state) and len(lazy) == len(state)
    for key, tensor in state.items():
        assert lazy[key].dtype == tensor.dtype and torch.equal(lazy[key], tensor)
    with pytest.raises(KeyError, match="nope"):
        lazy["nope"]
    (tmp_path / "bad.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoints.LazyStateDict(tmp_path / "bad.safetensors")
