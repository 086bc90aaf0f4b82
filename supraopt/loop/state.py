"""The runner's working state and the few operations every phase shares.

:class:`Runner` holds what one ``supraopt run`` knows beyond the ledger: the experiments it waits for,
the rig's limits once known, error counters and the log. Everything in it can be rebuilt from the
ledger, which is why a restart loses nothing. The phases (:mod:`~supraopt.loop.dispatch`,
:mod:`~supraopt.loop.collect`, :mod:`~supraopt.loop.runner`) are functions of a ``Runner``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO

from supraopt.campaign import Campaign
from supraopt.errors import LedgerError, RigError
from supraopt.ledger import OPEN, Experiment, Ledger, Status
from supraopt.loop.events import Best, Event, Progress, RunSummary, StopReason
from supraopt.loop.rigcall import RigCall, crash_point
from supraopt.records import Failure, Measurement, RigLimits
from supraopt.rigs.base import Rig
from supraopt.spec import LoopSettings, Target

MIN_BACKOFF_S = 0.5
"""Shortest wait before retrying a failed rig call (even with ``poll_interval_s = 0``)."""
MAX_BACKOFF_S = 600.0
"""Longest wait between two retries after rig errors."""


class Stop(Exception):
    """Raised by any phase to end the run with a reason and a one-line message."""

    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Flight:
    """An experiment the runner is waiting for."""

    experiment: Experiment
    running: bool
    """The ledger already says RUNNING."""
    due: float
    """Clock time of the next poll."""
    resubmitted: bool = False
    """A submit after a LOST reply went through: a second LOST abandons the experiment."""

    @property
    def id(self) -> str:
        return self.experiment.id


@dataclass
class RigCalls:
    """The adapter's methods, each behind its own timeout (:class:`RigCall`)."""

    limits: RigCall
    submit: RigCall
    poll: RigCall

    @classmethod
    def wrap(cls, rig: Rig, timeout_s: float) -> RigCalls:
        return cls(
            RigCall("limits", rig.limits, timeout_s),
            RigCall("submit", rig.submit, timeout_s),
            RigCall("poll", rig.poll, timeout_s),
        )


@dataclass
class Runner:
    """One run of the loop over one campaign and one rig."""

    campaign: Campaign
    settings: LoopSettings
    rig: RigCalls
    progress: Progress | None
    sleep: Callable[[float], None]
    clock: Callable[[], float]
    flights: dict[str, Flight] = field(default_factory=dict)
    limits: RigLimits | None = None
    """The rig's limits, once it has told them."""
    limits_due: float = -math.inf
    """Clock time of the next ``rig.limits()`` attempt after an error."""
    rig_errors: dict[str, int] = field(default_factory=dict)
    """Rig method -> calls of it that failed in a row."""
    empty_in_a_row: int = 0
    """Experiments in a row that ended without a result (refused, lost, cancelled, invalid)."""
    best: Best | None = None
    hit: bool = False
    finished: int = 0
    """Done + failed experiments in the ledger: what the budget counts."""
    log: IO[str] | None = None

    @property
    def ledger(self) -> Ledger:
        return self.campaign.ledger

    @property
    def target(self) -> Target:
        return self.campaign.spec.target

    # ------------------------------------------------------------------ reading the ledger

    def refresh(self) -> None:
        """Re-read what the budget and the stop rule need: finished count, hit, best."""
        state = self.campaign.status()
        self.finished = state.counts.get(Status.DONE.value, 0) + state.counts.get(Status.FAILED.value, 0)
        self.hit = state.hit
        m = state.best.measurement if state.best is not None else None
        self.best = None if m is None or state.best is None else Best(state.best.id, m.diameter_nm, m.pdi_pct)

    def open_in_flight(self) -> list[str]:
        return [e.id for e in self.ledger.experiments([Status.DISPATCHED, Status.RUNNING])]

    def still_open(self, experiment_id: str) -> bool:
        """Whether the ledger still waits for a result; if not (a person recorded it), stop tracking it."""
        current = self.ledger.get(experiment_id)
        if current.status in OPEN:
            return True
        self.taken_elsewhere(current)
        return False

    def taken_elsewhere(self, current: Experiment) -> None:
        """Someone else (a person, another process) finished ``current``: report it, stop tracking it."""
        self.flights.pop(current.id, None)
        self.refresh()
        result: Measurement | Failure | None = current.measurement if current.status is Status.DONE else current.failure
        if result is None:
            self.emit(Event(str(current.status), current.id, message=f"by someone else: {current.note}"))
            return
        self.empty_in_a_row = 0
        hit = isinstance(result, Measurement) and any(
            t.is_hit(result.diameter_nm, result.pdi_pct) for t in self.campaign.spec.targets
        )
        kind = "measured" if isinstance(result, Measurement) else "failed"
        self.emit(Event(kind, current.id, result=result, hit=hit, best=self.best, message="(recorded by hand)"))

    # ------------------------------------------------------------------ ending experiments without a result

    def abandon(self, experiment_id: str, reason: str, *, refused: bool = False) -> None:
        """Give up on an experiment (refused, lost, invalid result); stop after too many in a row."""
        self.flights.pop(experiment_id, None)
        try:
            self.ledger.abandon(experiment_id, reason)
        except LedgerError:
            current = self.ledger.get(experiment_id)
            if current.status in OPEN:
                raise
            self.taken_elsewhere(current)
            return
        crash_point("after_abandon")
        self.emit(Event("refused" if refused else "abandoned", experiment_id, message=reason))
        self.empty_in_a_row += 1
        if self.empty_in_a_row >= self.settings.max_rig_errors:
            advice = (
                "narrow [bounds] in campaign.toml to the rig limits"
                if refused
                else "check the rig, then run the same command again"
            )
            raise Stop(
                StopReason.RIG_ERROR,
                f"{self.empty_in_a_row} experiments in a row ended without a result (last: {experiment_id}, "
                f"{reason.rstrip('.')}); {advice}.",
            )

    # ------------------------------------------------------------------ rig errors

    def rig_error(self, error: BaseException, call: str, experiment_id: str | None = None) -> float:
        """Count a failed rig call; stop after too many in a row; return the seconds to wait before retrying."""
        count = self.rig_errors[call] = self.rig_errors.get(call, 0) + 1
        what = f"rig.{call}({experiment_id!r})" if experiment_id else f"rig.{call}()"
        if isinstance(error, TimeoutError):
            text = f"no answer from {what} ({clause(error)}): state unknown, asking again"
        elif isinstance(error, RigError):
            text = f"{what} failed: {clause(error)}"
        else:
            text = f"{what} raised {type(error).__name__}: {clause(error)}"
        limit = self.settings.max_rig_errors
        if count >= limit:
            self.emit(Event("rig error", experiment_id, message=f"({count}/{limit}) {text}."))
            left = self.open_in_flight()
            tail = f"; {', '.join(left)} kept in flight" if left else ""
            raise Stop(
                StopReason.RIG_ERROR,
                f"the rig failed {count} times in a row (last: {text}){tail}; "
                "fix the rig, then run the same command again to resume.",
            )
        interval = max(self.settings.poll_interval_s, MIN_BACKOFF_S)
        delay = min(interval * 2 ** (count - 1), max(MAX_BACKOFF_S, interval))
        self.emit(Event("rig error", experiment_id, message=f"({count}/{limit}) {text}; retry in {delay:g} s."))
        return delay

    def rig_ok(self, call: str) -> None:
        self.rig_errors[call] = 0

    # ------------------------------------------------------------------ output

    def emit(self, event: Event) -> None:
        """Append the event to ``run.log`` and show it."""
        if self.log is not None:
            self.log.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {event.text()}\n")
            self.log.flush()
        if self.progress is not None:
            self.progress(event)

    def finish(self, reason: StopReason, message: str) -> RunSummary:
        self.refresh()
        summary = RunSummary(self.finished, self.hit, self.best, reason, message, tuple(self.open_in_flight()))
        self.emit(Event("stopped", best=self.best, message=message))
        return summary


def clause(error: BaseException) -> str:
    """An exception's message as a clause for a one-line message."""
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ")
