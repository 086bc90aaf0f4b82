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
* **A rig error is not a failed experiment.** A rig fault (:class:`~supraopt.errors.RigError`,
  ``OSError``, an httpx transport error) is retried with backoff (``poll_interval_s``, at least 0.5 s,
  doubling up to 10 min); :class:`~supraopt.errors.RigTimeout`, or a call that takes longer than
  ``rig_timeout_s``, means "unknown, ask again", never "failed". After ``max_rig_errors`` failed
  calls of one rig method in a row the runner stops with one line and leaves the experiments in
  flight DISPATCHED/RUNNING for the next run. A submit whose reply was lost is not repeated: the
  next poll tells whether the rig got it (LOST: submit again).
* **An adapter bug is not a rig fault.** Any other exception from an adapter method (``KeyError``,
  ``TypeError``...) would only repeat: the runner stops at once (exit code 2), shows the adapter's
  own traceback frames on stderr and in ``run.log``, and keeps the experiments in flight.
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

Modules, in the order of a pass: :mod:`~supraopt.loop.runner` (the loop and its stop rules),
:mod:`~supraopt.loop.dispatch` (fill and submit), :mod:`~supraopt.loop.collect` (poll and record),
with the shared state in :mod:`~supraopt.loop.state`, the reports in :mod:`~supraopt.loop.events`
and safe rig calls in :mod:`~supraopt.loop.rigcall`.

The test hook that kills the runner at each step is described in :mod:`supraopt.loop.rigcall`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from supraopt.campaign import Campaign
from supraopt.loop.events import EXIT_CODES, Best, Event, RunSummary, StopReason, TargetOutcome
from supraopt.loop.rigcall import submit_within_limits
from supraopt.loop.runner import RUN_LOG, run, run_campaign
from supraopt.spec import LoopSettings, RigSettings

DEMO_PRESET = "cspbbr3-flow-focusing"


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
    "RUN_LOG",
    "Best",
    "Event",
    "RunSummary",
    "StopReason",
    "TargetOutcome",
    "create_demo",
    "run",
    "run_campaign",
    "submit_within_limits",
]
