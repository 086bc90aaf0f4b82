"""Recording many results from a CSV file: good files, and one clear error per bad file (ledger unchanged)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supraopt.bulk import record_csv
from supraopt.campaign import Campaign
from supraopt.errors import InputError
from supraopt.ledger import Status
from supraopt.records import Failure, Measurement

SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


@pytest.fixture
def pending(campaign: Campaign) -> list[str]:
    """Two open experiments, E001 and E002 (added straight to the ledger: no model fit needed)."""
    return campaign.ledger.add_pending(
        [(SETTINGS, {}), ({**SETTINGS, "concentration_mg_ml": 3.0}, {})],
    )


def write(tmp_path: Path, text: str, name: str = "results.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- good files --------------------------------------------------------------------------------------


def test_rows_with_ids_record_results(campaign, pending, tmp_path):
    path = write(
        tmp_path,
        "id,diameter_nm,pdi_pct,n_particles,droplet_um,failed,note\n"
        "E001,441.5,4.8,120,3.6,,first try\n"
        "E002,,,,,droplets unstable,\n",
    )
    assert record_csv(campaign, path).ids == ["E001", "E002"]
    e1, e2 = campaign.ledger.get("E001"), campaign.ledger.get("E002")
    assert e1.status is Status.DONE
    assert e1.measurement == Measurement(441.5, 4.8, n_particles=120, droplet_um=3.6)
    assert e1.note == "first try"
    assert e2.status is Status.FAILED and e2.failure == Failure("droplets unstable")


def test_columns_may_come_in_any_order_and_ids_with_spaces(campaign, pending, tmp_path):
    path = write(tmp_path, "pdi_pct,diameter_nm,id\n5.0,455,  E002 \n")
    assert record_csv(campaign, path).ids == ["E002"]
    assert campaign.ledger.get("E002").measurement == Measurement(455.0, 5.0)
    assert campaign.ledger.get("E001").status is Status.PENDING


def test_rows_without_id_add_runs(campaign, pending, tmp_path):
    path = write(
        tmp_path,
        "id,concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct,failed\n"
        ",2.5,3.0,30.0,380.0,5.5,\n"
        ",9.0,3.0,30.0,,,droplets unstable\n"
        "E001,,,,447.0,4.1,\n",
    )
    ids = record_csv(campaign, path).ids
    assert len(ids) == 3 and ids[2] == "E001"
    assert len(set(ids)) == 3 and not set(ids[:2]) & set(pending)
    added = campaign.ledger.get(ids[0])
    assert added.settings == {"concentration_mg_ml": 2.5, "flow_ratio": 3.0, "temperature_c": 30.0}
    assert added.status is Status.DONE and added.measurement == Measurement(380.0, 5.5)
    assert campaign.ledger.get(ids[1]).failure == Failure("droplets unstable")
    assert campaign.ledger.get("E001").measurement == Measurement(447.0, 4.1)
    assert len(campaign.ledger.experiments()) == 4


def test_a_file_without_an_id_column_adds_runs(campaign, tmp_path):
    path = write(tmp_path, "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n4.0,4.0,40,460,4\n")
    [experiment_id] = record_csv(campaign, path).ids
    assert campaign.ledger.get(experiment_id).measurement == Measurement(460.0, 4.0)


# --- bad files: InputError naming row and column, ledger unchanged -------------------------------------------


BAD_FILES = {
    "unknown-column": ("id,diameter_nm,pdi_pct,colour\nE001,450,4,red\n", r"unknown column\(s\) colour"),
    "not-a-number": (
        "id,diameter_nm,pdi_pct\nE001,450,4\nE002,big,4\n",
        r"row 3, column diameter_nm: 'big' is not a number",
    ),
    "setting-not-a-number": (
        "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n4.0,fast,40,450,4\n",
        r"row 2, column flow_ratio: 'fast' is not a number",
    ),
    "nan-size": ("id,diameter_nm,pdi_pct\nE001,450,4\nE002,NaN,4\n", r"row 3: diameter_nm=nan"),
    "nan-pdi": ("id,diameter_nm,pdi_pct\nE001,nan,4\n", r"row 2: diameter_nm=nan"),
    "infinite-size": ("id,diameter_nm,pdi_pct\nE001,inf,4\n", r"row 2: diameter_nm=inf"),
    "negative-size": ("id,diameter_nm,pdi_pct\nE001,450,4\nE002,-450,4\n", r"row 3: diameter_nm=-450\.0"),
    "absurd-size": ("id,diameter_nm,pdi_pct\nE001,4.5e9,4\n", r"row 2: diameter_nm=4500000000\.0"),
    "negative-pdi": ("id,diameter_nm,pdi_pct\nE001,450,-4\n", r"row 2: pdi_pct=-4\.0"),
    "fractional-count": (
        "id,diameter_nm,pdi_pct,n_particles\nE001,450,4,12.5\n",
        r"row 2, column n_particles: '12\.5' is not a whole number",
    ),
    "one-particle": ("id,diameter_nm,pdi_pct,n_particles\nE001,450,4,1\n", r"row 2: n_particles=1"),
    "missing-pdi": ("id,diameter_nm,pdi_pct\nE001,450,\n", r"row 2: needs diameter_nm and pdi_pct"),
    "failure-and-size": (
        "id,diameter_nm,pdi_pct,failed\nE001,450,4,hollow\n",
        r"row 2: has both a failure reason \('hollow'\) and a diameter",
    ),
    "duplicate-id": ("id,diameter_nm,pdi_pct\nE001,450,4\nE001,451,4\n", r"row 3: experiment E001 appears twice"),
    "unknown-id": ("id,diameter_nm,pdi_pct\nE001,450,4\nE042,451,4\n", r"row 3: no experiment 'E042'"),
    "no-settings": (
        "id,concentration_mg_ml,diameter_nm,pdi_pct\n,4.0,450,4\n",
        r"row 2: no id.*flow_ratio, temperature_c",
    ),
    "outside-bounds": (
        "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n4.0,4.0,40,450,4\n50.0,4.0,40,450,4\n",
        r"row 3: concentration_mg_ml=50\.0 is outside the bounds \[0\.5, 12\]",
    ),
    "header-only": ("id,diameter_nm,pdi_pct\n", r"has no rows"),
    "empty-file": ("", r"cannot be read"),
    "ragged": ('id,diameter_nm,pdi_pct\nE001,450,4,9,9,9\n"unclosed\n', r"cannot be read"),
}


@pytest.mark.parametrize(("text", "match"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_file_is_refused_and_leaves_the_ledger_unchanged(campaign, pending, tmp_path, text, match):
    path = write(tmp_path, text)
    before = campaign.ledger.to_frame(), campaign.ledger.events()
    with pytest.raises(InputError, match=match) as info:
        record_csv(campaign, path)
    assert "\n" not in str(info.value)
    after = campaign.ledger.to_frame(), campaign.ledger.events()
    assert before[0].equals(after[0]) and before[1] == after[1]


def test_an_already_recorded_id_is_refused(campaign, pending, tmp_path):
    campaign.record("E002", Measurement(430.0, 4.0))
    path = write(tmp_path, "id,diameter_nm,pdi_pct\nE001,450,4\nE002,451,4\n")
    before = campaign.ledger.events()
    with pytest.raises(InputError, match=r"row 3: experiment E002 already has a result \(done\).*--correct"):
        record_csv(campaign, path)
    assert campaign.ledger.events() == before
    assert campaign.ledger.get("E001").status is Status.PENDING


def test_a_missing_file(campaign, tmp_path):
    with pytest.raises(InputError, match=r"nothere\.csv' does not exist"):
        record_csv(campaign, tmp_path / "nothere.csv")
    assert campaign.ledger.experiments() == []


def test_an_excel_export_with_bom_and_crlf_is_read(campaign, pending, tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("id,diameter_nm,pdi_pct\r\nE001,450,4\r\n".encode("utf-8-sig"))
    assert record_csv(campaign, path).ids == ["E001"]
    assert campaign.ledger.get("E001").measurement == Measurement(450.0, 4.0)


# --- one transaction, and no silent duplicates (issue 9) ---------------------------------------------

RUNS = (
    "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n"
    "4.0,4.0,40.0,441.5,4.8\n"
    "3.0,4.0,40.0,402.0,5.5\n"
    "5.0,4.0,40.0,480.0,6.1\n"
)


def counts(campaign: Campaign) -> tuple[int, int]:
    return len(campaign.ledger.experiments()), len(campaign.ledger.events())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_import_interrupted_half_way_records_nothing(campaign, tmp_path, monkeypatch, interrupt):
    path = write(tmp_path, RUNS)
    before = counts(campaign)
    real = campaign.ledger._change
    calls = []

    def change(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first row is written, the second is on its way
            raise interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(campaign.ledger, "_change", change)
    with pytest.raises(interrupt):
        record_csv(campaign, path)
    assert len(calls) == 2
    assert counts(campaign) == before


def test_the_same_rows_twice_are_refused_then_skipped_or_allowed(campaign, tmp_path):
    path = write(tmp_path, RUNS)
    assert len(record_csv(campaign, path).ids) == 3
    after_first = counts(campaign)
    again = write(tmp_path, RUNS.replace("441.5", "441.50"), "again.csv")  # same values, other spelling
    with pytest.raises(InputError, match=r"3 of 3 row\(s\) of .*again.csv were imported before \(row 2 as E001"):
        record_csv(campaign, again)
    assert counts(campaign) == after_first
    more = write(tmp_path, RUNS + "6.0,4.0,40.0,510.0,5.0\n", "more.csv")
    with pytest.raises(InputError, match=r"--skip-duplicates to record only the 1 new row"):
        record_csv(campaign, more)
    report = record_csv(campaign, more, duplicates="skip")
    assert report.skipped == [2, 3, 4] and len(report.ids) == 1
    assert len(record_csv(campaign, path, duplicates="allow").ids) == 3
    assert len(campaign.ledger.experiments()) == 3 + 1 + 3


def test_a_ledger_from_before_the_import_table_keeps_working(campaign_dir, tmp_path):
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{campaign_dir / 'ledger.sqlite'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE imports")
    engine.dispose()
    with Campaign.open(campaign_dir) as opened:
        assert record_csv(opened, write(tmp_path, RUNS)).ids == ["E001", "E002", "E003"]
        with pytest.raises(InputError, match=r"imported before"):
            record_csv(opened, write(tmp_path, RUNS, "b.csv"))


@pytest.mark.parametrize(
    ("pdi", "match"),
    [
        ("0.05", r"row 2: pdi_pct=0.05 % is not plausible.*fraction.*give 5"),
        ("0", r"row 2: pdi_pct=0 % is not plausible"),
        ("-1e-13", r"row 2: pdi_pct=-1e-13 % is not plausible"),
    ],
)
def test_implausible_pdi_in_a_csv_is_refused(campaign, tmp_path, pdi, match):
    path = write(tmp_path, RUNS.replace("4.8", pdi))
    with pytest.raises(InputError, match=match):
        record_csv(campaign, path)
    assert counts(campaign) == (0, 0)


def test_a_folder_is_not_a_csv(campaign, tmp_path):
    with pytest.raises(InputError, match=r"is a folder; give a file"):
        record_csv(campaign, tmp_path)
