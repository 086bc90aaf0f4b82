"""The ledger: transitions and refusals, durability, SQLite settings, corrections, export, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from supraopt.errors import InputError, LedgerError
from supraopt.ledger import OPEN, Experiment, Ledger, Status
from supraopt.records import Failure, Measurement

POSTGRES_URL = os.environ.get("SUPRAOPT_TEST_POSTGRES_URL")
SETTINGS = {"concentration_mg_ml": 12.5, "flow_ratio": 0.8, "temperature_c": 25.0}
PREDICTION = {"diameter_nm": 410.0, "diameter_sd_nm": 30.0, "pdi_pct": 6.0, "p_feasible": 0.9, "p_hit": 0.4}
MEASURED = Measurement(diameter_nm=402.5, pdi_pct=5.5, n_particles=120, droplet_um=38.0)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(
                    POSTGRES_URL is None, reason="set SUPRAOPT_TEST_POSTGRES_URL to run the ledger tests on PostgreSQL"
                ),
            ],
        ),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a throwaway schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    assert POSTGRES_URL is not None
    schema = f"supraopt_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    base = sa.make_url(POSTGRES_URL)
    yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    ledger = Ledger(url)
    yield ledger
    ledger.close()


def snapshot(ledger: Ledger) -> tuple[list[Experiment], list[dict[str, Any]]]:
    return ledger.experiments(), ledger.events()


def make(ledger: Ledger, status: Status) -> str:
    """Add one experiment and drive it to ``status``; return its id."""
    [experiment_id] = ledger.add_pending([(SETTINGS, PREDICTION)])
    if status is Status.ABANDONED:
        ledger.abandon(experiment_id, "rig lost the run")
    if status in (Status.DISPATCHED, Status.RUNNING, Status.DONE, Status.FAILED):
        ledger.mark_dispatched(experiment_id)
    if status in (Status.RUNNING, Status.DONE, Status.FAILED):
        ledger.mark_running(experiment_id)
    if status is Status.DONE:
        ledger.record_measurement(experiment_id, MEASURED)
    if status is Status.FAILED:
        ledger.record_failure(experiment_id, Failure("droplets unstable"))
    return experiment_id


def kinds(ledger: Ledger, experiment_id: str) -> list[str]:
    return [event["kind"] for event in ledger.events(experiment_id)]


def test_lifecycle_from_suggestion_to_result(ledger: Ledger) -> None:
    assert ledger.add_pending([(SETTINGS, PREDICTION), ({"flow_ratio": 1.5}, {})]) == ["E001", "E002"]
    fresh = ledger.get("E001")
    assert (fresh.status, fresh.settings, fresh.prediction) == (Status.PENDING, SETTINGS, PREDICTION)
    assert (fresh.measurement, fresh.failure, fresh.note) == (None, None, "")
    assert fresh.created_at.utcoffset() == timedelta(0)
    assert ledger.events("E001")[0]["payload"] == {"settings": SETTINGS, "prediction": PREDICTION}

    for call in (ledger.mark_dispatched, ledger.mark_dispatched, ledger.mark_running, ledger.mark_running):
        call("E001")
    ledger.mark_dispatched("E001")  # a late duplicate from the rig loop is harmless
    assert kinds(ledger, "E001") == ["suggested", "dispatched", "running"]
    assert [e.id for e in ledger.experiments(OPEN)] == ["E001", "E002"]

    ledger.record_measurement("E001", MEASURED, note="rig: ok")
    ledger.record_failure("E002", Failure("hollow particles"), note="seen under SEM")
    done, failed = ledger.get("E001"), ledger.get("E002")
    assert (done.status, done.measurement, done.failure, done.note) == (Status.DONE, MEASURED, None, "rig: ok")
    assert (failed.status, failed.measurement, failed.failure) == (Status.FAILED, None, Failure("hollow particles"))
    assert done.updated_at >= fresh.updated_at == fresh.created_at
    assert kinds(ledger, "E001") == ["suggested", "dispatched", "running", "measured"]
    assert kinds(ledger, "E002") == ["suggested", "failed"]
    assert ledger.experiments(OPEN) == []
    assert [e.id for e in ledger.experiments({Status.DONE})] == ["E001"]


def test_abandon_keeps_the_reason_and_no_result(ledger: Ledger) -> None:
    lost = make(ledger, Status.DISPATCHED)
    ledger.abandon(lost, "rig reported the run lost")
    gone = ledger.get(lost)
    assert (gone.status, gone.note, gone.measurement, gone.failure) == (
        Status.ABANDONED,
        "rig reported the run lost",
        None,
        None,
    )
    assert ledger.events(lost)[-1]["payload"] == {"reason": "rig reported the run lost"}


REFUSALS = [
    pytest.param(Status.RUNNING, lambda led, i: led.get("E042"), LedgerError, "no experiment 'E042' in this campaign"),
    pytest.param(Status.RUNNING, lambda led, i: led.events("E042"), LedgerError, "no experiment 'E042'", id="events"),
    pytest.param(Status.RUNNING, lambda led, i: led.mark_dispatched("E042"), LedgerError, "no experiment 'E042'"),
    pytest.param(
        Status.DONE,
        lambda led, i: led.record_measurement(i, MEASURED),
        LedgerError,
        r"E001 already has a result \(done\); use correct to change it",
        id="measure-done",
    ),
    pytest.param(
        Status.FAILED,
        lambda led, i: led.record_measurement(i, MEASURED),
        LedgerError,
        r"E001 already has a result \(failed\); use correct",
        id="measure-failed",
    ),
    pytest.param(
        Status.DONE, lambda led, i: led.record_failure(i, Failure("x")), LedgerError, "E001 already has a result"
    ),
    pytest.param(Status.DONE, lambda led, i: led.abandon(i, "gave up"), LedgerError, r"already has a result \(done\)"),
    pytest.param(
        Status.ABANDONED,
        lambda led, i: led.record_measurement(i, MEASURED),
        LedgerError,
        r"E001 was abandoned .*suggest a new experiment",
        id="measure-abandoned",
    ),
    pytest.param(Status.ABANDONED, lambda led, i: led.abandon(i, "again"), LedgerError, "E001 was abandoned"),
    pytest.param(
        Status.PENDING, lambda led, i: led.mark_running(i), LedgerError, "E001 is still pending; call mark_dispatched"
    ),
    pytest.param(
        Status.DONE, lambda led, i: led.mark_dispatched(i), LedgerError, "E001 has status done and cannot be dispatched"
    ),
    pytest.param(Status.FAILED, lambda led, i: led.mark_running(i), LedgerError, "has status failed and cannot start"),
    pytest.param(
        Status.RUNNING,
        lambda led, i: led.correct(i, MEASURED, "typo"),
        LedgerError,
        r"E001 has no result yet \(running\); use record_measurement or record_failure",
        id="correct-open",
    ),
    pytest.param(
        Status.ABANDONED,
        lambda led, i: led.correct(i, MEASURED, "typo"),
        LedgerError,
        "E001 was abandoned and has no result to correct",
        id="correct-abandoned",
    ),
    pytest.param(
        Status.RUNNING,
        lambda led, i: led.add_pending([(SETTINGS, PREDICTION), ({"flow_ratio": float("nan")}, {})]),
        InputError,
        "flow_ratio=nan must be finite",
        id="nan-in-batch",
    ),
    pytest.param(
        Status.RUNNING,
        lambda led, i: led.add_pending([(SETTINGS, {"p_hit": "high"})]),
        InputError,
        "must be a number",
        id="text-prediction",
    ),
    pytest.param(Status.RUNNING, lambda led, i: led.abandon(i, "  "), InputError, "abandon reason", id="no-reason"),
    pytest.param(Status.DONE, lambda led, i: led.correct(i, MEASURED, ""), InputError, "correction note", id="no-note"),
    pytest.param(
        Status.DONE,
        lambda led, i: led.correct(i, "402 nm", "typo"),
        InputError,
        "must be a Measurement or a Failure",
        id="bad-result",
    ),
]


@pytest.mark.parametrize(("status", "call", "error", "match"), REFUSALS)
def test_refused_call_names_the_problem_and_changes_nothing(
    ledger: Ledger,
    status: Status,
    call: Callable[[Ledger, str], object],
    error: type[Exception],
    match: str,
) -> None:
    experiment_id = make(ledger, status)
    before = snapshot(ledger)
    with pytest.raises(error, match=match):
        call(ledger, experiment_id)
    assert snapshot(ledger) == before


def test_a_new_ledger_on_the_same_database_sees_everything(url: str) -> None:
    first = Ledger(url)
    done = make(first, Status.DONE)
    make(first, Status.ABANDONED)
    first.correct(done, Failure("aggregated"), "re-read the SEM images")
    before = snapshot(first)
    first.close()
    second = Ledger(url)
    try:
        assert snapshot(second) == before
        assert [e.status for e in before[0]] == [Status.FAILED, Status.ABANDONED]
        assert second.add_pending([(SETTINGS, PREDICTION)]) == ["E003"]
    finally:
        second.close()


def test_sqlite_connections_are_durable_and_writers_lock_at_begin(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    statements: list[str] = []
    [pooled] = ledger._db._idle  # the connection that opened the ledger, kept for the next transaction
    pooled.set_trace_callback(statements.append)
    ledger.add_pending([(SETTINGS, PREDICTION)])
    ledger.get("E001")
    assert [sql for sql in statements if sql.startswith("BEGIN")] == ["BEGIN IMMEDIATE", "BEGIN DEFERRED"]
    connections = [pooled, ledger._db.connect()]  # the pooled one and a new one: each set up
    for connection in connections:
        cursor = connection.cursor()
        values = [cursor.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "synchronous")]
        values.append(cursor.execute("PRAGMA busy_timeout").fetchone()[0])
        assert values == ["wal", 2, 30000]  # synchronous 2 is FULL
    connections[1].close()
    ledger.close()


def test_sqlite_writer_waits_for_another_process_lock_and_readers_do_not(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(f"sqlite:///{path}")
    make(ledger, Status.PENDING)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    assert [e.id for e in ledger.experiments()] == ["E001"]  # WAL: reading is not blocked
    release = threading.Timer(0.5, other.commit)
    start = time.monotonic()
    release.start()
    assert ledger.add_pending([(SETTINGS, PREDICTION)]) == ["E002"]  # waited instead of "database is locked"
    assert time.monotonic() - start >= 0.4
    release.join()
    other.close()
    ledger.close()


def test_corrections_keep_the_history_and_the_latest_wins(ledger: Ledger) -> None:
    first, second = make(ledger, Status.DONE), make(ledger, Status.DONE)
    ledger.correct(first, Failure("hollow particles"), "SEM shows hollow shells")
    wrong = ledger.get(first)
    assert (wrong.status, wrong.measurement, wrong.failure) == (Status.FAILED, None, Failure("hollow particles"))
    resized = Measurement(diameter_nm=398.0, pdi_pct=4.9, n_particles=150)
    ledger.correct(first, resized, "re-sized with more particles")
    fixed = ledger.get(first)
    assert (fixed.status, fixed.measurement, fixed.failure) == (Status.DONE, resized, None)
    assert fixed.note == "re-sized with more particles"
    events = ledger.events(first)
    assert [e["kind"] for e in events] == ["suggested", "dispatched", "running", "measured", "corrected", "corrected"]
    assert events[3]["payload"] == {"measurement": MEASURED.to_json(), "note": ""}
    assert events[4]["payload"] == {"failure": {"reason": "hollow particles"}, "note": "SEM shows hollow shells"}
    assert ledger.get(second).measurement == MEASURED  # the other experiment keeps its own result
    assert [e.measurement for e in ledger.experiments()] == [resized, MEASURED]
    assert ledger.to_frame()["diameter_nm"].tolist() == [398.0, 402.5]


def test_csv_export_round_trips_through_pandas(ledger: Ledger, tmp_path: Path) -> None:
    make(ledger, Status.DONE)
    make(ledger, Status.FAILED)
    make(ledger, Status.ABANDONED)
    [bare] = ledger.add_pending([({"flow_ratio": 2.0}, {"p_hit": 0.1})])
    ledger.record_measurement(bare, Measurement(diameter_nm=350.0, pdi_pct=8.0))
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "export.csv"
    path.write_text("stale export\n")
    ledger.export_csv(path)
    frame = ledger.to_frame()
    assert list(frame.columns) == [
        *("id", "status", "created_at", "updated_at", "concentration_mg_ml", "flow_ratio", "temperature_c"),
        *("pred_diameter_nm", "pred_diameter_sd_nm", "pred_pdi_pct", "pred_p_feasible", "pred_p_hit"),
        *("diameter_nm", "pdi_pct", "n_particles", "droplet_um", "failure_reason", "note"),
    ]
    read = pd.read_csv(path, parse_dates=["created_at", "updated_at"], dtype={"n_particles": "Int64"})
    read["note"] = read["note"].fillna("")  # CSV cannot tell an empty note from a missing one
    pd.testing.assert_frame_equal(read, frame, check_dtype=False)
    assert read["status"].tolist() == ["done", "failed", "abandoned", "done"]
    assert read["n_particles"].tolist() == [120, pd.NA, pd.NA, pd.NA]
    assert read["failure_reason"].tolist()[1] == "droplets unstable"
    assert [p.name for p in path.parent.iterdir()] == ["export.csv"]  # no temp file left behind
    with pytest.raises(LedgerError, match=r"cannot write .*missing"):
        ledger.export_csv(tmp_path / "missing" / "export.csv")


def _add_ten(url: str, barrier: Any, results: Any) -> None:
    """Worker process: wait for the others, then add ten experiments, one transaction each."""
    ids: list[str] = []
    try:
        ledger = Ledger(url)
        barrier.wait(timeout=120)
        for n in range(10):
            ids += ledger.add_pending([({"flow_ratio": float(n)}, {})])
        ledger.close()
    finally:
        results.put(ids)  # even after an error, so that the test fails fast instead of waiting


def test_eight_processes_adding_at_once_get_unique_ids_and_lose_nothing(url: str, ledger: Ledger) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(8), context.Queue()
    workers = [context.Process(target=_add_ten, args=(url, barrier, results)) for _ in range(8)]
    for worker in workers:
        worker.start()
    returned = [experiment_id for _ in workers for experiment_id in results.get(timeout=180)]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * 8
    assert len(set(returned)) == 80
    assert [e.id for e in ledger.experiments()] == sorted(returned) == [f"E{n:03d}" for n in range(1, 81)]
    assert [e["kind"] for e in ledger.events()] == ["suggested"] * 80


def test_only_one_of_several_racing_results_is_recorded(url: str, ledger: Ledger) -> None:
    experiment_id = make(ledger, Status.RUNNING)
    racers = [Ledger(url) for _ in range(4)]
    barrier = threading.Barrier(len(racers))
    outcomes: list[str] = []

    def record(racer: Ledger, diameter_nm: float) -> None:
        barrier.wait(timeout=60)
        try:
            racer.record_measurement(experiment_id, Measurement(diameter_nm=diameter_nm, pdi_pct=5.0))
            outcomes.append("recorded")
        except LedgerError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=record, args=(r, 400.0 + n)) for n, r in enumerate(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for racer in racers:
        racer.close()
    assert sorted(outcomes)[-1] == "recorded"
    assert sorted(outcomes)[:-1] == [f"{experiment_id} already has a result (done); use correct to change it."] * 3
    assert kinds(ledger, experiment_id).count("measured") == 1
    winner = ledger.events(experiment_id)[-1]["payload"]["measurement"]
    assert ledger.get(experiment_id).measurement == Measurement.from_json(winner)


finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.dictionaries(st.text(max_size=20), finite, max_size=6)
measurements = st.builds(
    Measurement,
    diameter_nm=st.floats(0.0, 1e7, exclude_min=True, exclude_max=True),
    pdi_pct=st.floats(0.0, 200.0, exclude_max=True),
    n_particles=st.none() | st.integers(2, 10**12),
    droplet_um=st.none() | st.floats(0.0, 1e5, exclude_min=True, exclude_max=True),
)


def test_settings_prediction_and_measurement_survive_storage_exactly(ledger: Ledger) -> None:
    @hypothesis_settings(max_examples=40, deadline=None)
    @given(settings=numbers, prediction=numbers, measurement=measurements)
    def round_trip(settings: dict[str, float], prediction: dict[str, float], measurement: Measurement) -> None:
        [experiment_id] = ledger.add_pending([(settings, prediction)])
        ledger.record_measurement(experiment_id, measurement)
        stored = ledger.get(experiment_id)
        # repr also tells -0.0 from 0.0 and keeps the key order
        assert repr((stored.settings, stored.prediction)) == repr((settings, prediction))
        assert repr(stored.measurement) == repr(measurement)

    round_trip()


@pytest.mark.parametrize(
    ("bad_url", "match"),
    [
        ("sqlite:///{tmp}/missing/ledger.sqlite", "cannot open the ledger at sqlite:///.*/missing/ledger.sqlite"),
        ("nosuchdb://somewhere", "cannot open the ledger at nosuchdb://somewhere"),
        ("postgresql+psycopg://lab:s3cret@127.0.0.1:1/campaign", r"cannot open the ledger at .*lab:\*\*\*@"),
    ],
)
def test_an_unopenable_database_is_a_ledger_error(tmp_path: Path, bad_url: str, match: str) -> None:
    with pytest.raises(LedgerError, match=match) as caught:
        Ledger(bad_url.format(tmp=tmp_path))
    assert "s3cret" not in str(caught.value)
    assert "\n" not in str(caught.value)
