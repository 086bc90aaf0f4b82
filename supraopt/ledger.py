"""The durable record of a campaign: every proposal, its status changes and its results.

Two tables: ``experiments`` (one row per proposal and its current status) and ``events`` (append-only
history). Each public write is one transaction, committed before the call returns, and validates
before it writes, so a refused call leaves the ledger unchanged. Results are never overwritten: a
correction is a new event and the latest result event wins. SQLite is the default; the same SQL runs
on PostgreSQL (``postgresql+psycopg://...``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

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


def _one_of(column: str, values: Collection[str]) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=f"valid_{column}")


_metadata = sa.MetaData()
_experiments = sa.Table(
    "experiments",
    _metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("prediction", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("context", sa.Text, nullable=True),  # JSON name -> level or number; added in 2026-12
    _one_of("status", [s.value for s in Status]),
    sqlite_autoincrement=True,
)
_state = sa.Table(
    "campaign_state",  # small key -> JSON values: the current context, the kinds of context names
    _metadata,
    sa.Column("key", sa.String(60), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
CURRENT_CONTEXT = "current_context"
CONTEXT_KINDS = "context_kinds"
SHARED_SPEC = "campaign_spec"  # campaign.toml, for watchers that have the database but not the folder
_events = sa.Table(
    "events",
    _metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.String(40), sa.ForeignKey("experiments.id"), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    _one_of("kind", _KINDS),
    sqlite_autoincrement=True,
)

_imports = sa.Table(
    "imports",
    _metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("digest", sa.String(64), nullable=False, index=True),
    sa.Column("experiment_id", sa.String(40), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    sqlite_autoincrement=True,
)
"""One row per imported result (``record --csv``): a content hash of the row, to spot a file imported twice.
Ledgers written before it existed get the table when they are next opened."""


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


def _configure_sqlite(engine: sa.Engine) -> None:
    """Durable, multi-process SQLite: WAL, full fsync, wait for locks, writers lock up front."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own; _begin does
        cursor = dbapi_connection.cursor()
        # busy_timeout first, so that switching a new file to WAL waits for other processes
        for pragma in ("busy_timeout=30000", "journal_mode=WAL", "synchronous=FULL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # a writer takes the write lock at BEGIN, so it queues on busy_timeout instead of failing
        # with "database is locked" when upgrading a read lock; readers get a WAL snapshot
        mode = "DEFERRED" if conn.get_execution_options().get("supraopt_read") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")


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


def _experiment(row: sa.Row[Any]) -> Experiment:
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


class Ledger:
    """The durable record of one campaign, in the database at ``url`` (a SQLAlchemy URL)."""

    def __init__(self, url: str) -> None:
        self._where = url
        try:
            parsed = sa.make_url(url)
            self._where = parsed.render_as_string(hide_password=True)
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                _refuse_empty_file(Path(str(parsed.database)))
            self._engine = sa.create_engine(url)
            if self._engine.dialect.name == "sqlite":
                _configure_sqlite(self._engine)
            _metadata.create_all(self._engine)
            self._migrate()
        except (SQLAlchemyError, ImportError) as exc:
            raise LedgerError(
                f"cannot open the ledger at {self._where} ({_cause(exc)}); "
                "check the URL and that its folder or server exists and is writable."
            ) from exc

    def _migrate(self) -> None:
        """Bring a ledger written by an older supraopt up to date (adds the ``context`` column)."""
        if "context" in {c["name"] for c in sa.inspect(self._engine).get_columns("experiments")}:
            return
        try:
            with self._engine.connect() as conn, conn.begin():
                conn.execute(sa.text("ALTER TABLE experiments ADD COLUMN context TEXT"))
        except SQLAlchemyError:  # another process migrated it meanwhile
            if "context" not in {c["name"] for c in sa.inspect(self._engine).get_columns("experiments")}:
                raise

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the campaign's suggestion lock: one process at a time reads the ledger, proposes and
        records its proposals, so concurrent ``suggest`` calls see each other's pending experiments.

        SQLite: an exclusive ``flock`` on ``<database>.lock`` beside the file; PostgreSQL: a session
        advisory lock. Other writes (results) are not blocked.
        """
        url = self._engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            import fcntl

            with open(f"{url.database}.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        elif url.get_backend_name() == "postgresql":
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(hashtext('supraopt-suggest'))"))
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext('supraopt-suggest'))"))
                    conn.commit()
        else:
            yield

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sa.Connection]:
        """One transaction, committed on exit; database errors become :class:`LedgerError`."""
        try:
            with self._engine.connect() as conn:
                conn.execution_options(supraopt_read=not write)
                with conn.begin():
                    yield conn
        except DBAPIError as exc:
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
    def _get_state(conn: sa.Connection, key: str) -> dict[str, Any]:
        value = conn.execute(sa.select(_state.c.value).where(_state.c.key == key)).scalar_one_or_none()
        return {} if value is None else dict(json.loads(value))

    @staticmethod
    def _put_state(conn: sa.Connection, key: str, value: Mapping[str, Any]) -> None:
        if conn.execute(sa.select(_state.c.key).where(_state.c.key == key)).first() is None:
            conn.execute(sa.insert(_state).values(key=key, value=_dumps(value)))
        else:
            conn.execute(sa.update(_state).where(_state.c.key == key).values(value=_dumps(value)))

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
        conn: sa.Connection,
        settings: dict[str, float],
        prediction: dict[str, float],
        now: str,
        context: Context | None = None,
    ) -> str:
        values: dict[str, str | None] = {"status": Status.PENDING.value, "created_at": now, "updated_at": now}
        values |= {"note": "", "settings": _dumps(settings), "prediction": _dumps(prediction)}
        values |= {"context": _dumps(context) if context else None}
        placeholder = f"new-{uuid.uuid4().hex}"  # unique until the seq is known
        insert = sa.insert(_experiments).values(id=placeholder, **values).returning(_experiments.c.seq)
        seq = conn.execute(insert).scalar_one()
        experiment_id = f"E{seq:03d}"
        conn.execute(sa.update(_experiments).where(_experiments.c.seq == seq).values(id=experiment_id))
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
                    values = {"digest": row.digest, "experiment_id": experiment_id, "source": source, "at": now}
                    conn.execute(sa.insert(_imports).values(**values))
                ids.append(experiment_id)
        return ids

    def imported(self, digests: Collection[str]) -> dict[str, tuple[str, str, datetime]]:
        """Which of ``digests`` were imported before: digest -> (experiment id, source file, when), first import."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, tuple[str, str, datetime]] = {}
        with self._transaction(write=False) as conn:
            for start in range(0, len(wanted), 500):
                query = (
                    sa.select(_imports)
                    .where(_imports.c.digest.in_(wanted[start : start + 500]))
                    .order_by(_imports.c.seq.desc())
                )
                for r in conn.execute(query):
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
        cls, conn: sa.Connection, experiment_id: str, context: Context, kinds: Mapping[str, str] | None = None
    ) -> None:
        if kinds:
            cls._put_state(conn, CONTEXT_KINDS, cls._get_state(conn, CONTEXT_KINDS) | dict(kinds))
        if not context:
            return
        old = conn.execute(sa.select(_experiments.c.context).where(_experiments.c.id == experiment_id)).scalar_one()
        merged = (json.loads(old) if old else {}) | context
        conn.execute(sa.update(_experiments).where(_experiments.c.id == experiment_id).values(context=_dumps(merged)))

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
    def _lock(conn: sa.Connection, experiment_id: str) -> Status:
        """Return the experiment's status, its row locked until the transaction ends (FOR UPDATE)."""
        query = sa.select(_experiments.c.status).where(_experiments.c.id == experiment_id).with_for_update()
        status = conn.execute(query).scalar_one_or_none()
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
        conn: sa.Connection,
        experiment_id: str,
        status: Status,
        kind: str,
        payload: dict[str, Any],
        note: str | None = None,
    ) -> None:
        """Set the status (and note, if given) and append the matching event."""
        now = _now()
        values = {"status": status.value, "updated_at": now} | ({} if note is None else {"note": note})
        conn.execute(sa.update(_experiments).where(_experiments.c.id == experiment_id).values(**values))
        cls._append(conn, experiment_id, kind, now, payload)

    @staticmethod
    def _append(conn: sa.Connection, experiment_id: str, kind: str, at: str, payload: dict[str, Any]) -> None:
        conn.execute(sa.insert(_events).values(experiment_id=experiment_id, kind=kind, at=at, payload=_dumps(payload)))

    def _query(self, *conditions: Any) -> list[Experiment]:
        """Experiments matching ``conditions``, ordered by seq, each with its latest result event."""
        latest = _events.alias("latest")
        latest_seq = (
            sa.select(sa.func.max(latest.c.seq))
            .where(latest.c.experiment_id == _experiments.c.id, latest.c.kind.in_(_RESULT_KINDS))
            .correlate(_experiments)
            .scalar_subquery()
        )
        query = (
            sa.select(_experiments, _events.c.payload.label("result"))
            .select_from(_experiments.outerjoin(_events, _events.c.seq == latest_seq))
            .where(*conditions)
            .order_by(_experiments.c.seq)
        )
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
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
        query = sa.select(sa.func.coalesce(sa.func.max(_events.c.seq), 0), sa.func.count(_events.c.seq))
        with self._transaction(write=False) as conn:
            last, count = conn.execute(query).one()
        return f"{last}.{count}"

    def get(self, experiment_id: str) -> Experiment:
        """Return one experiment; raise :class:`LedgerError` if the id is unknown."""
        found = self._query(_experiments.c.id == experiment_id)
        if not found:
            raise _unknown(experiment_id)
        return found[0]

    def experiments(self, statuses: Collection[Status] | None = None) -> list[Experiment]:
        """Return all experiments, or those in ``statuses``, in the order they were suggested."""
        if statuses is None:
            return self._query()
        return self._query(_experiments.c.status.in_([Status(s).value for s in statuses]))

    def events(self, experiment_id: str | None = None) -> list[dict[str, Any]]:
        """Return the history (of one experiment, or all) as ``experiment_id, kind, at, payload`` dicts, in order."""
        query = sa.select(_events).order_by(_events.c.seq)
        if experiment_id is not None:
            query = query.where(_events.c.experiment_id == experiment_id)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
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
        first = sa.func.min(_events.c.seq)
        query = sa.select(_events.c.experiment_id, first).where(_events.c.kind.in_(("measured", "failed")))
        with self._transaction(write=False) as conn:
            return {str(i): int(seq) for i, seq in conn.execute(query.group_by(_events.c.experiment_id))}

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
