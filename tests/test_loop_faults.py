"""The runner against misbehaving rigs: errors, hangs, garbage results, lost runs, lost replies, unsafe proposals."""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.errors import InputError, RigError, RigTimeout
from supraopt.ledger import OPEN, Ledger, Status
from supraopt.loop import Event, RunSummary, StopReason, run_campaign, submit_within_limits
from supraopt.loop.rigcall import RigCall
from supraopt.records import PARAMETERS, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs.base import Rig
from supraopt.rigs.simulated import HOLLOW, NO_DROPLETS, UNSTABLE, SimulatedRig
from supraopt.spec import SPEC_FILE, LoopSettings, RigSettings, default_bounds

CSPBBR3 = "cspbbr3-flow-focusing"
BOUNDS = default_bounds(CSPBBR3)


class FakeTime:
    """A clock that only moves when the runner sleeps (backoff waits cost nothing)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class FaultyRig:
    """A simulated rig plus hooks to misbehave; counts submit calls and the runs it really started."""

    def __init__(self) -> None:
        self.inner = SimulatedRig()
        self.submits: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        self.polls: Counter[str] = Counter()
        self.sent: list[dict[str, float]] = []

    def limits(self) -> RigLimits:
        return self.inner.limits()

    def submit(self, proposal: Proposal) -> None:
        self.submits[proposal.experiment_id] += 1
        self.sent.append(dict(proposal.settings))
        new = self.inner.poll(proposal.experiment_id).state is RunState.LOST
        self.inner.submit(proposal)
        if new:
            self.started[proposal.experiment_id] += 1
        self.after_submit(proposal)

    def after_submit(self, proposal: Proposal) -> None:
        """Hook: runs once the run is accepted (raise here to lose the reply)."""

    def poll(self, experiment_id: str) -> RunStatus:
        self.polls[experiment_id] += 1
        return self.inner.poll(experiment_id)

    def cancel(self, experiment_id: str) -> None:
        self.inner.cancel(experiment_id)

    def forget(self, experiment_id: str) -> None:
        self.inner.book.release(experiment_id)  # the rig loses the run (power cut, wiped queue)


@pytest.fixture
def campaign(tmp_path: Path) -> Iterator[Campaign]:
    with Campaign.create(tmp_path / "campaign", CSPBBR3, 450.0, seed=0) as opened:
        yield opened


def go(campaign: Campaign, rig: Rig, *, budget: int = 3, max_rig_errors: int = 4) -> tuple[RunSummary, list[Event]]:
    """Run to the budget (no stop on a hit) on a fake clock; return the summary and every event."""
    time = FakeTime()
    events: list[Event] = []
    summary = run_campaign(
        campaign,
        rig,
        budget=budget,
        stop_on_hit=False,
        poll_interval_s=1.0,
        max_rig_errors=max_rig_errors,
        progress=events.append,
        sleep=time.sleep,
        clock=time.clock,
    )
    return summary, events


def assert_consistent(ledger: Ledger) -> None:
    """Nothing corrupted: one suggestion and at most one dispatch per experiment, results only where they belong."""
    kinds: dict[str, list[str]] = {}
    for event in ledger.events():
        kind = "resubmitted" if event["payload"].get("resubmitted") else event["kind"]  # after a LOST reply
        kinds.setdefault(event["experiment_id"], []).append(kind)
    for e in ledger.experiments():
        history = kinds[e.id]
        assert history.count("suggested") == 1 and history.count("dispatched") <= 1
        results = history.count("measured") + history.count("failed")
        if e.status is Status.DONE:
            assert results == 1 and e.measurement is not None and math.isfinite(e.measurement.diameter_nm)
        elif e.status is Status.FAILED:
            assert results == 1 and e.failure is not None and e.failure.reason in (HOLLOW, UNSTABLE, NO_DROPLETS)
        else:
            assert results == 0 and e.measurement is None
        if e.status is Status.ABANDONED:
            assert e.note


def test_rig_errors_are_retried_with_backoff_and_never_recorded_as_failures(campaign: Campaign) -> None:
    class Flaky(FaultyRig):
        calls = 0

        def poll(self, experiment_id: str) -> RunStatus:
            self.calls += 1
            if self.calls % 2:
                raise RigError("serial link dropped a frame")
            if self.calls % 3 == 0:
                return None  # type: ignore[return-value]  # a buggy driver's reply
            return super().poll(experiment_id)

    rig = Flaky()
    summary, events = go(campaign, rig)
    assert summary.reason is StopReason.BUDGET and summary.experiments_used == 3
    errors = [e.message for e in events if e.kind == "rig error"]
    assert any("serial link dropped a frame; retry in 1 s" in m for m in errors)
    assert any("retry in 2 s" in m for m in errors)  # backoff doubles on consecutive errors
    assert any("invalid reply None" in m for m in errors)
    assert not campaign.ledger.experiments([Status.ABANDONED]) and not campaign.ledger.experiments(OPEN)
    assert set(rig.started.values()) == {1}
    assert_consistent(campaign.ledger)


def test_too_many_rig_errors_stop_cleanly_and_the_next_run_resumes(campaign: Campaign) -> None:
    class Dead(FaultyRig):
        def poll(self, experiment_id: str) -> RunStatus:
            raise ConnectionResetError("rig controller unreachable")

    dead = Dead()
    summary, _ = go(campaign, dead, max_rig_errors=3)
    assert summary.reason is StopReason.RIG_ERROR and summary.exit_code == 2
    message = summary.message
    assert "failed 3 times in a row" in message and "ConnectionResetError" in message
    assert "E001 kept in flight" in message and "run the same command again" in message
    assert "\n" not in message
    assert summary.in_flight == ("E001",)
    assert campaign.ledger.get("E001").status is Status.DISPATCHED
    healed = FaultyRig()
    healed.inner = dead.inner  # the same hardware, link repaired
    summary, _ = go(campaign, healed)
    assert summary.reason is StopReason.BUDGET
    assert healed.submits["E001"] == 0 and dead.started["E001"] == 1  # asked about, not started again
    assert_consistent(campaign.ledger)


def test_a_rig_call_that_hangs_times_out_and_is_asked_again(campaign: Campaign) -> None:
    released = {"E001": threading.Event(), "E002": threading.Event()}

    class Hanging(FaultyRig):
        def after_submit(self, proposal: Proposal) -> None:
            if proposal.experiment_id == "E001":
                released["E001"].wait(30)  # accepted, but the reply hangs

        def poll(self, experiment_id: str) -> RunStatus:
            if experiment_id == "E002" and self.polls[experiment_id] == 0:
                self.polls[experiment_id] += 1
                released["E002"].wait(30)  # the first poll of E002 hangs
            return super().poll(experiment_id)

    def progress(event: Event) -> None:
        events.append(event)
        if event.kind == "rig error" and event.experiment_id in released:
            released[event.experiment_id].set()  # the hung call returns after the runner gave up on it

    rig = Hanging()
    events: list[Event] = []
    time = FakeTime()
    summary = run_campaign(
        campaign,
        rig,
        budget=3,
        stop_on_hit=False,
        poll_interval_s=1.0,
        rig_timeout_s=0.5,
        progress=progress,
        sleep=time.sleep,
        clock=time.clock,
    )
    assert summary.reason is StopReason.BUDGET
    timeouts = [e for e in events if e.kind == "rig error" and "no answer" in e.message]
    assert {"E001", "E002"} <= {e.experiment_id for e in timeouts}
    assert "state unknown, asking again" in timeouts[0].message
    assert set(rig.started.values()) == {1} and rig.submits["E001"] == 1
    assert not campaign.ledger.experiments([Status.ABANDONED])
    assert_consistent(campaign.ledger)


def test_a_stuck_call_site_keeps_at_most_one_thread() -> None:
    release = threading.Event()
    calls: list[int] = []

    def stuck(value: int) -> int:
        calls.append(value)
        release.wait(30)
        return value

    guard = RigCall("stuck", stuck, 0.05)
    try:
        for value in range(3):
            with pytest.raises(RigTimeout, match=r"rig\.stuck\(\)"):
                guard(value)
        assert calls == [0]  # later calls waited for the stuck one instead of starting more threads
        assert sum(t.name == "supraopt-rig-stuck" and t.is_alive() for t in threading.enumerate()) == 1
    finally:
        release.set()
    guard.timeout_s = 30.0  # wait as long as it takes the released thread to return
    assert guard(7) == 7  # once the stuck call has returned, calls go through again
    with pytest.raises(RigError, match="boom"):
        RigCall("raising", lambda: (_ for _ in ()).throw(RigError("boom")), 1.0)()


def test_nan_negative_or_plain_number_results_are_abandoned_not_learned(campaign: Campaign) -> None:
    nan = object.__new__(Measurement)  # what a driver bypassing the checks could hand back
    for name, value in {"diameter_nm": math.nan, "pdi_pct": 4.0, "n_particles": None, "droplet_um": None}.items():
        object.__setattr__(nan, name, value)

    class Garbage(FaultyRig):
        def poll(self, experiment_id: str) -> RunStatus:
            status = super().poll(experiment_id)
            if experiment_id == "E001":
                return RunStatus(experiment_id, RunState.DONE, nan)
            if experiment_id == "E002":
                return RunStatus(experiment_id, RunState.DONE, Measurement(diameter_nm=-120.0, pdi_pct=4.0))
            if experiment_id == "E003":
                return RunStatus(experiment_id, RunState.DONE, 450.0)  # type: ignore[arg-type]
            return status

    summary, events = go(campaign, Garbage(), budget=2, max_rig_errors=5)
    assert summary.reason is StopReason.BUDGET and summary.experiments_used == 2
    abandoned = campaign.ledger.experiments([Status.ABANDONED])
    assert [e.id for e in abandoned] == ["E001", "E002", "E003"]
    assert all(e.note.startswith("rig error: invalid result") for e in abandoned)
    assert "diameter_nm=nan" in abandoned[0].note and "diameter_nm=-120.0" in abandoned[1].note
    frame = campaign.ledger.to_frame()
    assert frame.loc[frame.status == "abandoned", "diameter_nm"].isna().all()  # the model never sees them
    assert [e.experiment_id for e in events if e.kind == "abandoned"] == ["E001", "E002", "E003"]
    assert_consistent(campaign.ledger)


def test_always_garbage_stops_instead_of_suggesting_forever(campaign: Campaign) -> None:
    class AlwaysNegative(FaultyRig):
        def poll(self, experiment_id: str) -> RunStatus:
            raise InputError("diameter_nm=-1.0 is not plausible")

    summary, _ = go(campaign, AlwaysNegative(), max_rig_errors=3)
    assert summary.reason is StopReason.RIG_ERROR and summary.experiments_used == 0
    assert "3 experiments in a row ended without a result" in summary.message
    assert len(campaign.ledger.experiments([Status.ABANDONED])) == 3


def test_a_lost_run_is_resubmitted_once_then_abandoned(campaign: Campaign) -> None:
    class Losing(FaultyRig):
        def poll(self, experiment_id: str) -> RunStatus:
            if (experiment_id == "E001" and self.polls[experiment_id] == 0) or experiment_id == "E002":
                self.forget(experiment_id)  # E001 lost once; E002 lost every time
            return super().poll(experiment_id)

    rig = Losing()
    summary, _ = go(campaign, rig, budget=2)
    assert summary.reason is StopReason.BUDGET
    assert rig.started["E001"] == 2 and campaign.ledger.get("E001").status in (Status.DONE, Status.FAILED)
    assert rig.started["E002"] == 2 and rig.submits["E002"] == 2
    lost = campaign.ledger.get("E002")
    assert lost.status is Status.ABANDONED and "lost by the rig even after a resubmit" in lost.note
    resubmits = [e for e in campaign.ledger.events() if e["payload"].get("resubmitted")]
    assert [(e["experiment_id"], e["kind"]) for e in resubmits] == [("E001", "dispatched"), ("E002", "dispatched")]
    assert all("the rig reported the run lost" in e["payload"]["reason"] for e in resubmits)
    logged = [line for line in (campaign.directory / "run.log").read_text().splitlines() if " resubmitted " in line]
    assert [line.split()[1] for line in logged] == ["E001", "E002"]
    assert "the rig reported the run lost (the simulated rig has no run under this id); submitted again" in logged[0]
    assert campaign.ledger.get("E003").status in (Status.DONE, Status.FAILED)
    assert_consistent(campaign.ledger)


def test_a_lost_reply_never_starts_a_second_run(campaign: Campaign) -> None:
    class LostReplies(FaultyRig):
        def after_submit(self, proposal: Proposal) -> None:
            if self.submits[proposal.experiment_id] == 1:
                raise (RigTimeout if proposal.experiment_id == "E002" else RigError)("connection reset")

    rig = LostReplies()
    summary, events = go(campaign, rig)
    assert summary.reason is StopReason.BUDGET
    assert set(rig.started.values()) == {1} and set(rig.submits.values()) == {1}  # polled, found, not resent
    assert len([e for e in events if e.kind == "rig error"]) == 3
    # a restart that finds experiments already dispatched asks about them and submits nothing
    [again] = campaign.suggest(1)
    campaign.ledger.mark_dispatched(again.experiment_id)
    rig.inner.submit(Proposal(again.experiment_id, again.settings))
    before = sum(rig.submits.values())
    summary, _ = go(campaign, rig, budget=4)
    assert sum(rig.submits.values()) == before and campaign.ledger.get(again.experiment_id).status not in OPEN
    assert_consistent(campaign.ledger)


# ------------------------------------------------------------------ rig limits


@st.composite
def limits_and_settings(draw: st.DrawFn) -> tuple[RigLimits, dict[str, float]]:
    """Random rig limits inside the campaign bounds, and settings inside the bounds (edges, NaN, inf included)."""
    limits: dict[str, tuple[float, float]] = {}
    settings: dict[str, float] = {}
    for name in PARAMETERS:
        low, high = BOUNDS[name]
        a = draw(st.floats(low, high))
        b = draw(st.floats(low, high))
        limits[name] = (min(a, b), max(a, b))
        values = st.floats(low, high) | st.sampled_from([min(a, b), max(a, b), math.nan, math.inf, -math.inf])
        if draw(st.booleans()) or name != "temperature_c":
            settings[name] = draw(values)
    return RigLimits(limits), settings


@given(limits_and_settings())
def test_a_proposal_outside_the_rig_limits_is_never_submitted(case: tuple[RigLimits, dict[str, float]]) -> None:
    limits, settings = case
    sent: list[Proposal] = []
    proposal = Proposal("E001", settings)
    problems = submit_within_limits(sent.append, limits, proposal)
    inside = all(name in settings and low <= settings[name] <= high for name, (low, high) in limits.bounds.items())
    if inside:
        assert sent == [proposal] and problems == []
    else:
        assert sent == [] and problems
    for submitted in sent:  # the property the rig relies on, checked without RigLimits.violations
        for name, (low, high) in limits.bounds.items():
            assert low <= submitted.settings[name] <= high


def test_the_runner_refuses_proposals_outside_the_rig_limits(campaign: Campaign) -> None:
    class Narrow(FaultyRig):
        def limits(self) -> RigLimits:
            return RigLimits({**BOUNDS, "temperature_c": (20.0, 35.0)})

    outside = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 50.0}
    inside = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 30.0}
    campaign.ledger.add_pending([(outside, {}), (inside, {})])  # e.g. from 'supraopt suggest'
    rig = Narrow()
    summary, events = go(campaign, rig, budget=1)
    assert summary.reason is StopReason.BUDGET
    assert rig.sent == [inside] and "E001" not in rig.submits
    refused = campaign.ledger.get("E001")
    assert refused.status is Status.ABANDONED
    assert refused.note == "refused: temperature_c=50.0 outside rig limits [20, 35]; never submitted."
    assert any(e.kind == "warning" and "temperature_c to [20, 35]" in e.message for e in events)
    assert [e.experiment_id for e in events if e.kind == "refused"] == ["E001"]


def test_new_suggestions_stay_inside_narrower_rig_limits(campaign: Campaign) -> None:
    class Narrow(FaultyRig):
        def limits(self) -> RigLimits:
            return RigLimits({**BOUNDS, "temperature_c": (20.0, 30.0), "flow_ratio": (2.0, 3.0)})

    rig = Narrow()
    summary, events = go(campaign, rig, budget=3)
    assert summary.reason is StopReason.BUDGET
    assert len(rig.sent) == 3 and not any(e.kind == "refused" for e in events)
    for settings in rig.sent:
        assert 20.0 <= settings["temperature_c"] <= 30.0 and 2.0 <= settings["flow_ratio"] <= 3.0


def test_a_campaign_entirely_outside_the_rig_limits_stops_with_advice(campaign: Campaign) -> None:
    class Tiny(FaultyRig):
        def limits(self) -> RigLimits:
            return RigLimits({**BOUNDS, "concentration_mg_ml": (0.1, 0.4)})

    rig = Tiny()
    summary, _ = go(campaign, rig, max_rig_errors=3)
    assert summary.reason is StopReason.RIG_ERROR and summary.exit_code == 2
    assert "do not overlap the rig limits [0.1, 0.4]; fix [bounds] in campaign.toml" in summary.message
    assert rig.sent == []


BROKEN_RIG = """
from supraopt.errors import RigError
from supraopt.records import RigLimits


class Broken:
    def limits(self):
        return RigLimits()

    def submit(self, proposal):
        pass

    def poll(self, experiment_id):
        raise RigError("no link to the pump controller")

    def cancel(self, experiment_id):
        pass
"""


def test_cli_run_exits_2_with_one_line_when_the_rig_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the runner appends the campaign folder
    directory = tmp_path / "broken"
    with Campaign.create(directory, CSPBBR3, 450.0, rig=RigSettings("broken_rig_for_cli:Broken")) as created:
        spec = dataclasses.replace(created.spec, loop=LoopSettings(max_rig_errors=2, poll_interval_s=0.0))
    (directory / SPEC_FILE).write_text(spec.to_toml())
    (directory / "broken_rig_for_cli.py").write_text(BROKEN_RIG)
    result = CliRunner().invoke(app, ["run", str(directory)])
    sys.modules.pop("broken_rig_for_cli", None)
    assert result.exit_code == 2, result.output
    [stopped] = [line for line in result.output.splitlines() if line.startswith("Stopped:")]
    assert "the rig failed 2 times in a row" in stopped and "no link to the pump controller" in stopped
    with Campaign.open(directory) as campaign:
        assert campaign.ledger.get("E001").status is Status.DISPATCHED


def test_a_polydispersity_sent_as_a_fraction_is_abandoned_not_learned(campaign: Campaign) -> None:
    """An adapter that reports CV 0.05 instead of 5 %: each run is abandoned as invalid, the note names the unit."""

    class FractionRig(FaultyRig):
        def poll(self, experiment_id: str) -> RunStatus:
            status = super().poll(experiment_id)
            if isinstance(status.result, Measurement):
                fraction = dataclasses.replace(status.result, pdi_pct=status.result.pdi_pct / 100)
                return dataclasses.replace(status, result=fraction)
            return status

    _, events = go(campaign, FractionRig(), budget=2)
    assert not [e for e in events if e.kind == "measured"]
    experiments = campaign.ledger.experiments()
    abandoned = [e for e in experiments if e.status is Status.ABANDONED]
    assert abandoned and not [e for e in experiments if e.status is Status.DONE]
    assert all("invalid result" in e.note and "fraction" in e.note and "pdi_pct" in e.note for e in abandoned)


def test_a_plausible_polydispersity_is_not_flagged(campaign: Campaign) -> None:
    _, events = go(campaign, FaultyRig(), budget=2)
    assert [e for e in events if e.kind == "measured"]
    assert not [e for e in events if e.kind in ("warning", "abandoned")]
