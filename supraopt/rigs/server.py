"""The reference rig server: any rig adapter behind the JSON/HTTP API that :class:`~supraopt.rigs.http.HttpRig` speaks.

``supraopt rig serve`` runs it on the rig's control PC; lab engineers copy it as the template for
their own. :func:`create_app` wraps one adapter (see :mod:`supraopt.rigs.base`) in a FastAPI app;
:func:`serve` loads the adapter, the token and the state folder and runs the app with uvicorn. The
API is in :mod:`supraopt.rigs.http`'s docstring and, precisely, in the app's ``/openapi.json``.

What the server guarantees, whatever the adapter:

* **A bearer token on everything but** ``/v1/health``: from ``SUPRAOPT_RIG_TOKEN``, else the
  ``token`` file of the state folder, else generated on first start, saved there (mode 0600) and
  printed once. A missing or wrong token is 401 (compared in constant time), before the body is read.
  A token sent in the query string instead is refused like any other, and never written in clear to
  the access log: every query value is logged as ``REDACTED``.
* **Small bodies only.** A request body over ``MAX_BODY_BYTES`` (64 KiB; a submit is ~100 bytes) is
  413, refused on its ``Content-Length`` or as soon as that much has arrived, never read whole.
* **Validated input.** Settings must be exactly the three parameters, finite JSON numbers, inside
  ``rig.limits()``; anything else is 422 and never reaches the adapter.
* **One run per experiment id.** The first ``PUT /v1/runs/{id}`` claims the id with its settings in
  ``rig-server-runs.json`` (state folder) and submits; the same id again is 200 with the existing run
  and is passed to the adapter only if the adapter reports the run LOST (so a non-idempotent adapter
  still never starts a second run); the same id with other settings is 409.
* **One adapter call at a time** (a lock), so adapters need not be thread-safe.
* **No 500s.** An adapter's RigError is 503, RigTimeout 504, an invalid result 502, anything else it
  raises 503 with the message; each reply is ``{"detail": "...", "kind": "..."}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Response, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.records import (
    PARAMETERS,
    Failure,
    Measurement,
    Proposal,
    RigLimits,
    RunState,
    RunStatus,
    validate_context,
)
from supraopt.rigs import load_rig
from supraopt.rigs.base import Rig
from supraopt.rigs.http import API_PREFIX, INVALID_RESULT, TOKEN_ENV

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_FILE = "token"
REGISTRY_FILE = "rig-server-runs.json"
MIN_TOKEN_LENGTH = 16
MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted (a submit is about 100 bytes); larger is 413."""
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Experiment ids the server accepts: supraopt's E001, E002... and any other short plain name."""
OPEN_PATHS = frozenset({f"{API_PREFIX}/health"})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

# ---------------------------------------------------------------------------------------------- schema

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A JSON number (not a string, not a boolean), finite."""


class Settings(BaseModel):
    """What the rig must apply: every parameter, in the unit its name carries."""

    model_config = ConfigDict(extra="forbid")

    concentration_mg_ml: Annotated[
        Finite, Field(description="Nanocrystal concentration in the dispersed phase, mg/mL.")
    ]
    flow_ratio: Annotated[Finite, Field(description="Continuous / dispersed phase flow ratio Q_c/Q_d.")]
    temperature_c: Annotated[Finite, Field(description="Temperature, °C.")]


class SubmitRequest(BaseModel):
    """Body of ``PUT /v1/runs/{experiment_id}``."""

    model_config = ConfigDict(extra="forbid")

    settings: Settings
    context: dict[str, str | Finite] | None = Field(
        default=None,
        description="Optional conditions the run is meant for (chip, NC batch...: name -> level or number).",
    )


class ContextOut(BaseModel):
    """What the rig reports as mounted now (chip, NC batch...); empty when the adapter reports nothing."""

    context: dict[str, str | float] = Field(default_factory=dict)


class MeasurementOut(BaseModel):
    """What the rig measured for a finished run."""

    diameter_nm: float = Field(description="Mean supraparticle diameter, nm.")
    pdi_pct: float = Field(description="Polydispersity: coefficient of variation of the diameter, percent.")
    n_particles: int | None = Field(default=None, description="Number of particles sized.")
    droplet_um: float | None = Field(default=None, description="Mean droplet diameter measured in-line, µm.")
    context: dict[str, str | float] | None = Field(
        default=None, description="Conditions the rig reports for this run (chip, NC batch, room temperature...)."
    )


class FailureOut(BaseModel):
    """Why the chemistry of a run failed."""

    reason: str


class RunOut(BaseModel):
    """What the rig knows about one run; an id it does not know has state ``lost``."""

    experiment_id: str
    state: RunState
    result: MeasurementOut | FailureOut | None = Field(
        default=None, description="A measurement when done, a failure reason when failed, else null."
    )
    message: str = ""


class LimitsOut(BaseModel):
    """Hard safety limits of the rig: inclusive [low, high] per parameter."""

    bounds: dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(
        description="Parameter name -> [low, high], in the unit its name carries."
    )


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"
    api: Literal["v1"] = "v1"


class ErrorOut(BaseModel):
    """Every error reply: one sentence, and a kind a client can act on."""

    detail: str
    kind: str = Field(
        description="unauthorized, invalid_request, too_large, limits, conflict, rig_error, rig_timeout or "
        "invalid_result."
    )


class FieldError(BaseModel):
    loc: list[str]
    msg: str
    type: str


class ValidationErrorOut(ErrorOut):
    errors: list[FieldError]


ExperimentId = Annotated[
    str, PathParam(pattern=ID_PATTERN, max_length=64, description="Stable id of the experiment, e.g. E001.")
]
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"model": ErrorOut, "description": "Missing or wrong token."}}
RIG_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorOut, "description": "The rig gave an invalid result."},
    503: {"model": ErrorOut, "description": "The rig failed (RigError); ask again later."},
    504: {"model": ErrorOut, "description": "The rig did not answer in time; the state is unknown, ask again."},
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorOut, "description": "Invalid request, or settings outside the rig limits."}
}


_bearer = HTTPBearer(auto_error=False, description="The token printed by 'supraopt rig serve'.")


class ApiError(Exception):
    """An error reply: status code, kind and one-sentence detail."""

    def __init__(self, status: int, kind: str, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.errors = status, kind, detail, errors or []


# ---------------------------------------------------------------------------------------------- the app


def create_app(rig: Rig, token: str, *, state_dir: str | os.PathLike[str] | None = None) -> FastAPI:
    """A FastAPI app serving ``rig`` to clients holding ``token``.

    ``state_dir``, when given, keeps the experiment ids already claimed (``rig-server-runs.json``)
    across restarts; without it they live in memory.
    """
    _check_token(token)
    registry = _Registry(None if state_dir is None else Path(state_dir) / REGISTRY_FILE)
    lock = threading.Lock()
    secret = token.encode()

    app = FastAPI(
        title="supraopt rig server",
        version="1",
        description="A supraopt rig adapter over JSON/HTTP. Every path but /v1/health needs 'Authorization: Bearer TOKEN'.",
        docs_url=None,  # the interactive pages load scripts from the internet; /openapi.json is the reference
        redoc_url=None,
    )

    def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
        # the middleware below already refused a bad token before the body was read; this documents the scheme
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), secret):
            raise ApiError(401, "unauthorized", _UNAUTHORIZED)

    router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(authorised)], responses=UNAUTHORIZED)

    @contextmanager
    def adapter(what: str) -> Iterator[None]:
        """Map whatever the adapter raises to an error reply; never a 500."""
        try:
            yield
        except ApiError:
            raise
        except LimitViolation as error:
            raise ApiError(422, "limits", _text(error)) from None
        except RigTimeout as error:
            raise ApiError(504, "rig_timeout", f"rig.{what} gave no answer in time: {_text(error)}") from None
        except RigError as error:
            raise ApiError(503, "rig_error", f"rig.{what} failed: {_text(error)}") from None
        except Exception as error:  # a third-party adapter may raise anything; never a 500
            raise ApiError(503, "rig_error", f"rig.{what} raised {type(error).__name__}: {_text(error)}") from None

    def limits_now() -> RigLimits:
        with adapter("limits()"):
            limits = rig.limits()
        if not isinstance(limits, RigLimits):
            raise ApiError(503, "rig_error", f"rig.limits() returned {_short(limits)}, not a RigLimits.")
        try:
            bounds = {str(name): (float(low), float(high)) for name, (low, high) in limits.bounds.items()}
        except (TypeError, ValueError, AttributeError):
            bounds = {}
        if not bounds or not all(math.isfinite(v) for pair in bounds.values() for v in pair):
            raise ApiError(503, "rig_error", f"rig.limits() returned {_short(limits)}: give finite [low, high] bounds.")
        return RigLimits(bounds)

    def status_now(experiment_id: str) -> RunOut:
        with adapter(f"poll({experiment_id!r})"):
            status = rig.poll(experiment_id)
        return _run_out(experiment_id, status)

    @app.get(f"{API_PREFIX}/health", response_model=HealthOut, tags=["health"])
    def health() -> HealthOut:
        """Whether the server is up (no token needed)."""
        return HealthOut()

    @router.get("/limits", response_model=LimitsOut, responses=RIG_ERRORS)
    def get_limits() -> LimitsOut:
        """The rig's hard safety limits."""
        with lock:
            limits = limits_now()
        return LimitsOut(bounds={name: [float(low), float(high)] for name, (low, high) in limits.bounds.items()})

    @router.put(
        "/runs/{experiment_id}",
        response_model=RunOut,
        status_code=201,
        response_description="A new run was started.",
        responses={
            200: {"model": RunOut, "description": "The same id and settings again: the existing run, no new one."},
            409: {"model": ErrorOut, "description": "The id is already taken by other settings."},
            **INVALID,
            **RIG_ERRORS,
        },
    )
    def submit(experiment_id: ExperimentId, request: SubmitRequest, response: Response) -> RunOut:
        """Start a run (201), or return the run already started under this id (200). Idempotent."""
        settings = request.settings.model_dump()
        try:
            context = validate_context(request.context, "context")
        except InputError as error:
            raise ApiError(422, "invalid_request", str(error)) from None
        with lock:
            limits = limits_now()
            problems = limits.violations(settings)
            if problems:
                errors = [
                    {"loc": ["body", "settings", name], "msg": problem, "type": "limits"}
                    for name, pair in limits.bounds.items()
                    for problem in RigLimits({name: pair}).violations(settings)
                ]
                raise ApiError(422, "limits", f"experiment {experiment_id} refused: {'; '.join(problems)}.", errors)
            known = registry.get(experiment_id)
            if known is not None and known != settings:
                raise ApiError(
                    409,
                    "conflict",
                    f"experiment {experiment_id} was already submitted with other settings ({_settings_text(known)}); "
                    "give the new settings a new id.",
                )
            if known is not None:
                response.status_code = 200
                current = status_now(experiment_id)
                if current.state is not RunState.LOST:
                    return current  # never ask the adapter for a second run
            registry.claim(experiment_id, settings)
            try:
                with adapter(f"submit({experiment_id!r})"):
                    rig.submit(Proposal(experiment_id, settings, context))
            except ApiError as error:
                if error.kind == "limits" and known is None:
                    registry.release(experiment_id)  # refused by the adapter: the id was never used
                raise
            return status_now(experiment_id)

    @router.get("/context", response_model=ContextOut, responses=RIG_ERRORS)
    def get_context() -> ContextOut:
        """What the rig reports as mounted now (the adapter's optional ``context()``), e.g. ``{"chip": "B"}``."""
        method = getattr(rig, "context", None)
        if not callable(method):
            return ContextOut()
        with lock, adapter("context()"):
            reported = method()
        try:
            return ContextOut(context=validate_context(reported, "rig context"))
        except InputError as error:
            raise ApiError(503, "rig_error", f"rig.context() returned {_short(reported)}: {error}") from None

    @router.get("/runs/{experiment_id}", response_model=RunOut, responses={**INVALID, **RIG_ERRORS})
    def poll(experiment_id: ExperimentId) -> RunOut:
        """The run's state and, once finished, its result; an unknown id is state ``lost`` (not 404)."""
        with lock:
            return status_now(experiment_id)

    @router.post("/runs/{experiment_id}/cancel", response_model=RunOut, responses={**INVALID, **RIG_ERRORS})
    def cancel(experiment_id: ExperimentId) -> RunOut:
        """Stop a run still in progress; finished or unknown runs are left as they are."""
        with lock:
            with adapter(f"cancel({experiment_id!r})"):
                rig.cancel(experiment_id)
            return status_now(experiment_id)

    app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        body: dict[str, Any] = {"detail": error.detail, "kind": error.kind}
        if error.status == 422:  # one schema for every 422: the field errors may be empty
            body["errors"] = error.errors
        return JSONResponse(body, status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI could not even decode the body (not UTF-8, say): invalid as well
            body = {"detail": "invalid request: the body is not valid JSON.", "kind": "invalid_request", "errors": []}
            return JSONResponse(body, status_code=422)
        return JSONResponse(
            {"detail": str(error.detail), "kind": "http"}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        # only plain text goes back: the raw input may hold NaN, which JSON cannot carry
        errors = [
            {
                "loc": [str(part) for part in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in error.errors()
        ][:20]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request", "type": ""}
        if first["type"] == "json_invalid":
            detail = "invalid request: the body is not valid JSON."
        else:
            where = ".".join(first["loc"][1:] if len(first["loc"]) > 1 else first["loc"])
            detail = f"invalid request: {where + ': ' if where else ''}{first['msg']}."
        return JSONResponse({"detail": detail, "kind": "invalid_request", "errors": errors}, status_code=422)

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)  # inside the token check: runs only once it passed
    app.add_middleware(_BearerAuth, secret=secret)
    return app


_UNAUTHORIZED = f"missing or wrong bearer token: send 'Authorization: Bearer TOKEN' with the token from {TOKEN_ENV} or the server's token file."


class _BearerAuth:
    """ASGI middleware: refuse a request without the right token before anything reads its body."""

    def __init__(self, app: ASGIApp, secret: bytes) -> None:
        self.app, self._secret = app, secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, credentials = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(credentials.strip(), self._secret):
                reply = JSONResponse(
                    {"detail": _UNAUTHORIZED, "kind": "unauthorized"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, on its Content-Length or once that much arrived.

    The body (small by then) is read here and handed on whole, so the app never sees a partial one.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body too large: at most {self.limit} bytes (a submit is about 100)."
        reply = JSONResponse({"detail": detail, "kind": "too_large"}, status_code=413, headers={"Connection": "close"})
        await reply(scope, receive, send)


class _RedactQuery(logging.Filter):
    """Write every query-string value of an access-log line as REDACTED (a token sent as ``?token=...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def _redact(text: str) -> str:
    """``/v1/limits?token=abc&x`` -> ``/v1/limits?token=REDACTED&REDACTED``: values go, short plain names stay."""
    path, mark, query = text.partition("?")
    if not mark:
        return text
    parts = []
    for part in re.split(r"[&;]", query):
        name, equals, _ = part.partition("=")
        plain = equals and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) and len(name) < MIN_TOKEN_LENGTH
        parts.append(f"{name}=REDACTED" if plain else "REDACTED")
    return f"{path}?{'&'.join(parts)}"


def _run_out(experiment_id: str, status: object) -> RunOut:
    """The adapter's RunStatus as a reply, checked again (an adapter may bypass the dataclass checks)."""
    if not isinstance(status, RunStatus) or status.experiment_id != experiment_id:
        raise ApiError(502, INVALID_RESULT, f"rig.poll({experiment_id!r}) returned {_short(status)}.")
    try:
        result: MeasurementOut | FailureOut | None = None
        if status.state is RunState.DONE:
            if not isinstance(status.result, Measurement):
                raise InputError(f"a done run carries {status.result!r}, not a measurement")
            result = MeasurementOut(**Measurement.from_json(status.result.to_json()).to_json())
        elif status.state is RunState.FAILED:
            if not isinstance(status.result, Failure):
                raise InputError(f"a failed run carries {status.result!r}, not a failure")
            result = FailureOut(reason=Failure(status.result.reason).reason)
        return RunOut(experiment_id=experiment_id, state=RunState(status.state), result=result, message=status.message)
    except (InputError, ValidationError, TypeError, ValueError, KeyError) as error:
        raise ApiError(
            502, INVALID_RESULT, f"rig.poll({experiment_id!r}) gave an invalid result: {_text(error)}"
        ) from None


class _Registry:
    """Experiment id -> settings of every run this server accepted; a JSON file when ``path`` is given."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._runs: dict[str, dict[str, float]] = {}
        if path is not None and path.exists():
            try:
                runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
                self._runs = {str(k): {n: float(v[n]) for n in PARAMETERS} for k, v in runs.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise RigError(
                    f"rig server state {path} is unreadable ({error}); move it away to start afresh."
                ) from None

    def get(self, experiment_id: str) -> dict[str, float] | None:
        return self._runs.get(experiment_id)

    def claim(self, experiment_id: str, settings: dict[str, float]) -> None:
        if self._runs.get(experiment_id) != settings:
            self._runs[experiment_id] = dict(settings)
            self._save()

    def release(self, experiment_id: str) -> None:
        if self._runs.pop(experiment_id, None) is not None:
            self._save()

    def _save(self) -> None:
        """Atomic write: temporary file, fsync, rename."""
        if self.path is None:
            return
        try:
            _write_atomic(self.path, json.dumps({"version": 1, "runs": self._runs}, indent=1))
        except OSError as error:
            raise ApiError(
                503, "rig_error", f"the server cannot save its state to {self.path} ({error.strerror})."
            ) from None


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- serving


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/supraopt/rig-server`` (``~/.local/state/...``): the token, the adapter's runs, the ids."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "supraopt" / "rig-server"


def load_token(state_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """The server's token and where it came from: ``"env"``, ``"file"`` or ``"new"`` (just generated and saved)."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        _check_token(from_env)
        return from_env, "env"
    path = Path(state_dir) / TOKEN_FILE
    if not path.exists():
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another server started at the same moment: use its token
            pass
        else:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(token + "\n")
            return token, "new"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise InputError(f"cannot read the token file {path} ({error.strerror}); fix or delete it.") from None
    _check_token(token, where=str(path))
    return token, "file"


def _check_token(token: str, where: str = TOKEN_ENV) -> None:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the rig token in {where} is too short: use at least {MIN_TOKEN_LENGTH} random characters.")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise InputError(f"the rig token in {where} must be one word of printable ASCII characters.")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["seed=3", "preset=cspbbr3-flow-focusing"]`` -> ``{"seed": 3, "preset": "cspbbr3-flow-focusing"}``.

    A value is read as a TOML value when it is one (numbers, true/false, quoted text, arrays), else as text.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise InputError(f"--option {pair!r} must look like key=value, e.g. duration_s=60.")
        try:
            options[key] = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            options[key] = value
    return options


def serve(
    adapter: str = "simulated",
    options: dict[str, Any] | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    state_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Load the adapter (state in ``state_dir``), print how to connect, and serve until Ctrl-C."""
    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"port={port!r} must be an integer between 0 and 65535.")
    directory = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise InputError(f"cannot create the state folder {directory} ({error.strerror}).") from None
    rig = load_rig(adapter, options or {}, directory)
    token, source = load_token(directory)
    app = create_app(rig, token, state_dir=directory)
    echo(f"Serving rig adapter {adapter!r} on http://{_url_host(host)}:{port}{API_PREFIX} (state in {directory}).")
    if source == "new":
        echo(f"New access token, saved in {directory / TOKEN_FILE} and shown only this once: {token}")
    else:
        where = TOKEN_ENV if source == "env" else str(directory / TOKEN_FILE)
        echo(f"Access token: the one in {where}.")
    echo(f'Clients: set {TOKEN_ENV} to the token and [rig] adapter = "http", [rig.options] url = "http://HOST:{port}".')
    if host not in LOOPBACK:
        echo(
            f"warning: listening on {host}, not only on this machine: anyone who can reach port {port} can try the "
            "token, and plain HTTP carries it unencrypted; use a firewall, or a TLS proxy in front."
        )
    config = uvicorn.Config(app, host=host, port=port, ws="none", log_level="info")  # sets up uvicorn's loggers
    logging.getLogger("uvicorn.access").addFilter(_RedactQuery())
    uvicorn.Server(config).run()


def _settings_text(settings: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in settings.items())


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _text(error: BaseException) -> str:
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ") + "."


def _short(value: Any, limit: int = 200) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["DEFAULT_PORT", "create_app", "default_state_dir", "load_token", "parse_options", "serve"]
