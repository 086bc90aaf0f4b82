"""Benchmarks: experiments to the first hit on many simulated worlds, and suggestion latency.

**Campaigns.** Draw ``worlds`` random twins (:meth:`World.random`: droplet-law prefactor and
exponent, packing fraction and its temperature term, mass-balance exponent, optimal flow ratio,
polydispersity terms, window edges and their tilts, measurement noise all redrawn), pick
``targets`` diameters per world spread over what that world reaches with low polydispersity, and
run one campaign per (world, target, strategy) with the same seeds for every strategy. A campaign
stops at its first hit (measured size within tolerance and PDI under the ceiling) or after
``budget`` experiments; a miss counts as ``budget + 1``.

Strategies: ``supraopt`` (default), ``plain-bo`` (same GP and acquisition without the physics
mean, Sobol start), ``random`` (Sobol search), and one ablation per ingredient:
``no-feasibility``, ``random-first-point``, ``no-noise-model`` and ``no-drift``.

**Scenarios** (``--scenario``). ``stationary`` (the default) is the above. ``chip-swap`` and
``batch-swap`` change the rig after a campaign's first hit: the world's droplet prefactor (a new
chip) or packing fraction (a new NC batch) is multiplied by ``1 ± U(0.10, 0.20)``; the campaign
goes on for the same target and counts the experiments to hit again (a miss counts
``AFTER_SWAP_BUDGET + 1``). Two modes run on the same worlds, targets, seeds and swaps: ``told``
(the campaign states ``chip=A`` from the start and ``chip=B`` at the swap, as
``supraopt suggest --context`` does) and ``not-told`` (no context: the campaign only sees its
results drift).

**Latency.** Time of one suggestion (fit + acquisition) for 10, 50, 200 and 1000 recorded runs
and batch sizes 1 and 4.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from supraopt.recipe import TargetState
from supraopt.records import PARAMETERS, Measurement
from supraopt.rigs.simulated import World
from supraopt.spec import Target, default_bounds

if TYPE_CHECKING:  # campaigns load torch: imported where a task runs
    from supraopt.campaign import Campaign

PRESET = "cspbbr3-flow-focusing"
NO_MEASUREMENT = 30.0
"""Miss distance plotted for a campaign with no measured run yet (only failures)."""
STRATEGIES = ("supraopt", "plain-bo", "random", "no-feasibility", "random-first-point", "no-noise-model", "no-drift")


@dataclass(frozen=True)
class Task:
    """One campaign of the benchmark."""

    strategy: str
    world_seed: int
    target_nm: float
    seed: int
    budget: int
    tolerance: float
    pdi_max_pct: float
    spread: float
    preset: str = PRESET
    scenario: str = "stationary"


@dataclass(frozen=True)
class Swap:
    """A change of the rig after the first hit: a :class:`World` field times ``1 ± U(low, high)``."""

    field: str
    context: str
    """The context name a told campaign uses (levels ``A`` before, ``B`` after)."""
    low: float = 0.10
    high: float = 0.20


SCENARIOS: dict[str, Swap | None] = {
    "stationary": None,
    "chip-swap": Swap("droplet_k", "chip"),
    "batch-swap": Swap("phi_inorg", "nc_batch"),
}
"""Benchmark scenarios by name; None is the plain experiments-to-first-hit benchmark."""
SWAP_MODES = ("told", "not-told")
"""Strategies of a swap scenario: the campaign is told of the swap through context, or not."""
AFTER_SWAP_BUDGET = 15
"""Experiments after a swap before the campaign counts as not hitting again."""


def model_options(strategy: str) -> Any:
    from supraopt.campaign import ModelOptions

    options = {
        "supraopt": ModelOptions(),
        "plain-bo": ModelOptions(physics=False, random_start=3),
        "no-feasibility": ModelOptions(feasibility=False),
        "random-first-point": ModelOptions(random_start=1),
        "no-noise-model": ModelOptions(data_noise=False),
        "no-drift": ModelOptions(drift=False),
    }
    return options[strategy]


def reachable_targets(
    world: World, bounds: dict[str, tuple[float, float]], count: int, pdi_max_pct: float
) -> list[float]:
    """Target diameters spread (log-evenly, by quantile) over what the world makes safely in spec.

    Safe means: every failure mode under 5 % likely and a true PDI at most 85 % of the ceiling.
    """
    axes = [np.geomspace(*bounds[name], 40) for name in PARAMETERS[:2]]
    axes.append(np.linspace(*bounds["temperature_c"], 13))
    c, r, t = np.meshgrid(*axes, indexing="ij")
    safe = np.all([p < 0.05 for p in world.failure_probabilities(c, r, t).values()], axis=0)
    safe &= world.pdi_pct(c, r, t) <= 0.85 * pdi_max_pct
    if not safe.any():
        return []
    log_d = np.log(world.diameter_nm(c, r, t)[safe])
    quantiles = (np.arange(count) + 0.5) / count
    return [float(round(math.exp(q), 0)) for q in np.quantile(log_d, 0.1 + 0.8 * quantiles)]


def make_tasks(
    worlds: int,
    targets: int,
    strategies: Sequence[str],
    budget: int,
    seed: int,
    spread: float,
    tolerance: float,
    pdi_max_pct: float,
    preset: str = PRESET,
    scenario: str = "stationary",
) -> list[Task]:
    """One task per (world, target, strategy); every strategy sees the same worlds, targets and seeds."""
    bounds = default_bounds(preset)
    tasks = []
    for w in range(worlds):
        world_seed = 10_000 * (seed + 1) + w
        world = World.random(world_seed, preset, spread)
        for k, target in enumerate(reachable_targets(world, bounds, targets, pdi_max_pct)):
            for strategy in strategies:
                tasks.append(
                    Task(
                        strategy,
                        world_seed,
                        target,
                        1000 * w + k,
                        budget,
                        tolerance,
                        pdi_max_pct,
                        spread,
                        preset,
                        scenario,
                    )
                )
    return tasks


def task_campaign(task: Task, folder: Path) -> Campaign:
    """A new campaign in ``folder`` for one task's target, tolerance, PDI ceiling and seed."""
    from supraopt.campaign import Campaign

    return Campaign.create(
        folder, task.preset, task.target_nm, tolerance=task.tolerance, pdi_max_pct=task.pdi_max_pct, seed=task.seed
    )


def run_task(task: Task) -> dict[str, Any]:
    """Run one campaign against its world; returns experiments to the first hit and the curve."""
    if SCENARIOS.get(task.scenario) is not None:
        return run_swap_task(task)
    import torch
    from torch.quasirandom import SobolEngine

    from supraopt.campaign import miss_distance

    torch.set_num_threads(1)
    world = World.random(task.world_seed, task.preset, task.spread)
    rng = np.random.default_rng(task.seed)
    curve: list[float] = []
    latencies: list[float] = []
    failures = 0
    first_hit = task.budget + 1
    false_alarm = False
    with tempfile.TemporaryDirectory() as tmp:
        random_search = task.strategy == "random"
        campaign = task_campaign(task, Path(tmp) / "c")
        if not random_search:
            campaign.options = model_options(task.strategy)
        sobol = SobolEngine(3, scramble=True, seed=task.seed)
        best = math.inf
        try:
            for step in range(1, task.budget + 1):
                if random_search:
                    settings = campaign.space.settings(campaign.space.from_unit(sobol.draw(1).to(torch.double)))[0]
                    experiment_id = None
                else:
                    start = time.perf_counter()
                    [suggestion] = campaign.suggest(1)
                    latencies.append(time.perf_counter() - start)
                    verdict = campaign.last_assessment
                    false_alarm |= verdict is not None and bool(verdict.unreachable())
                    settings, experiment_id = suggestion.settings, suggestion.experiment_id
                result = world.sample(settings, rng)
                if experiment_id is None:
                    campaign.add_run(settings, result)
                else:
                    campaign.record(experiment_id, result)
                if isinstance(result, Measurement):
                    best = min(best, miss_distance(campaign.spec.target, result))
                else:
                    failures += 1
                curve.append(best)
                if best <= 1.0:
                    first_hit = step
                    break
        finally:
            campaign.close()
    curve += [curve[-1]] * (task.budget - len(curve))
    return {
        **asdict(task),
        "experiments_to_hit": first_hit,
        "hit": first_hit <= task.budget,
        "failures": failures,
        "false_alarm": false_alarm,
        "median_latency_s": statistics.median(latencies) if latencies else math.nan,
        "curve": curve,
    }


def run_swap_task(task: Task, observe: Callable[[Campaign, Any, Any, World], None] | None = None) -> dict[str, Any]:
    """Hit once, swap the rig (see :class:`Swap`), count the experiments to hit again.

    ``observe(campaign, suggestion, result, world)`` is called after every run (``benchmarks/trace.py``)."""
    import torch

    swap = SCENARIOS[task.scenario]
    assert swap is not None
    torch.set_num_threads(1)
    world = World.random(task.world_seed, task.preset, task.spread)
    rng = np.random.default_rng(task.seed)
    draw = np.random.default_rng([task.seed, task.world_seed, 7919])  # the same swap for both modes
    factor = 1.0 + float(draw.choice([-1.0, 1.0])) * float(draw.uniform(swap.low, swap.high))
    told = task.strategy == "told"
    first_hit, rehit = task.budget + 1, AFTER_SWAP_BUDGET + 1
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        campaign = task_campaign(task, Path(tmp) / "c")
        target = campaign.spec.target

        def until_hit(budget: int, level: str) -> int:
            for step in range(1, budget + 1):
                context = {swap.context: level} if told and step == 1 else None
                start = time.perf_counter()
                [suggestion] = campaign.suggest(1, context=context)
                latencies.append(time.perf_counter() - start)
                result = world.sample(suggestion.settings, rng)
                campaign.record(suggestion.experiment_id, result)
                if observe is not None:
                    observe(campaign, suggestion, result, world)
                if isinstance(result, Measurement) and target.is_hit(result.diameter_nm, result.pdi_pct):
                    return step
            return budget + 1

        try:
            first_hit = until_hit(task.budget, "A")
            if first_hit <= task.budget:
                world = replace(world, **{swap.field: getattr(world, swap.field) * factor})
                rehit = until_hit(AFTER_SWAP_BUDGET, "B")
        finally:
            campaign.close()
    return {
        **asdict(task),
        "experiments_to_hit": first_hit,
        "hit": first_hit <= task.budget,
        "swap_factor": factor,
        "rehit": rehit if first_hit <= task.budget else math.nan,
        "median_latency_s": statistics.median(latencies) if latencies else math.nan,
    }


def summarise_swap(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per mode (told / not-told): experiments to the first hit and to hit again after the swap."""
    frame = pd.DataFrame(results)
    rows = []
    for mode, group in frame.groupby("strategy", sort=False):
        again = group["rehit"].dropna()
        rows.append(
            {
                "mode": mode,
                "campaigns": len(group),
                "first_hit_median": float(group["experiments_to_hit"].median()),
                "swapped": len(again),
                "rehit_median": float(again.median()) if len(again) else math.nan,
                "rehit_p90": float(again.quantile(0.9, interpolation="higher")) if len(again) else math.nan,
                "rehit<=2": float((again <= 2).mean()) if len(again) else math.nan,
                "rehit<=3": float((again <= 3).mean()) if len(again) else math.nan,
                "median_latency_s": float(group["median_latency_s"].median()),
            }
        )
    order = {s: i for i, s in enumerate(SWAP_MODES)}
    return pd.DataFrame(rows).sort_values("mode", key=lambda s: s.map(order)).reset_index(drop=True)


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_tasks(
    tasks: Sequence[Any],
    workers: int,
    on_done: Callable[[dict[str, Any]], None],
    run: Callable[[Any], dict[str, Any]] = run_task,
    order: Callable[[dict[str, Any]], Any] = lambda r: (r["strategy"], r["world_seed"], r["target_nm"]),
) -> list[dict[str, Any]]:
    """Run ``run(task)`` for every task in ``workers`` processes (1: in this process), reporting each
    result as it lands; results sorted by ``order``."""
    results = []
    if workers <= 1:
        for task in tasks:
            results.append(run(task))
            on_done(results[-1])
        return results
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = [pool.submit(run, task) for task in tasks]
        for future in as_completed(futures):
            results.append(future.result())
            on_done(results[-1])
    return sorted(results, key=order)


def summarise(results: Sequence[dict[str, Any]], budget: int) -> pd.DataFrame:
    """Per strategy: median and 90th percentile of experiments to hit, hit rates, median latency."""
    frame = pd.DataFrame(results)
    rows = []
    for strategy, group in frame.groupby("strategy", sort=False):
        n = group["experiments_to_hit"]
        rows.append(
            {
                "strategy": strategy,
                "campaigns": len(group),
                "median": float(n.median()),
                "p90": float(n.quantile(0.9, interpolation="higher")),
                "hit<=5": float((n <= 5).mean()),
                "hit<=10": float((n <= 10).mean()),
                "hit<=15": float((n <= 15).mean()),
                f"hit<={budget}": float((n <= budget).mean()),
                "median_latency_s": float(group["median_latency_s"].median()),
                "false_alarms": int(group["false_alarm"].sum()),
            }
        )
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return pd.DataFrame(rows).sort_values("strategy", key=lambda s: s.map(order)).reset_index(drop=True)


def plot(results: Sequence[dict[str, Any]], budget: int, path: Path) -> None:
    """Experiments-to-hit distribution (ECDF) and median best distance to target vs experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for strategy, group in frame.groupby("strategy", sort=False):
        n = np.sort(group["experiments_to_hit"].to_numpy())
        left.step(n, np.arange(1, len(n) + 1) / len(n), where="post", label=str(strategy))
        curves = np.array(group["curve"].tolist(), dtype=float)
        curves = np.minimum(curves, NO_MEASUREMENT)  # only failures so far: off the top of the plot
        right.plot(np.arange(1, budget + 1), np.median(curves, axis=0), label=str(strategy))
    left.set(
        xlabel="experiments to first hit", ylabel="fraction of campaigns hit", xlim=(0, budget + 1), ylim=(0, 1.02)
    )
    left.set_title("How many experiments a campaign needs")
    right.axhline(1.0, color="grey", linestyle="--", label="in spec (hit)")
    right.set(
        xlabel="experiment number",
        ylabel="best miss distance (tolerance units, log)",
        yscale="log",
        ylim=(0.3, NO_MEASUREMENT * 0.9),
    )
    right.set_title("Best distance to target so far (median over campaigns)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_table(
    sizes: Sequence[int] = (10, 50, 200, 1000), batches: Sequence[int] = (1, 4), repeats: int = 3
) -> pd.DataFrame:
    """Median wall time of one suggestion (model fit + acquisition) by ledger size and batch size."""
    from supraopt.campaign import Campaign

    world = World.default(PRESET)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            campaign = Campaign.create(Path(tmp) / f"n{size}", PRESET, 450.0, seed=0)
            unit = rng.random((size, 3))
            settings = campaign.space.settings(campaign.space.from_unit(_tensor(unit)))
            for setting in settings:
                campaign.add_run(setting, world.sample(setting, rng))
            experiments = campaign.ledger.experiments()
            for batch in batches:
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    campaign.propose(batch, experiments)
                    times.append(time.perf_counter() - start)
                rows.append({"runs": size, "batch": batch, "median_s": statistics.median(times), "max_s": max(times)})
            campaign.close()
    return pd.DataFrame(rows)


def _tensor(array: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(array, dtype=torch.double)


# --- scenarios: several targets, confirmed recipes, specs out of reach ---------------------------
#
# ``supraopt benchmark --scenario NAME`` runs one of :data:`TARGET_SCENARIOS` instead of the
# experiments-to-first-hit comparison. Each scenario draws its worlds like :func:`make_tasks` and runs
# supraopt only. The plain run (no ``--scenario``) also records, per campaign, whether supraopt ever
# declared the (reachable) target out of reach: a false alarm.


@dataclass(frozen=True)
class ScenarioTask:
    """One campaign of a scenario."""

    scenario: str
    world_seed: int
    targets_nm: tuple[float, ...]
    seed: int
    budget: int
    tolerance: float
    pdi_max_pct: float
    spread: float
    confirm: int = 0
    kind: str = ""
    """unreachable: 'pdi' (ceiling under the world's floor) or 'size' (outside what it makes)."""
    preset: str = PRESET


REPEAT_CHECKS = 400
"""Re-runs of a confirmed recipe on its world to measure how often it hits again (binomial sd of
one recipe's rate at most 2.5 points)."""


def _grid(world: World, bounds: dict[str, tuple[float, float]]) -> tuple[Any, Any, Any, Any]:
    axes = [np.geomspace(*bounds[name], 40) for name in PARAMETERS[:2]]
    axes.append(np.linspace(*bounds["temperature_c"], 13))
    c, r, t = np.meshgrid(*axes, indexing="ij")
    safe = np.all([p < 0.05 for p in world.failure_probabilities(c, r, t).values()], axis=0)
    return c, r, t, safe


def unreachable_spec(world: World, bounds: dict[str, tuple[float, float]], kind: str) -> tuple[float, float] | None:
    """(target nm, PDI ceiling %) the world cannot make: a ceiling half its PDI floor at a size it
    makes ('pdi'), or a size 1.6 times beyond the largest it makes at any PDI ('size')."""
    c, r, t, safe = _grid(world, bounds)
    d, pdi = world.diameter_nm(c, r, t), world.pdi_pct(c, r, t)
    if not safe.any():
        return None
    if kind == "size":
        return float(round(1.6 * d[safe].max(), 0)), 6.0
    size = float(round(np.exp(np.median(np.log(d[safe]))), 0))
    near = safe & (np.abs(d / size - 1) <= 0.03)
    floor = float(pdi[near].min()) if near.any() else float(pdi[safe].min())
    return size, round(floor / 2, 1)


def make_scenario_tasks(
    scenario: str, worlds: int, budget: int, seed: int, spread: float, tolerance: float, pdi_max_pct: float, preset: str
) -> list[ScenarioTask]:
    bounds = default_bounds(preset)
    tasks = []
    for w in range(worlds):
        world_seed = 10_000 * (seed + 1) + w
        world = World.random(world_seed, preset, spread)
        if scenario == "ladder":
            targets = reachable_targets(world, bounds, 4, pdi_max_pct)
            if targets:
                tasks.append(
                    ScenarioTask(scenario, world_seed, tuple(targets), 1000 * w, budget, tolerance, pdi_max_pct, spread)
                )
        elif scenario == "confirm":
            for k, target in enumerate(reachable_targets(world, bounds, 2, pdi_max_pct)):
                tasks.append(
                    ScenarioTask(
                        scenario, world_seed, (target,), 1000 * w + k, budget, tolerance, pdi_max_pct, spread, confirm=2
                    )
                )
        elif scenario == "unreachable":
            for k, kind in enumerate(("pdi", "size")):
                spec = unreachable_spec(world, bounds, kind)
                if spec is not None:
                    size, ceiling = spec
                    tasks.append(
                        ScenarioTask(
                            scenario, world_seed, (size,), 1000 * w + k, budget, tolerance, ceiling, spread, kind=kind
                        )
                    )
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    return tasks


def run_scenario_task(task: ScenarioTask) -> dict[str, Any]:
    """Run one scenario campaign: until every target is done, it is declared out of reach, or the budget."""
    import torch

    from supraopt.campaign import Campaign

    torch.set_num_threads(1)
    world = World.random(task.world_seed, task.preset, task.spread)
    rng = np.random.default_rng(task.seed)
    out: dict[str, Any] = {**asdict(task), "targets_nm": " ".join(f"{t:g}" for t in task.targets_nm)}
    first_hit: dict[float, int] = {}
    stopped_at, message, used = None, "", task.budget
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign.create(
            Path(tmp) / "c",
            task.preset,
            task.targets_nm,
            tolerance=task.tolerance,
            pdi_max_pct=task.pdi_max_pct,
            confirm=task.confirm,
            seed=task.seed,
        )
        try:
            for step in range(1, task.budget + 1):
                assessment = campaign.assess()
                if assessment.all_done:
                    used = step - 1
                    break
                if not assessment.open():
                    stopped_at, message, used = step - 1, " ".join(assessment.messages()), step - 1
                    break
                [suggestion] = campaign.suggest(1)
                result = world.sample(suggestion.settings, rng)
                campaign.record(suggestion.experiment_id, result)
                if isinstance(result, Measurement):
                    for t in campaign.spec.targets:
                        if t.is_hit(result.diameter_nm, result.pdi_pct):
                            first_hit.setdefault(t.diameter_nm, step)
            else:
                assessment = campaign.assess()
            done = assessment.all_done
            out |= {
                "experiments": used if done else task.budget + 1,
                "done": done,
                "targets_hit": len(first_hit),
                "stopped_out_of_reach_at": stopped_at,
                "message": message,
            }
            if task.scenario == "confirm" and done:
                out |= _confirmed_recipe_checks(world, campaign.spec.target, assessment.states[0], rng)
        finally:
            campaign.close()
    return out


def _confirmed_recipe_checks(
    world: World, target: Target, state: TargetState, rng: np.random.Generator
) -> dict[str, Any]:
    """Re-run a confirmed recipe :data:`REPEAT_CHECKS` times on its world: how often it hits again,
    and why it misses (its true size off the band centre, its true PDI, the world's noise)."""
    recipe = state.recipe
    assert recipe is not None
    settings = state.repeat_settings or recipe.settings  # what the recipe card tells the chemist to run
    repeats = [world.sample(settings, rng) for _ in range(REPEAT_CHECKS)]
    hits = sum(isinstance(m, Measurement) and target.is_hit(m.diameter_nm, m.pdi_pct) for m in repeats)
    c, r, t = (settings[name] for name in PARAMETERS)
    return {
        "repeat_hit_rate": hits / REPEAT_CHECKS,
        "p_repeat": state.p_repeat,
        "confirmed_by_repeats": state.confirmed_by_repeats,
        "recipe_hits": recipe.hits,
        "recipe_misses": recipe.misses,
        "true_offset_tol": (float(world.diameter_nm(c, r, t)) / target.diameter_nm - 1) / target.tolerance,
        "true_pdi_pct": float(world.pdi_pct(c, r, t)),
        "calibration_sd": world.calibration_sd,
    }


def run_scenario_tasks(
    tasks: Sequence[ScenarioTask], workers: int, on_done: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """:func:`run_tasks` for scenario campaigns."""
    return run_tasks(tasks, workers, on_done, run_scenario_task, lambda r: (r["world_seed"], r["seed"]))


def summarise_scenario(scenario: str, results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The figures each scenario's targets are stated in (see the README)."""
    frame = pd.DataFrame(results)
    n = frame["experiments"]
    summary: dict[str, float] = {"campaigns": float(len(frame))}
    if scenario in ("ladder", "confirm"):
        summary |= {
            "median experiments": float(n.median()),
            "p90 experiments": float(n.quantile(0.9, interpolation="higher")),
            "max experiments": float(n.max()),
            "done within budget": float(frame["done"].mean()),
        }
    if scenario == "confirm":
        rates = frame["repeat_hit_rate"].dropna() if "repeat_hit_rate" in frame else pd.Series(dtype=float)
        summary["confirmed recipe: repeat hit rate"] = float(rates.mean()) if len(rates) else math.nan
    if scenario == "unreachable":
        stopped = frame["stopped_out_of_reach_at"]
        for kind, group in frame.groupby("kind"):
            at = group["stopped_out_of_reach_at"]
            summary[f"{kind}: stopped within 8"] = float((at.notna() & (at <= 8)).mean())
            summary[f"{kind}: median stop"] = float(at.median()) if at.notna().any() else math.nan
        summary["stopped within 8 (all)"] = float((stopped.notna() & (stopped <= 8)).mean())
        summary["hit anyway (should be 0)"] = float(frame["targets_hit"].gt(0).mean())
    return summary


TARGET_SCENARIOS = {
    "ladder": "4 targets per world in one campaign: experiments until every target is hit",
    "confirm": "confirm = 2: experiments until the target is confirmed; how often the recipe hits again",
    "unreachable": "PDI ceiling under the world's floor, or a size beyond its reach: when supraopt stops",
}
"""``supraopt benchmark --scenario NAME``: name -> what it measures. Add new scenarios here."""
