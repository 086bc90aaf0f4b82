"""Regenerate the example data in ``examples/data/``. Everything here is SIMULATED, not measured.

* ``twin_runs.csv`` — 42 runs of supraopt's digital twin (``World.random(2)`` on the CsPbBr3
  flow-focusing preset, in-line droplet camera on), headers as a chemist might write them,
  failures included. The twin holds physics the prior lacks (a dripping-to-jetting bend in the
  droplet law, looser packing when warm, a CV rise near the hollow edge).
* ``droplets_flow_focusing.csv`` — 240 flow-focusing droplet diameters over orifice width,
  flow-rate ratio and capillary number, from the scaling law of SCIENCE.md section 3 plus what
  the law lacks: curvature in ln(Q_c/Q_d) and a jump to larger droplets where the thread jets.
  3 % noise.

Run: ``python examples/make_example_data.py`` (seeded: the files come out identical).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from supraopt.records import Measurement
from supraopt.rigs.simulated import World

DATA = Path(__file__).resolve().parent / "data"
TWIN_HEADER = (
    "# SIMULATED with supraopt's digital twin (World.random(2), preset cspbbr3-flow-focusing, droplet camera on);\n"
    "# not measurements. Regenerate with: python examples/make_example_data.py\n"
)
DROPLET_HEADER = (
    "# SIMULATED flow-focusing droplet sizes (scaling law + curvature in ln Qc/Qd + a jetting jump, 3 % noise);\n"
    "# not measurements. Regenerate with: python examples/make_example_data.py\n"
)


def twin_runs(n: int = 42, seed: int = 2) -> pd.DataFrame:
    """``n`` runs of a random twin world at log-uniform concentrations and flow ratios, uniform temperatures."""
    world = dataclasses.replace(World.random(seed), camera=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = float(np.exp(rng.uniform(np.log(1.7), np.log(8.5))))
        r = float(np.exp(rng.uniform(np.log(1.0), np.log(20.0))))
        t = float(rng.uniform(20.0, 80.0))
        result = world.sample({"concentration_mg_ml": c, "flow_ratio": r, "temperature_c": t}, rng)
        row = {"Sample": f"S{i + 1:02d}", "c (mg/mL)": round(c, 3), "Qc/Qd": round(r, 2), "T (°C)": round(t, 1)}
        if isinstance(result, Measurement):
            row |= {
                "SP diameter (nm)": round(result.diameter_nm, 1),
                "CV (%)": round(result.pdi_pct, 2),
                "n sized": result.n_particles,
                "droplet (µm)": round(result.droplet_um or float("nan"), 3),
                "failure": "",
            }
        else:
            row["failure"] = result.reason
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["n sized"] = frame["n sized"].astype("Int64")  # whole numbers, blank where the run failed
    return frame


def droplet_runs(n: int = 240, seed: int = 11, noise: float = 0.03) -> pd.DataFrame:
    """Flow-focusing droplets: ``d = 1.1 w r^-0.3 Ca^-0.15`` times a bend in ln r and a jetting jump."""
    rng = np.random.default_rng(seed)
    width = rng.choice([50.0, 100.0, 150.0], n)
    ratio = np.exp(rng.uniform(np.log(2.0), np.log(30.0), n))
    ca = np.exp(rng.uniform(np.log(0.02), np.log(0.5), n))
    jetting = 1.0 / (1.0 + np.exp(-(np.log(ca * np.sqrt(ratio)) - np.log(0.6)) / 0.15))
    log_d = (
        np.log(1.1 * width)
        - 0.3 * np.log(ratio)
        - 0.15 * np.log(ca)
        + 0.12 * (np.log(ratio) - np.log(8.0)) ** 2
        + 0.45 * jetting
    )
    diameter = np.exp(log_d + rng.normal(0.0, noise, n))
    return pd.DataFrame(
        {
            "Orifice width (um)": width,
            "Flow rate ratio (Qoil/Qwater)": ratio.round(3),
            "Capillary number": ca.round(4),
            "Droplet diameter (um)": diameter.round(2),
        }
    )


def write(frame: pd.DataFrame, path: Path, header: str) -> None:
    path.write_text(header + frame.to_csv(index=False), encoding="utf-8")


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    write(twin_runs(), DATA / "twin_runs.csv", TWIN_HEADER)
    write(droplet_runs(), DATA / "droplets_flow_focusing.csv", DROPLET_HEADER)
    print(f"Wrote {DATA / 'twin_runs.csv'} and {DATA / 'droplets_flow_focusing.csv'}.")
