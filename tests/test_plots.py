"""Plots a chemist can read: every panel has a title and axes with units, every figure a title and a
legend, and each is written as a valid PNG (by the API and by 'supraopt fit' / 'supraopt plot')."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from supraopt import plots
from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.fit import FitResult, fit_runs
from supraopt.pastdata import read_runs
from supraopt.physics import Preset
from supraopt.records import Failure
from supraopt.rigs.simulated import World

CSPBBR3 = "cspbbr3-flow-focusing"
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "data" / "twin_runs.csv"
PNG = b"\x89PNG\r\n\x1a\n"
UNIT = re.compile(r"\(.+\)$")


@pytest.fixture(scope="module")
def fitted() -> FitResult:
    return fit_runs(read_runs(EXAMPLE, Preset.load(CSPBBR3)), CSPBBR3, folds=3)


def assert_readable(figure: Figure) -> None:
    """A title; every panel titled; x axes (bottom row) and y axes (first column) labelled with units; a legend."""
    suptitle = figure.get_suptitle()
    assert suptitle, "figure has no title"
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert panels
    for ax in panels:
        spec = ax.get_subplotspec()
        assert ax.get_title(), f"untitled panel in {suptitle!r}"
        if spec.is_last_row():  # panels above share the x axis of the bottom row
            assert UNIT.search(ax.get_xlabel()), (suptitle, ax.get_xlabel())
        if spec.is_first_col():  # panels to the right share the y axis of the first column
            assert UNIT.search(ax.get_ylabel()), (suptitle, ax.get_ylabel())
    for cax in (ax for ax in figure.axes if ax.get_label() == "<colorbar>"):
        assert cax.get_ylabel(), "unlabelled colour bar"
    assert any(ax.get_legend() is not None for ax in panels), f"no legend in {suptitle!r}"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000, path


def test_fit_figures_are_readable_and_written_as_png(fitted, tmp_path):
    figures = plots.fit_figures(fitted)
    assert set(figures) == {
        "supraparticle_diameter_nm_parity",
        "supraparticle_diameter_nm_residuals",
        "supraparticle_pdi_pct_parity",
        "supraparticle_pdi_pct_residuals",
        "droplet_droplet_um_parity",
        "droplet_droplet_um_residuals",
        "supraparticle_maps",
    }
    for figure in figures.values():
        assert_readable(figure)
    parity = figures["supraparticle_diameter_nm_parity"]
    assert [ax.get_title() for ax in parity.axes] == ["physics only", "GP only", "physics + GP"]
    assert "RMSE" in parity.axes[2].get_legend().get_texts()[-1].get_text()
    assert parity.axes[0].get_xlabel() == "measured SP diameter (nm)"
    maps = figures["supraparticle_maps"]
    assert [ax.get_xlabel() for ax in maps.axes if ax.get_label() != "<colorbar>"] == ["NC concentration (mg/mL)"] * 3
    for path in plots.write(figures, tmp_path):
        assert_png(path)


def campaign_with_runs(directory: Path) -> Path:
    world, rng = World.default(CSPBBR3), np.random.default_rng(0)
    with Campaign.create(directory, CSPBBR3, 450.0) as campaign:
        for c, r, t in [(3.0, 4.0, 40.0), (4.5, 6.0, 50.0), (5.0, 3.0, 60.0), (4.0, 8.0, 30.0)]:
            settings = {"concentration_mg_ml": c, "flow_ratio": r, "temperature_c": t}
            campaign.add_run(settings, world.sample(settings, rng))
        campaign.add_run(
            {"concentration_mg_ml": 10.0, "flow_ratio": 4.0, "temperature_c": 40.0}, Failure("droplets unstable")
        )
    return directory


def test_campaign_figures_show_convergence_and_maps(tmp_path):
    with Campaign.open(campaign_with_runs(tmp_path / "c")) as campaign:
        figures = plots.campaign_figures(campaign)
    assert set(figures) == {"convergence", "maps"}
    for figure in figures.values():
        assert_readable(figure)
    top, bottom = figures["convergence"].axes
    assert top.get_ylabel() == "measured / target − 1 (%)" and bottom.get_xlabel() == "experiment number (–)"
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert "target band: 450 nm ± 3 %" in labels and "failed run" in labels


def test_cli_plot_writes_pngs_into_the_campaign(tmp_path):
    directory = campaign_with_runs(tmp_path / "c")
    result = CliRunner().invoke(app, ["plot", str(directory)])
    assert result.exit_code == 0, result.output
    for name in ("convergence", "maps"):
        assert_png(directory / "plots" / f"{name}.png")


def test_cli_fit_writes_tables_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    ratio, ca = np.exp(rng.uniform(0.5, 3.0, 40)), np.exp(rng.uniform(-4.0, -1.0, 40))
    droplet = 60.0 * ratio**-0.3 * ca**-0.15 * np.exp(rng.normal(0, 0.03, 40))
    lines = ["Qc/Qd,Ca,droplet diameter (µm)"] + [
        f"{a:.4g},{b:.4g},{d:.4g}" for a, b, d in zip(ratio, ca, droplet, strict=True)
    ]
    data = tmp_path / "drops.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["fit", str(data), "--out", str(out), "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert "Droplet stage: 3-fold cross-validation" in result.output
    for name in ("parameters.csv", "cv_droplet.csv", "cv_predictions.csv"):
        assert (out / name).is_file()
    summary = json.loads((out / "fit.json").read_text(encoding="utf-8"))
    assert {row["parameter"] for row in summary["parameters"]} == {
        "log_droplet_k",
        "droplet_exponent_a",
        "capillary_exponent_b",
    }
    assert_png(out / "droplet_droplet_um_parity.png")
    assert_png(out / "droplet_droplet_um_residuals.png")
