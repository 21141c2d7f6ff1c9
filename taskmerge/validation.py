"""Every user input of a run checked before any work: one `UserError` naming the option, the value and what
is expected.

Ranges come from one place each: a merge method's `HParam` table (fixed values and every value of its search
lists), and the `check` metadata of the other schemas' fields (`taskmerge.config.checked`). The setting's
own checks (task names, data and checkpoint files, encoder family) run last, still before the zoo is built.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from taskmerge import merging
from taskmerge.errors import UserError
from taskmerge.selection.aggregate import POINTWISE
from taskmerge.selection.evaluation import DecoderProtocol
from taskmerge.settings import get_setting

ADAMERGING = "adamerging"
AUTO = "auto"
SKIPPED_SECTIONS = ("hydra",)


def resolve(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checked config as plain values (enums as strings); `choices` (Hydra's group → option) words the
    errors as the user typed the options."""
    choices = dict(choices or {})
    _check_encoder_family(cfg, choices)
    sections = [k for k in cfg if k not in SKIPPED_SECTIONS]
    try:
        plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, sections), resolve=True, enum_to_str=True)
    except InterpolationResolutionError as error:
        raise UserError(f"{error.full_key}: {error.msg}") from error
    check_fields(cfg, "")
    check_run(plain)
    return plain  # type: ignore[return-value]


def _option(choices: Mapping[str, Any], group: str, cfg: Mapping[str, Any]) -> str:
    return f"{group}={choices.get(group, cfg[group].get('name'))}"


def _check_encoder_family(cfg: Mapping[str, Any], choices: Mapping[str, Any]) -> None:
    """The tasks' setting names the encoder family it needs (`tasks.encoder_family`); checked before the config
    is resolved, since a task option may refer to fields only its own encoders have."""
    needed, got = cfg["tasks"].get("encoder_family"), cfg["encoder"].get("name")
    if needed is not None and needed != got:
        raise UserError(f"{_option(choices, 'tasks', cfg)} needs an encoder of family {needed!r}, but "
                        f"{_option(choices, 'encoder', cfg)} is of family {got!r}: choose an encoder whose "
                        f"encoder.name is {needed!r}")


def check_fields(node: DictConfig, prefix: str) -> None:
    """Run the `check` of every schema field that declares one, recursively over the config tree."""
    schema = OmegaConf.get_type(node)
    checks = ({f.name: f.metadata["check"] for f in dataclasses.fields(schema) if "check" in f.metadata}
              if dataclasses.is_dataclass(schema) else {})
    for key in node:
        if prefix == "" and key in SKIPPED_SECTIONS:
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            check_fields(value, f"{prefix}{key}.")
        elif key in checks and not checks[key].check(value):
            raise UserError(f"{prefix}{key}={value!r} is invalid; expected {checks[key].expected}")


def check_run(cfg: Mapping[str, Any]) -> None:
    """Checks on the resolved config: encoder family, the method's hyperparameters, the task list, the device,
    the setting's inputs."""
    _check_encoder_family(cfg, {})
    check_method(cfg["method"])
    check_task_names(cfg["tasks"]["names"])
    check_device(cfg["device"])
    check_tap_aggregate(cfg)
    check_decoder_protocol(cfg)
    if cfg["method"]["name"] == AUTO and cfg["search"]["name"] != "grid":
        raise UserError(f"method=auto scores every candidate method's default grid; expected search=grid, got "
                        f"search={cfg['search']['name']}")
    get_setting(cfg["tasks"]["setting"]).check_inputs(cfg)  # cheap: every rank runs it, no rank waits for a failed one


def check_decoder_protocol(cfg: Mapping[str, Any]) -> None:
    """`decoder.per_task` names tasks of the setting (a protocol may cover tasks a subset leaves out) and protocol
    fields with valid values; every task's head (global or its own) is one its setting offers (`DECODER_HEADS`)."""
    decoder, names = cfg["decoder"], list(cfg["tasks"]["names"])
    if "per_task" not in decoder:
        return  # a protocol that trains nothing (frozen heads)
    offered = get_setting(cfg["tasks"]["setting"]).DECODER_HEADS
    protocol_fields = {f.name: f for f in dataclasses.fields(DecoderProtocol) if f.name not in ("per_task", "seed")}
    for task, overrides in decoder["per_task"].items():
        if task not in names and task not in offered:
            raise UserError(f"decoder.per_task.{task}: {task!r} is not in tasks.names={names}")
        for key, value in overrides.items():
            option = f"decoder.per_task.{task}.{key}"
            if key not in protocol_fields:
                raise UserError(f"{option} is not a decoder protocol field; expected some of {sorted(protocol_fields)}")
            check = protocol_fields[key].metadata.get("check")
            if check is not None and not check.check(value):
                raise UserError(f"{option}={value!r} is invalid; expected {check.expected}")
    for task in names:
        head = decoder["per_task"].get(task, {}).get("head", decoder["head"])
        if head is not None and head not in offered.get(task, ()):
            option = "decoder.head" if "head" not in decoder["per_task"].get(task, {}) else f"decoder.per_task.{task}.head"
            choices = f"one of {list(offered[task])}" if task in offered else "null: this task has a single decoder"
            raise UserError(f"{option}={head!r} is invalid for task {task!r}; expected {choices}")


def check_method(method_cfg: Mapping[str, Any]) -> None:
    """A known method whose fixed values and every searched value pass its `HParam` checks."""
    name = method_cfg["name"]
    if name == ADAMERGING:
        return  # its options are schema fields with their own checks
    if name == AUTO:
        _check_auto(method_cfg["candidates"])
        return
    try:
        cls = merging.get_method(name)
    except KeyError as error:
        raise UserError(f"method={name}: unknown merge method; available: {merging.available() + [ADAMERGING, AUTO]}") from error
    hparams = cls.hparams
    search = dict(method_cfg.get("search") or {})
    for key, value in method_cfg.items():
        if key in ("name", "search") or value is None:
            continue
        _check_hparam(name, hparams, f"method.{key}", key, value)
    for key, values in search.items():
        if values is None or method_cfg.get(key) is not None:
            continue  # not searched, or a fixed value wins over the search list
        if not isinstance(values, list) or not values:
            raise UserError(f"method.search.{key}={values!r} is invalid; expected a non-empty list of candidate values")
        for value in values:
            _check_hparam(name, hparams, f"method.search.{key}", key, value)


def _check_auto(candidates: list[str]) -> None:
    """`method.candidates`: distinct searched merge methods, each with a valid default option (its grid)."""
    from taskmerge.loading import option_config  # loading reads options through this module's field checks

    searched = merging.available()
    if not candidates or len(set(candidates)) != len(candidates) or any(c not in searched for c in candidates):
        raise UserError(f"method.candidates={candidates} is invalid for method=auto; expected distinct merge methods "
                        f"from {searched} (AdaMerging learns its merge: run it as method=adamerging)")
    for candidate in candidates:
        check_method(option_config("method", candidate))


def _check_hparam(method: str, hparams: Mapping[str, merging.HParam], option: str, key: str, value: Any) -> None:
    if key not in hparams:
        raise UserError(f"{option}: method={method} has no hyperparameter {key!r}; known: {sorted(hparams)}")
    if not hparams[key].check(value):
        raise UserError(f"{option}={value!r} is invalid for method={method}; expected {hparams[key].expected}")


def check_tap_aggregate(cfg: Mapping[str, Any]) -> None:
    """An adaptive search steers by each candidate's own score, which a TAP aggregation relative to the whole
    candidate set does not give."""
    aggregate = cfg["tap"]["aggregate"]
    if cfg["search"]["name"] == "optuna" and cfg["selector"]["name"] != "eval" and aggregate not in POINTWISE:
        raise UserError(f"tap.aggregate={aggregate} scores a candidate against the whole candidate set, which search=optuna "
                        f"does not have while it steers; expected tap.aggregate={'|'.join(POINTWISE)} with search=optuna, "
                        f"or search=grid|random")


def check_task_names(names: Any) -> None:
    """At least one task, each named once (which names exist is the setting's check)."""
    if not isinstance(names, list) or not names:
        raise UserError(f"tasks.names={names!r} is invalid; expected a non-empty list of task names")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UserError(f"tasks.names={names} names {repeated} more than once; each task may appear once")


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str) -> None:
    """`auto`, or a torch device of a known type that this machine has."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"device={name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from error
    if device.type not in DEVICE_TYPES:
        raise UserError(f"device={name!r} is not supported; expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={name}: torch sees no CUDA device on this machine; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise UserError(f"device={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name}: MPS is not available on this machine; use device=cpu or device=auto")
