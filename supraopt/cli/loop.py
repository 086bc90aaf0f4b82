"""The closed loop: ``supraopt run`` drives a rig, ``supraopt demo`` the simulated twin."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from supraopt.cli._common import CampaignDir, app, console, err_console, fmt, settings_text, user_errors
from supraopt.records import Failure, Measurement

if TYPE_CHECKING:
    from rich.table import Table


class RunProgress:
    """The runner's progress: a live table on a terminal, one plain line per event otherwise (logs, CI)."""

    ROWS_SHOWN = 20

    def __init__(self, out: Console, directory: Path | None = None) -> None:
        self.out = out
        self.directory = directory
        self.rows: dict[str, list[str]] = {}
        self.best = "no measurement yet"
        self.live: Any = None
        self.closed = False
        """stdout was closed (``supraopt run DIR | head -2``): the run goes on without printing."""

    def print(self, text: str) -> None:
        """One line on stdout; a closed stdout (broken pipe) is reported once on stderr, then ignored."""
        if self.closed:
            return
        try:
            self.out.print(text, highlight=False, markup=False, soft_wrap=True)
        except BrokenPipeError:
            self.closed = True
            silence_stdout()
            log = f"; its progress goes on in {self.directory / 'run.log'}" if self.directory else ""
            err_console.print(f"stdout was closed (broken pipe): the run keeps going without printing{log}.")

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
            if e.kind in ("suggested", "resuming"):
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
        if self.live is None or e.kind in ("rig", "started", "resumed", "warning", "rig error", "refused", "abandoned"):
            self.print(e.text())
        if self.live is not None:
            self.live.update(self._table(), refresh=True)

    def _table(self) -> Table:
        from rich import box
        from rich.table import Table

        table = Table(
            title="c mg/mL, r = Q_c/Q_d, T °C; predicted and measured d nm, PDI %",
            caption=f"best so far: {self.best}",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            collapse_padding=True,
        )
        for i, header in enumerate(["id", "c", "r", "T", "pred. d", "PDI", "P(hit)", "status", "d", "PDI", "hit"]):
            if i == 8:  # measured d, or why the run failed: the one column that wraps in a narrow terminal
                table.add_column(header, justify="right", max_width=18, overflow="fold")
            else:
                table.add_column(header, justify="right", no_wrap=True)
        for row in list(self.rows.values())[-self.ROWS_SHOWN :]:
            table.add_row(*row)
        return table


def small_problem_threads(directory: Path, budget: int | None) -> None:
    """One torch thread when the campaign stays small (see :mod:`supraopt.torchfast`)."""
    from supraopt.campaign import Campaign
    from supraopt.torchfast import threads_for

    with Campaign.open(directory) as campaign:
        runs = len(campaign.ledger.experiments()) + (budget or campaign.spec.loop.budget)
    threads_for(runs)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so later prints (and Python's flush at exit) do not fail again."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def print_run_summary(directory: Path, summary: Any) -> None:
    """The runner's final word: why it stopped, what it achieved, where the data is."""
    try:
        _print_run_summary(directory, summary)
    except BrokenPipeError:
        silence_stdout()


def _print_run_summary(directory: Path, summary: Any) -> None:
    from supraopt.spec import load_spec

    spec = load_spec(directory)
    t = spec.target
    colour = {0: "green", 130: "yellow"}.get(summary.exit_code, "red")
    console.print(f"[bold {colour}]Stopped:[/] {summary.message}", highlight=False, soft_wrap=True)
    line = f"Experiments used: {summary.experiments_used}."
    if len(summary.targets) > 1:  # one line per target: verdict, first hit, closest run
        console.print(line, highlight=False, soft_wrap=True)
        for outcome in summary.targets:
            console.print(f"  {outcome.text()}", highlight=False, soft_wrap=True)
        line = ""
    elif summary.best is not None:
        b = summary.best
        line += (
            f" {'Best hit (closest to the target)' if summary.hit else 'Closest to the target'}: "
            f"{b.experiment_id} at {b.diameter_nm:.0f} nm "
            f"(target {t.diameter_nm:g} nm ± {t.tolerance:.0%}), PDI {b.pdi_pct:.1f} % (ceiling {t.pdi_max_pct:g} %)."
        )
    if line:
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
        int | None, typer.Option(help="Stop once this many experiments have finished (default: \\[loop] budget).")
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Experiments in flight at once (default: \\[loop] batch).")] = None,
    rig: Annotated[
        str | None,
        typer.Option("--rig", help="Rig adapter instead of campaign.toml's: simulated, manual, http or module:Class."),
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
    from supraopt.errors import InputError
    from supraopt.loop import run as run_loop

    with interrupt_exit(), user_errors(), RunProgress(console, directory) as progress:
        small_problem_threads(directory, budget)
        if rig is not None and not rig.strip():
            raise InputError("--rig is empty; give simulated, manual, http or package.module:Class, or leave it out.")
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

    from supraopt.errors import InputError
    from supraopt.loop import create_demo
    from supraopt.loop import run as run_loop
    from supraopt.paths import check_new_folder
    from supraopt.spec import SPEC_FILE

    with interrupt_exit(), user_errors():
        if budget is not None and budget < 1:
            raise InputError(f"--budget {budget} must be at least 1 experiment.")
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="supraopt-demo-"))
        check_new_folder(directory, "demo folder")
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
        with RunProgress(console, directory) as progress:
            small_problem_threads(directory, budget)
            summary = run_loop(directory, budget=budget, progress=progress)
    print_run_summary(directory, summary)
    raise typer.Exit(code=summary.exit_code)
