"""Recording many results at once from a CSV file (``supraopt record DIR --csv FILE``).

Columns (header names, any order):

* ``id`` — the experiment id printed by ``suggest``. Leave it out (or empty) to add a run that
  supraopt did not suggest; then ``concentration_mg_ml``, ``flow_ratio`` and ``temperature_c``
  are required.
* ``diameter_nm`` and ``pdi_pct`` — the measured result; optional ``n_particles`` and ``droplet_um``;
* ``failed`` — a reason instead of a result when the chemistry failed;
* ``note`` — optional free text;
* context columns: ``context.NAME`` (e.g. ``context.chip``, ``context.room_c``), or just ``NAME`` for
  a context declared in campaign.toml ``[context]`` or used before. A blank cell leaves that entry
  as it is (for a suggested experiment: the context it was suggested under).

Every row is checked before anything is written, and the rows are then written in one transaction:
a bad file, an error or Ctrl-C leaves the ledger unchanged. A content hash of each row is kept in the
ledger, so importing the same rows again is refused (``duplicates="skip"`` records only the new
ones, ``duplicates="allow"`` records them again). A row that repeats an earlier row of the same file
(same settings or id, same result and note) is treated alike: refused, recorded once, or recorded
each time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supraopt.errors import InputError, SupraoptError
from supraopt.ledger import OPEN, BatchRow
from supraopt.paths import check_input_file
from supraopt.records import PARAMETERS, Failure, Measurement
from supraopt.tables import Table, read_rows

if TYPE_CHECKING:
    from supraopt.campaign import Campaign

KNOWN = {"id", "diameter_nm", "pdi_pct", "n_particles", "droplet_um", "failed", "note", *PARAMETERS}


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def read_table(path: Path, sheet: str | None = None) -> Table:
    """Read a CSV (or an .xlsx sheet) as text cells, with a one-line error when it cannot be parsed."""
    check_input_file(path, "CSV file")
    return read_rows(path, sheet)


def _number(row: int, column: str, raw: str, integer: bool = False) -> float | int | None:
    if _blank(raw):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"row {row}, column {column}: {raw!r} is not a number.") from None
    if integer:
        if not value.is_integer():
            raise InputError(f"row {row}, column {column}: {raw!r} is not a whole number.")
        return int(value)
    return value


def parse_row(row: int, data: dict[str, str]) -> tuple[str | None, dict[str, Any] | None, Measurement | Failure, str]:
    """One CSV row -> (id or None, settings or None, result, note); errors name the row and column."""
    experiment_id = None if _blank(data.get("id")) else str(data["id"]).strip()
    note = str(data.get("note", "") or "")
    settings = None
    if experiment_id is None:
        missing = [p for p in PARAMETERS if _blank(data.get(p))]
        if missing:
            raise InputError(f"row {row}: no id, so settings are needed, but {', '.join(missing)} is empty or missing.")
        settings = {p: _number(row, p, data[p]) for p in PARAMETERS}
    failed = data.get("failed")
    if not _blank(failed):
        if not _blank(data.get("diameter_nm")):
            raise InputError(f"row {row}: has both a failure reason ({failed!r}) and a diameter; keep one.")
        return experiment_id, settings, Failure(str(failed).strip()), note
    diameter = _number(row, "diameter_nm", data.get("diameter_nm", ""))
    pdi = _number(row, "pdi_pct", data.get("pdi_pct", ""))
    if diameter is None or pdi is None:
        raise InputError(f"row {row}: needs diameter_nm and pdi_pct, or a 'failed' reason.")
    n_particles = _number(row, "n_particles", data.get("n_particles", ""), integer=True)
    droplet = _number(row, "droplet_um", data.get("droplet_um", ""))
    try:
        result = Measurement(float(diameter), float(pdi), None if n_particles is None else int(n_particles), droplet)
    except InputError as error:
        raise InputError(f"row {row}: {error}") from None
    return experiment_id, settings, result, note


def context_columns(campaign: Campaign, columns: list[str]) -> dict[str, str]:
    """CSV column -> context name: ``context.NAME`` columns and columns named like a known context."""
    known = set(campaign.spec.context) | set(campaign.ledger.context_kinds())
    out = {}
    for column in columns:
        if column.startswith("context.") and column != "context.":
            out[column] = column.removeprefix("context.")
        elif column in known and column not in KNOWN:
            out[column] = column
    return out


def _reads_as_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def new_context_kinds(campaign: Campaign, records: list[dict[str, str]], columns: dict[str, str]) -> dict[str, str]:
    """Kinds of context names met for the first time: ``number`` when every value in the file is one."""
    known = set(campaign.spec.context) | set(campaign.ledger.context_kinds())
    kinds = {}
    for column, name in columns.items():
        if name in known:
            continue
        values = [str(r[column]).strip() for r in records if not _blank(r.get(column))]
        kinds[name] = "number" if values and all(_reads_as_number(v) for v in values) else "category"
    return kinds


def row_context(
    campaign: Campaign, row: int, data: dict[str, str], columns: dict[str, str], kinds: dict[str, str]
) -> dict[str, Any]:
    """The checked context of one row (blank cells left out); errors name the row."""
    given = {name: str(data[column]).strip() for column, name in columns.items() if not _blank(data.get(column))}
    try:
        return campaign.check_context(given, assume=kinds)[0]
    except SupraoptError as error:
        raise InputError(f"row {row}: {error}") from None


DUPLICATES = ("refuse", "skip", "allow")
"""What to do with rows imported before: refuse the file, skip those rows, or record them again."""


@dataclass(frozen=True)
class ImportReport:
    """What an import did."""

    ids: list[str]
    """Experiment ids recorded, in file order."""
    skipped: list[int] = field(default_factory=list)
    """File rows (1 = header) left out because they had been imported before."""
    repeated: list[int] = field(default_factory=list)
    """File rows left out because they repeat an earlier row of the same file."""


def row_digest(
    experiment_id: str | None, settings: dict[str, Any] | None, result: Measurement | Failure, note: str
) -> str:
    """A content hash of one parsed row: the same run typed again ('441.50' for '441.5') hashes the same."""
    kind = "measurement" if isinstance(result, Measurement) else "failure"
    content = {"id": experiment_id, "settings": settings, kind: result.to_json(), "note": note.strip()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:5])
    return shown + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def record_csv(campaign: Campaign, path: Path, duplicates: str = "refuse", sheet: str | None = None) -> ImportReport:
    """Validate every row of ``path`` (CSV or .xlsx), then record them all in one transaction."""
    if duplicates not in DUPLICATES:
        raise InputError(f"duplicates={duplicates!r} must be one of {', '.join(DUPLICATES)}.")
    frame = read_table(path, sheet)
    contexts = context_columns(campaign, list(frame.columns))
    unknown = set(frame.columns) - KNOWN - set(contexts)
    if unknown:
        raise InputError(
            f"CSV file {path}: unknown column(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(KNOWN))}."
        )
    if not frame.rows:
        raise InputError(f"CSV file {path} has no rows.")
    records = frame.rows
    parsed = [parse_row(i + 2, record) for i, record in enumerate(records)]  # row 1 is the header
    kinds = new_context_kinds(campaign, records, contexts)
    row_contexts = [row_context(campaign, i + 2, record, contexts, kinds) for i, record in enumerate(records)]
    digests = [row_digest(*row) for row in parsed]
    rows = list(enumerate(zip(parsed, digests, row_contexts, strict=True), start=2))
    skipped: list[int] = []
    repeated: list[int] = []
    if duplicates != "allow":
        before = campaign.ledger.imported(digests)
        again = [i for i, (_, digest, _) in rows if digest in before]
        first_row: dict[str, int] = {}
        for i, (_, digest, _) in rows:
            if digest in first_row and digest not in before:
                repeated.append(i)
            first_row.setdefault(digest, i)
        if (again or repeated) and duplicates == "refuse":
            problems = []
            if again:
                first_id, source, when = before[digests[again[0] - 2]]
                problems.append(
                    f"{len(again)} of {len(rows)} row(s) of {path} were imported before (row {again[0]} as {first_id} "
                    f"from {source or 'a file'} on {when:%Y-%m-%d %H:%M} UTC)"
                )
            if repeated:
                first = first_row[digests[repeated[0] - 2]]
                problems.append(
                    f"{len(repeated)} of {len(rows)} row(s) of {path} repeat an earlier row of the file "
                    f"(row {repeated[0]} is row {first} again)"
                )
            new = len(rows) - len(again) - len(repeated)
            raise InputError(
                f"{'; '.join(problems)}; nothing was recorded. Add --skip-duplicates to record only the {new} new "
                "row(s), or --allow-duplicates for real repeats."
            )
        skipped = again
        left_out = set(again) | set(repeated)
        rows = [(i, row) for i, row in rows if i not in left_out]
    seen: set[str] = set()
    batch = []
    for i, ((experiment_id, settings, result, note), digest, context) in rows:
        where = f"row {i}"
        if experiment_id is not None:
            if experiment_id in seen:
                raise InputError(f"{where}: experiment {experiment_id} appears twice in the file.")
            seen.add(experiment_id)
            try:
                status = campaign.ledger.get(experiment_id).status
            except SupraoptError as error:
                raise InputError(f"{where}: {error}") from None
            if status not in OPEN:
                raise InputError(
                    f"{where}: experiment {experiment_id} already has a result ({status}); use 'record --correct'."
                )
        else:
            assert settings is not None
            settings = campaign.space.validate(settings, where=where)
        batch.append((where, BatchRow(experiment_id, settings, result, note, digest, context)))
    remember = kinds if kinds and not campaign.spec.context else None  # how this file reads new names
    return ImportReport(campaign.record_many(batch, source=str(path), context_kinds=remember), skipped, repeated)
