"""Recording many results at once from a CSV file (``supraopt record DIR --csv FILE``).

Columns (header names, any order):

* ``id`` — the experiment id printed by ``suggest``. Leave it out (or empty) to add a run that
  supraopt did not suggest; then ``concentration_mg_ml``, ``flow_ratio`` and ``temperature_c``
  are required.
* ``diameter_nm`` and ``pdi_pct`` — the measured result; optional ``n_particles`` and ``droplet_um``;
* ``failed`` — a reason instead of a result when the chemistry failed;
* ``note`` — optional free text.

Every row is checked before anything is written: a bad file leaves the ledger unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supraopt.errors import InputError, SupraoptError
from supraopt.ledger import OPEN
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


def record_csv(campaign: Campaign, path: Path, sheet: str | None = None) -> list[str]:
    """Validate every row of ``path`` (CSV or .xlsx), then record them all; returns the experiment ids."""
    frame = read_table(path, sheet)
    unknown = set(frame.columns) - KNOWN
    if unknown:
        raise InputError(
            f"CSV file {path}: unknown column(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(KNOWN))}."
        )
    if not frame.rows:
        raise InputError(f"CSV file {path} has no rows.")
    records = frame.rows
    rows = [parse_row(i + 2, record) for i, record in enumerate(records)]  # row 1 is the header
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
    for experiment_id, settings, result, note in rows:
        if experiment_id is None:
            assert settings is not None
            ids.append(campaign.add_run(settings, result, note))
        else:
            campaign.record(experiment_id, result, note=note)
            ids.append(experiment_id)
    return ids
