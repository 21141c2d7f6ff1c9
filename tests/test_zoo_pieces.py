"""The built-in zoo is stored piece by piece (base, one piece per task): any subset of tasks reuses what
exists and builds only what is missing, says so on stdout, and SIGTERM mid-build leaves no staging behind."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskmerge.settings.builtin.tasks import build_builtin_task
from taskmerge.settings.builtin.zoo import get_builtin_zoo

ROOT = Path(__file__).resolve().parents[1]
ENCODER = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
RECIPE = {"pretrain": {"n_images": 64, "epochs": 1, "lr": 1e-3, "batch_size": 32},
          "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 32}}
TASKS = {name: build_builtin_task(name, 32, 8, 8, 32, seed=0) for name in ("digits", "textures", "shapes")}


def _zoo(cache, *names, recipe=RECIPE):
    return get_builtin_zoo(ENCODER, recipe, [TASKS[n] for n in names], 0, cache)


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_task_subsets_reuse_the_pieces_that_exist(tmp_path, capsys):
    two, built = _zoo(tmp_path, "digits", "textures")
    out = capsys.readouterr().out
    assert built and f"building the built-in model zoo in {tmp_path / 'zoo'}" in out and "first run only" in out
    assert "base: training on 64 images × 1 epochs" in out and "digits: built in" in out

    before = _mtimes(tmp_path)
    three, built = _zoo(tmp_path, "digits", "textures", "shapes")
    out = capsys.readouterr().out
    assert built and "missing pieces" in out
    assert "base: reused" in out and "digits: reused" in out and "textures: reused" in out
    assert "shapes: training on 32 images × 1 epochs" in out and "digits: built" not in out
    assert _mtimes(tmp_path).items() >= before.items(), "only shapes was trained: nothing else was rewritten"
    assert {n: three.finetuned[n] for n in two.finetuned} == two.finetuned and three.key != two.key

    one, built = _zoo(tmp_path, "textures")
    assert not built and capsys.readouterr().out == "" and one.finetuned["textures"] == two.finetuned["textures"]
    reordered, built = _zoo(tmp_path, "textures", "digits")
    assert not built and reordered.key == two.key, "the zoo key does not depend on the order of the tasks"

    alone, _ = _zoo(tmp_path / "other", "shapes")
    assert alone.finetuned["shapes"].read_bytes() == three.finetuned["shapes"].read_bytes(), \
        "a task's seed comes from the registry order, not from its place in the run's list"


def test_a_changed_fine_tuning_recipe_reuses_the_base(tmp_path):
    zoo, _ = _zoo(tmp_path, "digits")
    base_mtime = zoo.base.stat().st_mtime_ns
    other, built = _zoo(tmp_path, "digits", recipe={**RECIPE, "finetune": {**RECIPE["finetune"], "lr": 2e-3}})
    assert built and other.base == zoo.base and other.finetuned != zoo.finetuned and other.key != zoo.key
    assert zoo.base.stat().st_mtime_ns == base_mtime


BUILD = """
import sys
from taskmerge.entry import exit_on_sigterm
from taskmerge.settings.builtin.tasks import build_builtin_task
from taskmerge.settings.builtin.zoo import get_builtin_zoo

exit_on_sigterm()
encoder = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
pretrain_epochs, finetune_epochs = int(sys.argv[2]), int(sys.argv[3])
recipe = {"pretrain": {"n_images": 64, "epochs": pretrain_epochs, "lr": 1e-3, "batch_size": 32},
          "finetune": {"epochs": finetune_epochs, "lr": 1e-3, "batch_size": 32}}
get_builtin_zoo(encoder, recipe, [build_builtin_task("digits", 32, 8, 8, 32, seed=0)], 0, sys.argv[1])
"""


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_two_processes_sharing_a_cache_train_each_piece_once(tmp_path):
    """Started together on one cache, one process trains each piece while the other waits and uses it."""
    cache = tmp_path / "cache"
    processes = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache), "3", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    out = "".join(stdout for stdout, _ in outputs)
    assert out.count("base: built in") == 1 and out.count("digits: built in") == 1, out
    assert _leftovers(cache) == []


@pytest.mark.parametrize(("piece", "epochs"), [("base", (100_000, 1)), ("task", (1, 100_000))])
def test_sigterm_mid_build_leaves_no_staging(tmp_path, piece, epochs):
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", BUILD, str(cache), *map(str, epochs)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging_glob = "zoo/.*" if piece == "base" else "zoo/*/tasks/.*"
    deadline = time.monotonic() + 120
    while not list(cache.glob(staging_glob)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the training loop
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert _leftovers(cache) == []
    if piece == "task":
        assert len(list(cache.glob("zoo/*/base.safetensors"))) == 1, "the finished base piece is kept"
