"""``supraopt dashboard``: watch campaigns from a browser, and record the manual rig's results there.

:mod:`~supraopt.dashboard.data` reads campaign folders (no torch), :mod:`~supraopt.dashboard.figures`
builds Plotly figures as JSON, :mod:`~supraopt.dashboard.app` is the FastAPI app (Jinja2 templates in
``templates/``, script and stylesheet in ``static/``; plotly.min.js comes from the plotly package, so the
dashboard works offline). :func:`serve` runs it with uvicorn.

Security: it listens on 127.0.0.1 unless told otherwise; any other address needs the access token
(``SUPRAOPT_DASHBOARD_TOKEN``, else the ``token`` file of the state folder, else generated there once,
mode 0600, and printed). Forms carry a CSRF token and are refused from another origin; ``read_only``
removes them.
"""

from __future__ import annotations

import importlib
import os
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from supraopt.errors import InputError

TOKEN_ENV = "SUPRAOPT_DASHBOARD_TOKEN"
TOKEN_FILE = "token"
MIN_TOKEN_LENGTH = 16
DEFAULT_PORT = 8050
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/supraopt/dashboard`` (``~/.local/state/...``): where the token is kept."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "supraopt" / "dashboard"


def load_token(state_dir: Path) -> tuple[str, str]:
    """The access token and where it came from: ``"env"``, ``"file"`` or ``"new"`` (just generated and saved)."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        _check_token(from_env, TOKEN_ENV)
        return from_env, "env"
    path = state_dir / TOKEN_FILE
    if not path.exists():
        token = secrets.token_urlsafe(32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another dashboard started at the same moment: use its token
            pass
        except OSError as error:
            raise InputError(f"cannot save the access token in {path} ({error.strerror}); set {TOKEN_ENV}.") from None
        else:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(token + "\n")
            return token, "new"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise InputError(f"cannot read the token file {path} ({error.strerror}); fix or delete it.") from None
    _check_token(token, str(path))
    return token, "file"


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH:
        raise InputError(
            f"the dashboard token in {where} is too short: use at least {MIN_TOKEN_LENGTH} random characters."
        )
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token) or "&" in token:
        raise InputError(f"the dashboard token in {where} must be one word of printable ASCII characters, without '&'.")


def serve(
    directories: list[Path],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    read_only: bool = False,
    state_dir: Path | None = None,
    echo: Callable[[str], None] = print,
    ledger_urls: list[str] | None = None,
) -> None:
    """Open the campaigns (folders, and ledgers by URL), print where to look, and serve until Ctrl-C."""
    import uvicorn

    from supraopt.dashboard.app import create_app
    from supraopt.dashboard.data import Board

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"port={port!r} must be an integer between 0 and 65535.")
    token: str | None = None
    source = ""
    if host not in LOOPBACK:
        directory = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
        token, source = load_token(directory)
    board = Board(directories, ledger_urls)
    try:
        sock = _bind(host, port)
        # load torch in the background: the pages need none, the first form or map then needs no wait
        threading.Thread(target=importlib.import_module, args=("supraopt.campaign",), daemon=True).start()
        app = create_app(board, read_only=read_only, token=token)
        port = sock.getsockname()[1]
        where = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        names = ", ".join(w.name for w in board.campaigns.values())
        mode = " (read-only)" if read_only else ""
        echo(f"Dashboard of {names}{mode} on {where}")
        if token is not None:
            if source == "new":
                echo(f"New access token, saved in {directory / TOKEN_FILE} and shown only this once.")
            else:
                echo(f"Access token: the one in {TOKEN_ENV if source == 'env' else directory / TOKEN_FILE}.")
            echo(f"Open {where}?token={token if source == 'new' else 'TOKEN'} (the token is then kept in a cookie).")
            echo(
                f"warning: listening on {host}, not only on this machine: anyone who can reach port {port} can try "
                "the token, and plain HTTP carries it unencrypted; use a firewall, or a TLS proxy in front."
            )
        server = uvicorn.Server(uvicorn.Config(app, ws="none", log_level="warning"))
        server.run(sockets=[sock])
    finally:
        board.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (port taken, unknown address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        reason = error.strerror or str(error)
        raise InputError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host.") from None
    return sock


__all__ = ["DEFAULT_PORT", "TOKEN_ENV", "default_state_dir", "load_token", "serve"]
