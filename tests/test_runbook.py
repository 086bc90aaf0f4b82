"""The run book: an adapter's durable table of the runs it started, so submit stays idempotent across restarts."""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_kill import supraopt_run

from supraopt.campaign import Campaign
from supraopt.errors import RigError
from supraopt.ledger import Ledger, Status
from supraopt.records import Failure, Measurement, Proposal, RunState, RunStatus
from supraopt.rigs import RunBook
from supraopt.rigs.runbook import RUNBOOK_FILE
from supraopt.spec import SPEC_FILE, LoopSettings, RigSettings

SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


def test_a_claim_succeeds_once_and_the_entry_follows_the_run(tmp_path: Path) -> None:
    book = RunBook.in_folder(tmp_path / "rig-state")
    assert book.claim(Proposal("E001", SETTINGS), job=7)
    assert not book.claim(Proposal("E001", {**SETTINGS, "flow_ratio": 9.0}))  # known id: nothing changes
    entry = book.get("E001")
    assert entry is not None and entry.settings == SETTINGS and entry.state is RunState.QUEUED
    assert entry.info == {"job": 7} and entry.result is None and entry.created_at > 0
    assert book.update("E001", RunState.RUNNING, pump="A").info == {"job": 7, "pump": "A"}
    measured = Measurement(diameter_nm=451.25, pdi_pct=4.5, n_particles=120)
    done = book.finish("E001", measured)
    assert done.state is RunState.DONE and done.result == measured and done.info == {"job": 7, "pump": "A"}
    assert book.status("E001") == RunStatus("E001", RunState.DONE, measured)
    assert book.claim(Proposal("E002", SETTINGS))
    assert book.finish("E002", Failure("droplets unstable")).status().state is RunState.FAILED
    assert book.status("E404").state is RunState.LOST and "E404" not in book
    assert [e.experiment_id for e in book] == ["E001", "E002"] and len(book) == 2
    book.close()

    reopened = RunBook(tmp_path / "rig-state" / RUNBOOK_FILE)  # a restarted adapter sees it all
    assert reopened.get("E001") == done and reopened.status("E002").result == Failure("droplets unstable")
    assert not reopened.claim(Proposal("E001", SETTINGS))


def test_release_lets_a_refused_id_be_claimed_again() -> None:
    book = RunBook(None)
    assert book.claim(Proposal("E001", SETTINGS))
    assert book.release("E001") and not book.release("E001")
    assert book.claim(Proposal("E001", SETTINGS))


def test_adapter_mistakes_are_plain_errors() -> None:
    book = RunBook(None)
    with pytest.raises(KeyError, match="E009"):
        book.update("E009", RunState.RUNNING)
    with pytest.raises(KeyError, match="claim it first"):
        book.finish("E009", Failure("x"))
    book.claim(Proposal("E001", SETTINGS))
    with pytest.raises(ValueError, match="lost"):
        book.update("E001", RunState.LOST)
    with pytest.raises(ValueError, match="'finished' is not a run state"):
        book.update("E001", "finished")
    with pytest.raises(TypeError, match="Measurement or a Failure"):
        book.finish("E001", 450.0)  # type: ignore[arg-type]
    assert book.get("E001").state is RunState.QUEUED  # type: ignore[union-attr]


def test_a_damaged_file_or_row_is_a_rig_error_naming_it(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_text("this is not a database, it is a shopping list" * 20)
    with pytest.raises(RigError, match=r"garbage\.sqlite"):
        RunBook(garbage)
    path = tmp_path / "book.sqlite"
    RunBook(path).claim(Proposal("E001", SETTINGS))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET state = 'done', result = '{\"diameter_nm\": -3}'")
    with pytest.raises(RigError, match="damaged entry for 'E001'"):
        RunBook(path).get("E001")


def test_claims_are_atomic_across_threads() -> None:
    book = RunBook(None)
    start = threading.Barrier(8)

    def claim(_: int) -> bool:
        start.wait()
        return book.claim(Proposal("E001", SETTINGS))

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(claim, range(8))) == [False] * 7 + [True]


CLAIMER = """
import sys, time
from pathlib import Path
from supraopt.records import Proposal
from supraopt.rigs.runbook import RunBook
book = RunBook(sys.argv[1])
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
won = [i for i in range(40) if book.claim(Proposal(f"E{i:03d}", {"flow_ratio": 4.0}))]
print(" ".join(map(str, won)))
"""


def test_claims_are_atomic_across_processes(tmp_path: Path) -> None:
    path, go = tmp_path / "book.sqlite", tmp_path / "go"
    RunBook(path).close()
    command = [sys.executable, "-c", CLAIMER, str(path), str(go)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    go.touch()
    won = [int(i) for p in processes for i in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in processes)
    assert sorted(won) == list(range(40)), "every id claimed by exactly one process"


# ---------------------------------------------------------------------------------------------- kill -9

BENCH = '''
"""A machine that outlives any adapter (it logs each run it starts), and two adapters driving it."""
import os
import random

from supraopt.records import Measurement, RigLimits, RunState, RunStatus
from supraopt.rigs import RunBook


class Machine:
    def __init__(self, folder):
        self.log = os.path.join(folder, "machine-starts.log")

    def start(self, experiment_id):
        with open(self.log, "a") as stream:
            stream.write(experiment_id + "\\n")
            stream.flush()
            os.fsync(stream.fileno())

    def measure(self, experiment_id):
        noise = random.Random(experiment_id)
        return Measurement(diameter_nm=400.0 * noise.uniform(0.9, 1.1), pdi_pct=5.0, n_particles=100)


class NaiveRig:
    """Looks right (a known id does nothing), but its run table lives in memory."""

    def __init__(self, machine_dir):
        self.machine = Machine(machine_dir)
        self.runs = {}
        self.polled = set()

    def limits(self):
        return RigLimits()

    def submit(self, proposal):
        if proposal.experiment_id in self.runs:
            return
        self.machine.start(proposal.experiment_id)
        self.runs[proposal.experiment_id] = dict(proposal.settings)

    def known(self, experiment_id):
        return experiment_id in self.runs

    def poll(self, experiment_id):
        if not self.known(experiment_id):
            return RunStatus(experiment_id, RunState.LOST)
        if experiment_id not in self.polled:  # RUNNING on each process's first poll, then DONE
            self.polled.add(experiment_id)
            return RunStatus(experiment_id, RunState.RUNNING)
        return RunStatus(experiment_id, RunState.DONE, self.machine.measure(experiment_id))

    def cancel(self, experiment_id):
        pass


class BookRig(NaiveRig):
    """The same adapter with its run table in a RunBook in the state folder supraopt gives it."""

    def __init__(self, machine_dir, state_dir):
        super().__init__(machine_dir)
        self.book = RunBook.in_folder(state_dir)

    def submit(self, proposal):
        if self.book.claim(proposal):
            self.machine.start(proposal.experiment_id)

    def known(self, experiment_id):
        return experiment_id in self.book
'''

KILLS = ["after_submit:1", "after_mark_running:1"]
"""Killed right after the rig accepted E001, then again while resuming it: the adapter restarts each time."""


def kill_twice_then_finish(directory: Path, adapter: str) -> tuple[list[str], Ledger]:
    directory.mkdir()
    (directory / "bench_machine.py").write_text(BENCH)
    rig = RigSettings(f"bench_machine:{adapter}", {"machine_dir": str(directory)})
    with Campaign.create(directory, "cspbbr3-flow-focusing", 450.0, rig=rig) as c:
        loop = LoopSettings(budget=1, batch=1, stop_on_hit=False, poll_interval_s=0.0, rig_timeout_s=30.0)
        spec = dataclasses.replace(c.spec, loop=loop)
    (directory / SPEC_FILE).write_text(spec.to_toml())
    for crash_at in KILLS:
        killed = supraopt_run(directory, crash_at)
        assert killed.returncode == -signal.SIGKILL, f"{crash_at} never reached:\n{killed.stdout}{killed.stderr}"
    final = supraopt_run(directory, None)
    assert final.returncode == 0, final.stdout + final.stderr
    starts = (directory / "machine-starts.log").read_text().split()
    return starts, Ledger(f"sqlite:///{directory / 'ledger.sqlite'}")


@pytest.fixture(scope="module")
def killed_twice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], Ledger]]:
    """Both adapters through the same kills, side by side (each case is mostly waiting on one process)."""
    with ThreadPoolExecutor(2) as pool:
        runs = {
            name: pool.submit(kill_twice_then_finish, tmp_path_factory.mktemp(name) / "c", name)
            for name in ("NaiveRig", "BookRig")
        }
        return {name: future.result() for name, future in runs.items()}


def test_an_adapter_keeping_its_runs_in_memory_runs_an_experiment_twice(
    killed_twice: dict[str, tuple[list[str], Ledger]],
) -> None:
    """The scenario can fail: the naive adapter forgets E001 on restart, answers LOST and starts it again."""
    starts, ledger = killed_twice["NaiveRig"]
    assert starts.count("E001") >= 2, starts
    assert ledger.get("E001").status is Status.DONE
    resubmits = [e for e in ledger.events("E001") if e["payload"].get("resubmitted")]
    assert len(resubmits) == starts.count("E001") - 1  # each second start is in the ledger, with why


def test_an_adapter_with_a_run_book_runs_nothing_twice(killed_twice: dict[str, tuple[list[str], Ledger]]) -> None:
    starts, ledger = killed_twice["BookRig"]
    assert starts == ["E001"]
    assert ledger.get("E001").status is Status.DONE
    assert not [e for e in ledger.events() if e["kind"] == "resubmitted"]
