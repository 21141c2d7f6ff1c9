"""Config options outside a Hydra run, and `taskmerge.load_encoder`: any release or merged-encoder file of any
setting as a ready `nn.Module`, for notebooks and acceptance checks, through the same options, readers and key
maps as a run.

An option is named as on the command line (`encoder=dune_vitb14`): its file under `configs/<group>/` merged onto
its schema, then the caller's overrides (`image_size=448`), each checked like a run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from taskmerge.config import SCHEMAS, schema_name
from taskmerge.errors import UserError
from taskmerge.settings import ENCODER_FAMILIES, encoder_from_spec, get_setting
from taskmerge.validation import check_fields

CONFIGS = Path(__file__).resolve().parent / "configs"


def options(group: str) -> list[str]:
    """The names accepted by `<group>=` (the option files under `configs/<group>/`)."""
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def option_config(group: str, name: str, **overrides: Any) -> dict[str, Any]:
    """The checked `<group>` section of option `name` (its file merged onto its schema) with `overrides` applied, as
    plain values: what `<group>=<name>` gives on the command line, outside a Hydra run."""
    path = CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"{group}={name!r} is not an option of config group {group!r}; available: {options(group)}")
    option = OmegaConf.load(path)
    parents = [entry.split("@")[0].lstrip("/") for entry in option.pop("defaults", []) if entry != "_self_"]
    schemas = {schema_name(g, n): node for (g, n), node in SCHEMAS.items()}
    node = OmegaConf.merge(*(OmegaConf.structured(schemas[parent]) for parent in parents), option)
    unknown = sorted(set(overrides) - set(node))
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for {group}={name}; expected some of {sorted(node)}")
    try:
        node = OmegaConf.merge(node, overrides)
    except OmegaConfBaseException as error:
        raise UserError(f"{group}.{error.full_key}: {error.msg}") from error
    check_fields(node, f"{group}.")
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def load_encoder(path: str | Path, encoder: str, **overrides: Any) -> nn.Module:
    """The encoder in `path` (any release layout its setting reads, or a run's `merged_encoder.safetensors`) built
    as `encoder=<encoder>` with `overrides` (e.g. `image_size=448`), in eval mode on the CPU; its
    `features(images, kind)` is the feature contract TAP uses."""
    spec = option_config("encoder", encoder, **overrides)
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"load_encoder: {path} is not a file")
    weights = get_setting(ENCODER_FAMILIES[spec["name"]]).read_weights(path)
    module = encoder_from_spec(spec)
    try:
        module.load_state_dict(module.encoder_weights(weights))
    except (KeyError, RuntimeError) as error:
        raise UserError(f"{path}: its weights do not fit encoder={encoder} with {overrides or 'its defaults'} ({error})") from error
    return module.eval()
