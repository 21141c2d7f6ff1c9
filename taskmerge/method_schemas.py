"""Hydra schemas of the merge methods, generated from each method's `HParam` table (the one source of names,
types, ranges and defaults); the default grids live only in `taskmerge/configs/method/<name>.yaml`.

A method's schema has `name`, one Optional field per hyperparameter (None: not fixed — searched when `search`
lists it, else the method's default) and `search`, whose fields are the candidate lists (None: not searched).
Ranges are checked on the composed config by `taskmerge.validation` against the same `HParam` table.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any, Optional

from taskmerge import merging


def method_schema(name: str) -> type:
    """The dataclass schema of merge method `name`, built from its `HParam` table."""
    hparams = merging.get_method(name).hparams
    title = "".join(part.capitalize() for part in name.split("_"))
    search = make_dataclass(f"{title}Search", [(k, Optional[list[h.annotation]], None) for k, h in hparams.items()])
    fields = [("name", str, name), *[(k, Optional[h.annotation], None) for k, h in hparams.items()],
              ("search", search, field(default_factory=search))]
    return make_dataclass(f"{title}Config", fields)


METHOD_SCHEMAS: dict[tuple[Optional[str], str], Any] = {("method", f"{name}_schema"): method_schema(name)
                                                        for name in merging.available()}
