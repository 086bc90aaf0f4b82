"""Learning from past experiments: read a table of runs, fit the physics, cross-validate, seed a campaign.

The flow, one function per step::

    read_runs(path, preset)      CSV / Parquet -> Runs: canonical columns and units, every cell checked
    fit_runs(runs, model)        -> FitResult: per stage, physics parameters (MAP + Laplace) and a GP
                                    residual; cross_validate compares physics only, GP only, physics + GP
    seed_campaign(result, DIR)   DIR/prior.toml (the preset with the fitted priors) + a new campaign

Two stages, fitted when the data hold them (SCIENCE.md section 3: fit the droplet stage directly
when the rig measures droplets):

* **supraparticle**: concentration, flow ratio, temperature -> SP diameter and polydispersity, with
  :func:`supraopt.surrogate.size_gp` / :func:`~supraopt.surrogate.pdi_gp` (droplet law + mass balance).
* **droplet**: flow ratio and, where present, capillary number, orifice width, channel aspect
  ratio and temperature -> droplet diameter, with the log-linear law
  ``d_drop = k * w * r^-a * Ca^b * (h/w)^c * exp(b_T * (T - T_ref) / 10)``. Only the columns that
  are present and vary enter. When the droplet law is the preset's own (flow ratio and
  temperature only, the preset's nozzle), its posterior becomes the SP stage's prior for the
  droplet parameters: then SP sizes identify the packing fraction separately.

The physics parameters of the size laws enter linearly on the log scale, so their Laplace
posterior from :meth:`~supraopt.surrogate.PhysicsGP.parameter_posterior` is exact (given the GP
residual's hyperparameters); for the polydispersity law it is a Gauss-Newton approximation.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gpytorch
import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from supraopt import physics
from supraopt.campaign import MIN_PDI_PCT, Campaign
from supraopt.errors import InputError
from supraopt.physics import PhysicsFn, Preset
from supraopt.records import PARAMETERS
from supraopt.space import SearchSpace
from supraopt.spec import SPEC_FILE, preset_path, read_toml
from supraopt.surrogate import (
    DEFAULT_N_PARTICLES,
    PDI_RESIDUAL,
    SIZE_RESIDUAL,
    FeasibilityModel,
    PhysicsGP,
    ResidualPrior,
    pdi_noise_var,
    size_noise_var,
)

Array = npt.NDArray[np.float64]
Convert = Callable[[Array, float], Array]
"""Values in a unit -> values in the canonical unit, given the preset's NC density (g/cm³)."""

PRIOR_FILE = "prior.toml"
TRANSFER_FLOOR = 0.5
"""A seeded campaign's prior sd is at least this fraction of the preset's: another day, another chip."""
Z90 = 1.6448536269514722
MODELS = ("physics only", "GP only", "physics + GP")

DROPLET_RESIDUAL = ResidualPrior(sd=0.15, noise_sd=0.1)
"""Droplet stage: regime changes (dripping -> jetting) move sizes by tens of percent, and published
data sets pool devices whose differences the columns do not hold: a broad prior on the extra noise."""
DROPLET_NOISE_SD = 0.02
"""Relative error of one measured mean droplet diameter (image analysis)."""
DROPLET_TERMS = {
    "flow_ratio": "droplet_exponent_a",
    "capillary_number": "capillary_exponent_b",
    "aspect_ratio": "aspect_exponent_c",
    "temperature_c": "droplet_temp_per_10c",
}
"""Droplet-law input -> its parameter (orifice width enters as ``w``, without a parameter)."""
UNKNOWN_DEVICE_LOG_K_SD = 3.0
"""Prior sd of ln k for droplet-only data without an orifice width: the preset's nozzle says nothing then."""
DROPLET_PRIORS = {"capillary_exponent_b": (-0.2, 0.1), "aspect_exponent_c": (0.0, 0.3)}
"""Priors of the droplet-law terms the presets do not carry (SCIENCE.md section 3)."""


# --- fields, units and column detection ---------------------------------------------------------


def _scale(factor: float) -> Convert:
    return lambda v, rho: v * factor


@dataclass(frozen=True)
class Field:
    """One quantity supraopt reads from a table, the units it accepts and the values it believes."""

    column: str
    """Canonical name: the column inside supraopt, its unit in the name."""
    short: str
    """What a user types in ``--map`` and ``--unit``."""
    label: str
    unit: str
    """Canonical unit, for messages and plots ('' when dimensionless)."""
    aliases: tuple[str, ...]
    """Header names (lower case, letters and digits only) recognised automatically."""
    units: Mapping[str, tuple[tuple[str, ...], Convert]]
    """Unit -> (spellings, conversion to the canonical unit); the first unit is the default."""
    low: float = 0.0
    high: float = math.inf
    """Plausible range in the canonical unit (open interval)."""


_MICRONS = ("um", "micron", "microns", "micrometer", "micrometre")
_FLOW_UNITS: dict[str, tuple[tuple[str, ...], Convert]] = {
    "uL/min": (("ul/min",), _scale(1.0)),
    "uL/h": (("ul/h", "ul/hr"), _scale(1 / 60)),
    "mL/h": (("ml/h", "ml/hr"), _scale(1000 / 60)),
    "mL/min": (("ml/min",), _scale(1000.0)),
    "nL/min": (("nl/min",), _scale(1e-3)),
    "uL/s": (("ul/s",), _scale(60.0)),
    "nL/s": (("nl/s",), _scale(0.06)),
}
_NUMBER: dict[str, tuple[tuple[str, ...], Convert]] = {"1": (("1", "-", "–"), _scale(1.0))}

FIELDS: tuple[Field, ...] = (
    Field(
        "concentration_mg_ml", "concentration", "NC concentration", "mg/mL",
        ("concentration", "conc", "c", "ncconcentration", "cnc", "loading", "phi", "phii", "phi0", "volumefraction"),
        {
            "mg/mL": (("mg/ml", "g/l", "mg/cm3", "kg/m3"), _scale(1.0)),
            "vol%": (("vol%", "%", "v/v%", "%v/v", "pct"), lambda v, rho: v * rho * 10.0),
            "fraction": (("fraction", "volfraction", "v/v"), lambda v, rho: v * rho * 1000.0),
        },
        high=2000.0,
    ),
    Field(
        "flow_ratio", "flow_ratio", "flow-rate ratio Q_c/Q_d", "",
        ("flowratio", "flowrateratio", "ratio", "r", "qcqd", "qratio", "qoilqwater", "qdqc", "qwaterqoil"),
        {
            "Qc/Qd": (("qc/qd", "q_c/q_d", "qoil/qwater", "qcontinuous/qdispersed", "oil/water"), _scale(1.0)),
            "Qd/Qc": (("qd/qc", "q_d/q_c", "qwater/qoil", "qdispersed/qcontinuous", "water/oil"), lambda v, rho: 1 / v),
        },
        high=1e4,
    ),
    Field(
        "q_continuous", "q_continuous", "continuous-phase flow rate", "µL/min",
        ("qc", "qcontinuous", "continuousflow", "continuousflowrate", "qoil", "oilflow", "oilflowrate", "qcarrier"),
        _FLOW_UNITS,
    ),
    Field(
        "q_dispersed", "q_dispersed", "dispersed-phase flow rate", "µL/min",
        ("qd", "qdispersed", "dispersedflow", "dispersedflowrate", "qwater", "waterflow", "waterflowrate", "qnc"),
        _FLOW_UNITS,
    ),
    Field(
        "temperature_c", "temperature", "temperature", "°C",
        ("temperature", "temp", "t", "coiltemperature", "collectiontemperature", "tcoil"),
        {"C": (("c", "degc", "celsius"), _scale(1.0)), "K": (("k", "kelvin"), lambda v, rho: v - 273.15)},
        low=-100.0,
        high=400.0,
    ),
    Field(
        "diameter_nm", "diameter", "SP diameter", "nm",
        ("diameter", "spdiameter", "spsize", "size", "meandiameter", "dsp", "particlesize", "supraparticlediameter"),
        {"nm": (("nm",), _scale(1.0)), "um": (_MICRONS, _scale(1000.0))},
        low=1.0,
        high=1e7,
    ),
    Field(
        "pdi_pct", "pdi", "polydispersity (CV)", "%",
        ("pdi", "cv", "polydispersity", "spcv", "sizecv", "dispersity", "cvdiameter"),
        {
            "%": (("%", "pct", "percent"), _scale(1.0)),
            "fraction": (("fraction",), _scale(100.0)),
            "dls": (("dls", "dlspdi"), lambda v, rho: 100.0 * np.sqrt(v)),
        },
        low=-1e-9,
        high=200.0,
    ),
    Field(
        "n_particles", "n_particles", "number of particles sized", "",
        ("nparticles", "n", "count", "nsized", "particlessized", "numberofparticles"),
        {"count": (("count",), _scale(1.0))},
        low=1.5,
    ),
    Field(
        "droplet_um", "droplet", "droplet diameter", "µm",
        ("droplet", "dropletdiameter", "dropletsize", "ddrop", "ddroplet", "dropsize", "dropdiameter", "dw", "ddropw"),
        {
            "um": (_MICRONS, _scale(1.0)),
            "nm": (("nm",), _scale(1e-3)),
            "mm": (("mm",), _scale(1e3)),
            "d/w": (("d/w",), _scale(1.0)),  # times the orifice width, applied in read_runs
        },
        high=1e5,
    ),
    Field("failed", "failed", "failure reason", "", ("failed", "failure", "fail", "failurereason"), {}),
    Field(
        "capillary_number", "capillary_number", "capillary number Ca", "",
        ("ca", "capillarynumber", "capillary", "caoil", "cacontinuous"), _NUMBER, high=1e3,
    ),
    Field(
        "orifice_width_um", "orifice_width", "orifice width", "µm",
        ("orificewidth", "orifice", "orificesize", "w", "wor", "nozzle", "nozzlewidth", "nozzlesize"),
        {"um": (_MICRONS, _scale(1.0)), "mm": (("mm",), _scale(1e3)), "nm": (("nm",), _scale(1e-3))},
        high=1e5,
    ),
    Field(
        "aspect_ratio", "aspect_ratio", "channel aspect ratio h/w", "",
        ("aspectratio", "aspect", "ar", "hw", "heightwidth", "channelaspectratio"), _NUMBER, high=1e3,
    ),
)  # fmt: skip
BY_NAME = {name: f for f in FIELDS for name in (f.column, f.short)}
IMPLIED_UNITS = {
    ("concentration_mg_ml", "phi"): "fraction",
    ("concentration_mg_ml", "phii"): "fraction",
    ("concentration_mg_ml", "phi0"): "fraction",
    ("concentration_mg_ml", "volumefraction"): "fraction",
    ("flow_ratio", "qdqc"): "Qd/Qc",
    ("flow_ratio", "qwaterqoil"): "Qd/Qc",
    ("droplet_um", "dw"): "d/w",
    ("droplet_um", "ddropw"): "d/w",
}
"""Header names that say their unit: 'phi_i' is a volume fraction, 'Qd/Qc' the inverse ratio."""
SP_INPUTS = PARAMETERS
DROPLET_INPUTS = ("flow_ratio", "capillary_number", "orifice_width_um", "aspect_ratio", "temperature_c")


def _name_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("µ", "u").replace("μ", "u"))


def _unit_key(text: str) -> str:
    text = text.lower().replace("µ", "u").replace("μ", "u").replace("°", "").replace("³", "3")
    return re.sub(r"\s+", "", text)


def _split_header(header: str) -> tuple[str, str | None]:
    """'SP size (µm)' -> ('SP size', 'µm'); a header without brackets has no unit part."""
    match = re.match(r"^(.*?)[\s_]*[(\[]([^)\]]*)[)\]]\s*$", header)
    return (match.group(1), match.group(2)) if match else (header, None)


def _unit_of(field: Field, spelled: str) -> str | None:
    key = _unit_key(spelled)
    return next((unit for unit, (spellings, _) in field.units.items() if key in spellings or key == unit.lower()), None)


def _detect(field: Field, header: str) -> tuple[bool, str | None]:
    """Whether a header names this field, and the unit it states (None: not stated)."""
    name, unit = _split_header(header)
    key = _name_key(name)
    if key == _name_key(field.column) and unit is None:
        return True, next(iter(field.units), None)
    if key in field.aliases:
        return True, unit if unit is not None else IMPLIED_UNITS.get((field.column, key))
    if unit is None:  # 'diameter_nm', 'T_K', 'droplet_um': the unit glued to the name
        for alias in field.aliases:
            for known, (spellings, _) in field.units.items():
                if any(key == alias + _name_key(s) for s in spellings if _name_key(s)):
                    return True, known
    return False, None


def field_named(name: str) -> Field:
    """The field a user means by ``name`` (short or canonical name, any case, '-' or '_')."""
    field = BY_NAME.get(name.strip().lower().replace("-", "_"))
    if field is None:
        known = ", ".join(f.short for f in FIELDS)
        raise InputError(f"unknown field {name!r}: use one of {known}.")
    return field


def parse_pairs(items: Iterable[str], option: str) -> dict[str, str]:
    """``['diameter=SP size (um)', ...]`` from ``--map`` / ``--unit`` -> {canonical field: value}."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"{option} {item!r} must look like FIELD=VALUE, e.g. {option} diameter=um.")
        pairs[field_named(name).column] = value.strip()
    return pairs


# --- reading runs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """Past runs in canonical columns and units; one row per run, 'row' is its row in the file."""

    frame: pd.DataFrame
    source: str
    mapping: dict[str, tuple[str, str]]
    """Canonical field -> (column in the file, unit it was read in)."""
    notes: tuple[str, ...]

    @property
    def has_sp(self) -> bool:
        return "diameter_nm" in self.frame

    @property
    def has_droplets(self) -> bool:
        return "droplet_um" in self.frame

    def ok(self) -> pd.DataFrame:
        """Runs that gave a result (no failure reason)."""
        return self.frame[self.frame["failed"] == ""]


def read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """A CSV (any delimiter, '#' comment lines on top) or Parquet file as text cells, and its first data row's number."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in {".xlsx", ".xls", ".ods"}:
        raise InputError(f"{path}: spreadsheets are not read directly; save the sheet as CSV and pass that.")
    try:
        if suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path).astype(str).replace({"nan": "", "None": "", "<NA>": ""})
            first_row = 1
        else:
            with open(path, encoding="utf-8-sig") as handle:
                comments = 0
                for line in handle:
                    if not line.lstrip().startswith("#"):
                        break
                    comments += 1
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                skiprows=comments,
                sep=None,
                engine="python",
                encoding="utf-8-sig",
            )
            first_row = comments + 2  # the header is a row too, as in a spreadsheet
    except (OSError, ValueError, csv.Error, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(f"{path} cannot be read as CSV or Parquet: {str(error).strip().splitlines()[0]}.") from None
    if frame.empty:
        raise InputError(f"{path} has no rows of data.")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, first_row


def _stated_unit(field: Field, column: str) -> str | None:
    """The unit a header states for a field (e.g. 'SP size (µm)', 'T_K', 'phi_i'), None when it says none."""
    return _detect(field, column)[1] or _split_header(column)[1]


def _resolve_columns(
    frame: pd.DataFrame, source: str, mapping: Mapping[str, str], units: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """Canonical field -> (column, unit): ``--map`` first, then the headers supraopt recognises."""
    columns = list(frame.columns)
    by_lower = {c.lower(): c for c in columns}
    found: dict[str, str] = {}
    for name, column in mapping.items():
        if column:  # '--map temperature=' (empty) switches off a column supraopt would pick itself
            actual = column if column in columns else by_lower.get(column.lower())
            if actual is None:
                raise InputError(
                    f"{source}: --map {BY_NAME[name].short}={column!r} names no column; columns: {columns}."
                )
            found[name] = actual
    for field in FIELDS:
        if field.column not in mapping:
            hits = [c for c in columns if c not in found.values() and _detect(field, c)[0]]
            if len(hits) > 1:
                both = " and ".join(repr(c) for c in hits)
                raise InputError(
                    f"{source}: columns {both} all look like {field.label}; pick one with --map {field.short}=COLUMN."
                )
            if hits:
                found[field.column] = hits[0]
    for name in units:
        if name not in found:
            raise InputError(
                f"{source}: --unit {BY_NAME[name].short} is given, but no column holds {BY_NAME[name].label}."
            )
    resolved = {}
    for name, column in found.items():
        field = BY_NAME[name]
        text = units.get(name) or _stated_unit(field, column)
        unit = next(iter(field.units), "") if text is None else _unit_of(field, text)
        if unit is None:
            where = f"--unit {field.short}" if name in units else f"column {column!r}"
            raise InputError(
                f"{source}: {where} gives the unit {text!r}, not one of {', '.join(field.units)}; "
                f"set it with --unit {field.short}=UNIT."
            )
        resolved[name] = (column, unit)
    return resolved


def _number(raw: Any, row: int, column: str) -> float:
    text = str(raw).strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InputError(f"row {row}, column {column!r}: {text!r} is not a number.") from None


FAILED_NO = {"", "0", "false", "no", "n", "ok", "success", "succeeded", "none", "nan", "-"}
FAILED_YES = {"1", "true", "yes", "y", "failed", "fail", "failure"}


def _failure(raw: Any) -> str:
    """A failure cell -> its reason ('' for a run that gave a result)."""
    text = str(raw).strip()
    if text.lower() in FAILED_NO:
        return ""
    return "failed (no reason given)" if text.lower() in FAILED_YES else text


def read_runs(
    path: str | Path,
    preset: Preset,
    mapping: Mapping[str, str] | None = None,
    units: Mapping[str, str] | None = None,
) -> Runs:
    """Read past runs: map columns, convert units, check every cell a fit will use.

    Args:
        path: CSV or Parquet file, one run per row.
        preset: supplies the NC density (for volume fractions), the nozzle width (for droplet
            sizes given as d/w) and the reference temperature (when the data have none).
        mapping: field (short or canonical name) -> column, for headers supraopt does not
            recognise; an empty column name ignores a column it would pick itself.
        units: field -> unit where neither the header nor the default says it (see :data:`FIELDS`).
    Raises:
        InputError: one sentence naming the missing column, or the row and column of the first bad cell.
    """
    path = Path(path)
    source = str(path)
    frame, first_row = read_table(path)
    mapping = {field_named(k).column: v for k, v in (mapping or {}).items()}
    units = {field_named(k).column: v for k, v in (units or {}).items()}
    resolved = _resolve_columns(frame, source, mapping, units)
    rows = [i + first_row for i in range(len(frame))]
    out = pd.DataFrame({"row": rows, "failed": ""})
    notes: list[str] = []
    for name, (column, unit) in resolved.items():
        field = BY_NAME[name]
        if name == "failed":
            out["failed"] = [_failure(v) for v in frame[column]]
            continue
        raw = np.array([_number(v, r, column) for v, r in zip(frame[column], rows, strict=True)])
        with np.errstate(divide="ignore", invalid="ignore"):
            values = field.units[unit][1](raw, preset.density_g_cm3)
        for value, given, row in zip(values, raw, rows, strict=True):
            if not math.isnan(given) and not field.low < value < field.high:
                raise InputError(
                    f"row {row}, column {column!r}: {given:g} {unit} is not a plausible {field.label} (expected "
                    f"{field.low:g} to {field.high:g} {field.unit}); check the value or its unit (--unit {field.short}=...)."
                )
        out[name] = values
        if name == "concentration_mg_ml" and unit != "mg/mL":
            notes.append(
                f"{column!r} read as volume {unit}, converted with the preset's NC density {preset.density_g_cm3:g} g/cm³."
            )
    if (
        "pdi_pct" in resolved
        and "pdi_pct" not in units
        and _stated_unit(BY_NAME["pdi_pct"], resolved["pdi_pct"][0]) is None
    ):
        column = resolved["pdi_pct"][0]
        if out["pdi_pct"].max() <= 1.0:
            raise InputError(
                f"{source}: column {column!r} holds values of at most 1: say whether they are CV fractions "
                "(--unit pdi=fraction) or DLS polydispersity indices (--unit pdi=dls); percent is assumed otherwise."
            )
    if "n_particles" in out:
        for value, row in zip(out["n_particles"], rows, strict=True):
            if not (math.isnan(value) or float(value).is_integer()):
                raise InputError(f"row {row}, column {resolved['n_particles'][0]!r}: {value:g} is not a whole number.")
    if resolved.get("droplet_um", ("", ""))[1] == "d/w":
        out["droplet_um"] *= out.get("orifice_width_um", preset.nozzle_um)
        if "orifice_width_um" not in out:
            notes.append(f"droplet sizes are d/w: multiplied by the preset's nozzle width, {preset.nozzle_um:g} µm.")
    if {"q_continuous", "q_dispersed"} <= set(out) and "flow_ratio" not in out:
        out["flow_ratio"] = out["q_continuous"] / out["q_dispersed"]
        resolved["flow_ratio"] = (f"{resolved['q_continuous'][0]} / {resolved['q_dispersed'][0]}", "Qc/Qd")
    elif {"q_continuous", "q_dispersed"} & set(out) and "flow_ratio" in out:
        notes.append("the flow-ratio column is used; the flow-rate columns are not.")
    _check_stages(out, resolved, source, list(frame.columns))
    if "diameter_nm" in out and "temperature_c" not in out:
        out["temperature_c"] = preset.reference_temperature_c
        notes.append(
            f"no temperature column: every run is taken at the preset's {preset.reference_temperature_c:g} °C."
        )
    _check_filled(out, resolved)
    return Runs(out, source, resolved, tuple(notes))


def _check_stages(out: pd.DataFrame, resolved: Mapping[str, tuple[str, str]], source: str, columns: list[str]) -> None:
    """The data hold at least one stage, with the settings it needs."""
    if "diameter_nm" not in out and "droplet_um" not in out:
        raise InputError(
            f"{source}: no SP diameter or droplet diameter column among {columns}; "
            "name one with --map diameter=COLUMN or --map droplet=COLUMN."
        )
    needed = ["flow_ratio"] + (["concentration_mg_ml"] if "diameter_nm" in out else [])
    for name in needed:
        if name not in out:
            field = BY_NAME[name]
            also = " (or two flow-rate columns, q_continuous and q_dispersed)" if name == "flow_ratio" else ""
            hint = ""
            if name == "concentration_mg_ml" and "droplet_um" not in out:
                hint = f", or if {resolved['diameter_nm'][0]!r} holds droplet sizes, --map droplet={resolved['diameter_nm'][0]!r}"
            raise InputError(
                f"{source}: no {field.label} column{also} among {columns}; name it with --map {field.short}=COLUMN{hint}."
            )


def _check_filled(out: pd.DataFrame, resolved: Mapping[str, tuple[str, str]]) -> None:
    """Settings are filled in every row, results in every row that did not fail."""
    settings = [c for c in ("q_continuous", "q_dispersed", *PARAMETERS, *DROPLET_INPUTS) if c in resolved]
    results = [c for c in ("diameter_nm", "pdi_pct", "n_particles", "droplet_um") if c in resolved]
    hint = f", or give a failure reason in column {resolved['failed'][0]!r}" if "failed" in resolved else ""
    for record in out.to_dict("records"):
        for name in dict.fromkeys(settings + ([] if record["failed"] else results)):
            if math.isnan(record[name]):
                tail = hint if name in results else ""
                raise InputError(f"row {record['row']}, column {resolved[name][0]!r}: empty or NaN; fill it in{tail}.")
    if (out["failed"] != "").all():
        raise InputError("every run in the file failed; a fit needs at least one measured result.")


# --- stages: inputs, outcomes, physics ------------------------------------------------------------


class InputBox:
    """Unit-cube map of a stage's inputs over the data's range: log axes, temperature linear."""

    def __init__(self, names: Sequence[str], x: Tensor) -> None:
        self.names = tuple(names)
        self._log = torch.tensor([n != "temperature_c" for n in self.names])
        warped = torch.where(self._log, torch.log(x), x)
        self._low = warped.min(0).values
        width = warped.max(0).values - self._low
        self._width = torch.where(width > 0, width, torch.ones_like(width))

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_unit(self, x: Tensor) -> Tensor:
        return (torch.where(self._log, torch.log(x.clamp_min(1e-300)), x) - self._low) / self._width

    def from_unit(self, z: Tensor) -> Tensor:
        warped = self._low + z * self._width
        return torch.where(self._log, torch.exp(warped), warped)


@dataclass(frozen=True)
class Outcome:
    """One log-scale outcome of a stage and the physics that explains it."""

    column: str
    label: str
    unit: str
    y: Tensor
    """`n` natural logs of the measured values."""
    yvar: Tensor
    """`n` measurement-noise variances of ``y``."""
    fn: PhysicsFn
    names: tuple[str, ...]
    prior: tuple[Tensor, Tensor]
    residual: ResidualPrior
    relinearise: int = 0

    def gp(self, space: InputBox | SearchSpace, physics_only: bool = False) -> PhysicsGP:
        """The physics + GP model, or with the residual switched off (its misfit then counts as noise)."""
        residual = ResidualPrior(sd=1e-4, noise_sd=self.residual.sd) if physics_only else self.residual
        return PhysicsGP(self.fn, self.prior, self.names, space, residual)


@dataclass(frozen=True)
class Stage:
    """What one stage's fit sees: `n x d` physical inputs, their unit-cube map and the outcomes."""

    name: str
    inputs: tuple[str, ...]
    x: Tensor
    space: InputBox | SearchSpace
    rows: tuple[int, ...]
    outcomes: tuple[Outcome, ...]
    own_law: bool = False
    """A droplet stage whose law is the preset's own (flow ratio and temperature, the preset's nozzle)."""

    @property
    def z(self) -> Tensor:
        return self.space.to_unit(self.x)


def sp_stage(runs: Runs, preset: Preset) -> Stage:
    """Concentration, flow ratio, temperature -> SP diameter (and PDI when measured)."""
    ok = runs.ok()
    everything = runs.frame  # failed runs widen the box: the feasibility map needs them inside it
    space = SearchSpace({p: (float(everything[p].min()), float(everything[p].max())) for p in SP_INPUTS})
    x = torch.tensor(ok[list(SP_INPUTS)].to_numpy(float), dtype=torch.double)
    n = _column(ok, "n_particles", float(DEFAULT_N_PARTICLES))
    pdi = _column(ok, "pdi_pct", 5.0).clamp_min(MIN_PDI_PCT)

    def size_fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_sp_diameter_nm(x, theta, preset)

    def pdi_fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_pdi_pct(x, theta, preset)

    diameter = torch.tensor(ok["diameter_nm"].to_numpy(float), dtype=torch.double)
    outcomes = [
        Outcome(
            "diameter_nm", "SP diameter", "nm", torch.log(diameter), size_noise_var(pdi, n), size_fn,
            physics.SIZE_PARAMETERS, preset.prior(physics.SIZE_PARAMETERS), SIZE_RESIDUAL,
        )
    ]  # fmt: skip
    if "pdi_pct" in ok:
        outcomes.append(
            Outcome(
                "pdi_pct", "PDI", "%", torch.log(pdi), pdi_noise_var(n), pdi_fn,
                physics.PDI_PARAMETERS, preset.prior(physics.PDI_PARAMETERS), PDI_RESIDUAL, relinearise=1,
            )
        )  # fmt: skip
    return Stage("supraparticle", SP_INPUTS, x, space, tuple(ok["row"]), tuple(outcomes))


def _column(frame: pd.DataFrame, name: str, default: float) -> Tensor:
    values = frame[name].to_numpy(float) if name in frame else np.full(len(frame), default)
    return torch.tensor(values, dtype=torch.double)


def droplet_law(inputs: Sequence[str], width_um: float | None, reference_temperature_c: float) -> PhysicsFn:
    """``ln d_drop = ln k + ln w - a ln r + b ln Ca + c ln(h/w) + b_T (T - T_ref)/10`` over the given inputs.

    ``theta`` holds ``ln k`` then one parameter per input in :data:`DROPLET_TERMS` order; the orifice
    width comes from the inputs when it varies, else it is the constant ``width_um``.
    """
    terms = [(inputs.index(name), name) for name in DROPLET_TERMS if name in inputs]
    width_index = inputs.index("orifice_width_um") if "orifice_width_um" in inputs else None

    def fn(x: Tensor, theta: Tensor) -> Tensor:
        log_w = torch.log(x[..., width_index]) if width_index is not None else math.log(width_um or 1.0)
        out = theta[..., 0:1] + log_w
        for j, (i, name) in enumerate(terms, start=1):
            value = x[..., i]
            if name == "flow_ratio":
                feature = -torch.log(value)
            elif name == "temperature_c":
                feature = (value - reference_temperature_c) / 10.0
            else:
                feature = torch.log(value)
            out = out + theta[..., j : j + 1] * feature
        return out

    return fn


def droplet_stage(runs: Runs, preset: Preset) -> Stage | None:
    """Flow ratio and whatever else varies (Ca, orifice width, aspect ratio, temperature) -> droplet diameter.

    None when no input varies (nothing to learn a law from).
    """
    ok = runs.ok()
    inputs = tuple(c for c in DROPLET_INPUTS if c in ok and ok[c].nunique() > 1)
    if not inputs:
        return None
    width = None
    if "orifice_width_um" not in inputs:
        width = float(ok["orifice_width_um"].iloc[0]) if "orifice_width_um" in ok else preset.nozzle_um
    names = ("log_droplet_k", *(DROPLET_TERMS[c] for c in DROPLET_TERMS if c in inputs))
    pairs = [preset.priors.get(n) or DROPLET_PRIORS[n] for n in names]
    if not runs.has_sp and "orifice_width_um" not in ok:  # someone else's device, width unknown: k * w is too
        pairs[0] = (pairs[0][0], UNKNOWN_DEVICE_LOG_K_SD)
    prior = tuple(torch.tensor(column, dtype=torch.double) for column in zip(*pairs, strict=True))
    x = torch.tensor(ok[list(inputs)].to_numpy(float), dtype=torch.double)
    y = torch.log(torch.tensor(ok["droplet_um"].to_numpy(float), dtype=torch.double))
    outcome = Outcome(
        "droplet_um", "droplet diameter", "µm", y, torch.full_like(y, DROPLET_NOISE_SD**2),
        droplet_law(inputs, width, preset.reference_temperature_c), names, (prior[0], prior[1]), DROPLET_RESIDUAL,
    )  # fmt: skip
    own = set(names) <= set(physics.DROPLET_PARAMETERS) and width == preset.nozzle_um
    return Stage("droplet", inputs, x, InputBox(inputs, x), tuple(ok["row"]), (outcome,), own)


# --- fitting and cross-validation ---------------------------------------------------------------


@dataclass(frozen=True)
class Posterior:
    """Physics parameters of one outcome: prior mean and sd, posterior mean and covariance."""

    names: tuple[str, ...]
    prior_mean: Tensor
    prior_sd: Tensor
    mean: Tensor
    cov: Tensor

    @property
    def sd(self) -> Tensor:
        return self.cov.diagonal().clamp_min(0).sqrt()

    def combination(self, weights: Mapping[str, float]) -> tuple[float, float]:
        """Posterior mean and sd of ``sum(w * theta)``, e.g. ``{'log_droplet_k': 1, 'log_phi_inorg': -1/3}``."""
        w = torch.tensor([weights.get(n, 0.0) for n in self.names], dtype=torch.double)
        return float(w @ self.mean), float((w @ self.cov @ w).clamp_min(0).sqrt())

    def table(self, stage: str) -> pd.DataFrame:
        rows = []
        for i, name in enumerate(self.names):
            mean, sd = float(self.mean[i]), float(self.sd[i])
            reads = f"{name[4:]} ≈ {math.exp(mean):.3g}" if name.startswith("log_") else ""
            rows.append(
                {
                    "stage": stage,
                    "parameter": name,
                    "prior_mean": float(self.prior_mean[i]),
                    "prior_sd": float(self.prior_sd[i]),
                    "posterior_mean": mean,
                    "posterior_sd": sd,
                    "sd_ratio": sd / float(self.prior_sd[i]),
                    "reads_as": reads,
                }
            )
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class CVResult:
    """k-fold cross-validation of the three models on one stage."""

    stage: str
    folds: int
    table: pd.DataFrame
    """One row per model (index), for each outcome: RMSE, MAPE (%) and coverage of the 90 % interval."""
    predictions: pd.DataFrame
    """Long format: row, outcome, model, measured, predicted, lower90, upper90 and the stage's inputs."""


@dataclass(frozen=True)
class StageFit:
    """One stage fitted to all its runs, with its cross-validation (None when skipped)."""

    stage: Stage
    gps: dict[str, PhysicsGP]
    """Outcome column -> the physics + GP model fitted to all runs."""
    posteriors: dict[str, Posterior]
    cv: CVResult | None


@contextmanager
def quiet_fitting() -> Iterator[None]:
    """Fit on one thread, hiding the warnings the fit causes on purpose (each with its reason).

    The matrices are small (hundreds of runs): a second thread only adds contention, ten times
    slower on a busy two-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputDataWarning)  # log outcomes are modelled unstandardised on purpose
        warnings.simplefilter("ignore", NumericalWarning)  # jitter added to a nearly singular matrix; fit recovers
        warnings.simplefilter("ignore", OptimizationWarning)  # L-BFGS stops on a flat MAP surface; iterate usable
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _predict(gp: PhysicsGP, z: Tensor, yvar: Tensor) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance of a new measurement (latent + data noise + learned extra noise)."""
    with torch.no_grad():
        mean, var = gp.moments(z)
        extra = gp.model.likelihood.second_noise_covar.noise.reshape(()) if gp.model is not None else 0.0
    return mean, var + yvar + extra


def _gp_only(z: Tensor, y: Tensor, z_test: Tensor) -> tuple[Tensor, Tensor]:
    """BoTorch's default GP: constant mean, Matérn-5/2 ARD, standardised outcome, learned noise."""
    model = SingleTaskGP(z, y.unsqueeze(-1))
    with gpytorch.settings.max_cholesky_size(20_000):
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        with torch.no_grad():
            posterior = model.posterior(z_test, observation_noise=True)
    return posterior.mean.squeeze(-1), posterior.variance.squeeze(-1)


def fit_stage(stage: Stage, folds: int = 5, seed: int = 0) -> StageFit:
    """Fit each outcome's physics + GP to all runs, read off the parameter posterior, cross-validate."""
    z = stage.z
    gps, posteriors = {}, {}
    with quiet_fitting():
        for o in stage.outcomes:
            gp = o.gp(stage.space).fit(z, o.y, o.yvar, relinearise=o.relinearise)
            mean, cov = gp.parameter_posterior(z, o.y)
            gps[o.column] = gp
            posteriors[o.column] = Posterior(o.names, o.prior[0], o.prior[1], mean, cov)
    cv = cross_validate(stage, folds, seed) if folds >= 2 and len(stage.rows) >= 4 else None
    return StageFit(stage, gps, posteriors, cv)


def cross_validate(stage: Stage, folds: int = 5, seed: int = 0) -> CVResult:
    """k-fold CV (seeded split) of physics only, GP only and physics + GP on every outcome of a stage."""
    n = len(stage.rows)
    k = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    z = stage.z
    parts = []
    with quiet_fitting():
        for test in np.array_split(order, k):
            train = np.setdiff1d(order, test)
            for o in stage.outcomes:
                for model in MODELS:
                    if model == "GP only":
                        mean, var = _gp_only(z[train], o.y[train], z[test])
                    else:
                        gp = o.gp(stage.space, physics_only=model == "physics only")
                        gp.fit(z[train], o.y[train], o.yvar[train], relinearise=o.relinearise)
                        mean, var = _predict(gp, z[test], o.yvar[test])
                    mean, sd = mean.detach(), var.detach().clamp_min(1e-12).sqrt()
                    part = pd.DataFrame(
                        {
                            "row": np.asarray(stage.rows)[test],
                            "outcome": o.column,
                            "model": model,
                            "measured": torch.exp(o.y[test]).numpy(),
                            "predicted": torch.exp(mean).numpy(),
                            "lower90": torch.exp(mean - Z90 * sd).numpy(),
                            "upper90": torch.exp(mean + Z90 * sd).numpy(),
                        }
                    )
                    for j, name in enumerate(stage.inputs):
                        part[name] = stage.x[test, j].numpy()
                    parts.append(part)
    predictions = pd.concat(parts, ignore_index=True).sort_values(["outcome", "model", "row"], kind="stable")
    return CVResult(stage.name, k, _metrics(predictions, stage.outcomes), predictions.reset_index(drop=True))


def _metrics(predictions: pd.DataFrame, outcomes: Sequence[Outcome]) -> pd.DataFrame:
    table = pd.DataFrame(index=pd.Index(MODELS, name="model"))
    for o in outcomes:
        sub = predictions[predictions["outcome"] == o.column]
        for model, g in sub.groupby("model"):
            error = g["predicted"] - g["measured"]
            table.loc[model, f"{o.label} RMSE ({o.unit})"] = float(np.sqrt((error**2).mean()))
            table.loc[model, f"{o.label} MAPE (%)"] = float((error.abs() / g["measured"]).mean() * 100)
            inside = (g["measured"] >= g["lower90"]) & (g["measured"] <= g["upper90"])
            table.loc[model, f"{o.label} 90% coverage"] = float(inside.mean())
    return table


@dataclass(frozen=True)
class FitResult:
    """Everything ``supraopt fit`` learned from a table of past runs."""

    runs: Runs
    model: str
    preset: Preset
    """The preset the SP stage started from (droplet-stage priors folded in when they apply)."""
    sp: StageFit | None
    droplet: StageFit | None
    feasibility: FeasibilityModel | None
    notes: tuple[str, ...]

    def stages(self) -> list[StageFit]:
        return [s for s in (self.sp, self.droplet) if s is not None]

    def parameters(self) -> pd.DataFrame:
        """Every fitted physics parameter, one row each: the preset's prior, the posterior and their sd ratio.

        The prior shown is the preset's, also where a two-stage fit started the SP stage from the
        droplet stage's posterior: the ratio then says how much all the data taught together.
        """
        table = pd.concat(
            [p.table(s.stage.name) for s in self.stages() for p in s.posteriors.values()], ignore_index=True
        )
        priors = {**DROPLET_PRIORS, **Preset.load(self.model).priors}
        table["prior_mean"] = [priors[n][0] for n in table["parameter"]]
        table["prior_sd"] = [priors[n][1] for n in table["parameter"]]
        table["sd_ratio"] = table["posterior_sd"] / table["prior_sd"]
        return table

    def prior_updates(self, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
        """Preset parameter -> (posterior mean, max(posterior sd, floor x preset sd)) for a new campaign."""
        base = Preset.load(self.model)
        if self.sp is not None:
            posteriors = list(self.sp.posteriors.values())
        elif self.droplet is not None and self.droplet.stage.own_law:
            posteriors = list(self.droplet.posteriors.values())
        else:
            raise InputError(
                "the droplet data use inputs the preset's droplet law lacks (capillary number, orifice width, "
                "aspect ratio), so there is no preset prior to update; --into needs SP diameters."
            )
        updates = {}
        for p in posteriors:
            for i, name in enumerate(p.names):
                sd = max(float(p.sd[i]), floor * base.priors[name][1])
                updates[name] = (float(p.mean[i]), sd)
        return updates


def fit_runs(runs: Runs, model: str = "cspbbr3-flow-focusing", folds: int = 5, seed: int = 0) -> FitResult:
    """Fit every stage the runs hold, droplet first (its posterior can inform the SP stage), with CV.

    Args:
        runs: from :func:`read_runs`.
        model: physics preset (name in ``models/`` or path) whose constants and priors to start from.
        folds: k of the k-fold cross-validation; below 2 skips it.
        seed: seeds the split into folds.
    """
    preset = Preset.load(model)
    notes = list(runs.notes)
    droplet = sp = feasibility = None
    if runs.has_droplets:
        stage = droplet_stage(runs, preset)
        if stage is None:
            notes.append("droplet diameters are given, but no flow condition varies: no droplet-stage fit.")
        else:
            droplet = fit_stage(stage, folds, seed)
    if runs.has_sp:
        if droplet is not None and droplet.stage.own_law:
            # the SP stage's CV then starts from droplet sizes of every run, held-out ones included:
            # a small leak, of a different measurement (droplets), never of the SP sizes it predicts
            post = droplet.posteriors["droplet_um"]
            preset = preset.with_priors({n: (float(post.mean[i]), float(post.sd[i])) for i, n in enumerate(post.names)})
            notes.append("two-stage fit: the droplet-stage posterior is the SP stage's prior for the droplet law.")
        else:
            notes.append(
                "from SP diameters alone only log_droplet_k - log_phi_inorg/3 and droplet_temp_per_10c + "
                "packing_temp_per_10c are identified; their parts lean on the priors (droplet sizes would split them)."
            )
        stage = sp_stage(runs, preset)
        sp = fit_stage(stage, folds, seed)
        failed = runs.frame[runs.frame["failed"] != ""]
        x_failed = torch.tensor(failed[list(SP_INPUTS)].to_numpy(float), dtype=torch.double).reshape(-1, 3)
        failures = [
            (math.log(float(x[0])), stage.space.to_unit(x), reason)
            for x, reason in zip(x_failed, failed["failed"], strict=True)
        ]
        assert isinstance(stage.space, SearchSpace)  # sp_stage's space is the campaign kind
        feasibility = FeasibilityModel(preset, stage.space, torch.log(stage.x[:, 0]), failures)
    for fitted in (sp, droplet):
        if fitted is not None and fitted.cv is None:
            notes.append(f"{fitted.stage.name} stage: no cross-validation (fewer than 4 runs, or --folds below 2).")
    return FitResult(runs, model, preset, sp, droplet, feasibility, tuple(notes))


# --- outputs and transfer -----------------------------------------------------------------------


def write_tables(result: FitResult, out: Path) -> list[Path]:
    """``parameters.csv``, ``cv_<stage>.csv``, ``cv_predictions.csv`` and ``fit.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "parameters.csv"]
    result.parameters().to_csv(written[0], index=False)
    cvs = [s.cv for s in result.stages() if s.cv is not None]
    for cv in cvs:
        path = out / f"cv_{cv.stage}.csv"
        cv.table.to_csv(path)
        written.append(path)
    if cvs:
        path = out / "cv_predictions.csv"
        pd.concat([cv.predictions.assign(stage=cv.stage) for cv in cvs]).to_csv(path, index=False)
        written.append(path)
    summary = {
        "source": result.runs.source,
        "model": result.model,
        "runs": len(result.runs.frame),
        "failed": int((result.runs.frame["failed"] != "").sum()),
        "columns": {k: {"column": c, "unit": u} for k, (c, u) in result.runs.mapping.items()},
        "notes": list(result.notes),
        "parameters": result.parameters().to_dict("records"),
        "cross_validation": {cv.stage: cv.table.reset_index().to_dict("records") for cv in cvs},
    }
    path = out / "fit.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    written.append(path)
    return written


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise InputError(f"cannot write {value!r} to a preset file.")


def write_prior(result: FitResult, path: Path, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
    """Write a full preset file: the fitted model's tables with ``[priors]`` replaced by the fit."""
    data = read_toml(preset_path(result.model))
    updates = result.prior_updates(floor)
    priors = {name: list(pair) for name, pair in data["priors"].items()}
    priors.update({name: [float(f"{mean:.6g}"), float(f"{sd:.6g}")] for name, (mean, sd) in updates.items()})
    lines = [
        f"# Fitted by 'supraopt fit' from {result.runs.source} ({len(result.runs.frame)} runs), starting from preset",
        f"# {result.model!r}. Priors: posterior mean, sd = max(posterior sd, {floor:g} x preset sd) to stay humble",
        "# about transfer between rigs and days. The past runs are carried by these priors, not by the ledger.",
        f"name = {_toml(str(data.get('name', 'preset')) + '-fitted')}",
        f"description = {_toml('Fitted from past runs: ' + str(data.get('description', '')))}",
    ]
    for table, values in data.items():
        if not isinstance(values, dict):
            continue
        lines += ["", f"[{table}]"]
        source = priors if table == "priors" else values
        lines += [f"{key} = {_toml(value)}" for key, value in source.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return updates


def check_new_campaign_dir(directory: Path) -> None:
    """Refuse a folder that already holds a campaign or a fitted prior (nothing is overwritten)."""
    if (directory / SPEC_FILE).exists() or (directory / PRIOR_FILE).exists():
        raise InputError(f"{directory} already holds a campaign or a {PRIOR_FILE}; pick a new folder for --into.")


def seed_campaign(result: FitResult, directory: str | Path, target_nm: float, **options: Any) -> Campaign:
    """A new campaign in ``directory`` whose preset is ``prior.toml``, written from the fit.

    The past runs are not copied into its ledger: they are in the prior already, and counting
    them twice would make the campaign overconfident.
    """
    directory = Path(directory)
    check_new_campaign_dir(directory)
    result.prior_updates()  # fails early, before anything is written, when there is nothing to transfer
    directory.mkdir(parents=True, exist_ok=True)
    write_prior(result, directory / PRIOR_FILE)
    return Campaign.create(directory, PRIOR_FILE, target_nm, **options)


__all__ = [
    "FIELDS",
    "CVResult",
    "FitResult",
    "Posterior",
    "Runs",
    "check_new_campaign_dir",
    "cross_validate",
    "droplet_stage",
    "fit_runs",
    "parse_pairs",
    "read_runs",
    "seed_campaign",
    "sp_stage",
    "write_prior",
    "write_tables",
]
