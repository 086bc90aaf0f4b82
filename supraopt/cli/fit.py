"""Learning from past runs and looking at models: ``supraopt fit`` and ``supraopt plot``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from supraopt.cli._common import CampaignDir, app, console, open_campaign, print_legend, user_errors
from supraopt.errors import InputError

if TYPE_CHECKING:
    from rich.table import Table

MAP_HELP = (
    "FIELD=COLUMN, repeatable: the column holding a field when its header is not recognised, e.g. "
    "--map diameter='SP size'. Fields: concentration, flow_ratio (or q_continuous and q_dispersed), temperature, "
    "diameter, pdi, n_particles, droplet, failed, capillary_number, orifice_width, aspect_ratio. "
    "FIELD= (empty) ignores a column picked automatically."
)
CONTEXT_HELP = (
    "COLUMN or COLUMN:category (or COLUMN:number), repeatable: use a column that is not one of the fields as a "
    "condition of the runs. A category (chip, NC batch, regime...) gets one offset per level on the physics "
    "parameter it moves (droplet prefactor; SP packing), shrunk towards the others; a number (expansion ratio, "
    "room temperature...) becomes an input of the GP, and a power-law term where the physics names it. "
    "Text columns are categories, numbers numbers, unless ':category' says otherwise."
)
UNIT_HELP = (
    "FIELD=UNIT, repeatable, where the header does not say it (e.g. 'T (K)' does): concentration=mg/mL|vol%|fraction "
    "(volume fractions use the preset's NC density), flow_ratio=Qc/Qd|Qd/Qc, temperature=C|K, diameter=nm|um, "
    "pdi=%|fraction|dls, droplet=um|nm|mm|d/w, orifice_width=um|mm, q_continuous=uL/min|mL/h|..."
)


def frame_table(frame: Any, title: str, index: str | None = None) -> Table:
    """A pandas DataFrame as a rich table, numbers to three significant digits.

    Header names and the index (parameter or model names) are never cut: in a narrow terminal the
    other cells wrap instead.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    if index:
        width = max([len(index), *(len(str(key)) for key in frame.index)])
        table.add_column(index, no_wrap=True, min_width=width)
    for column in [str(c) for c in frame.columns]:
        table.add_column(column, justify="right", overflow="fold", min_width=max(len(w) for w in column.split()))
    for key, row in frame.iterrows():
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
        table.add_row(*([escape(str(key))] if index else []), *map(escape, cells))  # log_droplet_k[chip=A]
    return table


def short_cv_name(column: object) -> str:
    """'SP diameter 90% coverage' -> 'SP d cov90': cross-validation headers that fit 80 columns."""
    return str(column).replace("diameter", "d").replace("90% coverage", "cov90")


@app.command("fit")
def fit_command(
    data: Annotated[Path, typer.Argument(help="Past runs: a CSV, Parquet or Excel .xlsx file, one run per row.")],
    sheet: Annotated[
        str | None, typer.Option("--sheet", help="With an .xlsx file: the sheet to read (default: the first).")
    ] = None,
    model: Annotated[str, typer.Option(help="Physics preset whose constants and priors the fit starts from.")] = (
        "cspbbr3-flow-focusing"
    ),
    map_: Annotated[list[str] | None, typer.Option("--map", help=MAP_HELP)] = None,
    unit: Annotated[list[str] | None, typer.Option("--unit", help=UNIT_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for tables and plots (default: ./<DATA name>-fit).")] = None,
    context: Annotated[list[str] | None, typer.Option("--context", help=CONTEXT_HELP)] = None,
    folds: Annotated[int, typer.Option(help="k of the k-fold cross-validation; 0 skips it.")] = 5,
    train_rows: Annotated[
        int | None,
        typer.Option(
            "--train-rows",
            help="Small-data benchmark: fit on this many random runs and predict all the others (MAPE and 90 % "
            "interval coverage of the held-out runs, median over --draws). Replaces the k-fold CV.",
        ),
    ] = None,
    draws: Annotated[int, typer.Option(help="Repeats of the --train-rows fit, each on other random runs.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the split into folds and of the --train-rows draws.")] = 0,
    draw: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots into --out.")] = True,
    into: Annotated[
        Path | None,
        typer.Option(
            help="Create a new campaign in this folder whose preset (DIR/prior.toml) carries the fitted priors. "
            "The past runs live on in that prior; they are not copied into the new ledger (that would count them twice)."
        ),
    ] = None,
    target_nm: Annotated[
        float | None, typer.Option("--target-nm", help="Target SP diameter of the --into campaign, nm.")
    ] = None,
) -> None:
    """Learn from past runs: fit the physics parameters, and compare physics only, GP only and physics + GP.

    Columns are found from their headers ('c (mg/mL)', 'phi_i (%)', 'Qc/Qd', 'T (K)', 'SP size (µm)', 'CV (%)',
    'droplet_size', 'capillary_number', ...); name the others with --map and give units with --unit.
    """
    from rich.table import Table

    with user_errors():
        from supraopt import plots
        from supraopt.fit import (
            check_into,
            check_new_campaign_dir,
            fit_runs,
            seed_campaign,
            transfer_summary,
            write_tables,
        )
        from supraopt.pastdata import CONTEXT_FIELDS, parse_contexts, parse_pairs, read_runs
        from supraopt.paths import check_input_file, check_new_folder, check_output_folder
        from supraopt.physics import Preset

        if (into is None) != (target_nm is None):
            raise InputError("--into DIR and --target-nm X go together: give both or neither.")
        if folds < 0 or folds == 1:
            raise InputError(f"--folds {folds} must be 0 (no cross-validation) or at least 2.")
        check_input_file(data, "data file")
        if train_rows is not None and train_rows < 4:
            raise InputError(f"--train-rows {train_rows} must be at least 4.")
        if draws < 1:
            raise InputError(f"--draws {draws} must be at least 1.")
        if into is not None:
            check_new_folder(into, "--into")
            check_new_campaign_dir(into)
        check_output_folder(out if out is not None else Path(f"{data.stem}-fit"), "--out")
        preset = Preset.load(model)
        contexts = parse_contexts(context or [])
        runs = read_runs(
            data, preset, parse_pairs(map_ or [], "--map"), parse_pairs(unit or [], "--unit"), contexts, sheet
        )
        if into is not None and target_nm is not None:
            check_into(runs, model, into, target_nm)  # before the fit: a refusal costs no time, writes nothing
        read = Table(title=f"Columns read from {data}", title_justify="left")
        for header in ("field", "column", "unit"):
            read.add_column(header)
        for name, (column, unit_name) in runs.mapping.items():
            read.add_row(f"{name} (context, number)" if name in CONTEXT_FIELDS else name, column, unit_name)
        for ctx in runs.contexts:
            if ctx.column in CONTEXT_FIELDS and ctx.column in runs.mapping:
                continue  # shown with the fields above
            levels = f"{len(ctx.levels)} levels" if ctx.levels else ""
            read.add_row(f"context ({ctx.kind})", ctx.column, levels)
        console.print(read)
        if runs.unused:
            unused = Table(title="Columns not used (the flag that would use one)", title_justify="left")
            unused.add_column("column")
            unused.add_column("to use it")
            for item in runs.unused:
                unused.add_row(item.column, item.hint)
            unused.caption = (
                "--map FIELD=COLUMN if a column holds one of the fields; a context must be known before the run "
                "(a condition, not another result)."
            )
            console.print(unused)
        if train_rows is not None:
            folds = 0
        with console.status("Fitting and cross-validating..."):
            result = fit_runs(runs, model, folds, seed, train_rows, draws)
        out = out or Path(f"{data.stem}-fit")
        written = write_tables(result, out)
        if draw:
            written += plots.write(plots.fit_figures(result), out)
        carried: list[str] = []
        if into is not None and target_nm is not None:
            seed_campaign(result, into, target_nm).close()
            carried = transfer_summary(result)
    failed = int((runs.frame["failed"] != "").sum())
    console.print(f"{len(runs.frame)} runs ({failed} failed), preset {model}.", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
    shown = result.parameters()
    shown["prior"] = [f"{m:.3g} ± {s:.2g}" for m, s in zip(shown["prior_mean"], shown["prior_sd"], strict=True)]
    shown["fitted"] = [
        f"{m:.3g} ± {s:.2g}" for m, s in zip(shown["posterior_mean"], shown["posterior_sd"], strict=True)
    ]
    shown = shown.rename(columns={"sd_ratio": "sd ratio", "reads_as": "reads as"})
    for stage_name, part in shown.groupby("stage", sort=False):
        columns = ["prior", "fitted", "sd ratio", "reads as"]
        title = f"{str(stage_name).capitalize()} stage: physics parameters (sd from the Laplace posterior)"
        console.print(frame_table(part.set_index("parameter")[columns], title, "parameter"))
        print_legend("prior: mean ± sd · fitted: MAP ± sd · sd ratio: fitted sd / prior sd (small = learned)")
    used = result.context_summary()
    for line in used:
        console.print(f"context: {line}", highlight=False, soft_wrap=True, markup=False)
    contexts_said = "contexts: " + (", ".join(c.column for c in runs.contexts) or "none")
    for stage in result.stages():
        if stage.cv is not None:
            title = f"{stage.stage.name.capitalize()} stage: {stage.cv.folds}-fold cross-validation ({contexts_said})"
            console.print(frame_table(stage.cv.table.rename(columns=short_cv_name), title, "model"))
            print_legend("d: diameter · cov90: share of held-out runs inside the 90 % prediction interval")
    for h in result.holdouts:
        title = (
            f"{h.stage.capitalize()} stage: fits on {h.train_rows} random runs, each predicting all the other runs; "
            f"median of {h.draws} draws ({contexts_said})"
        )
        console.print(frame_table(h.table, title, "model"))
    console.print(f"Wrote {len(written)} files to {out}/: {', '.join(p.name for p in written)}", highlight=False)
    if into is not None:
        console.print(
            f"Created campaign {into} with the fitted prior ({into}/prior.toml). It carries:", highlight=False
        )
        for line in carried:
            console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
        console.print(f"Next: supraopt suggest {into}", highlight=False)


@app.command("plot")
def plot_command(
    directory: CampaignDir,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNG files (default: DIR/plots).")] = None,
) -> None:
    """Draw a campaign's convergence (distance to target, PDI) and the maps of its current model."""
    from supraopt.paths import check_output_folder

    with user_errors(), open_campaign(directory) as campaign:
        from supraopt import plots

        folder = check_output_folder(out if out is not None else directory / "plots", "--out")
        paths = plots.write(plots.campaign_figures(campaign), folder)
    console.print(f"Wrote {', '.join(str(p) for p in paths)}", highlight=False)
