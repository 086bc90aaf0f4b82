"""``supraopt rig serve``: the rig-PC end of the 'http' adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from supraopt.cli._common import app, console, user_errors

rig_app = typer.Typer(help="Serve a rig adapter over HTTP: the rig-PC end of the 'http' adapter.", no_args_is_help=True)
app.add_typer(rig_app, name="rig")


@rig_app.command("serve")
def rig_serve(
    adapter: Annotated[str, typer.Option(help="Adapter to serve: simulated, manual or module:Class.")] = "simulated",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Adapter option key=value (repeat), e.g. -o duration_s=60."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network (a warning is printed).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8765,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the token, the adapter's runs and the ids (default ~/.local/state/supraopt/rig-server)."
        ),
    ] = None,
) -> None:
    """Serve a rig adapter (the simulated twin by default) over the JSON/HTTP API, with a bearer token."""
    from supraopt.rigs import server

    def echo(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        console.file.flush()

    with user_errors():
        options = server.parse_options(option or [])
        server.serve(adapter, options, host=host, port=port, state_dir=state_dir, echo=echo)
