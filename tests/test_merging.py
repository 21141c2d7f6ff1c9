import pytest
import torch

from taskmerge import merging


def _model(value: float, step: int = 0) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((2, 3), value),
        "b": torch.tensor([value, -value]),
        "bn.num_batches_tracked": torch.tensor(step, dtype=torch.int64),
    }


def test_available_lists_spine_methods():
    assert {"ta", "average"} <= set(merging.available())


def test_ta_alpha_zero_gives_pretrained():
    base = _model(1.0)
    merged = merging.merge("ta", base, [_model(3.0), _model(-2.0)], alpha=0.0)
    for key in base:
        assert torch.equal(merged[key], base[key])


def test_ta_alpha_one_single_task_gives_finetuned():
    base, ft = _model(1.0), _model(2.5, step=9)
    merged = merging.merge("ta", base, [ft], alpha=1.0)
    assert torch.equal(merged["w"], ft["w"]) and torch.equal(merged["b"], ft["b"])
    assert merged["bn.num_batches_tracked"].item() == 0, "integer buffers come from the pretrained model"


def test_ta_hand_values_and_dtypes():
    base = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.float64)}
    fts = [{"w": torch.tensor([2.0, 2.0]), "h": torch.tensor([1.5], dtype=torch.float64)},
           {"w": torch.tensor([1.0, 4.0]), "h": torch.tensor([0.0], dtype=torch.float64)}]
    merged = merging.merge("ta", base, fts, alpha=0.5)
    assert torch.allclose(merged["w"], torch.tensor([1.5, 3.0]))
    assert torch.allclose(merged["h"], torch.tensor([0.75], dtype=torch.float64))
    assert merged["w"].dtype == torch.float32 and merged["h"].dtype == torch.float64
    assert list(merged) == list(base)


def test_average_is_mean_of_finetuned():
    base = _model(0.0)
    fts = [_model(1.0), _model(2.0), _model(6.0)]
    merged = merging.merge("average", base, fts)
    assert torch.allclose(merged["w"], torch.full((2, 3), 3.0))


def test_prepare_then_merge_equals_merge():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=gen)}
    fts = [{"w": base["w"] + torch.randn(4, 4, generator=gen)} for _ in range(3)]
    prepared = merging.prepare("ta", base, fts)
    for alpha in (0.1, 0.7):
        assert torch.equal(prepared.merge(alpha=alpha)["w"], merging.merge("ta", base, fts, alpha=alpha)["w"])


@pytest.mark.parametrize(
    ("finetuned", "message"),
    [
        ([], "at least one fine-tuned"),
        ([{"w": torch.zeros(2, 3), "b": torch.zeros(2)}], "missing"),
        ([{**_model(1.0), "w": torch.zeros(3, 2)}], "'w' has shape"),
        ([{**_model(1.0), "w": torch.zeros(2, 3, dtype=torch.float64)}], "'w' has dtype"),
        ([{**_model(1.0), "b": torch.tensor([float("nan"), 0.0])}], "'b' contains NaN"),
    ],
)
def test_bad_checkpoints_name_the_problem(finetuned, message):
    with pytest.raises(ValueError, match=message):
        merging.merge("ta", _model(0.0), finetuned, alpha=1.0)


def test_bad_method_and_hparams():
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        merging.merge("nope", _model(0.0), [_model(1.0)])
    with pytest.raises(ValueError, match="no hyperparameter 'alpah'"):
        merging.merge("ta", _model(0.0), [_model(1.0)], alpah=1.0)
    with pytest.raises(ValueError, match="alpha='x' is invalid"):
        merging.merge("ta", _model(0.0), [_model(1.0)], alpha="x")


def test_merge_from_safetensors_paths_equals_in_memory(tmp_path):
    from taskmerge import checkpoints

    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(5, 3, generator=gen), "steps": torch.tensor(3)}
    fts = [{"w": base["w"] + torch.randn(5, 3, generator=gen), "steps": torch.tensor(9)} for _ in range(3)]
    base_path = checkpoints.save_state_dict(tmp_path / "base.safetensors", base)
    paths = [checkpoints.save_state_dict(tmp_path / f"ft{i}.safetensors", ft) for i, ft in enumerate(fts)]
    from_disk = merging.merge("ta", base_path, paths, alpha=0.4)
    in_memory = merging.merge("ta", base, fts, alpha=0.4)
    assert from_disk.keys() == in_memory.keys() and all(torch.equal(from_disk[k], in_memory[k]) for k in in_memory)


def test_a_nan_in_a_checkpoint_file_is_named_as_blocks_are_read(tmp_path):
    """Files are checked for NaN/Inf as a method reads their blocks (no extra pass): the error names file and key."""
    from taskmerge import checkpoints

    base = {"w": torch.zeros(300, 7), "b": torch.zeros(3)}
    good = {"w": torch.ones(300, 7), "b": torch.ones(3)}
    bad_w = good["w"].clone()
    bad_w[250, 3] = float("inf")
    paths = [checkpoints.save_state_dict(tmp_path / "base.safetensors", base),
             checkpoints.save_state_dict(tmp_path / "good.safetensors", good),
             checkpoints.save_state_dict(tmp_path / "bad.safetensors", {"w": bad_w, "b": good["b"]})]
    for method in ("ta", "ties", "tsv", "iso_c"):
        with pytest.raises(checkpoints.NonFiniteTensor, match=r"bad\.safetensors: tensor 'w' contains NaN or Inf"):
            merging.merge(method, paths[0], paths[1:])
    assert merging.merge("ta", paths[0], paths[1:2], alpha=1.0)["w"].eq(1).all()


def test_svd_methods_batched_per_key_equal_the_streamed_cpu_path(monkeypatch):
    """The device path decomposes all T matrices of a key in one batched call; on the CPU they are streamed one
    at a time. Both give the same merge (the batched code runs here on the CPU)."""
    from taskmerge.merging import tsv

    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(40, 12, generator=gen, dtype=torch.float64), "v": torch.randn(6, 30, generator=gen, dtype=torch.float64)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()} for _ in range(5)]
    fts[2] = {k: v.clone() for k, v in base.items()}  # one task that changed nothing: zero triplets
    streamed = merging.merge("tsv", base, fts, alpha=1.0)
    monkeypatch.setattr(tsv, "CPU_BATCH", None)
    batched = merging.merge("tsv", base, fts, alpha=1.0)
    assert all(torch.allclose(streamed[k], batched[k], rtol=0, atol=1e-12) for k in base)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star"])
def test_svd_methods_device_option(method):
    base, fts = _model(0.0), [_model(1.0), _model(3.0)]
    assert merging.merge(method, base, fts, device="cpu")["w"].shape == (2, 3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is invalid; expected a torch device this machine has"):
            merging.merge(method, base, fts, device="cuda")
    with pytest.raises(ValueError, match="device='gpu0' is invalid"):
        merging.merge(method, base, fts, device="gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star"])
def test_svd_methods_on_cuda_equal_the_cpu(method):
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(64, 48, generator=gen)}
    fts = [{"w": base["w"] + 0.01 * torch.randn(64, 48, generator=gen)} for _ in range(4)]
    cpu, cuda = (merging.merge(method, base, fts, device=device)["w"] for device in ("cpu", "cuda"))
    assert cuda.device.type == "cpu" and torch.allclose(cpu, cuda, rtol=0, atol=1e-6)


def test_mapped_blocks_equal_positioned_reads(tmp_path):
    """The zero-copy view of a block (file pages) holds the same values as a positioned read, for every dtype."""
    from taskmerge import checkpoints

    gen = torch.Generator().manual_seed(2)
    tensors = {"a": torch.randn(1000, 3, generator=gen), "b": torch.randn(77, generator=gen, dtype=torch.float64),
               "c": torch.randn(5, 9, generator=gen).to(torch.bfloat16), "s": torch.tensor(2.5), "i": torch.arange(10)}
    lazy = checkpoints.LazyStateDict(checkpoints.save_state_dict(tmp_path / "m.safetensors", tensors))
    for key, (start, stop) in {"a": (1, 2999), "b": (0, 77), "c": (40, 45), "s": (0, 1), "i": (3, 3)}.items():
        with lazy.mapped_block(key, start, stop) as view:
            assert torch.equal(view, lazy.read_flat(key, start, stop))
            assert torch.equal(view, tensors[key].reshape(-1)[start:stop])
    with pytest.raises(IndexError, match="outside its 77 elements"):
        with lazy.mapped_block("b", 0, 78):
            pass


def test_run_device_reaches_the_methods_that_take_one(monkeypatch):
    """A run's `device` becomes the default `device` of methods that have one (TSV, Iso-C, Iso-CTS decompose there);
    method.device, when set, wins; methods without the option never receive it."""
    from types import SimpleNamespace

    from taskmerge.experiment import CandidateMerger, Setting, StageTimer

    seen = []
    monkeypatch.setattr(merging, "prepare", lambda method, base, fts, **fixed: seen.append(fixed) or SimpleNamespace(merge=lambda **_: {}))
    zoo = SimpleNamespace(base={}, finetuned={"a": {}, "b": {}})
    setting = Setting(tasks=[SimpleNamespace(name="a"), SimpleNamespace(name="b")], zoo=zoo, encoder_spec={},
                      device=torch.device("cuda:3"))
    CandidateMerger("tsv", setting, StageTimer())({"alpha": 1.0})
    CandidateMerger("iso_c", setting, StageTimer())({"alpha": 1.0, "device": "cpu"})
    CandidateMerger("iso_cts", setting, StageTimer())({"alpha": 1.0})
    CandidateMerger("ta", setting, StageTimer())({"alpha": 1.0})
    assert [fixed.get("device") for fixed in seen] == ["cuda:3", "cpu", "cuda:3", None]
