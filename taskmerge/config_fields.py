"""Schema fields that carry a range check (run on the composed config before any work by
`taskmerge.validation`), shared by the generic schemas, the settings' schemas and the dataclasses that
components take (a component's dataclass is the one source its schema is generated from, `schema_from`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any, Callable, Sequence

from taskmerge.merging import HParam
from taskmerge.merging._helpers import int_at_least, number_in


def checked(default: Any, check: Callable[[Any], bool], expected: str) -> Any:
    """A schema field with a range check, run on the composed config before any work
    (`taskmerge.validation`); `expected` words the error."""
    return field(default=default, metadata={"check": HParam(default, check, expected)})


def count(default: int, low: int = 1) -> Any:
    """An integer field that must be at least `low`."""
    return checked(default, int_at_least(low), f"an integer >= {low}")


def positive(default: float) -> Any:
    """A finite number field that must be > 0 (learning rates)."""
    return checked(default, number_in(0, float("inf"), low_open=True, high_open=True), "a finite number > 0")


def non_negative(default: float) -> Any:
    """A finite number field that must be >= 0 (weight decay)."""
    return checked(default, number_in(0, float("inf"), high_open=True), "a finite number >= 0")


def schema_from(source: type, name: str, drop: Sequence[str] = (), extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A Hydra schema generated from a component's dataclass: a `name` field, then `source`'s fields (types,
    defaults and checks) except `drop` (values the run supplies, e.g. `seed`), then `extra` fields."""
    types = typing.get_type_hints(source)  # the real types, not the strings postponed annotations leave
    fields = [("name", str, name)]
    for f in dataclasses.fields(source):
        if f.name not in drop:
            default = {"default": f.default} if f.default_factory is dataclasses.MISSING else {"default_factory": f.default_factory}
            fields.append((f.name, types[f.name], field(**default, metadata=f.metadata)))
    return dataclasses.make_dataclass(f"{source.__name__}Schema", [*fields, *extra])
