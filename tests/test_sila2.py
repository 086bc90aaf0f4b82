"""SiLA 2 on both ends of the rig link, with real servers on loopback (no mocks of the library).

In-process tests start the SiLA 2 server (supraopt.rigs.sila2.server) in threads on a free port of
127.0.0.1 and drive it with the 'sila2' adapter and with the SiLA 2 library's own generic client. End
to end, `supraopt run` drives a campaign through `supraopt rig serve --protocol sila2` (a child
process), which is also killed and restarted in the middle of a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sila2", reason="the SiLA 2 extra is not installed: pip install -e '.[dev]'")

from supraopt.campaign import Campaign
from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.ledger import Status
from supraopt.loop import Event, StopReason, run_campaign
from supraopt.records import Failure, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import RunBook, SimulatedRig, campaign_prefix, load_rig
from supraopt.rigs.server import REGISTRY_FILE
from supraopt.rigs.sila2 import FEATURE_FILE
from supraopt.rigs.sila2.client import Sila2Rig
from supraopt.rigs.sila2.server import CERT_FILE, ensure_certificate, fingerprint, start_server
from supraopt.spec import SPEC_FILE, LoopSettings, RigSettings, load_spec

SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}
CSPBBR3 = "cspbbr3-flow-focusing"
SERVE = [sys.executable, "-m", "supraopt.cli", "rig", "serve", "--protocol", "sila2"]


class CountingRig:
    """The simulated twin, counting the runs it starts and the calls it gets; optionally slow, failing or with a context."""

    def __init__(
        self, *, fail_reason: str | None = None, context: dict[str, Any] | None = None, **options: Any
    ) -> None:
        self.rig = SimulatedRig(**options)
        self.calls: Counter[str] = Counter()
        self.started: list[str] = []
        self.fail_reason = fail_reason
        self.slow_poll_s = 0.0
        self.inside, self.most_inside = 0, 0  # adapter calls under way at once: the server allows one
        if context is not None:
            self.context = lambda: dict(context)

    def limits(self) -> RigLimits:
        self.calls["limits"] += 1
        return self.rig.limits()

    def submit(self, proposal: Proposal) -> None:
        self.calls["submit"] += 1
        if self.rig.poll(proposal.experiment_id).state is RunState.LOST:
            self.started.append(proposal.experiment_id)
        self.rig.submit(proposal)

    def poll(self, experiment_id: str) -> RunStatus:
        self.calls["poll"] += 1
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        time.sleep(max(self.slow_poll_s, 0.005))  # long enough for overlapping calls to show
        self.inside -= 1
        status = self.rig.poll(experiment_id)
        if self.fail_reason and status.state is RunState.DONE:
            return RunStatus(experiment_id, RunState.FAILED, Failure(self.fail_reason))
        return status

    def cancel(self, experiment_id: str) -> None:
        self.calls["cancel"] += 1
        self.rig.cancel(experiment_id)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def twin() -> CountingRig:
    return CountingRig()


@pytest.fixture
def port(twin: CountingRig) -> Iterator[int]:
    """The twin behind an insecure SiLA 2 server on loopback (no state folder: ids live in memory)."""
    number = free_port()
    running = start_server(twin, port=number, insecure=True, watch_interval_s=0.05)
    try:
        yield number
    finally:
        running.stop()


def client(port: int, **options: Any) -> Sila2Rig:
    return Sila2Rig("127.0.0.1", port, insecure=True, **{"timeout_s": 5.0, "retries": 0, **options})


# ---------------------------------------------------------------------------------------------- feature and client


def test_the_feature_definition_ships_with_the_package_and_names_the_protocol() -> None:
    from sila2.framework import Feature

    feature = Feature(FEATURE_FILE.read_text(encoding="utf-8"))
    assert list(feature._observable_commands) == ["RunExperiment"]
    assert set(feature._unobservable_commands) == {"SubmitExperiment", "GetRun", "CancelRun"}
    assert set(feature._unobservable_properties) == {"RigLimits", "RigContext"}
    assert {"ChemistryFailed", "SettingsOutsideLimits", "ExperimentIdConflict"} <= set(feature.defined_execution_errors)


def test_neither_end_imports_torch_and_supraopt_imports_without_sila2() -> None:
    code = (
        "import sys, supraopt.rigs, supraopt.rigs.sila2, supraopt.rigs.sila2.client, supraopt.rigs.sila2.server; "
        "assert 'sila2' not in sys.modules and 'grpc' not in sys.modules, 'sila2 imported eagerly'; "
        "from supraopt.rigs.sila2.client import Sila2Rig; Sila2Rig('127.0.0.1', 1, insecure=True); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)


def test_without_the_extra_both_ends_say_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supraopt.errors import SpecError
    from supraopt.rigs.sila2 import server

    monkeypatch.setitem(sys.modules, "sila2", None)  # what an installation without the extra sees
    with pytest.raises(SpecError, match=r"rig adapter 'sila2' .* pip install 'supraopt\[sila2\]'"):
        load_rig("sila2", {"host": "127.0.0.1", "port": 5, "insecure": True}, tmp_path)
    with pytest.raises(InputError, match=r"SiLA 2 needs the 'sila2' package .* pip install 'supraopt\[sila2\]'"):
        server.serve(port=5, state_dir=tmp_path)


def test_options_are_checked_with_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"port=0 must be an integer between 1 and 65535"):
        Sila2Rig("127.0.0.1", 0, insecure=True)
    with pytest.raises(InputError, match=r"either certificate \(TLS\) or insecure = true"):
        Sila2Rig("127.0.0.1", 5, insecure=True, certificate="x.pem")
    with pytest.raises(InputError, match=r"certificate='.*nowhere.pem' cannot be read"):
        Sila2Rig("127.0.0.1", 5, certificate="nowhere.pem", base_dir=str(tmp_path))
    rig = load_rig("sila2", {"host": "127.0.0.1", "port": 5, "insecure": True}, tmp_path)
    assert isinstance(rig, Sila2Rig) and rig.id_prefix == campaign_prefix(tmp_path)


def test_the_twin_over_sila2_answers_like_the_twin(port: int, twin: CountingRig) -> None:
    local = SimulatedRig()
    with client(port) as remote:
        assert remote.limits() == local.limits()
        for n, concentration in enumerate((4.0, 12.0, 0.6)):
            proposal = Proposal(f"E00{n}", {**SETTINGS, "concentration_mg_ml": concentration})
            remote.submit(proposal)
            local.submit(proposal)
            assert remote.poll(proposal.experiment_id) == local.poll(proposal.experiment_id)
        assert remote.poll("E404") == RunStatus(
            "E404", RunState.LOST, message="the simulated rig has no run under this id"
        )
        assert remote.context() == {}  # the twin has no context() method


def test_settings_outside_the_limits_are_refused_before_the_adapter(port: int, twin: CountingRig) -> None:
    with client(port) as remote:
        with pytest.raises(LimitViolation, match=r"E009 refused: temperature_c=95.0 outside rig limits \[20, 80\]"):
            remote.submit(Proposal("E009", {**SETTINGS, "temperature_c": 95.0}))
        with pytest.raises(LimitViolation, match=r"E010 not sent: flow_ratio=nan is not a finite number"):
            remote.submit(Proposal("E010", {**SETTINGS, "flow_ratio": float("nan")}))
        assert remote.poll("E009").state is RunState.LOST
    assert twin.calls["submit"] == 0 and twin.started == []


def test_an_id_taken_by_other_settings_is_refused(port: int, twin: CountingRig) -> None:
    with client(port) as remote:
        remote.submit(Proposal("E001", SETTINGS))
        with pytest.raises(RigError, match=r"already submitted with other settings.*ExperimentIdConflict"):
            remote.submit(Proposal("E001", {**SETTINGS, "temperature_c": 45.0}))
    assert twin.started == ["E001"]


def test_duplicate_submits_from_many_threads_start_one_run(port: int, twin: CountingRig) -> None:
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    with client(port) as remote:

        def submit() -> None:
            barrier.wait(timeout=10)
            try:
                remote.submit(Proposal("E001", SETTINGS))
            except BaseException as caught:
                errors.append(caught)

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert remote.poll("E001").state is RunState.DONE
    assert errors == [] and twin.started == ["E001"] and twin.calls["submit"] == 1
    assert twin.calls["poll"] >= 8 and twin.most_inside == 1  # the 8 requests reached the adapter one at a time


def test_a_chemistry_failure_is_a_failed_run_with_its_reason_for_supraopt_and_for_sila_clients() -> None:
    from sila2.client import SilaClient
    from sila2.framework import DefinedExecutionError

    # runs take 1 s: the test leaves the intermediate-response stream while nothing is sent on it
    rig = CountingRig(fail_reason="droplets unstable", context={"chip": "FF-07", "batch_mg_ml": 24.5}, duration_s=1.0)
    number = free_port()
    running = start_server(rig, port=number, insecure=True, watch_interval_s=0.05)
    try:
        with client(number) as remote:
            remote.submit(Proposal("E001", SETTINGS))
            assert remote.poll("E001").state is RunState.RUNNING
            time.sleep(1.0)
            assert remote.poll("E001") == RunStatus("E001", RunState.FAILED, Failure("droplets unstable"))
            assert remote.context() == {"chip": "FF-07", "batch_mg_ml": 24.5}
            remote.submit(Proposal("E003", SETTINGS))
            remote.cancel("E003")
            assert remote.poll("E003").state is RunState.CANCELLED
        # a lab scheduler's view: the library's generic client, the observable command, the defined error
        sila = SilaClient("127.0.0.1", number, insecure=True)
        execution = sila.SupraparticleSynthesis.RunExperiment(ExperimentId="E002", Settings=(4.0, 4.0, 40.0))
        with execution.subscribe_to_intermediate_responses() as states:
            assert next(states).State == "running"
        deadline = time.monotonic() + 10
        while not execution.done:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(DefinedExecutionError) as caught:
            execution.get_responses()
        assert caught.value.identifier == "ChemistryFailed" and caught.value.message == "droplets unstable"
        run = sila.SupraparticleSynthesis.GetRun(ExperimentId="E002").Run
        assert (run.State, run.FailureReason) == ("failed", "droplets unstable")
        sila.close()
    finally:
        running.stop()
    assert rig.started == ["E001", "E003", "E002"]


def test_a_slow_poll_past_the_deadline_is_unknown_then_the_next_poll_answers(port: int, twin: CountingRig) -> None:
    with client(port, timeout_s=0.3) as impatient, client(port) as patient:
        patient.submit(Proposal("E001", SETTINGS))
        twin.slow_poll_s = 1.0
        with pytest.raises(RigTimeout, match=r"no reply within 0.3 s, 1 attempt\(s\); the state of the run is unknown"):
            impatient.poll("E001")
        twin.slow_poll_s = 0.0
        assert patient.poll("E001").state is RunState.DONE


def test_a_server_that_is_down_is_unknown_after_the_retries() -> None:
    slept: list[float] = []
    with (
        client(free_port(), retries=2, backoff_s=0.1, sleep=slept.append) as remote,
        pytest.raises(RigTimeout, match=r"unavailable .*3 attempt\(s\); the state of the run is unknown, ask again"),
    ):
        remote.poll("E001")
    assert slept == [0.1, 0.2]


# ---------------------------------------------------------------------------------------------- TLS


def test_tls_with_the_servers_certificate_works_and_another_is_refused(tmp_path: Path) -> None:
    rig = CountingRig()
    number = free_port()
    running = start_server(rig, port=number, state_dir=tmp_path / "rig")
    try:
        certificate = tmp_path / "rig" / CERT_FILE
        assert running.certificate == certificate.read_bytes()
        assert oct((tmp_path / "rig" / "sila2-key.pem").stat().st_mode & 0o777) == "0o600"
        campaign = tmp_path / "campaign"
        campaign.mkdir()
        (campaign / CERT_FILE).write_bytes(certificate.read_bytes())  # what the chemist copies next to campaign.toml
        options = {"host": "127.0.0.1", "port": number, "certificate": CERT_FILE, "id_prefix": ""}
        with load_rig("sila2", options, campaign) as trusted:
            trusted.submit(Proposal("E001", SETTINGS))
            assert trusted.poll("E001").state is RunState.DONE
        other = tmp_path / "other"
        ensure_certificate(other, "127.0.0.1", uuid.uuid4())  # a certificate of another server
        slept: list[float] = []
        with (
            Sila2Rig("127.0.0.1", number, certificate=str(other / CERT_FILE), sleep=slept.append) as stranger,
            pytest.raises(RigError, match=r"TLS handshake .* failed .*check \[rig.options\] certificate") as caught,
        ):
            stranger.poll("E001")
        assert not isinstance(caught.value, RigTimeout) and slept == []  # a wrong certificate is final
        with client(number, retries=0) as plain, pytest.raises(RigError):
            plain.limits()  # plain gRPC to a TLS server gets nothing
    finally:
        running.stop()
    assert rig.started == ["E001"]
    _, again, new = ensure_certificate(tmp_path / "rig", "127.0.0.1", uuid.uuid4())
    assert not new and again == certificate.read_bytes()  # generated once, kept: clients keep trusting it
    assert len(fingerprint(again).split(":")) == 32


def test_insecure_is_for_loopback_only(tmp_path: Path) -> None:
    done = subprocess.run(
        [*SERVE, "--insecure", "--host", "0.0.0.0", "--state-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: --insecure on 0.0.0.0 would send everything unencrypted" in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------- end to end


class ServeProcess:
    """`supraopt rig serve --protocol sila2 --insecure` as a child process on a fixed port."""

    def __init__(self, state_dir: Path, *options: str) -> None:
        self.state_dir, self.options, self.port = state_dir, options, free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        command = [
            sys.executable,
            "-m",
            "supraopt.cli",
            "rig",
            "serve",
            "--protocol",
            "sila2",
            "--adapter",
            "simulated",
        ]
        command += ["--port", str(self.port), "--insecure"]
        command += ["--state-dir", str(self.state_dir), *self.options]
        log_path = self.state_dir.parent / f"serve-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log_path.read_text()
            if "Serving rig adapter" in log_path.read_text():
                return
            time.sleep(0.05)
        pytest.fail("supraopt rig serve --protocol sila2 did not come up")

    def kill(self) -> None:
        """SIGKILL: no shutdown, like a power cut of the rig PC."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def sila2_campaign(directory: Path, port: int, budget: int) -> Path:
    """A CsPbBr3 campaign whose rig is the sila2 adapter on loopback, polling fast, not stopping on a hit."""
    options = {"host": "127.0.0.1", "port": port, "insecure": True, "timeout_s": 5.0, "retries": 2, "backoff_s": 0.05}
    Campaign.create(directory, CSPBBR3, 450.0, seed=0, rig=RigSettings("sila2", options)).close()
    spec = load_spec(directory)
    loop = LoopSettings(budget=budget, batch=1, stop_on_hit=False, poll_interval_s=0.1, rig_timeout_s=60.0)
    (directory / SPEC_FILE).write_text(dataclasses.replace(spec, loop=loop).to_toml())
    return directory


def ledger_summary(directory: Path) -> tuple[Counter[str], list[str]]:
    with Campaign.open(directory) as campaign:
        experiments = campaign.ledger.experiments()
    return Counter(str(e.status) for e in experiments), [e.id for e in experiments]


def rig_state(state_dir: Path) -> tuple[list[str], list[str]]:
    """Ids the server claimed and runs the twin holds, from their files in the state folder."""
    claimed = json.loads((state_dir / REGISTRY_FILE).read_text())["runs"]
    runs = [e.experiment_id for e in RunBook.in_folder(state_dir / "rig-state", "simulated.sqlite").entries()]
    return sorted(claimed), sorted(runs)


def test_supraopt_run_drives_rig_serve_protocol_sila2_to_the_end_of_a_campaign(tmp_path: Path) -> None:
    (tmp_path / "rig").mkdir()
    server = ServeProcess(tmp_path / "rig", "-o", "duration_s=0.2")
    server.start()
    try:
        directory = sila2_campaign(tmp_path / "campaign", server.port, budget=20)
        done = subprocess.run(
            [sys.executable, "-m", "supraopt.cli", "run", str(directory), "--budget", "4"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Stopped:" in done.stdout
    counts, ids = ledger_summary(directory)
    assert counts[Status.DONE] + counts[Status.FAILED] == 4 and sum(counts.values()) == 4, counts
    on_the_wire = [campaign_prefix(directory) + i for i in ids]
    assert rig_state(tmp_path / "rig") == (on_the_wire, on_the_wire)  # every experiment ran on the rig, once


def test_a_sila2_server_killed_and_restarted_mid_run_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    (tmp_path / "rig").mkdir()
    server = ServeProcess(tmp_path / "rig", "-o", "duration_s=0.5")
    server.start()
    directory = sila2_campaign(tmp_path / "campaign", server.port, budget=2)
    events: list[Event] = []
    outcome: dict[str, Any] = {}

    def drive() -> None:
        with (
            Campaign.open(directory) as campaign,
            Sila2Rig("127.0.0.1", server.port, insecure=True, timeout_s=2, retries=1, backoff_s=0.05) as rig,
        ):
            outcome["summary"] = run_campaign(campaign, rig, max_rig_errors=100, progress=events.append)

    runner = threading.Thread(target=drive, daemon=True)
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while not any(e.kind == "submitted" for e in events):  # a run is in flight (it takes 0.5 s)
            assert runner.is_alive() and time.monotonic() < deadline, [e.text() for e in events]
            time.sleep(0.02)
        server.kill()
        time.sleep(1.0)  # the runner keeps asking and gets no answer
        server.start()
        runner.join(timeout=180)
    finally:
        server.stop()
    assert not runner.is_alive()
    summary = outcome["summary"]
    assert summary.reason is StopReason.BUDGET and summary.experiments_used == 2, summary
    kinds = Counter(e.kind for e in events)
    assert kinds["rig error"] >= 1  # the outage was seen...
    assert kinds["abandoned"] == 0 and kinds["refused"] == 0  # ...and cost no experiment
    counts, ids = ledger_summary(directory)
    assert counts[Status.DONE] + counts[Status.FAILED] == 2 and sum(counts.values()) == 2, counts
    assert rig_state(tmp_path / "rig") == (ids, ids)
