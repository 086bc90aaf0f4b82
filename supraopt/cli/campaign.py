"""The verbs of a campaign run by hand: init, suggest, record, status, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from supraopt.cli._common import (
    SETTING_HEADERS,
    CampaignDir,
    app,
    console,
    err_console,
    fmt,
    open_campaign,
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
    target_nm: Annotated[
        list[float] | None,
        typer.Option("--target-nm", help="Wanted mean supraparticle diameter, nm; repeat it for several sizes."),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Relative size tolerance (0.03 = ±3 %).")] = 0.03,
    pdi_max: Annotated[float, typer.Option("--pdi-max", help="Polydispersity ceiling, % (CV of diameter).")] = 6.0,
    confirm: Annotated[
        int, typer.Option(help="Repeats of a hitting recipe before a target counts as confirmed (0: one hit).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed: the same ledger and seed give the same suggestions.")] = 0,
    rig: Annotated[str, typer.Option(help="Rig adapter: simulated, manual, http or package.module:Class.")] = (
        "simulated"
    ),
) -> None:
    """Create a campaign folder with its campaign.toml and an empty ledger.

    Several sizes in one campaign: repeat --target-nm (e.g. --target-nm 350 --target-nm 450); one
    model serves them all. Per-target tolerances and repeats go in campaign.toml as [[targets]].
    """
    from supraopt.campaign import Campaign
    from supraopt.spec import RigSettings, check_targets

    with user_errors():
        campaign = Campaign.create(
            directory,
            model,
            target_nm or [450.0],
            tolerance=tolerance,
            pdi_max_pct=pdi_max,
            confirm=confirm,
            seed=seed,
            rig=RigSettings(rig),
        )
        campaign.close()
    for warning in check_targets(campaign.spec.targets):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    labels = "; ".join(t.label() for t in campaign.spec.targets)
    word = "target" if len(campaign.spec.targets) == 1 else "targets"
    console.print(
        f"Created campaign [bold]{directory}[/] ({model}): {word} {labels}. Next: supraopt suggest {directory}"
    )


@app.command()
def suggest(
    directory: CampaignDir,
    n: Annotated[int, typer.Option("-n", "--n", help="How many experiments to propose (a batch).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """Propose the next experiment(s), print them and mark them pending in the ledger."""
    with user_errors(), open_campaign(directory) as campaign:
        suggestions = campaign.suggest(n)
        targets = campaign.spec.targets
        assessment = campaign.last_assessment
    warnings = assessment.messages() if assessment is not None else []
    for line in warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps([s.to_json() for s in suggestions], indent=2))
        return
    title = "; ".join(t.label() for t in targets)
    table = Table(title=f"Next experiment(s) for {title}")
    for header in ["id", *SETTING_HEADERS, "aims at", "predicted d (nm)", "PDI (%)", "P(feasible)", "P(hit)"]:
        table.add_column(header, justify="right")
    for s in suggestions:
        p = s.prediction
        aim = f"{p.get('target_nm', targets[0].diameter_nm):g} nm" + (" (repeat)" if p.get("repeat") else "")
        table.add_row(
            s.experiment_id,
            *settings_text(s.settings),
            aim,
            f"{p['diameter_nm']:.0f} ± {p['diameter_sd_nm']:.0f}",
            f"{p['pdi_pct']:.1f} ± {p['pdi_sd_pct']:.1f}",
            f"{p['p_feasible']:.2f}",
            f"{p['p_hit']:.2f}",
        )
    console.print(table)
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
    csv: Annotated[Path | None, typer.Option("--csv", help="Record many results from a CSV file (see README).")] = None,
) -> None:
    """Record a measured result (or a failed run) for a suggested experiment, or many from a CSV."""
    with user_errors():
        if csv is not None:
            if experiment_id is not None or diameter_nm is not None or failed is not None:
                raise InputError("give either --csv FILE or one experiment id with its result, not both.")
            from supraopt.bulk import record_csv

            with open_campaign(directory) as campaign:
                ids = record_csv(campaign, csv)
            console.print(f"Recorded {len(ids)} result(s) from {csv}.")
            return
        if experiment_id is None:
            raise InputError("give the experiment id (e.g. E001) or --csv FILE.")
        result = result_from_options(diameter_nm, pdi, n_particles, droplet_um, failed)
        with open_campaign(directory) as campaign:
            campaign.record(experiment_id, result, note=note, correct=correct)
            hits = [
                t.label()
                for t in campaign.spec.targets
                if isinstance(result, Measurement) and t.is_hit(result.diameter_nm, result.pdi_pct)
            ]
    verdict = f" — target hit! ({'; '.join(hits)})" if len(campaign.spec.targets) > 1 and hits else ""
    verdict = verdict or (" — target hit!" if hits else "")
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
    targets = [s.target for s in state.targets] or [t]
    title = "; ".join(x.label() for x in targets)
    table = Table(title=f"{directory}: {'target' if len(targets) == 1 else 'targets'} {title}")
    for header in ["id", "status", *SETTING_HEADERS, "predicted d (nm)", "measured d (nm)", "PDI (%)", "hit"]:
        table.add_column(header, justify="right")
    for e in state.experiments:
        m = e.measurement
        measured = fmt(m.diameter_nm, 0) if m else (e.failure.reason if e.failure else "")
        hit_sizes = [f"{x.diameter_nm:g}" for x in targets if m and x.is_hit(m.diameter_nm, m.pdi_pct)]
        hit = ("✔" if len(targets) == 1 else "✔ " + ", ".join(hit_sizes)) if hit_sizes else ""
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
    counts = ", ".join(f"{v} {k}" for k, v in sorted(state.counts.items())) or "no experiments yet"
    console.print(f"Experiments: {counts}.")
    if len(state.targets) > 1 or (state.targets and state.targets[0].target.confirm):
        for ts in state.targets:
            best = ts.best.measurement if ts.best is not None else None
            where = (
                f"best {ts.best.id} at {best.diameter_nm:.0f} nm, PDI {best.pdi_pct:.1f} %"
                if best and ts.best
                else "no run yet"
            )
            console.print(f"{ts.target.label()}: {ts.verdict} ({where}).", highlight=False)
    elif state.best is not None and state.best.measurement is not None:
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
