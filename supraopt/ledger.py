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
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from supraopt.errors import InputError, LedgerError
from supraopt.records import Failure, Measurement

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
_MEASUREMENT_COLUMNS = tuple(f.name for f in fields(Measurement))


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
    _one_of("status", [s.value for s in Status]),
    sqlite_autoincrement=True,
)
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


def _experiment(row: sa.Row[Any]) -> Experiment:
    result = json.loads(row.result) if row.result is not None else {}
    return Experiment(
        id=row.id,
        status=Status(row.status),
        settings=json.loads(row.settings),
        prediction=json.loads(row.prediction),
        created_at=datetime.fromisoformat(row.created_at),
        updated_at=datetime.fromisoformat(row.updated_at),
        measurement=Measurement.from_json(result["measurement"]) if "measurement" in result else None,
        failure=Failure(result["failure"]["reason"]) if "failure" in result else None,
        note=row.note,
    )


class Ledger:
    """The durable record of one campaign, in the database at ``url`` (a SQLAlchemy URL)."""

    def __init__(self, url: str) -> None:
        self._where = url
        try:
            self._where = sa.make_url(url).render_as_string(hide_password=True)
            self._engine = sa.create_engine(url)
            if self._engine.dialect.name == "sqlite":
                _configure_sqlite(self._engine)
            _metadata.create_all(self._engine)
        except (SQLAlchemyError, ImportError) as exc:
            raise LedgerError(
                f"cannot open the ledger at {self._where} ({_cause(exc)}); "
                "check the URL and that its folder or server exists and is writable."
            ) from exc

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

    def add_pending(self, items: Sequence[tuple[dict[str, float], dict[str, float]]]) -> list[str]:
        """Record suggested experiments, given as ``(settings, prediction)`` pairs; return their new ids."""
        rows = [(_numbers("setting", settings), _numbers("prediction", prediction)) for settings, prediction in items]
        ids = []
        with self._transaction(write=True) as conn:
            now = _now()
            for settings, prediction in rows:
                values = {"status": Status.PENDING.value, "created_at": now, "updated_at": now, "note": ""}
                values |= {"settings": _dumps(settings), "prediction": _dumps(prediction)}
                placeholder = f"new-{uuid.uuid4().hex}"  # unique until the seq is known
                insert = sa.insert(_experiments).values(id=placeholder, **values).returning(_experiments.c.seq)
                seq = conn.execute(insert).scalar_one()
                ids.append(f"E{seq:03d}")
                conn.execute(sa.update(_experiments).where(_experiments.c.seq == seq).values(id=ids[-1]))
                self._append(conn, ids[-1], "suggested", now, {"settings": settings, "prediction": prediction})
        return ids

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

    def record_measurement(self, experiment_id: str, measurement: Measurement, note: str = "") -> None:
        """Record the result of a successful run: open -> done."""
        self._record(experiment_id, measurement, note)

    def record_failure(self, experiment_id: str, failure: Failure, note: str = "") -> None:
        """Record a run whose chemistry failed: open -> failed."""
        self._record(experiment_id, failure, note)

    def _record(self, experiment_id: str, result: Measurement | Failure, note: str) -> None:
        payload = _result_payload(result, note)
        status, kind = (Status.DONE, "measured") if "measurement" in payload else (Status.FAILED, "failed")
        with self._transaction(write=True) as conn:
            self._require_open(experiment_id, self._lock(conn, experiment_id))
            self._change(conn, experiment_id, status, kind, payload, note)

    def abandon(self, experiment_id: str, reason: str) -> None:
        """Give up on an open experiment without a chemical result (rig error, lost run, user gave up)."""
        _reason("abandon reason", reason)
        with self._transaction(write=True) as conn:
            self._require_open(experiment_id, self._lock(conn, experiment_id))
            self._change(conn, experiment_id, Status.ABANDONED, "abandoned", {"reason": reason}, reason)

    def correct(self, experiment_id: str, result: Measurement | Failure, note: str) -> None:
        """Replace the result of a done or failed experiment; the old one stays in the history."""
        payload = _result_payload(result, _reason("correction note", note))
        with self._transaction(write=True) as conn:
            status = self._lock(conn, experiment_id)
            if status in OPEN:
                raise LedgerError(
                    f"{experiment_id} has no result yet ({status}); use record_measurement or record_failure."
                )
            if status is Status.ABANDONED:
                raise LedgerError(f"{experiment_id} was abandoned and has no result to correct; suggest a new one.")
            new_status = Status.DONE if "measurement" in payload else Status.FAILED
            self._change(conn, experiment_id, new_status, "corrected", payload, note)

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
            return [_experiment(row) for row in conn.execute(query)]

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
        return [
            {
                "experiment_id": r.experiment_id,
                "kind": r.kind,
                "at": datetime.fromisoformat(r.at),
                "payload": json.loads(r.payload),
            }
            for r in rows
        ]

    def to_frame(self) -> pd.DataFrame:
        """One row per experiment: id, status, timestamps, settings, ``pred_*``, measurement, failure_reason, note."""
        experiments = self.experiments()
        setting_names = list(dict.fromkeys(name for e in experiments for name in e.settings))
        prediction_names = list(dict.fromkeys(name for e in experiments for name in e.prediction))
        columns = ["id", "status", "created_at", "updated_at", *setting_names]
        columns += [*(f"pred_{name}" for name in prediction_names), *_MEASUREMENT_COLUMNS, "failure_reason", "note"]
        rows = []
        for e in experiments:
            measured = e.measurement.to_json() if e.measurement else {}
            rows.append(
                [e.id, e.status.value, e.created_at, e.updated_at, *(e.settings.get(n) for n in setting_names)]
                + [e.prediction.get(n) for n in prediction_names]
                + [measured.get(n) for n in _MEASUREMENT_COLUMNS]
                + [e.failure.reason if e.failure else None, e.note]
            )
        import pandas as pd  # only exports need it; suggest stays quicker to start

        frame = pd.DataFrame(rows, columns=columns)
        return frame.astype({name: "Int64" if name == "n_particles" else float for name in _MEASUREMENT_COLUMNS})

    def export_csv(self, path: str | Path) -> None:
        """Write :meth:`to_frame` to ``path`` atomically: a reader never sees a half-written file."""
        path = Path(path)
        frame = self.to_frame()
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("x", newline="", encoding="utf-8") as handle:
                frame.to_csv(handle, index=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise LedgerError(f"cannot write {str(path)!r} ({exc.strerror}); check the folder exists.") from exc
        finally:
            tmp.unlink(missing_ok=True)
