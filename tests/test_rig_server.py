"""The reference rig server: token, validation, idempotent submits, error mapping, schema, CLI, fuzzing.

Every test talks to a real uvicorn server on 127.0.0.1 (a thread of this process, or `supraopt rig
serve` as a child process), so what is tested is what a client on the network gets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from _servers import serving
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.records import PARAMETERS, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import SimulatedRig
from supraopt.rigs.server import (
    REGISTRY_FILE,
    TOKEN_FILE,
    Settings,
    create_app,
    load_token,
    parse_options,
)

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}
"""Inside the simulated twin's limits: concentration [0.5, 12], flow ratio [1, 20], temperature [20, 80]."""


class CountingRig:
    """The simulated twin, counting the calls that reach it and the runs it really starts."""

    def __init__(self, **options: Any) -> None:
        self.rig = SimulatedRig(**options)
        self.calls: Counter[str] = Counter()
        self.started: list[str] = []

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
        return self.rig.poll(experiment_id)

    def cancel(self, experiment_id: str) -> None:
        self.calls["cancel"] += 1
        self.rig.cancel(experiment_id)


class BrokenRig(CountingRig):
    """A twin whose methods raise what the test says (``{"poll": RigError("...")}``) or return odd things."""

    def __init__(self, raises: dict[str, BaseException] | None = None, poll_returns: Any = None) -> None:
        super().__init__()
        self.raises, self.poll_returns = raises or {}, poll_returns

    def limits(self) -> RigLimits:
        self._maybe_raise("limits")
        return super().limits()

    def submit(self, proposal: Proposal) -> None:
        self._maybe_raise("submit")
        super().submit(proposal)

    def poll(self, experiment_id: str) -> RunStatus:
        self._maybe_raise("poll")
        if self.poll_returns is not None:
            return self.poll_returns  # type: ignore[no-any-return]
        return super().poll(experiment_id)

    def cancel(self, experiment_id: str) -> None:
        self._maybe_raise("cancel")
        super().cancel(experiment_id)

    def _maybe_raise(self, method: str) -> None:
        if method in self.raises:
            raise self.raises[method]


@pytest.fixture
def rig() -> CountingRig:
    return CountingRig()


@pytest.fixture
def client(rig: CountingRig) -> Iterator[httpx.Client]:
    """A plain HTTP client (no token) for a server around ``rig``."""
    with serving(create_app(rig, TOKEN)) as url, httpx.Client(base_url=url, timeout=10) as plain:
        yield plain


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[httpx.Client, CountingRig]]:
    """One server for the many requests that must not get past the token check."""
    rig = CountingRig()
    with serving(create_app(rig, TOKEN)) as url, httpx.Client(base_url=url, timeout=10) as plain:
        yield plain, rig


@pytest.fixture(scope="module")
def validating() -> Iterator[tuple[httpx.Client, CountingRig]]:
    """One server for the many requests that must not get past validation."""
    rig = CountingRig()
    with serving(create_app(rig, TOKEN)) as url, httpx.Client(base_url=url, timeout=10) as plain:
        yield plain, rig


def put(client: httpx.Client, experiment_id: str, settings: dict[str, Any] | None = None) -> httpx.Response:
    return client.put(f"/v1/runs/{experiment_id}", json={"settings": settings or SETTINGS}, headers=AUTH)


# ---------------------------------------------------------------------------------------------- the token


def test_health_needs_no_token(client: httpx.Client) -> None:
    reply = client.get("/v1/health")
    assert (reply.status_code, reply.json()) == (200, {"status": "ok", "api": "v1"})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Token": TOKEN},
    ],
    ids=["none", "empty", "wrong", "longer", "shorter", "basic", "no-scheme", "other-header"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/limits"),
        ("PUT", "/v1/runs/E001"),
        ("GET", "/v1/runs/E001"),
        ("POST", "/v1/runs/E001/cancel"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/no-such-path"),
    ],
)
def test_every_path_but_health_needs_the_token(
    guarded: tuple[httpx.Client, CountingRig], headers: dict[str, str], method: str, path: str
) -> None:
    client, rig = guarded
    reply = client.request(method, path, headers=headers, json={"settings": SETTINGS})
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert reply.json()["kind"] == "unauthorized"
    assert "bearer token" in reply.json()["detail"]
    assert not rig.calls  # nothing reached the adapter


def test_a_bad_token_is_refused_before_the_body_is_read(client: httpx.Client) -> None:
    reply = client.put("/v1/runs/E001", content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 401


def test_the_scheme_name_is_case_insensitive(client: httpx.Client) -> None:
    assert client.get("/v1/limits", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_a_short_token_is_refused_at_start() -> None:
    with pytest.raises(InputError, match=r"too short: use at least 16"):
        create_app(CountingRig(), "short")


def test_token_is_generated_once_saved_0600_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPRAOPT_RIG_TOKEN", raising=False)
    token, source = load_token(tmp_path / "state")
    path = tmp_path / "state" / TOKEN_FILE
    assert source == "new" and len(token) >= 40
    assert path.read_text().strip() == token
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_token(tmp_path / "state") == (token, "file")
    monkeypatch.setenv("SUPRAOPT_RIG_TOKEN", "from-the-environment-123")
    assert load_token(tmp_path / "state") == ("from-the-environment-123", "env")
    monkeypatch.setenv("SUPRAOPT_RIG_TOKEN", "tiny")
    with pytest.raises(InputError, match=r"SUPRAOPT_RIG_TOKEN is too short"):
        load_token(tmp_path / "state")


# ---------------------------------------------------------------------------------------------- the verbs


def test_limits_are_the_adapters(client: httpx.Client, rig: CountingRig) -> None:
    reply = client.get("/v1/limits", headers=AUTH)
    assert reply.status_code == 200
    assert RigLimits.from_json(reply.json()["bounds"]) == rig.rig.limits()


def test_submit_is_idempotent_and_a_changed_setting_is_a_conflict(client: httpx.Client, rig: CountingRig) -> None:
    first = put(client, "E001")
    assert first.status_code == 201
    assert first.json() == {"experiment_id": "E001", "state": "done", "result": first.json()["result"], "message": ""}
    again = put(client, "E001")
    assert (again.status_code, again.json()) == (200, first.json())
    other = put(client, "E001", {**SETTINGS, "flow_ratio": 4.5})
    assert other.status_code == 409
    assert other.json()["kind"] == "conflict"
    assert "E001 was already submitted with other settings (concentration_mg_ml=4" in other.json()["detail"]
    assert rig.started == ["E001"]
    assert rig.calls["submit"] == 1  # the repeat found the run and did not even ask the adapter


def test_concurrent_duplicate_submits_start_one_run(client: httpx.Client, rig: CountingRig) -> None:
    barrier = threading.Barrier(12)
    codes: list[int] = []

    def racer() -> None:
        barrier.wait(timeout=10)
        codes.append(put(client, "E007").status_code)

    threads = [threading.Thread(target=racer) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(codes) == [200] * 11 + [201]
    assert rig.started == ["E007"]


def test_a_lost_run_is_submitted_again_under_its_id(client: httpx.Client, rig: CountingRig) -> None:
    assert put(client, "E001").status_code == 201
    rig.rig = SimulatedRig()  # the rig forgot everything (no state file), the server still knows the id
    assert client.get("/v1/runs/E001", headers=AUTH).json()["state"] == "lost"
    again = put(client, "E001")
    assert again.status_code == 200 and again.json()["state"] == "done"
    assert rig.started == ["E001", "E001"]  # started again on the rig that had lost it, as the protocol says


def test_an_unknown_id_is_lost_not_404(client: httpx.Client) -> None:
    reply = client.get("/v1/runs/E404", headers=AUTH)
    assert reply.status_code == 200
    assert reply.json()["state"] == "lost" and reply.json()["result"] is None


def test_poll_and_cancel_a_running_run(rig: CountingRig) -> None:
    rig.rig = SimulatedRig(duration_s=3600)
    with serving(create_app(rig, TOKEN)) as url, httpx.Client(base_url=url) as client:
        assert put(client, "E001").json()["state"] == "running"
        assert client.get("/v1/runs/E001", headers=AUTH).json()["state"] == "running"
        cancelled = client.post("/v1/runs/E001/cancel", headers=AUTH)
        assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled")
        assert client.post("/v1/runs/E404/cancel", headers=AUTH).json()["state"] == "lost"


def test_finished_runs_carry_measurements_and_failures(client: httpx.Client) -> None:
    done = put(client, "E001").json()
    Measurement.from_json(done["result"])  # a valid measurement
    failed = put(client, "E002", {**SETTINGS, "concentration_mg_ml": 12.0}).json()  # far above the window
    assert failed["state"] == "failed" and failed["result"] == {"reason": "droplets unstable"}


def test_the_ids_survive_a_restart(tmp_path: Path) -> None:
    def fresh() -> CountingRig:
        counting = CountingRig()
        counting.rig = SimulatedRig(state_path=tmp_path / "twin.sqlite")
        return counting

    with serving(create_app(fresh(), TOKEN, state_dir=tmp_path)) as url, httpx.Client(base_url=url) as client:
        assert put(client, "E001").status_code == 201
    assert json.loads((tmp_path / REGISTRY_FILE).read_text())["runs"] == {"E001": SETTINGS}
    restarted = fresh()
    with serving(create_app(restarted, TOKEN, state_dir=tmp_path)) as url, httpx.Client(base_url=url) as client:
        assert put(client, "E001", {**SETTINGS, "temperature_c": 41.0}).status_code == 409
        assert put(client, "E001").status_code == 200
        assert client.get("/v1/runs/E001", headers=AUTH).json()["state"] == "done"
    assert restarted.started == []


# ---------------------------------------------------------------------------------------------- validation

BAD_BODIES: dict[str, bytes] = {
    "not json": b"{settings",
    "not utf-8": b'{"settings": "\xff\xfe"}',
    "empty": b"",
    "a list": b"[]",
    "no settings": b"{}",
    "settings null": b'{"settings": null}',
    "settings a list": b'{"settings": [4, 4, 40]}',
    "a parameter missing": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 4}}',
    "an unknown parameter": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 4, "temperature_c": 40, "rpm": 3}}',
    "an extra field": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 4, "temperature_c": 40}, "force": true}',
    "NaN": b'{"settings": {"concentration_mg_ml": NaN, "flow_ratio": 4, "temperature_c": 40}}',
    "Infinity": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": Infinity, "temperature_c": 40}}',
    "-Infinity": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 4, "temperature_c": -Infinity}}',
    "overflow": b'{"settings": {"concentration_mg_ml": 1e400, "flow_ratio": 4, "temperature_c": 40}}',
    "a string": b'{"settings": {"concentration_mg_ml": "4", "flow_ratio": 4, "temperature_c": 40}}',
    "a boolean": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": true, "temperature_c": 40}}',
    "null": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 4, "temperature_c": null}}',
    "a nested object": b'{"settings": {"concentration_mg_ml": {"value": 4}, "flow_ratio": 4, "temperature_c": 40}}',
    "too high": b'{"settings": {"concentration_mg_ml": 12.01, "flow_ratio": 4, "temperature_c": 40}}',
    "too low": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 0.99, "temperature_c": 40}}',
    "far too hot": b'{"settings": {"concentration_mg_ml": 4, "flow_ratio": 4, "temperature_c": 1e300}}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_or_unsafe_submits_are_422_and_never_reach_the_adapter(
    validating: tuple[httpx.Client, CountingRig], body: bytes
) -> None:
    client, rig = validating
    reply = client.put("/v1/runs/E001", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["kind"] in ("invalid_request", "limits")
    assert reply.json()["detail"]
    assert rig.calls["submit"] == 0 and not rig.started


def test_out_of_limits_names_the_setting_and_the_limits(client: httpx.Client) -> None:
    reply = put(client, "E001", {**SETTINGS, "temperature_c": 95.0})
    assert reply.status_code == 422
    assert reply.json() == {
        "detail": "experiment E001 refused: temperature_c=95.0 outside rig limits [20, 80].",
        "kind": "limits",
        "errors": [
            {
                "loc": ["body", "settings", "temperature_c"],
                "msg": "temperature_c=95.0 outside rig limits [20, 80]",
                "type": "limits",
            }
        ],
    }


@pytest.mark.parametrize("experiment_id", ["a%20b", "-E1", "E" * 65, "%C3%A9", "E1%2FE2", "E1%00"])
def test_a_malformed_id_is_422(validating: tuple[httpx.Client, CountingRig], experiment_id: str) -> None:
    client, rig = validating
    for method in ("GET", "PUT"):
        reply = client.request(method, f"/v1/runs/{experiment_id}", json={"settings": SETTINGS}, headers=AUTH)
        assert reply.status_code in (404, 422), reply.text  # a slash may route nowhere: 404 then
    assert not rig.started


# ---------------------------------------------------------------------------------------------- adapter errors


def _invalid_done() -> RunStatus:
    status = RunStatus("E001", RunState.RUNNING)
    bad = Measurement(diameter_nm=400.0, pdi_pct=5.0)
    object.__setattr__(bad, "diameter_nm", float("nan"))  # an adapter that bypassed the checks
    object.__setattr__(status, "state", RunState.DONE)
    object.__setattr__(status, "result", bad)
    return status


@pytest.mark.parametrize(
    ("raises", "poll_returns", "code", "kind", "text"),
    [
        ({"poll": RigError("pump 2 offline")}, None, 503, "rig_error", r"rig.poll\('E001'\) failed: pump 2 offline"),
        ({"poll": RigTimeout("camera busy")}, None, 504, "rig_timeout", r"no answer in time: camera busy"),
        ({"poll": ZeroDivisionError("division by zero")}, None, 503, "rig_error", r"raised ZeroDivisionError"),
        ({"poll": InputError("diameter_nm=nan")}, None, 503, "rig_error", r"raised InputError"),
        ({}, "not a status", 502, "invalid_result", r"returned 'not a status'"),
        ({}, RunStatus("E999", RunState.RUNNING), 502, "invalid_result", r"returned RunStatus\(experiment_id='E999'"),
        ({}, _invalid_done(), 502, "invalid_result", r"invalid result: diameter_nm=nan"),
    ],
    ids=["rig-error", "rig-timeout", "bug", "input-error", "not-a-status", "other-id", "nan-result"],
)
def test_adapter_failures_are_json_errors_never_500(
    raises: dict[str, BaseException], poll_returns: Any, code: int, kind: str, text: str
) -> None:
    with serving(create_app(BrokenRig(raises, poll_returns), TOKEN)) as url, httpx.Client(base_url=url) as client:
        reply = client.get("/v1/runs/E001", headers=AUTH)
    assert reply.status_code == code
    assert reply.json()["kind"] == kind
    assert re.search(text, reply.json()["detail"]), reply.json()


def test_an_adapter_refusing_a_submit_is_422_and_frees_the_id() -> None:
    broken = BrokenRig({"submit": LimitViolation("temperature_c=40 too hot for the new chip")})
    with serving(create_app(broken, TOKEN)) as url, httpx.Client(base_url=url) as client:
        reply = put(client, "E001")
        assert (reply.status_code, reply.json()["kind"]) == (422, "limits")
        broken.raises.clear()
        assert put(client, "E001", {**SETTINGS, "temperature_c": 30.0}).status_code == 201  # not a conflict


@pytest.mark.parametrize(
    "limits",
    [RigLimits({}), RigLimits({"flow_ratio": (1.0, float("inf"))}), RigLimits({"flow_ratio": ("low", "high")})],  # type: ignore[dict-item]
    ids=["empty", "infinite", "text"],
)
def test_unusable_limits_are_503_and_nothing_is_submitted(limits: RigLimits) -> None:
    broken = BrokenRig()
    broken.rig.limits = lambda: limits  # type: ignore[method-assign]
    with serving(create_app(broken, TOKEN)) as url, httpx.Client(base_url=url) as client:
        assert put(client, "E001").status_code == 503
        reply = client.get("/v1/limits", headers=AUTH)
        assert reply.status_code == 503 and "give finite [low, high] bounds" in reply.json()["detail"]
    assert broken.calls["submit"] == 0


def test_a_broken_limits_call_is_503_and_nothing_is_submitted() -> None:
    broken = BrokenRig({"limits": RuntimeError("serial port closed")})
    with serving(create_app(broken, TOKEN)) as url, httpx.Client(base_url=url) as client:
        reply = put(client, "E001")
        assert reply.status_code == 503
        assert "rig.limits() raised RuntimeError: serial port closed" in reply.json()["detail"]
        assert client.get("/v1/limits", headers=AUTH).status_code == 503
    assert broken.calls["submit"] == 0


# ---------------------------------------------------------------------------------------------- the schema


def test_the_openapi_schema_is_precise(client: httpx.Client) -> None:
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert set(schema["paths"]) == {
        "/v1/health",
        "/v1/limits",
        "/v1/context",
        "/v1/runs/{experiment_id}",
        "/v1/runs/{experiment_id}/cancel",
    }
    settings = schema["components"]["schemas"]["Settings"]
    assert settings["required"] == list(PARAMETERS) and settings["additionalProperties"] is False
    assert {p["type"] for p in settings["properties"].values()} == {"number"}
    put_op = schema["paths"]["/v1/runs/{experiment_id}"]["put"]
    assert set(put_op["responses"]) == {"200", "201", "401", "409", "422", "502", "503", "504"}
    assert put_op["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/v1/health"]["get"]
    run = schema["components"]["schemas"]["RunOut"]
    assert schema["components"]["schemas"]["RunState"]["enum"] == [s.value for s in RunState]
    assert set(run["properties"]) == {"experiment_id", "state", "result", "message"}


def test_the_settings_model_lists_exactly_the_parameters() -> None:
    assert tuple(Settings.model_fields) == PARAMETERS


def test_parse_options() -> None:
    parsed = parse_options(["seed=3", "duration_s=1.5", "camera=true", "preset=cspbbr3-flow-focusing", "note=a=b"])
    assert parsed == {"seed": 3, "duration_s": 1.5, "camera": True, "preset": "cspbbr3-flow-focusing", "note": "a=b"}
    assert parse_options(["limits={ temperature_c = [20, 60] }"]) == {"limits": {"temperature_c": [20, 60]}}
    with pytest.raises(InputError, match=r"--option 'seed' must look like key=value"):
        parse_options(["seed"])


# ---------------------------------------------------------------------------------------------- fuzzing

FUZZ_RIG = CountingRig()
FUZZ_SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", create_app(FUZZ_RIG, TOKEN), headers=AUTH)
FUZZ_SCHEMA.config.generation.update(max_examples=200, database="none")


@FUZZ_SCHEMA.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzzing_the_schema_finds_no_server_error(case: Any) -> None:
    """Schema-valid and schema-breaking requests (schemathesis' positive and negative modes): never a 500,
    every reply documented and matching its schema, and nothing outside the limits reaches the adapter."""
    case.call_and_validate(
        headers=AUTH,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    limits = FUZZ_RIG.rig.limits()
    for experiment_id in FUZZ_RIG.started:
        entry = FUZZ_RIG.rig.book.get(experiment_id)
        assert entry is not None
        settings = entry.settings
        assert not limits.violations(settings)


# ---------------------------------------------------------------------------------------------- the CLI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def rig_serve(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, list[str]]]:
    """``supraopt rig serve`` as a child process; yield its URL and the lines it printed before serving."""
    port = free_port()
    command = [sys.executable, "-m", "supraopt.cli", "rig", "serve", "--port", str(port), "--state-dir", str(state_dir)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if env is None:
        environment.pop("SUPRAOPT_RIG_TOKEN", None)
    process = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if "Uvicorn running on" in line or "Application startup complete" in line:
                break
        else:
            pytest.fail("supraopt rig serve stopped: " + "\n".join(lines))
        yield f"http://127.0.0.1:{port}", lines
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_rig_serve_prints_a_new_token_once_and_serves_on_loopback(tmp_path: Path) -> None:
    with rig_serve(tmp_path / "state") as (url, lines):
        text = "\n".join(lines)
        token = (tmp_path / "state" / TOKEN_FILE).read_text().strip()
        assert f"shown only this once: {token}" in text
        assert f"Serving rig adapter 'simulated' on http://127.0.0.1:{url.rsplit(':', 1)[1]}/v1" in text
        assert "warning" not in text
        with httpx.Client(base_url=url) as client:
            assert client.get("/v1/limits").status_code == 401
            assert client.get("/v1/limits", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    with rig_serve(tmp_path / "state") as (_url, lines):
        text = "\n".join(lines)
        assert token not in text and f"the one in {tmp_path / 'state' / TOKEN_FILE}" in text


def test_rig_serve_warns_when_open_to_the_network_and_takes_options(tmp_path: Path) -> None:
    env = {"SUPRAOPT_RIG_TOKEN": TOKEN}
    with rig_serve(tmp_path, "--host", "0.0.0.0", "-o", "duration_s=3600", env=env) as (url, lines):
        assert any(line.startswith("warning: listening on 0.0.0.0") for line in lines)
        assert not (tmp_path / TOKEN_FILE).exists()  # the environment's token is not written down
        with httpx.Client(base_url=url, headers=AUTH) as client:
            assert put(client, "E001").json()["state"] == "running"  # duration_s reached the twin


def test_rig_serve_user_errors_are_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supraopt.cli", "rig", "serve", "--adapter", "robot", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: unknown rig adapter 'robot': use 'simulated', 'manual', 'http' or 'module:Class'."
    ]
