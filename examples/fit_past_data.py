"""Walk-through: learn from past runs, compare the models, look at the pictures, seed the next campaign.

    python examples/fit_past_data.py [OUT_DIR]

The data in ``examples/data/`` are SIMULATED (see ``examples/make_example_data.py``): 42 runs of
supraopt's digital twin, and 240 flow-focusing droplet sizes from a scaling law with a regime
change. The same steps on the command line::

    supraopt fit examples/data/twin_runs.csv --out fit-results --into next-campaign --target-nm 450
    supraopt fit examples/data/droplets_flow_focusing.csv --out droplet-results
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd

from supraopt import plots
from supraopt.fit import fit_runs, seed_campaign, write_tables
from supraopt.pastdata import read_runs
from supraopt.physics import Preset

DATA = Path(__file__).resolve().parent / "data"
MODEL = "cspbbr3-flow-focusing"


def main(out: Path) -> None:
    pd.set_option("display.width", 160)
    preset = Preset.load(MODEL)

    # 1. Read the lab's table. Headers such as 'c (mg/mL)', 'Qc/Qd', 'T (°C)', 'CV (%)' and 'droplet (µm)'
    #    are recognised with their units; others are named with mapping={'diameter': 'my column'} and
    #    units={'diameter': 'um'} (on the command line: --map diameter='my column' --unit diameter=um).
    runs = read_runs(DATA / "twin_runs.csv", preset)
    print(
        "Columns read:", ", ".join(f"{field} <- {column!r} [{unit}]" for field, (column, unit) in runs.mapping.items())
    )

    # 2. Fit: droplet stage (flow -> droplet), then SP stage (droplet law + mass balance -> SP size, PDI),
    #    each with a GP residual; 5-fold cross-validation of physics only, GP only and physics + GP.
    result = fit_runs(runs, MODEL, folds=5)
    for note in result.notes:
        print("note:", note)
    columns = ["stage", "parameter", "prior_mean", "prior_sd", "posterior_mean", "posterior_sd", "reads_as"]
    print("\nPhysics parameters (MAP and Laplace sd) next to the preset's prior:")
    print(result.parameters()[columns].round(4).to_string(index=False))
    for stage in result.stages():
        if stage.cv is not None:
            print(f"\n{stage.stage.name} stage, {stage.cv.folds}-fold cross-validation:")
            print(stage.cv.table.round(3).to_string())

    # 3. Droplet data from another lab, other headers, no SP columns: only the droplet stage is fitted.
    droplets = fit_runs(read_runs(DATA / "droplets_flow_focusing.csv", preset), MODEL, folds=5)
    assert droplets.droplet is not None and droplets.droplet.cv is not None
    print("\nExternal flow-focusing droplets, 5-fold cross-validation:")
    print(droplets.droplet.cv.table.round(3).to_string())

    # 4. Tables and pictures.
    written = write_tables(result, out) + plots.write(plots.fit_figures(result), out)
    written += plots.write({f"external_{k}": f for k, f in plots.fit_figures(droplets).items()}, out)
    print(f"\nWrote {len(written)} files to {out}")

    # 5. Transfer: a new campaign whose prior is this fit (its prior.toml), and its first suggestion.
    with seed_campaign(result, out / "next-campaign", target_nm=450.0) as campaign:
        [suggestion] = campaign.suggest()
    p = suggestion.prediction
    print(
        f"Next campaign's first suggestion: {suggestion.settings} -> "
        f"{p['diameter_nm']:.0f} ± {p['diameter_sd_nm']:.0f} nm, P(hit) {p['p_hit']:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
