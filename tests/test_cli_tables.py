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
    assert header.split() == ["id", "c", "r", "T", "aims", "at", "pred.", "d", "pred.", "PDI", "P(feas.)", "P(hit)"]
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


def test_the_run_table_keeps_its_headers_with_a_long_failure_reason() -> None:
    import io

    from rich.console import Console

    from supraopt.cli.loop import RunProgress
    from supraopt.loop.events import Event

    quiet = Console(width=80, file=io.StringIO())  # the event lines are not checked here
    progress = RunProgress(quiet)
    prediction = {"diameter_nm": 1450, "diameter_sd_nm": 120, "pdi_pct": 5.5, "p_hit": 0.77}
    progress(Event("suggested", "E001", {**SETTINGS, "flow_ratio": 13.25}, prediction))
    progress(Event("failed", "E001", result=Failure("droplets unstable, jetting at the nozzle")))
    progress(Event("suggested", "E002", SETTINGS, prediction))
    progress(Event("measured", "E002", result=Measurement(diameter_nm=1451.0, pdi_pct=12.3), hit=False))
    out = Console(width=80, record=True, file=io.StringIO())
    out.print(progress._table())
    shown = out.export_text()
    assert "…" not in shown
    header = next(line for line in shown.splitlines() if line.split()[:1] == ["id"])
    assert header.split() == ["id", "c", "r", "T", "pred.", "d", "PDI", "P(hit)", "status", "d", "PDI", "hit"]
    assert "1450±120" in shown and "measured" in shown and "13.25" in shown
