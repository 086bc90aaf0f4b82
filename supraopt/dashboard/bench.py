"""A synthetic campaign of any size, and the dashboard's speed benchmark on it.

    python -m supraopt.dashboard.bench --runs 1000

builds a campaign of ``--runs`` finished experiments (settings drawn at random in the preset's
envelope, results from the simulated twin, predictions = truth with noise) plus two open ones, and
times the dashboard's pages on it (a uvicorn server in this process; request to last byte over
loopback HTTP, no browser). The tests use :func:`synthetic_campaign` too.
"""

from __future__ import annotations

import argparse
import math
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from supraopt.ledger import Ledger
from supraopt.records import PARAMETERS, Measurement
from supraopt.rigs.simulated import World
from supraopt.spec import SPEC_FILE, CampaignSpec, Target, default_bounds

MODEL = "cspbbr3-flow-focusing"


def synthetic_campaign(
    directory: Path,
    runs: int,
    *,
    open_runs: int = 2,
    seed: int = 0,
    log: bool = True,
    targets: tuple[Target, ...] = (Target(450.0, 0.03, 6.0),),
) -> Path:
    """Write a campaign folder with ``runs`` finished experiments, ``open_runs`` pending ones and a run.log."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = default_bounds(MODEL)
    spec = CampaignSpec(name=directory.name, model=MODEL, targets=targets, bounds=bounds, seed=seed)
    (directory / SPEC_FILE).write_text(spec.to_toml(), encoding="utf-8")
    world, rng = World.default(), np.random.default_rng(seed)
    items = []
    for k in range(runs + open_runs):
        shrink = 1.0 / (1.0 + 4.0 * k / max(runs, 1))  # later runs closer to the middle, like a converging campaign
        settings = {}
        for name in PARAMETERS:
            low, high = bounds[name]
            u = 0.5 + (rng.random() - 0.5) * shrink
            value = low * (high / low) ** u if name != "temperature_c" else low + (high - low) * u
            settings[name] = round(value, 3 if name == "concentration_mg_ml" else 2)
        diameter, pdi, _reason = world.truth(settings)
        sd = diameter * (0.25 * shrink + 0.02)
        prediction = {
            "diameter_nm": round(diameter * math.exp(rng.normal(0, 0.1 * shrink)), 1),
            "diameter_sd_nm": round(sd, 1),
            "pdi_pct": round(pdi * math.exp(rng.normal(0, 0.15)), 2),
            "pdi_sd_pct": round(0.15 * pdi, 2),
            "p_feasible": round(float(rng.uniform(0.7, 1.0)), 3),
            "p_hit": round(float(rng.uniform(0.0, 0.6)), 3),
        }
        items.append((settings, prediction))
    ledger = Ledger(f"sqlite:///{(directory / 'ledger.sqlite').resolve()}")
    lines = []
    try:
        ids = ledger.add_pending(items)
        for experiment_id, (settings, _prediction) in zip(ids[:runs], items, strict=False):
            result = world.sample(settings, rng)
            if isinstance(result, Measurement):
                ledger.record_measurement(experiment_id, result)
                lines.append(f"{experiment_id} measured {result.diameter_nm:.0f} nm, PDI {result.pdi_pct:.1f} %")
            else:
                ledger.record_failure(experiment_id, result)
                lines.append(f"{experiment_id} failed: {result.reason}")
    finally:
        ledger.close()
    if log:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        text = "".join(f"{now} {line}\n" for line in [f"-- started budget {runs + 10}, batch 1", *lines])
        (directory / "run.log").write_text(text, encoding="utf-8")
    return directory


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, ws="none", lifespan="off", log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def time_pages(directory: Path, repeats: int = 5) -> dict[str, tuple[float, int]]:
    """Median seconds and size in bytes per page (after one warm-up request each): request to last byte
    over loopback HTTP."""
    import httpx

    from supraopt.dashboard.app import create_app
    from supraopt.dashboard.data import Board

    board = Board([directory])
    slug = next(iter(board.campaigns))
    paths = {"overview /": "/", "campaign page": f"/c/{slug}", "live update": f"/c/{slug}/live"}
    paths["version poll"] = "/api/versions"
    out = {}
    try:
        with serving(create_app(board)) as url, httpx.Client(base_url=url) as client:
            for label, path in paths.items():
                size = len(client.get(path).raise_for_status().content)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    client.get(path).raise_for_status()
                    times.append(time.perf_counter() - start)
                out[label] = (statistics.median(times), size)
    finally:
        board.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time the dashboard's pages on a synthetic campaign.")
    parser.add_argument("--runs", type=int, default=1000, help="finished experiments in the campaign (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per page (median reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        directory = synthetic_campaign(Path(tmp) / f"synthetic-{args.runs}", args.runs)
        print(f"built a campaign of {args.runs} finished + 2 open runs in {time.perf_counter() - start:.1f} s")
        for label, (seconds, size) in time_pages(directory, args.repeats).items():
            print(f"{label:>15}: {seconds * 1000:7.1f} ms (median of {args.repeats}), {size / 1000:.0f} kB")


if __name__ == "__main__":
    main()
