"""``supraopt dashboard``: campaigns in a browser, live, with forms for the manual rig."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from supraopt.cli._common import app, console, user_errors


@app.command()
def dashboard(
    directories: Annotated[
        list[Path] | None,
        typer.Argument(metavar="DIR", help="Campaign folder(s) to show (each holds campaign.toml and the ledger)."),
    ] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8050,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on. Anything but 127.0.0.1/localhost/::1 requires the access token."),
    ] = "127.0.0.1",
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Only watch: no forms to record results or suggest.")
    ] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the access token (default ~/.local/state/supraopt/dashboard)."),
    ] = None,
    ledger_url: Annotated[
        list[str] | None,
        typer.Option(
            "--ledger-url",
            metavar="URL",
            help="A campaign shared through its ledger (e.g. postgresql+psycopg://user@host/db), without its "
            "folder; repeatable.",
        ),
    ] = None,
) -> None:
    """Watch campaigns in a browser: overview, experiments, plots, model maps, run.log, live updates.

    Open http://127.0.0.1:PORT/ (8050 by default). For a manual rig, each open experiment has a form
    to record its result or failure, checked like 'supraopt record'. On another --host (e.g. 0.0.0.0)
    every request needs the token from SUPRAOPT_DASHBOARD_TOKEN or the state folder (printed at start).

    --ledger-url URL watches a campaign from its database alone (e.g. at your desk, away from the rig
    PC): a campaign whose campaign.toml names a ledger_url keeps a copy of its spec there.
    """
    from supraopt import dashboard as board

    def echo(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        console.file.flush()

    with user_errors():
        board.serve(
            directories or [],
            host=host,
            port=port,
            read_only=read_only,
            state_dir=state_dir,
            echo=echo,
            ledger_urls=ledger_url,
        )
