"""Two processes under torchrun (gloo on the CPU): decoders and AdaMerging split by task, rank 0 writes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*args: str) -> None:
    _run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
         "-m", "taskmerge.run", *args)


def test_two_ranks_give_the_single_process_results(tmp_path, cache_dir):
    common = [*TINY_OVERRIDES, "selector=both", "method.search.alpha=[0.2,0.6,1.0]"]
    _run("-m", "taskmerge.run", *common, f"hydra.run.dir={tmp_path / 'warm'}")  # zoo and references cached
    _torchrun(*common, f"hydra.run.dir={tmp_path / 'ranks'}")
    _run("-m", "taskmerge.run", *common, f"hydra.run.dir={tmp_path / 'single'}")

    def load(name):
        rows = [json.loads(line) for line in (tmp_path / name / "candidates.jsonl").read_text().splitlines()]
        return rows, json.loads((tmp_path / name / "selection.json").read_text())

    (ranks, selection), (single, reference) = load("ranks"), load("single")
    assert len(ranks) == 3, "rank 0 alone writes candidate rows"
    for a, b in zip(ranks, single):
        assert a["hparams"] == b["hparams"] and a["tap"] == pytest.approx(b["tap"], rel=1e-6)
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-6)  # thread counts differ: rounding only
    assert selection["selected"] == reference["selected"]
    assert selection["final"] == pytest.approx(reference["final"], rel=1e-6)


def test_adamerging_on_two_ranks(tmp_path, cache_dir):
    run_dir = tmp_path / "ada"
    _torchrun(*TINY_OVERRIDES, "method=adamerging", "method.iterations=5", f"hydra.run.dir={run_dir}")
    learned = json.loads((run_dir / "adamerging" / "coefficients.json").read_text())
    assert len(learned["losses"]) == 5 and len(learned["coefficients"][0]) == 4
    assert len((run_dir / "candidates.jsonl").read_text().splitlines()) == 1
