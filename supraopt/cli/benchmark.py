"""``supraopt benchmark``: experiments-to-target and latency on simulated worlds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from supraopt.cli._common import app, console, user_errors
from supraopt.errors import InputError


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
    scenario: Annotated[
        str | None,
        typer.Option(help="Run a scenario instead: ladder (4 sizes in one campaign), confirm, unreachable."),
    ] = None,
) -> None:
    """Measure experiments-to-target against plain BO and random search on many simulated worlds."""
    from rich.progress import Progress

    from supraopt import benchmark as bench

    if scenario is not None:
        run_scenario(scenario, worlds, budget, seed, spread, model, workers, out)
        return
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


def run_scenario(
    scenario: str, worlds: int, budget: int, seed: int, spread: float, model: str, workers: int, out: Path
) -> None:
    """``--scenario NAME``: one of :data:`supraopt.benchmark.SCENARIOS`, supraopt only."""
    from rich.progress import Progress

    from supraopt import benchmark as bench

    with user_errors():
        if scenario not in bench.SCENARIOS:
            raise InputError(f"unknown scenario {scenario!r}: choose from {', '.join(bench.SCENARIOS)}.")
        tasks = bench.make_scenario_tasks(scenario, worlds, budget, seed, spread, 0.03, 6.0, model)
        out.mkdir(parents=True, exist_ok=True)
        with Progress(console=console) as progress:
            bar = progress.add_task(f"{len(tasks)} campaigns", total=len(tasks))
            results = bench.run_scenario_tasks(tasks, workers, lambda _: progress.advance(bar))
        bench.pd.DataFrame(results).to_csv(out / f"scenario-{scenario}.csv", index=False)
        summary = bench.summarise_scenario(scenario, results)
    table = Table(
        title=f"Scenario {scenario}: {bench.SCENARIOS[scenario]} (budget {budget}; misses count {budget + 1})"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in summary.items():
        table.add_row(name, f"{value:.2f}")
    console.print(table)
    console.print(f"Wrote {out}/scenario-{scenario}.csv.")
