"""Any rig adapter behind a SiLA 2 server: ``supraopt rig serve --protocol sila2``.

The server implements the SupraparticleSynthesis feature (``SupraparticleSynthesis.sila.xml``)
on top of one rig adapter (see :mod:`supraopt.rigs.base`), with the guarantees of the HTTP server
(:mod:`supraopt.rigs.server`), whatever the adapter:

* **Limits before the hardware.** Settings must be finite and inside ``rig.limits()``, else the
  defined execution error ``SettingsOutsideLimits``; the adapter never sees them.
* **One run per experiment id, across restarts.** The first ``RunExperiment`` of an id claims it with
  its settings in ``rig-server-runs.json`` (state folder; the same file and format as the HTTP
  server's) before the adapter's ``submit``; the same id again follows the existing run and is passed
  to the adapter only if the adapter reports the run LOST; the same id with other settings is
  ``ExperimentIdConflict``.
* **One adapter call at a time** (a lock), so adapters need not be thread-safe.
* **Rig problems are not chemistry.** RigError -> ``RigFault``, RigTimeout -> ``RigNoAnswer`` (unknown,
  ask again), an invalid result -> ``InvalidRigResult``; only a run the adapter reports FAILED ends
  with ``ChemistryFailed`` and its reason.
* **TLS by default**, as SiLA 2 expects: a self-signed certificate (with the SiLA server UUID
  extension) is generated on first start and kept in the state folder (``sila2-cert.pem``,
  ``sila2-key.pem`` mode 0600, ``sila2-server-uuid``); its SHA-256 fingerprint is printed. Clients
  pin it (``[rig.options] certificate = "sila2-cert.pem"``). ``insecure`` (plain gRPC) is refused
  unless the server listens on loopback only.
* **SiLA Server Discovery** (mDNS/zeroconf) is off unless asked for (``discovery=True``).

The SiLA 2 library is imported when a server is built, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import math
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.records import Failure, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import load_rig
from supraopt.rigs.base import Rig
from supraopt.rigs.server import LOOPBACK, REGISTRY_FILE, ApiError, _Registry, _run_out, default_state_dir
from supraopt.rigs.sila2 import FEATURE_ID, SETTING_FIELDS, load_feature, require_sila2

DEFAULT_PORT = 50052
"""The port SiLA 2 examples use."""
CERT_FILE = "sila2-cert.pem"
KEY_FILE = "sila2-key.pem"
UUID_FILE = "sila2-server-uuid"
WATCH_INTERVAL_S = 0.5
"""How often a RunExperiment execution polls the adapter for its run."""
WATCH_PATIENCE = 120
"""Consecutive rig errors a RunExperiment execution tolerates while following a run before it gives up."""
SILA_UUID_OID = "1.3.6.1.4.1.58583"
"""X.509 extension in which SiLA 2 servers state their server UUID."""


class Refusal(Exception):
    """A call refused or failed for a reason the feature names: ``kind`` is a defined execution error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


# ---------------------------------------------------------------------------------------------- the guarantees


class Guard:
    """One adapter with the server's guarantees; knows nothing of SiLA (see the module docstring)."""

    def __init__(self, rig: Rig, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.rig = rig
        self.registry = _Registry(None if state_dir is None else Path(state_dir) / REGISTRY_FILE)
        self.lock = threading.Lock()

    def limits(self) -> RigLimits:
        with self.lock:
            return self._limits()

    def submit(self, experiment_id: str, settings: dict[str, float]) -> RunStatus:
        """Start the run (or find the one already started under this id); its status right after."""
        with self.lock:
            bad = [f"{name}={value}" for name, value in settings.items() if not math.isfinite(value)]
            if bad:
                raise Refusal(
                    "SettingsOutsideLimits",
                    f"experiment {experiment_id} refused: {', '.join(bad)} is not a finite number.",
                )
            problems = self._limits().violations(settings)
            if problems:
                raise Refusal("SettingsOutsideLimits", f"experiment {experiment_id} refused: {'; '.join(problems)}.")
            known = self.registry.get(experiment_id)
            if known is not None and known != settings:
                raise Refusal(
                    "ExperimentIdConflict",
                    f"experiment {experiment_id} was already submitted with other settings "
                    f"({', '.join(f'{k}={v:g}' for k, v in known.items())}); give the new settings a new id.",
                )
            if known is not None:
                current = self._poll(experiment_id)
                if current.state is not RunState.LOST:
                    return current  # never ask the adapter for a second run
            try:
                self.registry.claim(experiment_id, settings)
            except ApiError as error:  # the state folder cannot be written: nothing was sent
                raise Refusal("RigFault", error.detail) from None
            try:
                self._adapter(f"submit({experiment_id!r})", self.rig.submit, Proposal(experiment_id, dict(settings)))
            except Refusal as refusal:
                if refusal.kind == "SettingsOutsideLimits" and known is None:
                    self.registry.release(experiment_id)  # refused by the adapter: the id was never used
                raise
            return self._poll(experiment_id)

    def poll(self, experiment_id: str) -> RunStatus:
        with self.lock:
            return self._poll(experiment_id)

    def cancel(self, experiment_id: str) -> RunStatus:
        with self.lock:
            self._adapter(f"cancel({experiment_id!r})", self.rig.cancel, experiment_id)
            return self._poll(experiment_id)

    def context(self) -> dict[str, str | float]:
        """The adapter's ``context()`` when it has one (chip, batch...), else empty."""
        method = getattr(self.rig, "context", None)
        if not callable(method):
            return {}
        with self.lock:
            values = self._adapter("context()", method)
        if not isinstance(values, dict):
            raise Refusal("RigFault", f"rig.context() returned {_short(values)}, not a dict.")
        out: dict[str, str | float] = {}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise Refusal("RigFault", f"rig.context() gave {name}={_short(value)}: use text or a number.")
            out[str(name)] = value if isinstance(value, str) else float(value)
        return out

    def _limits(self) -> RigLimits:
        limits = self._adapter("limits()", self.rig.limits)
        try:
            bounds = {str(name): (float(low), float(high)) for name, (low, high) in limits.bounds.items()}
        except (TypeError, ValueError, AttributeError):
            bounds = {}
        if (
            not isinstance(limits, RigLimits)
            or not bounds
            or not all(math.isfinite(v) for p in bounds.values() for v in p)
        ):
            raise Refusal("RigFault", f"rig.limits() returned {_short(limits)}: give a RigLimits with finite bounds.")
        return RigLimits(bounds)

    def _poll(self, experiment_id: str) -> RunStatus:
        status = self._adapter(f"poll({experiment_id!r})", self.rig.poll, experiment_id)
        try:
            _run_out(experiment_id, status)  # the HTTP server's checks of a status, again (an adapter may bypass them)
        except ApiError as error:
            raise Refusal("InvalidRigResult", error.detail) from None
        return status

    def _adapter(self, what: str, method: Callable[..., Any], *args: Any) -> Any:
        """Call the adapter; whatever it raises becomes a Refusal naming the call."""
        try:
            return method(*args)
        except LimitViolation as error:
            raise Refusal("SettingsOutsideLimits", _text(error)) from None
        except RigTimeout as error:
            raise Refusal("RigNoAnswer", f"rig.{what} gave no answer in time: {_text(error)}") from None
        except RigError as error:
            raise Refusal("RigFault", f"rig.{what} failed: {_text(error)}") from None
        except Exception as error:  # a third-party adapter may raise anything
            raise Refusal("RigFault", f"rig.{what} raised {type(error).__name__}: {_text(error)}") from None


# ---------------------------------------------------------------------------------------------- the SiLA 2 server


class RunningServer(NamedTuple):
    server: Any
    """The running ``sila2.server.SilaServer``."""
    certificate: bytes | None
    """PEM certificate clients must trust (None when insecure)."""
    stop: Callable[[], None]


def start_server(
    rig: Rig,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    state_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    discovery: bool = False,
    watch_interval_s: float = WATCH_INTERVAL_S,
) -> RunningServer:
    """Serve ``rig`` over SiLA 2 on ``host:port`` (in background threads) until ``.stop()``.

    ``state_dir`` keeps the claimed ids, the certificate and the server UUID across restarts; without
    it they live in memory (and TLS needs a state folder for its certificate).
    """
    require_sila2()
    from sila2.server import SilaServer

    if insecure and host not in LOOPBACK:
        raise InputError(
            f"--insecure on {host} would send everything unencrypted across the network: it is allowed on "
            "127.0.0.1 (loopback) only; serve with TLS (the default) instead."
        )
    directory = None if state_dir is None else Path(state_dir)
    if not insecure and directory is None:
        raise InputError("a TLS SiLA 2 server needs a state folder for its certificate.")
    guard = Guard(rig, directory)
    server_uuid = _server_uuid(directory)
    server = SilaServer(
        server_name="supraopt rig",
        server_type="SupraoptRig",
        server_description="A supraopt rig adapter (microfluidic supraparticle synthesis) over SiLA 2.",
        server_version="1.0",
        server_vendor_url="https://github.com/supraopt/supraopt",
        server_uuid=server_uuid,
        max_child_task_workers=1000,  # one per followed RunExperiment execution
    )
    feature = load_feature()
    implementation = _implementation_class()(server, feature, guard, watch_interval_s)
    server.set_feature_implementation(feature, implementation)
    certificate: bytes | None = None
    try:
        if insecure:
            server.start_insecure(host, port, enable_discovery=discovery)
        else:
            assert directory is not None
            key, certificate, _ = ensure_certificate(directory, host, server_uuid)
            server.start(
                host,
                port,
                private_key=key,
                cert_chain=certificate,
                ca_for_discovery=certificate,
                enable_discovery=discovery,
            )
    except RuntimeError as error:  # grpc cannot bind the port
        raise InputError(
            f"cannot serve SiLA 2 on {host}:{port}: the address cannot be bound (is the port in use, or {host} not "
            f"an address of this machine?); gRPC said: {_text(error)}"
        ) from None

    def stop() -> None:
        if server.running:
            implementation.stopping.set()
            server.stop(grace_period=1.0)

    return RunningServer(server, certificate, stop)


def _implementation_class() -> type:
    """The feature implementation, a subclass of the library's base class (imported here, lazily)."""
    from sila2.framework import DefinedExecutionError
    from sila2.server import FeatureImplementationBase

    class SupraparticleSynthesisImpl(FeatureImplementationBase):
        def __init__(self, parent_server: Any, feature: Any, guard: Guard, watch_interval_s: float) -> None:
            super().__init__(parent_server)
            self.feature, self.guard, self.watch_interval_s = feature, guard, watch_interval_s
            self.stopping = threading.Event()

        def stop(self) -> None:
            self.stopping.set()
            super().stop()

        def _error(self, refusal: Refusal) -> Exception:
            return DefinedExecutionError(self.feature.defined_execution_errors[refusal.kind], refusal.message)

        def _guarded(self, method: Callable[..., Any], *args: Any) -> Any:
            try:
                return method(*args)
            except Refusal as refusal:
                raise self._error(refusal) from None

        def get_RigLimits(self, *, metadata: Any) -> list[tuple[str, float, float]]:
            limits = self._guarded(self.guard.limits)
            return [(name, low, high) for name, (low, high) in limits.bounds.items()]

        def get_RigContext(self, *, metadata: Any) -> list[tuple[str, str, bool, float]]:
            values = self._guarded(self.guard.context)
            return [
                (name, value if isinstance(value, str) else f"{value:g}", not isinstance(value, str),
                 0.0 if isinstance(value, str) else value)
                for name, value in values.items()
            ]  # fmt: skip

        def SubmitExperiment(self, ExperimentId: str, Settings: Any, *, metadata: Any) -> tuple[Any, ...]:
            settings = {name: float(getattr(Settings, field)) for name, field in SETTING_FIELDS.items()}
            return _run_struct(self._guarded(self.guard.submit, ExperimentId, settings))

        def GetRun(self, ExperimentId: str, *, metadata: Any) -> tuple[Any, ...]:
            return _run_struct(self._guarded(self.guard.poll, ExperimentId))

        def CancelRun(self, ExperimentId: str, *, metadata: Any) -> tuple[Any, ...]:
            return _run_struct(self._guarded(self.guard.cancel, ExperimentId))

        def RunExperiment(self, ExperimentId: str, Settings: Any, *, metadata: Any, instance: Any) -> tuple[Any, ...]:
            settings = {name: float(getattr(Settings, field)) for name, field in SETTING_FIELDS.items()}
            status = self._guarded(self.guard.submit, ExperimentId, settings)
            instance.begin_execution()
            last: RunState | None = None
            errors = 0
            while True:
                if status.state is RunState.DONE:
                    assert isinstance(status.result, Measurement)
                    return _measurement_struct(status.result)
                if status.state is RunState.FAILED:
                    assert isinstance(status.result, Failure)
                    raise self._error(Refusal("ChemistryFailed", status.result.reason))
                if status.state is RunState.CANCELLED:
                    raise self._error(Refusal("RunCancelled", f"run {ExperimentId} was cancelled."))
                if status.state is RunState.LOST:
                    raise self._error(Refusal("RunLost", f"the rig has no run {ExperimentId} any more."))
                if status.state is not last:
                    instance.send_intermediate_response(str(status.state))
                    last = status.state
                if self.stopping.wait(self.watch_interval_s):
                    raise self._error(
                        Refusal("RigNoAnswer", f"the server is stopping; ask GetRun({ExperimentId}) once it is back.")
                    )
                try:
                    status = self.guard.poll(ExperimentId)
                    errors = 0
                except Refusal as refusal:
                    errors += 1
                    if refusal.kind == "InvalidRigResult" or errors >= WATCH_PATIENCE:
                        raise self._error(refusal) from None

    return SupraparticleSynthesisImpl


def _measurement_struct(m: Measurement) -> tuple[float, float, int, float]:
    return (float(m.diameter_nm), float(m.pdi_pct), m.n_particles or 0, float(m.droplet_um or 0.0))


def _run_struct(status: RunStatus) -> tuple[Any, ...]:
    measurement = [_measurement_struct(status.result)] if isinstance(status.result, Measurement) else []
    reason = status.result.reason if isinstance(status.result, Failure) else ""
    return (status.experiment_id, str(status.state), measurement, reason, status.message)


# ---------------------------------------------------------------------------------------------- TLS


def ensure_certificate(directory: Path, host: str, server_uuid: uuid.UUID) -> tuple[bytes, bytes, bool]:
    """The server's private key and self-signed certificate (PEM), generated on first use; and whether it is new.

    The certificate names localhost, 127.0.0.1, ::1, this machine's names and addresses and ``host``, and carries the
    SiLA server UUID extension; it is valid for ten years (clients pin it, so renewal is a manual step).
    """
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if key_path.exists() and cert_path.exists():
        try:
            return key_path.read_bytes(), cert_path.read_bytes(), False
        except OSError as error:
            raise InputError(f"cannot read {key_path} or {cert_path} ({error.strerror}); fix or delete both.") from None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    dns = ["localhost", socket.gethostname(), socket.getfqdn()]
    addresses = ["127.0.0.1", "::1"]
    with contextlib.suppress(OSError):  # this machine's own addresses, so that clients may connect by address
        addresses += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)]
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            addresses.append(host)
    except ValueError:
        dns.append(host)
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in dns if n):
        with contextlib.suppress(ValueError):
            names.append(x509.DNSName(name))
    for address in dict.fromkeys(addresses):
        with contextlib.suppress(ValueError):  # e.g. a link-local address with a %zone
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "supraopt SiLA 2 rig server")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(SILA_UUID_OID), str(server_uuid).encode("ascii")),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    _write_new(key_path, key_pem, 0o600)
    _write_new(cert_path, cert_pem, 0o644)
    return key_pem, cert_pem, True


def fingerprint(certificate_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, as ``AB:CD:...`` (what ``openssl x509 -fingerprint -sha256`` shows)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _server_uuid(directory: Path | None) -> uuid.UUID:
    """The server's SiLA UUID, kept in the state folder so that it survives restarts."""
    if directory is None:
        return uuid.uuid4()
    path = directory / UUID_FILE
    if path.exists():
        try:
            return uuid.UUID(path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError) as error:
            raise InputError(f"the server UUID file {path} is unreadable ({error}); delete it.") from None
    value = uuid.uuid4()
    _write_new(path, f"{value}\n".encode(), 0o644)
    return value


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------- serving


def serve(
    adapter: str = "simulated",
    options: dict[str, Any] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    state_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    discovery: bool = False,
    echo: Callable[[str], None] = print,
) -> None:
    """Load the adapter (state in ``state_dir``), print how to connect, and serve until Ctrl-C or SIGTERM."""
    require_sila2()
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"port={port!r} must be an integer between 1 and 65535.")
    if insecure and host not in LOOPBACK:  # before the adapter is loaded (it may touch hardware)
        raise InputError(
            f"--insecure on {host} would send everything unencrypted across the network: it is allowed on "
            "127.0.0.1 (loopback) only; serve with TLS (the default) instead."
        )
    directory = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise InputError(f"cannot create the state folder {directory} ({error.strerror}).") from None
    rig = load_rig(adapter, options or {}, directory)
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    new_certificate = not insecure and not (directory / CERT_FILE).exists()
    running = start_server(rig, host=host, port=port, state_dir=directory, insecure=insecure, discovery=discovery)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        echo(
            f"Serving rig adapter {adapter!r} as a SiLA 2 server ({FEATURE_ID} feature) on {where} (state in {directory})."
        )
        if running.certificate is None:
            echo("warning: --insecure: plain gRPC without TLS, for this machine only.")
            echo(f'Clients: [rig] adapter = "sila2", [rig.options] host = "{host}", port = {port}, insecure = true.')
        else:
            state = "new self-signed" if new_certificate else "self-signed"
            echo(f"TLS certificate ({state}): {directory / CERT_FILE}")
            echo(f"SHA-256 fingerprint: {fingerprint(running.certificate)}")
            echo(
                f'Clients: copy that file next to campaign.toml and set [rig] adapter = "sila2", [rig.options] '
                f'host = "HOST", port = {port}, certificate = "{CERT_FILE}"; check the fingerprint on the copy.'
            )
        echo("SiLA Server Discovery (mDNS): " + ("on." if discovery else "off (--discovery turns it on)."))
        while not stopped.wait(0.5):
            pass
    finally:
        running.stop()
    echo("Stopped.")


class _OneLine(logging.Formatter):
    """Log records on one line each: the library logs every refused call with a traceback; keep its message."""

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        if copy.exc_info and copy.exc_info[1] is not None:
            copy.msg, copy.args = f"{copy.getMessage()}: {_text(copy.exc_info[1])}", None
        copy.exc_info, copy.exc_text, copy.stack_info = None, None, None
        return " ".join(super().format(copy).split())


def _text(error: BaseException) -> str:
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ") + "."


def _short(value: Any, limit: int = 200) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "DEFAULT_PORT",
    "Guard",
    "Refusal",
    "RunningServer",
    "ensure_certificate",
    "fingerprint",
    "serve",
    "start_server",
]
