"""Targets of a campaign: ``supraopt target add`` (a new size for a running campaign) and ``supraopt recipe``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from supraopt.cli._common import CampaignDir, app, console, fmt, open_campaign, settings_text, user_errors

target_app = typer.Typer(help="Change the targets of a campaign.", no_args_is_help=True)
app.add_typer(target_app, name="target")


@target_app.command("add")
def add(
    directory: CampaignDir,
    diameter_nm: Annotated[float, typer.Argument(help="Wanted mean supraparticle diameter, nm.")],
    tolerance: Annotated[float, typer.Option(help="Relative size tolerance (0.03 = ±3 %).")] = 0.03,
    pdi_max: Annotated[float, typer.Option("--pdi-max", help="Polydispersity ceiling, % (CV of diameter).")] = 6.0,
    confirm: Annotated[int, typer.Option(help="Repeats of the hitting recipe before it counts as confirmed.")] = 0,
) -> None:
    """Add a target size to a campaign, also while 'supraopt run' drives it (it picks the new target up).

    Example: supraopt target add campaigns/ladder 650 --pdi-max 6
    """
    from supraopt.spec import Target

    with user_errors(), open_campaign(directory) as campaign:
        target = Target(diameter_nm, tolerance, pdi_max, confirm)
        warnings = campaign.add_target(target)
        count = len(campaign.spec.targets)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"Added target {target.label()} to {directory} ({count} targets).", highlight=False)


@app.command()
def recipe(
    directory: CampaignDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The recipe card of every target: settings, predicted size and PDI of a repeat, P(a repeat hits),
    and the runs that back it. Before a hit, the setting most likely to hit is shown instead."""
    from rich.table import Table

    with user_errors(), open_campaign(directory) as campaign:
        cards = campaign.recipes()
    if as_json:
        print(json.dumps([c.to_json() for c in cards], indent=2))
        return
    table = Table(title=f"{directory}: recipes")
    headers = ["target", "status", "c (mg/mL)", "Q_c/Q_d", "T (°C)", "repeat d (nm)", "PDI (%)", "P(repeat hits)"]
    for header in [*headers, "backed by"]:
        table.add_column(header, justify="right")
    for c in cards:
        recipe_ = c.state.recipe
        backing = "-" if recipe_ is None else f"{', '.join(recipe_.runs)} ({recipe_.hits} hit, {recipe_.misses} miss)"
        status = c.state.verdict + ("" if recipe_ is not None else " (best guess)")
        table.add_row(
            c.target.label(),
            status,
            *(settings_text(c.settings) if c.settings else ["-"] * 3),
            "-" if c.diameter_nm is None else f"{c.diameter_nm:.0f} ± {c.diameter_sd_nm or 0:.0f}",
            "-" if c.pdi_pct is None else f"{c.pdi_pct:.1f} ± {c.pdi_sd_pct or 0:.1f}",
            fmt(c.p_hit, 2),
            backing,
        )
    console.print(table)
