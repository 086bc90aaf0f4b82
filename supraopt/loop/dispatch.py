"""Phase 1 of a pass: fill the rig up to ``batch`` experiments in flight and dispatch each safely.

Pending experiments in the ledger go first (left by a crash or by ``supraopt suggest``), then new
suggestions. Each is checked against ``rig.limits()`` right before submit (one outside is abandoned
as "refused", never sent), marked DISPATCHED in the ledger, and only then submitted.
"""

from __future__ import annotations

from typing import Any

from supraopt.errors import InputError, LedgerError, LimitViolation, RigError, SpecError
from supraopt.ledger import OPEN, Experiment, Status
from supraopt.loop.events import Event, StopReason
from supraopt.loop.rigcall import crash_point, submit_within_limits
from supraopt.loop.state import Flight, Runner, Stop
from supraopt.records import Proposal, RigLimits


def fill(r: Runner, room: int) -> None:
    """Put up to ``room`` more experiments in flight: pending ones first, then new suggestions."""
    limits = get_limits(r)
    if limits is None:
        return
    pending = [e for e in r.ledger.experiments([Status.PENDING]) if e.id not in r.flights][:room]
    for e in pending:
        r.emit(Event("resuming", e.id, e.settings, e.prediction, message="(pending in the ledger)"))
    if len(pending) < room:
        suggestions = r.campaign.suggest(room - len(pending), context=rig_context(r))
        crash_point("after_suggest")
        for s in suggestions:
            r.emit(Event("suggested", s.experiment_id, s.settings, s.prediction))
        pending += [r.ledger.get(s.experiment_id) for s in suggestions]
    for e in pending:
        dispatch(r, e, limits)


def rig_context(r: Runner) -> dict[str, Any] | None:
    """What the adapter's optional ``context()`` says is mounted now (chip, NC batch...), checked; None
    (keep the campaign's current context) without the method, on a rig error or an invalid answer."""
    if r.rig.context is None:
        return None
    try:
        reported = r.rig.context()
        if reported is None:
            return None
        return r.campaign.check_context(reported, "rig context")[0]
    except InputError as error:
        r.emit(Event("warning", message=f"ignoring the rig's context: {error}"))
    except Exception as error:
        r.emit(Event("warning", message=f"rig.context() failed ({error}); keeping the campaign's current context."))
    return None


def get_limits(r: Runner) -> RigLimits | None:
    """The rig's limits, asked once (and the search narrowed to them); None while the rig errs."""
    if r.limits is not None:
        return r.limits
    if r.clock() < r.limits_due:
        return None
    try:
        limits = r.rig.limits()
        if not isinstance(limits, RigLimits):
            raise RigError(f"rig.limits() returned {limits!r}, not a RigLimits.")
    except Exception as error:
        r.limits_due = r.clock() + r.rig_error(error, "limits")
        return None
    r.rig_ok("limits")
    r.limits = limits
    try:
        narrowed = r.campaign.restrict_to(limits)
    except SpecError as error:
        raise Stop(StopReason.RIG_ERROR, str(error)) from None
    if narrowed:
        r.emit(Event("warning", message=f"searching inside the rig limits only: {'; '.join(narrowed)}."))
    return limits


def dispatch(r: Runner, experiment: Experiment, limits: RigLimits) -> None:
    problems = limits.violations(experiment.settings)
    if problems:
        refuse(r, experiment, problems)
        return
    try:
        r.ledger.mark_dispatched(experiment.id)
    except LedgerError:
        if r.ledger.get(experiment.id).status in OPEN:
            raise
        return  # abandoned or recorded by someone else meanwhile
    crash_point("after_mark_dispatched")
    flight = Flight(experiment, False, r.clock())
    r.flights[experiment.id] = flight
    submit(r, flight, limits, label="after_submit")


def submit(r: Runner, flight: Flight, limits: RigLimits, label: str) -> bool:
    """Submit (again) within the limits; True when the rig accepted it."""
    proposal = Proposal(flight.id, dict(flight.experiment.settings), dict(flight.experiment.context))
    try:
        problems = submit_within_limits(r.rig.submit, limits, proposal)
    except LimitViolation as error:
        r.abandon(flight.id, f"refused by the rig: {error}", refused=True)
        return False
    except Exception as error:  # the reply is unknown: the next poll tells whether the rig got it
        flight.due = r.clock() + r.rig_error(error, "submit", flight.id)
        return False
    if problems:
        refuse(r, flight.experiment, problems)
        return False
    crash_point(label)
    r.rig_ok("submit")
    flight.due = r.clock() + r.settings.poll_interval_s
    r.emit(Event("submitted", flight.id, flight.experiment.settings, flight.experiment.prediction))
    return True


def refuse(r: Runner, experiment: Experiment, problems: list[str]) -> None:
    r.abandon(experiment.id, f"refused: {'; '.join(problems)}; never submitted.", refused=True)
