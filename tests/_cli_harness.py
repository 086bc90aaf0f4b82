"""Run the real console entry point (``supraopt.cli.main``) in-process and judge the outcome.

Shared by the CLI fuzz (test_fuzz_cli.py) and the regression tests of issue 9 (test_refusals.py):
a refusal is one ``error:`` line on stderr and a non-zero exit, never a traceback; the ledger is
unchanged by any refusal; ``export`` never alters the campaign's files.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import typer

from supraopt.cli import _common, main

COMMAND = typer.main.get_command(_common.app)
"""The click command typer builds from the app on every call, built once (``main`` calls it the same way)."""

SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    crash: str | None
    """The traceback of an exception that escaped ``main`` (a bug), else None."""

    @property
    def refused(self) -> bool:
        return self.code != 0

    def problems(self) -> list[str]:
        """What breaks the contract for a refusal (empty when the run was clean)."""
        found = []
        if self.crash is not None:
            found.append(f"crash:\n{self.crash}")
        if "Traceback" in self.out + self.err:
            found.append("a traceback was printed")
        if self.refused and self.crash is None:
            lines = [line for line in self.err.splitlines() if line.strip()]
            if len(lines) != 1 or not lines[0].startswith("error:"):
                found.append(f"stderr is not one 'error:' line: {self.err!r}")
        return found


def cli(*args: object) -> Outcome:
    """``supraopt ARGS`` through the console entry point, in this process."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["supraopt", *(str(a) for a in args)]
    code, crash = 0, None
    app, _common.app = _common.app, COMMAND  # type: ignore[assignment]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        crash, code = traceback.format_exc(), -1
    finally:
        sys.argv, _common.app = argv, app
    return Outcome(code, out.getvalue(), err.getvalue(), crash)


def ledger_snapshot(directory: Path) -> str:
    """The ledger's content (an SQL dump), or a hash of the raw bytes when it is not a readable database."""
    database = directory / "ledger.sqlite"
    if not database.is_file():
        return "absent"
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return "\n".join(connection.iterdump())
        finally:
            connection.close()
    except sqlite3.Error:
        return "bytes:" + hashlib.sha256(database.read_bytes()).hexdigest()


def files_snapshot(directory: Path) -> dict[str, str]:
    """Hash of every file the campaign owns except the ledger (compared by content, see ledger_snapshot)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.name.startswith("ledger.sqlite"):
            continue
        out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
