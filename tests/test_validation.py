"""Every bad input ends before any work with one line naming the option, the value and what is expected."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from taskmerge import merging
from taskmerge.config import register_configs
from taskmerge.entry import CheckInputs
from taskmerge.tracking import LOCK

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")

# (overrides, fragments the one-line message must contain)
BAD_INPUTS = [
    (["method=ties", "method.k=150"], ["method.k=150", "(0, 100]"]),
    (["method.alpha=nan"], ["method.alpha=nan", "finite"]),
    (["method.search.alpha=[0.1,inf]"], ["method.search.alpha=inf", "finite"]),
    (["method.search.alpha=[]"], ["method.search.alpha", "non-empty"]),
    (["tasks.names=[]"], ["tasks.names=[]", "non-empty"]),
    (["tasks.names=[nope]"], ["tasks.names", "'nope'", "digits"]),
    (["tasks.names=[digits,digits,textures,shapes,scenes]"], ["tasks.names", "['digits'] more than once"]),
    (["tap.n_samples=0"], ["tap.n_samples=0", ">= 1"]),
    (["tap.n_samples=-5"], ["tap.n_samples=-5", ">= 1"]),
    (["tap.n_samples=5000"], ["tap.n_samples=5000", "tasks.n_train"]),
    (["tap.batch_size=0"], ["tap.batch_size=0", ">= 1"]),
    (["threads=0"], ["threads=0", "an integer >= 1"]),
    (["tap.aggregate=median"], ["tap.aggregate='median'", "'mean', 'relative_to_base'"]),
    (["search=optuna", "tap.aggregate=rank"], ["tap.aggregate=rank", "search=optuna", "tap.aggregate=mean|relative_to_base"]),
    (["search=random", "search.n_trials=0"], ["search.n_trials=0", ">= 1"]),
    (["search=optuna", "search.n_trials=-1"], ["search.n_trials=-1", ">= 1"]),
    (["decoder.epochs=0"], ["decoder.epochs=0", ">= 1"]),
    (["decoder.lr=0"], ["decoder.lr=0", "> 0"]),
    (["decoder=frozen_head", "decoder.batch_size=0"], ["decoder.batch_size=0"]),
    pytest.param(["device=cuda"], ["device=cuda", "no CUDA device"], marks=NO_CUDA),
    (["device=banana"], ["device='banana'", "cpu, cuda"]),
    (["device=meta"], ["device='meta'", "not supported"]),
    (["encoder=clip_vit_b32"], ["tasks=builtin", "encoder=clip_vit_b32", "'builtin_vit'"]),
    (["encoder.img_size=30"], ["encoder.img_size=30", "encoder.patch_size=4"]),
    (["method=adamerging", "method.loss=entropy"], ["method.loss=entropy", "['shapes', 'scenes']"]),
    (["method=adamerging", "method.granularity=block"], ["method.granularity='block'", "'layer' or 'task'"]),
    (["method=adamerging", "method.iterations=0"], ["method.iterations=0"]),
    (["tasks=clip20"], ["paths.data=DIR", "TASKMERGE_DATA_DIR"]),
    (["tasks=clip8", "paths.data=/nonexistent", "paths.checkpoints=/nonexistent"], ["/nonexistent", "Cars", "SUN397"]),
    (["tasks=clip8", "tasks.names=[Cars,ImageNet]", "paths.data=/x", "paths.checkpoints=/y"], ["tasks.names", "'ImageNet'"]),
    (["logger.mode=loud"], ["logger.mode='loud'"]),
]


def _compose(overrides: list[str], run_dir: Path):
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)


@pytest.mark.parametrize(("overrides", "fragments"), BAD_INPUTS)
def test_bad_input_is_one_line_before_anything_is_created(overrides, fragments, tmp_path, capsys, monkeypatch):
    for var in ("TASKMERGE_DATA_DIR", "TASKMERGE_CHECKPOINTS_DIR", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        CheckInputs().on_run_start(_compose(overrides, run_dir))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("taskmerge: error: ") and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not run_dir.exists() and not (tmp_path / "cache").exists(), "nothing is created for a bad input"


def test_good_default_config_passes_the_checks(tmp_path, capsys):
    CheckInputs().on_run_start(_compose(["logger=none"], tmp_path / "run"))
    assert capsys.readouterr().err == ""


def _run(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskmerge.run", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_command_line_error_is_one_line_with_exit_status_2_and_full_error_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    result = _run("method=ties", "method.k=150", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["taskmerge: error: method.k=150.0 is invalid for method=ties; expected a number "
                                                  "in (0, 100] (percent of entries kept per task; 100 = no trimming)"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    full = _run("method=ties", "method.k=150", f"hydra.run.dir={tmp_path / 'run'}")
    assert full.returncode != 0 and "Traceback" in full.stderr and "UserError" in full.stderr


def test_multirun_job_with_a_bad_value_fails_before_writing_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(tmp_path / "cache"))
    result = _run("-m", "method.alpha=nan", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2 and "taskmerge: error: method.alpha=nan" in result.stderr
    assert not list((tmp_path / "sweep").rglob("candidates.jsonl")) and not list((tmp_path / "sweep").rglob("selection.json"))
    assert not (tmp_path / "cache").exists()


def test_unwritable_run_directory_is_named(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit):
        CheckInputs().on_run_start(_compose(["logger=none"], blocker / "run"))
    message = capsys.readouterr().err
    assert f"hydra.run.dir={blocker / 'run'} cannot be written" in message and "Traceback" not in message


def test_a_second_run_on_a_locked_run_directory_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / LOCK).open("a+") as held:  # a first run holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on somehost\n")
        held.flush()
        with pytest.raises(SystemExit):
            CheckInputs().on_run_start(_compose(["logger=none"], run_dir))
    message = capsys.readouterr().err
    assert f"hydra.run.dir={run_dir} is in use by another run (pid 12345 on somehost)" in message
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]


def test_run_directory_is_named_after_method_and_selector(tmp_path):
    cfg = _compose(["selector=both"], tmp_path / "ignored")
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        default = compose(config_name="config", overrides=["selector=both"], return_hydra_config=True)
    assert default.hydra.run.dir.endswith("_ta_both") and cfg.selector.name == "both"


def test_schemas_are_not_options(tmp_path):
    result = _run("--help")
    assert result.returncode == 0 and "method: adamerging, auto, average," in result.stdout and "_schema" not in result.stdout
    assert _run("method=ta_schema", f"hydra.run.dir={tmp_path}").returncode != 0


def test_merge_refuses_a_single_path_for_the_fine_tuned_list(tmp_path):
    with pytest.raises(TypeError, match="finetuned must be a list of checkpoints .* got one str: /x/ft.safetensors"):
        merging.merge("ta", "/x/base.safetensors", "/x/ft.safetensors", alpha=0.3)
