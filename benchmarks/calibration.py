"""Is supraopt's size prediction for the experiment it proposes as uncertain as it claims?

    nice .venv/bin/python benchmarks/calibration.py --spread 1.5 --seed 0 --worlds 12
    nice .venv/bin/python benchmarks/calibration.py --spread 1.5 --seed 2 --worlds 12 --rows rows.jsonl

Runs the single-target campaigns of ``supraopt benchmark`` (same worlds, targets and seeds) for
``--steps`` experiments or until the first hit, and compares every proposal's stored prediction
with what the world then measured. Per experiment number it prints: campaigns measured, the RMS
and mean of ``z = ln(measured / predicted) / sd`` (1 and 0 when the size predictive is
calibrated), the median predicted relative sd, the mean predicted P(hit) against the fraction
that hit, and which part of the hit failed (size band or PDI ceiling). A predicted P(hit) equal to
the observed rate means the acquisition's criterion is honest: an experiment that misses more
often than predicted points at an overconfident model, one that hits as often as predicted at
uncertainty the data (and the priors) really leave.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supraopt.benchmark import make_tasks, task_campaign
from supraopt.campaign import miss_distance
from supraopt.records import PARAMETERS, Measurement
from supraopt.rigs.simulated import World


def campaign_rows(task: Any, steps: int) -> list[dict[str, Any]]:
    """One row per experiment of one campaign: settings, prediction, outcome."""
    world = World.random(task.world_seed, task.preset, task.spread)
    rng = np.random.default_rng(task.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        campaign = task_campaign(task, Path(tmp) / "c")
        with campaign:
            for step in range(1, steps + 1):
                [suggestion] = campaign.suggest(1)
                result = world.sample(suggestion.settings, rng)
                campaign.record(suggestion.experiment_id, result)
                p = suggestion.prediction
                row: dict[str, Any] = {
                    "world_seed": task.world_seed,
                    "target_nm": task.target_nm,
                    "step": step,
                    **suggestion.settings,
                    "predicted_nm": p["diameter_nm"],
                    "predicted_sd_rel": p["diameter_sd_nm"] / p["diameter_nm"],
                    "p_hit": p["p_hit"],
                    "true_nm": float(world.diameter_nm(*(suggestion.settings[k] for k in PARAMETERS))),
                }
                if isinstance(result, Measurement):
                    row |= {
                        "measured_nm": result.diameter_nm,
                        "pdi_pct": result.pdi_pct,
                        "z": math.log(result.diameter_nm / p["diameter_nm"]) / row["predicted_sd_rel"],
                        "size_in_band": abs(result.diameter_nm / task.target_nm - 1) <= task.tolerance,
                        "pdi_ok": result.pdi_pct <= task.pdi_max_pct,
                        "hit": miss_distance(campaign.spec.target, result) <= 1.0,
                    }
                else:
                    row |= {"failure": result.reason, "hit": False}
                rows.append(row)
                if row["hit"]:
                    break
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| experiment | measured | RMS z | mean z | median sd | mean P(hit) | hit | size in band | PDI ok |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for step in sorted({r["step"] for r in rows}):
        group = [r for r in rows if r["step"] == step and "z" in r]
        if not group:
            continue
        z = [r["z"] for r in group]
        lines.append(
            f"| {step} | {len(group)} | {math.sqrt(statistics.fmean(v * v for v in z)):.2f} | {statistics.fmean(z):.2f} "
            f"| {100 * statistics.median(r['predicted_sd_rel'] for r in group):.1f} % "
            f"| {statistics.fmean(r['p_hit'] for r in group):.2f} | {statistics.fmean(r['hit'] for r in group):.2f} "
            f"| {statistics.fmean(r['size_in_band'] for r in group):.2f} | {statistics.fmean(r['pdi_ok'] for r in group):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=12)
    parser.add_argument("--targets", type=int, default=2)
    parser.add_argument("--spread", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4, help="experiments per campaign at most")
    parser.add_argument("--rows", type=Path, help="also write every row as JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for task in make_tasks(args.worlds, args.targets, ["supraopt"], args.steps, args.seed, args.spread, 0.03, 6.0):
        rows += campaign_rows(task, args.steps)
    if args.rows:
        args.rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
