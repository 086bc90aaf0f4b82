"""The loop itself: adopt what is in flight, then pass after pass fill, poll and wait until a stop rule holds.

See :mod:`supraopt.loop` for the rules it keeps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supraopt.campaign import Campaign
from supraopt.errors import InputError
from supraopt.ledger import Status
from supraopt.loop.collect import poll
from supraopt.loop.dispatch import fill
from supraopt.loop.events import Event, Progress, RunSummary, StopReason
from supraopt.loop.rigcall import crash_point
from supraopt.loop.state import Flight, RigCalls, Runner, Stop
from supraopt.rigs import adapter_origin, load_rig
from supraopt.rigs.base import Rig

RUN_LOG = "run.log"


def run_campaign(
    campaign: Campaign,
    rig: Rig,
    *,
    budget: int | None = None,
    batch: int | None = None,
    stop_on_hit: bool | None = None,
    poll_interval_s: float | None = None,
    rig_timeout_s: float | None = None,
    max_rig_errors: int | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RunSummary:
    """Drive ``rig`` until the target is hit, the budget is spent, Ctrl-C, or the rig keeps failing.

    Every keyword left at None takes its value from the campaign's ``[loop]`` table
    (:class:`~supraopt.spec.LoopSettings`). ``progress`` receives every :class:`Event`; ``sleep`` and
    ``clock`` can be replaced in tests. See the module docstring for the protocol.
    """
    overrides: dict[str, Any] = {
        "budget": budget,
        "batch": batch,
        "stop_on_hit": stop_on_hit,
        "poll_interval_s": poll_interval_s,
        "rig_timeout_s": rig_timeout_s,
        "max_rig_errors": max_rig_errors,
    }
    settings = dataclasses.replace(campaign.spec.loop, **{k: v for k, v in overrides.items() if v is not None})
    runner = Runner(campaign, settings, RigCalls.wrap(rig, settings.rig_timeout_s), progress, sleep, clock)
    return drive(runner)


def run(
    directory: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    budget: int | None = None,
    batch: int | None = None,
    stop_on_hit: bool | None = None,
    poll_interval_s: float | None = None,
    rig_timeout_s: float | None = None,
    max_rig_errors: int | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RunSummary:
    """Open the campaign in ``directory``, load its rig and run the loop (what ``supraopt run`` does).

    ``adapter`` overrides the campaign's ``[rig] adapter``; the ``[rig.options]`` table is passed only
    when the adapter is the campaign's own. A ``module:Class`` adapter is also looked up in the
    current folder and in the campaign folder.
    """
    directory = Path(directory)
    with Campaign.open(directory) as campaign:
        configured = campaign.spec.rig
        name = adapter or configured.adapter
        options = dict(configured.options) if name == configured.adapter else {}
        rig = load_rig(name, options, directory)
        if ":" in name and progress is not None:  # a user's module: say which file answered to the name
            progress(Event("rig", message=f"adapter {name} loaded from {adapter_origin(rig)}"))
        return run_campaign(
            campaign,
            rig,
            budget=budget,
            batch=batch,
            stop_on_hit=stop_on_hit,
            poll_interval_s=poll_interval_s,
            rig_timeout_s=rig_timeout_s,
            max_rig_errors=max_rig_errors,
            progress=progress,
            sleep=sleep,
            clock=clock,
        )


def drive(r: Runner) -> RunSummary:
    """Run the loop to a stop; Ctrl-C is a stop too (experiments in flight stay in the ledger)."""
    path = r.campaign.directory / RUN_LOG
    try:
        r.log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    except OSError as error:
        raise InputError(f"cannot write the run log {path} ({error.strerror}); check the folder.") from None
    try:
        try:
            adopt(r)
            while True:
                step(r)
        except Stop as stop:
            return r.finish(stop.reason, stop.message)
        except KeyboardInterrupt:
            left = r.open_in_flight()
            how = "run the same command again to resume"
            if left:
                they = "it is" if len(left) == 1 else "they are"
                text = f"interrupted with {', '.join(left)} in flight (kept in the ledger); {how}: {they} polled, not resubmitted."
            else:
                text = f"interrupted; {how}."
            return r.finish(StopReason.INTERRUPTED, text)
    finally:
        r.log.close()


def step(r: Runner) -> None:
    if r.campaign.reload_targets():
        r.emit(Event("warning", message=f"targets now: {'; '.join(t.label() for t in r.campaign.spec.targets)}."))
    r.refresh()
    if collect_ready(r):  # results the rig already has count before anything new is suggested
        r.refresh()
    s = r.settings
    stopping = s.stop_on_hit and r.hit
    room = min(s.batch - len(r.flights), s.budget - r.finished - len(r.flights))
    out_of_reach: list[str] = []
    if not stopping and room > 0:
        # the model's view (shares its fit with the suggestion below): confirmed by the posterior,
        # or every target left out of reach
        assessment = r.campaign.assess()
        r.model_confirmed = frozenset(st.target.diameter_nm for st in assessment.states if st.confirmed)
        stopping = s.stop_on_hit and assessment.all_done
        if not assessment.all_done and not assessment.open():
            out_of_reach = assessment.messages()
    if not stopping and room > 0 and not out_of_reach:
        fill(r, room)
    if not r.flights:
        if out_of_reach:
            raise Stop(
                StopReason.OUT_OF_REACH,
                " ".join(out_of_reach)
                + f" Stopped after {r.finished} experiment(s)"
                + (f"; {outcomes_text(r)}." if len(r.outcomes) > 1 else "."),
            )
        if stopping:
            if len(r.outcomes) > 1 or r.outcomes[0].confirm:
                word = "confirmed" if any(o.confirm for o in r.outcomes) else "hit"
                all_of = f"all {len(r.outcomes)} targets" if len(r.outcomes) > 1 else "the target"
                raise Stop(StopReason.HIT, f"{all_of} {word} after {r.finished} experiment(s): {outcomes_text(r)}.")
            first = r.campaign.status().first_hit
            m = first.measurement if first is not None else None
            assert first is not None and m is not None
            raise Stop(
                StopReason.HIT,
                f"target hit by {first.id} ({m.diameter_nm:.0f} nm, PDI {m.pdi_pct:.1f} %), the first hit; "
                f"{r.finished} experiment(s) finished.",
            )
        if r.finished >= s.budget:
            if len(r.outcomes) > 1:
                hits = sum(o.hit for o in r.outcomes)
                verdict = f"{hits} of {len(r.outcomes)} targets hit: {outcomes_text(r)}"
            else:
                verdict = "target hit" if r.hit else "target not hit"
            raise Stop(StopReason.BUDGET, f"budget of {s.budget} experiment(s) spent; {verdict}.")
    wait(r)


def outcomes_text(r: Runner) -> str:
    """Every target on one line: ``350 nm hit by E003; 450 nm not hit``."""
    return "; ".join(o.short() for o in r.outcomes)


def collect_ready(r: Runner) -> bool:
    """Poll every experiment whose poll is due (oldest first); True when any was polled."""
    now = r.clock()
    due = [f for f in sorted(r.flights.values(), key=lambda f: f.experiment.created_at) if f.due <= now]
    for flight in due:
        if flight.id in r.flights:
            poll(r, flight)
    return bool(due)


def wait(r: Runner) -> None:
    now = r.clock()
    dues = [f.due for f in r.flights.values()]
    if r.limits is None and r.limits_due > now:
        dues.append(r.limits_due)  # retrying rig.limits() after an error
    if not dues:
        return
    delay = min(dues) - now
    if delay > 0:
        r.sleep(delay)


def adopt(r: Runner) -> None:
    """Take over every DISPATCHED/RUNNING experiment: they are polled, never resubmitted blindly."""
    now = r.clock()
    for e in r.ledger.experiments([Status.DISPATCHED, Status.RUNNING]):
        r.flights[e.id] = Flight(e, e.status is Status.RUNNING, now)
    pending = [e.id for e in r.ledger.experiments([Status.PENDING])]
    crash_point("after_adopt")
    if r.flights or pending:
        parts = []
        if r.flights:
            parts.append(f"asking the rig about {', '.join(r.flights)}")
        if pending:
            parts.append(f"pending {', '.join(pending)} will be dispatched first")
        r.emit(Event("resumed", message="; ".join(parts) + "."))
    else:
        s = r.settings
        r.emit(Event("started", message=f"budget {s.budget}, batch {s.batch}, stop on hit: {s.stop_on_hit}."))
