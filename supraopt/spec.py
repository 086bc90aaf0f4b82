"""The campaign spec: what to make, in which envelope, on which rig. Stored as ``campaign.toml``.

A campaign folder holds ``campaign.toml`` (this spec) and the ledger (``ledger.sqlite`` unless
``[ledger] url`` names another database). The spec is validated on load: every error names the
bad key and value.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supraopt.errors import SpecError
from supraopt.records import PARAMETERS, UNITS, validate_context

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

    def __post_init__(self) -> None:
        if not (math.isfinite(self.diameter_nm) and 0 < self.diameter_nm < 1e7):
            raise SpecError(f"target diameter_nm={self.diameter_nm} must be a positive size in nm.")
        if not (math.isfinite(self.tolerance) and 0 < self.tolerance < 0.5):
            raise SpecError(f"target tolerance={self.tolerance} must be a fraction in (0, 0.5), e.g. 0.03.")
        if not (math.isfinite(self.pdi_max_pct) and 0 < self.pdi_max_pct <= 100):
            raise SpecError(f"target pdi_max_pct={self.pdi_max_pct} must be a percentage in (0, 100].")

    def is_hit(self, diameter_nm: float, pdi_pct: float) -> bool:
        """True when a measured run satisfies both the size tolerance and the PDI ceiling."""
        return abs(diameter_nm / self.diameter_nm - 1.0) <= self.tolerance and pdi_pct <= self.pdi_max_pct


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
    target: Target
    bounds: dict[str, tuple[float, float]]
    """Search envelope per parameter (inclusive), in the unit its name carries."""
    seed: int = 0
    rig: RigSettings = field(default_factory=RigSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    ledger_url: str | None = None
    """SQLAlchemy URL; None means ``sqlite:///<campaign dir>/ledger.sqlite``."""
    context: dict[str, ContextVariable] = field(default_factory=dict)
    """Declared context variables (``[context]``); empty: any name is accepted at first use."""

    def __post_init__(self) -> None:
        if set(self.bounds) != set(PARAMETERS):
            raise SpecError(f"bounds must give exactly {', '.join(PARAMETERS)}; got {', '.join(self.bounds)}.")
        for name, (low, high) in self.bounds.items():
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise SpecError(f"bounds {name}=[{low}, {high}] must be finite with low <= high.")
            if name != "temperature_c" and low <= 0:
                raise SpecError(f"bounds {name}=[{low}, {high}] must be positive.")

    def with_target(self, **changes: Any) -> CampaignSpec:
        return replace(self, target=replace(self.target, **changes))

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
        lines += ["", "[target]"]
        lines += [
            f"diameter_nm = {self.target.diameter_nm!r}",
            f"tolerance = {self.target.tolerance!r}          # relative size tolerance",
            f"pdi_max_pct = {self.target.pdi_max_pct!r}        # polydispersity ceiling, percent",
            "",
            "[bounds]   # search envelope, inclusive",
        ]
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


def parse_spec(data: dict[str, Any], source: str = "campaign.toml", directory: Path | None = None) -> CampaignSpec:
    """Build and validate a spec from parsed TOML; errors name the file, key and value."""
    known = {"name", "model", "seed", "ledger_url", "target", "bounds", "rig", "loop", "context"}
    unknown = set(data) - known
    if unknown:
        raise SpecError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(known))}."
        )
    try:
        model = str(data["model"])
        target_data = dict(data["target"])
    except KeyError as missing:
        raise SpecError(f"{source}: missing required key {missing.args[0]!r}.") from None
    resolved = resolve_model(model, directory)
    preset_path(resolved)  # fail early on an unknown preset
    try:
        target = Target(**{k: float(v) for k, v in target_data.items()})
    except TypeError as error:
        raise SpecError(f"{source}: bad [target] table {target_data!r}: {error}.") from None
    except SpecError as error:
        raise SpecError(f"{source}: {error}") from None
    except ValueError as error:
        raise SpecError(f"{source}: [target] values must be numbers: {target_data!r}.") from error
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
        target=target,
        bounds=bounds,
        seed=seed,
        rig=rig,
        loop=loop,
        ledger_url=None if ledger_url is None else str(ledger_url),
        context=parse_context(data.get("context", {}), source),
    )


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
