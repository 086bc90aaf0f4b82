"""Reading past runs: a CSV or Parquet table -> canonical columns in canonical units, every cell checked.

Column names are recognised with their units (``SP size (µm)``, ``T_K``, ``phi_i (%)``,
``Qd/Qc``, two flow-rate columns...); ``--map FIELD=COLUMN`` and ``--unit FIELD=UNIT`` cover the
rest. Every bad cell is one sentence naming the row (as a spreadsheet numbers it) and the column.
:func:`read_runs` is the entry point; :mod:`supraopt.fit` fits what it returns.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from supraopt.errors import InputError
from supraopt.records import PARAMETERS
from supraopt.tables import SPREADSHEETS, decimal_point, delimiter

if TYPE_CHECKING:
    from supraopt.physics import Preset

Array = npt.NDArray[np.float64]
Convert = Callable[[Array, float], Array]
"""Values in a unit -> values in the canonical unit, given the preset's NC density (g/cm³)."""


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
DROPLET_INPUTS = ("flow_ratio", "capillary_number", "orifice_width_um", "temperature_c")
CONTEXT_FIELDS = ("aspect_ratio",)
"""Fields read as numeric contexts (:class:`Context`, named by the field): conditions of the chip that the
physics names through the preset's ``[context_terms]``, so a fit and a campaign give them one term."""


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


CATEGORY, NUMBER = "category", "number"
CONTEXT_KINDS = (CATEGORY, NUMBER)
FEW_LEVELS = 12
"""A column with at most this many distinct values (and fewer than a third of the rows) looks like a category."""
CONTEXT_PREFIX = "context:"
"""Prefix of a context's column in :attr:`Runs.frame` (a context column keeps its name from the file)."""


@dataclass(frozen=True)
class Context:
    """A column used as a condition of the runs: asked for (``--context COLUMN[:category]``), or a field of
    :data:`CONTEXT_FIELDS` (then named by the field, e.g. ``aspect_ratio``, whatever the file's header)."""

    column: str
    kind: str
    """'category' (per-level offsets on a physics parameter) or 'number' (a GP input, and a physics term
    where the physics names it)."""
    levels: tuple[str, ...] = ()
    """A category's levels, in order of first appearance."""

    @property
    def key(self) -> str:
        return CONTEXT_PREFIX + self.column


@dataclass(frozen=True)
class Unused:
    """A column of the file that the fit does not use, and the flag that would use it."""

    column: str
    hint: str


@dataclass(frozen=True)
class Runs:
    """Past runs in canonical columns and units; one row per run, 'row' is its row in the file."""

    frame: pd.DataFrame
    source: str
    mapping: dict[str, tuple[str, str]]
    """Canonical field -> (column in the file, unit it was read in)."""
    notes: tuple[str, ...]
    contexts: tuple[Context, ...] = ()
    """Context columns, their values in ``frame[context.key]`` (text for a category, float for a number)."""
    unused: tuple[Unused, ...] = ()
    """Every column of the file that is neither a field nor a context."""

    @property
    def has_sp(self) -> bool:
        return "diameter_nm" in self.frame

    @property
    def has_droplets(self) -> bool:
        return "droplet_um" in self.frame

    def ok(self) -> pd.DataFrame:
        """Runs that gave a result (no failure reason)."""
        return self.frame[self.frame["failed"] == ""]


def read_spreadsheet(path: Path, sheet: str | None = None) -> tuple[pd.DataFrame, int]:
    """An Excel .xlsx sheet (the first, or ``sheet``) as text cells, and its first data row's number."""
    from supraopt.tables import read_sheet

    table = read_sheet(path, sheet)
    frame = pd.DataFrame([[row[c] for c in table.columns] for row in table.rows], columns=table.columns, dtype=str)
    return frame, table.first_row


def read_table(path: Path, sheet: str | None = None) -> tuple[pd.DataFrame, int]:
    """A CSV (any delimiter, '#' comment lines on top), Parquet or .xlsx file as text cells, and its first data row's number."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in SPREADSHEETS:
        frame, first_row = read_spreadsheet(path, sheet)
        if frame.empty:
            raise InputError(f"{path} has no rows of data.")
        return frame, first_row
    if sheet is not None:
        raise InputError(f"--sheet {sheet!r} only applies to .xlsx files, not {path}.")
    if suffix in {".xls", ".ods"}:
        raise InputError(f"{path}: only .xlsx workbooks are read; save the sheet as .xlsx or CSV and pass that.")
    try:
        if suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path).astype(str).replace({"nan": "", "None": "", "<NA>": ""})
            first_row = 1
        else:
            with open(path, encoding="utf-8-sig") as handle:
                comments, line = 0, ""  # comment and blank lines above the header
                for line in handle:
                    if line.strip() and not line.lstrip().startswith("#"):
                        break
                    comments += 1
            if not line.strip() or line.lstrip().startswith("#"):
                raise InputError(f"{path} is empty: no header and no rows of data.")
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
            if delimiter(line) != ",":  # a European spreadsheet's CSV: ';' between cells, ',' before decimals
                frame = frame.map(decimal_point)
    except InputError:
        raise
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


def parse_contexts(items: Iterable[str]) -> dict[str, str | None]:
    """``['regime:category', 'expansion_ratio']`` from ``--context`` -> {column: kind or None (decide from the cells)}."""
    contexts: dict[str, str | None] = {}
    for item in items:
        column, sep, kind = item.strip().rpartition(":")
        if not sep or kind.strip().lower() not in CONTEXT_KINDS:
            column, kind = item.strip(), ""
        if not column:
            raise InputError(f"--context {item!r} names no column; use --context COLUMN or --context COLUMN:category.")
        contexts[column.strip()] = kind.strip().lower() or None
    return contexts


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def suggest_use(column: str, cells: pd.Series) -> str:
    """The flag that would use an unused column, judged from its cells."""
    values = cells.astype(str).str.strip()
    values = values[values != ""]
    levels = values.nunique()
    if levels <= 1:
        return "constant (one value): nothing to learn from it"
    numeric = bool(values.map(_is_number).all())
    few = levels <= FEW_LEVELS and levels <= len(values) / 3
    if not numeric and not few:
        return "text, a different value in most rows (an identifier or a note): not usable"
    if numeric and levels == len(values) and _name_key(column).endswith(("id", "number", "no", "index")):
        return "looks like a run number (every value differs): not usable"
    quoted = column if re.fullmatch(r"[\w.-]+", column) else repr(column)
    if not numeric:
        return f"--context {quoted}  (a category, {levels} levels)"
    if few:
        return f"--context {quoted}:category  ({levels} levels; or --context {quoted} as a number)"
    return f"--context {quoted}  (a number)"


def _read_contexts(
    frame: pd.DataFrame, out: pd.DataFrame, wanted: Mapping[str, str | None], resolved: Mapping[str, tuple[str, str]]
) -> tuple[Context, ...]:
    """Check and copy every ``--context`` column into ``out`` (as ``context:<column>``)."""
    columns = list(frame.columns)
    by_lower = {c.lower(): c for c in columns}
    used = {column: name for name, (column, _) in resolved.items()}
    contexts = []
    for asked, kind in wanted.items():
        column = asked if asked in columns else by_lower.get(asked.lower())
        if column is None:
            raise InputError(f"--context {asked!r} names no column; columns: {columns}.")
        if column in used and used[column] in CONTEXT_FIELDS and kind != CATEGORY:
            continue  # read as a number context already (CONTEXT_FIELDS)
        if column in used:
            raise InputError(
                f"--context {column!r}: that column is already read as {BY_NAME[used[column]].label}; "
                f"to use it as a context instead, also give --map {BY_NAME[used[column]].short}= (empty)."
            )
        cells = frame[column].astype(str).str.strip()
        if kind is None:
            kind = NUMBER if cells[cells != ""].map(_is_number).all() else CATEGORY
        ok = out["failed"] == ""
        for text, row, good in zip(cells, out["row"], ok, strict=True):
            if good and not text:
                raise InputError(f"row {row}, context column {column!r}: empty; fill it in or mark the run failed.")
        if kind == NUMBER:
            values = np.array([_number(v, r, column) for v, r in zip(cells, out["row"], strict=True)])
            out[CONTEXT_PREFIX + column] = values
            contexts.append(Context(column, NUMBER))
        else:
            out[CONTEXT_PREFIX + column] = list(cells)
            contexts.append(Context(column, CATEGORY, tuple(dict.fromkeys(cells[ok.to_numpy()]))))
    return tuple(contexts)


def read_runs(
    path: str | Path,
    preset: Preset,
    mapping: Mapping[str, str] | None = None,
    units: Mapping[str, str] | None = None,
    contexts: Mapping[str, str | None] | None = None,
    sheet: str | None = None,
) -> Runs:
    """Read past runs: map columns, convert units, check every cell a fit will use.

    Args:
        path: CSV, Parquet or Excel .xlsx file, one run per row.
        preset: supplies the NC density (for volume fractions), the nozzle width (for droplet
            sizes given as d/w) and the reference temperature (when the data have none).
        mapping: field (short or canonical name) -> column, for headers supraopt does not
            recognise; an empty column name ignores a column it would pick itself.
        units: field -> unit where neither the header nor the default says it (see :data:`FIELDS`).
        contexts: column -> 'category', 'number' or None (decided from the cells): conditions of the
            runs to use besides the fields (see :func:`parse_contexts`).
        sheet: the sheet of an .xlsx workbook to read (default: the first).
    Raises:
        InputError: one sentence naming the missing column, or the row and column of the first bad cell.
    """
    path = Path(path)
    source = str(path)
    frame, first_row = read_table(path, sheet)
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
    read = _read_contexts(frame, out, contexts or {}, resolved)
    fields = tuple(Context(name, NUMBER) for name in CONTEXT_FIELDS if name in out)
    for context in fields:
        out[context.key] = out.pop(context.column)
    read = fields + read
    taken = {column for column, _ in resolved.values()} | {c.column for c in read}
    taken |= {column for column in mapping.values() if column}
    unused = tuple(Unused(c, suggest_use(c, frame[c])) for c in frame.columns if c not in taken)
    return Runs(out, source, resolved, tuple(notes), read, unused)


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
    settings = [
        c for c in ("q_continuous", "q_dispersed", *PARAMETERS, *DROPLET_INPUTS, *CONTEXT_FIELDS) if c in resolved
    ]
    results = [c for c in ("diameter_nm", "pdi_pct", "n_particles", "droplet_um") if c in resolved]
    hint = f", or give a failure reason in column {resolved['failed'][0]!r}" if "failed" in resolved else ""
    for record in out.to_dict("records"):
        for name in dict.fromkeys(settings + ([] if record["failed"] else results)):
            if math.isnan(record[name]):
                tail = hint if name in results else ""
                raise InputError(f"row {record['row']}, column {resolved[name][0]!r}: empty or NaN; fill it in{tail}.")
    if (out["failed"] != "").all():
        raise InputError("every run in the file failed; a fit needs at least one measured result.")
