"""The closed-loop runner on working rigs: full campaigns, batches, resuming, the manual rig, third-party adapters, CLI."""

from __future__ import annotations

import re
import runpy
import shutil
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.ledger import OPEN, Ledger, Status
from supraopt.loop import Event, StopReason, run, run_campaign
from supraopt.records import Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import SimulatedRig
from supraopt.spec import RigSettings

CSPBBR3 = "cspbbr3-flow-focusing"
REPO = Path(__file__).resolve().parent.parent


class FakeTime:
    """A clock that only moves when the runner sleeps: no real waiting, no wall-clock dependence."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds


class CountingRig:
    """A simulated rig that counts submit calls and the runs it really started."""

    def __init__(self, inner: SimulatedRig) -> None:
        self.inner = inner
        self.submits: Counter[str] = Counter()
        self.started: Counter[str] = Counter()

    def limits(self) -> RigLimits:
        return self.inner.limits()

    def submit(self, proposal: Proposal) -> None:
        self.submits[proposal.experiment_id] += 1
        new = self.inner.poll(proposal.experiment_id).state is RunState.LOST
        self.inner.submit(proposal)
        if new:
            self.started[proposal.experiment_id] += 1

    def poll(self, experiment_id: str) -> RunStatus:
        return self.inner.poll(experiment_id)

    def cancel(self, experiment_id: str) -> None:
        self.inner.cancel(experiment_id)


def result_events(ledger: Ledger) -> Counter[str]:
    return Counter(e["experiment_id"] for e in ledger.events() if e["kind"] in ("measured", "failed", "corrected"))


@pytest.fixture
def campaign(tmp_path: Path) -> Iterator[Campaign]:
    with Campaign.create(tmp_path / "campaign", CSPBBR3, 450.0, seed=0) as opened:
        yield opened


def test_a_full_campaign_on_the_twin_reaches_the_target(campaign: Campaign) -> None:
    events: list[Event] = []
    summary = run_campaign(campaign, SimulatedRig(), budget=15, poll_interval_s=0, progress=events.append)
    assert summary.reason is StopReason.HIT and summary.hit and summary.exit_code == 0
    assert 1 <= summary.experiments_used <= 15
    assert summary.best is not None
    best = campaign.ledger.get(summary.best.experiment_id).measurement
    assert best is not None and campaign.spec.target.is_hit(best.diameter_nm, best.pdi_pct)
    assert not campaign.ledger.experiments(OPEN)
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "stopped"
    suggested = [e for e in events if e.kind == "suggested"]
    assert suggested and {"diameter_nm", "diameter_sd_nm", "p_hit"} <= set(suggested[0].prediction)
    assert [e.hit for e in events if e.kind == "measured"][-1] is True
    log = (campaign.directory / "run.log").read_text().splitlines()
    assert len(log) == len(events)
    assert "HIT" in log[-2] and "stopped" in log[-1] and "target hit by" in log[-1]


def test_batch_of_two_keeps_two_runs_in_flight(campaign: Campaign) -> None:
    time = FakeTime()
    rig = CountingRig(SimulatedRig(duration_s=60.0, clock=time.clock))
    events: list[Event] = []
    summary = run_campaign(
        campaign,
        rig,
        budget=4,
        batch=2,
        stop_on_hit=False,
        poll_interval_s=10.0,
        progress=events.append,
        sleep=time.sleep,
        clock=time.clock,
    )
    assert summary.reason is StopReason.BUDGET and summary.experiments_used == 4
    in_flight, most = 0, 0
    for event in events:
        in_flight += {"submitted": 1, "measured": -1, "failed": -1}.get(event.kind, 0)
        most = max(most, in_flight)
    assert most == 2
    assert time.slept >= 2 * 60.0  # two rounds of 60 s runs, waited for by polling
    statuses = Counter(e.status for e in campaign.ledger.experiments())
    assert statuses[Status.DONE] + statuses[Status.FAILED] == 4 and sum(statuses.values()) == 4
    assert all(kind == "running" for kind in [e.kind for e in events if e.kind == "running"])
    assert len([e for e in events if e.kind == "running"]) == 4  # each run seen running once, marked once
    assert set(rig.started.values()) == {1} and len(rig.started) == 4


def test_resume_after_a_normal_stop_and_reuse_pending_suggestions(campaign: Campaign) -> None:
    [pending] = campaign.suggest(1)  # as 'supraopt suggest' leaves it
    rig = CountingRig(SimulatedRig())
    events: list[Event] = []
    first = run_campaign(campaign, rig, budget=2, stop_on_hit=False, poll_interval_s=0, progress=events.append)
    assert first.reason is StopReason.BUDGET and first.experiments_used == 2
    assert next(e.experiment_id for e in events if e.kind == "submitted") == pending.experiment_id
    resuming = next(e for e in events if e.kind == "resuming")
    assert resuming.experiment_id == pending.experiment_id and resuming.message == "(pending in the ledger)"
    assert resuming.text().startswith(f"resuming {pending.experiment_id}: concentration_mg_ml=")
    assert not [e for e in events if e.kind == "suggested" and e.experiment_id == pending.experiment_id]
    again = run_campaign(campaign, rig, budget=2, stop_on_hit=False, poll_interval_s=0)
    assert again.reason is StopReason.BUDGET and sum(rig.submits.values()) == 2  # nothing new dispatched
    more = run_campaign(campaign, rig, budget=4, stop_on_hit=False, poll_interval_s=0)
    assert more.experiments_used == 4
    assert sorted(rig.started) == ["E001", "E002", "E003", "E004"] and set(rig.submits.values()) == {1}
    assert set(result_events(campaign.ledger).values()) == {1}


def test_ctrl_c_leaves_the_run_in_flight_and_the_next_run_picks_it_up(campaign: Campaign) -> None:
    rig = CountingRig(SimulatedRig())

    def interrupt(event: Event) -> None:
        if event.kind == "submitted":
            raise KeyboardInterrupt

    summary = run_campaign(campaign, rig, budget=2, stop_on_hit=False, poll_interval_s=0, progress=interrupt)
    assert summary.reason is StopReason.INTERRUPTED and summary.exit_code == 130
    assert summary.in_flight == ("E001",) and "run the same command again" in summary.message
    assert campaign.ledger.get("E001").status is Status.DISPATCHED
    events: list[Event] = []
    resumed = run_campaign(campaign, rig, budget=2, stop_on_hit=False, poll_interval_s=0, progress=events.append)
    assert resumed.reason is StopReason.BUDGET and resumed.experiments_used == 2
    assert events[0].kind == "resumed" and "E001" in events[0].message
    assert rig.submits["E001"] == 1 and rig.started["E001"] == 1  # polled on resume, not resubmitted
    assert campaign.ledger.get("E001").status in (Status.DONE, Status.FAILED)


def test_manual_rig_results_recorded_by_a_person_are_picked_up_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "manual"
    Campaign.create(directory, CSPBBR3, 450.0, rig=RigSettings("manual")).close()
    instructions = directory / "manual" / "next_experiments.txt"
    done = threading.Event()
    recorded: list[str] = []

    def person() -> None:
        """Reads the to-do list, 'runs' each experiment on the twin and records it with its own ledger handle."""
        bench = SimulatedRig()
        with Campaign.open(directory) as own:
            while not done.is_set():
                text = instructions.read_text() if instructions.exists() else ""
                for experiment_id in re.findall(r"=== experiment (\S+) ===", text):
                    if experiment_id in recorded:
                        continue
                    settings = own.ledger.get(experiment_id).settings
                    bench.submit(Proposal(experiment_id, settings))
                    result = bench.poll(experiment_id).result
                    assert result is not None
                    own.record(experiment_id, result, note="by hand")
                    recorded.append(experiment_id)
                done.wait(0.01)

    helper = threading.Thread(target=person, daemon=True)
    helper.start()
    events: list[Event] = []
    try:
        summary = run(directory, budget=3, stop_on_hit=False, poll_interval_s=0.02, progress=events.append)
    finally:
        done.set()
        helper.join(timeout=30)
    assert summary.reason is StopReason.BUDGET and summary.experiments_used == 3
    assert recorded == ["E001", "E002", "E003"]
    with Campaign.open(directory) as after:
        assert set(result_events(after.ledger).values()) == {1}  # never recorded twice
        assert all(e.note == "by hand" for e in after.ledger.experiments())
    assert len([e for e in events if e.message == "(recorded by hand)"]) == 3
    assert capsys.readouterr().out.count("Set the rig to:") == 3


BENCH_CAMPAIGN = """
name = "bench rig from the example"
model = "cspbbr3-flow-focusing"
seed = 0

[target]
diameter_nm = 400.0

[rig]
adapter = "{adapter}"

[rig.options]
seed = 1
duration_s = 0.0

[loop]
budget = 15
poll_interval_s = 0.0
"""


def test_third_party_adapter_by_dotted_path_runs_a_full_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    directory = tmp_path / "bench"
    directory.mkdir()
    (directory / "campaign.toml").write_text(BENCH_CAMPAIGN.format(adapter="examples.custom_adapter:BenchRig"))
    summary = run(directory)
    assert summary.reason is StopReason.HIT and summary.experiments_used <= 15
    with Campaign.open(directory) as campaign:
        assert not campaign.ledger.experiments(OPEN)
        assert campaign.status().hit


def test_an_adapter_module_in_the_campaign_folder_is_found_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the runner appends the campaign folder
    directory = tmp_path / "bench"
    directory.mkdir()
    shutil.copy(REPO / "examples" / "custom_adapter.py", directory / "my_bench_rig.py")
    (directory / "campaign.toml").write_text(BENCH_CAMPAIGN.format(adapter="my_bench_rig:BenchRig"))
    result = CliRunner().invoke(app, ["run", str(directory), "--budget", "15"])
    assert result.exit_code == 0, result.output
    assert "Stopped: target hit by" in result.output and "Ledger:" in result.output
    sys.modules.pop("my_bench_rig", None)


def test_cli_run_resumes_and_reports_user_errors(campaign: Campaign) -> None:
    directory = str(campaign.directory)
    runner = CliRunner()
    result = runner.invoke(app, ["run", directory, "--budget", "2", "--keep-going", "--poll-interval", "0"])
    assert result.exit_code == 0, result.output
    assert "budget of 2 experiment(s) spent" in result.output
    assert "E002 measured" in result.output or "E002 failed" in result.output
    result = runner.invoke(app, ["run", directory, "--budget", "0"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "budget=0" in result.output
    result = runner.invoke(app, ["run", directory, "--rig", "nowhere.module:Rig"])
    assert result.exit_code == 1 and "'nowhere.module' not found" in result.output
    result = runner.invoke(app, ["run", str(campaign.directory / "missing")])
    assert result.exit_code == 1 and "not a campaign folder" in result.output


def test_cli_demo_runs_to_the_target_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    [directory] = tmp_path.glob("supraopt-demo-*")
    assert f"Demo campaign in {directory}" in result.output
    assert "Stopped: target hit by" in result.output and "Best hit (closest to the target): E0" in result.output
    assert f"Ledger: {directory / 'ledger.sqlite'}" in result.output
    again = runner.invoke(app, ["demo", str(directory)])
    assert again.exit_code == 0, again.output
    assert "Resuming the campaign" in again.output and "target hit by" in again.output
    named = tmp_path / "named"
    other = runner.invoke(app, ["demo", str(named), "--target-nm", "460", "--budget", "3", "--world-seed", "3"])
    assert other.exit_code == 0, other.output
    with Campaign.open(named) as campaign:
        assert campaign.spec.target.diameter_nm == 460.0 and campaign.spec.rig.options["world_seed"] == 3
        assert campaign.spec.loop.budget == 3 and campaign.spec.loop.poll_interval_s == 0.0


def test_the_custom_adapter_example_runs_as_a_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(REPO / "examples" / "custom_adapter.py"), run_name="__main__")
    sys.modules.pop("custom_adapter", None)
    out = capsys.readouterr().out
    assert "target hit by" in out and str(tmp_path) in out


def test_stop_on_hit_waits_for_the_rest_of_the_batch(campaign: Campaign) -> None:
    time = FakeTime()
    rig = CountingRig(SimulatedRig(duration_s=60.0, clock=time.clock))
    summary = run_campaign(campaign, rig, budget=15, batch=3, poll_interval_s=10.0, sleep=time.sleep, clock=time.clock)
    assert summary.reason is StopReason.HIT and summary.in_flight == ()
    assert not campaign.ledger.experiments(OPEN)  # runs already under way were waited for and recorded
    assert summary.experiments_used == len(rig.started) and summary.experiments_used % 3 == 0


@pytest.mark.timeout(120)  # a busy loop on the fake clock would never end
def test_a_resumed_long_run_is_waited_for_by_sleeping_between_polls(campaign: Campaign) -> None:
    time = FakeTime()
    rig = CountingRig(SimulatedRig(duration_s=3600.0, clock=time.clock))
    [s] = campaign.suggest(1)
    campaign.ledger.mark_dispatched(s.experiment_id)
    rig.inner.submit(Proposal(s.experiment_id, s.settings))  # a run under way when the runner restarts
    summary = run_campaign(campaign, rig, budget=1, batch=1, poll_interval_s=600.0, sleep=time.sleep, clock=time.clock)
    assert summary.reason in (StopReason.HIT, StopReason.BUDGET) and summary.experiments_used == 1
    assert time.slept == pytest.approx(3600.0) and rig.submits[s.experiment_id] == 0
    assert rig.inner.poll(s.experiment_id).state in (RunState.DONE, RunState.FAILED)


def test_sigterm_stops_the_runner_gracefully_leaving_the_run_in_flight(tmp_path: Path) -> None:
    """A service manager's SIGTERM is a Ctrl-C: exit 130, the run stays in flight for the next run."""
    import os
    import signal
    import subprocess
    import time

    directory = tmp_path / "term"
    options = {"seed": 1, "duration_s": 60.0}  # the run is still going when the signal comes
    Campaign.create(directory, CSPBBR3, 450.0, rig=RigSettings("simulated", options)).close()
    command = [sys.executable, "-m", "supraopt.cli", "run", str(directory), "--budget", "1", "--poll-interval", "0.2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = directory / "run.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "submitted" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the runner never submitted"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "run the same command again" in output
    with Campaign.open(directory) as campaign:
        assert [e.status for e in campaign.ledger.experiments()] in ([Status.DISPATCHED], [Status.RUNNING])
