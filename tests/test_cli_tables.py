"""Tables in an 80-column terminal: every column name (and parameter name) is shown whole."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.physics import PDI_PARAMETERS, SIZE_PARAMETERS
from supraopt.records import Failure, Measurement

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 3.0, "temperature_c": 30.0}


def at_80_columns(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output  # nothing cut
    return result.output


def test_status_and_suggest_tables_fit_80_columns(campaign_dir: Path) -> None:
    with Campaign.open(campaign_dir) as campaign:
        campaign.add_run(SETTINGS, Measurement(diameter_nm=452.0, pdi_pct=4.1, n_particles=150))
        campaign.add_run({**SETTINGS, "concentration_mg_ml": 1.0}, Failure("droplets unstable"))
    shown = at_80_columns("suggest", campaign_dir, "-n", "2")
    header = next(line for line in shown.splitlines() if line.split()[:1] == ["id"])
    assert header.split() == ["id", "c", "r", "T", "pred.", "d", "pred.", "PDI", "P(feas.)", "P(hit)"]
    legend = " ".join(shown.split())
    assert "r: flow-rate ratio Q_c/Q_d" in legend and "P(hit): probability it hits the target" in legend
    shown = at_80_columns("status", campaign_dir)
    header = next(line for line in shown.splitlines() if line.split()[:1] == ["id"])
    assert header.split() == ["id", "status", "c", "r", "T", "pred.", "d", "d", "PDI", "hit"]
    assert "droplets unstable" in shown and "abandoned" not in shown


def test_fit_tables_show_parameter_names_whole(tmp_path: Path) -> None:
    data = REPO / "examples" / "data" / "twin_runs.csv"
    shown = at_80_columns("fit", data, "--folds", "0", "--no-plots", "--out", tmp_path / "fit")
    for name in SIZE_PARAMETERS + PDI_PARAMETERS:
        assert f"  {name}  " in shown, name
    assert "sd ratio: fitted sd / prior sd" in " ".join(shown.split())
