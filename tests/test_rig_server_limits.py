"""`rig serve` hardening: a token sent in the query string never reaches the access log; huge bodies are 413."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _servers import serving

from supraopt.rigs import SimulatedRig
from supraopt.rigs.server import MAX_BODY_BYTES, _RedactQuery, create_app

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


class Recorder(SimulatedRig):
    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[str] = []

    def submit(self, proposal):  # type: ignore[no-untyped-def]
        self.submitted.append(proposal.experiment_id)
        super().submit(proposal)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Recorder]]:
    rig = Recorder()
    with serving(create_app(rig, TOKEN)) as url:
        yield url, rig


def test_a_body_over_the_cap_is_413_and_never_reaches_the_adapter(server: tuple[str, Recorder]) -> None:
    url, rig = server
    padding = "x" * (MAX_BODY_BYTES + 10)
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as client:
        reply = client.put("/v1/runs/E001", json={"settings": SETTINGS, "note": padding})
        assert reply.status_code == 413
        assert reply.json() == {
            "detail": f"request body too large: at most {MAX_BODY_BYTES} bytes (a submit is about 100).",
            "kind": "too_large",
        }
        chunks = (b"{" + b" " * 8191 for _ in range(9))  # chunked, no Content-Length: 72 KiB in all
        assert client.put("/v1/runs/E002", content=chunks).status_code == 413
        assert client.put("/v1/runs/E003", json={"settings": SETTINGS}).status_code == 201  # normal ones still pass
        small_chunks = (part for part in (b'{"settings": ', httpx.Request("GET", "/", json=SETTINGS).content, b"}"))
        json_type = {"Content-Type": "application/json"}
        assert client.put("/v1/runs/E004", content=small_chunks, headers=json_type).status_code == 201
    assert rig.submitted == ["E003", "E004"]


def test_a_huge_declared_body_is_refused_before_it_is_sent(server: tuple[str, Recorder]) -> None:
    url, rig = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"PUT /v1/runs/E009 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{{".encode())
        chunks = []  # answered without waiting for the 10 GB; the server closes after its reply
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 413") and "too_large" in reply
    assert "E009" not in rig.submitted


def test_without_the_token_a_huge_body_is_401_not_413(server: tuple[str, Recorder]) -> None:
    url, _ = server
    reply = httpx.put(f"{url}/v1/runs/E001", content=b"x" * (MAX_BODY_BYTES * 2), timeout=10)
    assert reply.status_code == 401


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        (f"/v1/limits?token={TOKEN}", "/v1/limits?token=REDACTED"),
        (f"/v1/runs/E001?a=1&access_token={TOKEN}", "/v1/runs/E001?a=REDACTED&access_token=REDACTED"),
        (f"/v1/limits?{TOKEN}", "/v1/limits?REDACTED"),
        ("/v1/health", "/v1/health"),
    ],
)
def test_the_access_log_filter_redacts_every_query_value(path: str, logged: str) -> None:
    args = ("127.0.0.1:5000", "GET", path, "1.1", 401)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)
    assert _RedactQuery().filter(record)
    assert record.getMessage() == f'127.0.0.1:5000 - "GET {logged} HTTP/1.1" 401'


def test_rig_serve_never_writes_a_query_string_token_to_its_log(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "supraopt.cli", "rig", "serve", "--port", str(port), "--state-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SUPRAOPT_RIG_TOKEN": TOKEN}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if "Uvicorn running on" in line or "Application startup complete" in line:
                break
        else:
            pytest.fail("supraopt rig serve did not start")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/limits?token={TOKEN}", timeout=10).status_code == 401  # refused...
        assert httpx.get(f"{url}/v1/limits", headers=AUTH, timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert TOKEN not in output  # ...and not written down
    assert '"GET /v1/limits?token=REDACTED HTTP/1.1" 401' in output
    assert '"GET /v1/limits HTTP/1.1" 200' in output
