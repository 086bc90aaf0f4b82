"""What the runner reports: why it stopped (:class:`RunSummary`) and each thing that happened (:class:`Event`).

These are plain records: the CLI's progress display and ``run.log`` are built from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from supraopt.records import PARAMETERS, UNITS, Failure, Measurement


class StopReason(StrEnum):
    """Why :func:`run_campaign` returned."""

    HIT = "hit"
    BUDGET = "budget"
    INTERRUPTED = "interrupted"
    """Ctrl-C: experiments in flight stay DISPATCHED/RUNNING; run again to resume."""
    RIG_ERROR = "rig error"
    """Too many rig errors (or experiments without a result) in a row."""
    ADAPTER_ERROR = "adapter error"
    """The adapter's code raised something no rig fault raises (a bug): stopped at once, runs kept in flight."""
    OUT_OF_REACH = "out of reach"
    """The data say no setting inside the envelope makes the remaining target(s)."""


EXIT_CODES = {
    StopReason.HIT: 0,
    StopReason.BUDGET: 0,
    StopReason.INTERRUPTED: 130,
    StopReason.RIG_ERROR: 2,
    StopReason.ADAPTER_ERROR: 2,
    StopReason.OUT_OF_REACH: 3,
}


@dataclass(frozen=True)
class Best:
    """The measured experiment closest to the target."""

    experiment_id: str
    diameter_nm: float
    pdi_pct: float


@dataclass(frozen=True)
class TargetOutcome:
    """Where one target stands when the runner stops."""

    diameter_nm: float
    label: str
    """The target as ``450 nm ± 3 %, PDI ≤ 6 %``."""
    hit: bool
    confirm: int
    """Repeats the target asks for (0: a hit is enough)."""
    confirmed: bool
    first_hit: str | None
    """The hit whose result was recorded first (see :attr:`CampaignStatus.first_hit`)."""
    best: Best | None
    """The measured run closest to this target."""

    def verdict(self) -> str:
        """``hit by E003``, ``not hit``, or with repeats ``confirmed, first hit E003``."""
        if not self.hit:
            return "not hit"
        if self.confirm:
            return f"{'confirmed' if self.confirmed else 'hit, not confirmed'}, first hit {self.first_hit}"
        return f"hit by {self.first_hit}"

    def short(self) -> str:
        """``450 nm hit by E003``: the target in a one-line stop message."""
        return f"{self.diameter_nm:g} nm {self.verdict()}"

    def text(self) -> str:
        """The target's line in the closing summary: verdict, first hit and closest run."""
        line = f"{self.label}: {self.verdict()}"
        if self.best is not None:
            b = self.best
            line += f"; closest {b.experiment_id} at {b.diameter_nm:.0f} nm, PDI {b.pdi_pct:.1f} %"
        return line + "."


@dataclass(frozen=True)
class RunSummary:
    """What a run of the loop achieved and why it stopped."""

    experiments_used: int
    """Finished experiments (done + failed) in the ledger: what the budget counts."""
    hit: bool
    """Whether some measured experiment hits the target."""
    best: Best | None
    reason: StopReason
    message: str
    """One line saying why the runner stopped and, where it helps, what to do next."""
    in_flight: tuple[str, ...] = ()
    """Experiments left DISPATCHED/RUNNING in the ledger (picked up by the next run)."""
    targets: tuple[TargetOutcome, ...] = ()
    """Every target's outcome, in the spec's order."""

    @property
    def exit_code(self) -> int:
        """0 on a hit or the budget, 130 on Ctrl-C, 2 when the rig or its adapter failed."""
        return EXIT_CODES[self.reason]


@dataclass(frozen=True)
class Event:
    """One thing that happened in the loop, for the progress display and ``run.log``."""

    kind: str
    """rig, started, resumed, warning, suggested, resuming (a pending experiment dispatched at last),
    submitted, resubmitted, running, measured, failed, abandoned, refused, rig error, adapter error, stopped."""
    experiment_id: str | None = None
    settings: dict[str, float] = field(default_factory=dict)
    prediction: dict[str, float] = field(default_factory=dict)
    """What the model expected (diameter_nm, diameter_sd_nm, pdi_pct, p_hit, ...)."""
    result: Measurement | Failure | None = None
    hit: bool | None = None
    """For a measurement: whether it hits the target."""
    best: Best | None = None
    """Best experiment so far, after this event."""
    message: str = ""

    def text(self) -> str:
        """The event on one line (what ``run.log`` holds)."""
        parts = [self.experiment_id or "--", self.kind]
        if self.kind == "resuming":
            parts = [f"resuming {self.experiment_id}:"]
        if self.kind in ("suggested", "resuming"):
            parts.append(settings_text(self.settings))
            if self.prediction:
                parts.append(f"-> predicted {prediction_text(self.prediction)}")
        elif isinstance(self.result, Measurement):
            m = self.result
            parts.append(f"{m.diameter_nm:.0f} nm, PDI {m.pdi_pct:.1f} %")
            parts.append("HIT" if self.hit else "miss")
        elif isinstance(self.result, Failure):
            parts.append(f"({self.result.reason})")
        if self.message:
            parts.append(self.message)
        if self.best is not None and self.kind in ("measured", "failed"):
            parts.append(
                f"| best {self.best.experiment_id}: {self.best.diameter_nm:.0f} nm, PDI {self.best.pdi_pct:.1f} %"
            )
        return " ".join(parts)


Progress = Callable[[Event], None]


def settings_text(settings: dict[str, float]) -> str:
    return ", ".join(f"{name}={settings[name]:.4g} {UNITS[name]}" for name in PARAMETERS if name in settings)


def prediction_text(prediction: dict[str, float]) -> str:
    p = prediction
    text = f"{p.get('diameter_nm', math.nan):.0f} ± {p.get('diameter_sd_nm', math.nan):.0f} nm"
    if "pdi_pct" in p:
        text += f", PDI {p['pdi_pct']:.1f} %"
    if "p_hit" in p:
        text += f", P(hit) {p['p_hit']:.2f}"
    return text
