"""Phase 2 of a pass: poll the experiments in flight and record what the rig says.

QUEUED/RUNNING -> ``mark_running``; DONE -> record the measurement; FAILED -> record the failure (the
chemistry failed: information for the feasibility model); LOST -> submit once more (idempotent),
abandon if still lost; CANCELLED -> abandon. A result is validated before it is recorded and
recorded before anything else happens; a measurement outside the campaign's plausible ranges (a
polydispersity fraction sent as percent: below 0.5 %) is abandoned as an invalid result, never fed to the model.
"""

from __future__ import annotations

from dataclasses import replace

from supraopt.errors import InputError, LedgerError, RigError
from supraopt.ledger import OPEN
from supraopt.loop.dispatch import get_limits, submit
from supraopt.loop.events import Event
from supraopt.loop.rigcall import crash_point
from supraopt.loop.state import Flight, Runner
from supraopt.records import Failure, Measurement, RunState, RunStatus


def poll(r: Runner, flight: Flight) -> None:
    """Ask the rig about one experiment in flight and act on the answer."""
    try:
        status = r.rig.poll(flight.id)
    except InputError as error:  # the adapter could not build a valid result (NaN, negative size...)
        r.rig_ok("poll")
        r.abandon(flight.id, f"rig error: invalid result ({error}); not used by the model.")
        return
    except Exception as error:
        flight.due = r.clock() + r.rig_error(error, "poll", flight.id)
        return
    if not isinstance(status, RunStatus) or status.experiment_id != flight.id:
        flight.due = r.clock() + r.rig_error(RigError(f"invalid reply {status!r}"), "poll", flight.id)
        return
    r.rig_ok("poll")
    flight.due = r.clock() + r.settings.poll_interval_s
    state = status.state
    if state in (RunState.QUEUED, RunState.RUNNING):
        crash_point("after_poll_running")
        if not flight.running and r.still_open(flight.id):
            try:
                r.ledger.mark_running(flight.id)
            except LedgerError:  # a person recorded it between our check and our write
                current = r.ledger.get(flight.id)
                if current.status in OPEN:
                    raise
                r.taken_elsewhere(current)
                return
            crash_point("after_mark_running")
            flight.running = True
            r.emit(Event("running", flight.id, message=status.message))
    elif state in (RunState.DONE, RunState.FAILED):
        crash_point("after_poll_done")
        done = state is RunState.DONE
        result: Measurement | Failure
        try:
            result = valid_measurement(status.result) if done else valid_failure(status.result)
            if isinstance(result, Measurement):  # e.g. a PDI fraction sent as percent: never fed to the model
                r.campaign.plausible.check_measurement(result)
        except InputError as error:
            what = "result" if done else "failure report"
            r.abandon(flight.id, f"rig error: invalid {what} ({error}); not used by the model.")
            return
        record(r, flight, result, status.message)
    elif state is RunState.LOST:
        crash_point("after_poll_lost")
        if flight.resubmitted:
            r.abandon(flight.id, f"lost by the rig even after a resubmit ({status.message or 'no message'}).")
            return
        limits = get_limits(r)
        if limits is None:
            flight.due = max(flight.due, r.limits_due)
            return
        if r.resubmitting(flight, status.message) and submit(r, flight, limits, label="after_resubmit"):
            flight.resubmitted = True
    elif state is RunState.CANCELLED:
        r.abandon(flight.id, f"cancelled on the rig ({status.message or 'no message'}).")


def record(r: Runner, flight: Flight, result: Measurement | Failure, message: str) -> None:
    """Record a validated result, unless someone else already has."""
    if not r.still_open(flight.id):
        return
    try:
        try:
            r.campaign.record(flight.id, result, note=message)
        except InputError as error:  # the measurement's context (names, kinds) is bad, not the result
            if not (isinstance(result, Measurement) and result.context):
                raise
            r.emit(Event("warning", flight.id, message=f"{flight.id}: ignoring the context the rig reported: {error}"))
            result = replace(result, context=None)
            r.campaign.record(flight.id, result, note=message)
    except LedgerError:
        current = r.ledger.get(flight.id)
        if current.status in OPEN:
            raise
        r.taken_elsewhere(current)  # recorded by a person between our check and our write
        return
    crash_point("after_record")
    r.flights.pop(flight.id, None)
    r.empty_in_a_row = 0
    r.refresh()
    if isinstance(result, Measurement):
        hit = any(t.is_hit(result.diameter_nm, result.pdi_pct) for t in r.campaign.spec.targets)
        r.emit(Event("measured", flight.id, result=result, hit=hit, best=r.best, message=message))
    else:
        r.emit(Event("failed", flight.id, result=result, best=r.best, message=message))


def valid_measurement(result: object) -> Measurement:
    """``result`` as a freshly validated Measurement (an adapter may bypass the dataclass checks)."""
    if not isinstance(result, Measurement):
        raise InputError(f"a done run must carry a Measurement, not {result!r}")
    return Measurement.from_json(result.to_json())


def valid_failure(result: object) -> Failure:
    if not isinstance(result, Failure):
        raise InputError(f"a failed run must carry a Failure, not {result!r}")
    return Failure(result.reason)
