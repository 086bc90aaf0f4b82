"""The verbs of a campaign run by hand: init, suggest, record, status, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from supraopt.cli._common import (
    SETTING_HEADERS,
    SETTINGS_LEGEND,
    CampaignDir,
    app,
    compact_table,
    console,
    err_console,
    fmt,
    open_campaign,
    print_legend,
    settings_text,
    user_errors,
)
from supraopt.errors import InputError
from supraopt.records import Failure, Measurement

ContextOption = Annotated[
    list[str] | None,
    typer.Option(
        "--context",
        help="A condition of the run(s), NAME=VALUE (repeatable): a level (chip=B, nc_batch=2024-03) or a "
        "measured number (room_c=23.5). Declare names in campaign.toml \\[context] or just use them.",
    ),
]


def parse_context_options(items: list[str] | None) -> dict[str, str] | None:
    """``["chip=B", "room_c=23.5"]`` -> ``{"chip": "B", "room_c": "23.5"}`` (kinds are checked by the campaign)."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"--context {item!r} must look like NAME=VALUE, e.g. --context chip=B.")
        out[name.strip()] = value.strip()
    return out


def context_text(context: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in context.items())


@app.command()
def init(
    directory: Annotated[str, typer.Argument(help="Folder for the new campaign (created if needed).")],
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
    rig: Annotated[str, typer.Option(help="Rig adapter: simulated, manual, http or module:Class.")] = ("simulated"),
) -> None:
    """Create a campaign folder with its campaign.toml and an empty ledger.

    Several sizes in one campaign: repeat --target-nm (e.g. --target-nm 350 --target-nm 450); one
    model serves them all. Per-target tolerances and repeats go in campaign.toml as [[targets]].
    """
    from supraopt.campaign import Campaign
    from supraopt.paths import check_new_folder
    from supraopt.spec import RigSettings, check_targets

    with user_errors():
        folder = check_new_folder(directory, "campaign folder")
        campaign = Campaign.create(
            folder,
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
    context: ContextOption = None,
) -> None:
    """Propose the next experiment(s), print them and mark them pending in the ledger.

    --context states the conditions they will run under (a new chip, NC batch, the room temperature):
    it is stored with each and stays the campaign's current context for later suggestions.
    """
    with user_errors():
        given = parse_context_options(context)
        with open_campaign(directory) as campaign:
            from supraopt.torchfast import threads_for

            threads_for(len(campaign.ledger.experiments()))
            suggestions = campaign.suggest(n, context=given)
            targets = campaign.spec.targets
            assessment = campaign.last_assessment
    warnings = assessment.messages() if assessment is not None else []
    for line in warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    for line in assessment.notes(campaign.preset.name) if assessment is not None else []:
        err_console.print(f"note: {line}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps([s.to_json() for s in suggestions], indent=2))
        return
    table = compact_table(
        ["id", *SETTING_HEADERS, "aims at", "pred. d", "pred. PDI", "P(feas.)", "P(hit)"],
        "Next experiment(s) for " + "; ".join(t.label() for t in targets),
    )
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
    print_legend(
        SETTINGS_LEGEND,
        "pred. d: predicted SP diameter ± sd, nm · pred. PDI: predicted polydispersity ± sd, %",
        "P(feas.): probability the run gives supraparticles · P(hit): probability it hits the target",
    )
    if suggestions[0].context:
        console.print(f"Context: {context_text(suggestions[0].context)}", highlight=False)
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
    pdi_unit: Annotated[
        str,
        typer.Option(
            "--pdi-unit",
            help="Unit of --pdi: '%' (default; values below the plausible floor, 0.5 %, are refused as "
            "fractions) or 'fraction' (0.05 is stored as 5 %). Not for --csv, whose pdi_pct is percent.",
        ),
    ] = "%",
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Record many results from a CSV or Excel .xlsx file (see README).")
    ] = None,
    sheet: Annotated[
        str | None, typer.Option("--sheet", help="With an .xlsx file: the sheet to read (default: the first).")
    ] = None,
    skip_duplicates: Annotated[
        bool,
        typer.Option("--skip-duplicates", help="With --csv: leave out rows imported before or repeated in the file."),
    ] = False,
    allow_duplicates: Annotated[
        bool, typer.Option("--allow-duplicates", help="With --csv: record rows imported before, or repeated, again.")
    ] = False,
    context: ContextOption = None,
) -> None:
    """Record a measured result (or a failed run) for a suggested experiment, or many from a CSV.

    The run keeps the context it was suggested under; --context sets or corrects entries for this run.

    A CSV import is all or nothing: every row is checked first, then all are written in one
    transaction, so an error or Ctrl-C leaves the ledger unchanged. Rows imported before are refused
    unless --skip-duplicates or --allow-duplicates says what to do with them.
    """
    with user_errors():
        stated = parse_context_options(context)
        if pdi_unit not in ("%", "fraction"):
            raise InputError(f"--pdi-unit {pdi_unit!r} must be '%' or 'fraction'.")
        if csv is not None:
            single = {
                "an experiment id": experiment_id,
                "--diameter-nm": diameter_nm,
                "--pdi": pdi,
                "--n-particles": n_particles,
                "--droplet-um": droplet_um,
                "--failed": failed,
                "--note": note or None,
                "--correct": correct or None,
                "--pdi-unit": None if pdi_unit == "%" else pdi_unit,
                "--context (give context in CSV columns context.NAME)": stated or None,
            }
            given = [name for name, value in single.items() if value is not None]
            if given:
                raise InputError(f"--csv FILE records the results in the file; {', '.join(given)} cannot go with it.")
            if skip_duplicates and allow_duplicates:
                raise InputError("--skip-duplicates and --allow-duplicates exclude each other; pick one.")
            duplicates = "skip" if skip_duplicates else "allow" if allow_duplicates else "refuse"
            report = import_csv(directory, csv, duplicates, sheet)
            left = [f"{len(report.skipped)} row(s) imported before"] if report.skipped else []
            left += [f"{len(report.repeated)} repeated row(s)"] if report.repeated else []
            skipped = f"; left out {' and '.join(left)}" if left else ""
            console.print(f"Recorded {len(report.ids)} result(s) from {csv}{skipped}.", highlight=False)
            return
        if skip_duplicates or allow_duplicates:
            raise InputError("--skip-duplicates and --allow-duplicates go with --csv FILE only.")
        if experiment_id is None:
            raise InputError("give the experiment id (e.g. E001) or --csv FILE.")
        if pdi is not None and pdi_unit == "fraction":
            pdi = pdi * 100.0
        if sheet is not None:
            raise InputError(f"--sheet {sheet!r} needs --csv FILE.xlsx.")
        result = result_from_options(diameter_nm, pdi, n_particles, droplet_um, failed)
        with open_campaign(directory) as campaign:
            campaign.record(experiment_id, result, note=note, correct=correct, context=stated)
            hits = [
                t.label()
                for t in campaign.spec.targets
                if isinstance(result, Measurement) and t.is_hit(result.diameter_nm, result.pdi_pct)
            ]
    verdict = f" — target hit! ({'; '.join(hits)})" if len(campaign.spec.targets) > 1 and hits else ""
    verdict = verdict or (" — target hit!" if hits else "")
    console.print(f"Recorded {experiment_id}{verdict}")


def import_csv(directory: Path, csv: Path, duplicates: str, sheet: str | None = None) -> Any:
    """``record --csv``: one transaction; Ctrl-C or SIGTERM rolls it back and says that nothing was recorded."""
    import signal

    from supraopt.bulk import record_csv

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with open_campaign(directory) as campaign:
            return record_csv(campaign, csv, duplicates, sheet)
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: nothing was recorded from {csv} (an import is all or nothing); run the command again.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def result_from_options(
    diameter_nm: float | None, pdi: float | None, n_particles: int | None, droplet_um: float | None, failed: str | None
) -> Measurement | Failure:
    if failed is not None:
        if failed.strip().startswith("--"):
            raise InputError(
                f"--failed {failed!r} looks like an option, not a reason; give the reason in quotes, "
                'e.g. --failed "droplets unstable".'
            )
        given = {"--diameter-nm": diameter_nm, "--pdi": pdi, "--n-particles": n_particles, "--droplet-um": droplet_um}
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise InputError(
                f"--failed {failed!r} cannot be combined with {', '.join(extra)}: a failed run has no result."
            )
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
    with_context = any(e.context for e in state.experiments)
    table = compact_table(
        ["id", "status", *SETTING_HEADERS, "pred. d", "d", "PDI", "hit"] + (["context"] if with_context else []),
        f"{directory}: {'target' if len(targets) == 1 else 'targets'} {title}",
    )
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
            *([context_text(e.context)] if with_context else []),
        )
    console.print(table)
    print_legend(
        SETTINGS_LEGEND,
        "pred. d: predicted SP diameter, nm · d: measured diameter, nm (or why it failed) · PDI: measured, %",
    )
    counts = ", ".join(f"{v} {k}" for k, v in sorted(state.counts.items())) or "no experiments yet"
    console.print(f"Experiments: {counts}.")
    if len(state.targets) > 1 or (state.targets and state.targets[0].target.confirm):
        for ts, first in zip(state.targets, state.first_hits(), strict=True):
            best = ts.best.measurement if ts.best is not None else None
            where = (
                f"best {ts.best.id} at {best.diameter_nm:.0f} nm, PDI {best.pdi_pct:.1f} %"
                if best and ts.best
                else "no run yet"
            )
            verdict = ts.verdict + (f", first hit {first}" if first else "")
            console.print(f"{ts.target.label()}: {verdict} ({where}).", highlight=False)
    elif state.best is not None and state.best.measurement is not None:
        b = state.best.measurement
        word = "Target hit" if state.hit else "Best so far (target not hit yet)"
        first = state.first_hit
        tail = f" (the closest; the first hit was {first.id})" if first and first.id != state.best.id else ""
        console.print(f"{word}: {state.best.id} at {b.diameter_nm:.0f} nm, PDI {b.pdi_pct:.1f} %{tail}.")
    if state.context:
        console.print(f"Current context (next experiments): {context_text(state.context)}.", highlight=False)


@app.command()
def export(
    directory: CampaignDir,
    csv: Annotated[str, typer.Option("--csv", help="Output CSV file: a new name, or an existing CSV with --force.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing CSV file at --csv.")] = False,
) -> None:
    """Export the ledger (settings, predictions, results) to a CSV file (written atomically).

    Never writes over the campaign's own files (campaign.toml, the ledger, run.log, ...), a folder,
    a link or a device; an existing CSV is replaced only with --force.
    """
    from supraopt.paths import check_new_file

    with user_errors(), open_campaign(directory) as campaign:
        path = check_new_file(csv, "--csv", protected=owned_files(campaign), force=force)
        campaign.ledger.export_csv(path)
    console.print(f"Wrote {csv}.", highlight=False)


def owned_files(campaign: Any) -> list[Path]:
    """Files a campaign owns: everything in its folder but CSV files, its ledger (and side files), its preset."""
    from supraopt.paths import ledger_files
    from supraopt.spec import resolve_model

    owned = [p for p in campaign.directory.rglob("*") if p.suffix.lower() != ".csv"]
    owned += [*ledger_files(campaign.directory / "ledger.sqlite"), campaign.directory / "run.log"]
    url = campaign.spec.ledger_url
    if url and url.startswith("sqlite:///"):
        owned += ledger_files(Path(url.removeprefix("sqlite:///")))
    model = Path(resolve_model(campaign.spec.model, campaign.directory))
    if model.suffix == ".toml":
        owned.append(model)
    return owned
