"""The dashboard's web app: server-rendered pages (Jinja2), Plotly JSON, forms for the manual rig.

Routes (all GET unless said):

* ``/`` every campaign at a glance; ``/live`` its table as HTML, for the page's poller.
* ``/c/{slug}`` one campaign: summary, plots, experiments, forms, run.log; ``/c/{slug}/live`` the same
  parts as JSON (HTML fragments and figures) when the ledger version changed.
* ``/c/{slug}/maps.json?t=40`` model maps at a temperature, ``/c/{slug}/preview.json?n=2`` the next
  suggestion(s) (both refit the model: on demand only, cached per ledger version).
* POST ``/c/{slug}/record/{id}`` and POST ``/c/{slug}/suggest``: the manual rig's forms (off with
  ``read_only``); CSRF token and Origin checked; nothing is written on a refusal.
* ``/api/versions`` ledger version per campaign: the pages poll it every second.
* ``/static/...`` the stylesheet, the page script and plotly.min.js from the plotly package.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from supraopt.dashboard import figures
from supraopt.dashboard.data import Board, Page, Watched, page, rows_of, scrub, summarise
from supraopt.errors import InputError, SupraoptError
from supraopt.ledger import OPEN
from supraopt.records import Failure, Measurement

if TYPE_CHECKING:
    from supraopt.campaign import Campaign

HERE = Path(__file__).resolve().parent
COOKIE = "supraopt_dashboard"
MAX_FORM_BYTES = 16_000
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
PDI_FRACTION_MAX = 1.0
"""A PDI at or under this is refused as a fraction sent where percent was meant (0.05 for 5 %)."""
CACHE_SIZE = 16
MAX_PREVIEW = 8
NOTE = "recorded in the dashboard"
"""Stored with a result typed into the dashboard, so the ledger tells it from 'supraopt record'."""
"""Most suggestions one preview computes (a batch for a day on the rig)."""


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the plotly Python package (no CDN: lab PCs are often offline)."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


class Model:
    """A campaign's model, fitted on demand and cached per ledger version (one fit at a time)."""

    def __init__(self, watched: Watched) -> None:
        self.watched = watched
        self.lock = threading.Lock()
        self._campaign: Campaign | None = None
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def campaign(self) -> Campaign:
        from supraopt.campaign import Campaign  # torch: only when a model or a write is asked for

        if self._campaign is None:
            w = self.watched
            # watched through its ledger alone: no folder (no preset file, no campaign.toml to reload)
            self._campaign = Campaign(w.directory or Path(os.devnull), w.spec, w.ledger)
        return self._campaign

    def cached(self, key: tuple[Any, ...], compute: Any) -> Any:
        with self.lock:
            if key not in self._cache:
                self._cache[key] = compute()
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return self._cache[key]


# ------------------------------------------------------------------------------------------ forms


def _number(form: dict[str, str], name: str, label: str, errors: dict[str, str], *, integer: bool = False) -> Any:
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        errors[name] = f"{label}={text!r} is not {kind}."
        return None
    if not integer and not math.isfinite(value):
        errors[name] = f"{label}={text!r} must be a finite number."
        return None
    return value


def _field_of(message: str) -> str:
    """Which form field an InputError from the records or the CLI is about."""
    for prefix, name in (
        ("diameter", "diameter_nm"),
        ("--diameter", "diameter_nm"),
        ("pdi", "pdi"),
        ("--pdi", "pdi"),
        ("n_particles", "n_particles"),
        ("failure reason", "reason"),
        ("--failed", "reason"),
    ):
        if message.lower().startswith(prefix):
            return name
    return "form"


def parse_result(form: dict[str, str]) -> tuple[Measurement | Failure | None, dict[str, str]]:
    """The result a form describes, checked as ``supraopt record`` checks its options; or the errors per field."""
    from supraopt.cli.campaign import result_from_options  # the CLI's own checks, so stricter ones apply here too

    errors: dict[str, str] = {}
    if form.get("outcome") == "failed":
        reason = form.get("reason", "")
        if not reason.strip():
            errors["reason"] = "say why the run failed, e.g. 'hollow particles'."
            return None, errors
        try:
            return result_from_options(
                diameter_nm=None, pdi=None, n_particles=None, droplet_um=None, failed=reason
            ), errors
        except InputError as error:
            return None, {_field_of(str(error)): str(error)}
    diameter = _number(form, "diameter_nm", "diameter", errors)
    pdi = _number(form, "pdi", "PDI", errors)
    n = _number(form, "n_particles", "particles sized", errors, integer=True)
    if diameter is None and "diameter_nm" not in errors:
        errors["diameter_nm"] = "give the measured diameter in nm."
    if pdi is None and "pdi" not in errors:
        errors["pdi"] = "give the measured PDI in percent."
    if pdi is not None and 0 <= pdi <= PDI_FRACTION_MAX:
        # the dashboard's own check, until the core refuses it too (the runner only warns: loop.collect)
        errors["pdi"] = f"PDI={pdi:g} looks like a fraction: give the polydispersity in percent (5 for 5 %)."
    if errors:
        return None, errors
    try:
        return result_from_options(diameter_nm=diameter, pdi=pdi, n_particles=n, droplet_um=None, failed=None), errors
    except InputError as error:
        return None, {_field_of(str(error)): str(error)}


# ------------------------------------------------------------------------------------------ security


def _token_cookie(token: str) -> str:
    return hmac.new(token.encode(), b"supraopt-dashboard-cookie", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: security headers on every reply; with a token, refuse any request without it;
    without one (loopback only), refuse requests whose Host is not this machine (DNS rebinding)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, token
        self.cookie = _token_cookie(token) if token else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        refusal = self.refusal(Request(scope))
        await (refusal or self.app)(scope, receive, send_secured)

    def refusal(self, request: Request) -> Response | None:
        """The reply to a request that may not pass, or None."""
        if self.token is None:
            host = request.headers.get("host", "")
            name, _, port = host.rpartition(":")
            if not (port.isdigit() and not host.endswith("]")):
                name = host
            if name not in LOOPBACK_HOSTS:
                return _plain(403, "This dashboard only answers on this machine (127.0.0.1).")
            return None
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            reply = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303)
            reply.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict")
            return reply
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else ""
        cookie = request.cookies.get(COOKIE, "")
        if secrets.compare_digest(cookie.encode(), self.cookie.encode()) or (
            bearer and secrets.compare_digest(bearer.encode(), self.token.encode())
        ):
            return None
        return _plain(
            401,
            "This dashboard needs its access token: open the address printed when it started "
            "(http://HOST:PORT/?token=...), or send 'Authorization: Bearer TOKEN'.",
        )


SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # not no-referrer: Chromium then sends "Origin: null" with forms
    "cache-control": "no-store",
}


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain; charset=utf-8")


# ------------------------------------------------------------------------------------------ app


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (now - when).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _num(value: Any, digits: int = 1) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["when"] = lambda d: "–" if d is None else d.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    env.globals["ago"] = lambda d: _ago(d, datetime.now(UTC))
    return env


def create_app(board: Board, *, read_only: bool = False, token: str | None = None) -> FastAPI:
    """The dashboard over ``board``'s campaigns. ``token`` (required off loopback) guards every request."""
    env = _environment()
    csrf = secrets.token_urlsafe(24)
    models = {slug: Model(w) for slug, w in board.campaigns.items()}
    app = FastAPI(title="supraopt dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, token=token)
    common = {"read_only": read_only, "csrf": csrf}

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**common, **context), status_code=status)

    def watched_or_404(slug: str) -> Watched:
        watched = board.get(slug)
        if watched is None:
            raise _NotFound(slug)
        return watched

    def summaries() -> list[Any]:
        out = []
        for w in board.campaigns.values():
            version = w.version()
            out.append(summarise(w, rows_of(w, w.ledger.experiments()), version))
        return out

    def campaign_context(w: Watched, errors: dict[str, dict[str, str]] | None = None, values: Any = None) -> dict:
        view: Page = page(w)
        open_rows = [r for r in view.rows if r.experiment.status in OPEN]
        figs = {"convergence": figures.convergence(view.rows, w.spec.targets)}
        figs["parity"] = figures.parity(view.rows, w.spec.targets)
        low, high = w.spec.bounds["temperature_c"]
        measured = sorted(
            r.experiment.settings["temperature_c"]
            for r in view.rows
            if r.distance is not None and "temperature_c" in r.experiment.settings
        )
        start = measured[len(measured) // 2] if measured else 0.5 * (low + high)  # where the runs are, as `plot`
        return {
            "page": view,
            "s": view.summary,
            "has_folder": w.directory is not None,
            "open_rows": open_rows,
            "figures": figs,
            "errors": errors or {},
            "stray_errors": [
                (key, text)
                for key, fields in (errors or {}).items()
                if key != "suggest" and key not in {r.id for r in open_rows}
                for text in fields.values()
            ],
            "values": values or {},
            "t_low": low,
            "t_high": high,
            "t_mid": round(min(max(start, low), high) * 2) / 2,
        }

    @app.exception_handler(SupraoptError)
    async def _supraopt_error(request: Request, error: SupraoptError) -> Response:
        slug = request.path_params.get("slug")
        w = board.get(slug) if slug else None
        text = scrub(str(error), w.directory) if w else str(error)
        return _plain(409, f"error: {text}")

    @app.exception_handler(_NotFound)
    async def _not_found(_request: Request, error: _NotFound) -> Response:
        return _plain(404, f"no campaign {error.slug!r} on this dashboard; see / for the list.")

    @app.get("/", response_class=HTMLResponse)
    def overview() -> HTMLResponse:
        return render("overview.html", summaries=summaries())

    @app.get("/live")
    def overview_live() -> JSONResponse:
        listed = summaries()
        html = env.get_template("_overview_table.html").render(**common, summaries=listed)
        return JSONResponse({"versions": {s.slug: s.version for s in listed}, "html": {"overview": html}})

    @app.get("/api/versions")
    def versions() -> JSONResponse:
        return JSONResponse(board.versions())

    @app.get("/c/{slug}", response_class=HTMLResponse)
    def campaign_page(slug: str) -> HTMLResponse:
        return render("campaign.html", **campaign_context(watched_or_404(slug)))

    @app.get("/c/{slug}/live")
    def campaign_live(slug: str) -> JSONResponse:
        context = campaign_context(watched_or_404(slug))
        parts = {name: env.get_template(f"_{name}.html").render(**common, **context) for name in LIVE_PARTS}
        return JSONResponse({"version": context["s"].version, "html": parts, "figures": context["figures"]})

    @app.get("/c/{slug}/maps.json")
    def maps(slug: str, t: float | None = None) -> JSONResponse:
        w = watched_or_404(slug)
        low, high = w.spec.bounds["temperature_c"]
        temperature = 0.5 * (low + high) if t is None or not math.isfinite(t) else min(max(t, low), high)
        temperature = round(temperature, 1)
        model = models[slug]
        version = w.ledger.version()  # the model depends on the ledger only, not on run.log

        def compute() -> Any:
            rows = rows_of(w, w.ledger.experiments())
            return figures.model_maps(model.campaign(), rows, temperature)

        return JSONResponse(
            {
                "version": version,
                "temperature_c": temperature,
                "figures": model.cached(("maps", version, temperature), compute),
            }
        )

    @app.get("/c/{slug}/preview.json")
    def preview(slug: str, n: int = 1) -> JSONResponse:
        w = watched_or_404(slug)
        model = models[slug]
        version = w.ledger.version()  # the model depends on the ledger only, not on run.log
        n = min(max(n, 1), MAX_PREVIEW)

        def compute() -> Any:
            return figures.preview(model.campaign(), rows_of(w, w.ledger.experiments()), n)

        return JSONResponse({"version": version, "suggestions": model.cached(("preview", version, n), compute)})

    async def checked_form(request: Request) -> dict[str, str] | Response:
        """The posted form, or the refusal: read-only, cross-site, bad CSRF token, too big."""
        if read_only:
            return _plain(403, "this dashboard is read-only (started with --read-only).")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return _plain(403, "refused: the form was sent from another site.")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
            return _plain(413, "refused: the form is too large.")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return _plain(413, "refused: the form is too large.")
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()}
        if not secrets.compare_digest(form.get("csrf", "").encode(), csrf.encode()):
            return _plain(403, "refused: the form's security token is missing or stale; reload the page and retry.")
        return form

    @app.post("/c/{slug}/record/{experiment_id}")
    async def record(slug: str, experiment_id: str, request: Request) -> Response:
        w = watched_or_404(slug)
        form = await checked_form(request)
        if isinstance(form, Response):
            return form
        result, errors = parse_result(form)
        if result is not None:
            try:
                note = form.get("note", "").strip() or NOTE
                models[slug].campaign().record(experiment_id, result, note=note)
            except SupraoptError as error:
                errors = {"form": scrub(str(error), w.directory)}
        if errors:
            context = campaign_context(w, {experiment_id: errors}, {experiment_id: form})
            return render("campaign.html", **context)  # 200: a browser logs a 4xx page as a console error
        return RedirectResponse(f"/c/{slug}#experiments", status_code=303)

    @app.post("/c/{slug}/suggest")
    async def suggest(slug: str, request: Request) -> Response:
        w = watched_or_404(slug)
        form = await checked_form(request)
        if isinstance(form, Response):
            return form
        model = models[slug]
        try:
            with model.lock:
                model.campaign().suggest(1)  # takes the campaign's suggestion lock, like 'supraopt suggest'
        except SupraoptError as error:
            return render(
                "campaign.html",
                **campaign_context(w, {"suggest": {"form": scrub(str(error), w.directory)}}),
            )
        return RedirectResponse(f"/c/{slug}#record", status_code=303)

    @app.get("/static/plotly.min.js")
    def plotly() -> FileResponse:
        return FileResponse(plotly_js(), media_type="text/javascript", headers={"cache-control": "max-age=86400"})

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return _plain(404, "no such file.")
        return FileResponse(HERE / "static" / name, media_type=STATIC[name])

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    return app


LIVE_PARTS = ("summary", "table", "record", "log")
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class _NotFound(Exception):
    def __init__(self, slug: str) -> None:
        super().__init__(slug)
        self.slug = slug


__all__ = ["create_app", "parse_result", "plotly_js"]
