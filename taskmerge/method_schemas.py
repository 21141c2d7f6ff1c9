"""Typed Hydra schemas of the merge-method options beyond `ta`/`average` (`taskmerge/configs/method/*.yaml`).

Convention (as `TAConfig`): every hyperparameter is Optional and None means "not fixed" — it is searched when
`search` lists it, otherwise the method's default applies. `search` holds the candidate lists whose product is
the grid. Prepare-time hyperparameters (k, agg, beta/gamma of breadcrumbs, p, eta, base, …) may be searched too;
each distinct combination of them needs its own `merging.prepare(...)` (see `taskmerge.merging`).

omegaconf structured configs have no Union types: hyperparameters that are "a number or a list" (`tall_lambda`)
are typed `Any`. `METHOD_SCHEMAS` maps (group, schema name) to the dataclass, ready to merge into `config.SCHEMAS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def _grid(start: float, stop: float, step: float) -> list[float]:
    """[start, start+step, …, stop] rounded to 2 decimals (the values written in the YAML files)."""
    count = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 2) for i in range(count)]


# ---------------------------------------------------------------------------------------------- TIES


@dataclass
class TiesSearch:
    k: list[float] = field(default_factory=lambda: [20.0])
    alpha: list[float] = field(default_factory=lambda: _grid(0.1, 1.5, 0.1))


@dataclass
class TiesConfig:
    """TIES-Merging: keep `k` % per task (global trim), elect sign, disjoint `agg`; θ0 + alpha·merged."""

    name: str = "ties"
    k: Optional[float] = None
    agg: Optional[str] = None
    alpha: Optional[float] = None
    search: TiesSearch = field(default_factory=TiesSearch)


# ---------------------------------------------------------------------------------------- Breadcrumbs


@dataclass
class BreadcrumbsSearch:
    alpha: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    beta: list[float] = field(default_factory=lambda: [0.1, 0.2])
    gamma: list[float] = field(default_factory=lambda: [0.01, 0.1])


@dataclass
class BreadcrumbsConfig:
    """Model Breadcrumbs: per row drop the top `gamma`, keep the next `beta`; θ0 + alpha·Σ."""

    name: str = "breadcrumbs"
    beta: Optional[float] = None
    gamma: Optional[float] = None
    alpha: Optional[float] = None
    search: BreadcrumbsSearch = field(default_factory=BreadcrumbsSearch)


# ---------------------------------------------------------------------------------------------- DARE


@dataclass
class DareSearch:
    p: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    alpha: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])


@dataclass
class DareConfig:
    """DARE: drop with probability `p`, rescale by 1/(1−p), then `base` (ta | ties with `k`, `agg`)."""

    name: str = "dare"
    p: Optional[float] = None
    base: Optional[str] = None
    seed: Optional[int] = None
    k: Optional[float] = None
    agg: Optional[str] = None
    alpha: Optional[float] = None
    search: DareSearch = field(default_factory=DareSearch)


# ----------------------------------------------------------------------------------------- Consensus


@dataclass
class ConsensusSearch:
    alpha: list[float] = field(default_factory=lambda: _grid(0.1, 1.0, 0.1))


@dataclass
class ConsensusConfig:
    """Consensus merging: τ_MTL (`base` ta | ties) kept where ≥ `min_agree` TALL masks (λ = `tall_lambda`) agree."""

    name: str = "consensus"
    tall_lambda: Any = None  # a number or a per-task list
    min_agree: Optional[int] = None
    base: Optional[str] = None
    alpha: Optional[float] = None
    search: ConsensusSearch = field(default_factory=ConsensusSearch)


# ------------------------------------------------------------------------------ TSV-M, Iso-C, Iso-CTS


def _svd_alphas() -> list[float]:
    return _grid(0.2, 3.0, 0.2)


@dataclass
class SVDSearch:
    alpha: list[float] = field(default_factory=_svd_alphas)


@dataclass
class TSVConfig:
    """TSV-M: top-(`fraction`, default 1/T) singular components per task, orthogonalised; θ0 + alpha·Δ."""

    name: str = "tsv"
    alpha: Optional[float] = None
    fraction: Optional[float] = None
    exclude: Optional[str] = None
    search: SVDSearch = field(default_factory=SVDSearch)


@dataclass
class IsoCConfig:
    """Iso-C: the task-vector sum with a flat spectrum; θ0 + alpha·Δ."""

    name: str = "iso_c"
    alpha: Optional[float] = None
    exclude: Optional[str] = None
    search: SVDSearch = field(default_factory=SVDSearch)


@dataclass
class IsoCTSConfig:
    """Iso-CTS: common (`common_fraction` of the rank) + task-specific subspaces, flat spectrum; θ0 + alpha·Δ."""

    name: str = "iso_cts"
    alpha: Optional[float] = None
    common_fraction: Optional[float] = None
    exclude: Optional[str] = None
    search: SVDSearch = field(default_factory=SVDSearch)


# ---------------------------------------------------------------------------------------------- STAR


@dataclass
class StarSearch:
    eta: list[float] = field(default_factory=lambda: [20.0, 40.0, 60.0])
    alpha: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class StarConfig:
    """STAR: per task truncate each matrix to `eta` % of its nuclear norm and rescale; average; θ0 + alpha·Δ."""

    name: str = "star"
    eta: Optional[float] = None
    alpha: Optional[float] = None
    exclude: Optional[str] = None
    search: StarSearch = field(default_factory=StarSearch)


# --------------------------------------------------------------------------------------------- LiNeS


@dataclass
class LinesSearch:
    beta: list[float] = field(default_factory=lambda: _grid(0.1, 1.0, 0.1))


@dataclass
class LinesConfig:
    """LiNeS: θ0 + (alpha + beta·ℓ/(L−1))·Δ_base per block ℓ; alpha None = (‖Στ‖₁/‖Δ‖₁)/T."""

    name: str = "lines"
    base: Optional[str] = None
    beta: Optional[float] = None
    alpha: Optional[float] = None
    num_blocks: Optional[int] = None
    k: Optional[float] = None
    agg: Optional[str] = None
    tall_lambda: Any = None  # consensus base: a number or a per-task list
    min_agree: Optional[int] = None
    search: LinesSearch = field(default_factory=LinesSearch)


# ------------------------------------------------------------------------------------------- NormAvg


@dataclass
class NormAvgSearch:
    alpha: list[float] = field(default_factory=lambda: _grid(0.2, 2.0, 0.2))


@dataclass
class NormAvgConfig:
    """Norm-equalised averaging: every τ_t rescaled to the smallest norm, averaged; θ0 + alpha·mean."""

    name: str = "normavg"
    alpha: Optional[float] = None
    search: NormAvgSearch = field(default_factory=NormAvgSearch)


METHOD_SCHEMAS: dict[tuple[Optional[str], str], Any] = {
    ("method", "ties_schema"): TiesConfig,
    ("method", "breadcrumbs_schema"): BreadcrumbsConfig,
    ("method", "dare_schema"): DareConfig,
    ("method", "consensus_schema"): ConsensusConfig,
    ("method", "tsv_schema"): TSVConfig,
    ("method", "iso_c_schema"): IsoCConfig,
    ("method", "iso_cts_schema"): IsoCTSConfig,
    ("method", "star_schema"): StarConfig,
    ("method", "lines_schema"): LinesConfig,
    ("method", "normavg_schema"): NormAvgConfig,
}
