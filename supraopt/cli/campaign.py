"""The verbs of a campaign run by hand: init, suggest, record, status, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from supraopt.cli._common import (
    SETTING_HEADERS,
    SETTINGS_LEGEND,
    CampaignDir,
    app,
    compact_table,
    console,
    fmt,
    open_campaign,
    print_legend,
    settings_text,
    user_errors,
)
from supraopt.errors import InputError
from supraopt.records import Failure, Measurement


@app.command()
def init(
    directory: CampaignDir,
    model: Annotated[str, typer.Option(help="Physics preset: a name in models/ or a path to a preset .toml.")] = (
        "cspbbr3-flow-focusing"
    ),
    target_nm: Annotated[float, typer.Option("--target-nm", help="Wanted mean supraparticle diameter, nm.")] = 450.0,
    tolerance: Annotated[float, typer.Option(help="Relative size tolerance (0.03 = ±3 %).")] = 0.03,
    pdi_max: Annotated[float, typer.Option("--pdi-max", help="Polydispersity ceiling, % (CV of diameter).")] = 6.0,
    seed: Annotated[int, typer.Option(help="Seed: the same ledger and seed give the same suggestions.")] = 0,
    rig: Annotated[str, typer.Option(help="Rig adapter: simulated, manual, http or module:Class.")] = ("simulated"),
) -> None:
    """Create a campaign folder with its campaign.toml and an empty ledger."""
    from supraopt.campaign import Campaign
    from supraopt.spec import RigSettings

    with user_errors():
        campaign = Campaign.create(
            directory, model, target_nm, tolerance=tolerance, pdi_max_pct=pdi_max, seed=seed, rig=RigSettings(rig)
        )
        campaign.close()
    t = campaign.spec.target
    console.print(
        f"Created campaign [bold]{directory}[/] ({model}): target {t.diameter_nm:g} nm ± {t.tolerance:.0%}, "
        f"PDI ≤ {t.pdi_max_pct:g} %. Next: supraopt suggest {directory}"
    )


@app.command()
def suggest(
    directory: CampaignDir,
    n: Annotated[int, typer.Option("-n", "--n", help="How many experiments to propose (a batch).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """Propose the next experiment(s), print them and mark them pending in the ledger."""
    with user_errors(), open_campaign(directory) as campaign:
        from supraopt.torchfast import threads_for

        threads_for(len(campaign.ledger.experiments()))
        suggestions = campaign.suggest(n)
        target = campaign.spec.target
    if as_json:
        print(json.dumps([s.to_json() for s in suggestions], indent=2))
        return
    table = compact_table(
        ["id", *SETTING_HEADERS, "pred. d", "pred. PDI", "P(feas.)", "P(hit)"],
        f"Next experiment(s) for {target.diameter_nm:g} nm ± {target.tolerance:.0%}, PDI ≤ {target.pdi_max_pct:g} %",
    )
    for s in suggestions:
        p = s.prediction
        table.add_row(
            s.experiment_id,
            *settings_text(s.settings),
            f"{p['diameter_nm']:.0f} ± {p['diameter_sd_nm']:.0f}",
            f"{p['pdi_pct']:.1f} ± {p['pdi_sd_pct']:.1f}",
            f"{p['p_feasible']:.2f}",
            f"{p['p_hit']:.2f}",
        )
    console.print(table)
    print_legend(
        SETTINGS_LEGEND,
        "pred. d: predicted SP diameter ± sd, nm · pred. PDI: predicted polydispersity ± sd, %",
        "P(feas.): probability the run gives supraparticles · P(hit): probability it hits the target",
    )
    first = suggestions[0].experiment_id
    console.print(f"When measured: supraopt record {directory} {first} --diameter-nm X --pdi Y --n-particles N")


@app.command()
def record(
    directory: CampaignDir,
    experiment_id: Annotated[str | None, typer.Argument(help="Experiment id printed by suggest, e.g. E001.")] = None,
    diameter_nm: Annotated[float | None, typer.Option("--diameter-nm", help="Measured mean SP diameter, nm.")] = None,
    pdi: Annotated[float | None, typer.Option("--pdi", help="Measured polydispersity (CV of diameter), %.")] = None,
    n_particles: Annotated[int | None, typer.Option("--n-particles", help="Number of particles sized.")] = None,
    droplet_um: Annotated[float | None, typer.Option("--droplet-um", help="Measured droplet diameter, µm.")] = None,
    failed: Annotated[
        str | None, typer.Option("--failed", help='The chemistry failed: give the reason, e.g. "hollow".')
    ] = None,
    correct: Annotated[
        bool, typer.Option("--correct", help="Replace an already recorded result (kept in history).")
    ] = False,
    note: Annotated[str, typer.Option(help="Free-text note stored with the result.")] = "",
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Record many results from a CSV or Excel .xlsx file (see README).")
    ] = None,
    sheet: Annotated[
        str | None, typer.Option("--sheet", help="With an .xlsx file: the sheet to read (default: the first).")
    ] = None,
) -> None:
    """Record a measured result (or a failed run) for a suggested experiment, or many from a CSV."""
    with user_errors():
        if csv is not None:
            if experiment_id is not None or diameter_nm is not None or failed is not None:
                raise InputError("give either --csv FILE or one experiment id with its result, not both.")
            from supraopt.bulk import record_csv

            with open_campaign(directory) as campaign:
                ids = record_csv(campaign, csv, sheet)
            console.print(f"Recorded {len(ids)} result(s) from {csv}.")
            return
        if experiment_id is None:
            raise InputError("give the experiment id (e.g. E001) or --csv FILE.")
        if sheet is not None:
            raise InputError(f"--sheet {sheet!r} needs --csv FILE.xlsx.")
        result = result_from_options(diameter_nm, pdi, n_particles, droplet_um, failed)
        with open_campaign(directory) as campaign:
            campaign.record(experiment_id, result, note=note, correct=correct)
            hit = isinstance(result, Measurement) and campaign.spec.target.is_hit(result.diameter_nm, result.pdi_pct)
    verdict = " — target hit!" if hit else ""
    console.print(f"Recorded {experiment_id}{verdict}")


def result_from_options(
    diameter_nm: float | None, pdi: float | None, n_particles: int | None, droplet_um: float | None, failed: str | None
) -> Measurement | Failure:
    if failed is not None:
        if diameter_nm is not None or pdi is not None:
            raise InputError(f"--failed {failed!r} cannot be combined with --diameter-nm/--pdi.")
        return Failure(failed)
    if diameter_nm is None or pdi is None:
        raise InputError("give both --diameter-nm and --pdi, or --failed REASON.")
    return Measurement(diameter_nm=diameter_nm, pdi_pct=pdi, n_particles=n_particles, droplet_um=droplet_um)


@app.command()
def status(
    directory: CampaignDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show the campaign's history, the best run and whether the target was hit."""
    with user_errors(), open_campaign(directory) as campaign:
        state = campaign.status()
    if as_json:
        print(json.dumps(state.to_json(), indent=2, default=str))
        return
    t = state.target
    table = compact_table(
        ["id", "status", *SETTING_HEADERS, "pred. d", "d", "PDI", "hit"],
        f"{directory}: target {t.diameter_nm:g} nm ± {t.tolerance:.0%}, PDI ≤ {t.pdi_max_pct:g} %",
    )
    for e in state.experiments:
        m = e.measurement
        measured = fmt(m.diameter_nm, 0) if m else (e.failure.reason if e.failure else "")
        hit = "✔" if m and t.is_hit(m.diameter_nm, m.pdi_pct) else ""
        table.add_row(
            e.id,
            str(e.status),
            *settings_text(e.settings),
            fmt(e.prediction.get("diameter_nm"), 0),
            measured,
            fmt(m.pdi_pct) if m else "",
            hit,
        )
    console.print(table)
    print_legend(
        SETTINGS_LEGEND,
        "pred. d: predicted SP diameter, nm · d: measured diameter, nm (or why it failed) · PDI: measured, %",
    )
    counts = ", ".join(f"{v} {k}" for k, v in sorted(state.counts.items())) or "no experiments yet"
    console.print(f"Experiments: {counts}.")
    if state.best is not None and state.best.measurement is not None:
        b = state.best.measurement
        word = "Target hit" if state.hit else "Best so far (target not hit yet)"
        console.print(f"{word}: {state.best.id} at {b.diameter_nm:.0f} nm, PDI {b.pdi_pct:.1f} %.")


@app.command()
def export(
    directory: CampaignDir,
    csv: Annotated[Path, typer.Option("--csv", help="Output CSV file.")],
) -> None:
    """Export the ledger (settings, predictions, results) to a CSV file."""
    with user_errors(), open_campaign(directory) as campaign:
        campaign.ledger.export_csv(csv)
    console.print(f"Wrote {csv}.")
