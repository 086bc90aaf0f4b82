"""The campaign spec: what to make, in which envelope, on which rig. Stored as ``campaign.toml``.

A campaign folder holds ``campaign.toml`` (this spec) and the ledger (``ledger.sqlite`` unless
``[ledger] url`` names another database). The spec is validated on load: every error names the
bad key and value.
"""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from supraopt.errors import InputError, SpecError
from supraopt.records import PARAMETERS, PLAUSIBLE, UNITS, Plausible, validate_context

SPEC_FILE = "campaign.toml"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
"""Physics presets shipped with supraopt (``models/*.toml`` at the top of the repository)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Target:
    """What counts as a hit: size within a relative tolerance and polydispersity under a ceiling."""

    diameter_nm: float
    """Wanted mean supraparticle diameter."""
    tolerance: float = 0.03
    """Relative size tolerance: 0.03 accepts 450 nm +- 3 %."""
    pdi_max_pct: float = 6.0
    """Polydispersity ceiling (coefficient of variation of the diameter, percent)."""
    confirm: int = 0
    """Repeats of the hitting recipe to run before the target counts as confirmed (0: a hit is enough)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.diameter_nm) and 0 < self.diameter_nm < 1e7):
            raise SpecError(f"target diameter_nm={self.diameter_nm} must be a positive size in nm.")
        if not (math.isfinite(self.tolerance) and 0 < self.tolerance < 0.5):
            raise SpecError(f"target tolerance={self.tolerance} must be a fraction in (0, 0.5), e.g. 0.03.")
        if not (math.isfinite(self.pdi_max_pct) and 0 < self.pdi_max_pct <= 100):
            raise SpecError(f"target pdi_max_pct={self.pdi_max_pct} must be a percentage in (0, 100].")
        if not (
            isinstance(self.confirm, int) and not isinstance(self.confirm, bool) and 0 <= self.confirm <= MAX_CONFIRM
        ):
            raise SpecError(
                f"target confirm={self.confirm!r} must be a whole number of repeats from 0 to {MAX_CONFIRM}."
            )

    @property
    def band_nm(self) -> tuple[float, float]:
        """The sizes that count as a hit."""
        return self.diameter_nm * (1 - self.tolerance), self.diameter_nm * (1 + self.tolerance)

    def label(self) -> str:
        """Short human name, e.g. '450 nm ± 3 %, PDI ≤ 6 %'."""
        return f"{self.diameter_nm:g} nm ± {self.tolerance:.0%}, PDI ≤ {self.pdi_max_pct:g} %"

    def is_hit(self, diameter_nm: float, pdi_pct: float) -> bool:
        """True when a measured run satisfies both the size tolerance and the PDI ceiling."""
        return abs(diameter_nm / self.diameter_nm - 1.0) <= self.tolerance and pdi_pct <= self.pdi_max_pct


MAX_CONFIRM = 20
"""Most repeats a target may ask for: more is a measurement campaign of its own."""


def check_targets(targets: tuple[Target, ...]) -> list[str]:
    """Refuse no target or the same size twice; return a warning for each pair whose bands overlap."""
    if not targets:
        raise SpecError("a campaign needs at least one target (give --target-nm or a [[targets]] table).")
    warnings = []
    ordered = sorted(targets, key=lambda t: t.diameter_nm)
    for a, b in itertools.pairwise(ordered):
        if a.diameter_nm == b.diameter_nm:
            raise SpecError(f"target {a.diameter_nm:g} nm is given twice; give each size once.")
        if a.band_nm[1] >= b.band_nm[0]:
            warnings.append(
                f"targets {a.diameter_nm:g} nm and {b.diameter_nm:g} nm overlap ({a.band_nm[1]:.0f} nm is inside "
                f"both bands): one run may serve both."
            )
    return warnings


@dataclass(frozen=True)
class LoopSettings:
    """How ``supraopt run`` drives the rig."""

    budget: int = 30
    """Maximum number of experiments (finished ones, failures included) before stopping."""
    batch: int = 1
    """Experiments in flight at once."""
    stop_on_hit: bool = True
    """Stop at the first hit; False keeps refining until the budget is spent."""
    poll_interval_s: float = 2.0
    """Seconds between two polls of a running experiment."""
    rig_timeout_s: float = 60.0
    """Seconds a single rig call may take before it counts as 'no answer, ask again' (longer than
    an adapter's own retries: the http adapter's defaults take up to ~45 s)."""
    max_rig_errors: int = 5
    """Consecutive rig errors after which the runner stops with a message."""

    def __post_init__(self) -> None:
        if not (_is_int(self.budget) and self.budget >= 1):
            raise SpecError(f"loop budget={self.budget!r} must be a positive integer.")
        if not (_is_int(self.batch) and 1 <= self.batch <= 64):
            raise SpecError(f"loop batch={self.batch!r} must be an integer between 1 and 64.")
        for name in ("poll_interval_s", "rig_timeout_s"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise SpecError(f"loop {name}={value!r} must be a non-negative number of seconds.")
        if not (_is_int(self.max_rig_errors) and self.max_rig_errors >= 1):
            raise SpecError(f"loop max_rig_errors={self.max_rig_errors!r} must be a positive integer.")
        if not isinstance(self.stop_on_hit, bool):
            raise SpecError(f"loop stop_on_hit={self.stop_on_hit!r} must be true or false.")


@dataclass(frozen=True)
class RigSettings:
    """Which adapter runs the experiments, and the options passed to its constructor."""

    adapter: str = "simulated"
    """'simulated', 'manual', 'http' or a dotted path 'package.module:ClassName'."""
    options: dict[str, Any] = field(default_factory=dict)


CONTEXT_KINDS = ("category", "number")


@dataclass(frozen=True)
class ContextVariable:
    """A condition the campaign records but does not set: a ``category`` (chip, NC batch,
    operator...; any text is a level) or a measured ``number`` (room temperature, NC core size...)."""

    kind: str
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise SpecError(f"context kind={self.kind!r} must be one of {', '.join(CONTEXT_KINDS)}.")


def parse_context(table: object, source: str = "campaign.toml") -> dict[str, ContextVariable]:
    """Read a ``[context]`` table: ``name = "category" | "number"`` or ``name = { kind = ..., unit = ... }``."""
    if not isinstance(table, dict):
        raise SpecError(f'{source}: [context] must be a table of name = "category" | "number".')
    out = {}
    for name, value in table.items():
        try:
            validate_context({name: "x"}, "[context]")
        except ValueError as error:
            raise SpecError(f"{source}: {error}") from None
        data = {"kind": value} if isinstance(value, str) else value
        if not isinstance(data, dict) or set(data) - {"kind", "unit"} or not isinstance(data.get("unit", ""), str):
            raise SpecError(
                f'{source}: [context] {name}={value!r} must be "category", "number" or '
                '{ kind = "number", unit = "°C" }.'
            )
        try:
            out[name] = ContextVariable(str(data.get("kind")), str(data.get("unit", "")))
        except SpecError as error:
            raise SpecError(f"{source}: [context] {name}: {error}") from None
    return out


@dataclass(frozen=True)
class CampaignSpec:
    """Everything that defines a campaign; the ledger holds everything that happened."""

    name: str
    model: str
    """Physics preset: a name from ``models/`` or a path to a preset TOML file."""
    targets: tuple[Target, ...]
    """What to make: one or more sizes (each its own tolerance, PDI ceiling and repeats)."""
    bounds: dict[str, tuple[float, float]]
    """Search envelope per parameter (inclusive), in the unit its name carries."""
    seed: int = 0
    rig: RigSettings = field(default_factory=RigSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    ledger_url: str | None = None
    """``sqlite:///PATH`` or ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE``; None means
    ``sqlite:///<campaign dir>/ledger.sqlite``."""
    plausible: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Overrides of the preset's plausible ranges (``[plausible]``), for a truly unusual system."""
    context: dict[str, ContextVariable] = field(default_factory=dict)
    """Declared context variables (``[context]``); empty: any name is accepted at first use."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        check_targets(self.targets)
        if set(self.bounds) != set(PARAMETERS):
            raise SpecError(f"bounds must give exactly {', '.join(PARAMETERS)}; got {', '.join(self.bounds)}.")
        for name, (low, high) in self.bounds.items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise SpecError(f"bounds {name}=[{low}, {high}] must be finite with low < high.")
            if name != "temperature_c" and low <= 0:
                raise SpecError(f"bounds {name}=[{low}, {high}] must be positive.")

    @property
    def target(self) -> Target:
        """The first target (the only one in a single-size campaign)."""
        return self.targets[0]

    def with_target(self, **changes: Any) -> CampaignSpec:
        """Change the first target."""
        return replace(self, targets=(replace(self.target, **changes), *self.targets[1:]))

    def with_added_target(self, target: Target) -> CampaignSpec:
        """A copy with one more target (checked: not the same size as another)."""
        return replace(self, targets=(*self.targets, target))

    def to_toml(self) -> str:
        """Serialise to TOML text that :func:`parse_spec` reads back to an equal spec."""
        lines = [
            "# supraopt campaign: edit with care; the ledger beside this file holds the results.",
            f"name = {_toml_value(self.name)}",
            f"model = {_toml_value(self.model)}",
            f"seed = {self.seed}",
        ]
        if self.ledger_url is not None:
            lines.append(f"ledger_url = {_toml_value(self.ledger_url)}")
        single = len(self.targets) == 1 and self.target.confirm == 0
        for target in self.targets:
            lines += ["", "[target]" if single else "[[targets]]"]
            lines += [
                f"diameter_nm = {target.diameter_nm!r}",
                f"tolerance = {target.tolerance!r}          # relative size tolerance",
                f"pdi_max_pct = {target.pdi_max_pct!r}        # polydispersity ceiling, percent",
            ]
            if not single:
                lines.append(f"confirm = {target.confirm}          # repeats of the hitting recipe")
        lines += ["", "[bounds]   # search envelope, inclusive"]
        for name in PARAMETERS:
            low, high = self.bounds[name]
            lines.append(f"{name} = [{low!r}, {high!r}]   # {UNITS[name]}")
        lines += ["", "[rig]", f"adapter = {_toml_value(self.rig.adapter)}", "", "[rig.options]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.rig.options.items()]
        loop = self.loop
        lines += [
            "",
            "[loop]",
            f"budget = {loop.budget}",
            f"batch = {loop.batch}",
            f"stop_on_hit = {_toml_value(loop.stop_on_hit)}",
            f"poll_interval_s = {loop.poll_interval_s!r}",
            f"rig_timeout_s = {loop.rig_timeout_s!r}",
            f"max_rig_errors = {loop.max_rig_errors}",
        ]
        if self.plausible:
            lines += ["", "[plausible]   # overrides of the preset's plausible ranges: only for a truly unusual system"]
            lines += [f"{k} = [{low!r}, {high!r}]" for k, (low, high) in self.plausible.items()]
        if self.context:
            lines += ["", "[context]   # conditions recorded, not set: category or number"]
            for name, var in self.context.items():
                value = _toml_value(var.kind)
                if var.unit:
                    value = f"{{ kind = {value}, unit = {_toml_value(var.unit)} }}"
                lines.append(f"{name} = {value}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise SpecError(f"cannot write {value!r} to TOML: use numbers, text, booleans or lists.")


def preset_path(model: str) -> Path:
    """Resolve a preset name (``models/NAME.toml``) or a path to a preset file."""
    path = Path(model)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = MODELS_DIR / f"{model}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.toml")))
    raise SpecError(f"unknown model preset {model!r}: choose one of {known} or give a path to a .toml file.")


def resolve_model(model: str, directory: Path | None) -> str:
    """A preset name, or a preset file path relative to the campaign folder (kept relocatable)."""
    if directory is not None and model.endswith(".toml") and (Path(directory) / model).is_file():
        return str(Path(directory) / model)
    return model


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SpecError(f"{path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path} is not valid TOML: {error}.") from None
    except UnicodeDecodeError as error:
        raise SpecError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
    except RecursionError:
        raise SpecError(f"{path} nests arrays or tables too deeply to be a campaign or preset file.") from None
    except OSError as error:
        raise SpecError(f"{path} cannot be read ({error.strerror or error}).") from None


# --- strict readers: every value is checked for its type, every error names the file, table and key ---

TOP_LEVEL = {
    "name",
    "model",
    "seed",
    "ledger_url",
    "target",
    "bounds",
    "rig",
    "loop",
    "plausible",
    "context",
    "targets",
}
"""Keys allowed at the top of campaign.toml; a new table adds its name here and a ``_parse_<table>``."""

_MISSING: Any = object()


class _Reader:
    """One table of campaign.toml, read strictly: its errors say ``<file>: [table] key=value must be ...``."""

    def __init__(self, data: Any, source: str, table: str) -> None:
        self.source, self.name = source, table
        if not isinstance(data, dict):
            raise self.error(f"{self.label} must be a table (key = value lines under [{table}]), not {data!r}")
        self.data = data

    @property
    def label(self) -> str:
        return f"[{self.name}]" if self.name else "the top level"

    def error(self, message: str) -> SpecError:
        return SpecError(f"{self.source}: {message}.")

    def bad(self, key: str, value: Any, expected: str) -> SpecError:
        where = f"[{self.name}] " if self.name else ""
        return self.error(f"{where}{key}={value!r} must be {expected}")

    def only(self, known: Any) -> None:
        unknown = set(self.data) - set(known)
        if unknown:
            raise self.error(
                f"unknown key(s) in {self.label}: {', '.join(sorted(unknown))}; "
                f"expected some of {', '.join(sorted(known))}"
            )

    def get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            where = f"[{self.name}] " if self.name else ""
            raise self.error(f"missing required key {where}{key!r}")
        return default

    def real(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, default)
        if not (_is_real(value) and math.isfinite(value)):
            raise self.bad(key, value, "a finite number")
        return float(value)

    def integer(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, default)
        if not _is_int(value):
            raise self.bad(key, value, "an integer")
        return int(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false (without quotes)")
        return value

    def text(self, key: str, default: Any = _MISSING, *, empty: bool = False) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise self.bad(key, value, "a non-empty text in quotes" if not empty else "a text in quotes")
        return value

    def table(self, key: str, default: Any = _MISSING) -> _Reader:
        name = f"{self.name}.{key}" if self.name else key
        return _Reader(self.get(key, default), self.source, name)

    def pair(self, key: str) -> tuple[float, float]:
        value = self.data[key]
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(_is_real(v) and math.isfinite(v) for v in value)
            and value[0] < value[1]
        ):
            raise self.bad(key, value, "a [low, high] pair of finite numbers with low < high")
        return float(value[0]), float(value[1])


def _parse_bounds(reader: _Reader, model: str) -> dict[str, tuple[float, float]]:
    if not reader.data:
        return default_bounds(model)
    reader.only(PARAMETERS)
    missing = [name for name in PARAMETERS if name not in reader.data]
    if missing:
        raise reader.error(f"[bounds] must give all of {', '.join(PARAMETERS)}; {', '.join(missing)} is missing")
    return {name: reader.pair(name) for name in PARAMETERS}


def _parse_rig(reader: _Reader) -> RigSettings:
    reader.only({"adapter", "options"})
    return RigSettings(reader.text("adapter", "simulated"), dict(reader.table("options", {}).data))


def _parse_loop(reader: _Reader) -> LoopSettings:
    defaults = LoopSettings()
    reader.only({f.name for f in fields(LoopSettings)})
    try:
        return LoopSettings(
            budget=reader.integer("budget", defaults.budget),
            batch=reader.integer("batch", defaults.batch),
            stop_on_hit=reader.boolean("stop_on_hit", defaults.stop_on_hit),
            poll_interval_s=reader.real("poll_interval_s", defaults.poll_interval_s),
            rig_timeout_s=reader.real("rig_timeout_s", defaults.rig_timeout_s),
            max_rig_errors=reader.integer("max_rig_errors", defaults.max_rig_errors),
        )
    except SpecError as error:
        raise reader.error(str(error).rstrip(".")) from None


def _parse_plausible(reader: _Reader) -> dict[str, tuple[float, float]]:
    reader.only(PLAUSIBLE)
    return {name: reader.pair(name) for name in reader.data}


def parse_spec(data: dict[str, Any], source: str = "campaign.toml", directory: Path | None = None) -> CampaignSpec:
    """Build and validate a spec from parsed TOML; errors name the file, table, key and value."""
    top = _Reader(data, source, "")
    top.only(TOP_LEVEL)
    model = top.text("model")
    resolved = resolve_model(model, directory)
    preset_path(resolved)  # fail early on an unknown preset
    ledger_url = top.get("ledger_url", None)
    spec = CampaignSpec(
        name=top.text("name", "campaign", empty=True),
        model=model,
        targets=parse_targets(data, source),
        bounds=_parse_bounds(top.table("bounds", {}), resolved),
        seed=top.integer("seed", 0),
        rig=_parse_rig(top.table("rig", {})),
        loop=_parse_loop(top.table("loop", {})),
        ledger_url=None if ledger_url is None else top.text("ledger_url"),
        plausible=_parse_plausible(top.table("plausible", {})),
        context=parse_context(data.get("context", {}), source),
    )
    try:
        check_plausible(spec, plausible_ranges(resolved, spec.plausible))
    except SpecError as error:
        raise SpecError(f"{source}: {error}") from None
    return spec


def plausible_ranges(model: str, overrides: dict[str, tuple[float, float]] | None = None) -> Plausible:
    """What a rig of this kind can measure and set: supraopt's defaults, the preset's ``[plausible]``, then ``overrides``."""
    path = preset_path(model)
    ranges = dict(PLAUSIBLE)
    preset = _Reader(read_toml(path).get("plausible", {}), str(path), "plausible")
    ranges.update(_parse_plausible(preset))
    ranges.update(overrides or {})
    return Plausible(ranges)


def check_plausible(spec: CampaignSpec, plausible: Plausible) -> None:
    """Refuse a target or bounds that no rig of this kind can reach (a fraction given as a percent, ...)."""
    try:
        for target in spec.targets:
            plausible.check("diameter_nm", target.diameter_nm, "[target]")
            plausible.check("pdi_pct", target.pdi_max_pct, "[target] pdi_max_pct")
    except InputError as error:
        raise SpecError(str(error).replace("pdi_max_pct: pdi_pct", "pdi_max_pct")) from None
    for name, (low, high) in spec.bounds.items():
        p_low, p_high = plausible.ranges[name]
        if low < p_low or high > p_high:
            raise SpecError(
                f"[bounds] {name}=[{low:g}, {high:g}] {UNITS[name]} is not plausible for this rig "
                f"(expected within [{p_low:g}, {p_high:g}]); narrow it, or, for a truly unusual system, "
                f"widen [plausible] {name}."
            )


def parse_targets(data: dict[str, Any], source: str) -> tuple[Target, ...]:
    """The ``[target]`` table (one size) or the ``[[targets]]`` array of tables (several)."""
    if "target" in data and "targets" in data:
        raise SpecError(f"{source}: give either [target] or [[targets]], not both.")
    if "targets" in data:
        tables, where = data["targets"], "[[targets]]"
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise SpecError(f"{source}: [[targets]] must be one or more tables with diameter_nm = ...; got {tables!r}.")
    elif "target" in data:
        tables, where = [data["target"]], "[target]"
        if not isinstance(data["target"], dict):
            raise SpecError(f"{source}: [target] must be a table with diameter_nm = ...; got {data['target']!r}.")
    else:
        raise SpecError(f"{source}: missing required key 'target' (or [[targets]]).")
    targets = tuple(_parse_target(table, source, where) for table in tables)
    try:
        check_targets(targets)
    except SpecError as error:
        raise SpecError(f"{source}: {error}") from None
    return targets


def _parse_target(table: dict[str, Any], source: str, where: str) -> Target:
    unknown = set(table) - {"diameter_nm", "tolerance", "pdi_max_pct", "confirm"}
    if unknown:
        raise SpecError(
            f"{source}: unknown key(s) in {where}: {', '.join(sorted(unknown))}; "
            "expected diameter_nm, tolerance, pdi_max_pct, confirm."
        )
    if "diameter_nm" not in table:
        raise SpecError(f"{source}: missing required key {where} 'diameter_nm'.")
    where = f"{source}: {where}"
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "confirm":
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"{where}: confirm={value!r} must be a whole number of repeats.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{where} {key}={value!r} must be a finite number.")
        values[key] = value if key == "confirm" else float(value)
    try:
        return Target(**values)
    except SpecError as error:
        raise SpecError(f"{where}: {error}") from None


def load_spec(directory: Path) -> CampaignSpec:
    """Read ``DIR/campaign.toml``; a missing folder or file gets a one-line error."""
    path = Path(directory) / SPEC_FILE
    try:
        found = path.is_file()
    except OSError as error:
        raise SpecError(f"{directory} cannot be opened as a campaign folder ({error.strerror or error}).") from None
    if not found:
        raise SpecError(f"{directory} is not a campaign folder (no {SPEC_FILE}); create one with 'supraopt init'.")
    return parse_spec(read_toml(path), str(path), Path(directory))


def default_bounds(model: str) -> dict[str, tuple[float, float]]:
    """The rig envelope a preset ships with."""
    data = read_toml(preset_path(model))
    try:
        return {name: (float(data["bounds"][name][0]), float(data["bounds"][name][1])) for name in PARAMETERS}
    except (KeyError, IndexError, TypeError, ValueError):
        raise SpecError(f"preset {model!r} has no valid [bounds] for {', '.join(PARAMETERS)}.") from None
