"""How long the ``supraopt`` commands take as whole processes, as ratios to a bare torch + BoTorch import.

    nice .venv/bin/python benchmarks/cli_speed.py            # median of 5, prints a Markdown table
    nice .venv/bin/python benchmarks/cli_speed.py --repeats 9 --runs 50 --json speed.json

Every command runs as a new process (what a chemist or a script pays), on a campaign of ``--runs``
measured runs drawn from the simulated twin at random settings. The commands are run round-robin,
so that a busy machine slows all of them alike, and every figure is reported next to
``python -c "import torch, botorch"`` timed in the same rounds: the ratio is what carries over
between machines. Commands that change the campaign (suggest, record, init) get a fresh copy of it
each time, made outside the timing. One untimed round comes first, and the commands run with
Python's bytecode cache on (``PYTHONDONTWRITEBYTECODE`` removed from their environment), as on a
chemist's machine: otherwise every process would compile supraopt's own modules again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from supraopt.campaign import Campaign
from supraopt.rigs.simulated import World

PRESET = "cspbbr3-flow-focusing"
BASELINE = "python -c 'import torch, botorch'"


def make_campaign(folder: Path, runs: int, seed: int = 0) -> None:
    """A campaign with ``runs`` measured runs of the twin at random settings, plus one pending E-id."""
    world = World.default(PRESET)
    rng = np.random.default_rng(seed)
    with Campaign.create(folder, PRESET, 450.0, seed=seed) as campaign:
        for _ in range(runs):
            settings = {
                name: round(float(rng.uniform(low, high)), 3) for name, (low, high) in campaign.space.bounds.items()
            }
            campaign.add_run(settings, world.sample(settings, rng))
        campaign.ledger.add_pending([({"concentration_mg_ml": 4.0, "flow_ratio": 3.0, "temperature_c": 30.0}, {})])


def commands(work: Path, campaign: Path, pending: str) -> dict[str, tuple[list[str], bool]]:
    """Name -> (arguments after ``supraopt``, needs a fresh copy of the campaign)."""
    csv = work / "results.csv"
    csv.write_text(
        "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct,n_particles\n"
        + "".join(f"{3 + i * 0.2:.1f},3,{25 + i},{430 + i * 5},4.5,150\n" for i in range(10))
    )
    c = str(campaign)
    return {
        "--help": (["--help"], False),
        "init": (["init", str(work / "new")], True),
        "status --json": (["status", c, "--json"], False),
        "status (table)": (["status", c], False),
        "export --csv": (["export", c, "--csv", str(work / "export.csv"), "--force"], False),
        "record (one result)": (["record", c, pending, "--diameter-nm", "441", "--pdi", "4.8"], True),
        "record --csv (10 rows)": (["record", c, "--csv", str(csv)], True),
        "suggest --json": (["suggest", c, "--json"], True),
    }


CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=CHILD_ENV)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each figure is the median (default 5)")
    parser.add_argument("--runs", type=int, default=50, help="measured runs in the campaign (default 50)")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    args = parser.parse_args()
    exe = Path(sys.executable).with_name("supraopt")
    supraopt = [str(exe)] if exe.exists() else [sys.executable, "-m", "supraopt.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        master = work / "master"
        make_campaign(master, args.runs)
        with Campaign.open(master) as campaign:
            pending = campaign.ledger.experiments()[-1].id
        campaign_dir = work / "campaign"
        shutil.copytree(master, campaign_dir)
        todo = commands(work, campaign_dir, pending)
        times: dict[str, list[float]] = {BASELINE: [], **{name: [] for name in todo}}
        load_before = os.getloadavg()[0]
        for round_no in range(args.repeats + 1):  # round 0 warms the caches and is not counted
            elapsed = {BASELINE: timed([sys.executable, "-c", "import torch, botorch"])}
            for name, (argv, fresh) in todo.items():
                if fresh:
                    shutil.rmtree(campaign_dir)
                    shutil.copytree(master, campaign_dir)
                    shutil.rmtree(work / "new", ignore_errors=True)
                elapsed[name] = timed([*supraopt, *argv])
            if round_no:
                for name, value in elapsed.items():
                    times[name].append(value)
        load_after = os.getloadavg()[0]
    base = statistics.median(times[BASELINE])
    print(
        f"Whole processes, median of {args.repeats}, campaign of {args.runs} runs ({sys.platform}, Python {sys.version.split()[0]}); "
        f"load average {load_before:.1f} before, {load_after:.1f} after on {os.cpu_count()} cores"
    )
    print()
    print(f"| command | seconds | ÷ bare `import torch, botorch` ({base:.2f} s) |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.2f} | {median / base:.2f}× |")
    if args.json:
        record = {"repeats": args.repeats, "runs": args.runs, "load": [load_before, load_after], "times_s": times}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
