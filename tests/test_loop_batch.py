"""Batches in the closed loop: results already at the rig are collected before new runs are suggested,
and the run reports the first hit (in the order results came in), not a later or a 'better' one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.loop import Event, StopReason, run_campaign
from supraopt.records import Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.spec import Target


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


class ScriptedRig:
    """Experiment k (in submission order) takes ``durations[k]`` seconds and measures ``results[k]``."""

    def __init__(self, time: FakeTime, durations: list[float], results: list[Measurement]) -> None:
        self.time, self.durations, self.results = time, durations, results
        self.runs: dict[str, tuple[float, Measurement]] = {}

    def limits(self) -> RigLimits:
        return RigLimits()

    def submit(self, proposal: Proposal) -> None:
        k = len(self.runs) % len(self.durations)
        self.runs.setdefault(proposal.experiment_id, (self.time.now + self.durations[k], self.results[k]))

    def poll(self, experiment_id: str) -> RunStatus:
        if experiment_id not in self.runs:
            return RunStatus(experiment_id, RunState.LOST)
        ready, result = self.runs[experiment_id]
        if self.time.now < ready:
            return RunStatus(experiment_id, RunState.RUNNING)
        return RunStatus(experiment_id, RunState.DONE, result)

    def cancel(self, experiment_id: str) -> None:
        pass


MISS = Measurement(diameter_nm=300.0, pdi_pct=9.0, n_particles=100)
HIT_EDGE = Measurement(diameter_nm=462.0, pdi_pct=5.5, n_particles=100)  # a hit, near the tolerance's edge
HIT_CENTRE = Measurement(diameter_nm=450.0, pdi_pct=3.0, n_particles=100)  # a closer hit, measured later


@pytest.fixture
def campaign(tmp_path: Path) -> Iterator[Campaign]:
    with Campaign.create(tmp_path / "c", "cspbbr3-flow-focusing", 450.0) as opened:
        yield opened


def test_a_batch_reports_the_first_hit_not_a_later_closer_one(campaign: Campaign) -> None:
    time = FakeTime()
    rig = ScriptedRig(time, [30.0, 10.0, 50.0], [MISS, HIT_EDGE, HIT_CENTRE])
    events: list[Event] = []
    summary = run_campaign(
        campaign, rig, budget=6, batch=3, poll_interval_s=10.0, progress=events.append, sleep=time.sleep,
        clock=time.clock,
    )  # fmt: skip
    assert summary.reason is StopReason.HIT
    assert summary.message.startswith("target hit by E002 (462 nm, PDI 5.5 %), the first hit; 3 experiment(s)")
    assert summary.best is not None and summary.best.experiment_id == "E003"  # the closest to the target
    status = campaign.status()
    assert status.first_hit is not None and status.first_hit.id == "E002"
    flags = {e["id"]: e["hit"] for e in status.to_json()["experiments"]}
    assert flags == {"E001": False, "E002": True, "E003": True}
    assert status.to_json()["first_hit"] == "E002"


def test_results_ready_at_the_rig_are_collected_before_a_refill(campaign: Campaign) -> None:
    time = FakeTime()
    rig = ScriptedRig(time, [10.0, 20.0], [MISS, MISS])
    seen: list[tuple[float, Event]] = []
    run_campaign(
        campaign, rig, budget=4, batch=2, stop_on_hit=False, poll_interval_s=10.0,
        progress=lambda e: seen.append((time.now, e)), sleep=time.sleep, clock=time.clock,
    )  # fmt: skip
    measured: set[str] = set()
    suggestions = 0
    for now, event in seen:
        if event.kind == "measured":
            measured.add(event.experiment_id or "")
        if event.kind == "suggested":
            suggestions += 1
            ready = {i for i, (at, _) in rig.runs.items() if at <= now}
            assert ready <= measured, (
                f"{event.experiment_id} suggested at t={now} before {ready - measured} was collected"
            )
    assert suggestions == 4 and len(measured) == 4


@pytest.mark.parametrize(("batch", "words"), [(1, "E001 in flight (kept in the ledger); run the same command again to resume: it is polled"), (2, "E001, E002 in flight (kept in the ledger); run the same command again to resume: they are polled")])  # fmt: skip
def test_the_ctrl_c_message_agrees_in_number(campaign: Campaign, batch: int, words: str) -> None:
    time = FakeTime()
    rig = ScriptedRig(time, [100.0], [MISS])
    submitted: list[str] = []

    def interrupt(event: Event) -> None:
        if event.kind == "submitted":
            submitted.append(event.experiment_id or "")
            if len(submitted) == batch:
                raise KeyboardInterrupt

    summary = run_campaign(
        campaign, rig, budget=4, batch=batch, poll_interval_s=10.0, progress=interrupt, sleep=time.sleep,
        clock=time.clock,
    )  # fmt: skip
    assert summary.reason is StopReason.INTERRUPTED
    assert words in summary.message


S = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


def test_the_first_hit_is_the_first_recorded_not_the_lowest_id_nor_the_last_touched(tmp_path: Path) -> None:
    directory = tmp_path / "ladder"
    with Campaign.create(directory, "cspbbr3-flow-focusing", [450.0, 600.0]) as campaign:
        campaign.ledger.add_pending([(S, {}), (S, {}), (S, {})])
        campaign.record("E002", HIT_EDGE)  # recorded first, though E001 was suggested first
        campaign.record("E001", HIT_CENTRE)
        campaign.record("E003", Measurement(diameter_nm=598.0, pdi_pct=4.0, n_particles=100))
        # a later correction touches E002 last (its updated_at is now the latest): it is still the first hit
        campaign.ledger.correct("E002", Measurement(diameter_nm=460.0, pdi_pct=5.5, n_particles=100), "re-sized")
        status = campaign.status()
    assert [e.id for e in status.experiments] == ["E001", "E002", "E003"]
    assert max(status.experiments, key=lambda e: e.updated_at).id == "E002"
    assert status.first_hit is not None and status.first_hit.id == "E002"
    assert status.first_hits() == ["E002", "E003"]
    data = status.to_json()
    assert data["first_hit"] == "E002" and [t["first_hit"] for t in data["targets"]] == ["E002", "E003"]
    assert [t["best"]["id"] for t in data["targets"]] == ["E001", "E003"]  # closest, not first

    result = CliRunner().invoke(app, ["status", str(directory)])
    assert result.exit_code == 0, result.output
    assert "450 nm ± 3%, PDI ≤ 6 %: hit, first hit E002 (best E001" in result.output
    assert "600 nm ± 3%, PDI ≤ 6 %: hit, first hit E003 (best E003" in result.output


def test_the_closing_summary_names_every_target(tmp_path: Path) -> None:
    hit_600 = Measurement(diameter_nm=604.0, pdi_pct=4.0, n_particles=100)
    with Campaign.create(tmp_path / "c", "cspbbr3-flow-focusing", [450.0, 600.0]) as campaign:
        time = FakeTime()
        rig = ScriptedRig(time, [10.0, 10.0, 10.0], [HIT_EDGE, MISS, hit_600])
        summary = run_campaign(
            campaign, rig, budget=5, poll_interval_s=10.0, sleep=time.sleep, clock=time.clock
        )  # fmt: skip
        assert summary.reason is StopReason.HIT
        assert summary.message == "all 2 targets hit after 3 experiment(s): 450 nm hit by E001; 600 nm hit by E003."
        assert [o.first_hit for o in summary.targets] == ["E001", "E003"]
        assert summary.targets[1].text() == "600 nm ± 3%, PDI ≤ 6 %: hit by E003; closest E003 at 604 nm, PDI 4.0 %."
        campaign.add_target(Target(800.0))

    result = CliRunner().invoke(app, ["run", str(tmp_path / "c"), "--budget", "3"])  # budget spent: it says so
    assert result.exit_code == 0, result.output
    assert (
        "budget of 3 experiment(s) spent; 2 of 3 targets hit: 450 nm hit by E001; 600 nm hit by E003; 800 nm not hit."
        in result.output
    )
    assert "Experiments used: 3.\n" in result.output
    for line in ("450 nm ± 3%, PDI ≤ 6 %: hit by E001;", "800 nm ± 3%, PDI ≤ 6 %: not hit; closest E003"):
        assert line in result.output


def test_targets_asking_for_repeats_say_confirmed_or_not(tmp_path: Path) -> None:
    from supraopt.loop.state import target_outcomes

    other = {**S, "concentration_mg_ml": 6.0}
    with Campaign.create(tmp_path / "c", "cspbbr3-flow-focusing", [450.0, 600.0], confirm=1) as campaign:
        campaign.add_run(S, HIT_CENTRE)
        campaign.add_run(S, Measurement(diameter_nm=452.0, pdi_pct=3.5, n_particles=100))  # a clean repeat
        campaign.add_run(other, Measurement(diameter_nm=598.0, pdi_pct=4.0, n_particles=100))
        status = campaign.status()
    by_repeats = target_outcomes(status)
    assert [o.short() for o in by_repeats] == [
        "450 nm confirmed, first hit E001",  # two hits at one setting, and the model agrees a repeat would hit
        "600 nm hit, not confirmed, first hit E003",
    ]
    assert target_outcomes(status, frozenset({600.0}))[1].short() == "600 nm confirmed, first hit E003"
