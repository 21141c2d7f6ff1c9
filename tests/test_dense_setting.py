"""The dense setting end to end: `tasks=dune4` on tiny DUNE-format releases and generated data trees, two tasks
with in-framework decoders (ADE20k, NYUd) and two through external commands (BEDLAM, MapFree)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dense_trees import write_dense_trees
from taskmerge.config import register_configs, to_plain
from taskmerge.errors import UserError
from taskmerge.experiment import run_experiment
from taskmerge.settings.dense.decoders import build_dense_decoder
from taskmerge.settings.dense.encoder import CONFIGS, DenseViT
from taskmerge.settings.dense.releases import export, load_canonical
from taskmerge.settings.dense.setting import feature_spec

TINY = dict(embed_dim=32, depth=2, num_heads=2, reg_tokens=4, image_size=56, native_size=56)
FAKE_DECODER = '''import hashlib, json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
digest = hashlib.sha256(open(args["--encoder"], "rb").read()).hexdigest()
with open(args["--out"] + "/metrics.json", "w") as handle:
    json.dump({"metric": "score", "value": int(digest[:8], 16) / 2**32, "higher_is_better": True}, handle)
'''


def _compose(*overrides: str) -> dict:
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        return to_plain(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def dune_release(tmp_path_factory) -> dict:
    """Generated data trees and a tiny base + four fine-tuned encoders saved as DUNE `{model, args, iter}` files."""
    root = tmp_path_factory.mktemp("dune")
    data = root / "data"
    write_dense_trees(data, 10, 4, 6, 5)
    torch.manual_seed(0)
    base = DenseViT(**TINY).canonical_weights()
    paths = {"base": export(base, "dune", root / "base.pth")}
    for i, name in enumerate(["ade20k", "nyud", "bedlam", "mapfree"]):
        generator = torch.Generator().manual_seed(i + 1)
        moved = {k: v + 0.02 * v.abs().mean() * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        paths[name] = export(moved, "dune", root / f"{name}.pth")
    script = root / "fake_decoder.py"
    script.write_text(FAKE_DECODER)
    command = f"{sys.executable} {script} --encoder {{encoder}} --out {{out_dir}} --split {{split}} --data {{data_root}}"
    return {"data": data, "paths": paths, "command": command}


def _config(release: dict, cache: Path, *overrides: str) -> dict:
    cfg = _compose("tasks=dune4", *[f"encoder.{k}={v}" for k, v in TINY.items()], f"paths.data={release['data']}",
                   "logger=none", "device=cpu", "decoder.epochs=2", "decoder.batch_size=4", "tap.n_samples=3",
                   "tasks.num_workers=0", "tasks.val_fraction=0.25",
                   *([] if any(o.startswith("method=") for o in overrides) else ["method.search.alpha=[0.3,0.8]"]), *overrides)
    cfg["paths"]["cache_dir"] = str(cache)
    cfg["tasks"]["base"] = str(release["paths"]["base"])
    cfg["tasks"]["finetuned"] = {n: str(release["paths"][n]) for n in cfg["tasks"]["names"]}
    external = {"command": release["command"], "layout": "dune", "timeout_s": 60, "metric": "score", "higher_is_better": True}
    cfg["tasks"]["external"] = {n: dict(external) for n in ("bedlam", "mapfree") if n in cfg["tasks"]["names"]}
    return cfg


def test_dune4_end_to_end_with_in_framework_and_external_decoders(dune_release, tmp_path):
    run_dir = tmp_path / "run"
    selection = run_experiment(_config(dune_release, tmp_path / "cache"), run_dir)
    rows = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    assert [r["hparams"] for r in rows] == [{"alpha": 0.3}, {"alpha": 0.8}] and not any(r.get("error") for r in rows)
    assert all(set(r["tap"]) == {"ade20k", "nyud", "bedlam", "mapfree", "mean"} for r in rows)
    final = selection["final"]
    assert 0 <= final["ade20k"] <= 100 and 0 < final["nyud"] < 10 and all(math.isfinite(final[t]) for t in ("bedlam", "mapfree"))
    assert len(list((tmp_path / "cache" / "dense_release").glob("*.safetensors"))) == 5, "releases converted once each"
    assert list((tmp_path / "cache" / "external").glob("*.json")), "external results are cached"


def test_merged_encoder_exports_compute_the_same_function(dune_release):
    canonical = load_canonical(dune_release["paths"]["ade20k"])
    encoder = DenseViT(**TINY)
    encoder.load_state_dict(encoder.encoder_weights(canonical))
    again = DenseViT(**TINY)
    again.load_state_dict(again.encoder_weights(encoder.canonical_weights()))
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(encoder.features(images, "tokens"), again.features(images, "tokens"), atol=1e-6)


def test_adamerging_tap_learns_in_the_folded_space_and_saves_canonical_weights(dune_release, tmp_path):
    """AdaMerging-TAP (Tab. 3/4) learns λ over the module's folded weights and hands the pipeline canonical weights:
    the saved merged encoder reloads through `encoder_weights` into the function that was learned."""
    run_dir = tmp_path / "run"
    cfg = _config(dune_release, tmp_path / "cache", "method=adamerging", "method.iterations=3", "method.batch_size=2",
                  "method.n_images=4", "tasks.names=[ade20k,nyud]", "save_merged=true")
    selection = run_experiment(cfg, run_dir)
    merged = load_canonical(run_dir / "merged_encoder.safetensors")
    assert "register_tokens" in merged and "reg_token" not in merged and merged["pos_embed"].shape[1] == 1 + 16
    assert torch.equal(merged["pos_embed"][:, 0], torch.zeros_like(merged["pos_embed"][:, 0]))
    coefficients = json.loads((run_dir / "adamerging" / "coefficients.json").read_text())
    assert "pos_embed" in coefficients["keys"] and "cls_token" in coefficients["keys"], "λ per folded module weight"
    assert math.isfinite(selection["final"]["normalized"])


def test_full_protocol_trains_dpt_for_nyud_and_features_per_step_equal_cached_ones(dune_release, tmp_path, monkeypatch):
    """`decoder=dense_full`: NYUd's decoder is the DPT head with its own optimiser settings; a train split too large to
    cache is fed per step through the frozen encoder and gives the very same decoder as cached features."""
    from taskmerge.experiment import build_protocol
    from taskmerge.selection.evaluation import evaluate_task_splits
    from taskmerge.settings.dense import setting as dense

    cfg = _config(dune_release, tmp_path / "cache", "decoder=dense_full", "decoder.epochs=1", "decoder.per_task.nyud.epochs=1",
                  "tasks.names=[ade20k,nyud]")
    protocol = build_protocol(cfg["decoder"], cfg["seed"])
    assert protocol.for_task("nyud").head == "dpt" and protocol.for_task("nyud").lr == 1e-4 and protocol.for_task("ade20k").head is None
    zoo = dense.load_zoo(cfg)
    tasks = {t.name: t for t in dense.build_tasks(cfg, zoo)}
    encoder = DenseViT(**TINY).eval()
    encoder.load_state_dict(encoder.encoder_weights(load_canonical(zoo.base)))
    built = []
    monkeypatch.setattr(dense, "build_dense_decoder", lambda *a: built.append(a[0]) or build_dense_decoder(*a))
    cached = evaluate_task_splits(encoder, tasks["nyud"], ("val",), protocol)
    monkeypatch.setattr(dense, "FEATURE_CACHE_BYTES", 0)
    per_step = evaluate_task_splits(encoder, tasks["nyud"], ("val",), protocol)
    assert built == ["dpt", "dpt"] and math.isfinite(cached["val"]) and per_step == cached


def test_missing_releases_and_decoders_are_named_before_any_work(dune_release, tmp_path):
    cfg = _config(dune_release, tmp_path / "cache")
    cfg["tasks"]["finetuned"]["nyud"] = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match=r"tasks.finetuned.nyud=.*nope.pth"):
        run_experiment(cfg, tmp_path / "run")
    cfg = _config(dune_release, tmp_path / "cache")
    cfg["tasks"]["external"] = {}
    with pytest.raises(UserError, match=r"task 'bedlam' has no in-framework decoder: set tasks.external.bedlam.command"):
        run_experiment(cfg, tmp_path / "run")
    cfg = _config(dune_release, tmp_path / "cache")
    cfg["tasks"]["external"]["bedlam"]["timeout"] = 5
    with pytest.raises(UserError, match=r"tasks.external.bedlam=.*unknown keys \['timeout'\]"):
        run_experiment(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="position grid is 4x4 \\(56 px\\).*encoder.native_size=56"):
        run_experiment(_config(dune_release, tmp_path / "cache", "encoder.native_size=448"), tmp_path / "run2")
    with pytest.raises(UserError, match=r"decoder.per_task.ade20k.head='dpt' is invalid for task 'ade20k'; expected one of \['linear_seg'\]"):
        run_experiment(_config(dune_release, tmp_path / "cache", "+decoder.per_task.ade20k.head=dpt"), tmp_path / "run")
    with pytest.raises(UserError, match=r"decoder.head='dpt' is invalid for task 'bedlam'; expected null: this task has a single"):
        run_experiment(_config(dune_release, tmp_path / "cache", "decoder.head=dpt", "tasks.names=[nyud,bedlam]"), tmp_path / "run")
    with pytest.raises(UserError, match=r"decoder.per_task.nyud.lr=-1.0 is invalid; expected"):
        run_experiment(_config(dune_release, tmp_path / "cache", "+decoder.per_task.nyud.lr=-1.0"), tmp_path / "run")
    with pytest.raises(UserError, match=r"decoder.per_task.kitti: 'kitti' is not in tasks.names"):
        run_experiment(_config(dune_release, tmp_path / "cache", "+decoder.per_task.kitti.epochs=1"), tmp_path / "run")
    with pytest.raises(UserError, match="method.loss=entropy needs frozen classification heads.*method.loss=tap"):
        run_experiment(_config(dune_release, tmp_path / "cache", "method=adamerging", "method.loss=entropy"), tmp_path / "run")
    assert not (tmp_path / "run" / "candidates.jsonl").exists()


def test_encoder_options_equal_the_named_architectures():
    for name, config in CONFIGS.items():
        option = OmegaConf.load(Path(__file__).resolve().parents[1] / "taskmerge" / "configs" / "encoder" / f"{name}.yaml")
        assert (option.embed_dim, option.depth, option.num_heads, option.reg_tokens, option.interpolation, option.native_size) == (
            config.embed_dim, config.depth, config.num_heads, config.reg_tokens, config.interpolation, config.native_size)


def test_feature_specs_keep_their_relative_depth():
    assert feature_spec("dpt", 12)["layers"] == [2, 5, 8, 11] and feature_spec("dpt", 4)["layers"] == [0, 1, 2, 3]
    assert feature_spec("linear_seg", 2)["layers"] == [1]


@pytest.mark.slow
def test_dense_demo_is_a_real_merging_problem(tmp_path):
    """`experiment=dense_demo` end to end (about 2.5 minutes on 2 cores): base < merged < fine-tuned on average."""
    cfg = _compose("experiment=dense_demo", "logger=none")
    cfg["paths"]["cache_dir"] = str(tmp_path / "cache")
    selection = run_experiment(cfg, tmp_path / "run")
    refs = json.loads(next((tmp_path / "cache" / "references").glob("*.json")).read_text())
    base = refs["base"]["test"]
    base_normalized = sum(min(base[t], refs["finetuned"]["test"][t]) / max(base[t], refs["finetuned"]["test"][t])
                          for t in ("ade20k", "nyud")) / 2  # ADE ↑ and NYU ↓: the smaller over the larger
    assert base_normalized < selection["final"]["normalized"] < 1.0
    assert selection["agreement"]["n_candidates"] == 5


@pytest.mark.parametrize("recipe, encoder, jobs", [("dune_table3", "dune_vitb14", 6), ("dinov2_table4", "dinov2_vitb14", 6),
                                                   ("dune_subsets", "dune_vitb14", 20)])
def test_paper_recipes_compose_sweep_and_name_their_files(recipe, encoder, jobs, tmp_path):
    """The Tab. 3 / Tab. 4 / Fig. 7 recipes: the full protocol (DPT for NYUd), TAP selection, their multirun sweeps,
    release files under paths.checkpoints, and a named error when that root is not set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from taskmerge.settings.dense.setting import check_inputs

    data = tmp_path / "data"
    write_dense_trees(data, 2, 1, 2, 2)
    overrides = [f"experiment={recipe}", f"paths.checkpoints={tmp_path}", f"paths.data={data}",
                 *[f"+tasks.external.{n}.command='run {{encoder}} {{out_dir}}'" for n in ("bedlam", "mapfree")]]
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        raw = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    cfg = to_plain(OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]))
    assert cfg["decoder"]["name"] == "dense_full" and cfg["decoder"]["per_task"]["nyud"]["head"] == "dpt"
    assert cfg["selector"]["name"] == "tap" and cfg["encoder"] == _compose("tasks=dune4", f"encoder={encoder}")["encoder"]
    sweep = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in raw.hydra.sweeper.params.items()])
    assert math.prod(len(list(o.sweep_iterator())) for o in sweep) == jobs
    with pytest.raises(UserError, match=rf"dense release file\(s\) missing: tasks.base={cfg['tasks']['base']}; "):
        check_inputs(cfg)
    cfg["tasks"]["checkpoints"] = None
    with pytest.raises(UserError, match=r"tasks.base=.*base.pth is a relative path but tasks.checkpoints is not set: pass paths.checkpoints"):
        check_inputs(cfg)
