"""The http adapter: replies mapped to the protocol, retries, and faults on a real loopback link.

Unit tests use httpx's MockTransport; the fault tests run the reference server (uvicorn in a thread,
or `supraopt rig serve` as a child process that is killed and restarted) on 127.0.0.1, with a TCP
proxy that swallows replies where a test needs a reply lost. End to end, `supraopt run` drives a
campaign through `supraopt rig serve`.
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
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import serving

from supraopt.campaign import Campaign
from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout, SpecError
from supraopt.ledger import Status
from supraopt.loop import Event, StopReason, run_campaign
from supraopt.records import Failure, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import RunBook, SimulatedRig, campaign_prefix, load_rig
from supraopt.rigs.http import HttpRig
from supraopt.rigs.server import REGISTRY_FILE, create_app
from supraopt.spec import SPEC_FILE, LoopSettings, RigSettings, load_spec

TOKEN = "test-token-0123456789abcdef"
SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}
CSPBBR3 = "cspbbr3-flow-focusing"
BOUNDS = {"concentration_mg_ml": [0.5, 12.0], "flow_ratio": [1.0, 20.0], "temperature_c": [20.0, 80.0]}


# ---------------------------------------------------------------------------------------------- helpers


class FaultyRig:
    """The simulated twin behind the server, with faults the test switches on; counts the runs it starts.

    ``slow`` maps a method to how many of its next calls take ``delay_s`` *after* doing their work
    (the reply comes too late); ``fail_after`` maps a method to how many of its next calls raise
    RigError after doing their work (the reply is lost as a 503).
    """

    def __init__(self, **options: Any) -> None:
        self.rig = SimulatedRig(**options)
        self.calls: Counter[str] = Counter()
        self.started: list[str] = []
        self.slow: Counter[str] = Counter()
        self.fail_after: Counter[str] = Counter()
        self.delay_s = 1.0

    def limits(self) -> RigLimits:
        return self._fault("limits", self.rig.limits())

    def submit(self, proposal: Proposal) -> None:
        if self.rig.poll(proposal.experiment_id).state is RunState.LOST:
            self.started.append(proposal.experiment_id)
        self.rig.submit(proposal)
        self._fault("submit", None)

    def poll(self, experiment_id: str) -> RunStatus:
        return self._fault("poll", self.rig.poll(experiment_id))

    def cancel(self, experiment_id: str) -> None:
        self.rig.cancel(experiment_id)
        self._fault("cancel", None)

    def _fault(self, method: str, value: Any) -> Any:
        self.calls[method] += 1
        if self.slow[method] > 0:
            self.slow[method] -= 1
            time.sleep(self.delay_s)
        if self.fail_after[method] > 0:
            self.fail_after[method] -= 1
            raise RigError(f"{method} done, but the reply was lost")
        return value


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 that can swallow replies: the request reaches the server, the reply never
    reaches the client, whose connection is closed instead (what a lab network or a reboot does)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.drop_replies = 0
        self.dropped = 0
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._replies, args=(client, server), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                method = data.split(b" ", 1)[0].decode("latin-1")
                if method.isalpha() and method.isupper():
                    with self._lock:
                        self.requests[method] += 1
                server.sendall(data)
        _close(client, server)

    def _replies(self, client: socket.socket, server: socket.socket) -> None:
        with suppress(OSError):
            while data := server.recv(65536):
                with self._lock:
                    drop = self.drop_replies > 0
                    if drop:
                        self.drop_replies -= 1
                        self.dropped += 1
                if drop:
                    break
                client.sendall(data)
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """`supraopt rig serve` as a child process on a fixed port, so that it can be killed and started again."""

    def __init__(self, state_dir: Path, *options: str) -> None:
        self.state_dir, self.options, self.port = state_dir, options, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "supraopt.cli", "rig", "serve", "--port", str(self.port)]
        command += ["--state-dir", str(self.state_dir), *self.options]
        log = open(self.state_dir.parent / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env())
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.state_dir.parent / f"serve-{self.starts}.log").read_text()
            with suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        pytest.fail("supraopt rig serve did not come up")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye, like a power cut of the rig PC."""
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


def server_env() -> dict[str, str]:
    return {**os.environ, "SUPRAOPT_RIG_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}


def http_campaign(directory: Path, url: str, budget: int, **options: Any) -> Path:
    """A CsPbBr3 campaign whose rig is the http adapter at ``url``, polling fast."""
    rig_options = {"url": url, "timeout_s": 5.0, "retries": 2, "backoff_s": 0.05, **options}
    Campaign.create(directory, CSPBBR3, 450.0, seed=0, rig=RigSettings("http", rig_options)).close()
    spec = load_spec(directory)
    loop = LoopSettings(budget=budget, batch=1, stop_on_hit=False, poll_interval_s=0.1, rig_timeout_s=60.0)
    (directory / SPEC_FILE).write_text(dataclasses.replace(spec, loop=loop).to_toml())
    return directory


def mock_rig(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> tuple[HttpRig, list[float]]:
    """An HttpRig whose requests go to ``handler``; returns it and the list of its backoff sleeps."""
    slept: list[float] = []
    options = {"token": TOKEN, "retries": 3, "backoff_s": 0.5, **options}
    rig = HttpRig("http://rig.test:8765", transport=httpx.MockTransport(handler), sleep=slept.append, **options)
    return rig, slept


def replies(
    *answers: httpx.Response | Exception,
) -> tuple[Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
    """A handler giving ``answers`` in turn (the last one forever) and the list of requests it saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler, seen


def status(experiment_id: str = "E001", state: str = "running", result: Any = None, code: int = 200) -> httpx.Response:
    return httpx.Response(code, json={"experiment_id": experiment_id, "state": state, "result": result, "message": ""})


def error(code: int, kind: str = "rig_error", detail: str = "pump 2 offline") -> httpx.Response:
    return httpx.Response(code, json={"detail": detail, "kind": kind})


# ---------------------------------------------------------------------------------------------- construction


def test_options_are_checked_with_clear_messages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUPRAOPT_RIG_TOKEN", TOKEN)
    with pytest.raises(InputError, match=r"url='rig-pc:8765' must start with http:// or https://"):
        HttpRig("rig-pc:8765")
    with pytest.raises(InputError, match=r"timeout_s=0 must be positive"):
        HttpRig("http://rig-pc:8765", timeout_s=0)
    with pytest.raises(InputError, match=r"backoff_s=-1 must be non-negative"):
        HttpRig("http://rig-pc:8765", backoff_s=-1)
    with pytest.raises(InputError, match=r"retries=1.5 must be an integer between 0 and 20"):
        HttpRig("http://rig-pc:8765", retries=1.5)  # type: ignore[arg-type]
    monkeypatch.delenv("SUPRAOPT_RIG_TOKEN")
    with pytest.raises(InputError, match=r"no token: set SUPRAOPT_RIG_TOKEN to the token that 'supraopt rig serve'"):
        HttpRig("http://rig-pc:8765")
    monkeypatch.setenv("LAB_RIG_TOKEN", "from-another-variable")
    assert (
        "from-another-variable"
        in HttpRig("http://rig-pc:8765", token_env="LAB_RIG_TOKEN")._client.headers["Authorization"]
    )
    (tmp_path / "token").write_text("from-a-file-0123456789\n")
    assert HttpRig("http://rig-pc:8765", token_file=tmp_path / "token")._client.headers["Authorization"] == (
        "Bearer from-a-file-0123456789"
    )
    with pytest.raises(InputError, match=r"token_file='.*missing' cannot be read"):
        HttpRig("http://rig-pc:8765", token_file=tmp_path / "missing")
    assert TOKEN not in repr(HttpRig("http://rig-pc:8765", token=TOKEN))


def test_load_rig_builds_it_from_the_rig_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUPRAOPT_RIG_TOKEN", TOKEN)
    rig = load_rig("http", {"url": "http://rig-pc:8765/", "timeout_s": 2, "retries": 1}, tmp_path)
    assert isinstance(rig, HttpRig) and (rig.url, rig.timeout_s, rig.retries) == ("http://rig-pc:8765", 2.0, 1)
    with pytest.raises(SpecError, match=r"rig adapter 'http' rejected its options .*must start with http://"):
        load_rig("http", {"url": "rig-pc"}, tmp_path)


def test_neither_the_client_nor_the_server_imports_torch() -> None:
    code = "import sys, supraopt.rigs.http, supraopt.rigs.server; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- replies


def test_the_four_verbs_send_the_token_and_read_the_replies() -> None:
    measured = {"diameter_nm": 441.0, "pdi_pct": 4.8, "n_particles": 120, "droplet_um": None}
    handler, seen = replies(
        httpx.Response(200, json={"bounds": BOUNDS}),
        status(code=201),
        status(state="done", result=measured),
        status(state="failed", result={"reason": "hollow particles"}),
        status(state="cancelled"),
    )
    rig, _ = mock_rig(handler)
    assert rig.limits() == RigLimits.from_json(BOUNDS)
    rig.submit(Proposal("E001", SETTINGS))
    assert rig.poll("E001") == RunStatus("E001", RunState.DONE, Measurement(441.0, 4.8, 120))
    assert rig.poll("E001") == RunStatus("E001", RunState.FAILED, Failure("hollow particles"))
    rig.cancel("E001")
    assert [(r.method, r.url.path) for r in seen] == [
        ("GET", "/v1/limits"),
        ("PUT", "/v1/runs/E001"),
        ("GET", "/v1/runs/E001"),
        ("GET", "/v1/runs/E001"),
        ("POST", "/v1/runs/E001/cancel"),
    ]
    assert {r.headers["Authorization"] for r in seen} == {f"Bearer {TOKEN}"}
    assert json.loads(seen[1].content) == {"settings": SETTINGS}


def test_an_unknown_id_is_lost_and_odd_ids_are_quoted() -> None:
    handler, seen = replies(status("E 1/x", "lost"))
    rig, _ = mock_rig(handler)
    assert rig.poll("E 1/x").state is RunState.LOST
    assert seen[0].url.raw_path == b"/v1/runs/E%201%2Fx"


@pytest.mark.parametrize(
    ("answer", "raised", "text"),
    [
        (
            error(401, "unauthorized", "wrong token"),
            RigError,
            r"refused the token \(401: wrong token\); set SUPRAOPT_RIG_TOKEN",
        ),
        (
            httpx.Response(404, json={"detail": "Not Found"}),
            RigError,
            r"has no such endpoint \(404\); check \[rig.options\] url",
        ),
        (
            error(409, "conflict", "E001 was already submitted"),
            RigError,
            r"refused \(409\): E001 was already submitted",
        ),
        (
            error(422, "limits", "temperature_c=95 outside"),
            LimitViolation,
            r"refused \(422\): temperature_c=95 outside",
        ),
        (httpx.Response(500, text="Internal Server Error"), RigError, r"answered 500: Internal Server Error"),
        (httpx.Response(200, text="<html>"), RigError, r"sent 200 without JSON"),
    ],
    ids=["401", "404", "409", "422", "500", "not-json"],
)
def test_final_answers_are_not_retried(answer: httpx.Response, raised: type[Exception], text: str) -> None:
    handler, seen = replies(answer)
    rig, slept = mock_rig(handler)
    with pytest.raises(raised, match=text):
        rig.submit(Proposal("E001", SETTINGS))
    assert len(seen) == 1 and slept == []


@pytest.mark.parametrize(
    ("answer", "raised", "text"),
    [
        (error(503), RigError, r"the server answered 503: pump 2 offline, 4 attempt\(s\); check that"),
        (httpx.Response(502, text="Bad Gateway"), RigError, r"answered 502: Bad Gateway"),
        (error(504, "rig_timeout"), RigTimeout, r"answered 504: .*the state of the run is unknown, ask again"),
        (
            httpx.ReadTimeout("timed out"),
            RigTimeout,
            r"no reply within 10 s, 4 attempt\(s\); the state of the run is unknown",
        ),
        (httpx.RemoteProtocolError("Server disconnected"), RigTimeout, r"the connection dropped before the reply"),
        (httpx.ReadError("connection reset"), RigTimeout, r"the connection dropped before the reply"),
        (httpx.ConnectError("connection refused"), RigError, r"cannot connect \(connection refused\), 4 attempt"),
        (httpx.ConnectTimeout("timed out"), RigTimeout, r"no reply within"),
    ],
    ids=["503", "502", "504", "read-timeout", "disconnected", "reset", "refused", "connect-timeout"],
)
def test_transient_failures_are_retried_with_backoff_then_raised(
    answer: httpx.Response | Exception, raised: type[Exception], text: str
) -> None:
    handler, seen = replies(answer)
    rig, slept = mock_rig(handler)
    with pytest.raises(raised, match=text) as caught:
        rig.poll("E001")
    if raised is RigError:
        assert not isinstance(caught.value, RigTimeout)  # refused is not "unknown"
    assert len(seen) == 4 and slept == [0.5, 1.0, 2.0]


def test_a_transient_failure_then_an_answer_is_just_the_answer() -> None:
    handler, seen = replies(httpx.ReadTimeout("timed out"), error(503), status(state="running"))
    rig, slept = mock_rig(handler)
    assert rig.poll("E001") == RunStatus("E001", RunState.RUNNING)
    assert len(seen) == 3 and slept == [0.5, 1.0]


def test_no_retries_means_one_attempt() -> None:
    handler, seen = replies(httpx.ReadTimeout("timed out"))
    rig, slept = mock_rig(handler, retries=0)
    with pytest.raises(RigTimeout, match=r"1 attempt\(s\)"):
        rig.submit(Proposal("E001", SETTINGS))
    assert len(seen) == 1 and slept == []


@pytest.mark.parametrize(
    ("reply", "raised", "text"),
    [
        (
            error(502, "invalid_result", "diameter_nm=nan"),
            InputError,
            r"the rig gave an invalid result \(diameter_nm=nan\)",
        ),
        (status(state="done", result=None), InputError, r"run E001 is done with an invalid result None"),
        (
            status(state="done", result={"diameter_nm": -3, "pdi_pct": 5}),
            InputError,
            r"diameter_nm=-3.0 is not plausible",
        ),
        (status(state="failed", result={}), InputError, r"run E001 is failed with an invalid result"),
        (status(state="exploded"), RigError, r"sent an invalid run status"),
        (status("E002"), RigError, r"answered poll\('E001'\) with"),
        (httpx.Response(200, json=["running"]), RigError, r"sent an invalid run status"),
    ],
    ids=["502-invalid", "done-no-result", "done-negative", "failed-no-reason", "bad-state", "other-id", "a-list"],
)
def test_invalid_results_and_invalid_replies(reply: httpx.Response, raised: type[Exception], text: str) -> None:
    """An invalid result is the rig's (InputError: the runner sets the run aside); a garbled reply is the link's."""
    handler, seen = replies(reply)
    rig, _ = mock_rig(handler)
    with pytest.raises(raised, match=text):
        rig.poll("E001")
    assert len(seen) == 1


def test_invalid_limits_are_a_rig_error() -> None:
    rig, _ = mock_rig(replies(httpx.Response(200, json={"bounds": {"flow_ratio": [1.0]}}))[0])
    with pytest.raises(RigError, match=r"sent invalid limits"):
        rig.limits()


def test_a_non_finite_setting_is_never_sent() -> None:
    handler, seen = replies(status(code=201))
    rig, _ = mock_rig(handler)
    with pytest.raises(LimitViolation, match=r"E001 not sent: flow_ratio=nan is not a finite number"):
        rig.submit(Proposal("E001", {**SETTINGS, "flow_ratio": float("nan")}))
    assert seen == []


# ---------------------------------------------------------------------------------------------- faults on loopback


@pytest.fixture
def twin() -> FaultyRig:
    return FaultyRig()


@pytest.fixture
def url(twin: FaultyRig) -> Iterator[str]:
    with serving(create_app(twin, TOKEN)) as base:
        yield base


def test_the_simulated_twin_over_http_answers_like_the_twin(url: str) -> None:
    local = SimulatedRig()
    with HttpRig(url, token=TOKEN) as remote:
        assert remote.limits() == local.limits()
        for n, concentration in enumerate((4.0, 12.0, 0.6)):
            proposal = Proposal(f"E00{n}", {**SETTINGS, "concentration_mg_ml": concentration})
            remote.submit(proposal)
            local.submit(proposal)
            assert remote.poll(proposal.experiment_id) == local.poll(proposal.experiment_id)
        assert remote.poll("E404") == RunStatus(
            "E404", RunState.LOST, message="the simulated rig has no run under this id"
        )
        with pytest.raises(
            LimitViolation, match=r"refused \(422\): experiment E009 refused: temperature_c=95.0 outside"
        ):
            remote.submit(Proposal("E009", {**SETTINGS, "temperature_c": 95.0}))


def test_campaigns_sharing_a_server_keep_their_ids_apart_with_a_prefix(url: str, twin: FaultyRig) -> None:
    with HttpRig(url, token=TOKEN, id_prefix="alice-") as alice, HttpRig(url, token=TOKEN, id_prefix="bob.2-") as bob:
        alice.submit(Proposal("E001", SETTINGS))
        bob.submit(Proposal("E001", {**SETTINGS, "temperature_c": 45.0}))  # no 409: another run
        assert alice.poll("E001").experiment_id == bob.poll("E001").experiment_id == "E001"
        assert alice.poll("E002").state is RunState.LOST
    assert twin.started == ["alice-E001", "bob.2-E001"]
    with pytest.raises(InputError, match=r"id_prefix='lab 2/' must be at most 40 letters"):
        HttpRig(url, token=TOKEN, id_prefix="lab 2/")


def test_a_wrong_token_is_a_rig_error_at_once(url: str) -> None:
    slept: list[float] = []
    with (
        HttpRig(url, token="not-the-right-token-at-all", sleep=slept.append) as remote,
        pytest.raises(RigError, match=r"refused the token \(401"),
    ):
        remote.limits()
    assert slept == []


def test_a_dropped_submit_reply_is_retried_and_starts_no_second_run(url: str, twin: FaultyRig) -> None:
    proxy = DroppingProxy(url)
    try:
        with HttpRig(proxy.url, token=TOKEN, timeout_s=5, retries=3, backoff_s=0.01) as remote:
            remote.limits()  # a kept-alive connection, as in a long campaign
            proxy.drop_replies = 1
            remote.submit(Proposal("E001", SETTINGS))
            assert remote.poll("E001").state is RunState.DONE
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert proxy.requests["PUT"] == 2  # the request reached the server twice...
    assert twin.started == ["E001"]  # ...and the rig ran it once


def test_all_replies_lost_is_unknown_then_the_run_is_found(url: str, twin: FaultyRig) -> None:
    proxy = DroppingProxy(url)
    try:
        with HttpRig(proxy.url, token=TOKEN, timeout_s=5, retries=2, backoff_s=0.01) as remote:
            proxy.drop_replies = 3
            with pytest.raises(
                RigTimeout, match=r"the connection dropped before the reply .*, 3 attempt\(s\); .*unknown"
            ):
                remote.submit(Proposal("E001", SETTINGS))
            status = remote.poll("E001")  # the link is back: the run was there all along
            remote.submit(Proposal("E001", SETTINGS))  # what the runner does after "unknown": harmless
    finally:
        proxy.close()
    assert status.state is RunState.DONE and isinstance(status.result, Measurement)
    assert proxy.requests["PUT"] == 4 and twin.started == ["E001"]


def test_a_503_after_the_work_was_done_is_retried_without_a_second_run(url: str, twin: FaultyRig) -> None:
    twin.fail_after["submit"] = 1
    with HttpRig(url, token=TOKEN, retries=2, backoff_s=0.01) as remote:
        remote.submit(Proposal("E001", SETTINGS))
    assert twin.started == ["E001"] and twin.calls["submit"] == 1


def test_a_slow_poll_past_the_timeout_is_unknown_then_the_next_poll_answers(url: str, twin: FaultyRig) -> None:
    with HttpRig(url, token=TOKEN, timeout_s=0.3, retries=0) as impatient, HttpRig(url, token=TOKEN) as patient:
        patient.submit(Proposal("E001", SETTINGS))
        twin.slow["poll"] = 1
        with pytest.raises(RigTimeout, match=r"no reply within 0.3 s, 1 attempt\(s\); the state of the run is unknown"):
            impatient.poll("E001")
        assert patient.poll("E001").state is RunState.DONE  # waits for the slow call to end on the server


def test_a_slow_submit_past_the_timeout_runs_once(url: str, twin: FaultyRig) -> None:
    twin.slow["submit"] = 1
    with HttpRig(url, token=TOKEN, timeout_s=0.3, retries=0) as impatient, HttpRig(url, token=TOKEN) as patient:
        with pytest.raises(RigTimeout, match=r"no reply within 0.3 s"):
            impatient.submit(Proposal("E001", SETTINGS))
        assert patient.poll("E001").state is RunState.DONE  # the submit went through after all
        patient.submit(Proposal("E001", SETTINGS))  # the runner's resubmit after "unknown": harmless
    assert twin.started == ["E001"] and twin.calls["submit"] == 1


def test_duplicate_submits_from_many_threads_start_one_run(url: str, twin: FaultyRig) -> None:
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    with HttpRig(url, token=TOKEN) as remote:

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
    assert errors == [] and twin.started == ["E001"]


def test_a_server_that_is_down_is_a_rig_error_not_unknown() -> None:
    slept: list[float] = []
    with (
        HttpRig(f"http://127.0.0.1:{free_port()}", token=TOKEN, retries=2, backoff_s=0.1, sleep=slept.append) as remote,
        pytest.raises(RigError, match=r"cannot connect .*3 attempt\(s\); check that 'supraopt rig serve'") as caught,
    ):
        remote.poll("E001")
    assert not isinstance(caught.value, RigTimeout)
    assert slept == [0.1, 0.2]


# ---------------------------------------------------------------------------------------------- end to end


def ledger_summary(directory: Path) -> tuple[Counter[str], list[str]]:
    with Campaign.open(directory) as campaign:
        experiments = campaign.ledger.experiments()
    return Counter(str(e.status) for e in experiments), [e.id for e in experiments]


def rig_state(state_dir: Path) -> tuple[list[str], list[str]]:
    """Ids the server claimed and runs the twin holds, from their files in the state folder."""
    claimed = json.loads((state_dir / REGISTRY_FILE).read_text())["runs"]
    runs = RunBook.in_folder(state_dir / "rig-state", "simulated.sqlite").entries()
    return sorted(claimed), sorted(entry.experiment_id for entry in runs)


def test_supraopt_run_drives_supraopt_rig_serve_to_the_end_of_a_campaign(tmp_path: Path) -> None:
    (tmp_path / "rig").mkdir()
    server = ServeProcess(tmp_path / "rig", "-o", "duration_s=0.2")
    server.start()
    try:
        directory = http_campaign(tmp_path / "campaign", server.url, budget=3)
        done = subprocess.run(
            [sys.executable, "-m", "supraopt.cli", "run", str(directory)],
            capture_output=True,
            text=True,
            timeout=300,
            env=server_env(),
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Stopped:" in done.stdout
    counts, ids = ledger_summary(directory)
    assert counts[Status.DONE] + counts[Status.FAILED] == 3 and sum(counts.values()) == 3, counts
    on_the_wire = [campaign_prefix(directory) + i for i in ids]  # campaigns may share a rig server
    assert rig_state(tmp_path / "rig") == (on_the_wire, on_the_wire)  # every experiment ran on the rig, once


def test_a_server_killed_and_restarted_mid_run_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    (tmp_path / "rig").mkdir()
    server = ServeProcess(tmp_path / "rig", "-o", "duration_s=0.5")
    server.start()
    directory = http_campaign(tmp_path / "campaign", server.url, budget=2)
    events: list[Event] = []
    outcome: dict[str, Any] = {}

    def drive() -> None:
        with (
            Campaign.open(directory) as campaign,
            HttpRig(server.url, token=TOKEN, timeout_s=2, retries=1, backoff_s=0.05) as rig,
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
