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

Every row is checked before anything is written: a bad file leaves the ledger unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from supraopt.errors import InputError, SupraoptError
from supraopt.ledger import OPEN
from supraopt.records import PARAMETERS, Failure, Measurement

if TYPE_CHECKING:
    from supraopt.campaign import Campaign

KNOWN = {"id", "diameter_nm", "pdi_pct", "n_particles", "droplet_um", "failed", "note", *PARAMETERS}


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, with a one-line error when it cannot be parsed."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"CSV file {path} does not exist.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"CSV file {path} cannot be read: {str(error).strip().splitlines()[0]}.") from None
    return frame


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


def record_csv(campaign: Campaign, path: Path) -> list[str]:
    """Validate every row of ``path``, then record them all; returns the experiment ids."""
    frame = read_table(path)
    contexts = context_columns(campaign, list(frame.columns))
    unknown = set(frame.columns) - KNOWN - set(contexts)
    if unknown:
        raise InputError(
            f"CSV file {path}: unknown column(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(KNOWN))}."
        )
    if frame.empty:
        raise InputError(f"CSV file {path} has no rows.")
    records: list[dict[str, str]] = frame.to_dict("records")  # type: ignore[assignment]
    rows = [parse_row(i + 2, record) for i, record in enumerate(records)]  # row 1 is the header
    kinds = new_context_kinds(campaign, records, contexts)
    row_contexts = [row_context(campaign, i + 2, record, contexts, kinds) for i, record in enumerate(records)]
    seen: set[str] = set()
    for i, (experiment_id, settings, _, _) in enumerate(rows, start=2):
        if experiment_id is not None:
            if experiment_id in seen:
                raise InputError(f"row {i}: experiment {experiment_id} appears twice in the file.")
            seen.add(experiment_id)
            try:
                status = campaign.ledger.get(experiment_id).status
            except SupraoptError as error:
                raise InputError(f"row {i}: {error}") from None
            if status not in OPEN:
                raise InputError(
                    f"row {i}: experiment {experiment_id} already has a result ({status}); use 'record --correct'."
                )
        else:
            assert settings is not None
            campaign.space.validate(settings, where=f"row {i}")
    ids = []
    if kinds and not campaign.spec.context:  # every row is valid: remember how this file reads them
        campaign.ledger.remember_context_kinds(kinds)
    for (experiment_id, settings, result, note), context in zip(rows, row_contexts, strict=True):
        if experiment_id is None:
            assert settings is not None
            ids.append(campaign.add_run(settings, result, note, context=context))
        else:
            campaign.record(experiment_id, result, note=note, context=context)
            ids.append(experiment_id)
    return ids
