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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supraopt.errors import SpecError
from supraopt.records import PARAMETERS, UNITS

SPEC_FILE = "campaign.toml"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
"""Physics presets shipped with supraopt (``models/*.toml`` at the top of the repository)."""


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
        if not (isinstance(self.budget, int) and self.budget >= 1):
            raise SpecError(f"loop budget={self.budget!r} must be a positive integer.")
        if not (isinstance(self.batch, int) and 1 <= self.batch <= 64):
            raise SpecError(f"loop batch={self.batch!r} must be an integer between 1 and 64.")
        for name in ("poll_interval_s", "rig_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SpecError(f"loop {name}={value!r} must be a non-negative number of seconds.")
        if not (isinstance(self.max_rig_errors, int) and self.max_rig_errors >= 1):
            raise SpecError(f"loop max_rig_errors={self.max_rig_errors!r} must be a positive integer.")


@dataclass(frozen=True)
class RigSettings:
    """Which adapter runs the experiments, and the options passed to its constructor."""

    adapter: str = "simulated"
    """'simulated', 'manual', 'http' or a dotted path 'package.module:ClassName'."""
    options: dict[str, Any] = field(default_factory=dict)


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
    """SQLAlchemy URL; None means ``sqlite:///<campaign dir>/ledger.sqlite``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        check_targets(self.targets)
        if set(self.bounds) != set(PARAMETERS):
            raise SpecError(f"bounds must give exactly {', '.join(PARAMETERS)}; got {', '.join(self.bounds)}.")
        for name, (low, high) in self.bounds.items():
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise SpecError(f"bounds {name}=[{low}, {high}] must be finite with low <= high.")
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


def parse_spec(data: dict[str, Any], source: str = "campaign.toml", directory: Path | None = None) -> CampaignSpec:
    """Build and validate a spec from parsed TOML; errors name the file, key and value."""
    known = {"name", "model", "seed", "ledger_url", "target", "targets", "bounds", "rig", "loop"}
    unknown = set(data) - known
    if unknown:
        raise SpecError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(known))}."
        )
    try:
        model = str(data["model"])
    except KeyError as missing:
        raise SpecError(f"{source}: missing required key {missing.args[0]!r}.") from None
    targets = parse_targets(data, source)
    resolved = resolve_model(model, directory)
    preset_path(resolved)  # fail early on an unknown preset
    bounds_data = data.get("bounds") or default_bounds(resolved)
    try:
        bounds = {str(k): (float(v[0]), float(v[1])) for k, v in bounds_data.items()}
    except (TypeError, ValueError, IndexError, KeyError):
        raise SpecError(f"{source}: [bounds] entries must be [low, high] pairs of numbers: {bounds_data!r}.") from None
    rig_data = dict(data.get("rig", {}))
    loop_data = dict(data.get("loop", {}))
    try:
        rig = RigSettings(adapter=str(rig_data.pop("adapter", "simulated")), options=dict(rig_data.pop("options", {})))
        if rig_data:
            raise SpecError(f"{source}: unknown key(s) in [rig]: {', '.join(rig_data)}.")
        loop = LoopSettings(**loop_data)
    except TypeError as error:
        raise SpecError(f"{source}: bad [loop] table {loop_data!r}: {error}.") from None
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError(f"{source}: seed={seed!r} must be an integer.")
    ledger_url = data.get("ledger_url")
    return CampaignSpec(
        name=str(data.get("name", "campaign")),
        model=model,
        targets=targets,
        bounds=bounds,
        seed=seed,
        rig=rig,
        loop=loop,
        ledger_url=None if ledger_url is None else str(ledger_url),
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
            f"{source}: bad {where} table: unknown key(s) {', '.join(sorted(unknown))}; "
            "expected diameter_nm, tolerance, pdi_max_pct, confirm."
        )
    if "diameter_nm" not in table:
        raise SpecError(f"{source}: bad {where} table {table!r}: missing required key 'diameter_nm'.")
    where = f"{source}: {where}"
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "confirm":
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"{where}: confirm={value!r} must be a whole number of repeats.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: {key}={value!r} must be a number.")
        values[key] = value if key == "confirm" else float(value)
    try:
        return Target(**values)
    except SpecError as error:
        raise SpecError(f"{where}: {error}") from None


def load_spec(directory: Path) -> CampaignSpec:
    """Read ``DIR/campaign.toml``; a missing folder or file gets a one-line error."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise SpecError(f"{directory} is not a campaign folder (no {SPEC_FILE}); create one with 'supraopt init'.")
    return parse_spec(read_toml(path), str(path), Path(directory))


def default_bounds(model: str) -> dict[str, tuple[float, float]]:
    """The rig envelope a preset ships with."""
    data = read_toml(preset_path(model))
    try:
        return {name: (float(data["bounds"][name][0]), float(data["bounds"][name][1])) for name in PARAMETERS}
    except (KeyError, IndexError, TypeError, ValueError):
        raise SpecError(f"preset {model!r} has no valid [bounds] for {', '.join(PARAMETERS)}.") from None
