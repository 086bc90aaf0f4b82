"""kill -9 of ``supraopt run`` at every step of the loop: the restart loses no measurement and repeats no run.

Each case runs ``python -m supraopt.cli run`` on a campaign whose rig is the simulated twin with its
state persisted (a subclass that also logs every run it starts), kills it with SIGKILL at one point
of the loop (``SUPRAOPT_CRASH_AT=<label>:<count>``, see :mod:`supraopt.loop`), restarts it without
the hook until it finishes, and compares the ledger with what the rig really ran.

Four points run by default; the other twenty are marked slow (each case starts two or three
Python processes that import torch). The selected cases run up front, two at a time, in a
module fixture; each parametrized test then reports its own case.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest

from supraopt.campaign import Campaign
from supraopt.ledger import Ledger, Status
from supraopt.records import Failure, Measurement
from supraopt.rigs import RunBook, SimulatedRig
from supraopt.spec import SPEC_FILE, LoopSettings, RigSettings

BUDGET = 3

COUNTING_RIG = '''
"""The simulated twin, plus a log of every run it starts (a submit of a known id starts nothing).

Each run reads RUNNING on its first poll by a process, DONE after that: deterministic, and no waiting.
"""
import os
from supraopt.records import RunState, RunStatus
from supraopt.rigs.simulated import SimulatedRig


class CountingRig(SimulatedRig):
    def __init__(self, starts_path, **options):
        super().__init__(**options)
        self.starts_path = starts_path
        self.seen = set()

    def submit(self, proposal):
        new = proposal.experiment_id not in self.book
        super().submit(proposal)
        if new:
            with open(self.starts_path, "a") as stream:
                stream.write(proposal.experiment_id + "\\n")
                stream.flush()
                os.fsync(stream.fileno())

    def poll(self, experiment_id):
        if experiment_id in self.book and experiment_id not in self.seen:
            self.seen.add(experiment_id)
            return RunStatus(experiment_id, RunState.RUNNING)
        return super().poll(experiment_id)
'''

FAST = [
    ["after_mark_dispatched:1"],  # between 'dispatched' in the ledger and submit
    ["after_poll_done:2"],  # between the rig's result and its record
    ["after_record:1"],
    ["after_suggest:2"],
]
SLOW = [
    ["after_adopt:1"],
    ["after_suggest:1"],
    ["after_suggest:3"],
    ["after_mark_dispatched:2"],
    ["after_mark_dispatched:3"],
    ["after_submit:1"],
    ["after_submit:2"],
    ["after_submit:3"],
    ["after_poll_running:1"],
    ["after_mark_running:1"],
    ["after_mark_running:3"],
    ["after_poll_done:1"],
    ["after_poll_done:3"],
    ["after_record:2"],
    ["after_record:3"],
    ["batch2", "after_submit:2"],
    ["batch2", "after_poll_done:1"],
    ["batch2", "after_record:1"],
    ["after_mark_dispatched:1", "after_poll_lost:1"],  # killed again while resuming the undispatched run
    ["after_mark_dispatched:2", "after_resubmit:1"],
]


def make_campaign(directory: Path, batch: int) -> None:
    directory.mkdir()
    (directory / "counting_rig.py").write_text(COUNTING_RIG)
    options = {
        "state_path": str(directory / "rig-state.sqlite"),
        "starts_path": str(directory / "rig-starts.log"),
        "duration_s": 0.0,
        "seed": 0,
    }
    with Campaign.create(
        directory, "cspbbr3-flow-focusing", 450.0, rig=RigSettings("counting_rig:CountingRig", options)
    ) as c:
        loop = LoopSettings(budget=BUDGET, batch=batch, stop_on_hit=False, poll_interval_s=0.0, rig_timeout_s=30.0)
        spec = dataclasses.replace(c.spec, loop=loop)
    (directory / SPEC_FILE).write_text(spec.to_toml())


def supraopt_run(directory: Path, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SUPRAOPT_CRASH_AT"}
    env["OMP_NUM_THREADS"] = "1"  # tiny GPs: extra threads only contend (3x faster on a busy 2-core machine)
    if crash_at is not None:
        env["SUPRAOPT_CRASH_AT"] = crash_at
    command = [sys.executable, "-m", "supraopt.cli", "run", str(directory)]
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=300)


def kill_and_resume(tmp_path: Path, steps: list[str]) -> None:
    batch = 2 if steps[0] == "batch2" else 1
    crashes = [s for s in steps if s != "batch2"]
    directory = tmp_path / "campaign"
    make_campaign(directory, batch)
    for crash_at in crashes:
        killed = supraopt_run(directory, crash_at)
        assert killed.returncode == -signal.SIGKILL, f"{crash_at} was never reached:\n{killed.stdout}{killed.stderr}"
    for _ in range(3):
        final = supraopt_run(directory, None)
        if final.returncode != -signal.SIGKILL:
            break
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"budget of {BUDGET} experiment(s) spent" in final.stdout

    ledger = Ledger(f"sqlite:///{directory / 'ledger.sqlite'}")
    try:
        experiments = {e.id: e for e in ledger.experiments()}
        events = ledger.events()
    finally:
        ledger.close()
    statuses = Counter(e.status for e in experiments.values())
    assert statuses[Status.DONE] + statuses[Status.FAILED] == BUDGET and len(experiments) == BUDGET, statuses

    state = {entry.experiment_id: entry for entry in RunBook(directory / "rig-state.sqlite").entries()}
    starts = (directory / "rig-starts.log").read_text().split()
    assert len(starts) == len(set(starts)), f"a run was started twice: {starts}"
    assert set(state) == set(experiments), "the rig ran exactly the experiments the ledger holds, no extra run"

    rig = SimulatedRig(seed=0, state_path=directory / "rig-state.sqlite")
    for experiment_id, experiment in experiments.items():
        assert state[experiment_id].settings == experiment.settings
        truth = rig.poll(experiment_id).result  # the twin's result is a function of (seed, id)
        if isinstance(truth, Measurement):
            assert experiment.status is Status.DONE and experiment.measurement == truth, experiment_id
        else:
            assert isinstance(truth, Failure)
            assert experiment.status is Status.FAILED and experiment.failure == truth, experiment_id
    kinds = Counter(
        (e["experiment_id"], "resubmitted" if e["payload"].get("resubmitted") else e["kind"]) for e in events
    )
    for experiment_id in experiments:
        assert kinds[experiment_id, "dispatched"] == 1
        assert kinds[experiment_id, "resubmitted"] <= 1  # only after the rig said LOST
        assert kinds[experiment_id, "measured"] + kinds[experiment_id, "failed"] == 1


def case_id(steps: list[str]) -> str:
    return "+".join(steps)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    """Run every selected kill case up front, two at a time (each is mostly waiting on one busy process).

    Maps the case id to None (passed) or the formatted failure, which the case's own test reports.
    """
    selected = [
        cast(list[str], item.callspec.params["steps"])
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.module is request.module and hasattr(item, "callspec")
    ]

    def outcome(steps: list[str]) -> str | None:
        try:
            kill_and_resume(tmp_path_factory.mktemp("kill"), steps)
        except Exception:
            return traceback.format_exc()
        return None

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        futures = {case_id(steps): pool.submit(outcome, steps) for steps in selected}
        return {key: future.result() for key, future in futures.items()}


def check(outcomes: dict[str, str | None], steps: list[str]) -> None:
    failure = outcomes[case_id(steps)]
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("steps", FAST, ids=[case_id(s) for s in FAST])
def test_kill_9_then_resume(outcomes: dict[str, str | None], steps: list[str]) -> None:
    check(outcomes, steps)


@pytest.mark.slow
@pytest.mark.parametrize("steps", SLOW, ids=[case_id(s) for s in SLOW])
def test_kill_9_then_resume_everywhere(outcomes: dict[str, str | None], steps: list[str]) -> None:
    check(outcomes, steps)


def test_there_are_at_least_twenty_kill_points() -> None:
    assert len({tuple(s) for s in FAST + SLOW}) >= 20
