"""One run, end to end (DESIGN.md): zoo → teacher features → candidates scored by TAP (and Eval) →
selection → decoders re-trained on the selected encoder → test metrics → outputs. No maths of its own.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from taskmerge import checkpoints, merging, plots, report, threads, validation
from taskmerge.cache import (atomic_write_json, content_key, read_json_entry, read_tensors_entry, read_text_entry,
                             write_json_entry, write_tensors_entry, write_text_entry)
from taskmerge.decoders import build_decoder
from taskmerge.distributed import Distributed
from taskmerge.selection import adamerging, evaluation, search
from taskmerge.selection.evaluation import DecoderProtocol
from taskmerge.selection.tap import base_tap, compute_tap, teacher_features
from taskmerge.settings import encoder_from_spec, get_setting
from taskmerge.tasks import SPLITS, Samples, Task
from taskmerge.tracking import CANDIDATES, CandidateLog, NullLogger, RunLogger, candidate_id, create_logger, run_directory_lock
from taskmerge.zoo import Zoo

REFERENCE_CACHE_VERSION = 2


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to `seconds[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class StageTimer:
    """Wall-clock seconds spent per named stage."""

    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Context manager adding the wall time of its block to `seconds[name]`; the run's threads are re-sized to
        its current share of the cores as each stage starts."""
        threads.rebalance()
        return _timed(self.seconds, name)


@dataclass
class Setting:
    """A loaded benchmark: its tasks, its zoo and how to instantiate its encoder."""

    tasks: list[Task]
    zoo: Zoo
    encoder_spec: dict[str, Any]
    device: torch.device
    merge_defaults: dict[str, Any] = field(default_factory=dict)
    # the setting's rule for what merging leaves undecided (e.g. LiDAR's BatchNorm statistics), applied to every merge
    post_merge: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def new_encoder(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        encoder = encoder_from_spec(self.encoder_spec)
        encoder.load_state_dict(encoder.encoder_weights(state_dict))
        return encoder.to(self.device).eval()

    def load_encoder(self, path: Path) -> nn.Module:
        return self.new_encoder(checkpoints.load_state_dict(path))

    def data_identity(self) -> dict[str, list[Any]]:
        """What cache keys hash for the tasks' data: every split's identity (bytes, or on-disk description)."""
        return {t.name: [t.splits[s].identity() for s in SPLITS] for t in self.tasks}

    @cached_property
    def geometry(self) -> tuple[int, int, tuple[int, int]]:
        """(embed_dim, patch_size, grid_size) of the encoder, from its spec (no weights read)."""
        encoder = encoder_from_spec(self.encoder_spec)
        return encoder.embed_dim, encoder.patch_size, tuple(encoder.grid_size)

    def load_head(self, task_name: str) -> nn.Module:
        """Task `task_name`'s decoder as fine-tuned with its encoder (frozen decoders, entropy AdaMerging)."""
        task = next(t for t in self.tasks if t.name == task_name)
        if task.head is not None:
            return task.head.to(self.device).eval()
        head = build_decoder(task.kind, self.geometry[0], task.num_outputs, *self.geometry[1:])
        head.load_state_dict(checkpoints.load_state_dict(self.zoo.heads[task_name]))
        return head.to(self.device).eval()


class CandidateMerger:
    """Merges the candidates of one method from the zoo's checkpoints, re-running the costly `prepare`
    only when the prepare-time hyperparameters change (grids order them slowest)."""

    def __init__(self, method: str, setting: Setting, timer: StageTimer) -> None:
        self.method, self._timer = method, timer
        self._sources = (setting.zoo.base, [setting.zoo.finetuned[t.name] for t in setting.tasks])
        self._post_merge = setting.post_merge
        known = merging.get_method(method).hparams if method in merging.available() else {}
        self._defaults = {k: v for k, v in setting.merge_defaults.items() if k in known}  # the setting's key rules
        if "device" in known:  # methods that can decompose on a GPU do so where the run computes, unless method.device says
            self._defaults["device"] = str(setting.device)
        self._fixed: dict[str, Any] | None = None
        self._prepared: merging.Prepared | None = None

    def __call__(self, hparams: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        fixed, swept = merging.split_hparams(self.method, {**self._defaults, **hparams})
        if self._prepared is None or fixed != self._fixed:
            with self._timer.stage("merge_prepare"):
                self._prepared = merging.prepare(self.method, *self._sources, **fixed)
            self._fixed = fixed
        merged = self._prepared.merge(**swept)
        return merged if self._post_merge is None else self._post_merge(merged)


ADAMERGING = "adamerging"


def adamerging_hparams(method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate identity of a learned merge: what was learned and how long."""
    return {k: method_cfg[k] for k in ("granularity", "loss", "iterations")}


class LearnedMerger:
    """The merger of a learned candidate (AdaMerging): returns the learned weights for its hyperparameters."""

    def __init__(self, method: str, hparams: Mapping[str, Any], merged: dict[str, torch.Tensor]) -> None:
        self.method, self._hparams, self._merged = method, dict(hparams), merged

    def __call__(self, hparams: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if dict(hparams) != self._hparams:
            raise ValueError(f"{self.method}: learned {self._hparams}, asked for {dict(hparams)}")
        return self._merged


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_setting(cfg: Mapping[str, Any], timer: StageTimer, distributed: Distributed = Distributed()) -> Setting:
    """Get the zoo (built once then reused, or converted once from a release) and the tasks of the configured
    setting; with several processes rank 0 builds or converts the zoo while the others wait."""
    plugin = get_setting(cfg["tasks"]["setting"])
    with timer.stage("zoo"):
        if not distributed.is_main:
            distributed.barrier()
        zoo = plugin.load_zoo(cfg)
        if distributed.is_main:
            distributed.barrier()
    tasks = plugin.build_tasks(cfg, zoo)
    post_merge = plugin.post_merge(cfg, zoo, tasks) if hasattr(plugin, "post_merge") else None
    return Setting(tasks=tasks, zoo=zoo, encoder_spec=dict(cfg["encoder"]), device=resolve_device(cfg["device"]),
                   merge_defaults=dict(plugin.MERGE_DEFAULTS), post_merge=post_merge)


def reference_metrics(setting: Setting, protocol: evaluation.EvalProtocol, cache_dir: Path,
                      distributed: Distributed = Distributed()) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of the base and of each fine-tuned encoder (on its own task), on val and test, with the
    same decoder protocol as the candidates (or the task's own `reference` scorer for the fine-tuned one); cached under
    a key of zoo, data, protocol and those scorers."""
    data = setting.data_identity()
    own_references = {t.name: t.reference.identity for t in setting.tasks if t.reference is not None}
    key = content_key("references", REFERENCE_CACHE_VERSION, setting.zoo.fingerprints(), data, type(protocol).__name__, vars(protocol),
                      Path(evaluation.__file__).read_text(), *([own_references] if own_references else []))
    path = Path(cache_dir) / "references" / f"{key[:32]}.json"
    distributed.barrier()
    cached = read_json_entry(path)
    if cached is not None:
        return cached
    base = setting.load_encoder(setting.zoo.base)
    splits = ("val", "test")
    part = {}
    for task in tqdm(distributed.shard(setting.tasks), desc="reference metrics", leave=False):
        finetuned = setting.load_encoder(setting.zoo.finetuned[task.name])
        own = (task.reference.score(finetuned, splits, protocol.for_task(task.name)) if task.reference is not None
               and isinstance(protocol, evaluation.DecoderProtocol) else evaluation.evaluate_task_splits(finetuned, task, splits, protocol))
        if isinstance(protocol, evaluation.FrozenHeadProtocol):
            frozen = own
        elif task.name in setting.zoo.heads:  # the fine-tuned model's own decoder, kept frozen (selector=frozen_decoder)
            frozen = {s: evaluation.evaluate_frozen(finetuned, task, setting.load_head(task.name), s, protocol) for s in splits}
        else:
            frozen = {s: math.nan for s in splits}
        part[task.name] = {"base": evaluation.evaluate_task_splits(base, task, splits, protocol),
                           "finetuned": own, "finetuned_frozen": frozen}
    gathered = distributed.gather_dict(part)
    result = {kind: {s: {t.name: gathered[t.name][kind][s] for t in setting.tasks} for s in splits}
              for kind in ("base", "finetuned", "finetuned_frozen")}
    if not distributed.is_main:
        return result
    write_json_entry(path, result)
    return result


def _method_space(method_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Split a method config into fixed hyperparameters (non-null values) and its search lists (non-null ones)."""
    reserved = {"name", "search"}
    fixed = {k: v for k, v in method_cfg.items() if k not in reserved and v is not None}
    return fixed, {k: v for k, v in (method_cfg.get("search") or {}).items() if v is not None}


def build_protocol(decoder_cfg: Mapping[str, Any], seed: int) -> evaluation.EvalProtocol:
    """`decoder=frozen_head` → the frozen heads as they are; any other decoder option → re-training."""
    if decoder_cfg["name"] == "frozen_head":
        return evaluation.FrozenHeadProtocol(feature_batch_size=decoder_cfg["batch_size"])
    return DecoderProtocol(**{k: v for k, v in decoder_cfg.items() if k != "name"}, seed=seed)


@dataclass
class Pipeline:
    """What scoring and finalizing share: the loaded setting, the decoder protocol, the reference metrics,
    one merger per method of the run and the stage timer."""

    cfg: Mapping[str, Any]
    setting: Setting
    protocol: evaluation.EvalProtocol
    refs: dict[str, Any]
    mergers: dict[str, CandidateMerger | LearnedMerger]
    timer: StageTimer
    distributed: Distributed = Distributed()



def method_configs(method_cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The method sections a run scores: its own, or for `method=auto` each candidate method's default option
    (its YAML's grid), in the order given."""
    if method_cfg["name"] != validation.AUTO:
        return {method_cfg["name"]: method_cfg}
    from taskmerge.loading import option_config

    return {name: option_config("method", name) for name in method_cfg["candidates"]}


def open_pipeline(cfg: Mapping[str, Any], timer: StageTimer, distributed: Distributed = Distributed()) -> Pipeline:
    """Load the setting (zoo built or reused) and the cached reference metrics for `cfg`."""
    protocol = build_protocol(cfg["decoder"], cfg["seed"])
    setting = load_setting(cfg, timer, distributed)
    with timer.stage("references"):
        refs = reference_metrics(setting, protocol, Path(cfg["paths"]["cache_dir"]), distributed)
    mergers: dict[str, CandidateMerger | LearnedMerger] = {name: CandidateMerger(name, setting, timer)
                                                          for name in method_configs(cfg["method"])}
    return Pipeline(cfg, setting, protocol, refs, mergers, timer, distributed)


def run_experiment(cfg: Mapping[str, Any], run_dir: Path, distributed: Distributed = Distributed()) -> dict[str, Any]:
    """Check the inputs, then run the configured pipeline in `run_dir` (locked by rank 0 against a second run)
    and return the selection summary (written there by rank 0)."""
    validation.check_run(cfg)
    threads.configure(cfg["threads"])
    run_dir = Path(run_dir)
    with run_directory_lock(run_dir) if distributed.is_main else nullcontext():
        return _run_pipeline(cfg, run_dir, distributed)


def _run_pipeline(cfg: Mapping[str, Any], run_dir: Path, distributed: Distributed) -> dict[str, Any]:
    timer, start = StageTimer(), time.perf_counter()
    method, selector = cfg["method"]["name"], cfg["selector"]["name"]
    strategies: dict[str, search.SearchStrategy] = {}
    for name, method_cfg in method_configs(cfg["method"]).items():
        if name == ADAMERGING:
            strategies[name] = search.GridSearch([adamerging_hparams(method_cfg)])
        else:
            fixed, space = _method_space(method_cfg)
            strategies[name] = search.build_strategy(cfg["search"], name, fixed, space, run_dir)
    pipeline = open_pipeline(cfg, timer, distributed)
    group = cfg["sweep_name"] or f"{cfg['tasks']['name']}-{method}"
    logger = create_logger(cfg["logger"], run_dir, cfg, group=group, job_type=selector) if distributed.is_main else NullLogger()
    try:
        if method == ADAMERGING:
            pipeline.mergers[ADAMERGING] = learn_adamerging(pipeline, run_dir)
        rows = [row for name, strategy in strategies.items()
                for row in _score_candidates(pipeline, name, strategy, selector, run_dir, logger)]
        return finalize(pipeline, rows, selector, run_dir, logger, start)
    finally:
        logger.finish()


def finalize(pipeline: Pipeline, rows: list[dict[str, Any]], selector: str, run_dir: Path, logger: RunLogger,
             start: float) -> dict[str, Any]:
    """Select among `rows`, re-train decoders on the pick, and write selection.json, report.md and plots."""
    timer, setting = pipeline.timer, pipeline.setting
    selection = _select_and_finalize(pipeline, selector, rows, run_dir)
    timer.seconds["total"] = time.perf_counter() - start
    selection["seconds"] = {k: round(v, 2) for k, v in timer.seconds.items()}
    if not pipeline.distributed.is_main:
        return selection
    atomic_write_json(run_dir / "selection.json", selection)
    images = {}
    if any(r.get("eval") for r in rows):
        metric_names = {t.name: t.metric_name for t in setting.tasks}
        tap_pick = search.pick_by_tap(rows, selection["tap_aggregate"], selection["tap_base"])
        eval_pick = search.pick_by_eval(rows)
        (run_dir / "plots").mkdir(exist_ok=True)
        images["tap_vs_eval"] = plots.plot_tap_vs_eval(rows, metric_names, tap_pick, eval_pick, run_dir / "plots" / "tap_vs_eval.png")
    report.write_report(run_dir / "report.md", pipeline.cfg, setting.tasks, rows, selection, pipeline.refs, images)
    report.print_summary(setting.tasks, selection, pipeline.refs)
    logger.log_summary(rows, selection, images)
    return selection


def learn_adamerging(pipeline: Pipeline, run_dir: Path) -> LearnedMerger:
    """Learn AdaMerging coefficients (or reuse those this run directory already learned with the same
    settings), save them as JSON and a plot, and return the learned merge."""
    cfg, setting, timer = pipeline.cfg, pipeline.setting, pipeline.timer
    method_cfg = cfg["method"]
    hparams = adamerging_hparams(method_cfg)
    options = [f.name for f in fields(adamerging.AdaMergingConfig) if f.name != "seed"]
    config = adamerging.AdaMergingConfig(**{k: method_cfg[k] for k in options}, seed=cfg["seed"])
    names = [t.name for t in setting.tasks]
    out = run_dir / "adamerging"
    key = content_key("adamerging", setting.zoo.key, setting.data_identity(), dict(method_cfg), cfg["seed"],
                      Path(adamerging.__file__).read_text())
    pipeline.distributed.barrier()
    if read_text_entry(out / "key.txt") == key and (learned := read_tensors_entry(out / "merged.safetensors")) is not None:
        return LearnedMerger(ADAMERGING, hparams, learned)
    base = checkpoints.load_state_dict(setting.zoo.base)
    encoder = setting.new_encoder(base)
    # λ is learned over the encoder's own weights (a release's text leftovers have no module to call)
    pretrained = encoder.encoder_weights(base)
    finetuned = [encoder.encoder_weights(checkpoints.load_state_dict(setting.zoo.finetuned[n])) for n in names]
    images = [t.unlabeled_images(min(method_cfg["n_images"], len(t.splits["train"])), cfg["seed"]) for t in setting.tasks]
    teachers, heads = None, None
    if config.loss == "tap":
        teachers = [teacher_features(setting.load_encoder, setting.zoo.finetuned[n], Samples.of(imgs), "tokens", setting.encoder_spec,
                                     Path(cfg["paths"]["cache_dir"])) for n, imgs in zip(names, images)]
    else:
        heads = adamerging.frozen_heads_or_error(names, [t.kind for t in setting.tasks], setting.load_head)
    with timer.stage("adamerging"):
        result = adamerging.learn(encoder, pretrained, finetuned, images, config, teachers, heads,
                                  pipeline.distributed)
    # λ was learned over the module's own weights; the rest of the pipeline (and `merged_encoder.safetensors`) works in
    # the zoo's key space, which `encoder_weights` maps to the module (e.g. the dense setting's cls/pos fold)
    encoder.load_state_dict(result.merged)
    merged = encoder.canonical_weights()
    if setting.post_merge is not None:
        merged = setting.post_merge(merged)
    if not pipeline.distributed.is_main:
        return LearnedMerger(ADAMERGING, hparams, merged)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.keys if config.granularity == "layer" else ["all"]
    atomic_write_json(out / "coefficients.json", {
        "tasks": names, "granularity": config.granularity, "loss": config.loss, "keys": rows,
        "coefficients": result.coefficients.tolist(), "losses": result.losses, "seconds": result.seconds,
    })
    plots.plot_coefficients(rows, result.coefficients.tolist(), names, out / "coefficients.png")
    write_tensors_entry(out / "merged.safetensors", merged)
    write_text_entry(out / "key.txt", key)  # last: the key vouches for the learned weights
    return LearnedMerger(ADAMERGING, hparams, merged)


def _score_candidates(pipeline: Pipeline, method: str, strategy: search.SearchStrategy, selector: str, run_dir: Path,
                      logger: RunLogger) -> list[dict[str, Any]]:
    """Score the candidates the search strategy proposes (TAP always, Eval for selector eval|both), resuming
    from `candidates.jsonl`. A candidate that fails (non-finite TAP, a diverging decoder, …) is recorded with
    its error and the sweep goes on."""
    cfg, setting, merger, protocol, refs, timer = (pipeline.cfg, pipeline.setting, pipeline.mergers[method], pipeline.protocol,
                                                   pipeline.refs, pipeline.timer)
    tap_cfg = cfg["tap"]
    needs_eval = selector in ("eval", "both", "frozen_decoder")
    heads = {t.name: setting.load_head(t.name) for t in setting.tasks} if selector == "frozen_decoder" else {}
    with timer.stage("teacher_features"):
        unlabeled = _unlabeled(pipeline)
        teachers = {
            t.name: teacher_features(setting.load_encoder, setting.zoo.finetuned[t.name], unlabeled[t.name],
                                     tap_cfg["features"], setting.encoder_spec, Path(cfg["paths"]["cache_dir"]), tap_cfg["batch_size"])
            for t in setting.tasks
        }
    base = tap_of_base(pipeline)
    measured = {k: v for k, v in tap_cfg.items() if k != "aggregate"}  # how TAP is aggregated changes no row
    run_key = content_key(setting.zoo.key, setting.data_identity(), measured, type(protocol).__name__, vars(protocol), method)
    log = CandidateLog(run_dir / CANDIDATES)
    done = {candidate_id(r["method"], r["hparams"]): r for r in log.rows()
            if r.get("run_key") == run_key and not r.get("error") and (r.get("eval") or not needs_eval)
            and (r.get("frozen") or not heads)}
    pipeline.distributed.barrier()  # every rank has read the log before rank 0 appends to it
    student: nn.Module | None = None
    rows: dict[str, dict[str, Any]] = {}
    for hparams in tqdm(strategy, desc=f"candidates ({method}, {strategy.name}, selector={selector})"):
        key = candidate_id(method, hparams)
        if key in done or key in rows:
            row = done.get(key) or rows[key]
            if key not in rows and pipeline.distributed.is_main:
                logger.log_candidate(row)  # a resumed run's W&B run holds every candidate, restored ones too
        else:
            seconds: dict[str, float] = {}
            row = {"method": method, "hparams": hparams}
            try:
                with _timed(seconds, "merge"):
                    merged = merger(hparams)
                    student = setting.new_encoder(merged) if student is None else student
                    student.load_state_dict(student.encoder_weights(merged))
                with _timed(seconds, "tap"):
                    row["tap"] = compute_tap(student, unlabeled, teachers, tap_cfg["features"], tap_cfg["distance"], tap_cfg["batch_size"])
                if not math.isfinite(row["tap"]["mean"]):
                    raise FloatingPointError(f"non-finite TAP {row['tap']}")
                if needs_eval:
                    with _timed(seconds, "eval"):
                        metrics = evaluation.evaluate_encoder(student, setting.tasks, "val", protocol, pipeline.distributed)
                    normalized = evaluation.normalize_scores(metrics, refs["finetuned"]["val"], setting.tasks)
                    row["eval"] = {**metrics, "normalized": normalized.pop("normalized")}
                    row["eval_normalized"] = normalized
                if heads:
                    with _timed(seconds, "frozen"):
                        frozen = {t.name: evaluation.evaluate_frozen(student, t, heads[t.name], "val", protocol) for t in setting.tasks}
                    row["frozen"] = {**frozen, "normalized": evaluation.normalize_scores(
                        frozen, refs["finetuned_frozen"]["val"], setting.tasks)["normalized"]}
            except (FloatingPointError, RuntimeError, ValueError) as error:
                row["error"] = f"{type(error).__name__}: {error}"
                tqdm.write(f"candidate {hparams} failed: {row['error']}")
            seconds["total"] = sum(seconds.values())
            row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
            row["run_key"] = run_key
            for name, value in seconds.items():
                if name != "total":
                    timer.seconds[f"candidates_{name}"] = timer.seconds.get(f"candidates_{name}", 0.0) + value
            if pipeline.distributed.is_main:
                log.append(row)
                logger.log_candidate(row)
        rows[key] = row
        strategy.report(hparams, _objective(row, selector, tap_cfg["aggregate"], base))
    return list(rows.values())


def _unlabeled(pipeline: Pipeline) -> dict[str, Samples]:
    """TAP's unlabeled samples of every task."""
    tap_cfg = pipeline.cfg["tap"]
    return {t.name: t.unlabeled(tap_cfg["n_samples"], tap_cfg["seed"]) for t in pipeline.setting.tasks}


def tap_of_base(pipeline: Pipeline) -> dict[str, float]:
    """TAP of the base encoder θ0 per task (computed once, cached): the scale of `tap.aggregate=relative_to_base`."""
    cfg, setting = pipeline.cfg, pipeline.setting
    tap_cfg = cfg["tap"]
    with pipeline.timer.stage("base_tap"):
        return base_tap(setting.load_encoder, setting.zoo.base, {t.name: setting.zoo.finetuned[t.name] for t in setting.tasks},
                        _unlabeled(pipeline), tap_cfg["features"], tap_cfg["distance"], setting.encoder_spec,
                        Path(cfg["paths"]["cache_dir"]), tap_cfg["batch_size"])


def _objective(row: Mapping[str, Any], selector: str, aggregate: str, base: Mapping[str, float]) -> float | None:
    """What a search minimises: the candidate's own TAP score (`search.tap_objective`; validation refuses the
    set-relative aggregations with an adaptive search), or minus mean normalized Eval for selector=eval; None if it
    failed."""
    if row.get("error"):
        return None
    if selector == "eval":
        return -row["eval"]["normalized"]
    return search.tap_objective(row, aggregate, base)


def _test_metrics(pipeline: Pipeline, merged: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Test metrics of the merged weights (`metrics`: per task and `normalized`) and the normalized score per task."""
    encoder = pipeline.setting.new_encoder(merged)
    tasks = pipeline.setting.tasks
    test = evaluation.evaluate_encoder(encoder, tasks, "test", pipeline.protocol, pipeline.distributed)
    normalized = evaluation.normalize_scores(test, pipeline.refs["finetuned"]["test"], tasks)
    return {"metrics": {**test, "normalized": normalized["normalized"]}, "per_task": {t.name: normalized[t.name] for t in tasks}}


def _select_and_finalize(pipeline: Pipeline, selector: str, rows: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """Pick the candidate, re-train decoders on it, evaluate on test and build `selection.json`."""
    cfg, setting, protocol, timer = pipeline.cfg, pipeline.setting, pipeline.protocol, pipeline.timer
    aggregate, base = cfg["tap"]["aggregate"], tap_of_base(pipeline)
    picks: dict[str, dict[str, Any]] = {}
    if selector in ("tap", "both", "frozen_decoder"):
        picks["tap"] = search.pick_by_tap(rows, aggregate, base)
    if selector in ("eval", "both", "frozen_decoder"):
        picks["eval"] = search.pick_by_eval(rows)
    if selector == "frozen_decoder":
        picks["frozen_decoder"] = search.pick_by_frozen(rows)
    selected = {by: row["hparams"] for by, row in picks.items()}
    final_by = "tap" if selector == "both" else selector
    final_row = picks[final_by]
    method, final_hparams = final_row["method"], final_row["hparams"]
    with timer.stage("final"):
        merged = pipeline.mergers[method](final_hparams)
        final = _test_metrics(pipeline, merged)
    if cfg["save_merged"] and pipeline.distributed.is_main:
        checkpoints.save_state_dict(run_dir / "merged_encoder.safetensors", merged, metadata={"method": method, "hparams": str(final_hparams)})
    selection: dict[str, Any] = {
        "method": method,
        "selector": selector,
        "selected": selected,
        "selected_methods": {by: row["method"] for by, row in picks.items()},
        "final_by": final_by,
        "selected_tap": final_row["tap"],
        "selected_tap_score": search.tap_objective(final_row, aggregate, base),
        "tap_aggregate": aggregate,
        "tap_base": base,
        "final": final.pop("metrics"),
        "final_normalized_per_task": final["per_task"],
        "normalization": "merged/fine-tuned for higher-is-better metrics, fine-tuned/merged for lower-is-better ones",
        "evaluation": ("the frozen heads of the release" if isinstance(protocol, evaluation.FrozenHeadProtocol)
                       else "decoders re-trained on each frozen encoder"),
        "failed_candidates": [{"hparams": r["hparams"], "error": r["error"]} for r in rows if r.get("error")],
    }
    if selector == "both" and picks["eval"] is not final_row:  # what choosing by Eval would have given on test
        with timer.stage("final"):
            eval_row = picks["eval"]
            selection["final_eval_pick"] = _test_metrics(pipeline, pipeline.mergers[eval_row["method"]](eval_row["hparams"]))["metrics"]
    if len(pipeline.mergers) > 1:  # method=auto: each method's own picks, side by side
        selection["per_method"] = search.per_method_picks(rows, aggregate, base)
    if selector in ("both", "frozen_decoder"):
        selection["agreement"] = search.agreement(rows, aggregate, base)
        selection["agreement_by_aggregate"] = search.agreement_by_aggregate(rows, base)
        selection["agreement_per_task"] = {t.name: search.task_agreement(rows, t.name) for t in setting.tasks}
        selection["cost"] = search.selector_cost(rows)
    if selector == "frozen_decoder":
        selection["frozen_agreement"] = search.frozen_agreement(rows)
    return selection
