"""Every input issue 9 found destroying data, duplicating it, ending in a traceback or wrongly accepted.

Each case runs the real entry point in this process: a refusal is one ``error:`` line naming the bad
value, a non-zero exit, and the ledger and campaign files unchanged.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _cli_harness import SETTINGS, cli, files_snapshot, ledger_snapshot

from supraopt.campaign import Campaign
from supraopt.errors import LedgerError, SpecError
from supraopt.ledger import Ledger, Status
from supraopt.records import Measurement

CSPBBR3 = "cspbbr3-flow-focusing"


@pytest.fixture
def here(tmp_path: Path) -> Iterator[Path]:
    """A working folder holding campaign C (E001, E002 open; E003 done), a file, a link, a FIFO and a CSV."""
    with Campaign.create(tmp_path / "C", CSPBBR3, 450.0) as campaign:
        ids = campaign.ledger.add_pending([(SETTINGS, {}), (SETTINGS, {}), (SETTINGS, {})])
        campaign.record(ids[2], Measurement(441.0, 4.8, n_particles=120))
    (tmp_path / "afile").write_text("x\n")
    (tmp_path / "old.csv").write_text("a\n1\n")
    (tmp_path / "link.csv").symlink_to("C/campaign.toml")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "runs.csv").write_text(
        "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n4.0,4.0,40.0,441.5,4.8\n3.0,4.0,40.0,402,5.5\n"
    )
    cwd = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def refused(*args: object, fragment: str) -> str:
    """Run a command that must be refused; return its error line."""
    before = ledger_snapshot(Path("C")), files_snapshot(Path("C"))
    outcome = cli(*args)
    assert outcome.refused and not outcome.problems(), (outcome.code, outcome.out, outcome.err, outcome.crash)
    assert fragment in outcome.err, outcome.err
    assert (ledger_snapshot(Path("C")), files_snapshot(Path("C"))) == before
    return outcome.err


X300 = "x" * 300

CASES = [
    # export never writes over what the campaign owns, nor over anything that is not a regular file
    (["export", "C", "--csv", "C/ledger.sqlite"], "campaign's own ledger.sqlite"),
    (["export", "C", "--csv", "C/campaign.toml"], "campaign's own campaign.toml"),
    (["export", "C", "--csv", "C/ledger.sqlite-wal"], "campaign's own ledger.sqlite-wal"),
    (["export", "C", "--csv", "C/run.log"], "campaign's own run.log"),
    (["export", "C", "--csv", "link.csv"], "is the campaign's own campaign.toml"),
    (["export", "C", "--csv", "fifo"], "named pipe"),
    (["export", "C", "--csv", "/dev/null"], "is a device"),
    (["export", "C", "--csv", ""], "--csv is empty"),
    (["export", "C", "--csv", "/"], "is a folder"),
    (["export", "C", "--csv", "C"], "is a folder"),
    (["export", "C", "--csv", "old.csv"], "add --force"),
    (["export", "C", "--csv", f"{X300}.csv"], "at most 255"),
    # paths given to other commands
    (["init", ""], "campaign folder is empty"),
    (["init", X300], "at most 255"),
    (["init", "afile"], "is a file, not a folder"),
    (["init", "afile/sub"], "afile/sub"),
    (["init", "/proc/x"], "system folder"),
    (["init", "C"], "already holds a campaign"),
    (["demo", "afile"], "is a file, not a folder"),
    (["demo", "D", "--budget", "0"], "--budget 0 must be at least 1"),
    (["plot", "C", "--out", "afile"], "is a file, not a folder"),
    (["fit", "runs.csv", "--out", "afile"], "is a file, not a folder"),
    (["fit", "runs.csv", "--into", "afile", "--target-nm", "450"], "is a file, not a folder"),
    (["fit", "C"], "is a folder"),
    (["record", "C", "--csv", "C"], "is a folder; give a file"),
    (["run", "C", "--rig", ""], "--rig is empty"),
    # conflicting options
    (["record", "C", "E002", "--failed", "--pdi"], "looks like an option"),
    (["record", "C", "E002", "--failed", "hollow", "--n-particles", "50"], "cannot be combined with --n-particles"),
    (["record", "C", "E002", "--failed", "hollow", "--droplet-um", "4"], "cannot be combined with --droplet-um"),
    (["record", "C", "--csv", "runs.csv", "--pdi", "5"], "--pdi cannot go with it"),
    (["record", "C", "--csv", "runs.csv", "--skip-duplicates", "--allow-duplicates"], "exclude each other"),
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "5", "--pdi-unit", "ppm"], "--pdi-unit 'ppm'"),
    # results no rig of this kind can measure
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "0.05"], "looks like a fraction"),
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "0"], "pdi_pct=0 % is not plausible"),
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "-1e-13"], "pdi_pct=-1e-13 % is not plausible"),
    (["record", "C", "E002", "--diameter-nm", "1e-300", "--pdi", "5"], "diameter_nm=1e-300 nm is not plausible"),
    (["record", "C", "E002", "--diameter-nm", "9999999", "--pdi", "5"], "diameter_nm=1e+07 nm is not plausible"),
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "5", "--n-particles", "1e23"], "n-particles"),
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "5", "--n-particles", str(10**23)], "n_particles=1e+23"),
    (["record", "C", "E002", "--diameter-nm", "450", "--pdi", "5", "--droplet-um", "99999"], "droplet_um=99999 µm"),
    (["record", "C", "E003", "--correct", "--diameter-nm", "450", "--pdi", "0.04"], "looks like a fraction"),
    (["init", "N", "--pdi-max", "0.06"], "pdi_max_pct=0.06 % is not plausible"),
    (["init", "N", "--target-nm", "1e-300"], "diameter_nm=1e-300 nm is not plausible"),
]


@pytest.mark.parametrize(("args", "fragment"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_refused_with_one_line(here: Path, args: list[str], fragment: str) -> None:
    refused(*args, fragment=fragment)
    assert not Path("N").exists() and not Path("D").exists()


def test_export_with_force_replaces_only_a_regular_csv_atomically(here: Path) -> None:
    outcome = cli("export", "C", "--csv", "old.csv", "--force")
    assert outcome.code == 0, outcome.err
    assert Path("old.csv").read_text().startswith("id,status")
    assert not [p for p in here.iterdir() if p.name.endswith(".tmp")]  # the temporary file was renamed


def test_a_pdi_given_as_a_fraction_on_purpose(here: Path) -> None:
    assert cli("record", "C", "E002", "--diameter-nm", "450", "--pdi", "0.05", "--pdi-unit", "fraction").code == 0
    with Campaign.open(Path("C")) as campaign:
        assert campaign.ledger.get("E002").measurement == Measurement(450.0, 5.0)


def test_a_truly_tiny_pdi_is_accepted_after_widening_plausible(here: Path) -> None:
    spec = Path("C/campaign.toml")
    spec.write_text(spec.read_text() + "\n[plausible]\npdi_pct = [0.01, 100.0]\n")
    assert cli("record", "C", "E002", "--diameter-nm", "450", "--pdi", "0.05").code == 0
    with Campaign.open(Path("C")) as campaign:
        assert campaign.ledger.get("E002").measurement == Measurement(450.0, 0.05)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("target = 5\n", "[target] must be a table"),
        ("bounds = [1, 2]\n[target]\ndiameter_nm = 450\n", "[bounds] must be a table"),
        ("rig = 5\n[target]\ndiameter_nm = 450\n", "[rig] must be a table"),
        ('loop = "x"\n[target]\ndiameter_nm = 450\n', "[loop] must be a table"),
        ('[target]\ndiameter_nm = 450\n[rig]\noptions = "abc"\n', "[rig.options] must be a table"),
        ('[target]\ndiameter_nm = 450\n[loop]\nstop_on_hit = "no"\n', "stop_on_hit='no' must be true or false"),
        ("[target]\ndiameter_nm = 450\n[loop]\nbudget = true\n", "budget=True must be an integer"),
        ("[target]\ndiameter_nm = true\n", "diameter_nm=True must be a finite number"),
        ("[target]\ndiameter_nm = 450\npdi_max_pct = 0.06\n", "looks like a fraction"),
    ],
)
def test_campaign_toml_types(here: Path, text: str, fragment: str) -> None:
    Path("C/campaign.toml").write_text(f'model = "{CSPBBR3}"\n{text}')
    for verb in ("status", "suggest"):
        refused(verb, "C", fragment=fragment)


@pytest.mark.parametrize(
    ("bounds", "fragment"),
    [
        ("temperature_c = [20.0, 5000.0]", "temperature_c=[20, 5000] °C is not plausible"),
        ("temperature_c = [5.0, 5.0]", "temperature_c=[5.0, 5.0] must be a [low, high] pair"),
        ("concentration_mg_ml = [1e-300, 1e300]", "concentration_mg_ml=[1e-300, 1e+300] mg/mL is not plausible"),
    ],
)
def test_absurd_bounds(here: Path, bounds: str, fragment: str) -> None:
    spec = Path("C/campaign.toml")
    name = bounds.split(" = ")[0]
    lines = [bounds if line.startswith(f"{name} = ") else line for line in spec.read_text().splitlines()]
    spec.write_text("\n".join(lines) + "\n")
    refused("suggest", "C", fragment=fragment)


@pytest.mark.parametrize(
    ("content", "fragment"), [(b'model = "\xff"\n', "not UTF-8"), (b"x = " + b"[" * 5000 + b"]" * 5000, "deeply")]
)
def test_unreadable_campaign_toml(here: Path, content: bytes, fragment: str) -> None:
    Path("C/campaign.toml").write_bytes(content)
    refused("status", "C", fragment=fragment)


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("UPDATE experiments SET settings = '{bad' WHERE seq = 2", "experiment E002 (table experiments, seq 2)"),
        ("PRAGMA ignore_check_constraints = 1; UPDATE experiments SET status = 'weird' WHERE seq = 1", "'weird'"),
        ("UPDATE experiments SET created_at = 'yesterday' WHERE seq = 1", "created_at 'yesterday'"),
        ("UPDATE experiments SET settings = 'null' WHERE seq = 1", "settings is 'null'"),
        ("UPDATE experiments SET settings = '{\"flow_ratio\": NaN}' WHERE seq = 3", "flow_ratio=nan must be finite"),
    ],
    ids=["bad-json", "unknown-status", "bad-timestamp", "null-settings", "nan-settings"],
)
def test_damaged_ledger_rows_are_named(here: Path, sql: str, fragment: str) -> None:
    with sqlite3.connect("C/ledger.sqlite") as connection:
        connection.executescript(sql)
    connection.close()
    for args in (["status", "C"], ["suggest", "C"], ["export", "C", "--csv", "out.csv"]):
        line = refused(*args, fragment=fragment)
        assert "repair that row" in line
    assert not Path("out.csv").exists()


def test_an_empty_ledger_file_is_not_a_new_campaign(here: Path) -> None:
    for side in Path("C").glob("ledger.sqlite-*"):
        side.unlink()
    Path("C/ledger.sqlite").write_bytes(b"")
    refused("status", "C", fragment="is an empty file (0 bytes)")
    assert Path("C/ledger.sqlite").stat().st_size == 0


def test_an_empty_ledger_file_elsewhere_is_refused_too(here: Path) -> None:
    shared = here / "elsewhere" / "shared.sqlite"
    shared.parent.mkdir()
    Campaign.create(here / "S", CSPBBR3, 450.0, ledger_url=f"sqlite:///{shared}").close()
    for side in shared.parent.glob("shared.sqlite-*"):
        side.unlink()
    shared.write_bytes(b"")
    listing = sorted(p.name for p in shared.parent.iterdir())
    for args in (["status", "S"], ["status", "S", "--json"], ["record", "S", "E001", "--diameter-nm", "450", "--pdi", "5"],
                 ["suggest", "S"], ["export", "S", "--csv", "s.csv"], ["record", "S", "--csv", "runs.csv"]):  # fmt: skip
        outcome = cli(*args)
        assert outcome.refused and not outcome.problems(), (args, outcome)
        assert f"the ledger {shared} is an empty file (0 bytes)" in outcome.err, outcome.err
        assert shared.stat().st_size == 0 and sorted(p.name for p in shared.parent.iterdir()) == listing
    assert not Path("s.csv").exists()
    with pytest.raises(LedgerError, match="is an empty file"):  # the Python API and the dashboard open it alike
        Ledger(f"sqlite:///{shared}")


def test_rows_repeated_within_one_csv_are_refused_then_skipped_or_allowed(here: Path) -> None:
    Path("twice.csv").write_text(
        "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n"
        "4.0,4.0,40.0,441.5,4.8\n3.0,4.0,40.0,402,5.5\n4.0,4.0,40,441.50,4.8\n5.0,4.0,40.0,480,6\n3,4,40,402,5.5\n"
    )
    line = refused("record", "C", "--csv", "twice.csv", fragment="2 of 5 row(s) of twice.csv repeat an earlier row")
    assert "(row 4 is row 2 again); nothing was recorded" in line and "record only the 3 new row(s)" in line
    outcome = cli("record", "C", "--csv", "twice.csv", "--skip-duplicates")
    assert outcome.code == 0 and "Recorded 3 result(s)" in outcome.out and "left out 2 repeated row(s)" in outcome.out
    with Campaign.open(Path("C")) as campaign:
        assert [e.measurement.diameter_nm for e in campaign.ledger.experiments([Status.DONE])][1:] == [441.5, 402, 480]  # type: ignore[union-attr]
    # imported before AND repeated: both counted, nothing written
    line = refused("record", "C", "--csv", "twice.csv", fragment="5 of 5 row(s) of twice.csv were imported before")
    Path("real.csv").write_text(
        "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n6,4,40,500,5\n6,4,40,500,5\n"
    )
    refused("record", "C", "--csv", "real.csv", fragment="1 of 2 row(s) of real.csv repeat an earlier row")
    assert cli("record", "C", "--csv", "real.csv", "--allow-duplicates").code == 0  # a real repeat, recorded twice
    with Campaign.open(Path("C")) as campaign:
        assert len(campaign.ledger.experiments([Status.DONE])) == 1 + 3 + 2


def test_an_interrupted_csv_import_says_nothing_was_recorded(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Ledger, "_change", interrupted)
    before = ledger_snapshot(Path("C"))
    outcome = cli("record", "C", "--csv", "runs.csv")
    assert outcome.code == 130 and outcome.crash is None
    assert "nothing was recorded from runs.csv" in outcome.err
    assert ledger_snapshot(Path("C")) == before


def test_the_same_csv_twice_is_refused_by_the_cli(here: Path) -> None:
    assert cli("record", "C", "--csv", "runs.csv").code == 0
    refused("record", "C", "--csv", "runs.csv", fragment="2 of 2 row(s) of runs.csv were imported before")
    outcome = cli("record", "C", "--csv", "runs.csv", "--skip-duplicates")
    assert outcome.code == 0 and "Recorded 0 result(s)" in outcome.out and "left out 2 row(s)" in outcome.out
    assert cli("record", "C", "--csv", "runs.csv", "--allow-duplicates").code == 0
    with Campaign.open(Path("C")) as campaign:
        assert len(campaign.ledger.experiments([Status.DONE])) == 1 + 2 + 2


def test_a_numerical_failure_in_the_model_is_one_line(campaign: Campaign, monkeypatch: pytest.MonkeyPatch) -> None:
    def singular(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    monkeypatch.setattr(campaign, "fit", singular)
    with pytest.raises(SpecError, match=r"could not be computed .*numerical failure: linalg.cholesky.*\[bounds\]"):
        campaign.suggest()
    assert campaign.ledger.experiments() == []
