"""External decoders (spec dense §4, "Plug-ins"): tasks whose decoder lives in another codebase (Multi-HMR for
BEDLAM, MASt3R for MapFree; non-commercial code, never vendored) are evaluated by a user command.

The framework exports the merged encoder in a declared release layout to a private temporary folder, runs the
command (no shell: the template is split with `shlex` after each value is shell-quoted into it) in its own
process group with a timeout, and reads `{out_dir}/metrics.json` = `{"metric", "value", "higher_is_better"}`.
Any failure raises `ExternalDecoderError` naming the task and the command and ending with the tail of the
command's stderr, so the pipeline marks the candidate failed with a useful message. Results are cached as
checksummed JSON entries under `cache_dir/external/`, keyed by the encoder's tensors (not the exported bytes),
the command template, layout, release template, environment, data identity and seed.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from taskmerge.cache import content_key, read_json_entry, write_json_entry
from taskmerge.checkpoints import fingerprint, temporary_dir
from taskmerge.errors import UserError
from taskmerge.settings.dense.releases import LAYOUTS, export, read_release

PLACEHOLDERS: tuple[str, ...] = ("encoder", "format", "data_root", "split", "out_dir", "seed")
REQUIRED_PLACEHOLDERS: tuple[str, ...] = ("encoder", "out_dir")
STDERR_TAIL = 2000
_SUFFIXES = {"dune": ".pth", "dinov2": ".pth", "multihmr": ".pt", "safetensors": ".safetensors"}
_KEY_VERSION = "external-decoder-v1"

MULTIHMR_COMMAND = ("python /path/to/multihmr_eval_wrapper.py --encoder {encoder} --format {format} "
                    "--data {data_root} --split {split} --out {out_dir} --seed {seed}")
"""Ready-to-edit command for BEDLAM with Multi-HMR (use with `layout="multihmr"` and, as `template`, the Multi-HMR
release the task's head comes from, e.g. `multiHMR_896_L.pt`).

The wrapper, run with Multi-HMR's own Python environment (its code, `smplx`, `roma`, the SMPL-X files), must:
load `--encoder` (a Multi-HMR checkpoint: `model_state_dict` with the encoder under `backbone.encoder.`; with a
template, the template's head and every other entry are kept, so the file loads as a whole Multi-HMR model;
without one, it holds the encoder only and the head must be loaded from the wrapper's own release); evaluate
`--split` of the BEDLAM data under `--data` with `--seed`; write `--out/metrics.json` as
`{"metric": "PVE", "value": <float>, "higher_is_better": false}`; exit non-zero on any failure, with the reason
on stderr. Placeholders are substituted already quoted: never put them inside quotes."""

MAST3R_COMMAND = ("python /path/to/mast3r_mapfree_eval_wrapper.py --encoder {encoder} --format {format} "
                  "--data {data_root} --split {split} --out {out_dir} --seed {seed}")
"""Ready-to-edit command for MapFree with MASt3R (use with `layout="dune"` and, optionally, the DUNE encoder
release as `template`, which keeps its projectors, `args` and `iter`).

The wrapper, run with MASt3R's own Python environment, must: build the MASt3R model from its own decoder
checkpoint (e.g. DUNE's `*_mast3r.pth`: the model string is stored in it), replace its encoder with the
`encoder.*` weights of the DUNE release `--encoder` (images at 518, normalised as MASt3R expects); evaluate
`--split` of MapFree under `--data` with `--seed`; write `--out/metrics.json` as
`{"metric": "<name>", "value": <float>, "higher_is_better": <bool>}`; exit non-zero on any failure, with the
reason on stderr. Placeholders are substituted already quoted: never put them inside quotes."""


class ExternalDecoderError(RuntimeError):
    """An external decoder command that failed, timed out or wrote no valid metrics; names task and command."""


@dataclass(frozen=True)
class ExternalDecoder:
    """A user command evaluating an exported encoder, with the release layout it reads and its time limit."""

    command: str
    layout: str = "dune"  # DUNE's own decoders (Multi-HMR, MASt3R) read the DUNE dict
    timeout_s: float = 6 * 3600.0
    template: str | None = None  # a release file of `layout` to export into (its other entries are kept)
    env: Mapping[str, str] = field(default_factory=dict)  # set over the inherited environment

    def __post_init__(self) -> None:
        """Refuse an unknown layout, a non-positive timeout or a bad command template, naming the option."""
        if self.layout not in LAYOUTS:
            raise UserError(f"external decoder option layout={self.layout!r}: expected one of {LAYOUTS}")
        if not self.timeout_s > 0:
            raise UserError(f"external decoder option timeout_s={self.timeout_s!r}: expected a positive number "
                            "of seconds")
        _check_command(self.command)


@dataclass(frozen=True)
class ExternalResult:
    """What an external decoder reported; `seconds` the command ran (the original run's on a cache hit)."""

    metric: str
    value: float
    higher_is_better: bool
    seconds: float
    cached: bool


def _check_command(command: str) -> None:
    """Refuse unknown, positional or formatted placeholders and a template lacking `{encoder}` or `{out_dir}`."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(command)
                  if name is not None]
    except ValueError as error:
        raise UserError(f"external decoder option command={command!r}: {error} (write a literal brace as "
                        "{{ or }})") from error
    for name, spec, conversion in fields:
        if name not in PLACEHOLDERS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(f"external decoder option command={command!r}: unknown placeholder {shown}; "
                            f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    missing = [name for name in REQUIRED_PLACEHOLDERS if name not in {f[0] for f in fields}]
    if missing:
        raise UserError(f"external decoder option command={command!r}: lacks "
                        f"{', '.join('{' + m + '}' for m in missing)}; the command must read the exported encoder "
                        "and write {out_dir}/metrics.json")


def command_argv(command: str, values: Mapping[str, Any]) -> list[str]:
    """The argument list of a command template with each value shell-quoted into it, then split by `shlex`."""
    return shlex.split(command.format(**{name: shlex.quote(str(value)) for name, value in values.items()}))


def data_fingerprint(data_root: str | Path) -> list[list[Any]]:
    """Cheap identity of a data folder: sorted relative names, sizes and mtimes of its top two levels."""
    root = Path(data_root)
    if not root.exists():
        raise UserError(f"external decoder data_root {str(root)!r}: not found")
    rows: list[list[Any]] = []
    for entry in _entries(root):
        rows.append(_stat_row(root, entry))
        if entry.is_dir():
            rows.extend(_stat_row(root, child) for child in _entries(entry))
    return sorted(rows)


def _entries(folder: Path) -> list[Path]:
    """The entries of a folder (none for a file or an unreadable folder)."""
    try:
        return list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return []


def _stat_row(root: Path, path: Path) -> list[Any]:
    """[relative name, size, mtime in ns] of a path (sizes -1 for a broken link)."""
    try:
        stat = path.stat()
    except OSError:
        return [str(path.relative_to(root)), -1, -1]
    return [str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns]


def cache_key(decoder: ExternalDecoder, tensors_hash: str, data_root: str | Path, split: str, seed: int) -> str:
    """Key of an external result: encoder tensors, command, layout, release template, env, data identity, seed."""
    template = fingerprint(decoder.template) if decoder.template is not None else None
    data = [str(Path(data_root).resolve()), split, data_fingerprint(data_root)]
    return content_key(_KEY_VERSION, tensors_hash, decoder.command, decoder.layout, template, dict(decoder.env),
                       data, seed)


def evaluate(decoder: ExternalDecoder, canonical_state_dict: Mapping[str, torch.Tensor], data_root: str | Path,
             split: str, seed: int, cache_dir: str | Path, name: str) -> ExternalResult:
    """Metric of the canonical encoder on task `name` by the external command, from the cache when present;
    raises ExternalDecoderError when the command fails, times out or writes no valid metrics (not cached)."""
    cpu = {key: value.detach().cpu() for key, value in canonical_state_dict.items()}
    entry = Path(cache_dir) / "external" / f"{cache_key(decoder, content_key(cpu), data_root, split, seed)}.json"
    cached = read_json_entry(entry)
    if cached is not None:
        return ExternalResult(**cached, cached=True)
    result = _run(decoder, cpu, data_root, split, seed, entry, name)
    write_json_entry(entry, {"metric": result.metric, "value": result.value,
                             "higher_is_better": result.higher_is_better, "seconds": result.seconds})
    return result


def _run(decoder: ExternalDecoder, canonical: Mapping[str, torch.Tensor], data_root: str | Path, split: str,
         seed: int, beside: Path, name: str) -> ExternalResult:
    """Export into a temporary folder beside the cache entry, run the command there, read its metrics."""
    release = read_release(decoder.template) if decoder.template is not None else None
    if release is not None and release.layout != decoder.layout:
        raise UserError(f"external decoder option template={decoder.template!r}: a {release.layout} release, "
                        f"but layout={decoder.layout!r}")
    with temporary_dir(beside) as work:
        encoder = export(canonical, decoder.layout, work / f"encoder{_SUFFIXES[decoder.layout]}", release)
        out_dir = work / "out"
        out_dir.mkdir()
        values = {"encoder": encoder, "format": decoder.layout, "data_root": data_root, "split": split,
                  "out_dir": out_dir, "seed": seed}
        argv = command_argv(decoder.command, values)
        start = time.monotonic()
        failure = _execute(argv, decoder, work / "stderr.log")
        seconds = time.monotonic() - start
        failure, metrics = (failure, {}) if failure else _read_metrics(out_dir / "metrics.json")
        if failure is not None:
            raise ExternalDecoderError(f"external decoder for task {name!r} failed: {failure}\ncommand: "
                                       f"{shlex.join(argv)}\nlast stderr:\n{_tail(work / 'stderr.log')}")
    return ExternalResult(metrics["metric"], float(metrics["value"]), metrics["higher_is_better"], seconds, False)


def _execute(argv: list[str], decoder: ExternalDecoder, stderr_path: Path) -> str | None:
    """Run `argv` in its own process group, stderr to a file; None on success, else why it failed. The whole
    group is killed on leaving (a timeout, an interrupt, or children left behind by a finished command)."""
    with stderr_path.open("wb") as stderr:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env={**os.environ, **decoder.env}, start_new_session=True)
        except OSError as error:
            return f"cannot start it ({error})"
        try:
            code = process.wait(timeout=decoder.timeout_s)
        except subprocess.TimeoutExpired:
            return f"timed out after {decoder.timeout_s:g} s (its process group was killed)"
        finally:
            _kill_group(process)
    return None if code == 0 else f"exit status {code}"


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group led by `process` (if any member is left) and reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _read_metrics(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(None, metrics) for a valid `metrics.json`, else (what is wrong with it, {})."""
    expected = 'expected {"metric": str, "value": finite number, "higher_is_better": bool}'
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return f"it wrote no {path.name} in {{out_dir}}", {}
    except (OSError, ValueError) as error:
        return f"its {path.name} is not valid JSON ({error}); {expected}", {}
    if not (isinstance(metrics, dict) and isinstance(metrics.get("metric"), str) and metrics["metric"]
            and isinstance(metrics.get("value"), (int, float)) and not isinstance(metrics["value"], bool)
            and isinstance(metrics.get("higher_is_better"), bool)):
        return f"its {path.name} holds {json.dumps(metrics)[:300]}; {expected}", {}
    if not math.isfinite(metrics["value"]):
        return f"its {path.name} reports a non-finite value {metrics['value']!r} for {metrics['metric']!r}", {}
    return None, metrics


def _tail(path: Path) -> str:
    """The last `STDERR_TAIL` characters of a log file ('(empty)' if none)."""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4 * STDERR_TAIL))
        text = handle.read().decode(errors="replace")
    return text[-STDERR_TAIL:] if text.strip() else "(empty)"
