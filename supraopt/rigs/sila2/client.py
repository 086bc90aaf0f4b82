"""The ``sila2`` rig adapter: the rig protocol (:mod:`supraopt.rigs.base`) over SiLA 2.

:class:`Sila2Rig` drives any SiLA 2 server implementing the SupraparticleSynthesis feature, such as
``supraopt rig serve --protocol sila2`` (:mod:`supraopt.rigs.sila2.server`)::

    [rig]
    adapter = "sila2"
    [rig.options]
    host = "rig-pc.lab"
    port = 50052
    certificate = "sila2-cert.pem"   # the server's certificate (relative to the campaign folder); or insecure = true on loopback

``submit``, ``poll`` and ``cancel`` are the unobservable commands ``SubmitExperiment``, ``GetRun`` and
``CancelRun``: each is one call with a deadline, and they work across server restarts (a SiLA command
execution, such as one of the observable ``RunExperiment`` that lab schedulers use, does not survive
one). ``limits`` and ``context`` read the ``RigLimits`` and ``RigContext`` properties.

Failures map as the ``http`` adapter maps HTTP failures, so the runner's crash-safety rules hold:
every call has a deadline (``timeout_s``) and is retried ``retries`` times with exponential backoff on
DEADLINE_EXCEEDED and UNAVAILABLE (a server restarting, a link down); when the retries are spent that is
:class:`~supraopt.errors.RigTimeout` ("unknown, ask again"). A TLS handshake refused (wrong certificate)
and the defined errors ``RigFault``/``ExperimentIdConflict`` are :class:`~supraopt.errors.RigError`,
``RigNoAnswer`` is RigTimeout, ``SettingsOutsideLimits`` is :class:`~supraopt.errors.LimitViolation`;
a run the server reports failed is a FAILED status with the reason. Nothing turns a lost reply into a
failed run.

gRPC and the SiLA 2 library are imported when a Sila2Rig is built, never when supraopt is imported.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.records import Failure, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs.sila2 import FEATURE_ID, SETTING_FIELDS, load_feature

TRANSIENT = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE"})
"""gRPC status codes worth asking again: no answer in time, or no server reachable right now."""
_TLS_WORDS = ("handshake", "certificate", "ssl", "tls")


class _Transient(Exception):
    """One attempt failed in a way worth repeating."""


class Sila2Rig:
    """Rig adapter for a SiLA 2 server with the SupraparticleSynthesis feature (see the module docstring).

    Args:
        host: name or address of the SiLA 2 server.
        port: its port.
        certificate: path of the server's PEM certificate (or of the CA that signed it) to trust;
            relative paths are resolved in ``base_dir`` (the campaign folder). Without it (and
            without ``insecure``) the system's trusted CAs are used.
        insecure: plain gRPC without TLS (only for a server on the same machine).
        server_name: the name to expect in the server's certificate, when it differs from ``host``.
        timeout_s: deadline of one call, seconds.
        retries: extra attempts after a transient failure (0: one attempt only).
        backoff_s: wait before the first retry; doubles with every further one.
        id_prefix: put in front of every experiment id on the wire (see the ``http`` adapter).
        base_dir: folder relative certificate paths start from.
        sleep: the function that waits between retries (tests).
    """

    def __init__(
        self,
        host: str,
        port: int,
        certificate: str | None = None,
        insecure: bool = False,
        server_name: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        id_prefix: str = "",
        base_dir: str | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
            raise InputError(f"sila2 rig host={host!r} must be a host name or address, e.g. '127.0.0.1'.")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InputError(f"sila2 rig port={port!r} must be an integer between 1 and 65535.")
        if not isinstance(insecure, bool):
            raise InputError(f"sila2 rig insecure={insecure!r} must be true or false.")
        if insecure and certificate is not None:
            raise InputError("sila2 rig: give either certificate (TLS) or insecure = true, not both.")
        for name, value, low in (("timeout_s", timeout_s, 0.0), ("backoff_s", backoff_s, -1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"sila2 rig {name}={value!r} must be a number of seconds.")
            if value <= low:
                raise InputError(f"sila2 rig {name}={value!r} must be {'positive' if low == 0 else 'non-negative'}.")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise InputError(f"sila2 rig retries={retries!r} must be an integer between 0 and 20.")
        if (
            not isinstance(id_prefix, str)
            or len(id_prefix) > 40
            or not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)?", id_prefix)
        ):
            raise InputError(
                f"sila2 rig id_prefix={id_prefix!r} must be at most 40 letters, digits, '.', '_' or '-', starting with a letter or digit."
            )
        root_certificate: bytes | None = None
        if certificate is not None:
            if not isinstance(certificate, str) or not certificate.strip():
                raise InputError(f"sila2 rig certificate={certificate!r} must be the path of a PEM file.")
            path = Path(certificate).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            try:
                root_certificate = path.read_bytes()
            except OSError as error:
                raise InputError(f"sila2 rig certificate={str(path)!r} cannot be read ({error.strerror}).") from None
            if b"-----BEGIN CERTIFICATE-----" not in root_certificate:
                raise InputError(f"sila2 rig certificate={str(path)!r} is not a PEM certificate.")

        self._feature = load_feature()  # first: a one-line error when the SiLA 2 extra is missing
        import grpc

        self.host, self.port, self.insecure = host, port, insecure
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self.id_prefix = id_prefix
        self._sleep = sleep
        self._grpc = grpc
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # reconnect within seconds once a restarted server is back (gRPC's default backoff grows to 2 minutes)
        options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if insecure:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificate)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = getattr(self._feature._grpc_module, f"{FEATURE_ID}Stub")(self._channel)
        # what the library's error decoding looks up: the feature's errors and parameters by identifier
        self._error_context: Any = SimpleNamespace(
            _children_by_fully_qualified_identifier=self._feature.children_by_fully_qualified_identifier,
            _registered_defined_execution_error_classes={},
        )

    def __repr__(self) -> str:
        tls = "insecure" if self.insecure else "TLS"
        return f"Sila2Rig(host={self.host!r}, port={self.port}, {tls}, timeout_s={self.timeout_s:g}, retries={self.retries})"

    def close(self) -> None:
        """Close the connection to the server."""
        self._channel.close()

    def __enter__(self) -> Sila2Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the four verbs (and context)

    def limits(self) -> RigLimits:
        prop = self._feature._unobservable_properties["RigLimits"]
        request = self._feature._pb2_module.Get_RigLimits_Parameters()
        items = self._attempts("limits()", lambda: prop.to_native_type(self._unary("Get_RigLimits", request, prop)))
        try:
            return RigLimits({str(i.Parameter): (float(i.Low), float(i.High)) for i in items})
        except (TypeError, ValueError, AttributeError):
            raise RigError(f"the SiLA 2 server at {self._where} sent invalid limits: {items!r}.") from None

    def context(self) -> dict[str, str | float]:
        """What the rig runs with now (chip, batch...), from the server's RigContext property."""
        prop = self._feature._unobservable_properties["RigContext"]
        request = self._feature._pb2_module.Get_RigContext_Parameters()
        items = self._attempts("context()", lambda: prop.to_native_type(self._unary("Get_RigContext", request, prop)))
        return {str(i.Name): float(i.Number) if i.IsNumber else str(i.Text) for i in items}

    def submit(self, proposal: Proposal) -> None:
        """Start the run; returns once the server accepted it (or already knew it)."""
        settings = dict(proposal.settings)
        bad = [f"{k}={v!r}" for k, v in settings.items() if isinstance(v, bool) or not isinstance(v, (int, float))] or [
            f"{k}={v}" for k, v in settings.items() if not math.isfinite(v)
        ]
        missing = [name for name in SETTING_FIELDS if name not in settings]
        if bad or missing:
            what = ", ".join(bad) + " is not a finite number" if bad else "missing " + ", ".join(missing)
            raise LimitViolation(f"experiment {proposal.experiment_id} not sent: {what}.")
        command = self._feature._unobservable_commands["SubmitExperiment"]
        wire_id = self.id_prefix + proposal.experiment_id
        request = command.parameters.to_message(
            ExperimentId=wire_id, Settings=tuple(float(settings[name]) for name in SETTING_FIELDS)
        )
        self._attempts(f"submit({proposal.experiment_id!r})", lambda: self._unary("SubmitExperiment", request, command))

    def poll(self, experiment_id: str) -> RunStatus:
        run = self._run_call("GetRun", f"poll({experiment_id!r})", experiment_id)
        return self._status(experiment_id, run)

    def cancel(self, experiment_id: str) -> None:
        self._run_call("CancelRun", f"cancel({experiment_id!r})", experiment_id)

    # ------------------------------------------------------------------ transport

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def _run_call(self, name: str, what: str, experiment_id: str) -> Any:
        command = self._feature._unobservable_commands[name]
        request = command.parameters.to_message(ExperimentId=self.id_prefix + experiment_id)
        return self._attempts(what, lambda: command.responses.to_native_type(self._unary(name, request, command)).Run)

    def _unary(self, method: str, request: Any, origin: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except self._grpc.RpcError as error:
            raise self._error(error, origin) from None

    def _error(self, error: Any, origin: Any) -> Exception:
        """A gRPC failure as a _Transient, a _DefinedError, or a final supraopt error."""
        from sila2.framework import DefinedExecutionError, ValidationError
        from sila2.framework.abc.sila_error import SilaError

        code = error.code().name if callable(getattr(error, "code", None)) else "UNKNOWN"
        details = str(error.details() if callable(getattr(error, "details", None)) else error)
        if SilaError.is_sila_error(error):
            sila = SilaError.from_rpc_error(error, client=self._error_context)
            if isinstance(sila, DefinedExecutionError):
                return _DefinedError(sila.identifier, sila.message)
            if isinstance(sila, ValidationError):
                return _Invalid(str(sila))
            return RigError(f"the SiLA 2 server at {self._where} answered {type(sila).__name__}: {_clause(sila)}.")
        if code in TRANSIENT:
            if any(word in details.lower() for word in _TLS_WORDS):
                return RigError(
                    f"the TLS handshake with the SiLA 2 server at {self._where} failed ({_short(details)}); check "
                    "[rig.options] certificate is the server's sila2-cert.pem and host a name in it (else set "
                    "server_name), or insecure = true for a plain server on this machine."
                )
            return _Transient(
                f"no reply within {self.timeout_s:g} s"
                if code == "DEADLINE_EXCEEDED"
                else f"unavailable ({_short(details)})"
            )
        if code == "UNIMPLEMENTED":
            return RigError(f"the SiLA 2 server at {self._where} does not implement the {FEATURE_ID} feature.")
        return RigError(f"the SiLA 2 server at {self._where} failed: {code} {_short(details)}.")

    def _attempts(self, what: str, call: Callable[[], Any]) -> Any:
        """``call`` with retries on transient failures; defined errors become supraopt errors (module docstring)."""
        problem, unknown = "", True
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return call()
            except _Transient as error:
                problem, unknown = str(error), True
            except _DefinedError as error:
                if error.identifier not in {"RigNoAnswer", "RigFault"}:
                    raise self._final(what, error) from None
                problem, unknown = f"{error.message} ({error.identifier})", error.identifier == "RigNoAnswer"
            except _Invalid as error:
                if what.startswith("submit"):
                    raise LimitViolation(f"rig {what} refused: {error}") from None
                raise RigError(f"rig {what} refused by the SiLA 2 server at {self._where}: {error}") from None
        text = f"rig {what} at {self._where}: {problem}, {self.retries + 1} attempt(s)"
        if unknown:
            raise RigTimeout(f"{text}; the state of the run is unknown, ask again.")
        raise RigError(f"{text}; the rig behind the server failed, ask again later.")

    def _final(self, what: str, error: _DefinedError) -> Exception:
        text = f"rig {what} at {self._where}: {error.message}"
        if error.identifier == "SettingsOutsideLimits":
            return LimitViolation(f"rig {what} refused: {error.message}")
        if error.identifier == "InvalidRigResult":
            return InputError(f"rig {what}: the rig gave an invalid result ({error.message})")
        return RigError(f"{text} ({error.identifier})")

    def _status(self, experiment_id: str, run: Any) -> RunStatus:
        try:
            state = RunState(run.State)
            reply_id, message = str(run.ExperimentId), str(run.Message)
        except (AttributeError, ValueError):
            raise RigError(f"the SiLA 2 server at {self._where} sent an invalid run: {run!r}.") from None
        if reply_id != self.id_prefix + experiment_id:
            raise RigError(f"the SiLA 2 server at {self._where} answered poll({experiment_id!r}) about {reply_id!r}.")
        try:  # a malformed result is the rig's own answer: InputError, so the runner sets the run aside
            if state is RunState.DONE:
                if len(run.Measurement) != 1:
                    raise ValueError("no measurement")
                m = run.Measurement[0]
                measurement = Measurement(
                    diameter_nm=float(m.DiameterNm),
                    pdi_pct=float(m.PdiPct),
                    n_particles=int(m.ParticlesSized) or None,
                    droplet_um=float(m.DropletUm) or None,
                )
                return RunStatus(experiment_id, state, measurement, message)
            if state is RunState.FAILED:
                return RunStatus(experiment_id, state, Failure(str(run.FailureReason)), message)
        except (TypeError, ValueError, AttributeError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"run {experiment_id} is {state} with an invalid result: {_clause(error)}.") from None
        return RunStatus(experiment_id, state, None, message)


class _DefinedError(Exception):
    def __init__(self, identifier: str, message: str) -> None:
        super().__init__(f"{identifier}: {message}")
        self.identifier, self.message = identifier, message


class _Invalid(Exception):
    """The server refused a parameter (SiLA validation error)."""


def _short(value: Any, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clause(error: BaseException) -> str:
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ")


__all__ = ["Sila2Rig"]
