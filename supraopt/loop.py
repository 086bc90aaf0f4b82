"""The closed-loop runner: suggest, dispatch, poll, record, refit, until a hit, the budget or Ctrl-C.

:func:`run_campaign` drives one rig adapter (see :mod:`supraopt.rigs.base`) for one campaign; :func:`run`
opens the campaign folder and loads the rig named in its ``campaign.toml``. The ledger is the only
state: the runner keeps nothing it could not rebuild from it, so a crash, a reboot or Ctrl-C loses
nothing and re-running the same command resumes.

One pass of the loop:

1. **Fill** up to ``batch`` experiments in flight: reuse PENDING experiments from the ledger first
   (left by a crash or by ``supraopt suggest``), else ``campaign.suggest(k)`` (which refits the
   surrogates from the ledger, so every suggestion sees every result so far).
2. **Dispatch** each: check it against ``rig.limits()`` right before submit (one outside the limits is
   abandoned as "refused", never sent); ``ledger.mark_dispatched(id)``; then ``rig.submit(proposal)``.
3. **Poll** every experiment in flight each ``poll_interval_s``; QUEUED/RUNNING -> ``mark_running``;
   DONE -> record the measurement; FAILED -> record the failure (the chemistry failed: information
   for the feasibility model); CANCELLED -> abandon.
4. **Stop** when the target is hit (unless ``stop_on_hit`` is off), when ``budget`` experiments have
   finished (done + failed, counted over the whole ledger), on Ctrl-C, or after ``max_rig_errors``
   rig errors in a row. On a hit or at the budget, experiments already in flight are still waited
   for and recorded (their runs are under way); no new ones are started.

Crash-safety rules:

* **Dispatched before submit.** The ledger says DISPATCHED before ``submit`` is called. On restart,
  every DISPATCHED or RUNNING experiment is *polled*, never resubmitted blindly. A LOST reply means
  the rig never got it (a crash between ``mark_dispatched`` and ``submit``) or lost it: it is
  submitted again, which is safe because ``submit`` is idempotent on the experiment id; still LOST
  after such a resubmit, it is abandoned with a note.
* **Record before anything else.** A result goes to the ledger as soon as a poll returns it. If the
  runner dies between the rig's DONE and the record, the restart polls again (the rig keeps results)
  and records it then. A result already in the ledger (the manual rig: a person ran
  ``supraopt record``) counts as recorded: no error, no second record.
* **A rig error is not a failed experiment.** :class:`~supraopt.errors.RigError` or any other
  exception from the adapter is retried with backoff (``poll_interval_s``, at least 0.5 s, doubling
  up to 10 min); :class:`~supraopt.errors.RigTimeout`, or a call that takes longer than
  ``rig_timeout_s``, means "unknown, ask again", never "failed". After ``max_rig_errors`` failed
  calls of one rig method in a row the runner stops with one line and leaves the experiments in
  flight DISPATCHED/RUNNING for the next run. A submit whose reply was lost is not repeated: the
  next poll tells whether the rig got it (LOST: submit again).
* **Every rig call has a timeout.** It runs in a daemon worker thread and is waited for at most
  ``rig_timeout_s`` seconds (0: no timeout, call directly). A call that hangs is left behind; the
  next call of the same method first waits for it again instead of starting a second thread, so at
  most one stuck thread exists per rig method.
* **Results are validated.** A DONE result that is not a valid :class:`~supraopt.records.Measurement`
  (NaN, negative or absurd sizes, plain numbers, or ``poll`` raising :class:`~supraopt.errors.InputError`
  while building one) is a rig error for that experiment: it is abandoned with a note and never fed
  to the model.
* **Limits are checked right before every submit** (:func:`submit_within_limits`), resubmits included.
  Once the rig's limits are known the campaign's search space is also narrowed to them
  (:meth:`Campaign.restrict_to`), so new suggestions stay inside; the check remains for pending
  experiments suggested before and for adapters whose limits change.
* ``max_rig_errors`` experiments in a row ending without a result (refused, lost, cancelled, invalid)
  also stop the runner, so a misconfigured rig cannot make it suggest forever.

Every event is shown through ``progress`` and appended as one line to ``<campaign>/run.log``.

Test hook: with ``SUPRAOPT_CRASH_AT=<label>:<count>`` in the environment the process kills itself
with SIGKILL the ``count``-th time it passes :func:`_crash_point` ``label`` (labels: after_adopt,
after_suggest, after_mark_dispatched, after_submit, after_poll_lost, after_resubmit,
after_poll_running, after_mark_running, after_poll_done, after_record, after_abandon). Unset, it
costs nothing.
``tests/test_kill.py`` uses it to kill the runner at every step of the loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from supraopt.campaign import Campaign
from supraopt.errors import InputError, LedgerError, LimitViolation, RigError, RigTimeout, SpecError
from supraopt.ledger import OPEN, Experiment, Status
from supraopt.records import PARAMETERS, UNITS, Failure, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import load_rig
from supraopt.rigs.base import Rig
from supraopt.spec import LoopSettings, RigSettings

RUN_LOG = "run.log"
MIN_BACKOFF_S = 0.5
"""Shortest wait before retrying a failed rig call (even with ``poll_interval_s = 0``)."""
MAX_BACKOFF_S = 600.0
"""Longest wait between two retries after rig errors."""
DEMO_PRESET = "cspbbr3-flow-focusing"
IMPLAUSIBLE_PDI_PCT = 0.5
"""Below this a reported polydispersity is most likely a fraction sent where percent was meant."""


# ---------------------------------------------------------------------------------------------- results


class StopReason(StrEnum):
    """Why :func:`run_campaign` returned."""

    HIT = "hit"
    BUDGET = "budget"
    INTERRUPTED = "interrupted"
    """Ctrl-C: experiments in flight stay DISPATCHED/RUNNING; run again to resume."""
    RIG_ERROR = "rig error"
    """Too many rig errors (or experiments without a result) in a row."""


EXIT_CODES = {StopReason.HIT: 0, StopReason.BUDGET: 0, StopReason.INTERRUPTED: 130, StopReason.RIG_ERROR: 2}


@dataclass(frozen=True)
class Best:
    """The measured experiment closest to the target."""

    experiment_id: str
    diameter_nm: float
    pdi_pct: float


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

    @property
    def exit_code(self) -> int:
        """0 on a hit or the budget, 130 on Ctrl-C, 2 when the rig failed."""
        return EXIT_CODES[self.reason]


@dataclass(frozen=True)
class Event:
    """One thing that happened in the loop, for the progress display and ``run.log``."""

    kind: str
    """started, resumed, warning, suggested, submitted, running, measured, failed, abandoned,
    refused, rig error, stopped."""
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
        if self.kind == "suggested":
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


# ---------------------------------------------------------------------------------------------- guards


def submit_within_limits(submit: Callable[[Proposal], None], limits: RigLimits, proposal: Proposal) -> list[str]:
    """Call ``submit(proposal)`` only if the proposal lies inside ``limits``; return the violations.

    An empty list means the proposal was handed to ``submit``; otherwise ``submit`` was not called and
    the list says which settings lie outside (a missing or non-finite setting counts as outside).
    """
    problems = limits.violations(proposal.settings)
    if not problems:
        submit(proposal)
    return problems


class _RigCall:
    """One rig method, called in a daemon worker thread and waited for at most ``timeout_s`` seconds.

    A call that does not return in time raises :class:`RigTimeout` and is left running; the next call
    first waits (up to ``timeout_s`` again) for that one to end rather than starting a second thread,
    so at most one stuck thread exists per method. Daemon threads, unlike a ``ThreadPoolExecutor``'s,
    do not keep the process alive at exit when a driver hangs for good.
    """

    def __init__(self, name: str, method: Callable[..., Any], timeout_s: float) -> None:
        self.name, self.method, self.timeout_s = name, method, timeout_s
        self._stuck: Future[Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.timeout_s <= 0:
            return self.method(*args)
        if self._stuck is not None:
            if not _finished_within(self._stuck, self.timeout_s):
                raise RigTimeout(f"rig.{self.name}() is still stuck in an earlier call; not calling it again yet.")
            self._stuck = None
        future: Future[Any] = Future()

        def work() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self.method(*args))
                except BaseException as error:
                    future.set_exception(error)

        threading.Thread(target=work, name=f"supraopt-rig-{self.name}", daemon=True).start()
        if not _finished_within(future, self.timeout_s):
            self._stuck = future
            raise RigTimeout(f"rig.{self.name}() gave no answer within {self.timeout_s:g} s.")
        return future.result()


def _finished_within(future: Future[Any], timeout_s: float) -> bool:
    try:
        future.exception(timeout=timeout_s)
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- test hook


def _parse_crash_at(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    label, _, count = value.partition(":")
    return label, int(count or 1)


_CRASH_AT = _parse_crash_at(os.environ.get("SUPRAOPT_CRASH_AT", ""))
_crash_counts: dict[str, int] = {}


def _crash_point(label: str) -> None:
    """Test hook: SIGKILL this process at the chosen pass of ``label`` (see the module docstring)."""
    if _CRASH_AT is None or label != _CRASH_AT[0]:
        return
    _crash_counts[label] = _crash_counts.get(label, 0) + 1
    if _crash_counts[label] >= _CRASH_AT[1]:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- the runner


class _Stop(Exception):
    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class _Flight:
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
    return _Runner(campaign, rig, settings, progress, sleep, clock).run()


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
    when the adapter is the campaign's own. A dotted-path adapter is also looked up in the current
    folder and in the campaign folder.
    """
    directory = Path(directory)
    with Campaign.open(directory) as campaign:
        configured = campaign.spec.rig
        name = adapter or configured.adapter
        options = dict(configured.options) if name == configured.adapter else {}
        rig = load_rig(name, options, directory)
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


class _Runner:
    def __init__(
        self,
        campaign: Campaign,
        rig: Rig,
        settings: LoopSettings,
        progress: Progress | None,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        self.campaign, self.ledger, self.settings = campaign, campaign.ledger, settings
        self.target = campaign.spec.target
        self.progress, self.sleep, self.clock = progress, sleep, clock
        timeout = settings.rig_timeout_s
        self._limits_call = _RigCall("limits", rig.limits, timeout)
        self._submit_call = _RigCall("submit", rig.submit, timeout)
        self._poll_call = _RigCall("poll", rig.poll, timeout)
        self.flights: dict[str, _Flight] = {}
        self.limits: RigLimits | None = None
        self._limits_due = -math.inf
        self.rig_errors: dict[str, int] = {}
        """Rig method -> calls of it that failed in a row."""
        self.empty_in_a_row = 0
        """Experiments in a row that ended without a result (refused, lost, cancelled, invalid)."""
        self.best: Best | None = None
        self.hit = False
        self.finished = 0
        self._log: IO[str] | None = None

    # ------------------------------------------------------------------ main loop

    def run(self) -> RunSummary:
        path = self.campaign.directory / RUN_LOG
        try:
            self._log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
        except OSError as error:
            raise InputError(f"cannot write the run log {path} ({error.strerror}); check the folder.") from None
        try:
            try:
                self._adopt()
                while True:
                    self._step()
            except _Stop as stop:
                return self._finish(stop.reason, stop.message)
            except KeyboardInterrupt:
                left = self._open_in_flight()
                how = "run the same command again to resume"
                if left:
                    text = f"interrupted with {', '.join(left)} in flight (kept in the ledger); {how}: they are polled, not resubmitted."
                else:
                    text = f"interrupted; {how}."
                return self._finish(StopReason.INTERRUPTED, text)
        finally:
            self._log.close()

    def _step(self) -> None:
        self._refresh()
        s = self.settings
        stopping = s.stop_on_hit and self.hit
        if not stopping:
            room = min(s.batch - len(self.flights), s.budget - self.finished - len(self.flights))
            if room > 0:
                self._fill(room)
        if not self.flights:
            if stopping:
                best = self.best
                assert best is not None
                raise _Stop(
                    StopReason.HIT,
                    f"target hit by {best.experiment_id} ({best.diameter_nm:.0f} nm, PDI {best.pdi_pct:.1f} %) "
                    f"after {self.finished} experiment(s).",
                )
            if self.finished >= s.budget:
                verdict = "target hit" if self.hit else "target not hit"
                raise _Stop(StopReason.BUDGET, f"budget of {s.budget} experiment(s) spent; {verdict}.")
        now = self.clock()
        for flight in sorted(self.flights.values(), key=lambda f: f.experiment.created_at):
            if flight.due <= now and flight.id in self.flights:
                self._poll(flight)
        self._wait()

    def _refresh(self) -> None:
        state = self.campaign.status()
        self.finished = state.counts.get(Status.DONE.value, 0) + state.counts.get(Status.FAILED.value, 0)
        self.hit = state.hit
        m = state.best.measurement if state.best is not None else None
        self.best = None if m is None or state.best is None else Best(state.best.id, m.diameter_nm, m.pdi_pct)

    def _wait(self) -> None:
        now = self.clock()
        dues = [f.due for f in self.flights.values()]
        if self.limits is None and self._limits_due > now:
            dues.append(self._limits_due)  # retrying rig.limits() after an error
        if not dues:
            return
        delay = min(dues) - now
        if delay > 0:
            self.sleep(delay)

    def _adopt(self) -> None:
        """Take over every DISPATCHED/RUNNING experiment: they are polled, never resubmitted blindly."""
        now = self.clock()
        for e in self.ledger.experiments([Status.DISPATCHED, Status.RUNNING]):
            self.flights[e.id] = _Flight(e, e.status is Status.RUNNING, now)
        pending = [e.id for e in self.ledger.experiments([Status.PENDING])]
        _crash_point("after_adopt")
        if self.flights or pending:
            parts = []
            if self.flights:
                parts.append(f"asking the rig about {', '.join(self.flights)}")
            if pending:
                parts.append(f"pending {', '.join(pending)} will be dispatched first")
            self._emit(Event("resumed", message="; ".join(parts) + "."))
        else:
            s = self.settings
            self._emit(Event("started", message=f"budget {s.budget}, batch {s.batch}, stop on hit: {s.stop_on_hit}."))

    # ------------------------------------------------------------------ dispatch

    def _fill(self, room: int) -> None:
        limits = self._get_limits()
        if limits is None:
            return
        pending = [e for e in self.ledger.experiments([Status.PENDING]) if e.id not in self.flights][:room]
        for e in pending:
            self._emit(Event("suggested", e.id, e.settings, e.prediction, message="(pending in the ledger)"))
        if len(pending) < room:
            suggestions = self.campaign.suggest(room - len(pending))
            _crash_point("after_suggest")
            for s in suggestions:
                self._emit(Event("suggested", s.experiment_id, s.settings, s.prediction))
            pending += [self.ledger.get(s.experiment_id) for s in suggestions]
        for e in pending:
            self._dispatch(e, limits)

    def _get_limits(self) -> RigLimits | None:
        if self.limits is not None:
            return self.limits
        if self.clock() < self._limits_due:
            return None
        try:
            limits = self._limits_call()
            if not isinstance(limits, RigLimits):
                raise RigError(f"rig.limits() returned {limits!r}, not a RigLimits.")
        except Exception as error:
            self._limits_due = self.clock() + self._rig_error(error, "limits")
            return None
        self._rig_ok("limits")
        self.limits = limits
        try:
            narrowed = self.campaign.restrict_to(limits)
        except SpecError as error:
            raise _Stop(StopReason.RIG_ERROR, str(error)) from None
        if narrowed:
            self._emit(Event("warning", message=f"searching inside the rig limits only: {'; '.join(narrowed)}."))
        return limits

    def _dispatch(self, experiment: Experiment, limits: RigLimits) -> None:
        problems = limits.violations(experiment.settings)
        if problems:
            self._refuse(experiment, problems)
            return
        try:
            self.ledger.mark_dispatched(experiment.id)
        except LedgerError:
            if self.ledger.get(experiment.id).status in OPEN:
                raise
            return  # abandoned or recorded by someone else meanwhile
        _crash_point("after_mark_dispatched")
        flight = _Flight(experiment, False, self.clock())
        self.flights[experiment.id] = flight
        self._submit(flight, limits, label="after_submit")

    def _submit(self, flight: _Flight, limits: RigLimits, label: str) -> bool:
        """Submit (again) within the limits; True when the rig accepted it."""
        proposal = Proposal(flight.id, dict(flight.experiment.settings))
        try:
            problems = submit_within_limits(self._submit_call, limits, proposal)
        except LimitViolation as error:
            self._abandon(flight.id, f"refused by the rig: {error}", refused=True)
            return False
        except Exception as error:  # the reply is unknown: the next poll tells whether the rig got it
            flight.due = self.clock() + self._rig_error(error, "submit", flight.id)
            return False
        if problems:
            self._refuse(flight.experiment, problems)
            return False
        _crash_point(label)
        self._rig_ok("submit")
        flight.due = self.clock() + self.settings.poll_interval_s
        self._emit(Event("submitted", flight.id, flight.experiment.settings, flight.experiment.prediction))
        return True

    def _refuse(self, experiment: Experiment, problems: list[str]) -> None:
        self._abandon(experiment.id, f"refused: {'; '.join(problems)}; never submitted.", refused=True)

    # ------------------------------------------------------------------ poll

    def _poll(self, flight: _Flight) -> None:
        try:
            status = self._poll_call(flight.id)
        except InputError as error:  # the adapter could not build a valid result (NaN, negative size...)
            self._rig_ok("poll")
            self._abandon(flight.id, f"rig error: invalid result ({error}); not used by the model.")
            return
        except Exception as error:
            flight.due = self.clock() + self._rig_error(error, "poll", flight.id)
            return
        if not isinstance(status, RunStatus) or status.experiment_id != flight.id:
            flight.due = self.clock() + self._rig_error(RigError(f"invalid reply {status!r}"), "poll", flight.id)
            return
        self._rig_ok("poll")
        flight.due = self.clock() + self.settings.poll_interval_s
        state = status.state
        if state in (RunState.QUEUED, RunState.RUNNING):
            _crash_point("after_poll_running")
            if not flight.running and self._still_open(flight.id):
                self.ledger.mark_running(flight.id)
                _crash_point("after_mark_running")
                flight.running = True
                self._emit(Event("running", flight.id, message=status.message))
        elif state in (RunState.DONE, RunState.FAILED):
            _crash_point("after_poll_done")
            done = state is RunState.DONE
            result: Measurement | Failure
            try:
                result = _valid_measurement(status.result) if done else _valid_failure(status.result)
            except InputError as error:
                what = "result" if done else "failure report"
                self._abandon(flight.id, f"rig error: invalid {what} ({error}); not used by the model.")
                return
            self._record(flight, result, status.message)
        elif state is RunState.LOST:
            _crash_point("after_poll_lost")
            if flight.resubmitted:
                self._abandon(flight.id, f"lost by the rig even after a resubmit ({status.message or 'no message'}).")
                return
            limits = self._get_limits()
            if limits is None:
                flight.due = max(flight.due, self._limits_due)
                return
            if self._still_open(flight.id) and self._submit(flight, limits, label="after_resubmit"):
                flight.resubmitted = True
        elif state is RunState.CANCELLED:
            self._abandon(flight.id, f"cancelled on the rig ({status.message or 'no message'}).")

    def _still_open(self, experiment_id: str) -> bool:
        """Whether the ledger still waits for a result; if not (a person recorded it), stop tracking it."""
        current = self.ledger.get(experiment_id)
        if current.status in OPEN:
            return True
        self._taken_elsewhere(current)
        return False

    def _taken_elsewhere(self, current: Experiment) -> None:
        self.flights.pop(current.id, None)
        self._refresh()
        result: Measurement | Failure | None = current.measurement if current.status is Status.DONE else current.failure
        if result is None:
            self._emit(Event(str(current.status), current.id, message=f"by someone else: {current.note}"))
            return
        self.empty_in_a_row = 0
        hit = isinstance(result, Measurement) and self.target.is_hit(result.diameter_nm, result.pdi_pct)
        kind = "measured" if isinstance(result, Measurement) else "failed"
        self._emit(Event(kind, current.id, result=result, hit=hit, best=self.best, message="(recorded by hand)"))

    def _record(self, flight: _Flight, result: Measurement | Failure, message: str) -> None:
        if not self._still_open(flight.id):
            return
        try:
            self.campaign.record(flight.id, result, note=message)
        except LedgerError:
            current = self.ledger.get(flight.id)
            if current.status in OPEN:
                raise
            self._taken_elsewhere(current)  # recorded by a person between our check and our write
            return
        _crash_point("after_record")
        self.flights.pop(flight.id, None)
        self.empty_in_a_row = 0
        self._refresh()
        if isinstance(result, Measurement):
            hit = self.target.is_hit(result.diameter_nm, result.pdi_pct)
            self._emit(Event("measured", flight.id, result=result, hit=hit, best=self.best, message=message))
            if 0 < result.pdi_pct < IMPLAUSIBLE_PDI_PCT:
                self._emit(
                    Event(
                        "warning",
                        flight.id,
                        message=f"{flight.id}: pdi_pct={result.pdi_pct:g} % is implausibly low; the adapter must "
                        "report polydispersity in percent (5.0 for a CV of 0.05).",
                    )
                )
        else:
            self._emit(Event("failed", flight.id, result=result, best=self.best, message=message))

    def _abandon(self, experiment_id: str, reason: str, *, refused: bool = False) -> None:
        self.flights.pop(experiment_id, None)
        try:
            self.ledger.abandon(experiment_id, reason)
        except LedgerError:
            current = self.ledger.get(experiment_id)
            if current.status in OPEN:
                raise
            self._taken_elsewhere(current)
            return
        _crash_point("after_abandon")
        self._emit(Event("refused" if refused else "abandoned", experiment_id, message=reason))
        self.empty_in_a_row += 1
        if self.empty_in_a_row >= self.settings.max_rig_errors:
            advice = (
                "narrow [bounds] in campaign.toml to the rig limits"
                if refused
                else "check the rig, then run the same command again"
            )
            raise _Stop(
                StopReason.RIG_ERROR,
                f"{self.empty_in_a_row} experiments in a row ended without a result (last: {experiment_id}, "
                f"{reason.rstrip('.')}); {advice}.",
            )

    # ------------------------------------------------------------------ rig errors

    def _rig_error(self, error: BaseException, call: str, experiment_id: str | None = None) -> float:
        """Count a failed rig call; stop after too many in a row; return the seconds to wait before retrying."""
        count = self.rig_errors[call] = self.rig_errors.get(call, 0) + 1
        what = f"rig.{call}({experiment_id!r})" if experiment_id else f"rig.{call}()"
        if isinstance(error, TimeoutError):
            text = f"no answer from {what} ({_clause(error)}): state unknown, asking again"
        elif isinstance(error, RigError):
            text = f"{what} failed: {_clause(error)}"
        else:
            text = f"{what} raised {type(error).__name__}: {_clause(error)}"
        limit = self.settings.max_rig_errors
        if count >= limit:
            self._emit(Event("rig error", experiment_id, message=f"({count}/{limit}) {text}."))
            left = self._open_in_flight()
            tail = f"; {', '.join(left)} kept in flight" if left else ""
            raise _Stop(
                StopReason.RIG_ERROR,
                f"the rig failed {count} times in a row (last: {text}){tail}; "
                "fix the rig, then run the same command again to resume.",
            )
        interval = max(self.settings.poll_interval_s, MIN_BACKOFF_S)
        delay = min(interval * 2 ** (count - 1), max(MAX_BACKOFF_S, interval))
        self._emit(Event("rig error", experiment_id, message=f"({count}/{limit}) {text}; retry in {delay:g} s."))
        return delay

    def _rig_ok(self, call: str) -> None:
        self.rig_errors[call] = 0

    # ------------------------------------------------------------------ output

    def _open_in_flight(self) -> list[str]:
        return [e.id for e in self.ledger.experiments([Status.DISPATCHED, Status.RUNNING])]

    def _emit(self, event: Event) -> None:
        if self._log is not None:
            self._log.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {event.text()}\n")
            self._log.flush()
        if self.progress is not None:
            self.progress(event)

    def _finish(self, reason: StopReason, message: str) -> RunSummary:
        self._refresh()
        summary = RunSummary(self.finished, self.hit, self.best, reason, message, tuple(self._open_in_flight()))
        self._emit(Event("stopped", best=self.best, message=message))
        return summary


def _valid_measurement(result: object) -> Measurement:
    """``result`` as a freshly validated Measurement (an adapter may bypass the dataclass checks)."""
    if not isinstance(result, Measurement):
        raise InputError(f"a done run must carry a Measurement, not {result!r}")
    return Measurement.from_json(result.to_json())


def _valid_failure(result: object) -> Failure:
    if not isinstance(result, Failure):
        raise InputError(f"a failed run must carry a Failure, not {result!r}")
    return Failure(result.reason)


def _clause(error: BaseException) -> str:
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ")


# ---------------------------------------------------------------------------------------------- demo


def create_demo(
    directory: str | os.PathLike[str],
    *,
    target_nm: float = 450.0,
    budget: int = 15,
    seed: int = 0,
    world_seed: int | None = None,
    model: str = DEMO_PRESET,
) -> Path:
    """Create a demo campaign on the simulated twin: instant runs, no polling delay, stop on a hit.

    ``seed`` seeds both the optimiser and the twin's measurement noise; ``world_seed`` picks a random
    twin (:meth:`~supraopt.rigs.simulated.World.random`) instead of the preset's default one.
    """
    directory = Path(directory)
    options: dict[str, Any] = {"seed": seed, "duration_s": 0.0}
    if world_seed is not None:
        options["world_seed"] = world_seed
    loop = LoopSettings(budget=budget, batch=1, stop_on_hit=True, poll_interval_s=0.0)
    rig = RigSettings("simulated", options)
    Campaign.create(directory, model, target_nm, seed=seed, rig=rig, name="supraopt demo", loop=loop).close()
    return directory


__all__ = [
    "EXIT_CODES",
    "Best",
    "Event",
    "RunSummary",
    "StopReason",
    "create_demo",
    "run",
    "run_campaign",
    "submit_within_limits",
]
