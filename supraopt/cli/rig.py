"""``supraopt rig serve``: the rig-PC end of the 'http' adapter (or, with --protocol sila2, of the 'sila2' one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from supraopt.cli._common import app, console, user_errors
from supraopt.errors import InputError

rig_app = typer.Typer(
    help="Serve a rig adapter over HTTP (or SiLA 2): the rig-PC end of the 'http' (or 'sila2') adapter.",
    no_args_is_help=True,
)
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
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="TCP port (default 8765 for http, 50052 for sila2).")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the token, the adapter's runs and the ids (default ~/.local/state/supraopt/rig-server)."
        ),
    ] = None,
    protocol: Annotated[
        Literal["http", "sila2"],
        typer.Option(
            help="http: supraopt's JSON API with a bearer token; sila2: a SiLA 2 server with TLS (needs the sila2 extra)."
        ),
    ] = "http",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="sila2 only: plain gRPC without TLS; allowed on 127.0.0.1 only.")
    ] = False,
    discovery: Annotated[
        bool, typer.Option("--discovery", help="sila2 only: announce the server by SiLA Server Discovery (mDNS).")
    ] = False,
) -> None:
    """Serve a rig adapter (the simulated twin by default) over the JSON/HTTP API with a bearer token, or over SiLA 2 with TLS."""
    from supraopt.rigs import server

    def echo(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        console.file.flush()

    with user_errors():
        options = server.parse_options(option or [])
        if protocol == "sila2":
            from supraopt.rigs.sila2 import server as sila2_server

            port = sila2_server.DEFAULT_PORT if port is None else port
            sila2_server.serve(
                adapter,
                options,
                host=host,
                port=port,
                state_dir=state_dir,
                insecure=insecure,
                discovery=discovery,
                echo=echo,
            )
            return
        if insecure or discovery:
            raise InputError(f"{'--insecure' if insecure else '--discovery'} is for --protocol sila2 only.")
        port = server.DEFAULT_PORT if port is None else port
        server.serve(adapter, options, host=host, port=port, state_dir=state_dir, echo=echo)
