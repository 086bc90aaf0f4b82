"""examples/sila2_devices.py against small fake SiLA 2 pump and thermostat servers (the same library)."""

from __future__ import annotations

import importlib.util
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sila2", reason="the SiLA 2 extra is not installed: pip install -e '.[dev]'")

from sila2.framework import Feature
from sila2.server import FeatureImplementationBase, SilaServer

from supraopt.errors import LimitViolation
from supraopt.records import Failure, Measurement, Proposal, RunState, RunStatus

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sila2_devices.py"
_spec = importlib.util.spec_from_file_location("sila2_devices_example", EXAMPLE)
assert _spec is not None and _spec.loader is not None
devices = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(devices)


class FakePump(FeatureImplementationBase):
    def __init__(self, parent_server: SilaServer) -> None:
        super().__init__(parent_server)
        self.flow = 0.0
        self.history: list[float] = []

    def SetFlowRate(self, FlowRate: float, *, metadata: Any) -> None:
        self.flow = FlowRate
        self.history.append(FlowRate)

    def StopPump(self, *, metadata: Any) -> None:
        self.flow = 0.0

    def get_FlowRate(self, *, metadata: Any) -> float:
        return self.flow


class FakeThermostat(FeatureImplementationBase):
    """Heats or cools by 5 °C per reading, from 20 °C."""

    def __init__(self, parent_server: SilaServer) -> None:
        super().__init__(parent_server)
        self.current, self.target = 20.0, 20.0

    def SetTargetTemperature(self, TargetTemperature: float, *, metadata: Any) -> None:
        self.target = TargetTemperature

    def get_CurrentTemperature(self, *, metadata: Any) -> float:
        step = max(-5.0, min(5.0, self.target - self.current))
        self.current += step
        return self.current


def start(feature_xml: str, implementation: type[FeatureImplementationBase]) -> tuple[SilaServer, Any, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = SilaServer("fake device", "FakeDevice", "A fake SiLA 2 device for tests.", "1.0", "https://example.org")
    device = implementation(server)
    server.set_feature_implementation(Feature(feature_xml), device)
    server.start_insecure("127.0.0.1", port, enable_discovery=False)
    return server, device, f"127.0.0.1:{port}"


@pytest.fixture
def lab() -> Iterator[dict[str, tuple[SilaServer, Any, str]]]:
    servers = {name: start(devices.PUMP_FEATURE, FakePump) for name in ("continuous", "stock", "solvent")}
    servers["thermostat"] = start(devices.THERMOSTAT_FEATURE, FakeThermostat)
    try:
        yield servers
    finally:
        for server, _, _ in servers.values():
            if server.running:
                server.stop(grace_period=0.5)


def wait_finished(rig: Any, experiment_id: str) -> RunStatus:
    deadline = time.monotonic() + 20
    while (status := rig.poll(experiment_id)).state in (RunState.QUEUED, RunState.RUNNING):
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def test_the_devices_are_set_from_the_settings_and_measured_once(lab: dict[str, Any]) -> None:
    seen: list[dict[str, float]] = []

    def measure(experiment_id: str, settings: dict[str, float]) -> Measurement | Failure:
        seen.append({name: lab[name][1].flow for name in ("continuous", "stock", "solvent")})
        seen[-1]["temperature_c"] = lab["thermostat"][1].current
        if experiment_id == "E002":
            return Failure("droplets unstable")
        return Measurement(480.0, 5.5, n_particles=120)

    rig = devices.SilaDevicesRig(
        continuous_pump=lab["continuous"][2],
        stock_pump=lab["stock"][2],
        solvent_pump=lab["solvent"][2],
        thermostat=lab["thermostat"][2],
        measure=measure,
        stock_mg_ml=12.0,
        total_ul_min=60.0,
        insecure=True,
        settle_s=0.01,
        heat_timeout_s=5.0,
    )
    settings = {"concentration_mg_ml": 3.0, "flow_ratio": 2.0, "temperature_c": 40.0}
    rig.submit(Proposal("E001", settings))
    rig.submit(Proposal("E001", settings))  # the runner's resubmit: starts nothing
    assert wait_finished(rig, "E001") == RunStatus("E001", RunState.DONE, Measurement(480.0, 5.5, n_particles=120))
    # Q_c/Q_d = 2 at 60 µL/min: Q_c 40, Q_d 20, of which 3/12 is stock
    assert seen == [{"continuous": 40.0, "stock": 5.0, "solvent": 15.0, "temperature_c": 40.0}]
    assert all(lab[name][1].flow == 0.0 for name in ("continuous", "stock", "solvent"))  # stopped after measuring
    assert lab["continuous"][1].history == [40.0]

    rig.submit(Proposal("E002", {**settings, "flow_ratio": 5.0}))
    assert wait_finished(rig, "E002") == RunStatus("E002", RunState.FAILED, Failure("droplets unstable"))

    with pytest.raises(LimitViolation, match=r"concentration_mg_ml=13.0 outside rig limits \[0, 12\]"):
        rig.submit(Proposal("E003", {**settings, "concentration_mg_ml": 13.0}))
    assert rig.poll("E003").state is RunState.LOST and len(seen) == 2

    lab["thermostat"][0].stop(grace_period=0.5)  # a device goes away: a rig fault, not chemistry
    rig.submit(Proposal("E004", settings))
    status = wait_finished(rig, "E004")
    assert status.state is RunState.LOST and status.message.startswith("device fault, run again")
    assert len(seen) == 2
    rig.close()
