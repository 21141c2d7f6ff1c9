"""External decoders: a fake command (a small Python script) sees the exported encoder in the declared layout,
its metrics are read and cached; failures, bad metrics and timeouts raise naming the task, the command and the
stderr tail, leaving no process and no temporary export behind; command templates are validated."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from taskmerge.errors import UserError
from taskmerge.settings.dense.encoder import DenseViT
from taskmerge.settings.dense.external import (MAST3R_COMMAND, MULTIHMR_COMMAND, ExternalDecoder,
                                                ExternalDecoderError, command_argv, evaluate)
from taskmerge.settings.dense.releases import LAYOUTS, export, load_canonical, read_release

FAKE = r'''
import json, os, shutil, subprocess, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
state, mode = os.environ["FAKE_STATE"], os.environ["FAKE_MODE"]
with open(os.path.join(state, "calls"), "a") as handle:
    handle.write("call\n")
with open(os.path.join(state, "args.json"), "w") as handle:
    json.dump(args, handle)
shutil.copy(args["--encoder"], os.path.join(state, os.path.basename(args["--encoder"])))
metrics = os.path.join(args["--out"], "metrics.json")
if mode == "ok":
    with open(metrics, "w") as handle:
        json.dump({"metric": "PVE", "value": 12.5, "higher_is_better": False}, handle)
elif mode == "fail":
    sys.stderr.write("x" * 5000 + "\nCUDA out of memory\n")
    sys.exit(3)
elif mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(state, "pids"), "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}")
    time.sleep(60)
elif mode != "none":
    with open(metrics, "w") as handle:
        handle.write(mode)
'''


def _canonical(seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical weights of a tiny ViT/14 (dim 32, depth 1, 56 px, no registers), random values."""
    model = DenseViT(embed_dim=32, depth=1, num_heads=2, reg_tokens=0, image_size=56)
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fake script, a data folder whose name needs quoting, an observation folder and a cache folder."""
    script = tmp_path / "fake_wrapper.py"
    script.write_text(FAKE)
    data = tmp_path / "data root; $HOME"
    (data / "images").mkdir(parents=True)
    (data / "images" / "0.jpg").write_bytes(b"jpg")
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("FAKE_STATE", str(state))
    return {"script": script, "data": data, "state": state, "cache": tmp_path / "cache"}


def _decoder(setup: dict[str, Path], mode: str = "ok", layout: str = "dune", extra: str = "",
             **kwargs) -> ExternalDecoder:
    """A decoder running the fake script in `mode`."""
    command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(setup['script']))} --encoder {{encoder}} "
               f"--format {{format}} --data {{data_root}} --split {{split}} --out {{out_dir}} --seed {{seed}}{extra}")
    return ExternalDecoder(command, layout, kwargs.pop("timeout_s", 20.0), env={"FAKE_MODE": mode}, **kwargs)


def _evaluate(setup: dict[str, Path], decoder: ExternalDecoder, canonical: dict[str, torch.Tensor] | None = None,
              seed: int = 0):
    """`evaluate` on the fixture's data and cache."""
    return evaluate(decoder, canonical or _canonical(), setup["data"], "val", seed, setup["cache"], "bedlam")


def _calls(setup: dict[str, Path]) -> int:
    """How many times the fake command ran."""
    path = setup["state"] / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _no_leftovers(setup: dict[str, Path]) -> None:
    """No temporary export or work folder is left in the cache."""
    args = json.loads((setup["state"] / "args.json").read_text())
    assert not Path(args["--encoder"]).exists()
    external = setup["cache"] / "external"
    assert not external.exists() or not [path for path in external.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_success_reads_metrics_and_exports_the_declared_layout(setup, layout):
    canonical = _canonical()
    result = _evaluate(setup, _decoder(setup, layout=layout), canonical)
    assert (result.metric, result.value, result.higher_is_better, result.cached) == ("PVE", 12.5, False, False)
    assert result.seconds > 0
    args = json.loads((setup["state"] / "args.json").read_text())
    assert (args["--format"], args["--split"], args["--seed"]) == (layout, "val", "0")
    assert args["--data"] == str(setup["data"])
    copy = setup["state"] / Path(args["--encoder"]).name
    assert read_release(copy).layout == layout
    loaded = load_canonical(copy)
    assert loaded.keys() == canonical.keys()
    assert all(torch.equal(loaded[key], canonical[key]) for key in canonical)
    _no_leftovers(setup)


def test_template_entries_are_kept_and_a_layout_mismatch_is_refused(setup, tmp_path):
    canonical = _canonical()
    template = tmp_path / "multihmr_release.pt"
    export(_canonical(seed=1), "multihmr", template)
    container = torch.load(template)
    container["model_state_dict"]["head.mlp.weight"] = torch.ones(3)
    torch.save(container, template)
    _evaluate(setup, _decoder(setup, layout="multihmr", template=str(template)), canonical)
    args = json.loads((setup["state"] / "args.json").read_text())
    written = torch.load(setup["state"] / Path(args["--encoder"]).name)["model_state_dict"]
    assert torch.equal(written["head.mlp.weight"], torch.ones(3))
    assert torch.equal(written["backbone.encoder.cls_token"], canonical["cls_token"])
    with pytest.raises(UserError, match="template=.*a multihmr release, but layout='dune'"):
        _evaluate(setup, _decoder(setup, layout="dune", template=str(template)), canonical)


def test_nonzero_exit_names_task_and_command_and_ends_with_the_stderr_tail(setup):
    decoder = _decoder(setup, mode="fail")
    with pytest.raises(ExternalDecoderError) as caught:
        _evaluate(setup, decoder)
    message = str(caught.value)
    assert "task 'bedlam'" in message and "exit status 3" in message and str(setup["script"]) in message
    assert message.rstrip().endswith("CUDA out of memory") and "x" * 2000 not in message
    _no_leftovers(setup)
    with pytest.raises(ExternalDecoderError):
        _evaluate(setup, decoder)
    assert _calls(setup) == 2  # a failure is not cached


@pytest.mark.parametrize("mode, reason", [
    ("none", "wrote no metrics.json"),
    ("{not json", "not valid JSON"),
    ('{"metric": "PVE", "value": "12", "higher_is_better": false}', "expected"),
    ('{"metric": "PVE", "value": 1.0}', "expected"),
    ('{"metric": "PVE", "value": NaN, "higher_is_better": false}', "non-finite value nan"),
    ('{"metric": "PVE", "value": Infinity, "higher_is_better": false}', "non-finite value inf"),
])
def test_missing_or_bad_metrics_raise(setup, mode, reason):
    with pytest.raises(ExternalDecoderError, match=reason):
        _evaluate(setup, _decoder(setup, mode=mode))
    _no_leftovers(setup)


def _gone(pid: int) -> bool:
    """True if no live process has `pid` (absent, or a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_timeout_kills_the_whole_process_group_and_removes_the_export(setup):
    start = time.monotonic()
    with pytest.raises(ExternalDecoderError, match="timed out after 1 s"):
        _evaluate(setup, _decoder(setup, mode="sleep", timeout_s=1.0))
    assert time.monotonic() - start < 3.0
    leader, child = map(int, (setup["state"] / "pids").read_text().split())
    deadline = time.monotonic() + 2.0
    while not (_gone(leader) and _gone(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(leader) and _gone(child)
    _no_leftovers(setup)


def test_cache_hit_runs_nothing_and_misses_on_any_input_change(setup):
    canonical = _canonical()
    first = _evaluate(setup, _decoder(setup), canonical)
    again = _evaluate(setup, _decoder(setup), {key: value.clone() for key, value in canonical.items()})
    assert again.cached and (again.metric, again.value, again.seconds) == (first.metric, first.value, first.seconds)
    assert _calls(setup) == 1
    changed = {**canonical, "norm.weight": canonical["norm.weight"] + 1}
    assert not _evaluate(setup, _decoder(setup), changed).cached
    assert _calls(setup) == 2
    assert not _evaluate(setup, _decoder(setup, extra=" --tag b"), canonical).cached
    assert _calls(setup) == 3
    assert not _evaluate(setup, _decoder(setup), canonical, seed=1).cached
    assert _calls(setup) == 4
    (setup["data"] / "images" / "1.jpg").write_bytes(b"jpg")
    assert not _evaluate(setup, _decoder(setup), canonical).cached
    assert _calls(setup) == 5
    assert _evaluate(setup, _decoder(setup, layout="dinov2"), canonical).cached is False
    assert _calls(setup) == 6


def test_a_command_that_cannot_start_is_a_failure(setup, tmp_path):
    decoder = ExternalDecoder(f"{tmp_path / 'absent-wrapper'} {{encoder}} {{out_dir}}", "dune", 5.0)
    with pytest.raises(ExternalDecoderError, match=r"cannot start it .*No such file[\s\S]*last stderr:\n\(empty\)"):
        _evaluate(setup, decoder)


def test_values_are_quoted_into_single_arguments():
    argv = command_argv("run --data {data_root} --out {out_dir}", {"data_root": "a b; rm -rf ~", "out_dir": "$X"})
    assert argv == ["run", "--data", "a b; rm -rf ~", "--out", "$X"]


@pytest.mark.parametrize("command, match", [
    ("run {encoder} {out_dir} {bogus}", r"unknown placeholder \{bogus\}"),
    ("run {encoder} {out_dir} {}", r"unknown placeholder \{\}"),
    ("run {encoder!r} {out_dir}", r"unknown placeholder \{encoder!r\}"),
    ("run {encoder:>9} {out_dir}", r"unknown placeholder \{encoder:>9\}"),
    ("run {out_dir}", r"lacks \{encoder\}"),
    ("run {encoder} {data_root}", r"lacks \{out_dir\}"),
    ("run {encoder} {out_dir", "literal brace"),
])
def test_bad_command_templates_are_refused_naming_the_option(command, match):
    with pytest.raises(UserError, match="option command=") as caught:
        ExternalDecoder(command, "dune", 10.0)
    assert caught.match(match)


def test_bad_layout_or_timeout_are_refused():
    with pytest.raises(UserError, match="option layout='timm'"):
        ExternalDecoder(MULTIHMR_COMMAND, "timm", 10.0)
    with pytest.raises(UserError, match="option timeout_s=0"):
        ExternalDecoder(MAST3R_COMMAND, "dune", 0)


def test_a_missing_data_root_is_refused(setup, tmp_path):
    with pytest.raises(UserError, match="data_root .* not found"):
        evaluate(_decoder(setup), _canonical(), tmp_path / "absent", "val", 0, setup["cache"], "bedlam")
