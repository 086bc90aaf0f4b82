"""The durable record of a campaign: every proposal, its status changes and its results.

Two tables: ``experiments`` (one row per proposal and its current status) and ``events`` (append-only
history). Each public write is one transaction, committed before the call returns, and validates
before it writes, so a refused call leaves the ledger unchanged. Results are never overwritten: a
correction is a new event and the latest result event wins. SQLite is the default; the same SQL runs
on PostgreSQL (``postgresql+psycopg://...``).

The SQL is written once, in the words SQLite and PostgreSQL share, and sent through the Python
database API (``sqlite3`` or ``psycopg``) by :class:`_Database`, which holds the few differences
(placeholders, the auto-numbered key, row locks, how a transaction begins). No ORM or SQL toolkit:
``status`` and ``record`` start in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import threading
import uuid
from collections import namedtuple
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supraopt.errors import InputError, LedgerError
from supraopt.records import Context, Failure, Measurement, validate_context

if TYPE_CHECKING:
    import pandas as pd


class Status(StrEnum):
    """Where an experiment stands."""

    PENDING = "pending"
    """Suggested, not yet accepted by the rig."""
    DISPATCHED = "dispatched"
    RUNNING = "running"
    DONE = "done"
    """Has a :class:`Measurement`."""
    FAILED = "failed"
    """The chemistry failed: has a :class:`Failure` (information for the feasibility model)."""
    ABANDONED = "abandoned"
    """Given up without a chemical result (rig error, lost run): never fed to the model."""


OPEN = frozenset({Status.PENDING, Status.DISPATCHED, Status.RUNNING})
"""Suggested but no result yet: the optimiser treats these as pending points."""

_KINDS = ("suggested", "dispatched", "running", "measured", "failed", "abandoned", "corrected")
_RESULT_KINDS = ("measured", "failed", "corrected")
_MEASUREMENT_COLUMNS = tuple(f.name for f in fields(Measurement) if f.name != "context")


def _one_of(column: str, values: Collection[str]) -> str:
    return f"CONSTRAINT valid_{column} CHECK ({column} IN ({', '.join(repr(v) for v in values)}))"


CURRENT_CONTEXT = "current_context"
CONTEXT_KINDS = "context_kinds"
SHARED_SPEC = "campaign_spec"  # campaign.toml, for watchers that have the database but not the folder
_TABLES = ("experiments", "campaign_state", "events", "imports")
_SCHEMA = (
    # SERIAL_KEY: the dialect's auto-numbered integer primary key (see _Database)
    f"""CREATE TABLE IF NOT EXISTS experiments (
        seq SERIAL_KEY,
        id VARCHAR(40) NOT NULL UNIQUE,
        status VARCHAR(16) NOT NULL,
        settings TEXT NOT NULL,
        prediction TEXT NOT NULL,
        created_at VARCHAR(40) NOT NULL,
        updated_at VARCHAR(40) NOT NULL,
        note TEXT NOT NULL,
        context TEXT,
        {_one_of("status", [s.value for s in Status])})""",
    # small key -> JSON values: the current context, the kinds of context names
    """CREATE TABLE IF NOT EXISTS campaign_state (
        key VARCHAR(60) NOT NULL PRIMARY KEY,
        value TEXT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS events (
        seq SERIAL_KEY,
        experiment_id VARCHAR(40) NOT NULL REFERENCES experiments (id),
        kind VARCHAR(16) NOT NULL,
        at VARCHAR(40) NOT NULL,
        payload TEXT NOT NULL,
        {_one_of("kind", _KINDS)})""",
    "CREATE INDEX IF NOT EXISTS ix_events_experiment_id ON events (experiment_id)",
    # one row per imported result (record --csv): a content hash of the row, to spot a file imported
    # twice; ledgers written before it existed get the table when they are next opened
    """CREATE TABLE IF NOT EXISTS imports (
        seq SERIAL_KEY,
        digest VARCHAR(64) NOT NULL,
        experiment_id VARCHAR(40) NOT NULL,
        source TEXT NOT NULL,
        at VARCHAR(40) NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_imports_digest ON imports (digest)",
)
"""The tables (as earlier supraopt versions made them with SQLAlchemy, so their ledgers open unchanged).
``experiments.context`` was added in 2026-12 (see :meth:`Ledger._migrate`)."""
_EXPERIMENT_COLUMNS = "e.seq, e.id, e.status, e.settings, e.prediction, e.created_at, e.updated_at, e.note, e.context"


class _OpenError(Exception):
    """The URL names no database this ledger can use."""


def _shown(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    return re.sub(r"^([^:/]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def _placeholders(values: Collection[Any]) -> str:
    return ", ".join("?" * len(values))


class _Database:
    """One SQLite file or PostgreSQL database, reached through its DB-API driver, speaking one SQL.

    Statements use ``?`` placeholders (turned into psycopg's ``%s``). Connections are pooled, and run
    in autocommit mode so that :meth:`Ledger._transaction` opens each transaction itself: on SQLite a
    writer takes the write lock at ``BEGIN IMMEDIATE`` (so it queues on ``busy_timeout`` instead of
    failing with "database is locked" when upgrading a read lock) and a reader gets a WAL snapshot
    (``BEGIN DEFERRED``). SQLite connections are durable: WAL, full fsync, 30 s wait for locks.
    """

    def __init__(self, url: str) -> None:
        scheme, sep, rest = url.partition("://")
        backend, _, driver = scheme.partition("+")
        self.backend = backend
        if sep and backend == "sqlite" and driver in ("", "pysqlite"):
            import sqlite3

            self.path = rest[1:] if rest.startswith("/") else rest
            if self.path in ("", ":memory:") or "?" in self.path:
                raise _OpenError("give the path of a SQLite file: sqlite:///PATH")
            self.driver: Any = sqlite3
            self.serial_key = "INTEGER PRIMARY KEY AUTOINCREMENT"
            self.for_update = ""  # SQLite has no row locks: BEGIN IMMEDIATE already serialises writers
        elif sep and backend == "postgresql" and driver in ("", "psycopg"):
            import psycopg

            self.path = ""
            self.conninfo = f"postgresql://{rest}"
            self.driver = psycopg
            self.serial_key = "SERIAL PRIMARY KEY"
            self.for_update = " FOR UPDATE"
        else:
            raise _OpenError(f"unknown database {scheme!r}: use sqlite:///PATH or postgresql+psycopg://...")
        self.error: type[Exception] = self.driver.Error
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def connect(self) -> Any:
        """A new connection, set up (autocommit; on SQLite: WAL, full fsync, wait for locks)."""
        if self.backend == "sqlite":
            conn = self.driver.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            # busy_timeout first, so that switching a new file to WAL waits for other processes
            for pragma in ("busy_timeout=30000", "journal_mode=WAL", "synchronous=FULL"):
                conn.execute(f"PRAGMA {pragma}")
            return conn
        return self.driver.connect(self.conninfo, autocommit=True)

    def sql(self, statement: str) -> str:
        statement = statement.replace("SERIAL_KEY", self.serial_key)
        return statement if self.backend == "sqlite" else statement.replace("?", "%s")

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A pooled connection; closed instead of returned after a database error or an interruption
        (its state is then unknown). Other errors leave it reusable: the caller has rolled back."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share its parent's connections
                self._idle, self._pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self.connect()
        try:
            yield conn
        except BaseException as exc:
            if isinstance(exc, self.error) or not isinstance(exc, Exception):
                conn.close()
            else:
                self._release(conn)
            raise
        self._release(conn)

    def _release(self, conn: Any) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Cursor:
    """What a transaction runs statements on: ``execute(sql, params)`` returns the driver's cursor."""

    def __init__(self, db: _Database, conn: Any) -> None:
        self._db = db
        self._cursor = conn.cursor()

    @property
    def for_update(self) -> str:
        """`` FOR UPDATE`` where rows can be locked (PostgreSQL), else nothing."""
        return self._db.for_update

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self._cursor.execute(self._db.sql(statement), tuple(params))
        return self._cursor

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of a query, each a named tuple of its columns."""
        cursor = self.execute(statement, params)
        row_type = namedtuple("Row", [d[0] for d in cursor.description], rename=True)  # type: ignore[misc]
        return [row_type(*row) for row in cursor.fetchall()]

    def value(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row, or None without rows."""
        row = self.execute(statement, params).fetchone()
        return None if row is None else row[0]


@dataclass(frozen=True)
class BatchRow:
    """One result of a bulk import: for an open experiment (``experiment_id``) or a new run (``settings``)."""

    experiment_id: str | None
    settings: dict[str, float] | None
    result: Measurement | Failure
    note: str = ""
    digest: str | None = None
    """Content hash of the source row, kept in the ledger to recognise a repeated import."""
    context: Mapping[str, Any] = field(default_factory=dict)
    """Context of the run (merged into an open experiment's own)."""


@dataclass(frozen=True)
class Experiment:
    """One experiment as the ledger knows it now."""

    id: str
    """``E001``, ``E002``, ... in the order the experiments were suggested."""
    status: Status
    settings: dict[str, float]
    """Parameter name -> value the rig must apply."""
    prediction: dict[str, float]
    """What the model expected when it suggested the experiment (diameter_nm, p_hit, ...)."""
    created_at: datetime
    updated_at: datetime
    """Time of the last status change (UTC, like ``created_at``)."""
    measurement: Measurement | None
    """Latest effective result, after corrections."""
    failure: Failure | None
    """Why the chemistry failed, when the latest result is a failure."""
    note: str
    """Abandon reason, rig message or correction note."""
    context: Context = field(default_factory=dict)
    """Conditions the experiment ran (or is to run) under: chip, NC batch, room temperature..."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, allow_nan=False)


def _numbers(what: str, values: Mapping[str, float]) -> dict[str, float]:
    """Return ``values`` as a plain dict of finite floats, or raise :class:`InputError`."""
    out: dict[str, float] = {}
    for name, value in values.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError(f"{what} {name!r}={value!r} must be a number under a text name.")
        if not math.isfinite(value):
            raise InputError(f"{what} {name}={value} must be finite.")
        out[name] = float(value)
    return out


def _reason(what: str, text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what}={text!r} must be a non-empty text saying why.")
    return text


def _result_payload(result: Measurement | Failure, note: str) -> dict[str, Any]:
    if isinstance(result, Measurement):
        return {"measurement": result.to_json(), "note": note}
    if isinstance(result, Failure):
        return {"failure": result.to_json(), "note": note}
    raise InputError(f"result={result!r} must be a Measurement or a Failure.")


def _result_context(result: Measurement | Failure, context: Mapping[str, Any] | None) -> Context:
    """The context a result sets on its experiment: the measurement's own, then ``context`` over it."""
    own = result.context if isinstance(result, Measurement) and result.context else {}
    return validate_context(dict(own) | dict(context or {}))


def _cause(exc: BaseException) -> str:
    """The database's own complaint about ``exc``, on one line."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def _unknown(experiment_id: str) -> LedgerError:
    return LedgerError(f"no experiment {experiment_id!r} in this campaign; check the id (ids look like E001).")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Damage(Exception):
    """A value read back from the ledger that no supraopt write could have produced."""


def _timestamp(text: Any, what: str = "timestamp") -> datetime:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise _Damage(f"{what} {text!r} is not an ISO date and time") from None


def _json(text: Any, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise _Damage(f"{what} {str(text)[:60]!r} is not valid JSON") from None


def _number_map(text: Any, what: str) -> dict[str, float]:
    data = _json(text, what)
    if not isinstance(data, dict):
        raise _Damage(f"{what} is {str(text)[:60]!r}, not a JSON object of numbers")
    try:
        return _numbers(what, data)
    except InputError as error:
        raise _Damage(str(error).rstrip(".")) from None


def _context_map(text: Any) -> dict[str, Any]:
    if not text:
        return {}
    data = _json(text, "context")
    if not isinstance(data, dict):
        raise _Damage(f"context is {str(text)[:60]!r}, not a JSON object")
    try:
        return validate_context(data)
    except InputError as error:
        raise _Damage(str(error).rstrip(".")) from None


def _experiment(row: Any) -> Experiment:
    try:
        status = Status(row.status)
    except ValueError:
        raise _Damage(f"status {row.status!r} is not one of {', '.join(s.value for s in Status)}") from None
    result = _json(row.result, "result payload") if row.result is not None else {}
    if not isinstance(result, dict):
        raise _Damage(f"result payload {str(row.result)[:60]!r} is not a JSON object")
    try:
        measurement = Measurement.from_json(result["measurement"]) if "measurement" in result else None
        failure = Failure(result["failure"]["reason"]) if "failure" in result else None
    except (InputError, KeyError, TypeError, ValueError) as error:
        raise _Damage(f"its result {str(row.result)[:80]!r} is not a valid measurement or failure ({error})") from None
    return Experiment(
        id=row.id,
        status=status,
        settings=_number_map(row.settings, "settings"),
        prediction=_number_map(row.prediction, "prediction"),
        created_at=_timestamp(row.created_at, "created_at"),
        updated_at=_timestamp(row.updated_at, "updated_at"),
        measurement=measurement,
        failure=failure,
        note=str(row.note or ""),
        context=_context_map(row.context),
    )


def _refuse_empty_file(database: Path) -> None:
    """A 0-byte SQLite ledger (any path) is a lost history, not a new campaign: say so, write nothing."""
    try:
        wal = database.with_name(database.name + "-wal")
        empty = database.stat().st_size == 0 and (not wal.exists() or wal.stat().st_size == 0)
    except OSError:
        return  # no ledger yet (a new campaign) or unreadable: opening it will say
    if empty:
        raise LedgerError(
            f"the ledger {database} is an empty file (0 bytes): this campaign's history is missing. Restore it "
            "from a backup, or delete the empty file to start this campaign with an empty ledger."
        )


def holds_ledger(url: str) -> bool:
    """Whether the existing database at ``url`` holds a supraopt ledger, found without creating anything
    (:class:`Ledger` creates the file and the tables it misses). :class:`~supraopt.errors.LedgerError`
    when there is no such SQLite file or the URL cannot be opened."""
    try:
        db = _Database(url)
        if db.backend == "sqlite" and not Path(db.path).is_file():
            raise LedgerError(f"no ledger file at {db.path}; check the path.")
        if db.backend == "sqlite":
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'"
        else:
            query = "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'experiments'"
        try:
            with db.connection() as conn:
                return conn.execute(query).fetchone() is not None
        finally:
            db.close()
    except LedgerError:
        raise
    except Exception as exc:
        raise LedgerError(f"cannot be opened ({_cause(exc)}); check the URL.") from exc


class Ledger:
    """The durable record of one campaign, in the database at ``url``: ``sqlite:///PATH`` (a file,
    created if missing) or ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE``."""

    def __init__(self, url: str) -> None:
        self._where = _shown(url)
        try:
            self._db = _Database(url)
            if self._db.backend == "sqlite":
                _refuse_empty_file(Path(self._db.path))
            self._create()
            self._migrate()
        except (_OpenError, ImportError) as exc:
            raise LedgerError(f"cannot open the ledger at {self._where} ({_cause(exc)}); check the URL.") from exc
        except Exception as exc:
            cause: BaseException = exc
            if isinstance(exc, LedgerError) and exc.__cause__ is not None:  # from _transaction
                cause = exc.__cause__
            elif not isinstance(exc, self._db.error):
                raise
            raise LedgerError(
                f"cannot open the ledger at {self._where} ({_cause(cause)}); "
                "check the URL and that its folder or server exists and is writable."
            ) from exc

    def _columns(self, table: str) -> set[str] | None:
        """The columns of ``table``, or None if there is no such table."""
        with self._db.connection() as conn:  # a database that cannot be reached raises here
            try:
                cursor = _Cursor(self._db, conn).execute(f"SELECT * FROM {table} WHERE 1 = 0")
            except self._db.error:
                return None
            return {d[0] for d in cursor.description}

    def _create(self) -> None:
        """Create the tables and indexes that are missing (in one transaction; none if all are there)."""
        if all(self._columns(table) is not None for table in _TABLES):
            return
        with self._transaction(write=True) as cur:
            if self._db.backend == "postgresql":  # two processes creating at once would collide
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('supraopt-schema'))")
            for statement in _SCHEMA:
                cur.execute(statement)

    def _migrate(self) -> None:
        """Bring a ledger written by an older supraopt up to date (adds the ``context`` column)."""
        if "context" in (self._columns("experiments") or set()):
            return
        try:
            with self._transaction(write=True) as cur:
                cur.execute("ALTER TABLE experiments ADD COLUMN context TEXT")
        except LedgerError:  # another process migrated it meanwhile
            if "context" not in (self._columns("experiments") or set()):
                raise

    def close(self) -> None:
        """Release the database connections."""
        self._db.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the campaign's suggestion lock: one process at a time reads the ledger, proposes and
        records its proposals, so concurrent ``suggest`` calls see each other's pending experiments.

        SQLite: an exclusive ``flock`` on ``<database>.lock`` beside the file; PostgreSQL: a session
        advisory lock. Other writes (results) are not blocked.
        """
        if self._db.backend == "sqlite":
            import fcntl

            with open(f"{self._db.path}.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            with self._db.connection() as conn:
                cur = _Cursor(self._db, conn)
                cur.execute("SELECT pg_advisory_lock(hashtext('supraopt-suggest'))")
                try:
                    yield
                finally:
                    cur.execute("SELECT pg_advisory_unlock(hashtext('supraopt-suggest'))")

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[_Cursor]:
        """One transaction, committed on exit; database errors become :class:`LedgerError`."""
        begin = "BEGIN"
        if self._db.backend == "sqlite":
            begin = "BEGIN IMMEDIATE" if write else "BEGIN DEFERRED"
        try:
            with self._db.connection() as conn:
                cur = _Cursor(self._db, conn)
                cur.execute(begin)
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
        except self._db.error as exc:
            raise LedgerError(f"the ledger at {self._where} failed ({_cause(exc)}); nothing was changed.") from exc

    def add_pending(
        self,
        items: Sequence[tuple[dict[str, float], dict[str, float]]],
        *,
        context: Mapping[str, Any] | None = None,
        current_context: Mapping[str, Any] | None = None,
        context_kinds: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Record suggested experiments, given as ``(settings, prediction)`` pairs; return their new ids.

        ``context`` is stored with each of them; ``current_context`` (if given) becomes the
        campaign's current context and ``context_kinds`` is added to the remembered kinds, in the
        same transaction.
        """
        rows = [(_numbers("setting", settings), _numbers("prediction", prediction)) for settings, prediction in items]
        ctx = validate_context(dict(context or {}))
        current = None if current_context is None else validate_context(dict(current_context))
        ids = []
        with self._transaction(write=True) as conn:
            now = _now()
            if current is not None:
                self._put_state(conn, CURRENT_CONTEXT, current)
            if context_kinds:
                self._put_state(conn, CONTEXT_KINDS, self._get_state(conn, CONTEXT_KINDS) | dict(context_kinds))
            ids = [self._insert_pending(conn, settings, prediction, now, ctx) for settings, prediction in rows]
        return ids

    @staticmethod
    def _get_state(conn: _Cursor, key: str) -> dict[str, Any]:
        value = conn.value("SELECT value FROM campaign_state WHERE key = ?", [key])
        return {} if value is None else dict(json.loads(value))

    @staticmethod
    def _put_state(conn: _Cursor, key: str, value: Mapping[str, Any]) -> None:
        if conn.value("SELECT key FROM campaign_state WHERE key = ?", [key]) is None:
            conn.execute("INSERT INTO campaign_state (key, value) VALUES (?, ?)", [key, _dumps(value)])
        else:
            conn.execute("UPDATE campaign_state SET value = ? WHERE key = ?", [_dumps(value), key])

    def current_context(self) -> Context:
        """The conditions the next experiments run under, as last stated to ``suggest`` (may be empty)."""
        with self._transaction(write=False) as conn:
            return validate_context(self._get_state(conn, CURRENT_CONTEXT))

    def context_kinds(self) -> dict[str, str]:
        """Context names met so far -> ``category`` or ``number`` (remembered from their first use)."""
        with self._transaction(write=False) as conn:
            return {str(k): str(v) for k, v in self._get_state(conn, CONTEXT_KINDS).items()}

    def shared_spec(self) -> str | None:
        """The campaign's ``campaign.toml`` text as last stored by :meth:`share_spec` (None: never stored)."""
        with self._transaction(write=False) as conn:
            text = self._get_state(conn, SHARED_SPEC).get("toml")
        return text if isinstance(text, str) else None

    def share_spec(self, text: str) -> None:
        """Keep ``text`` (campaign.toml) in the ledger, so ``supraopt dashboard --ledger-url`` needs no folder."""
        if self.shared_spec() != text:
            with self._transaction(write=True) as conn:
                self._put_state(conn, SHARED_SPEC, {"toml": text})

    def set_current_context(self, context: Mapping[str, Any]) -> None:
        """Replace the campaign's current context."""
        ctx = validate_context(dict(context))
        with self._transaction(write=True) as conn:
            self._put_state(conn, CURRENT_CONTEXT, ctx)

    def remember_context_kinds(self, kinds: Mapping[str, str]) -> None:
        """Add context names -> ``category`` | ``number`` to the remembered kinds (first use wins)."""
        with self._transaction(write=True) as conn:
            self._put_state(conn, CONTEXT_KINDS, dict(kinds) | self._get_state(conn, CONTEXT_KINDS))

    @classmethod
    def _insert_pending(
        cls,
        conn: _Cursor,
        settings: dict[str, float],
        prediction: dict[str, float],
        now: str,
        context: Context | None = None,
    ) -> str:
        placeholder = f"new-{uuid.uuid4().hex}"  # unique until the seq is known
        values: dict[str, str | None] = {"id": placeholder, "status": Status.PENDING.value}
        values |= {"created_at": now, "updated_at": now, "note": "", "settings": _dumps(settings)}
        values |= {"prediction": _dumps(prediction), "context": _dumps(context) if context else None}
        insert = f"INSERT INTO experiments ({', '.join(values)}) VALUES ({_placeholders(values)}) RETURNING seq"
        seq = conn.value(insert, list(values.values()))
        experiment_id = f"E{seq:03d}"
        conn.execute("UPDATE experiments SET id = ? WHERE seq = ?", [experiment_id, seq])
        payload: dict[str, Any] = {"settings": settings, "prediction": prediction}
        cls._append(conn, experiment_id, "suggested", now, payload | ({"context": context} if context else {}))
        return experiment_id

    def record_batch(
        self, rows: Sequence[BatchRow], source: str = "", context_kinds: Mapping[str, str] | None = None
    ) -> list[str]:
        """Record many results in ONE transaction: all of them, or (on any error or interruption) none.

        A row with an ``experiment_id`` records the result of that open experiment; a row without one
        adds a new run with its ``settings`` and result. Each row's ``digest`` is kept (see :meth:`imported`).
        Returns the experiment ids, in the order of ``rows``.
        """
        prepared = []
        for row in rows:
            settings = None if row.settings is None else _numbers("setting", row.settings)
            if (row.experiment_id is None) == (settings is None):
                raise InputError(f"a batch row needs either an experiment id or settings, not {row!r}.")
            prepared.append((row, settings, _result_payload(row.result, row.note), validate_context(dict(row.context))))
        ids = []
        with self._transaction(write=True) as conn:
            now = _now()
            if context_kinds:
                self._put_state(conn, CONTEXT_KINDS, dict(context_kinds) | self._get_state(conn, CONTEXT_KINDS))
            for row, settings, payload, ctx in prepared:
                if settings is not None:
                    experiment_id = self._insert_pending(conn, settings, {}, now, ctx)
                else:
                    experiment_id = str(row.experiment_id)
                    self._require_open(experiment_id, self._lock(conn, experiment_id))
                    self._merge_context(conn, experiment_id, ctx)
                status, kind = (Status.DONE, "measured") if "measurement" in payload else (Status.FAILED, "failed")
                self._change(conn, experiment_id, status, kind, payload, row.note)
                if row.digest is not None:
                    conn.execute(
                        "INSERT INTO imports (digest, experiment_id, source, at) VALUES (?, ?, ?, ?)",
                        [row.digest, experiment_id, source, now],
                    )
                ids.append(experiment_id)
        return ids

    def imported(self, digests: Collection[str]) -> dict[str, tuple[str, str, datetime]]:
        """Which of ``digests`` were imported before: digest -> (experiment id, source file, when), first import."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, tuple[str, str, datetime]] = {}
        with self._transaction(write=False) as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                query = f"SELECT * FROM imports WHERE digest IN ({_placeholders(chunk)}) ORDER BY seq DESC"
                for r in conn.rows(query, chunk):
                    found[r.digest] = (r.experiment_id, r.source, _timestamp(r.at))
        return found

    def mark_dispatched(self, experiment_id: str) -> None:
        """Record that the rig accepted the experiment (no-op if already dispatched or running)."""
        with self._transaction(write=True) as conn:
            status = self._lock(conn, experiment_id)
            if status in (Status.DISPATCHED, Status.RUNNING):
                return
            if status is not Status.PENDING:
                raise LedgerError(f"{experiment_id} has status {status} and cannot be dispatched; suggest a new one.")
            self._change(conn, experiment_id, Status.DISPATCHED, "dispatched", {})

    def mark_running(self, experiment_id: str) -> None:
        """Record that the rig started the experiment (no-op if already running)."""
        with self._transaction(write=True) as conn:
            status = self._lock(conn, experiment_id)
            if status is Status.RUNNING:
                return
            if status is Status.PENDING:
                raise LedgerError(f"{experiment_id} is still pending; call mark_dispatched first.")
            if status is not Status.DISPATCHED:
                raise LedgerError(f"{experiment_id} has status {status} and cannot start running; suggest a new one.")
            self._change(conn, experiment_id, Status.RUNNING, "running", {})

    def mark_resubmitted(self, experiment_id: str, reason: str) -> None:
        """Record that the experiment is submitted to the rig again (the rig reported it lost); status unchanged.

        Kept as a second ``dispatched`` event whose payload is ``{"resubmitted": true, "reason": reason}``,
        and as the experiment's note until its result comes.
        """
        _reason("resubmit reason", reason)
        with self._transaction(write=True) as conn:
            status = self._lock(conn, experiment_id)
            if status not in (Status.DISPATCHED, Status.RUNNING):
                raise LedgerError(f"{experiment_id} has status {status} and cannot be resubmitted; suggest a new one.")
            self._change(conn, experiment_id, status, "dispatched", {"resubmitted": True, "reason": reason}, reason)

    def record_measurement(
        self,
        experiment_id: str,
        measurement: Measurement,
        note: str = "",
        *,
        context: Mapping[str, Any] | None = None,
        context_kinds: Mapping[str, str] | None = None,
    ) -> None:
        """Record the result of a successful run: open -> done. The measurement's own context, then
        ``context``, are merged into the experiment's; ``context_kinds`` joins the remembered kinds."""
        self._record(experiment_id, measurement, note, context, context_kinds)

    def record_failure(
        self,
        experiment_id: str,
        failure: Failure,
        note: str = "",
        *,
        context: Mapping[str, Any] | None = None,
        context_kinds: Mapping[str, str] | None = None,
    ) -> None:
        """Record a run whose chemistry failed: open -> failed."""
        self._record(experiment_id, failure, note, context, context_kinds)

    def _record(
        self,
        experiment_id: str,
        result: Measurement | Failure,
        note: str,
        context: Mapping[str, Any] | None,
        context_kinds: Mapping[str, str] | None,
    ) -> None:
        payload = _result_payload(result, note)
        ctx = _result_context(result, context)
        status, kind = (Status.DONE, "measured") if "measurement" in payload else (Status.FAILED, "failed")
        with self._transaction(write=True) as conn:
            self._require_open(experiment_id, self._lock(conn, experiment_id))
            self._merge_context(conn, experiment_id, ctx, context_kinds)
            self._change(conn, experiment_id, status, kind, payload | ({"context": ctx} if ctx else {}), note)

    @classmethod
    def _merge_context(
        cls, conn: _Cursor, experiment_id: str, context: Context, kinds: Mapping[str, str] | None = None
    ) -> None:
        if kinds:
            cls._put_state(conn, CONTEXT_KINDS, cls._get_state(conn, CONTEXT_KINDS) | dict(kinds))
        if not context:
            return
        old = conn.value("SELECT context FROM experiments WHERE id = ?", [experiment_id])
        merged = (json.loads(old) if old else {}) | context
        conn.execute("UPDATE experiments SET context = ? WHERE id = ?", [_dumps(merged), experiment_id])

    def abandon(self, experiment_id: str, reason: str) -> None:
        """Give up on an open experiment without a chemical result (rig error, lost run, user gave up)."""
        _reason("abandon reason", reason)
        with self._transaction(write=True) as conn:
            self._require_open(experiment_id, self._lock(conn, experiment_id))
            self._change(conn, experiment_id, Status.ABANDONED, "abandoned", {"reason": reason}, reason)

    def correct(
        self,
        experiment_id: str,
        result: Measurement | Failure,
        note: str,
        *,
        context: Mapping[str, Any] | None = None,
        context_kinds: Mapping[str, str] | None = None,
    ) -> None:
        """Replace the result of a done or failed experiment; the old one stays in the history."""
        payload = _result_payload(result, _reason("correction note", note))
        ctx = _result_context(result, context)
        with self._transaction(write=True) as conn:
            status = self._lock(conn, experiment_id)
            if status in OPEN:
                raise LedgerError(
                    f"{experiment_id} has no result yet ({status}); use record_measurement or record_failure."
                )
            if status is Status.ABANDONED:
                raise LedgerError(f"{experiment_id} was abandoned and has no result to correct; suggest a new one.")
            new_status = Status.DONE if "measurement" in payload else Status.FAILED
            self._merge_context(conn, experiment_id, ctx, context_kinds)
            self._change(
                conn, experiment_id, new_status, "corrected", payload | ({"context": ctx} if ctx else {}), note
            )

    @staticmethod
    def _lock(conn: _Cursor, experiment_id: str) -> Status:
        """Return the experiment's status, its row locked until the transaction ends (FOR UPDATE)."""
        status = conn.value(f"SELECT status FROM experiments WHERE id = ?{conn.for_update}", [experiment_id])
        if status is None:
            raise _unknown(experiment_id)
        return Status(status)

    @staticmethod
    def _require_open(experiment_id: str, status: Status) -> None:
        if status in (Status.DONE, Status.FAILED):
            raise LedgerError(f"{experiment_id} already has a result ({status}); use correct to change it.")
        if status is Status.ABANDONED:
            raise LedgerError(f"{experiment_id} was abandoned and cannot change any more; suggest a new experiment.")

    @classmethod
    def _change(
        cls,
        conn: _Cursor,
        experiment_id: str,
        status: Status,
        kind: str,
        payload: dict[str, Any],
        note: str | None = None,
    ) -> None:
        """Set the status (and note, if given) and append the matching event."""
        now = _now()
        values = {"status": status.value, "updated_at": now} | ({} if note is None else {"note": note})
        assignments = ", ".join(f"{name} = ?" for name in values)
        conn.execute(f"UPDATE experiments SET {assignments} WHERE id = ?", [*values.values(), experiment_id])
        cls._append(conn, experiment_id, kind, now, payload)

    @staticmethod
    def _append(conn: _Cursor, experiment_id: str, kind: str, at: str, payload: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO events (experiment_id, kind, at, payload) VALUES (?, ?, ?, ?)",
            [experiment_id, kind, at, _dumps(payload)],
        )

    def _query(self, condition: str = "", params: Sequence[Any] = ()) -> list[Experiment]:
        """Experiments matching ``condition`` (SQL on ``e``, the experiments), ordered by seq, each with
        its latest result event."""
        latest_seq = (
            "SELECT max(latest.seq) FROM events latest WHERE latest.experiment_id = e.id"
            f" AND latest.kind IN ({', '.join(repr(k) for k in _RESULT_KINDS)})"
        )
        query = (
            f"SELECT {_EXPERIMENT_COLUMNS}, r.payload AS result"
            f" FROM experiments e LEFT OUTER JOIN events r ON r.seq = ({latest_seq})"
            f"{' WHERE ' + condition if condition else ''} ORDER BY e.seq"
        )
        with self._transaction(write=False) as conn:
            rows = conn.rows(query, params)
        out = []
        for row in rows:
            try:
                out.append(_experiment(row))
            except _Damage as damage:
                raise self._damaged(f"experiment {row.id} (table experiments, seq {row.seq})", str(damage)) from None
        return out

    def _damaged(self, which: str, what: str) -> LedgerError:
        return LedgerError(
            f"the ledger at {self._where} is damaged: {which}: {what}. Nothing was changed; copy the file, then "
            "repair that row with an SQLite tool (e.g. sqlite3), taking the values from its 'events' history."
        )

    def version(self) -> str:
        """A cheap token that changes with every write (last event seq and event count): poll it to
        notice another process's suggestion, result or correction without reading the whole ledger."""
        with self._transaction(write=False) as conn:
            last, count = conn.execute("SELECT coalesce(max(seq), 0), count(seq) FROM events").fetchone()
        return f"{last}.{count}"

    def get(self, experiment_id: str) -> Experiment:
        """Return one experiment; raise :class:`LedgerError` if the id is unknown."""
        found = self._query("e.id = ?", [experiment_id])
        if not found:
            raise _unknown(experiment_id)
        return found[0]

    def experiments(self, statuses: Collection[Status] | None = None) -> list[Experiment]:
        """Return all experiments, or those in ``statuses``, in the order they were suggested."""
        if statuses is None:
            return self._query()
        values = [Status(s).value for s in statuses]
        return self._query(f"e.status IN ({_placeholders(values)})", values)

    def events(self, experiment_id: str | None = None) -> list[dict[str, Any]]:
        """Return the history (of one experiment, or all) as ``experiment_id, kind, at, payload`` dicts, in order."""
        where = "" if experiment_id is None else " WHERE experiment_id = ?"
        with self._transaction(write=False) as conn:
            rows = conn.rows(
                f"SELECT * FROM events{where} ORDER BY seq", [] if experiment_id is None else [experiment_id]
            )
        if experiment_id is not None and not rows:
            raise _unknown(experiment_id)  # every experiment has its 'suggested' event
        out = []
        for r in rows:
            try:
                event = {
                    "experiment_id": r.experiment_id,
                    "kind": r.kind,
                    "at": _timestamp(r.at, "at"),
                    "payload": _json(r.payload, "payload"),
                }
            except _Damage as damage:
                raise self._damaged(f"event of {r.experiment_id} (table events, seq {r.seq})", str(damage)) from None
            out.append(event)
        return out

    def result_order(self) -> dict[str, int]:
        """Experiment id -> seq of its first result event: the order the runs' results came in (a later
        correction does not move a run, and no clock is consulted)."""
        query = "SELECT experiment_id, min(seq) FROM events WHERE kind IN ('measured', 'failed') GROUP BY experiment_id"
        with self._transaction(write=False) as conn:
            return {str(i): int(seq) for i, seq in conn.execute(query).fetchall()}

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Column names and one row per experiment, as plain Python values (what :meth:`to_frame` holds):
        id, status, timestamps, settings, ``pred_*``, measurement, failure_reason, note, ``context.*``."""
        experiments = self.experiments()
        setting_names = list(dict.fromkeys(name for e in experiments for name in e.settings))
        prediction_names = list(dict.fromkeys(name for e in experiments for name in e.prediction))
        context_names = list(dict.fromkeys(name for e in experiments for name in e.context))
        columns = ["id", "status", "created_at", "updated_at", *setting_names]
        columns += [*(f"pred_{name}" for name in prediction_names), *_MEASUREMENT_COLUMNS, "failure_reason", "note"]
        columns += [f"context.{name}" for name in context_names]
        rows = []
        for e in experiments:
            measured = e.measurement.to_json() if e.measurement else {}
            rows.append(
                [e.id, e.status.value, e.created_at, e.updated_at, *(e.settings.get(n) for n in setting_names)]
                + [e.prediction.get(n) for n in prediction_names]
                + [measured.get(n) for n in _MEASUREMENT_COLUMNS]
                + [e.failure.reason if e.failure else None, e.note]
                + [e.context.get(n) for n in context_names]
            )
        return columns, rows

    def to_frame(self) -> pd.DataFrame:
        """One row per experiment: id, status, timestamps, settings, ``pred_*``, measurement, failure_reason, note."""
        columns, rows = self.table()
        import pandas as pd  # only frames need it; status, export and suggest stay quick to start

        frame = pd.DataFrame(rows, columns=columns)
        return frame.astype({name: "Int64" if name == "n_particles" else float for name in _MEASUREMENT_COLUMNS})

    def export_csv(self, path: str | Path) -> None:
        """Write :meth:`table` to ``path`` atomically: a reader never sees a half-written file.

        Written with the csv module (no pandas: export must start quickly); numbers as Python prints
        them, measurements as floats (``n_particles`` as an integer), a missing value as an empty cell.
        """
        import csv

        path = Path(path)
        columns, rows = self.table()
        measured = {name for name in _MEASUREMENT_COLUMNS if name != "n_particles"}

        def cell(name: str, value: Any) -> Any:
            if value is None:
                return ""
            if name in measured and isinstance(value, int | float):
                return float(value)
            return value

        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("x", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(columns)
                writer.writerows([cell(name, v) for name, v in zip(columns, row, strict=True)] for row in rows)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_folder(path.parent)
        except OSError as exc:
            raise LedgerError(f"cannot write {str(path)!r} ({exc.strerror}); check the folder exists.") from exc
        finally:
            tmp.unlink(missing_ok=True)
