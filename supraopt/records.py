"""Plain, frozen, JSON-able records shared by the optimiser, the ledger and the rigs.

Rig adapters depend only on this module and :mod:`supraopt.errors` (never on torch), so a lab
engineer can write one without knowing anything about Bayesian optimisation.

Units are in the field names: diameters in nm (``diameter_nm``) or µm (``droplet_um``),
polydispersity as a coefficient of variation in percent (``pdi_pct``: 5.0 means 5 %).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from supraopt.errors import InputError

PARAMETERS: tuple[str, ...] = ("concentration_mg_ml", "flow_ratio", "temperature_c")
"""The controls supraopt optimises, in the order used for tensors."""

UNITS: dict[str, str] = {
    "concentration_mg_ml": "mg/mL",
    "flow_ratio": "Q_c/Q_d",
    "temperature_c": "°C",
}


ContextValue = str | float
"""One context value: a category level (text, e.g. chip "B") or a measured number (e.g. 23.5 °C)."""
Context = dict[str, ContextValue]
"""Conditions an experiment ran under that supraopt does not set: name -> level or number."""

_CONTEXT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")


def validate_context(data: object, where: str = "context") -> Context:
    """Return ``data`` as a plain :data:`Context`, or raise :class:`InputError` naming the bad entry.

    Names are identifiers (a letter, then letters, digits or ``_``; at most 40 characters); values
    are non-empty texts (category levels, stripped) or finite numbers (not booleans).
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{where}={data!r} must be a mapping of name -> level or number.")
    out: Context = {}
    for name, value in data.items():
        if not isinstance(name, str) or not _CONTEXT_NAME.match(name):
            raise InputError(
                f"{where} name {name!r} must start with a letter and hold only letters, digits or _ (e.g. chip, room_c)."
            )
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InputError(f"{where} {name}={value!r} must be a text level or a number.")
        if isinstance(value, str):
            if not value.strip() or len(value) > 200:
                raise InputError(f"{where} {name}={value!r} must be a non-empty text of at most 200 characters.")
            out[name] = value.strip()
        else:
            if not math.isfinite(value):
                raise InputError(f"{where} {name}={value} must be a finite number.")
            out[name] = float(value)
    return out


def _finite(name: str, value: float, low: float, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number.") from None
    if not math.isfinite(value) or not low < value < high:
        raise InputError(f"{name}={value} is not plausible: expected a value in ({low:g}, {high:g}).")
    return value


@dataclass(frozen=True)
class Proposal:
    """One experiment to run: the settings the rig must apply, keyed by a stable id."""

    experiment_id: str
    """Stable id of the experiment; a rig must treat a second submit with it as a no-op."""
    settings: dict[str, float]
    """Parameter name (see :data:`PARAMETERS`) -> value in the unit its name carries."""
    context: Context = field(default_factory=dict)
    """Conditions the experiment is meant to run under (chip, NC batch, ...); may be empty."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"experiment_id": self.experiment_id, "settings": dict(self.settings)}
        if self.context:
            data["context"] = dict(self.context)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Proposal:
        context = validate_context(data.get("context"))
        return cls(str(data["experiment_id"]), {k: float(v) for k, v in data["settings"].items()}, context)


@dataclass(frozen=True)
class Measurement:
    """What the rig measured for one successful run."""

    diameter_nm: float
    """Mean supraparticle diameter."""
    pdi_pct: float
    """Polydispersity: coefficient of variation of the SP diameter, in percent."""
    n_particles: int | None = None
    """Number of particles sized; sets the measurement's standard error when given."""
    droplet_um: float | None = None
    """Mean droplet diameter measured in-line, when the rig has a camera."""
    context: Context | None = None
    """Conditions the rig reports for this run (chip, NC batch, room temperature...); they override
    the proposal's context in the ledger."""

    def __post_init__(self) -> None:
        _finite("diameter_nm", self.diameter_nm, 0.0, 1e7)
        _finite("pdi_pct", self.pdi_pct, -1e-12, 200.0)
        if self.n_particles is not None and (
            not isinstance(self.n_particles, int) or isinstance(self.n_particles, bool) or self.n_particles < 2
        ):
            raise InputError(f"n_particles={self.n_particles!r} must be an integer of at least 2.")
        if self.droplet_um is not None:
            _finite("droplet_um", self.droplet_um, 0.0, 1e5)
        if self.context is not None:
            object.__setattr__(self, "context", validate_context(self.context, "measurement context") or None)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        n = data.get("n_particles")
        drop = data.get("droplet_um")
        return cls(
            diameter_nm=data["diameter_nm"],
            pdi_pct=data["pdi_pct"],
            n_particles=None if n is None else int(n),
            droplet_um=None if drop is None else float(drop),
            context=validate_context(data.get("context"), "measurement context") or None,
        )


@dataclass(frozen=True)
class Failure:
    """A run whose chemistry failed (no usable SPs). Information for the feasibility model."""

    reason: str
    """Free text, e.g. "droplets unstable" or "hollow particles"."""

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise InputError(f"failure reason={self.reason!r} must be a non-empty text.")

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason}


class RunState(StrEnum):
    """What a rig knows about a submitted run."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    """Finished with a :class:`Measurement`."""
    FAILED = "failed"
    """Finished, the chemistry failed: carries a :class:`Failure`."""
    LOST = "lost"
    """The rig has no run under this id (never received, or lost): not a chemical result."""
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class RunStatus:
    """Answer of :meth:`Rig.poll`."""

    experiment_id: str
    state: RunState
    result: Measurement | Failure | None = None
    message: str = ""

    def __post_init__(self) -> None:
        if self.state is RunState.DONE and not isinstance(self.result, Measurement):
            raise InputError(f"run {self.experiment_id} is done but carries no measurement: {self.result!r}.")
        if self.state is RunState.FAILED and not isinstance(self.result, Failure):
            raise InputError(f"run {self.experiment_id} failed but carries no failure reason: {self.result!r}.")


@dataclass(frozen=True)
class RigLimits:
    """Hard safety limits of a rig: inclusive bounds per parameter, in the parameter's unit."""

    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def violations(self, settings: dict[str, float]) -> list[str]:
        """Return one message per setting outside the limits (empty when safe)."""
        problems = []
        for name, (low, high) in self.bounds.items():
            if name not in settings:
                problems.append(f"{name} is missing")
                continue
            value = settings[name]
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                problems.append(f"{name}={value} outside rig limits [{low:g}, {high:g}]")
        return problems

    def to_json(self) -> dict[str, list[float]]:
        return {k: [lo, hi] for k, (lo, hi) in self.bounds.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RigLimits:
        return cls({k: (float(v[0]), float(v[1])) for k, v in data.items()})


PLAUSIBLE: dict[str, tuple[float, float]] = {
    "diameter_nm": (5.0, 1e6),
    "pdi_pct": (0.5, 100.0),
    "n_particles": (2.0, 1e8),
    "droplet_um": (0.1, 1e4),
    "concentration_mg_ml": (1e-4, 1e3),
    "flow_ratio": (1e-3, 1e3),
    "temperature_c": (-60.0, 250.0),
}
"""What a microfluidic supraparticle rig can measure (results) or set (bounds), inclusive: the generic
default. A preset's ``[plausible]`` table narrows it for its rig, a campaign's ``[plausible]`` table
overrides both for a truly unusual system. Below 0.5 % a polydispersity is surely a fraction."""


@dataclass(frozen=True)
class Plausible:
    """Ranges of plausible results and settings (names as in :data:`PLAUSIBLE`); checks give one-line errors."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(PLAUSIBLE))

    def check(self, name: str, value: float, where: str = "") -> None:
        """Raise :class:`InputError` when ``value`` lies outside the plausible range of ``name``."""
        low, high = self.ranges[name]
        if low <= value <= high:
            return
        prefix = f"{where}: " if where else ""
        unit = {"diameter_nm": " nm", "pdi_pct": " %", "droplet_um": " µm"}.get(name, "")
        hint = f"if your system really gives this, widen [plausible] {name} in campaign.toml."
        if name == "pdi_pct" and 0 < value <= 1 and value < low:
            hint = (
                f"it looks like a fraction: a CV of {value:g} is {value * 100:g} %, so give {value * 100:g}. "
                f"For a truly tiny CV, lower [plausible] pdi_pct in campaign.toml."
            )
        raise InputError(f"{prefix}{name}={value:g}{unit} is not plausible (expected {low:g} to {high:g}); {hint}")

    def check_measurement(self, measurement: Measurement, where: str = "") -> None:
        """Check every field of a measurement that is given."""
        for name, value in measurement.to_json().items():
            if name in self.ranges:
                self.check(name, float(value), where)
