"""What every verb shares: the typer app, the consoles, one-line user errors and number formatting."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from supraopt.errors import SupraoptError

app = typer.Typer(
    help="Physics-informed Bayesian optimisation of microfluidic supraparticle synthesis.\n\n"
    "Typical use: 'supraopt init DIR ...', then repeat 'supraopt suggest DIR' and 'supraopt record DIR ID ...'; "
    "or let 'supraopt run DIR' drive a rig by itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """stdout was closed (``| head``): print nothing more, and let the caller decide (Rich would exit)."""
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise BrokenPipeError("stdout was closed")


console = _Console()
err_console = Console(stderr=True)

CampaignDir = Annotated[Path, typer.Argument(help="Campaign folder (holds campaign.toml and the ledger).")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn supraopt's own errors into one line on stderr and exit code 1."""
    try:
        yield
    except SupraoptError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except OSError as error:  # a file system refusal not foreseen by a check: still one line, no traceback
        where = f": {error.filename}" if error.filename else ""
        message = f"{error.strerror or error}{where}"
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def open_campaign(directory: Path) -> Any:
    from supraopt.campaign import Campaign  # imported lazily: torch takes a second to load

    return Campaign.open(directory)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def settings_text(settings: dict[str, float]) -> list[str]:
    return [
        fmt(settings.get("concentration_mg_ml"), 3),
        fmt(settings.get("flow_ratio"), 2),
        fmt(settings.get("temperature_c"), 1),
    ]


SETTING_HEADERS = ["c", "r", "T"]
SETTINGS_LEGEND = "c: NC concentration, mg/mL · r: flow-rate ratio Q_c/Q_d · T: temperature, °C"


def compact_table(headers: list[str], title: str = "") -> Any:
    """A table whose header names stay whole in an 80-column terminal: short names, units in a legend
    printed under it (:func:`print_legend`)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True)
    for header in headers:
        table.add_column(header, justify="right", no_wrap=header == headers[0], min_width=len(header))
    return table


def print_legend(*lines: str) -> None:
    """What a table's short column names mean, under the table, wrapped at the terminal's width."""
    for line in lines:
        console.print(line, style="dim", highlight=False)


def main() -> None:
    """Console entry point: like ``app()``, but a usage error (e.g. ``--pdi abc``) is one line too."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer ships its own click

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as error:
        print(error.ctx.get_help() if error.ctx else "")
        code = 0
    except ClickException as error:
        err_console.print(
            f"[bold red]error:[/] {escape(error.format_message())} (see --help)", highlight=False, soft_wrap=True
        )
        code = error.exit_code
    except typer.Abort:
        err_console.print("aborted.")
        code = 130
    except BrokenPipeError:  # 'supraopt status DIR | head -1': the reader has all it wanted
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
