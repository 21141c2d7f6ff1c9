"""Entry point: `python -m taskmerge.select SWEEP_DIR [--selector tap|eval|both]`.

Gathers the candidate rows of every job of a Hydra multirun (each job directory holds its
`candidates.jsonl` and `.hydra/config.yaml`), selects among them, re-trains the decoders on the pick
and writes `selection.json`, `report.md` and plots into SWEEP_DIR: the same outputs, and the same
selection, as an in-process search over the same candidates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from taskmerge.tracking import CANDIDATES, CandidateLog, candidate_id, create_logger


def gather(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The resolved config of the sweep's jobs and their candidate rows (one per candidate).

    Every job must share one run key (same zoo, TAP settings, decoder protocol and method): rows of
    different experiments are never mixed, and the error names the job directories that differ.
    """
    logs = sorted(p for p in Path(sweep_dir).rglob(CANDIDATES) if (p.parent / ".hydra" / "config.yaml").is_file())
    if not logs:
        raise FileNotFoundError(f"{sweep_dir}: no job directory with {CANDIDATES} and .hydra/config.yaml")
    by_key: dict[str, list[Path]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for log in logs:
        for row in CandidateLog(log).rows():
            by_key.setdefault(row["run_key"], []).append(log.parent)
            rows.setdefault(candidate_id(row["method"], row["hparams"]), row)
    if len(by_key) > 1:
        listing = "; ".join(f"{key[:12]}: {sorted({str(p) for p in dirs})}" for key, dirs in by_key.items())
        raise ValueError(f"{sweep_dir}: jobs belong to different experiments (run keys {listing})")
    config = OmegaConf.to_container(OmegaConf.load(logs[0].parent / ".hydra" / "config.yaml"), resolve=True)
    return config, list(rows.values())


def select_sweep(sweep_dir: Path, selector: str | None = None) -> dict[str, Any]:
    """Select among the rows of a multirun sweep and write the outputs into `sweep_dir`."""
    from taskmerge.experiment import StageTimer, finalize, open_pipeline

    start = time.perf_counter()
    cfg, rows = gather(sweep_dir)
    selector = selector or cfg["selector"]["name"]
    cfg["selector"]["name"] = selector
    pipeline = open_pipeline(cfg, StageTimer())
    logger = create_logger(cfg["logger"], Path(sweep_dir), cfg, group=Path(sweep_dir).name, job_type=f"select-{selector}")
    try:
        return finalize(pipeline, rows, selector, Path(sweep_dir), logger, start)
    finally:
        logger.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m taskmerge.select", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    parser.add_argument("--selector", choices=["tap", "eval", "both"], default=None,
                        help="default: the selector of the sweep's jobs")
    args = parser.parse_args(argv)
    selection = select_sweep(args.sweep_dir, args.selector)
    print(json.dumps({"selected": selection["selected"], "final": selection["final"]}, indent=2))


if __name__ == "__main__":
    main()
