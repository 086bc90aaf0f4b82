"""A durable run book for rig adapters: which experiments the rig has started, and what became of them.

``submit`` must be idempotent on the experiment id *across restarts of the adapter*: after a crash,
a reboot or a kill -9 of ``supraopt run`` a fresh adapter object is built, the runner polls the
experiments it had in flight, and an adapter that kept its run table in memory answers LOST, gets
the experiment submitted again and runs it twice. :class:`RunBook` is the table such an adapter
needs, on disk: one SQLite file (stdlib :mod:`sqlite3`, WAL, ``synchronous=FULL``) with one row per
experiment id::

    experiment_id | settings (JSON) | state | result (JSON) | info (JSON) | created_at | updated_at

Use it like this (``state_dir`` is the folder supraopt gives an adapter whose constructor has a
``state_dir`` parameter: ``<campaign>/rig-state/``)::

    class MyRig:
        def __init__(self, port: str, state_dir: str | None = None):
            self.book = RunBook.in_folder(state_dir) if state_dir else RunBook(None)

        def submit(self, proposal):
            if not self.book.claim(proposal):
                return                                  # known id: already started, do nothing
            job = self.pumps.start(proposal.settings)   # the hardware
            self.book.update(proposal.experiment_id, RunState.RUNNING, job=job)

        def poll(self, experiment_id):
            entry = self.book.get(experiment_id)
            if entry is None or "job" not in entry.info:    # never claimed, or died before the start
                return RunStatus(experiment_id, RunState.LOST)
            if entry.state is RunState.RUNNING and self.pumps.finished(entry.info["job"]):
                entry = self.book.finish(experiment_id, self.measure(entry.info["job"]))
            return entry.status()

:meth:`RunBook.claim` is atomic, across threads and processes: of any number of claims of one id,
exactly one returns True. Claim *before* starting the hardware: if the adapter dies between the
claim and the start, ``poll`` answers LOST, the runner submits once more, the claim is already
taken, and the experiment is given up as lost: a run may be lost, never started twice. (Use
:meth:`RunBook.release` when the hardware refused a run, so that the id may be submitted again.)
Every change is on disk before the method returns.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from supraopt.errors import RigError
from supraopt.records import Failure, Measurement, Proposal, RunState, RunStatus

RUNBOOK_FILE = "runbook.sqlite"
"""The run book's file name in a state folder (:meth:`RunBook.in_folder`)."""
BUSY_TIMEOUT_S = 30.0
"""How long a write waits for another process holding the file before it fails with a RigError."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    experiment_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    info TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""
_COLUMNS = "experiment_id, settings, state, result, info, created_at, updated_at"


@dataclass(frozen=True)
class Entry:
    """One experiment in the run book."""

    experiment_id: str
    settings: dict[str, float]
    """The settings it was claimed with."""
    state: RunState
    """QUEUED right after the claim; then whatever the adapter sets (RUNNING, DONE, FAILED, CANCELLED)."""
    result: Measurement | Failure | None = None
    """The measurement of a DONE run, the failure of a FAILED one."""
    info: dict[str, Any] = field(default_factory=dict)
    """The adapter's own notes (a hardware job number, a start time...), any JSON values."""
    created_at: float = 0.0
    """When it was claimed, seconds since the epoch."""
    updated_at: float = 0.0

    def status(self, message: str = "") -> RunStatus:
        """The entry as an answer to ``poll``."""
        return RunStatus(self.experiment_id, self.state, self.result, message)


class RunBook:
    """Experiment id -> settings, state, result, in one SQLite file shared by every instance and process.

    Args:
        path: the SQLite file (created with its folder); None keeps the book in memory, which
            survives no restart: for tests and throw-away rigs only.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()  # one connection, used from the runner's worker threads
        where = ":memory:" if self.path is None else str(self.path)
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(where, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as error:
            raise RigError(f"cannot open the run book {where} ({error}); check the folder.") from None
        try:
            with self._errors():
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute(_SCHEMA)
        except RigError:
            self._db.close()
            raise

    @classmethod
    def in_folder(cls, state_dir: str | os.PathLike[str], name: str = RUNBOOK_FILE) -> RunBook:
        """The run book ``name`` in the state folder ``state_dir`` (created if need be)."""
        return cls(Path(state_dir) / name)

    # ------------------------------------------------------------------ writing

    def claim(self, proposal: Proposal, **info: Any) -> bool:
        """Record ``proposal`` as QUEUED if its id is new: True the first time, False ever after.

        Atomic: two adapters (threads or processes) claiming one id at once get True exactly once.
        ``info`` is kept with the entry (JSON values).
        """
        settings = {str(name): float(value) for name, value in proposal.settings.items()}
        now = time.time()
        row = (proposal.experiment_id, _dump(settings), RunState.QUEUED.value, None, _dump(info), now, now)
        with self._errors():
            cursor = self._db.execute(f"INSERT OR IGNORE INTO runs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        return cursor.rowcount == 1

    def update(self, experiment_id: str, state: RunState | str | None = None, **info: Any) -> Entry:
        """Set the state (when given) and merge ``info`` into the entry's notes; return the entry.

        Raises KeyError for an id never claimed (a bug in the adapter, not a rig fault).
        """
        return self._write(experiment_id, None if state is None else _state(state), None, info)

    def finish(self, experiment_id: str, result: Measurement | Failure, **info: Any) -> Entry:
        """Keep the result: DONE with a :class:`Measurement`, FAILED with a :class:`Failure`; return the entry."""
        if not isinstance(result, (Measurement, Failure)):
            raise TypeError(f"a run finishes with a Measurement or a Failure, not {result!r}")
        state = RunState.DONE if isinstance(result, Measurement) else RunState.FAILED
        return self._write(experiment_id, state, result, info)

    def release(self, experiment_id: str) -> bool:
        """Forget an id the hardware never started (it refused the run): it may be claimed again.

        Returns whether there was such an entry. Never release a run the hardware may have started.
        """
        with self._errors():
            cursor = self._db.execute("DELETE FROM runs WHERE experiment_id = ?", (experiment_id,))
        return cursor.rowcount == 1

    # ------------------------------------------------------------------ reading

    def get(self, experiment_id: str) -> Entry | None:
        """The entry under ``experiment_id``, or None if it was never claimed."""
        with self._errors():
            return self._get(experiment_id)

    def status(self, experiment_id: str) -> RunStatus:
        """The entry as an answer to ``poll``: LOST when the id was never claimed."""
        entry = self.get(experiment_id)
        if entry is None:
            return RunStatus(experiment_id, RunState.LOST, message="no run under this id in the run book")
        return entry.status()

    def entries(self) -> list[Entry]:
        """Every entry, oldest claim first."""
        with self._errors():
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM runs ORDER BY created_at, experiment_id").fetchall()
        return [_entry(row, self.where) for row in rows]

    def __contains__(self, experiment_id: object) -> bool:
        return isinstance(experiment_id, str) and self.get(experiment_id) is not None

    def __len__(self) -> int:
        with self._errors():
            return int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    # ------------------------------------------------------------------ the file

    @property
    def where(self) -> str:
        return "in memory" if self.path is None else str(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RunBook:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunBook({self.where})"

    def _get(self, experiment_id: str) -> Entry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE experiment_id = ?", (experiment_id,)).fetchone()
        return None if row is None else _entry(row, self.where)

    def _write(
        self, experiment_id: str, state: RunState | None, result: Measurement | Failure | None, info: dict[str, Any]
    ) -> Entry:
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                entry = self._get(experiment_id)
                if entry is None:
                    raise KeyError(f"experiment {experiment_id!r} is not in the run book {self.where}; claim it first")
                self._db.execute(
                    "UPDATE runs SET state = ?, result = ?, info = ?, updated_at = ? WHERE experiment_id = ?",
                    (
                        (state or entry.state).value,
                        _dump(result.to_json()) if result is not None else _raw_result(entry),
                        _dump({**entry.info, **info}),
                        time.time(),
                        experiment_id,
                    ),
                )
                written = self._get(experiment_id)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        assert written is not None
        return written

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Hold the lock; turn SQLite's errors (locked, disk full, not a database) into RigError."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as error:
                raise RigError(f"the run book {self.where} failed: {error}.") from error


def _dump(value: Any) -> str:
    return json.dumps(value, allow_nan=False, sort_keys=True)


def _raw_result(entry: Entry) -> str | None:
    return None if entry.result is None else _dump(entry.result.to_json())


def _state(value: RunState | str) -> RunState:
    try:
        state = RunState(value)
    except ValueError:
        raise ValueError(
            f"state={value!r} is not a run state: use one of {', '.join(s.value for s in RunState)}"
        ) from None
    if state is RunState.LOST:
        raise ValueError("state='lost' cannot be written: a lost run is one the run book does not hold")
    return state


def _entry(row: tuple[Any, ...], where: str) -> Entry:
    experiment_id, settings, state, result, info, created_at, updated_at = row
    try:
        run_state = RunState(state)
        data: Any = None if result is None else json.loads(result)
        outcome: Measurement | Failure | None = None
        if run_state is RunState.DONE:
            outcome = Measurement.from_json(data)
        elif run_state is RunState.FAILED:
            outcome = Failure(data["reason"])
        values = {str(k): float(v) for k, v in json.loads(settings).items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError("non-finite setting")
        return Entry(str(experiment_id), values, run_state, outcome, dict(json.loads(info)), created_at, updated_at)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise RigError(
            f"the run book {where} holds a damaged entry for {experiment_id!r} ({error}); "
            "repair or delete that row with the sqlite3 tool."
        ) from None


__all__ = ["RUNBOOK_FILE", "Entry", "RunBook"]
