"""``supraopt benchmark``: experiments-to-target and latency on simulated worlds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
        str,
        typer.Option(
            help="stationary (experiments to the first hit; the default), chip-swap or batch-swap (after the "
            "first hit the droplet prefactor or the packing moves by 10-20 %: experiments to hit again, told "
            "through context or not), ladder (4 sizes in one campaign), confirm (confirm = 2: experiments to a "
            "confirmed recipe), unreachable (a spec the world cannot make: when supraopt stops)."
        ),
    ] = "stationary",
) -> None:
    """Measure experiments-to-target against plain BO and random search on many simulated worlds."""
    from rich.progress import Progress
    from rich.table import Table

    from supraopt import benchmark as bench

    if scenario in bench.TARGET_SCENARIOS:
        run_scenario(scenario, worlds, budget, seed, spread, model, workers, out)
        return
    with user_errors():
        if scenario not in bench.SCENARIOS:
            known = ", ".join([*bench.SCENARIOS, *bench.TARGET_SCENARIOS])
            raise InputError(f"unknown scenario {scenario!r}: choose from {known}.")
        if bench.SCENARIOS[scenario] is not None:
            swap_benchmark(scenario, quick, worlds, targets, budget, strategy, spread, model, seed, workers, out)
            return
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


def swap_benchmark(
    scenario: str,
    quick: bool,
    worlds: int,
    targets: int,
    budget: int,
    strategy: list[str] | None,
    spread: float,
    model: str,
    seed: int,
    workers: int,
    out: Path,
) -> None:
    """``--scenario chip-swap|batch-swap``: experiments to hit again after the rig changed."""
    from rich.progress import Progress
    from rich.table import Table

    from supraopt import benchmark as bench

    modes = strategy or list(bench.SWAP_MODES)
    unknown = set(modes) - set(bench.SWAP_MODES)
    if unknown:
        raise InputError(
            f"--scenario {scenario} runs the modes {', '.join(bench.SWAP_MODES)}, not {sorted(unknown)[0]!r}."
        )
    if quick:
        worlds, targets = min(worlds, 8), min(targets, 2)
    tasks = bench.make_tasks(worlds, targets, modes, budget, seed, spread, 0.03, 6.0, model, scenario)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(console=console) as progress:
        bar = progress.add_task(f"{len(tasks)} campaigns", total=len(tasks))
        results = bench.run_tasks(tasks, workers, lambda _: progress.advance(bar))
    summary = bench.summarise_swap(results)
    bench.pd.DataFrame(results).to_csv(out / f"{scenario}-campaigns.csv", index=False)
    summary.to_csv(out / f"{scenario}-summary.csv", index=False)
    swap = bench.SCENARIOS[scenario]
    assert swap is not None
    table = Table(
        title=f"{scenario}: experiments to hit again after {swap.field} moved by ±{swap.low:.0%}-{swap.high:.0%} "
        f"(after a first hit; {bench.AFTER_SWAP_BUDGET} allowed, a miss counts {bench.AFTER_SWAP_BUDGET + 1})"
    )
    short = {"campaigns": "n", "first_hit_median": "1st hit", "rehit_median": "re-hit median"}
    short |= {"rehit_p90": "re-hit p90", "rehit<=2": "≤ 2", "rehit<=3": "≤ 3", "median_latency_s": "latency s"}
    for column in summary.columns:
        table.add_column(short.get(column, column), justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    console.print(f"Wrote {out}/{scenario}-campaigns.csv and {scenario}-summary.csv.")


def run_scenario(
    scenario: str, worlds: int, budget: int, seed: int, spread: float, model: str, workers: int, out: Path
) -> None:
    """``--scenario ladder|confirm|unreachable``: one of :data:`supraopt.benchmark.TARGET_SCENARIOS`, supraopt only."""
    from rich.progress import Progress
    from rich.table import Table

    from supraopt import benchmark as bench

    with user_errors():
        if scenario not in bench.TARGET_SCENARIOS:
            raise InputError(f"unknown scenario {scenario!r}: choose from {', '.join(bench.TARGET_SCENARIOS)}.")
        tasks = bench.make_scenario_tasks(scenario, worlds, budget, seed, spread, 0.03, 6.0, model)
        out.mkdir(parents=True, exist_ok=True)
        with Progress(console=console) as progress:
            bar = progress.add_task(f"{len(tasks)} campaigns", total=len(tasks))
            results = bench.run_scenario_tasks(tasks, workers, lambda _: progress.advance(bar))
        bench.pd.DataFrame(results).to_csv(out / f"scenario-{scenario}.csv", index=False)
        summary = bench.summarise_scenario(scenario, results)
    table = Table(
        title=f"Scenario {scenario}: {bench.TARGET_SCENARIOS[scenario]} (budget {budget}; misses count {budget + 1})"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in summary.items():
        table.add_row(name, f"{value:.2f}")
    console.print(table)
    console.print(f"Wrote {out}/scenario-{scenario}.csv.")
