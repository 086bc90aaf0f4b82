"""Run one campaign of a ``supraopt benchmark`` scenario and print it run by run.

    nice .venv/bin/python benchmarks/trace.py --seed 3 --world 40000                 # a ladder
    nice .venv/bin/python benchmarks/trace.py --scenario chip-swap --seed 1 --world 20003 --target 1
    nice .venv/bin/python benchmarks/trace.py --scenario chip-swap --seed 2 --world 30000 --scan-after 6

The world, targets and campaign seed are those of ``supraopt benchmark --scenario ladder --worlds 10
--budget 16 --seed S``, or of ``supraopt benchmark --scenario chip-swap|batch-swap --quick --seed S``
(``--target K`` picks the world's K-th target, ``--mode`` told or not-told); world ids are
``10000 * (S + 1) + w``. Every run prints its settings, the prediction stored with the proposal
(diameter ± sd, PDI ± sd, P(hit)), the measurement, the world's true (noise-free) diameter and
PDI, the measurement's size error against that truth (mostly the run's SEM calibration factor)
and the targets it hit. It shows whether a slow campaign was slow because of the model or because
of the noise. ``--scan-after N`` (swaps) stops N runs after the swap and prints, over a grid of flow
ratios and temperatures with the concentration set where the model expects the target size, what
the model predicts there against the world's truth.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supraopt.benchmark import SWAP_MODES, make_scenario_tasks, make_tasks, run_swap_task
from supraopt.campaign import Campaign
from supraopt.records import Failure, Measurement
from supraopt.rigs.simulated import World
from supraopt.spec import Target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="ladder", choices=["ladder", "chip-swap", "batch-swap"])
    parser.add_argument("--seed", type=int, default=0, help="the benchmark's --seed (default 0)")
    parser.add_argument("--world", type=int, required=True, help="world id, e.g. 10000 (seed 0's first world)")
    parser.add_argument("--worlds", type=int, help="the benchmark's --worlds (default: 10 for a ladder, 8 for swaps)")
    parser.add_argument("--budget", type=int, help="the benchmark's --budget (default: 16 for a ladder, 30 for swaps)")
    parser.add_argument("--target", type=int, default=0, help="swaps: which of the world's two targets (0 or 1)")
    parser.add_argument("--mode", default="told", choices=SWAP_MODES, help="swaps: told of the swap or not")
    parser.add_argument("--scan-after", type=int, help="swaps: stop this many runs after the swap and scan the model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.scenario == "ladder":
        trace_ladder(args.seed, args.world, args.worlds or 10, args.budget or 16)
    else:
        trace_swap(
            args.scenario, args.mode, args.seed, args.world, args.target, args.worlds or 8, args.budget or 30,
            args.scan_after,
        )  # fmt: skip


def trace_ladder(seed: int, world_id: int, worlds: int, budget: int) -> None:
    tasks = make_scenario_tasks("ladder", worlds, budget, seed, 1.0, 0.03, 6.0, "cspbbr3-flow-focusing")
    found = [t for t in tasks if t.world_seed == world_id]
    if not found:
        raise SystemExit(f"world {world_id} has no ladder with --seed {seed}: {[t.world_seed for t in tasks]}")
    task = found[0]
    world = World.random(task.world_seed, task.preset, task.spread)
    rng = np.random.default_rng(task.seed)
    print(f"world {task.world_seed}: targets {task.targets_nm} nm, calibration sd {100 * world.calibration_sd:.2f} %")
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign.create(
            Path(tmp) / "c", task.preset, task.targets_nm, tolerance=task.tolerance, pdi_max_pct=task.pdi_max_pct,
            seed=task.seed,
        )  # fmt: skip
        with campaign:
            for step in range(1, budget + 1):
                if campaign.assess().all_done:
                    break
                [suggestion] = campaign.suggest(1)
                result = world.sample(suggestion.settings, rng)
                campaign.record(suggestion.experiment_id, result)
                print(line(step, suggestion, result, world, campaign.spec.targets))


class Stop(Exception):
    """Ends a traced campaign early (``--scan-after``)."""


def trace_swap(
    scenario: str, mode: str, seed: int, world_id: int, target: int, worlds: int, budget: int, scan_after: int | None
) -> None:
    tasks = make_tasks(worlds, 2, [mode], budget, seed, 1.0, 0.03, 6.0, scenario=scenario)
    found = [t for t in tasks if t.world_seed == world_id]
    if len(found) <= target:
        raise SystemExit(f"world {world_id} has no target {target} with --seed {seed}: {[t.world_seed for t in tasks]}")
    task = found[target]
    print(f"world {task.world_seed}: target {task.target_nm:.0f} nm, calibration sd ", end="")
    steps: list[World] = []
    swapped_at: list[int] = []
    spec_target = Target(task.target_nm, task.tolerance, task.pdi_max_pct)

    def observe(campaign: Campaign, suggestion: Any, result: Measurement | Failure, world: World) -> None:
        if not steps:
            print(f"{100 * world.calibration_sd:.2f} %")
        if steps and world != steps[-1]:
            print("--- swap ---")
            swapped_at.append(len(steps))
        steps.append(world)
        print(line(len(steps), suggestion, result, world, (spec_target,)))
        if scan_after is not None and swapped_at and len(steps) - swapped_at[0] == scan_after:
            scan(campaign, world)
            raise Stop

    try:
        out = run_swap_task(task, observe)
    except Stop:
        return
    print(f"swap factor {out['swap_factor']:.3f}: first hit {out['experiments_to_hit']}, hit again {out['rehit']}")


def scan(campaign: Campaign, world: World, flow_ratios: int = 9, temperatures: int = 7) -> None:
    """The model against the truth where the model expects the target size, over flow ratio x temperature."""
    from supraopt.acquisition import project_to_target

    space, target = campaign.space, campaign.spec.target
    acq = campaign.fitted(campaign.ledger.experiments()).per_target[0]
    middle = float(np.sqrt(np.prod(space.bounds["concentration_mg_ml"])))
    grid = [
        {"concentration_mg_ml": middle, "flow_ratio": float(r), "temperature_c": float(t)}
        for r in np.geomspace(*space.bounds["flow_ratio"], flow_ratios)
        for t in np.linspace(*space.bounds["temperature_c"], temperatures)
    ]
    z = project_to_target(acq, space.to_unit(space.tensor(grid)).clamp(0.0, 1.0))
    rows = sorted(zip(acq.predict(z), space.settings(space.from_unit(z)), strict=True), key=lambda row: -row[0].p_hit)
    print(f"model after {len(campaign.ledger.experiments())} runs, concentration set for {target.diameter_nm:g} nm:")
    for p, s in rows:
        true_d, true_pdi, reason = world.truth(s)
        print(
            f"    c={s['concentration_mg_ml']:5.2f} r={s['flow_ratio']:5.2f} T={s['temperature_c']:4.1f}  "
            f"pred {p.diameter_nm:6.1f} ± {p.diameter_sd_nm:4.1f} PDI {p.pdi_pct:4.1f} ± {p.pdi_sd_pct:.1f} "
            f"P(hit) {p.p_hit:.2f}  |  true {true_d:6.1f} PDI {true_pdi:4.1f} {reason or ''}"
        )


def line(step: int, suggestion: Any, result: Measurement | Failure, world: World, targets: Any) -> str:
    true_d, true_pdi = world.truth(suggestion.settings)[:2]
    s, p = suggestion.settings, suggestion.prediction
    if isinstance(result, Measurement):
        hits = [t.diameter_nm for t in targets if t.is_hit(result.diameter_nm, result.pdi_pct)]
        measured = (
            f"{result.diameter_nm:6.1f} nm ({100 * (result.diameter_nm / true_d - 1):+.1f} % vs true) "
            f"PDI {result.pdi_pct:4.1f} %  hits {hits or '-'}"
        )
    else:
        measured = f"failed: {result.reason}"
    return (
        f"{step:2d}  c={s['concentration_mg_ml']:5.2f} r={s['flow_ratio']:5.2f} T={s['temperature_c']:4.1f}  "
        f"pred {p['diameter_nm']:6.1f} ± {p['diameter_sd_nm']:4.1f} PDI {p['pdi_pct']:4.1f} ± "
        f"{p['pdi_sd_pct']:.1f} P(hit) {p['p_hit']:.2f}  |  true {true_d:6.1f} PDI {true_pdi:4.1f}  |  "
        f"measured {measured}"
    )


if __name__ == "__main__":
    main()
