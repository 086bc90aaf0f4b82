"""An adapter bug is not a rig fault: a KeyError in ``poll`` stops the runner at once, a broken link is retried."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_loop_faults import FakeTime, FaultyRig, assert_consistent, go
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.ledger import Status
from supraopt.loop import EXIT_CODES, RunSummary, StopReason, run_campaign
from supraopt.loop.state import adapter_traceback, is_rig_fault
from supraopt.records import Proposal, RunStatus
from supraopt.spec import SPEC_FILE, LoopSettings, RigSettings

CSPBBR3 = "cspbbr3-flow-focusing"


@pytest.fixture
def campaign(tmp_path: Path) -> Iterator[Campaign]:
    with Campaign.create(tmp_path / "campaign", CSPBBR3, 450.0, seed=0) as opened:
        yield opened


class BuggyPoll(FaultyRig):
    """Its poll reads a key the rig's reply does not have: a bug in the adapter, not in the rig."""

    def poll(self, experiment_id: str) -> RunStatus:
        self.polls[experiment_id] += 1
        reply: dict[str, str] = {"state": "running"}
        return reply["status"]  # type: ignore[return-value]


class BuggySubmit(FaultyRig):
    def submit(self, proposal: Proposal) -> None:
        self.submits[proposal.experiment_id] += 1
        self.send_to_pumps(proposal.settings["flow_rate"])  # KeyError: there is no such setting

    def send_to_pumps(self, value: float) -> None:
        raise AssertionError("never reached")


def run_on(campaign: Campaign, rig: object, rig_timeout_s: float) -> RunSummary:
    time = FakeTime()
    return run_campaign(
        campaign,
        rig,  # type: ignore[arg-type]
        budget=1,
        stop_on_hit=False,
        poll_interval_s=1.0,
        rig_timeout_s=rig_timeout_s,
        max_rig_errors=5,
        sleep=time.sleep,
        clock=time.clock,
    )


@pytest.mark.parametrize("rig_timeout_s", [0.0, 30.0], ids=["direct", "in-a-worker-thread"])
def test_a_key_error_in_poll_stops_at_once_with_the_adapters_traceback(
    campaign: Campaign, capsys: pytest.CaptureFixture[str], rig_timeout_s: float
) -> None:
    rig = BuggyPoll()
    summary = run_on(campaign, rig, rig_timeout_s)
    assert summary.reason is StopReason.ADAPTER_ERROR and summary.exit_code == 2
    assert rig.polls["E001"] == 1, "a bug is not retried"
    assert "rig.poll('E001') raised KeyError: 'status'" in summary.message
    assert "a bug in the rig adapter, not a rig fault" in summary.message and "\n" not in summary.message
    assert "E001 kept in flight" in summary.message
    assert summary.in_flight == ("E001",) and campaign.ledger.get("E001").status is Status.DISPATCHED

    stderr = capsys.readouterr().err
    assert stderr.startswith("Traceback in the rig adapter")
    assert f'File "{__file__}"' in stderr and "in poll" in stderr and 'return reply["status"]' in stderr
    assert stderr.rstrip().endswith("KeyError: 'status'")
    assert "supraopt/loop" not in stderr and "concurrent/futures" not in stderr and "threading.py" not in stderr
    log = (campaign.directory / "run.log").read_text()
    assert "adapter error rig.poll('E001') raised KeyError" in log
    assert 'return reply["status"]' in log and "supraopt/loop" not in log

    healed = FaultyRig()
    healed.inner = rig.inner  # the adapter fixed; the same rig still has the run
    summary = run_on(campaign, healed, rig_timeout_s)
    assert summary.reason is StopReason.BUDGET
    assert healed.submits["E001"] == 0 and rig.started["E001"] == 1  # polled, not started again
    assert_consistent(campaign.ledger)


def test_a_type_error_in_submit_stops_at_once_and_keeps_the_experiment_dispatched(
    campaign: Campaign, capsys: pytest.CaptureFixture[str]
) -> None:
    rig = BuggySubmit()
    summary = run_on(campaign, rig, 30.0)
    assert summary.reason is StopReason.ADAPTER_ERROR and rig.submits["E001"] == 1
    assert "rig.submit('E001') raised KeyError: 'flow_rate'" in summary.message
    assert campaign.ledger.get("E001").status is Status.DISPATCHED
    stderr = capsys.readouterr().err
    assert "in submit" in stderr and "send_to_pumps" in stderr and "rigcall.py" not in stderr
    summary = run_on(campaign, FaultyRig(), 30.0)  # fixed: E001 is asked about (LOST), then submitted
    assert summary.reason is StopReason.BUDGET and campaign.ledger.get("E001").status in (Status.DONE, Status.FAILED)


def test_a_bug_in_limits_stops_before_anything_is_suggested(campaign: Campaign) -> None:
    class BuggyLimits(FaultyRig):
        def limits(self):  # type: ignore[no-untyped-def]
            return None.bounds  # type: ignore[attr-defined]

    summary = run_on(campaign, BuggyLimits(), 0.0)
    assert summary.reason is StopReason.ADAPTER_ERROR and "rig.limits() raised AttributeError" in summary.message
    assert not campaign.ledger.experiments()


@pytest.mark.parametrize(
    "fault",
    [
        RigError("serial link dropped a frame"),
        RigTimeout("no answer"),
        OSError(5, "Input/output error"),
        ConnectionResetError("reset by peer"),
        TimeoutError("timed out"),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server hung up"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_hardware_and_link_errors_are_retried_with_backoff(campaign: Campaign, fault: Exception) -> None:
    class Flaky(FaultyRig):
        def poll(self, experiment_id: str) -> RunStatus:
            self.polls[experiment_id] += 1
            if self.polls[experiment_id] <= 2:
                raise fault
            return self.inner.poll(experiment_id)

    rig = Flaky()
    summary, events = go(campaign, rig, budget=1, max_rig_errors=4)
    assert summary.reason is StopReason.BUDGET, summary.message
    retries = [e.message for e in events if e.kind == "rig error"]
    assert len(retries) == 2 and "retry in 1 s" in retries[0] and "retry in 2 s" in retries[1]
    assert rig.started["E001"] == 1


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (RigError("x"), True),
        (RigTimeout("x"), True),
        (ConnectionRefusedError("x"), True),
        (FileNotFoundError("/dev/ttyUSB0"), True),
        (httpx.PoolTimeout("x"), True),
        (httpx.WriteError("x"), True),
        (KeyError("x"), False),
        (TypeError("x"), False),
        (ValueError("x"), False),
        (ZeroDivisionError("x"), False),
        (AttributeError("x"), False),
        (InputError("x"), False),
        (LimitViolation("x"), False),
        (httpx.InvalidURL("x"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_what_counts_as_a_rig_fault(error: Exception, fault: bool) -> None:
    assert is_rig_fault(error) is fault


def test_the_adapter_traceback_leaves_out_the_runners_frames() -> None:
    from supraopt.loop.rigcall import RigCall

    def adapter_method() -> None:
        {}["missing"]

    try:
        RigCall("poll", adapter_method, 5.0)()
    except KeyError as error:
        text = adapter_traceback(error)
    lines = text.splitlines()
    assert lines[0] == "Traceback in the rig adapter (most recent call last):"
    assert lines[1].startswith(f'  File "{__file__}"') and lines[1].endswith("in adapter_method")
    assert lines[-1] == "KeyError: 'missing'"


BUGGY_RIG = """
from supraopt.records import RigLimits


class Buggy:
    def limits(self):
        return RigLimits()

    def submit(self, proposal):
        pass

    def poll(self, experiment_id):
        return self.table[experiment_id]

    def cancel(self, experiment_id):
        pass
"""


def test_cli_run_exits_2_and_shows_the_adapters_traceback_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the runner appends the campaign folder
    directory = tmp_path / "buggy"
    with Campaign.create(directory, CSPBBR3, 450.0, rig=RigSettings("buggy_rig_for_cli:Buggy")) as created:
        spec = dataclasses.replace(created.spec, loop=LoopSettings(max_rig_errors=5, poll_interval_s=0.0))
    (directory / SPEC_FILE).write_text(spec.to_toml())
    (directory / "buggy_rig_for_cli.py").write_text(BUGGY_RIG)
    result = CliRunner().invoke(app, ["run", str(directory)])
    sys.modules.pop("buggy_rig_for_cli", None)
    assert result.exit_code == EXIT_CODES[StopReason.ADAPTER_ERROR] == 2, result.output
    [stopped] = [line for line in result.stdout.splitlines() if line.startswith("Stopped:")]
    assert "rig.poll('E001') raised AttributeError" in stopped and "E001 kept in flight" in stopped
    assert "buggy_rig_for_cli.py" in result.stderr and "return self.table[experiment_id]" in result.stderr
    assert "AttributeError: 'Buggy' object has no attribute 'table'" in result.stderr
    assert "supraopt/loop" not in result.stderr
    assert result.stdout.count("rig error") == 0  # not retried as a rig fault
    with Campaign.open(directory) as reopened:
        assert reopened.ledger.get("E001").status is Status.DISPATCHED
