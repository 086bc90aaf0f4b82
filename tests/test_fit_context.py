"""Contexts in past data: no column is dropped silently, a category's level offsets and a named numeric term come
back, bad context input is one sentence, the small-data benchmark predicts held-out runs with honest intervals,
and ``fit --into`` refuses what cannot transfer before fitting anything."""

from __future__ import annotations

import math
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
from supraopt.fit import fit_runs, holdout, seed_campaign
from supraopt.pastdata import parse_contexts, read_runs
from supraopt.physics import Preset

CSPBBR3 = "cspbbr3-flow-focusing"
runner = CliRunner()
CHIP_OFFSETS = {"A": -0.15, "B": 0.0, "C": 0.2}
"""True ln-k offset of each chip: a chip swap moves every droplet by 15-20 %."""


@pytest.fixture(scope="module")
def preset() -> Preset:
    return Preset.load(CSPBBR3)


def chip_droplets(n: int, seed: int, lonely: bool = False) -> pd.DataFrame:
    """Droplets of the section 3 law on three chips and several expansion ratios, 3 % noise, plus columns a lab
    writes down that are not fields: a run id, a note, the room temperature. ``lonely`` adds a chip D with one run."""
    rng = np.random.default_rng(seed)
    chip = rng.choice(list(CHIP_OFFSETS), n)
    ratio = np.exp(rng.uniform(math.log(2), math.log(30), n))
    ca = np.exp(rng.uniform(math.log(0.02), math.log(0.5), n))
    expansion = rng.choice([2.0, 3.0, 4.0, 6.0], n)
    log_d = 0.3 + np.log(100.0) - 0.3 * np.log(ratio) - 0.15 * np.log(ca) + 0.25 * np.log(expansion)
    log_d += np.array([CHIP_OFFSETS[c] for c in chip]) + rng.normal(0, 0.03, n)
    frame = pd.DataFrame(
        {
            "run_id": [f"R{i:03d}" for i in range(n)],
            "chip": chip,
            "Qc/Qd": ratio,
            "Ca": ca,
            "W (um)": 100.0,
            "expansion_ratio": expansion,
            "room_c": rng.uniform(20, 25, n).round(1),
            "note": [f"run {i} fine" for i in range(n)],
            "D_drop (um)": np.exp(log_d),
        }
    )
    if lonely:
        frame.loc[0, "chip"] = "D"
    return frame


def write(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


# --- no column is dropped silently ------------------------------------------------------------------------------


def test_every_unused_column_is_listed_with_the_flag_that_uses_it(tmp_path, preset):
    runs = read_runs(write(tmp_path / "d.csv", chip_droplets(40, seed=0)), preset)
    hints = {u.column: u.hint for u in runs.unused}
    assert set(hints) == {"run_id", "chip", "expansion_ratio", "room_c", "note"}
    assert "--context chip" in hints["chip"] and "category" in hints["chip"]
    assert "--context expansion_ratio:category" in hints["expansion_ratio"]  # 4 numeric levels: either way
    assert hints["room_c"].startswith("--context room_c")
    assert "not usable" in hints["run_id"] and "not usable" in hints["note"]
    runs = read_runs(write(tmp_path / "d.csv", chip_droplets(40, seed=0)), preset, contexts=parse_contexts(["chip"]))
    assert "chip" not in {u.column for u in runs.unused}


def test_cli_lists_unused_columns_and_says_which_contexts_the_cv_used(tmp_path):
    path = write(tmp_path / "d.csv", chip_droplets(40, seed=0))
    args = ["fit", str(path), "--folds", "2", "--no-plots", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--context", "chip"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Columns not used" in result.output and "room_c" in result.output and "note" in result.output
    assert "cross-validation (contexts: chip)" in result.output
    assert "offsets on log_droplet_k" in result.output


# --- contexts enter the model ---------------------------------------------------------------------------------------


def test_category_offsets_and_a_named_numeric_term_are_recovered(tmp_path, preset):
    path = write(tmp_path / "d.csv", chip_droplets(120, seed=1, lonely=True))
    contexts = parse_contexts(["chip", "expansion_ratio"])
    result = fit_runs(read_runs(path, preset, contexts=contexts), CSPBBR3, folds=0)
    assert result.droplet is not None
    post = result.droplet.posteriors["droplet_um"]
    assert post.names[:4] == ("log_droplet_k", "droplet_exponent_a", "capillary_exponent_b", "expansion_exponent_e")
    i = post.names.index
    e, e_sd = float(post.mean[i("expansion_exponent_e")]), float(post.sd[i("expansion_exponent_e")])
    assert abs(e - 0.25) < 3 * e_sd and e_sd < 0.1
    # offsets are identified relative to each other (ln k carries their common part)
    for a, b in (("A", "C"), ("B", "C"), ("A", "B")):
        fitted, sd = post.combination({f"log_droplet_k[chip={a}]": 1.0, f"log_droplet_k[chip={b}]": -1.0})
        true = CHIP_OFFSETS[a] - CHIP_OFFSETS[b]
        assert abs(fitted - true) < 3 * sd and sd < 0.05, (a, b, fitted, sd, true)
    # chip D has one run: its offset is uncertain, shrunk towards the population, not pinned by that run
    _, lonely_sd = post.combination({"log_droplet_k[chip=D]": 1.0, "log_droplet_k[chip=B]": -1.0})
    _, crowded_sd = post.combination({"log_droplet_k[chip=A]": 1.0, "log_droplet_k[chip=B]": -1.0})
    assert lonely_sd > 2 * crowded_sd, (lonely_sd, crowded_sd)
    assert any("chip (category, 4 levels)" in line for line in result.context_summary())


def test_an_nc_batch_shifts_the_packing_of_sp_sizes(tmp_path, preset):
    """SP sizes from three NC batches whose packing differs by +-25 %: offsets on log_phi_inorg come back."""
    rng = np.random.default_rng(5)
    n = 45
    batch = np.repeat(["b1", "b2", "b3"], n // 3)
    shift = {"b1": -0.25, "b2": 0.0, "b3": 0.25}
    x = np.column_stack(
        [np.exp(rng.uniform(0, math.log(10), n)), np.exp(rng.uniform(0, math.log(20), n)), rng.uniform(20, 80, n)]
    )
    theta = preset.prior(physics.SIZE_PARAMETERS)[0].repeat(n, 1)
    theta[:, 3] += torch.tensor([shift[b] for b in batch], dtype=torch.double)
    log_d = torch.stack([physics.log_sp_diameter_nm(torch.tensor(x[i : i + 1]), theta[i], preset)[0] for i in range(n)])
    frame = pd.DataFrame({"c (mg/mL)": x[:, 0], "Qc/Qd": x[:, 1], "T (C)": x[:, 2], "batch": batch})
    frame["diameter_nm"] = [f"{v:.2f}" for v in np.exp(log_d.numpy() + rng.normal(0, 0.015, n))]
    frame["failed"] = ""
    failed = pd.DataFrame(
        [{"c (mg/mL)": 3.0, "Qc/Qd": 4.0, "T (C)": 25.0, "batch": "b1", "diameter_nm": "", "failed": "hollow"}]
    )
    frame = pd.concat([frame, failed], ignore_index=True)  # a failed run: the feasibility model sees settings only
    path = write(tmp_path / "sp.csv", frame)
    result = fit_runs(read_runs(path, preset, contexts=parse_contexts(["batch"])), CSPBBR3, folds=0)
    assert result.sp is not None and result.feasibility is not None
    post = result.sp.posteriors["diameter_nm"]
    fitted, sd = post.combination({"log_phi_inorg[batch=b3]": 1.0, "log_phi_inorg[batch=b1]": -1.0})
    assert abs(fitted - 0.5) < 3 * sd and sd < 0.1, (fitted, sd)
    assert "log_phi_inorg" in result.prior_updates()  # the population value transfers, the batches do not
    assert not any("[batch=" in name for name in result.prior_updates())


def test_a_category_context_improves_the_physics_in_cross_validation(tmp_path, preset):
    path = write(tmp_path / "d.csv", chip_droplets(60, seed=2))
    without = fit_runs(read_runs(path, preset), CSPBBR3, folds=3)
    with_chip = fit_runs(read_runs(path, preset, contexts=parse_contexts(["chip"])), CSPBBR3, folds=3)
    assert without.droplet is not None and with_chip.droplet is not None
    assert without.droplet.cv is not None and with_chip.droplet.cv is not None
    metric = "droplet diameter MAPE (%)"
    assert (
        with_chip.droplet.cv.table.loc["physics only", metric]
        < 0.7 * without.droplet.cv.table.loc["physics only", metric]
    )


@pytest.mark.parametrize(
    ("contexts", "message"),
    [
        (["nope"], "--context 'nope' names no column"),
        (["Qc/Qd"], "already read as flow-rate ratio"),
        (["note:number"], "row 2, column 'note': 'run 0 fine' is not a number"),
    ],
)
def test_bad_context_is_one_sentence(tmp_path, preset, contexts, message):
    path = write(tmp_path / "d.csv", chip_droplets(10, seed=0))
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read_runs(path, preset, contexts=parse_contexts(contexts))


def test_empty_context_cell_of_a_run_that_gave_a_result_is_refused(tmp_path, preset):
    frame = chip_droplets(10, seed=0)
    frame.loc[3, "chip"] = ""
    with pytest.raises(InputError, match="row 5, context column 'chip': empty"):
        read_runs(write(tmp_path / "d.csv", frame), preset, contexts=parse_contexts(["chip"]))


# --- small data: fit a few runs, predict the rest --------------------------------------------------------------------


def test_holdout_fits_few_runs_and_predicts_the_rest_with_honest_intervals(tmp_path, preset):
    path = write(tmp_path / "d.csv", chip_droplets(150, seed=3))
    runs = read_runs(path, preset, contexts=parse_contexts(["chip", "expansion_ratio"]))
    result = fit_runs(runs, CSPBBR3, folds=0, train_rows=15, draws=3)
    [h] = result.holdouts
    assert h.train_rows == 15 and len(h.per_draw) == 3 * 3
    table = h.table
    assert table.loc["physics + GP", "droplet diameter MAPE (%)"] < table.loc["GP only", "droplet diameter MAPE (%)"]
    assert 0.8 <= table.loc["physics + GP", "droplet diameter 90% coverage"] <= 1.0
    assert result.droplet is not None
    with pytest.raises(InputError, match="--train-rows 150"):
        holdout(result.droplet.stage, 150, 1)


def test_cli_train_rows_prints_the_median_over_draws(tmp_path):
    path = write(tmp_path / "d.csv", chip_droplets(60, seed=4))
    out = tmp_path / "out"
    args = ["fit", str(path), "--no-plots", "--out", str(out), "--train-rows", "12", "--draws", "2"]
    result = runner.invoke(app, [*args, "--context", "chip"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "fits on 12 random runs" in result.output and "median of 2 draws" in result.output
    assert len(pd.read_csv(out / "holdout_droplet.csv")) == 2 * 3
    bad = runner.invoke(app, ["fit", str(path), "--train-rows", "2"])
    assert bad.exit_code == 1 and bad.output.startswith("error: --train-rows 2")


# --- fit --into refuses what cannot transfer, before the fit ---------------------------------------------------------


def test_into_refuses_droplets_without_an_orifice_width_before_fitting(tmp_path, preset):
    frame = pd.DataFrame({"Qc/Qd": [2.0, 4.0, 8.0, 16.0, 3.0], "D_drop (um)": [160.0, 130.0, 100.0, 80.0, 140.0]})
    path = write(tmp_path / "other_device.csv", frame)
    out, into = tmp_path / "out", tmp_path / "campaign"
    args = ["fit", str(path), "--out", str(out), "--into", str(into), "--target-nm", "450"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "no orifice width" in result.output and "keeps the preset's droplet law" in result.output
    assert not out.exists() and not into.exists()  # refused before the fit: no tables, no campaign
    result = fit_runs(read_runs(path, preset), CSPBBR3, folds=0)
    with pytest.raises(InputError, match="no orifice width"):
        seed_campaign(result, into, 450.0)
    # the same law measured on the preset's own nozzle transfers
    path = write(
        tmp_path / "own.csv", frame.assign(**{"W (um)": preset.nozzle_um, "D_drop (um)": frame["D_drop (um)"] / 25})
    )
    fitted = fit_runs(read_runs(path, preset), CSPBBR3, folds=0)
    assert "log_droplet_k" in fitted.prior_updates()


def test_into_with_a_bad_target_fails_before_the_fit(tmp_path):
    path = write(tmp_path / "d.csv", chip_droplets(10, seed=0))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["fit", str(path), "--out", str(out), "--into", str(tmp_path / "c"), "--target-nm", "-5"]
    )
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert not out.exists()


def chip_sps(preset: Preset, n: int, seed: int, shifts: dict[str, float]) -> pd.DataFrame:
    """SP sizes of the preset's physics on several chips whose droplet prefactor differs by ``shifts`` (ln k)."""
    rng = np.random.default_rng(seed)
    chip = np.resize(list(shifts), n)
    x = np.column_stack(
        [
            np.exp(rng.uniform(math.log(2.5), math.log(7), n)),
            np.exp(rng.uniform(0, math.log(15), n)),
            rng.uniform(20, 70, n),
        ]
    )
    theta = preset.prior(physics.SIZE_PARAMETERS)[0].repeat(n, 1)
    theta[:, 0] += torch.tensor([shifts[c] for c in chip], dtype=torch.double)
    log_d = torch.stack([physics.log_sp_diameter_nm(torch.tensor(x[i : i + 1]), theta[i], preset)[0] for i in range(n)])
    frame = pd.DataFrame({"c (mg/mL)": x[:, 0], "Qc/Qd": x[:, 1], "T (C)": x[:, 2], "chip": chip})
    frame["diameter_nm"] = np.exp(log_d.numpy() + rng.normal(0, 0.015, n))
    return frame


def test_into_carries_each_chip_and_the_spread_between_chips_into_the_campaign(tmp_path, preset):
    """A known chip starts calibrated in the new campaign, a new chip from the population (wider)."""
    shifts = {"A": -0.2, "B": 0.2}
    path = write(tmp_path / "sp.csv", chip_sps(preset, 30, seed=3, shifts=shifts))
    out, into = tmp_path / "out", tmp_path / "next"
    args = ["fit", str(path), "--context", "chip", "--folds", "0", "--no-plots", "--out", str(out)]
    result = runner.invoke(app, [*args, "--into", str(into), "--target-nm", "450"])
    assert result.exit_code == 0, result.output
    assert "context chip (category)" in result.output and "level offsets on log_droplet_k" in result.output
    with Campaign.open(into) as campaign:
        assert {n: v.kind for n, v in campaign.spec.context.items()} == {"chip": "category"}
        z = campaign.space.to_unit(
            campaign.space.tensor([{"concentration_mg_ml": 4.0, "flow_ratio": 5.0, "temperature_c": 40.0}])
        )
        predicted = {}
        for chip in ("A", "B", "new"):
            with torch.no_grad():
                mean, var = campaign.fit(context={"chip": chip}).size.moments(z)
            predicted[chip] = (float(mean[0]), float(var[0]) ** 0.5)
    # the droplet prefactor moves the log SP size one for one
    assert abs(predicted["B"][0] - predicted["A"][0] - 0.4) < 0.1, predicted
    assert predicted["new"][1] > 1.15 * max(predicted["A"][1], predicted["B"][1]), predicted
    assert min(predicted["A"][0], predicted["B"][0]) < predicted["new"][0] < max(predicted["A"][0], predicted["B"][0])


def test_an_aspect_ratio_column_is_the_campaigns_aspect_ratio_context_and_into_carries_its_term(tmp_path, preset):
    """An 'h/w' column is read as the context aspect_ratio (also when --context names it), fitted with the
    preset's [context_terms] term, and --into declares it in the campaign with the fitted exponent."""
    frame = chip_sps(preset, 30, seed=6, shifts={"one": 0.0})
    frame["h/w"] = np.resize([1.0, 1.5, 2.0], len(frame))
    frame["diameter_nm"] *= frame["h/w"] ** 0.6  # deeper than the preset's prior exponent (0.33 +- 0.2) says
    path = write(tmp_path / "sp.csv", frame.drop(columns="chip"))
    out, into = tmp_path / "out", tmp_path / "next"
    args = ["fit", str(path), "--context", "h/w", "--folds", "0", "--no-plots", "--out", str(out)]
    result = runner.invoke(app, [*args, "--into", str(into), "--target-nm", "450"])
    assert result.exit_code == 0, result.output
    assert "context aspect_ratio (number)" in result.output and "aspect_exponent_c" in result.output
    columns_read = result.output.split("Columns read")[1].split("└")[0]
    assert columns_read.count("h/w") == 1 and "aspect_ratio (context, number)" in columns_read  # listed once
    with Campaign.open(into) as campaign:
        assert {n: v.kind for n, v in campaign.spec.context.items()} == {"aspect_ratio": "number"}
        settings = {"concentration_mg_ml": 4.0, "flow_ratio": 5.0, "temperature_c": 40.0}
        z = campaign.space.to_unit(campaign.space.tensor([settings]))
        with torch.no_grad():
            at_1 = campaign.fit(context={"aspect_ratio": 1.0}).size.moments(z)[0]
            at_2 = campaign.fit(context={"aspect_ratio": 2.0}).size.moments(z)[0]
    exponent = float(at_2[0] - at_1[0]) / math.log(2.0)
    assert abs(exponent - 0.6) < 0.1, exponent  # the fitted exponent, not the preset's 0.33


def test_into_refuses_a_context_name_a_campaign_cannot_declare_and_writes_nothing(tmp_path, preset):
    frame = chip_sps(preset, 12, seed=4, shifts={"A": 0.0, "B": 0.1}).rename(columns={"chip": "chip id"})
    path = write(tmp_path / "sp.csv", frame)
    out, into = tmp_path / "out", tmp_path / "next"
    args = ["fit", str(path), "--context", "chip id", "--out", str(out), "--into", str(into), "--target-nm", "450"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "'chip id'" in result.output and "rename the column" in result.output
    assert not out.exists() and not into.exists()
