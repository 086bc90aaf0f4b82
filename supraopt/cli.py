"""The ``supraopt`` command line: parse, call the Python API, print. Nothing clever lives here.

Every user error prints one line ``error: ...`` naming the bad value and exits with code 1.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from supraopt.errors import InputError, SupraoptError
from supraopt.records import Failure, Measurement

app = typer.Typer(
    help="Physics-informed Bayesian optimisation of microfluidic supraparticle synthesis.\n\n"
    "Typical use: 'supraopt init DIR ...', then repeat 'supraopt suggest DIR' and 'supraopt record DIR ID ...'; "
    "or let 'supraopt run DIR' drive a rig by itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
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


SETTING_HEADERS = ["c (mg/mL)", "Q_c/Q_d", "T (°C)"]


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
    rig: Annotated[str, typer.Option(help="Rig adapter: simulated, manual, http or package.module:Class.")] = (
        "simulated"
    ),
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
        suggestions = campaign.suggest(n)
        target = campaign.spec.target
    if as_json:
        print(json.dumps([s.to_json() for s in suggestions], indent=2))
        return
    table = Table(
        title=f"Next experiment(s) for {target.diameter_nm:g} nm ± {target.tolerance:.0%}, PDI ≤ {target.pdi_max_pct:g} %"
    )
    for header in ["id", *SETTING_HEADERS, "predicted d (nm)", "PDI (%)", "P(feasible)", "P(hit)"]:
        table.add_column(header, justify="right")
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
    table = Table(title=f"{directory}: target {t.diameter_nm:g} nm ± {t.tolerance:.0%}, PDI ≤ {t.pdi_max_pct:g} %")
    for header in ["id", "status", *SETTING_HEADERS, "predicted d (nm)", "measured d (nm)", "PDI (%)", "hit"]:
        table.add_column(header, justify="right")
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


@app.command()
def benchmark(
    quick: Annotated[
        bool, typer.Option("--quick", help="A small run (8 worlds, 3 strategies) in about a minute.")
    ] = False,
    worlds: Annotated[int, typer.Option(help="Random simulated worlds to draw.")] = 40,
    targets: Annotated[int, typer.Option(help="Target diameters per world.")] = 2,
    budget: Annotated[int, typer.Option(help="Experiments per campaign before it counts as a miss.")] = 30,
    strategy: Annotated[
        list[str] | None, typer.Option("--strategy", help="Strategies to run (repeat the option); default: all.")
    ] = None,
    spread: Annotated[float, typer.Option(help="How far worlds stray from the preset (1 = the twin's ranges).")] = 1.0,
    model: Annotated[str, typer.Option(help="Physics preset the worlds are drawn around.")] = "cspbbr3-flow-focusing",
    seed: Annotated[int, typer.Option(help="Seed of the worlds and campaigns.")] = 0,
    workers: Annotated[int, typer.Option(help="Parallel processes.")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for the CSV files and the plot.")] = Path("benchmark-results"),
    latency: Annotated[bool, typer.Option(help="Also time suggestions for 10-1000 recorded runs.")] = True,
) -> None:
    """Measure experiments-to-target against plain BO and random search on many simulated worlds."""
    from rich.progress import Progress

    from supraopt import benchmark as bench

    with user_errors():
        chosen = strategy or (["supraopt", "plain-bo", "random"] if quick else list(bench.STRATEGIES))
        unknown = set(chosen) - set(bench.STRATEGIES)
        if unknown:
            raise InputError(f"unknown strategy {sorted(unknown)[0]!r}: choose from {', '.join(bench.STRATEGIES)}.")
        if quick:
            worlds, targets = min(worlds, 8), min(targets, 2)
        tasks = bench.make_tasks(worlds, targets, chosen, budget, seed, spread, 0.03, 6.0, model)
        out.mkdir(parents=True, exist_ok=True)
        with Progress(console=console) as progress:
            bar = progress.add_task(f"{len(tasks)} campaigns", total=len(tasks))
            results = bench.run_tasks(tasks, workers, lambda _: progress.advance(bar))
        summary = bench.summarise(results, budget)
        frame = bench.pd.DataFrame(results)
        frame.drop(columns=["curve"]).to_csv(out / "campaigns.csv", index=False)
        curves = frame[["strategy", "world_seed", "target_nm", "curve"]].explode("curve")
        curves.insert(3, "experiment", curves.groupby(level=0).cumcount() + 1)
        curves.rename(columns={"curve": "best_miss_distance"}).to_csv(out / "curves.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        bench.plot(results, budget, out / "benchmark.png")
    table = Table(
        title=f"Experiments to first hit (tolerance 3 %, PDI ≤ 6 %, budget {budget}; misses count {budget + 1})"
    )
    short = {"campaigns": "n", "median_latency_s": "latency s"}
    for column in summary.columns:
        table.add_column(short.get(column, column.replace("hit<=", "hit ≤")), justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    console.print(f"Wrote {out}/campaigns.csv, curves.csv, summary.csv and benchmark.png.")
    if latency:
        lat = bench.latency_table()
        lat.to_csv(out / "latency.csv", index=False)
        table = Table(title="Suggestion latency (fit + acquisition), seconds")
        for column in ["runs", "batch", "median_s", "max_s"]:
            table.add_column(column, justify="right")
        for row in lat.itertuples(index=False):
            table.add_row(str(row.runs), str(row.batch), f"{row.median_s:.3f}", f"{row.max_s:.3f}")
        console.print(table)


class RunProgress:
    """The runner's progress: a live table on a terminal, one plain line per event otherwise (logs, CI)."""

    ROWS_SHOWN = 20

    def __init__(self, out: Console) -> None:
        self.out = out
        self.rows: dict[str, list[str]] = {}
        self.best = "no measurement yet"
        self.live: Any = None

    def __enter__(self) -> RunProgress:
        if self.out.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.out, auto_refresh=False)
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def __call__(self, event: Any) -> None:
        e = event
        if e.best is not None:
            self.best = f"{e.best.experiment_id}: {e.best.diameter_nm:.0f} nm, PDI {e.best.pdi_pct:.1f} %"
        if e.experiment_id is not None:
            row = self.rows.setdefault(e.experiment_id, [e.experiment_id, *[""] * 10])
            if e.kind == "suggested":
                p = e.prediction
                row[1:4] = settings_text(e.settings)
                if p:
                    row[4] = f"{p.get('diameter_nm', math.nan):.0f}±{p.get('diameter_sd_nm', math.nan):.0f}"
                    row[5], row[6] = fmt(p.get("pdi_pct")), fmt(p.get("p_hit"), 2)
            if e.kind != "rig error":
                row[7] = e.kind
            if isinstance(e.result, Measurement):
                row[8], row[9] = fmt(e.result.diameter_nm, 0), fmt(e.result.pdi_pct)
                row[10] = "✔" if e.hit else "✘"
            elif isinstance(e.result, Failure):
                row[8] = e.result.reason
        if e.kind == "stopped":
            return  # the command prints the summary itself
        if self.live is None or e.kind in ("started", "resumed", "warning", "rig error", "refused", "abandoned"):
            self.out.print(e.text(), highlight=False, markup=False, soft_wrap=True)
        if self.live is not None:
            self.live.update(self._table(), refresh=True)

    def _table(self) -> Table:
        from rich import box

        table = Table(
            title="c mg/mL, r = Q_c/Q_d, T °C; predicted and measured d nm, PDI %",
            caption=f"best so far: {self.best}",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            collapse_padding=True,
        )
        for header in ["id", "c", "r", "T", "pred. d", "PDI", "P(hit)", "status", "d", "PDI", "hit"]:
            table.add_column(header, justify="right", no_wrap=True)
        for row in list(self.rows.values())[-self.ROWS_SHOWN :]:
            table.add_row(*row)
        return table


def print_run_summary(directory: Path, summary: Any) -> None:
    """The runner's final word: why it stopped, what it achieved, where the data is."""
    from supraopt.spec import load_spec

    spec = load_spec(directory)
    t = spec.target
    colour = {0: "green", 130: "yellow"}.get(summary.exit_code, "red")
    console.print(f"[bold {colour}]Stopped:[/] {summary.message}", highlight=False, soft_wrap=True)
    line = f"Experiments used: {summary.experiments_used}."
    if summary.best is not None:
        b = summary.best
        line += (
            f" {'Hit' if summary.hit else 'Best'}: {b.experiment_id} at {b.diameter_nm:.0f} nm "
            f"(target {t.diameter_nm:g} nm ± {t.tolerance:.0%}), PDI {b.pdi_pct:.1f} % (ceiling {t.pdi_max_pct:g} %)."
        )
    console.print(line, highlight=False, soft_wrap=True)
    ledger = spec.ledger_url or str(directory / "ledger.sqlite")
    console.print(f"Ledger: {ledger}; see it with: supraopt status {directory}", highlight=False, soft_wrap=True)


@contextmanager
def interrupt_exit() -> Iterator[None]:
    """Ctrl-C, or SIGTERM (a service manager stopping us), stops the runner gracefully.

    Inside the runner either becomes a graceful stop (runs in flight stay in the ledger, resumed next
    time); outside it (while loading) one line and exit code 130.
    """

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("interrupted.")
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def run(
    directory: CampaignDir,
    budget: Annotated[
        int | None, typer.Option(help="Stop once this many experiments have finished (default: [loop] budget).")
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Experiments in flight at once (default: [loop] batch).")] = None,
    rig: Annotated[
        str | None,
        typer.Option(
            "--rig", help="Rig adapter instead of campaign.toml's: simulated, manual, http, package.module:Class."
        ),
    ] = None,
    stop_on_hit: Annotated[
        bool | None,
        typer.Option("--stop-on-hit/--keep-going", help="Stop at the first hit, or keep refining to the budget."),
    ] = None,
    poll_interval: Annotated[
        float | None, typer.Option("--poll-interval", help="Seconds between polls of a running experiment.")
    ] = None,
) -> None:
    """Drive the rig by itself: suggest, dispatch, wait, record, refit, until a hit or the budget.

    Re-running the same command resumes: experiments in flight are asked about, never started twice.
    Exit code 0 on a hit or the budget, 130 on Ctrl-C, 2 when the rig keeps failing, 1 on a user error.
    """
    from supraopt.loop import run as run_loop

    with interrupt_exit(), user_errors(), RunProgress(console) as progress:
        summary = run_loop(
            directory,
            rig,
            budget=budget,
            batch=batch,
            stop_on_hit=stop_on_hit,
            poll_interval_s=poll_interval,
            progress=progress,
        )
    print_run_summary(directory, summary)
    raise typer.Exit(code=summary.exit_code)


@app.command()
def demo(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Folder for the demo campaign (default: a new temporary folder); a campaign there is resumed."
        ),
    ] = None,
    target_nm: Annotated[float, typer.Option("--target-nm", help="Wanted mean supraparticle diameter, nm.")] = 450.0,
    budget: Annotated[int | None, typer.Option(help="Most experiments to spend (default 15).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the optimiser and of the twin's measurement noise.")] = 0,
    world_seed: Annotated[
        int | None, typer.Option("--world-seed", help="Draw a random twin (hidden physics) with this seed.")
    ] = None,
) -> None:
    """Run a whole campaign on the simulated twin, from an empty ledger to the target, and summarise it."""
    import tempfile

    from supraopt.loop import create_demo
    from supraopt.loop import run as run_loop
    from supraopt.spec import SPEC_FILE

    with interrupt_exit(), user_errors():
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="supraopt-demo-"))
        if (directory / SPEC_FILE).is_file():
            console.print(f"Resuming the campaign in {directory}.", highlight=False, soft_wrap=True)
        else:
            create_demo(directory, target_nm=target_nm, budget=budget or 15, seed=seed, world_seed=world_seed)
            twin = "the default twin" if world_seed is None else f"a random twin (world seed {world_seed})"
            console.print(
                f"Demo campaign in {directory} on {twin}: target {target_nm:g} nm ± 3 %, PDI ≤ 6 %, "
                f"at most {budget or 15} experiments.",
                highlight=False,
                soft_wrap=True,
            )
            budget = None
        with RunProgress(console) as progress:
            summary = run_loop(directory, budget=budget, progress=progress)
    print_run_summary(directory, summary)
    raise typer.Exit(code=summary.exit_code)


rig_app = typer.Typer(help="Serve a rig adapter over HTTP: the rig-PC end of the 'http' adapter.", no_args_is_help=True)
app.add_typer(rig_app, name="rig")


@rig_app.command("serve")
def rig_serve(
    adapter: Annotated[
        str, typer.Option(help="Adapter to serve: simulated, manual or package.module:Class.")
    ] = "simulated",
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


MAP_HELP = (
    "FIELD=COLUMN, repeatable: the column holding a field when its header is not recognised, e.g. "
    "--map diameter='SP size'. Fields: concentration, flow_ratio (or q_continuous and q_dispersed), temperature, "
    "diameter, pdi, n_particles, droplet, failed, capillary_number, orifice_width, aspect_ratio. "
    "FIELD= (empty) ignores a column picked automatically."
)
UNIT_HELP = (
    "FIELD=UNIT, repeatable, where the header does not say it (e.g. 'T (K)' does): concentration=mg/mL|vol%|fraction "
    "(volume fractions use the preset's NC density), flow_ratio=Qc/Qd|Qd/Qc, temperature=C|K, diameter=nm|um, "
    "pdi=%|fraction|dls, droplet=um|nm|mm|d/w, orifice_width=um|mm, q_continuous=uL/min|mL/h|..."
)


def frame_table(frame: Any, title: str, index: str | None = None) -> Table:
    """A pandas DataFrame as a rich table, numbers to three significant digits."""
    table = Table(title=title, title_justify="left")
    columns = ([index] if index else []) + [str(c) for c in frame.columns]
    for column in columns:
        table.add_column(column, justify="right")
    for key, row in frame.iterrows():
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
        table.add_row(*([str(key)] if index else []), *cells)
    return table


@app.command("fit")
def fit_command(
    data: Annotated[Path, typer.Argument(help="Past runs: a CSV or Parquet file, one run per row.")],
    model: Annotated[str, typer.Option(help="Physics preset whose constants and priors the fit starts from.")] = (
        "cspbbr3-flow-focusing"
    ),
    map_: Annotated[list[str] | None, typer.Option("--map", help=MAP_HELP)] = None,
    unit: Annotated[list[str] | None, typer.Option("--unit", help=UNIT_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for tables and plots (default: ./<DATA name>-fit).")] = None,
    folds: Annotated[int, typer.Option(help="k of the k-fold cross-validation; 0 skips it.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the split into folds.")] = 0,
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
    with user_errors():
        from supraopt import plots
        from supraopt.fit import check_new_campaign_dir, fit_runs, seed_campaign, write_tables
        from supraopt.pastdata import parse_pairs, read_runs
        from supraopt.physics import Preset

        if (into is None) != (target_nm is None):
            raise InputError("--into DIR and --target-nm X go together: give both or neither.")
        if folds < 0 or folds == 1:
            raise InputError(f"--folds {folds} must be 0 (no cross-validation) or at least 2.")
        if into is not None:
            check_new_campaign_dir(into)
        preset = Preset.load(model)
        runs = read_runs(data, preset, parse_pairs(map_ or [], "--map"), parse_pairs(unit or [], "--unit"))
        read = Table(title=f"Columns read from {data}", title_justify="left")
        for header in ("field", "column", "unit"):
            read.add_column(header)
        for name, (column, unit_name) in runs.mapping.items():
            read.add_row(name, column, unit_name)
        console.print(read)
        with console.status("Fitting and cross-validating..."):
            result = fit_runs(runs, model, folds, seed)
        out = out or Path(f"{data.stem}-fit")
        written = write_tables(result, out)
        if draw:
            written += plots.write(plots.fit_figures(result), out)
        if into is not None and target_nm is not None:
            seed_campaign(result, into, target_nm).close()
    failed = int((runs.frame["failed"] != "").sum())
    console.print(f"{len(runs.frame)} runs ({failed} failed), preset {model}.", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
    shown = result.parameters()
    shown["prior"] = [f"{m:.3g} ± {s:.2g}" for m, s in zip(shown["prior_mean"], shown["prior_sd"], strict=True)]
    shown["fitted"] = [
        f"{m:.3g} ± {s:.2g}" for m, s in zip(shown["posterior_mean"], shown["posterior_sd"], strict=True)
    ]
    shown = shown.rename(columns={"fitted": "fitted (MAP ± sd)", "sd_ratio": "sd / prior sd", "reads_as": "reads as"})
    for stage_name, part in shown.groupby("stage", sort=False):
        columns = ["prior", "fitted (MAP ± sd)", "sd / prior sd", "reads as"]
        title = f"{str(stage_name).capitalize()} stage: physics parameters (sd from the Laplace posterior)"
        console.print(frame_table(part.set_index("parameter")[columns], title, "parameter"))
    for stage in result.stages():
        if stage.cv is not None:
            title = f"{stage.stage.name.capitalize()} stage: {stage.cv.folds}-fold cross-validation"
            console.print(frame_table(stage.cv.table, title, "model"))
    console.print(f"Wrote {len(written)} files to {out}/: {', '.join(p.name for p in written)}", highlight=False)
    if into is not None:
        console.print(
            f"Created campaign {into} with the fitted prior ({into}/prior.toml). Next: supraopt suggest {into}"
        )


@app.command("plot")
def plot_command(
    directory: CampaignDir,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNG files (default: DIR/plots).")] = None,
) -> None:
    """Draw a campaign's convergence (distance to target, PDI) and the maps of its current model."""
    with user_errors(), open_campaign(directory) as campaign:
        from supraopt import plots

        paths = plots.write(plots.campaign_figures(campaign), out or directory / "plots")
    console.print(f"Wrote {', '.join(str(p) for p in paths)}", highlight=False)


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
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
