"""A rig adapter composed of SiLA 2 devices: syringe pumps, a thermostat and your size measurement.

Many labs build the microfluidic rig from instruments whose vendors ship SiLA 2 servers. This adapter
drives three syringe pumps and a thermostat over SiLA 2 and takes the size from a function you give:

* the **continuous** phase pump runs at ``Q_c``; the dispersed phase is mixed in-line from a
  **stock** pump (nanocrystals at ``stock_mg_ml``) and a **solvent** pump, so that
  ``Q_stock + Q_solvent = Q_d``, ``Q_c / Q_d = flow_ratio`` and
  ``stock_mg_ml * Q_stock / Q_d = concentration_mg_ml``, at a constant total flow ``total_ul_min``;
* the **thermostat** holds the coil at ``temperature_c``; a run starts once it is within
  ``temperature_tolerance_c`` (it waits at most ``heat_timeout_s``);
* after ``settle_s`` your **measurement** function sizes the particles: ``measure(experiment_id,
  settings)`` returns a :class:`Measurement` (or a :class:`Failure` when no usable supraparticles
  formed); name it in ``campaign.toml`` as ``"mylab.sizing:measure"``.

The device features below (``SyringePumpControl``, ``ThermostatControl``) are deliberately small:
put your vendor's feature and command names in the four ``_pump_*``/``_thermostat_*`` methods. The
devices are reached with the ``sila2`` library's generic client (``pip install 'supraopt[sila2]'``)::

    [rig]
    adapter = "examples.sila2_devices:SilaDevicesRig"
    [rig.options]
    continuous_pump = "pump-1.lab:50052"
    stock_pump = "pump-2.lab:50052"
    solvent_pump = "pump-3.lab:50052"
    thermostat = "thermostat.lab:50052"
    certificates = "lab-ca.pem"        # the CA or device certificates (PEM); or insecure = true on loopback
    measure = "mylab.sizing:measure"
    stock_mg_ml = 12.0
    total_ul_min = 60.0

Runs are done one after another by a worker thread; ``submit`` queues a run and returns (idempotent
on the experiment id), ``poll`` reports QUEUED/RUNNING/DONE/FAILED. A device that fails mid-run is a
rig fault, not chemistry: the pumps are stopped and the run is forgotten (LOST, with the reason), so
the runner submits it again. tests/test_sila2_devices.py runs this adapter against small fake pump
and thermostat servers written with the same library.
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supraopt.errors import InputError, LimitViolation, RigError
from supraopt.records import Failure, Measurement, Proposal, RigLimits, RunState, RunStatus

_HEADER = (
    '<?xml version="1.0" encoding="utf-8"?>\n<Feature xmlns="http://www.sila-standard.org" SiLA2Version="1.0" '
    'FeatureVersion="1.0" Originator="org.supraopt.example" Category="devices">'
)


def _real(identifier: str, description: str) -> str:
    return (
        f"<Identifier>{identifier}</Identifier><DisplayName>{identifier}</DisplayName>"
        f"<Description>{description}</Description><DataType><Basic>Real</Basic></DataType>"
    )


def _command(identifier: str, description: str, parameter: str = "") -> str:
    return (
        f"<Command><Identifier>{identifier}</Identifier><DisplayName>{identifier}</DisplayName>"
        f"<Description>{description}</Description><Observable>No</Observable>{parameter}</Command>"
    )


def _property(identifier: str, description: str) -> str:
    return f"<Property>{_real(identifier, description).replace('<DataType>', '<Observable>No</Observable><DataType>')}</Property>"


PUMP_FEATURE = (
    _HEADER
    + "<Identifier>SyringePumpControl</Identifier><DisplayName>Syringe Pump Control</DisplayName>"
    + "<Description>Pump at a constant flow rate.</Description>"
    + _command(
        "SetFlowRate", "Pump at this flow rate.", f"<Parameter>{_real('FlowRate', 'Flow rate, uL/min.')}</Parameter>"
    )
    + _command("StopPump", "Stop pumping.")
    + _property("FlowRate", "Current flow rate, uL/min (0 when stopped).")
    + "</Feature>"
)
"""A minimal syringe-pump feature; a real pump's vendor feature has its own names (see the module docstring)."""

THERMOSTAT_FEATURE = (
    _HEADER
    + "<Identifier>ThermostatControl</Identifier><DisplayName>Thermostat Control</DisplayName>"
    + "<Description>Hold a temperature.</Description>"
    + _command(
        "SetTargetTemperature",
        "Hold this temperature.",
        f"<Parameter>{_real('TargetTemperature', 'Target temperature, degrees Celsius.')}</Parameter>",
    )
    + _property("CurrentTemperature", "Measured temperature, degrees Celsius.")
    + "</Feature>"
)
"""A minimal thermostat feature (see the module docstring)."""


class SilaDevicesRig:
    """Rig adapter over SiLA 2 pumps and a thermostat, with a measurement function (see the module docstring).

    Args:
        continuous_pump, stock_pump, solvent_pump, thermostat: ``"host:port"`` of each SiLA 2 server.
        measure: ``measure(experiment_id, settings) -> Measurement | Failure``, or its ``"module:function"`` name.
        stock_mg_ml: nanocrystal concentration of the stock syringe, mg/mL (the highest reachable).
        total_ul_min: total flow Q_c + Q_d, µL/min.
        limits: parameter -> [low, high] of the hardware (concentration is capped at ``stock_mg_ml``).
        certificates: PEM file of the CA (or the devices' certificates) to trust; None: the system's CAs.
        insecure: plain gRPC (devices on this machine only).
        settle_s: seconds between setting the flows and measuring.
        temperature_tolerance_c, heat_timeout_s: when the coil counts as at temperature, and how long to wait.
    """

    def __init__(
        self,
        continuous_pump: str,
        stock_pump: str,
        solvent_pump: str,
        thermostat: str,
        measure: str | Callable[[str, dict[str, float]], Measurement | Failure],
        stock_mg_ml: float = 12.0,
        total_ul_min: float = 60.0,
        limits: dict[str, list[float]] | None = None,
        certificates: str | None = None,
        insecure: bool = False,
        settle_s: float = 60.0,
        temperature_tolerance_c: float = 0.5,
        heat_timeout_s: float = 1800.0,
    ) -> None:
        from sila2.client import SilaClient

        if not stock_mg_ml > 0 or not total_ul_min > 0:
            raise InputError(f"stock_mg_ml={stock_mg_ml!r} and total_ul_min={total_ul_min!r} must be positive.")
        self.measure = _function(measure) if isinstance(measure, str) else measure
        self.stock_mg_ml, self.total_ul_min = float(stock_mg_ml), float(total_ul_min)
        self.settle_s, self.tolerance_c, self.heat_timeout_s = settle_s, temperature_tolerance_c, heat_timeout_s
        bounds = {
            "concentration_mg_ml": (0.0, self.stock_mg_ml),
            "flow_ratio": (0.5, 20.0),
            "temperature_c": (15.0, 90.0),
        }
        for name, pair in (limits or {}).items():
            bounds[name] = (float(pair[0]), float(pair[1]))
        bounds["concentration_mg_ml"] = (
            bounds["concentration_mg_ml"][0],
            min(bounds["concentration_mg_ml"][1], self.stock_mg_ml),
        )
        self._limits = RigLimits(bounds)
        root = Path(certificates).read_bytes() if certificates else None

        def connect(address: str) -> Any:
            host, _, port = address.rpartition(":")
            try:
                if insecure:
                    return SilaClient(host, int(port), insecure=True)
                return SilaClient(host, int(port), root_certs=root)
            except Exception as error:
                raise RigError(f"cannot reach the SiLA 2 device at {address}: {error}") from None

        self.pumps = {
            "continuous": connect(continuous_pump),
            "stock": connect(stock_pump),
            "solvent": connect(solvent_pump),
        }
        self.thermostat = connect(thermostat)
        self._runs: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, str] = {}  # experiment id -> why its run was forgotten
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._work, name="sila2-devices-rig", daemon=True).start()

    # ------------------------------------------------------------------ the adapter protocol

    def limits(self) -> RigLimits:
        return self._limits

    def submit(self, proposal: Proposal) -> None:
        with self._lock:
            if proposal.experiment_id in self._runs:
                return  # idempotent: a known id starts nothing
            problems = self._limits.violations(proposal.settings)
            if problems:
                raise LimitViolation(f"experiment {proposal.experiment_id} not submitted: {'; '.join(problems)}.")
            self._runs[proposal.experiment_id] = {"settings": dict(proposal.settings), "state": RunState.QUEUED}
        self._queue.put(proposal.experiment_id)

    def poll(self, experiment_id: str) -> RunStatus:
        with self._lock:
            run = self._runs.get(experiment_id)
            if run is None:
                return RunStatus(experiment_id, RunState.LOST, message=self._faults.get(experiment_id, ""))
            return RunStatus(experiment_id, run["state"], run.get("result"))

    def cancel(self, experiment_id: str) -> None:
        with self._lock:
            run = self._runs.get(experiment_id)
            if run is None or run["state"] not in (RunState.QUEUED, RunState.RUNNING):
                return
            run["state"] = RunState.CANCELLED
        self._stop_pumps()

    def close(self) -> None:
        """Close the connections to the devices."""
        for client in (*self.pumps.values(), self.thermostat):
            client.close()

    # ------------------------------------------------------------------ the devices

    def flows(self, settings: dict[str, float]) -> dict[str, float]:
        """µL/min per pump for these settings."""
        q_d = self.total_ul_min / (1.0 + settings["flow_ratio"])
        q_stock = q_d * settings["concentration_mg_ml"] / self.stock_mg_ml
        return {"continuous": self.total_ul_min - q_d, "stock": q_stock, "solvent": q_d - q_stock}

    def _pump_set(self, pump: str, flow_ul_min: float) -> None:
        self.pumps[pump].SyringePumpControl.SetFlowRate(FlowRate=flow_ul_min)

    def _pump_stop(self, pump: str) -> None:
        self.pumps[pump].SyringePumpControl.StopPump()

    def _thermostat_set(self, temperature_c: float) -> None:
        self.thermostat.ThermostatControl.SetTargetTemperature(TargetTemperature=temperature_c)

    def _thermostat_read(self) -> float:
        return float(self.thermostat.ThermostatControl.CurrentTemperature.get())

    def _stop_pumps(self) -> None:
        for pump in self.pumps:
            with contextlib.suppress(Exception):  # stop the others whatever one says
                self._pump_stop(pump)

    def _work(self) -> None:
        while True:
            experiment_id = self._queue.get()
            with self._lock:
                run = self._runs[experiment_id]
                if run["state"] is not RunState.QUEUED:
                    continue  # cancelled while queued
                run["state"] = RunState.RUNNING
                settings = dict(run["settings"])
            try:
                result = self._run(experiment_id, settings)
            except Exception as error:  # a device failed: a rig fault, never a chemistry result
                self._stop_pumps()
                with self._lock:
                    self._runs.pop(experiment_id, None)
                    self._faults[experiment_id] = f"device fault, run again: {error}"
                continue
            with self._lock:
                if run["state"] is RunState.RUNNING:
                    run["result"] = result
                    run["state"] = RunState.DONE if isinstance(result, Measurement) else RunState.FAILED

    def _run(self, experiment_id: str, settings: dict[str, float]) -> Measurement | Failure:
        self._thermostat_set(settings["temperature_c"])
        deadline = time.monotonic() + self.heat_timeout_s
        while abs(self._thermostat_read() - settings["temperature_c"]) > self.tolerance_c:
            if time.monotonic() > deadline:
                raise RigError(f"the coil did not reach {settings['temperature_c']:g} °C in {self.heat_timeout_s:g} s")
            time.sleep(min(1.0, self.heat_timeout_s / 100))
        for pump, flow in self.flows(settings).items():
            self._pump_set(pump, flow)
        time.sleep(self.settle_s)
        try:
            result = self.measure(experiment_id, settings)
        finally:
            self._stop_pumps()
        if not isinstance(result, (Measurement, Failure)):
            raise RigError(f"measure({experiment_id!r}) returned {result!r}, not a Measurement or a Failure")
        return result


def _function(name: str) -> Callable[[str, dict[str, float]], Measurement | Failure]:
    module, _, attribute = name.partition(":")
    try:
        function = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise InputError(f"measure={name!r} must name a function as 'module:function' ({error}).") from None
    if not callable(function):
        raise InputError(f"measure={name!r} is not a function.")
    return function
