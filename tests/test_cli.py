"""The command line: each verb works, and each bad input is one 'error:' line, exit code ≠ 0, ledger unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.ledger import Status
from supraopt.records import PARAMETERS, Failure, Measurement
from supraopt.spec import SPEC_FILE, load_spec

runner = CliRunner()
SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "error:" not in result.output


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code ≠ 0, no traceback, exactly one line starting with 'error:' that contains each fragment."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def pending_dir(campaign_dir: Path) -> Path:
    """The campaign with two open experiments, E001 and E002 (added to the ledger directly: no fit)."""
    with Campaign.open(campaign_dir) as campaign:
        campaign.ledger.add_pending([(SETTINGS, {}), ({**SETTINGS, "concentration_mg_ml": 3.0}, {})])
    return campaign_dir


def experiment(directory: Path, experiment_id: str):
    with Campaign.open(directory) as campaign:
        return campaign.ledger.get(experiment_id)


# --- init ------------------------------------------------------------------------------------------------


def test_init_creates_a_campaign(tmp_path):
    directory = tmp_path / "new"
    result = invoke("init", directory, "--target-nm", 300, "--tolerance", 0.05, "--pdi-max", 8, "--seed", 3)
    assert_ok(result)
    assert "supraopt suggest" in result.output
    spec = load_spec(directory)
    assert (spec.target.diameter_nm, spec.target.tolerance, spec.target.pdi_max_pct) == (300.0, 0.05, 8.0)
    assert spec.seed == 3 and spec.model == "cspbbr3-flow-focusing"
    with Campaign.open(directory) as campaign:
        assert campaign.ledger.experiments() == []


def test_init_into_an_existing_campaign_is_refused(campaign_dir, ledger_state, same_ledger):
    spec_text = (campaign_dir / SPEC_FILE).read_text(encoding="utf-8")
    before = ledger_state(campaign_dir)
    result = invoke("init", campaign_dir, "--target-nm", 700)
    assert_one_line_error(result, str(campaign_dir), "already holds a campaign")
    assert (campaign_dir / SPEC_FILE).read_text(encoding="utf-8") == spec_text
    same_ledger(before, ledger_state(campaign_dir))


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--model", "no-such-preset"], ["'no-such-preset'"]),
        (["--target-nm", "-450"], ["diameter_nm=-450.0"]),
        (["--tolerance", "0.9"], ["tolerance=0.9"]),
        (["--pdi-max", "0"], ["pdi_max_pct=0.0"]),
    ],
    ids=["unknown-model", "negative-target", "huge-tolerance", "zero-pdi"],
)
def test_init_with_bad_options_creates_nothing(tmp_path, options, fragments):
    directory = tmp_path / "bad"
    assert_one_line_error(invoke("init", directory, *options), *fragments)
    assert not (directory / SPEC_FILE).exists()


# --- suggest ---------------------------------------------------------------------------------------------


def test_suggest_prints_a_table_and_records_pending(campaign_dir):
    result = invoke("suggest", campaign_dir)
    assert_ok(result)
    with Campaign.open(campaign_dir) as campaign:
        [e] = campaign.ledger.experiments()
    assert e.id == "E001" and e.status is Status.PENDING
    assert "E001" in result.output
    assert f"{e.settings['concentration_mg_ml']:.3f}" in result.output
    assert f"supraopt record {campaign_dir} E001" in result.output.replace("\n", "")


def test_suggest_json_is_a_list_with_ids_and_settings(campaign_dir):
    result = invoke("suggest", campaign_dir, "--json", "-n", 2)
    assert_ok(result)
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == 2
    with Campaign.open(campaign_dir) as campaign:
        stored = {e.id: e for e in campaign.ledger.experiments()}
    assert [item["id"] for item in data] == sorted(stored)
    for item in data:
        assert set(item["settings"]) == set(PARAMETERS)
        assert item["settings"] == stored[item["id"]].settings
        assert item["prediction"] == stored[item["id"]].prediction


@pytest.mark.parametrize("n", ["0", "65"])
def test_suggest_refuses_a_bad_batch_size(campaign_dir, ledger_state, same_ledger, n):
    before = ledger_state(campaign_dir)
    assert_one_line_error(invoke("suggest", campaign_dir, "-n", n), f"n={n}")
    same_ledger(before, ledger_state(campaign_dir))


# --- record ----------------------------------------------------------------------------------------------


def test_record_a_measurement(pending_dir):
    result = invoke(
        "record", pending_dir, "E001", "--diameter-nm", 455, "--pdi", 4.2, "--n-particles", 120, "--note", "SEM 1"
    )
    assert_ok(result)
    assert "E001" in result.output and "target hit" in result.output
    e = experiment(pending_dir, "E001")
    assert e.status is Status.DONE and e.measurement == Measurement(455.0, 4.2, n_particles=120)
    assert e.note == "SEM 1"


def test_record_a_miss_does_not_claim_a_hit(pending_dir):
    result = invoke("record", pending_dir, "E001", "--diameter-nm", 520, "--pdi", 4.2)
    assert_ok(result)
    assert "hit" not in result.output


def test_record_a_failure(pending_dir):
    assert_ok(invoke("record", pending_dir, "E002", "--failed", "droplets unstable"))
    e = experiment(pending_dir, "E002")
    assert e.status is Status.FAILED and e.failure == Failure("droplets unstable")


def test_record_correct_replaces_the_result_and_keeps_history(pending_dir):
    assert_ok(invoke("record", pending_dir, "E001", "--diameter-nm", 455, "--pdi", 4.2))
    assert_ok(invoke("record", pending_dir, "E001", "--diameter-nm", 470, "--pdi", 4.0, "--correct"))
    assert experiment(pending_dir, "E001").measurement == Measurement(470.0, 4.0)
    with Campaign.open(pending_dir) as campaign:
        kinds = [event["kind"] for event in campaign.ledger.events("E001")]
    assert kinds == ["suggested", "measured", "corrected"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["E001", "--diameter-nm", "nan", "--pdi", "4"], ["diameter_nm=nan"]),
        (["E001", "--diameter-nm", "inf", "--pdi", "4"], ["diameter_nm=inf"]),
        (["E001", "--diameter-nm", "-450", "--pdi", "4"], ["diameter_nm=-450.0"]),
        (["E001", "--diameter-nm", "0", "--pdi", "4"], ["diameter_nm=0.0"]),
        (["E001", "--diameter-nm", "3e9", "--pdi", "4"], ["diameter_nm=3000000000.0"]),
        (["E001", "--diameter-nm", "450", "--pdi", "nan"], ["pdi_pct=nan"]),
        (["E001", "--diameter-nm", "450", "--pdi", "-1"], ["pdi_pct=-1.0"]),
        (["E001", "--diameter-nm", "450", "--pdi", "4", "--n-particles", "1"], ["n_particles=1"]),
        (["E001", "--diameter-nm", "450", "--pdi", "4", "--droplet-um", "-3"], ["droplet_um=-3.0"]),
        (["E042", "--diameter-nm", "450", "--pdi", "4"], ["'E042'"]),
        (["E001", "--diameter-nm", "450"], ["--pdi"]),
        (["E001", "--failed", "hollow", "--diameter-nm", "450"], ["'hollow'", "--diameter-nm"]),
        (["E001", "--failed", "   "], ["failure reason"]),
        (["--diameter-nm", "450", "--pdi", "4"], ["experiment id"]),
        (["E001", "--csv", "results.csv"], ["--csv"]),
    ],
    ids=[
        "nan",
        "inf",
        "negative",
        "zero",
        "absurd",
        "nan-pdi",
        "negative-pdi",
        "one-particle",
        "negative-droplet",
        "unknown-id",
        "missing-pdi",
        "failed-with-size",
        "blank-reason",
        "no-id",
        "csv-and-id",
    ],
)
def test_bad_record_is_one_line_and_leaves_the_ledger_unchanged(
    pending_dir, ledger_state, same_ledger, args, fragments
):
    before = ledger_state(pending_dir)
    assert_one_line_error(invoke("record", pending_dir, *args), *fragments)
    same_ledger(before, ledger_state(pending_dir))


def test_recording_an_already_recorded_id_is_refused(pending_dir, ledger_state, same_ledger):
    assert_ok(invoke("record", pending_dir, "E001", "--diameter-nm", 455, "--pdi", 4.2))
    before = ledger_state(pending_dir)
    assert_one_line_error(
        invoke("record", pending_dir, "E001", "--diameter-nm", 460, "--pdi", 4.0), "E001", "already has a result"
    )
    assert_one_line_error(invoke("record", pending_dir, "E001", "--failed", "hollow"), "E001", "already has a result")
    same_ledger(before, ledger_state(pending_dir))
    assert experiment(pending_dir, "E001").measurement == Measurement(455.0, 4.2)


def test_correcting_an_open_experiment_is_refused(pending_dir, ledger_state, same_ledger):
    before = ledger_state(pending_dir)
    assert_one_line_error(
        invoke("record", pending_dir, "E002", "--diameter-nm", 460, "--pdi", 4.0, "--correct"), "E002"
    )
    same_ledger(before, ledger_state(pending_dir))


def test_record_csv(pending_dir, tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("id,diameter_nm,pdi_pct,failed\nE001,448,4.5,\nE002,,,hollow particles\n", encoding="utf-8")
    result = invoke("record", pending_dir, "--csv", path)
    assert_ok(result)
    assert "2" in result.output
    assert experiment(pending_dir, "E001").measurement == Measurement(448.0, 4.5)
    assert experiment(pending_dir, "E002").failure == Failure("hollow particles")


def test_record_bad_csv_is_one_line(pending_dir, tmp_path, ledger_state, same_ledger):
    path = tmp_path / "results.csv"
    path.write_text("id,diameter_nm,pdi_pct\nE001,448,4.5\nE002,huge,4\n", encoding="utf-8")
    before = ledger_state(pending_dir)
    assert_one_line_error(invoke("record", pending_dir, "--csv", path), "row 3", "diameter_nm", "'huge'")
    assert_one_line_error(invoke("record", pending_dir, "--csv", tmp_path / "missing.csv"), "missing.csv")
    same_ledger(before, ledger_state(pending_dir))


# --- status and export -----------------------------------------------------------------------------------


def test_status_table_and_json(pending_dir):
    assert_ok(invoke("record", pending_dir, "E001", "--diameter-nm", 520, "--pdi", 4.0))
    table = invoke("status", pending_dir)
    assert_ok(table)
    assert "E001" in table.output and "E002" in table.output and "not hit" in table.output

    data = json.loads(invoke("status", pending_dir, "--json").stdout)
    assert data["hit"] is False and data["best"]["id"] == "E001"
    assert data["counts"] == {"done": 1, "pending": 1}
    assert [e["id"] for e in data["experiments"]] == ["E001", "E002"]
    assert data["target"]["diameter_nm"] == 450.0

    assert_ok(invoke("record", pending_dir, "E002", "--diameter-nm", 446, "--pdi", 3.0))
    data = json.loads(invoke("status", pending_dir, "--json").stdout)
    assert data["hit"] is True and data["best"]["id"] == "E002"
    assert "Target hit: E002" in invoke("status", pending_dir).output


def test_status_of_an_empty_campaign(campaign_dir):
    result = invoke("status", campaign_dir)
    assert_ok(result)
    assert "no experiments yet" in result.output
    assert json.loads(invoke("status", campaign_dir, "--json").stdout)["best"] is None


def test_export_csv(pending_dir, tmp_path):
    assert_ok(invoke("record", pending_dir, "E001", "--diameter-nm", 455, "--pdi", 4.2, "--n-particles", 80))
    out = tmp_path / "export.csv"
    assert_ok(invoke("export", pending_dir, "--csv", out))
    frame = pd.read_csv(out)
    assert list(frame["id"]) == ["E001", "E002"]
    assert list(frame["status"]) == ["done", "pending"]
    assert {"id", "status", *PARAMETERS, "diameter_nm", "pdi_pct", "n_particles", "failure_reason"} <= set(
        frame.columns
    )
    assert frame.loc[0, "diameter_nm"] == 455.0 and frame.loc[0, "n_particles"] == 80
    assert pd.isna(frame.loc[1, "diameter_nm"])


def test_export_into_a_missing_folder_is_one_line(pending_dir, tmp_path):
    assert_one_line_error(invoke("export", pending_dir, "--csv", tmp_path / "nowhere" / "x.csv"), "nowhere")


# --- broken or missing campaigns --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["suggest"], ["record", "E001", "--diameter-nm", "450", "--pdi", "4"]])
def test_malformed_campaign_toml_is_one_line(campaign_dir, command):
    (campaign_dir / SPEC_FILE).write_text("name = 'x'\n[target\ndiameter_nm = 450\n", encoding="utf-8")
    assert_one_line_error(invoke(command[0], campaign_dir, *command[1:]), "campaign.toml", "not valid TOML")


def test_invalid_values_in_campaign_toml_are_one_line(campaign_dir):
    text = (campaign_dir / SPEC_FILE).read_text(encoding="utf-8")
    (campaign_dir / SPEC_FILE).write_text(
        text.replace("concentration_mg_ml = [0.5, 12.0]", "concentration_mg_ml = [12.0, 0.5]"), encoding="utf-8"
    )
    assert_one_line_error(invoke("suggest", campaign_dir), "concentration_mg_ml=[12.0, 0.5]")


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("tolerance = 0.03", 'tolerance = "tight"', "[target]"),
        ("[loop]", "[loop]\nspeed = 2", "[loop]"),
        ("[rig]", "[rig]\nspeed = 2", "[rig]"),
    ],
    ids=["target", "loop", "rig"],
)
def test_error_lines_keep_square_brackets(campaign_dir, old, new, fragment):
    # messages name TOML tables like [target]; the terminal must show them, not swallow them as markup
    text = (campaign_dir / SPEC_FILE).read_text(encoding="utf-8")
    (campaign_dir / SPEC_FILE).write_text(text.replace(old, new, 1), encoding="utf-8")
    assert_one_line_error(invoke("status", campaign_dir), fragment)


@pytest.mark.parametrize("bad_id", ["[/]", "[bold]E9"])
def test_an_id_with_square_brackets_is_an_unknown_id(pending_dir, ledger_state, same_ledger, bad_id):
    before = ledger_state(pending_dir)
    assert_one_line_error(invoke("record", pending_dir, bad_id, "--diameter-nm", 450, "--pdi", 4), repr(bad_id))
    same_ledger(before, ledger_state(pending_dir))


@pytest.mark.parametrize(
    "command", [["status"], ["suggest"], ["export", "--csv", "out.csv"], ["record", "E001", "--failed", "x"]]
)
def test_a_folder_that_is_not_a_campaign_is_one_line(tmp_path, command):
    folder = tmp_path / "plain"
    folder.mkdir()
    assert_one_line_error(
        invoke(command[0], folder, *command[1:]), str(folder), "not a campaign folder", "supraopt init"
    )
    assert list(folder.iterdir()) == []  # nothing written there


def test_a_missing_folder_is_one_line(tmp_path):
    assert_one_line_error(invoke("status", tmp_path / "nope"), "not a campaign folder")
    assert not (tmp_path / "nope").exists()
