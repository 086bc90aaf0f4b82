"""Fitting past runs: known parameters come back, columns and units are read right, bad files fail
with one sentence naming row and column, physics + GP wins cross-validation, and a fit seeds a campaign."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from supraopt import physics
from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.errors import InputError
from supraopt.fit import FitResult, droplet_law, fit_runs, seed_campaign
from supraopt.pastdata import Runs, read_runs
from supraopt.physics import Preset

CSPBBR3 = "cspbbr3-flow-focusing"
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "data" / "twin_runs.csv"
runner = CliRunner()


@pytest.fixture(scope="module")
def preset() -> Preset:
    return Preset.load(CSPBBR3)


def write_csv(path: Path, columns: dict[str, list[object]], header: str = "") -> Path:
    path.write_text(header + pd.DataFrame(columns).to_csv(index=False), encoding="utf-8")
    return path


BASE = {
    "concentration_mg_ml": [2.0, 4.0, 6.0],
    "flow_ratio": [2.0, 4.0, 8.0],
    "temperature_c": [25.0, 40.0, 60.0],
    "diameter_nm": [400.0, 450.0, 500.0],
    "pdi_pct": [5.0, 4.5, 6.0],
}


def runs_with(tmp_path: Path, preset: Preset, replace: dict[str, tuple[str, list[object]]], **options) -> Runs:
    """BASE with columns swapped for (header, values) as a lab might write them; header '' drops a column,
    keys not in BASE add one."""
    columns: dict[str, list[object]] = {}
    for header, values in {**{k: (k, v) for k, v in BASE.items()}, **replace}.values():
        if header:
            columns[header] = values
    return read_runs(write_csv(tmp_path / "runs.csv", columns), preset, **options)


# --- known parameters come back --------------------------------------------------------------------------


def sp_data(preset: Preset, theta: torch.Tensor, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """SP diameters from the physics with parameters ``theta``, 1.6 % lognormal noise (CV 5 %, 100 sized + SEM)."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(
        np.column_stack(
            [np.exp(rng.uniform(0, math.log(10), n)), np.exp(rng.uniform(0, math.log(20), n)), rng.uniform(20, 80, n)]
        ),
        dtype=torch.double,
    )
    noise_sd = math.sqrt(0.05**2 / 100 + 0.015**2)
    log_d = physics.log_sp_diameter_nm(x, theta, preset).numpy() + rng.normal(0, noise_sd, n)
    return pd.DataFrame(
        {
            "concentration_mg_ml": x[:, 0].numpy(),
            "flow_ratio": x[:, 1].numpy(),
            "temperature_c": x[:, 2].numpy(),
            "diameter_nm": np.exp(log_d),
            "pdi_pct": 5.0,
            "n_particles": 100,
        }
    )


def test_a_fit_says_when_the_runs_lie_far_outside_the_presets_prior(tmp_path, preset):
    mean, sd = preset.prior(physics.SIZE_PARAMETERS)
    notes = []
    for name, theta in [("close", mean + 1.5 * sd), ("inverted", mean.clone())]:
        if name == "inverted":  # droplets that grow with the flow ratio: 6.6 prior sd away
            theta[physics.SIZE_PARAMETERS.index("droplet_exponent_a")] = -0.2
        path = tmp_path / f"{name}.csv"
        sp_data(preset, theta).to_csv(path, index=False)
        notes.append([n for n in fit_runs(read_runs(path, preset), CSPBBR3, folds=0).notes if "far outside" in n])
    assert notes[0] == []
    assert len(notes[1]) == 1 and "supraparticle stage, diameter_nm" in notes[1][0]


def test_sp_fit_recovers_known_parameters_within_their_uncertainty(tmp_path, preset):
    """From SP sizes alone these combinations are identified; log_droplet_k and log_phi_inorg on their own, and
    droplet_temp_per_10c and packing_temp_per_10c on their own, are not (only through their priors)."""
    mean, sd = preset.prior(physics.SIZE_PARAMETERS)
    theta = mean + torch.tensor([1.0, -1.2, 1.0, -1.0, 1.5, 1.0], dtype=torch.double) * sd
    path = tmp_path / "known.csv"
    sp_data(preset, theta).to_csv(path, index=False)
    result = fit_runs(read_runs(path, preset), CSPBBR3, folds=0)
    assert result.sp is not None
    posterior = result.sp.posteriors["diameter_nm"]
    truth = dict(zip(physics.SIZE_PARAMETERS, theta.tolist(), strict=True))
    identified = [
        {"log_droplet_k": 1.0, "log_phi_inorg": -1 / 3},
        {"droplet_exponent_a": 1.0},
        {"exponent_delta": 1.0},
        {"droplet_temp_per_10c": 1.0, "packing_temp_per_10c": 1.0},
    ]
    for weights in identified:
        fitted, fitted_sd = posterior.combination(weights)
        true = sum(w * truth[name] for name, w in weights.items())
        prior_sd = math.sqrt(sum((w * preset.priors[name][1]) ** 2 for name, w in weights.items()))
        assert abs(fitted - true) < 3 * fitted_sd, (weights, fitted, fitted_sd, true)
        assert fitted_sd < 0.5 * prior_sd, (weights, fitted_sd, prior_sd)  # the data taught something


def test_droplet_fit_recovers_the_law_of_section_3(tmp_path, preset):
    rng = np.random.default_rng(3)
    n = 80
    frame = pd.DataFrame(
        {
            "orifice_width_um": rng.choice([50.0, 100.0, 150.0], n),
            "flow_ratio": np.exp(rng.uniform(math.log(2), math.log(30), n)),
            "capillary_number": np.exp(rng.uniform(math.log(0.02), math.log(0.5), n)),
            "aspect_ratio": rng.uniform(1.0, 3.0, n),
        }
    )
    inputs = ("flow_ratio", "capillary_number", "orifice_width_um")
    theta = torch.tensor([0.4, 0.25, -0.12, 0.2], dtype=torch.double)  # ln k, a, b, c
    law = droplet_law(inputs, None, 25.0)
    log_d = law(torch.tensor(frame[list(inputs)].to_numpy(), dtype=torch.double), theta[:3]).numpy()
    log_d += float(theta[3]) * np.log(frame["aspect_ratio"].to_numpy())  # the preset's [context_terms] aspect_ratio
    frame["droplet_um"] = np.exp(log_d + rng.normal(0, 0.02, n))
    path = tmp_path / "droplets.csv"
    frame.to_csv(path, index=False)
    result = fit_runs(read_runs(path, preset), CSPBBR3, folds=0)
    assert result.sp is None and result.droplet is not None
    posterior = result.droplet.posteriors["droplet_um"]
    assert posterior.names == ("log_droplet_k", "droplet_exponent_a", "capillary_exponent_b", "aspect_exponent_c")
    for name, true, fitted, fitted_sd in zip(posterior.names, theta, posterior.mean, posterior.sd, strict=True):
        assert abs(float(fitted - true)) < 3 * float(fitted_sd), (name, float(fitted), float(fitted_sd), float(true))


# --- columns and units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replace", "options", "column", "expected"),
    [
        ({"concentration_mg_ml": ("phi_i (%)", [0.05, 0.1, 0.2])}, {}, "concentration_mg_ml", [2.4, 4.8, 9.6]),
        ({"concentration_mg_ml": ("volume fraction", [5e-4, 1e-3, 2e-3])}, {}, "concentration_mg_ml", [2.4, 4.8, 9.6]),
        ({"concentration_mg_ml": ("C (g/L)", [2, 4, 6])}, {}, "concentration_mg_ml", [2.0, 4.0, 6.0]),
        ({"diameter_nm": ("SP size (µm)", [0.4, 0.45, 0.5])}, {}, "diameter_nm", [400.0, 450.0, 500.0]),
        ({"diameter_nm": ("Size", [0.4, 0.45, 0.5])}, {"units": {"diameter": "um"}}, "diameter_nm", [400, 450, 500]),
        ({"temperature_c": ("T (K)", [298.15, 313.15, 333.15])}, {}, "temperature_c", [25.0, 40.0, 60.0]),
        ({"temperature_c": ("T_K", [298.15, 313.15, 333.15])}, {}, "temperature_c", [25.0, 40.0, 60.0]),
        ({"temperature_c": ("T (C)", [25, 40, 60])}, {}, "temperature_c", [25.0, 40.0, 60.0]),
        ({"flow_ratio": ("Qd/Qc", [0.5, 0.25, 0.125])}, {}, "flow_ratio", [2.0, 4.0, 8.0]),
        ({"flow_ratio": ("FLOW RATIO", [2, 4, 8])}, {}, "flow_ratio", [2.0, 4.0, 8.0]),
        ({"pdi_pct": ("CV", [0.05, 0.045, 0.06])}, {"units": {"pdi": "fraction"}}, "pdi_pct", [5.0, 4.5, 6.0]),
        ({"pdi_pct": ("PDI", [0.01, 0.04, 0.09])}, {"units": {"pdi": "dls"}}, "pdi_pct", [10.0, 20.0, 30.0]),
        ({"pdi_pct": ("Polydispersity (%)", [5, 4.5, 6])}, {}, "pdi_pct", [5.0, 4.5, 6.0]),
        (
            {"diameter_nm": ("Größe", [400, 450, 500])},
            {"mapping": {"diameter": "größe"}},
            "diameter_nm",
            [400, 450, 500],
        ),
    ],
)
def test_columns_are_recognised_and_converted(tmp_path, preset, replace, options, column, expected):
    runs = runs_with(tmp_path, preset, replace, **options)
    assert runs.frame[column].tolist() == pytest.approx(expected)


def test_flow_ratio_from_two_flow_rates_in_different_units(tmp_path, preset):
    replace = {"flow_ratio": ("", []), "q_c": ("Q_c (µL/min)", [20.0, 40.0, 80.0]), "q_d": ("Qd (mL/h)", [0.6] * 3)}
    runs = runs_with(tmp_path, preset, replace)  # 0.6 mL/h = 10 µL/min
    assert runs.frame["flow_ratio"].tolist() == pytest.approx([2.0, 4.0, 8.0])


def test_droplet_data_of_unknown_layout_are_read_without_code_changes(tmp_path, preset):
    """A flow-focusing data set as published (DAFD-like headers), extra columns ignored, no SP columns."""
    columns = {
        "chip_number": [1, 2, 3],
        "orifice_size": [75, 100, 125],
        "aspect_ratio": [1, 1.5, 2],
        "expansion_ratio": [2, 3, 4],
        "flow_rate_ratio": [10, 13, 16],
        "capillary_number": [0.07, 0.13, 0.26],
        "regime": [1, 1, 2],
        "droplet_size": [66.2, 49.6, 46.6],
    }
    runs = read_runs(write_csv(tmp_path / "dafd.csv", columns), preset)
    assert not runs.has_sp and runs.has_droplets
    assert set(runs.mapping) == {"orifice_width_um", "aspect_ratio", "flow_ratio", "capillary_number", "droplet_um"}
    assert runs.frame["droplet_um"].tolist() == [66.2, 49.6, 46.6]


def test_parquet_and_comment_lines_are_read(tmp_path, preset):
    pd.DataFrame(BASE).to_parquet(tmp_path / "runs.parquet")
    assert read_runs(tmp_path / "runs.parquet", preset).frame["diameter_nm"].tolist() == BASE["diameter_nm"]
    runs = read_runs(write_csv(tmp_path / "c.csv", BASE, header="# simulated\n# by hand\n"), preset)
    assert runs.frame["row"].tolist() == [4, 5, 6]  # lines of the file: two comments, then the header


def test_failures_need_settings_but_no_result(tmp_path, preset):
    columns = {**BASE, "diameter_nm": [400.0, None, 500.0], "pdi_pct": [5.0, None, 6.0], "failed": ["", "hollow", "0"]}
    runs = read_runs(write_csv(tmp_path / "f.csv", columns), preset)
    assert runs.frame["failed"].tolist() == ["", "hollow", ""]


# --- bad input: one sentence naming the row and the column ------------------------------------------------------


BAD = [
    ({"diameter_nm": ("SP diameter (nm)", [400, "big", 500])}, {}, r"row 3, column 'SP diameter \(nm\)': 'big' is not"),
    ({"concentration_mg_ml": ("c (mg/mL)", [2.0, None, 6.0])}, {}, r"row 3, column 'c \(mg/mL\)': empty or NaN"),
    ({"diameter_nm": ("diameter_nm", [400, "NaN", 500])}, {}, r"row 3, column 'diameter_nm': empty or NaN"),
    ({"concentration_mg_ml": ("c (mg/mL)", [2.0, 4.0, -1.0])}, {}, r"row 4, column 'c \(mg/mL\)': -1 mg/mL is not a"),
    ({"temperature_c": ("T (K)", [298.0, -5.0, 300.0])}, {}, r"row 3, column 'T \(K\)': -5 K is not a plausible"),
    ({"pdi_pct": ("CV (%)", [5.0, 300.0, 6.0])}, {}, r"row 3, column 'CV \(%\)': 300 % is not a plausible"),
    ({"diameter_nm": ("Size", [0.4, 0.45, 0.5])}, {}, r"row 2, column 'Size': 0.4 nm is not a plausible SP diameter"),
    ({"n": ("n sized", [100, 100.5, 80])}, {}, r"row 3, column 'n sized': 100.5 is not a whole number"),
    ({"concentration_mg_ml": ("", [])}, {}, r"no NC concentration column .* --map concentration=COLUMN"),
    ({"t2": ("Temp", [1, 2, 3])}, {}, r"columns 'temperature_c' and 'Temp' all look like temperature"),
    (
        {"diameter_nm": ("SP size (furlongs)", [1, 2, 3])},
        {},
        r"column 'SP size \(furlongs\)' gives the unit 'furlongs'",
    ),
    ({"pdi_pct": ("PDI", [0.05, 0.04, 0.06])}, {}, r"column 'PDI' holds values of at most 1: .*--unit pdi=fraction"),
    ({}, {"mapping": {"diameter": "nope"}}, r"--map diameter='nope' names no column"),
    ({}, {"mapping": {"colour": "x"}}, r"unknown field 'colour'"),
    ({"diameter_nm": ("", [])}, {}, r"no SP diameter or droplet diameter column"),
]


@pytest.mark.parametrize(("replace", "options", "message"), BAD)
def test_bad_input_is_one_sentence_naming_row_and_column(tmp_path, preset, replace, options, message):
    with pytest.raises(InputError, match=message) as caught:
        runs_with(tmp_path, preset, replace, **options)
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")


def test_cli_bad_input_is_one_error_line_with_exit_code_1(tmp_path):
    path = write_csv(tmp_path / "bad.csv", {**BASE, "diameter_nm": [400, "big", 500]})
    result = runner.invoke(app, ["fit", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: row 3, column 'diameter_nm'"), result.output


def test_cli_missing_file_and_lonely_into(tmp_path):
    result = runner.invoke(app, ["fit", str(tmp_path / "none.csv")])
    assert result.exit_code == 1 and result.output.startswith("error:") and "does not exist" in result.output
    result = runner.invoke(app, ["fit", str(EXAMPLE), "--into", str(tmp_path / "c")])
    assert result.exit_code == 1 and "--target-nm" in result.output


# --- cross-validation ------------------------------------------------------------------------------------------------


def departing_droplets(n: int, seed: int) -> pd.DataFrame:
    """Droplets from the section 3 law plus what it lacks: curvature in ln r and a jump where the thread jets."""
    rng = np.random.default_rng(seed)
    width = rng.choice([50.0, 100.0, 150.0], n)
    ratio = np.exp(rng.uniform(math.log(2), math.log(30), n))
    ca = np.exp(rng.uniform(math.log(0.02), math.log(0.5), n))
    jetting = 1 / (1 + np.exp(-(np.log(ca * np.sqrt(ratio)) - math.log(0.6)) / 0.15))
    log_d = np.log(1.1 * width) - 0.3 * np.log(ratio) - 0.15 * np.log(ca) + 0.12 * (np.log(ratio) - 2) ** 2
    log_d += 0.45 * jetting + rng.normal(0, 0.03, n)
    return pd.DataFrame({"W (um)": width, "Qc/Qd": ratio, "Ca": ca, "D_drop (um)": np.exp(log_d)})


def test_physics_plus_gp_beats_physics_only_and_gp_only_on_droplets(tmp_path, preset):
    path = tmp_path / "droplets.csv"
    departing_droplets(160, seed=5).to_csv(path, index=False)
    result = fit_runs(read_runs(path, preset), CSPBBR3, folds=4, seed=0)
    assert result.droplet is not None and result.droplet.cv is not None
    table = result.droplet.cv.table
    for metric in ("droplet diameter RMSE (µm)", "droplet diameter MAPE (%)"):
        best = table[metric].idxmin()
        assert best == "physics + GP", table.to_string()
    assert 0.75 <= table.loc["physics + GP", "droplet diameter 90% coverage"] <= 1.0


# --- transfer: a fit seeds a new campaign --------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_fit() -> FitResult:
    preset = Preset.load(CSPBBR3)
    return fit_runs(read_runs(EXAMPLE, preset), CSPBBR3, folds=0)


def test_into_creates_a_campaign_with_the_fitted_prior_that_suggests(tmp_path, example_fit):
    out, directory = tmp_path / "fit", tmp_path / "next"
    args = ["fit", str(EXAMPLE), "--folds", "0", "--no-plots", "--out", str(out), "--into", str(directory)]
    result = runner.invoke(app, [*args, "--target-nm", "450"])
    assert result.exit_code == 0, result.output
    fitted = pd.read_csv(out / "parameters.csv")
    fitted = fitted[fitted["stage"] == "supraparticle"].set_index("parameter")
    base = Preset.load(CSPBBR3)
    with Campaign.open(directory) as campaign:
        assert (directory / "prior.toml").is_file()
        assert campaign.ledger.experiments() == []  # the past runs live in the prior, not the ledger
        for name, row in fitted.iterrows():
            mean, sd = campaign.preset.priors[str(name)]
            assert mean == pytest.approx(row["posterior_mean"], rel=1e-4, abs=1e-6)
            assert sd == pytest.approx(max(row["posterior_sd"], 0.5 * base.priors[str(name)][1]), rel=1e-4)
        for name, pair in example_fit.prior_updates().items():
            assert campaign.preset.priors[name] == pytest.approx(pair, rel=1e-4, abs=1e-6)
        [suggestion] = campaign.suggest()
    assert campaign.space.validate(suggestion.settings)
    assert 300 < suggestion.prediction["diameter_nm"] < 600
    with pytest.raises(InputError, match="already holds a campaign"):
        seed_campaign(example_fit, directory, 450.0)


def test_droplet_data_with_other_inputs_cannot_seed_a_campaign(tmp_path, preset):
    path = tmp_path / "droplets.csv"
    departing_droplets(30, seed=1).to_csv(path, index=False)
    result = fit_runs(read_runs(path, preset), CSPBBR3, folds=0)
    with pytest.raises(InputError, match="--into needs SP diameters"):
        seed_campaign(result, tmp_path / "c", 450.0)
    assert not (tmp_path / "c").exists()


# --- the walk-through ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fit_past_data.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "supraparticle_maps.png").is_file()
    assert "log_phi_inorg" in done.stdout
