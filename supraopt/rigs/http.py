"""The ``http`` rig adapter: the rig protocol (:mod:`supraopt.rigs.base`) over JSON/HTTP.

The optimiser rarely runs on the rig's control PC. :class:`HttpRig` talks to a rig server across the
network, such as ``supraopt rig serve`` (:mod:`supraopt.rigs.server`), the reference implementation.
The API, version 1 (every path but health needs ``Authorization: Bearer TOKEN``)::

    GET  /v1/health                         200 {"status": "ok", "api": "v1"}
    GET  /v1/limits                         200 {"bounds": {"flow_ratio": [0.3, 3.0], ...}}
    PUT  /v1/runs/{experiment_id}           body {"settings": {"concentration_mg_ml": ..., ...}}
                                            201 new run / 200 the same id and settings again (no
                                            second run); 409 the same id with other settings;
                                            422 invalid body or settings outside the limits (never
                                            sent to the hardware). Body: a run status.
    GET  /v1/runs/{experiment_id}           200 run status {"experiment_id", "state", "result", "message"};
                                            an id the rig does not know is 200 with state "lost"
    POST /v1/runs/{experiment_id}/cancel    200 run status

A run status's ``result`` is a measurement ``{diameter_nm, pdi_pct, n_particles, droplet_um}`` when the
state is "done", ``{reason}`` when "failed", else null. Errors are ``{"detail": "...", "kind": "..."}``
with 401 (token), 409, 422, 502 (the rig behind the server gave an invalid result), 503 (rig error),
504 (the rig did not answer in time). An unknown id is *not* a 404: a 404 means a wrong URL (a proxy,
a missing ``/v1``), which must never read as "the rig lost the run".

Lost replies are expected on a lab network. Every call is retried ``retries`` times with exponential
backoff (``backoff_s``, doubling) on connection errors, timeouts, dropped connections and 502/503/504;
all four verbs are safe to repeat (``submit`` is idempotent on the experiment id). When the retries
are spent, a timeout or a reply lost after the request went out raises
:class:`~supraopt.errors.RigTimeout` ("unknown, ask again"), anything else
:class:`~supraopt.errors.RigError`. Nothing here ever turns a lost reply into a failed run.

Only httpx, the record types and the errors are imported: no torch.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from supraopt.errors import InputError, LimitViolation, RigError, RigTimeout
from supraopt.records import Failure, Measurement, Proposal, RigLimits, RunState, RunStatus, validate_context

TOKEN_ENV = "SUPRAOPT_RIG_TOKEN"
"""Environment variable holding the bearer token (on both ends) unless ``token_env`` names another."""
API_PREFIX = "/v1"
RETRY_STATUS = frozenset({502, 503, 504})
"""Replies worth asking again: the server or a proxy in front of it is busy, restarting or timed out."""
INVALID_RESULT = "invalid_result"
"""Error ``kind`` of a 502 whose cause is the rig's own answer, not the link: asking again will not help."""


class HttpRig:
    """Rig adapter for a rig server speaking the supraopt rig API (see the module docstring).

    Args:
        url: base URL of the server, e.g. ``http://rig-pc.lab:8765`` (``/v1/...`` is appended).
        token: the bearer token; better left out of ``campaign.toml``: by default it is read from
            the environment variable ``token_env``, or from ``token_file``.
        token_env: environment variable holding the token.
        token_file: file holding the token (e.g. the ``token`` file in the server's state folder).
        timeout_s: seconds to wait for one reply (connect, send and read each).
        retries: extra attempts after a transient failure (0: one attempt only).
        backoff_s: wait before the first retry; doubles with every further one.
        verify: TLS verification for ``https`` URLs: True, False, or the path of a CA bundle.
        id_prefix: put in front of every experiment id on the wire (letters, digits, ``.``, ``_``, ``-``).
            Ledger ids (E001, E002...) are unique within one campaign only: give each campaign that
            shares a rig server its own prefix (e.g. ``"cspbbr3-450-"``), or a second campaign's E001
            would be taken for the first one's (same settings: its old run; other settings: 409).
        transport: an httpx transport to use instead of the network (tests).
        sleep: the function that waits between retries (tests).

    Proxy variables in the environment are ignored: the rig is reached directly.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_env: str = TOKEN_ENV,
        token_file: str | os.PathLike[str] | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        verify: bool | str = True,
        id_prefix: str = "",
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(f"http rig url={url!r} must start with http:// or https://, e.g. 'http://rig-pc:8765'.")
        for name, value, low in (("timeout_s", timeout_s, 0.0), ("backoff_s", backoff_s, -1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"http rig {name}={value!r} must be a number of seconds.")
            if value <= low:
                raise InputError(f"http rig {name}={value!r} must be {'positive' if low == 0 else 'non-negative'}.")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise InputError(f"http rig retries={retries!r} must be an integer between 0 and 20.")
        if (
            not isinstance(id_prefix, str)
            or len(id_prefix) > 40
            or not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)?", id_prefix)
        ):
            raise InputError(
                f"http rig id_prefix={id_prefix!r} must be at most 40 letters, digits, '.', '_' or '-', starting with a letter or digit, e.g. 'lab2-450nm-'."
            )
        self.id_prefix = id_prefix
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self._sleep = sleep
        secret = _find_token(token, token_env, token_file)
        self._client = httpx.Client(
            base_url=self.url + API_PREFIX,
            headers={"Authorization": f"Bearer {secret}", "Accept": "application/json"},
            timeout=self.timeout_s,
            transport=transport,
            verify=verify,
            trust_env=False,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"HttpRig(url={self.url!r}, timeout_s={self.timeout_s:g}, retries={self.retries})"

    def close(self) -> None:
        """Close the connections to the server."""
        self._client.close()

    def __enter__(self) -> HttpRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the four verbs

    def limits(self) -> RigLimits:
        body = self._call("limits()", "GET", "/limits")
        try:
            return RigLimits.from_json(body["bounds"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise RigError(f"the rig server at {self.url} sent invalid limits: {_short(body)}.") from None

    def submit(self, proposal: Proposal) -> None:
        """Send the run; returns once the server accepted it (201 new, 200 already known)."""
        settings = dict(proposal.settings)
        bad = [f"{k}={v!r}" for k, v in settings.items() if isinstance(v, bool) or not isinstance(v, (int, float))] or [
            f"{k}={v}" for k, v in settings.items() if not math.isfinite(v)
        ]
        if bad:
            raise LimitViolation(
                f"experiment {proposal.experiment_id} not sent: {', '.join(bad)} is not a finite number."
            )
        path = self._run_path(proposal.experiment_id)
        body: dict[str, Any] = {"settings": settings}
        if proposal.context:  # only then: a server from before context existed forbids the field
            body["context"] = dict(proposal.context)
        self._call(f"submit({proposal.experiment_id!r})", "PUT", path, body)

    def poll(self, experiment_id: str) -> RunStatus:
        body = self._call(f"poll({experiment_id!r})", "GET", self._run_path(experiment_id))
        return self._status(experiment_id, body)

    def cancel(self, experiment_id: str) -> None:
        self._call(f"cancel({experiment_id!r})", "POST", self._run_path(experiment_id) + "/cancel")

    def context(self) -> dict[str, str | float] | None:
        """What the rig reports as mounted now (chip, NC batch...: ``GET /v1/context``); None when it
        reports nothing or the server predates context."""
        try:
            body = self._call("context()", "GET", "/context")
        except RigError as error:
            if "(404)" in str(error):
                return None
            raise
        try:
            return validate_context(body["context"], "rig context") or None
        except (KeyError, TypeError) as error:
            raise RigError(f"the rig server at {self.url} sent an invalid context: {_short(body)}.") from error

    def _run_path(self, experiment_id: str) -> str:
        return f"/runs/{quote(self.id_prefix + str(experiment_id), safe='')}"

    # ------------------------------------------------------------------ transport

    def _call(self, what: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request with retries; returns the decoded JSON of a 2xx reply or raises (see module docstring)."""
        attempts = self.retries + 1
        unknown = False
        problem = ""
        for attempt in range(attempts):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TimeoutException:
                unknown, problem = True, f"no reply within {self.timeout_s:g} s"
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError) as error:
                unknown, problem = True, f"the connection dropped before the reply ({_clause(error)})"
                continue
            except httpx.ConnectError as error:
                unknown, problem = False, f"cannot connect ({_clause(error)})"
                continue
            except httpx.TransportError as error:
                unknown, problem = True, f"the link failed ({type(error).__name__}: {_clause(error)})"
                continue
            except httpx.HTTPError as error:  # a malformed URL and the like: asking again will not help
                raise RigError(f"rig {what} at {self.url} failed: {_clause(error)}.") from None
            if response.status_code in RETRY_STATUS and _kind(response) != INVALID_RESULT:
                unknown = response.status_code == 504
                problem = f"the server answered {response.status_code}: {_detail(response)}"
                continue
            return self._check(what, response)
        text = f"rig {what} at {self.url}: {problem}, {attempts} attempt(s)"
        if unknown:
            raise RigTimeout(f"{text}; the state of the run is unknown, ask again.")
        raise RigError(f"{text}; check that 'supraopt rig serve' (or the rig's server) is running there.")

    def _check(self, what: str, response: httpx.Response) -> Any:
        code = response.status_code
        if 200 <= code < 300:
            try:
                return response.json()
            except ValueError:
                raise RigError(
                    f"rig {what}: the server at {self.url} sent {code} without JSON: {_short(response.text)}."
                ) from None
        detail = _detail(response)
        if code == 401:
            raise RigError(
                f"rig {what}: the server at {self.url} refused the token (401: {detail}); set {TOKEN_ENV} (or the "
                "[rig.options] token_env variable) to the token that 'supraopt rig serve' printed."
            )
        if code == 404:
            raise RigError(
                f"rig {what}: {self.url}{API_PREFIX} has no such endpoint (404); check [rig.options] url points at "
                "a supraopt rig server, e.g. 'http://rig-pc:8765'."
            )
        if code == 409:
            raise RigError(f"rig {what} refused (409): {detail}")
        if code == 422 and what.startswith("submit"):
            raise LimitViolation(f"rig {what} refused (422): {detail}")
        if code == 502:  # kind invalid_result: the rig's own answer was not a valid record
            raise InputError(f"rig {what}: the rig gave an invalid result ({detail})")
        raise RigError(f"rig {what}: the server at {self.url} answered {code}: {detail}")

    def _status(self, experiment_id: str, body: Any) -> RunStatus:
        try:
            state = RunState(body["state"])
            reply_id = body["experiment_id"]
            message = body.get("message") or ""
            result = body.get("result")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RigError(f"the rig server at {self.url} sent an invalid run status: {_short(body)}.") from None
        if reply_id != self.id_prefix + experiment_id or not isinstance(message, str):
            raise RigError(f"the rig server at {self.url} answered poll({experiment_id!r}) with {_short(body)}.")
        try:  # a malformed result is the rig's own answer: InputError, so the runner sets the run aside
            if state is RunState.DONE:
                return RunStatus(experiment_id, state, Measurement.from_json(result), message)
            if state is RunState.FAILED:
                return RunStatus(experiment_id, state, Failure(result["reason"]), message)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"run {experiment_id} is {state} with an invalid result {_short(result)}.") from None
        return RunStatus(experiment_id, state, None, message)


def _find_token(token: str | None, token_env: str, token_file: str | os.PathLike[str] | None) -> str:
    if token is None and token_file is not None:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise InputError(f"http rig token_file={str(path)!r} cannot be read ({error.strerror}).") from None
    if token is None:
        token = os.environ.get(token_env, "").strip() or None
    if token is None:
        raise InputError(
            f"the http rig has no token: set {token_env} to the token that 'supraopt rig serve' printed "
            "(or give [rig.options] token_file)."
        )
    if not isinstance(token, str) or not token.isascii() or not token.isprintable() or " " in token or not token:
        raise InputError("the http rig token must be one word of printable ASCII characters.")
    return token


def _kind(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("kind", "")) if isinstance(body, dict) else ""


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _short(response.text) or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return _short(body)


def _short(value: Any, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clause(error: BaseException) -> str:
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ")


__all__ = ["API_PREFIX", "TOKEN_ENV", "HttpRig"]
