"""The runner's working state and the few operations every phase shares.

:class:`Runner` holds what one ``supraopt run`` knows beyond the ledger: the experiments it waits for,
the rig's limits once known, error counters and the log. Everything in it can be rebuilt from the
ledger, which is why a restart loses nothing. The phases (:mod:`~supraopt.loop.dispatch`,
:mod:`~supraopt.loop.collect`, :mod:`~supraopt.loop.runner`) are functions of a ``Runner``.
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from supraopt.campaign import Campaign, CampaignStatus
from supraopt.errors import LedgerError, RigError
from supraopt.ledger import OPEN, Experiment, Ledger, Status
from supraopt.loop.events import Best, Event, Progress, RunSummary, StopReason, TargetOutcome
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
    context: RigCall | None = None
    """The optional ``context()`` (chip, NC batch now mounted...), when the adapter has one."""

    @classmethod
    def wrap(cls, rig: Rig, timeout_s: float) -> RigCalls:
        context = getattr(rig, "context", None)
        return cls(
            RigCall("limits", rig.limits, timeout_s),
            RigCall("submit", rig.submit, timeout_s),
            RigCall("poll", rig.poll, timeout_s),
            RigCall("context", context, timeout_s) if callable(context) else None,
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
    outcomes: tuple[TargetOutcome, ...] = ()
    """Every target's state, as of the last refresh."""
    model_confirmed: frozenset[float] = frozenset()
    """Targets (nm) the last assessment found confirmed, by the posterior if not by repeats alone."""
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
        self.outcomes = target_outcomes(state, self.model_confirmed)

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

    def resubmitting(self, flight: Flight, rig_message: str) -> bool:
        """Say in the ledger and ``run.log`` that a run the rig lost is submitted again; False if no longer open.

        Written before the submit (like ``dispatched``), so no resubmission goes unrecorded.
        """
        reason = f"the rig reported the run lost ({rig_message or 'no message'}); submitted again"
        try:
            self.ledger.mark_resubmitted(flight.id, reason)
        except LedgerError:
            current = self.ledger.get(flight.id)
            if current.status in OPEN:
                raise
            self.taken_elsewhere(current)
            return False
        self.emit(Event("resubmitted", flight.id, message=f"{reason} (submit is idempotent on the id)."))
        return True

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
        """Count a failed rig call; stop after too many in a row; return the seconds to wait before retrying.

        Only a rig fault (:func:`is_rig_fault`) is retried; any other exception is a bug in the adapter's
        code and stops the run at once (:meth:`adapter_bug`).
        """
        what = f"rig.{call}({experiment_id!r})" if experiment_id else f"rig.{call}()"
        if not is_rig_fault(error):
            self.adapter_bug(error, what)
        count = self.rig_errors[call] = self.rig_errors.get(call, 0) + 1
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

    def adapter_bug(self, error: BaseException, what: str) -> None:
        """Stop now: ``what`` raised an exception no rig fault raises (KeyError, TypeError...).

        Retrying would only repeat the bug, so the run stops with exit code 2, the experiments in flight
        stay DISPATCHED/RUNNING for the next run, and the adapter's own traceback frames (supraopt's are
        left out) go to stderr and ``run.log``.
        """
        text = f"{what} raised {type(error).__name__}: {clause(error)}"
        self.emit(Event("adapter error", message=f"{text}: a bug in the adapter's code, not a rig fault."))
        frames = adapter_traceback(error)
        if self.log is not None:
            self.log.write("".join(f"    {line}\n" for line in frames.splitlines()))
            self.log.flush()
        print(frames, file=sys.stderr, end="", flush=True)
        left = self.open_in_flight()
        tail = f"; {', '.join(left)} kept in flight" if left else ""
        raise Stop(
            StopReason.ADAPTER_ERROR,
            f"{text}: a bug in the rig adapter, not a rig fault (traceback above and in {self.log_name}){tail}; "
            "fix the adapter, then run the same command again to resume.",
        )

    @property
    def log_name(self) -> str:
        return "run.log" if self.log is None else Path(self.log.name).name

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
        summary = RunSummary(
            self.finished, self.hit, self.best, reason, message, tuple(self.open_in_flight()), self.outcomes
        )
        self.emit(Event("stopped", best=self.best, message=message))
        return summary


def target_outcomes(
    state: CampaignStatus, model_confirmed: frozenset[float] = frozenset()
) -> tuple[TargetOutcome, ...]:
    """Each target's verdict, first hit (in record order) and closest run; ``model_confirmed`` adds the
    targets the model's P(a repeat hits) confirms (:meth:`Campaign.assess`)."""
    out = []
    for ts, first in zip(state.targets, state.first_hits(), strict=True):
        m = ts.best.measurement if ts.best is not None else None
        best = None if ts.best is None or m is None else Best(ts.best.id, m.diameter_nm, m.pdi_pct)
        confirmed = ts.confirmed or (ts.hit and ts.target.diameter_nm in model_confirmed)
        out.append(
            TargetOutcome(ts.target.diameter_nm, ts.target.label(), ts.hit, ts.target.confirm, confirmed, first, best)
        )
    return tuple(out)


def clause(error: BaseException) -> str:
    """An exception's message as a clause for a one-line message."""
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ")


_LOOP_DIR = Path(__file__).resolve().parent
_TRANSPORT_MODULES = ("httpx", "httpcore", "h11", "h2")


def is_rig_fault(error: BaseException) -> bool:
    """Whether ``error`` says the rig or its link failed (retry), rather than that the adapter's code is wrong.

    Rig faults: :class:`~supraopt.errors.RigError` (and so :class:`~supraopt.errors.RigTimeout`),
    ``OSError`` (serial ports, sockets, files: ``ConnectionError``, ``TimeoutError``...), and the
    transport errors of httpx/httpcore (recognised by name, so the loop never imports them).
    """
    if isinstance(error, (RigError, OSError, TimeoutError)):
        return True
    return any(
        cls.__name__ in ("TransportError", "TimeoutException", "NetworkError", "ProtocolError")
        and cls.__module__.split(".")[0] in _TRANSPORT_MODULES
        for cls in type(error).__mro__
    )


def adapter_traceback(error: BaseException) -> str:
    """``error``'s traceback from the adapter's method down: the runner's frames (up to the call) are left out."""
    frames = traceback.extract_tb(error.__traceback__)
    last_own = max((i for i, f in enumerate(frames) if Path(f.filename).resolve().parent == _LOOP_DIR), default=-1)
    shown = frames[last_own + 1 :]
    head = "Traceback in the rig adapter (most recent call last):\n"
    return head + "".join(traceback.format_list(shown)) + "".join(traceback.format_exception_only(error))
