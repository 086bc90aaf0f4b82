"""The manual rig: instructions for a person, results read back from the campaign's ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from supraopt.errors import LimitViolation, RigError
from supraopt.ledger import Ledger
from supraopt.records import Failure, Measurement, Proposal, RunState
from supraopt.rigs.base import Rig
from supraopt.rigs.manual import ManualRig

SETTINGS = {"concentration_mg_ml": 4.25, "flow_ratio": 5.5, "temperature_c": 45.0}
CAMPAIGN = """
name = "manual test"
model = "cspbbr3-flow-focusing"
[target]
diameter_nm = 450.0
[bounds]
concentration_mg_ml = [1.0, 10.0]
flow_ratio = [2.0, 12.0]
temperature_c = [20.0, 60.0]
"""


@pytest.fixture
def campaign(tmp_path: Path) -> Path:
    (tmp_path / "campaign.toml").write_text(CAMPAIGN)
    return tmp_path


@pytest.fixture
def ledger(campaign: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{campaign / 'ledger.sqlite'}")
    yield ledger
    ledger.close()


def test_limits_are_the_campaign_bounds(campaign: Path) -> None:
    rig = ManualRig(campaign)
    assert isinstance(rig, Rig)
    assert rig.limits().bounds["flow_ratio"] == (2.0, 12.0)


def test_submit_writes_and_prints_instructions_once(campaign: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = ManualRig(campaign)
    rig.submit(Proposal("E001", SETTINGS))
    rig.submit(Proposal("E001", SETTINGS))
    text = (campaign / "manual" / "next_experiments.txt").read_text()
    assert text.count("=== experiment E001 ===") == 1
    assert "concentration_mg_ml = 4.25 mg/mL" in text
    assert "temperature_c       = 45 °C" in text
    assert f"supraopt record {campaign} E001 --diameter-nm X --pdi Y --n-particles N" in text
    assert f'supraopt record {campaign} E001 --failed "reason"' in text
    assert capsys.readouterr().out == text
    ManualRig(campaign).submit(Proposal("E001", SETTINGS))  # idempotent across a restart too
    assert (campaign / "manual" / "next_experiments.txt").read_text() == text


def test_submit_refuses_settings_outside_the_bounds(campaign: Path) -> None:
    with pytest.raises(LimitViolation, match="flow_ratio=15"):
        ManualRig(campaign).submit(Proposal("E001", {**SETTINGS, "flow_ratio": 15.0}))
    assert not (campaign / "manual").exists()


def test_poll_follows_the_ledger(campaign: Path, ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    first, second, third = ledger.add_pending([(SETTINGS, {}), (SETTINGS, {}), (SETTINGS, {})])
    rig = ManualRig(campaign)
    assert rig.poll(first).state is RunState.LOST  # never submitted
    for experiment_id in (first, second, third):
        rig.submit(Proposal(experiment_id, SETTINGS))
    assert rig.poll(first).state is RunState.RUNNING
    measurement = Measurement(diameter_nm=452.0, pdi_pct=4.1, n_particles=120)
    ledger.record_measurement(first, measurement)
    ledger.record_failure(second, Failure("hollow particles"))
    done = rig.poll(first)
    assert (done.state, done.result) == (RunState.DONE, measurement)
    failed = rig.poll(second)
    assert (failed.state, failed.result) == (RunState.FAILED, Failure("hollow particles"))
    rig.cancel(third)
    rig.cancel(third)
    assert "=== experiment E003 cancelled" in capsys.readouterr().out
    assert rig.poll(third).state is RunState.CANCELLED
    text = (campaign / "manual" / "next_experiments.txt").read_text()
    assert text.count("cancelled") == 1


def test_an_abandoned_experiment_is_cancelled(campaign: Path, ledger: Ledger) -> None:
    (experiment_id,) = ledger.add_pending([(SETTINGS, {})])
    rig = ManualRig(campaign, ledger_url=f"sqlite:///{campaign / 'ledger.sqlite'}")
    rig.submit(Proposal(experiment_id, SETTINGS))
    ledger.abandon(experiment_id, "operator gave up")
    assert rig.poll(experiment_id).state is RunState.CANCELLED


def test_a_submitted_id_missing_from_the_ledger_is_a_rig_error(campaign: Path, ledger: Ledger) -> None:
    rig = ManualRig(campaign)
    rig.submit(Proposal("E999", SETTINGS))
    with pytest.raises(RigError, match="E999"):
        rig.poll("E999")
