"""Run one ladder campaign of ``supraopt benchmark --scenario ladder`` and print it run by run.

    nice .venv/bin/python benchmarks/trace.py --seed 3 --world 40000

The world, targets and campaign seed are those of ``supraopt benchmark --scenario ladder --worlds 10
--budget 16 --seed S`` (world ids are ``10000 * (S + 1) + w``). Every run prints its settings, the
prediction stored with the proposal (diameter ± sd, PDI ± sd, P(hit)), the measurement, the
world's true (noise-free) diameter and PDI, the measurement's size error against that truth
(mostly the run's SEM calibration factor) and the targets it hit. It shows whether a slow
campaign was slow because of the model or because of the noise.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from supraopt.benchmark import make_scenario_tasks
from supraopt.campaign import Campaign
from supraopt.records import Measurement
from supraopt.rigs.simulated import World


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the benchmark's --seed (default 0)")
    parser.add_argument("--world", type=int, required=True, help="world id, e.g. 10000 (seed 0's first world)")
    parser.add_argument("--worlds", type=int, default=10, help="the benchmark's --worlds (default 10)")
    parser.add_argument("--budget", type=int, default=16, help="the benchmark's --budget (default 16)")
    args = parser.parse_args()
    tasks = make_scenario_tasks("ladder", args.worlds, args.budget, args.seed, 1.0, 0.03, 6.0, "cspbbr3-flow-focusing")
    found = [t for t in tasks if t.world_seed == args.world]
    if not found:
        raise SystemExit(f"world {args.world} has no ladder with --seed {args.seed}: {[t.world_seed for t in tasks]}")
    task = found[0]
    torch.set_num_threads(1)
    world = World.random(task.world_seed, task.preset, task.spread)
    rng = np.random.default_rng(task.seed)
    print(f"world {task.world_seed}: targets {task.targets_nm} nm, calibration sd {100 * world.calibration_sd:.2f} %")
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign.create(
            Path(tmp) / "c", task.preset, task.targets_nm, tolerance=task.tolerance, pdi_max_pct=task.pdi_max_pct,
            seed=task.seed,
        )  # fmt: skip
        with campaign:
            trace(campaign, world, rng, task.budget)


def trace(campaign: Campaign, world: World, rng: np.random.Generator, budget: int) -> None:
    for step in range(1, budget + 1):
        if campaign.assess().all_done:
            break
        [suggestion] = campaign.suggest(1)
        result = world.sample(suggestion.settings, rng)
        true_d, true_pdi = world.truth(suggestion.settings)[:2]
        campaign.record(suggestion.experiment_id, result)
        s, p = suggestion.settings, suggestion.prediction
        if isinstance(result, Measurement):
            hits = [t.diameter_nm for t in campaign.spec.targets if t.is_hit(result.diameter_nm, result.pdi_pct)]
            measured = (
                f"{result.diameter_nm:6.1f} nm ({100 * (result.diameter_nm / true_d - 1):+.1f} % vs true) "
                f"PDI {result.pdi_pct:4.1f} %  hits {hits or '-'}"
            )
        else:
            measured = f"failed: {result.reason}"
        print(
            f"{step:2d}  c={s['concentration_mg_ml']:5.2f} r={s['flow_ratio']:5.2f} T={s['temperature_c']:4.1f}  "
            f"pred {p['diameter_nm']:6.1f} ± {p['diameter_sd_nm']:4.1f} PDI {p['pdi_pct']:4.1f} ± "
            f"{p['pdi_sd_pct']:.1f} P(hit) {p['p_hit']:.2f}  |  true {true_d:6.1f} PDI {true_pdi:4.1f}  |  "
            f"measured {measured}"
        )


if __name__ == "__main__":
    main()
