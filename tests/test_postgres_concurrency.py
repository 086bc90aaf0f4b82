"""Eight processes suggesting and recording on one campaign at once: no experiment lost or duplicated.

On PostgreSQL (marker ``postgres``; needs SUPRAOPT_TEST_POSTGRES_URL, which ``bash .ci/with-postgres``
sets up) in a schema of its own that is dropped afterwards, and on SQLite, the default, for comparison.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from supraopt.campaign import Campaign
from supraopt.ledger import Status
from supraopt.records import Failure, Measurement

POSTGRES_URL = os.environ.get("SUPRAOPT_TEST_POSTGRES_URL")
CSPBBR3 = "cspbbr3-flow-focusing"
WORKERS = 8
BATCHES = (1, 2)
"""Each worker suggests and records twice, one and two experiments (in a worker-dependent order)."""


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(
                    POSTGRES_URL is None,
                    reason="SUPRAOPT_TEST_POSTGRES_URL is not set (run under 'bash .ci/with-postgres' to start a server)",
                ),
            ],
        ),
    ]
)
def ledger_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the campaign's own SQLite file), or a fresh schema on the PostgreSQL server, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    assert POSTGRES_URL is not None
    schema = f"supraopt_concurrency_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def _work(directory: str, worker: int, barrier: Any, results: Any) -> None:
    """Worker process: open the campaign, wait for the others, then suggest and record, as a lab client would."""
    recorded: dict[str, dict[str, Any]] = {}
    problem = ""
    try:
        import torch

        from supraopt.campaign import ModelOptions
        from supraopt.rigs.simulated import World

        torch.set_num_threads(1)  # eight processes share the machine's cores
        world = World.default(CSPBBR3)
        # Sobol proposals keep each suggest cheap (the surrogates are still fitted from the ledger every
        # time): what is under test is the ledger under concurrent writers, not the acquisition
        with Campaign.open(directory, ModelOptions(random_start=1000)) as campaign:
            barrier.wait(timeout=120)  # everyone has imported torch and opened the ledger: now all at once
            for n in BATCHES if worker % 2 else reversed(BATCHES):
                for suggestion in campaign.suggest(n):
                    diameter_nm, pdi_pct, reason = world.truth(suggestion.settings)
                    result: Measurement | Failure = (
                        Failure(reason) if reason else Measurement(diameter_nm, pdi_pct, n_particles=100 + worker)
                    )
                    campaign.record(suggestion.experiment_id, result, note=f"worker {worker}")
                    recorded[suggestion.experiment_id] = {"settings": suggestion.settings, "result": result}
    except BaseException as error:  # reported to the test, which fails with it
        problem = f"{type(error).__name__}: {error}"
    finally:
        results.put((worker, recorded, problem))


def test_eight_processes_suggesting_and_recording_lose_and_duplicate_nothing(
    tmp_path: Path, ledger_url: str | None
) -> None:
    directory = tmp_path / "campaign"
    Campaign.create(directory, CSPBBR3, 450.0, seed=0, ledger_url=ledger_url).close()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    workers = [context.Process(target=_work, args=(str(directory), n, barrier, results)) for n in range(WORKERS)]
    for worker in workers:
        worker.start()
    returned = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [problem for _, _, problem in returned if problem] == []
    assert [worker.exitcode for worker in workers] == [0] * WORKERS

    claimed = [experiment_id for _, recorded, _ in returned for experiment_id in recorded]
    total = WORKERS * sum(BATCHES)
    assert len(claimed) == len(set(claimed)) == total  # no id handed to two processes
    by_id = {
        experiment_id: (worker, entry) for worker, recorded, _ in returned for experiment_id, entry in recorded.items()
    }
    with Campaign.open(directory) as campaign:
        if ledger_url is not None:
            assert campaign.ledger._db.backend == "postgresql"
        experiments = campaign.ledger.experiments()
        events = campaign.ledger.events()
    assert [e.id for e in experiments] == sorted(claimed) == [f"E{n:03d}" for n in range(1, total + 1)]
    for e in experiments:  # every record is there, as its process wrote it
        worker, entry = by_id[e.id]
        assert e.settings == entry["settings"]
        assert e.note == f"worker {worker}"
        if isinstance(entry["result"], Measurement):
            assert (e.status, e.measurement, e.failure) == (Status.DONE, entry["result"], None)
        else:
            assert (e.status, e.failure, e.measurement) == (Status.FAILED, entry["result"], None)
    proposed = [tuple(sorted(e.settings.items())) for e in experiments]
    assert len(set(proposed)) == total  # the suggestion lock: each process saw the others' pending runs
    history: dict[str, list[str]] = {}
    for event in events:
        history.setdefault(event["experiment_id"], []).append(event["kind"])
    assert sorted(history) == sorted(claimed)
    assert Counter(tuple(kinds) for kinds in history.values()).keys() <= {
        ("suggested", "measured"),
        ("suggested", "failed"),
    }
    assert len(events) == 2 * total
