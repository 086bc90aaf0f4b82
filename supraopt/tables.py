"""Reading a table of runs from a CSV or an Excel ``.xlsx`` file as text cells, without pandas.

``record --csv`` reads through here so that recording a results file starts quickly (pandas alone
takes longer to import than the whole command should); ``fit`` reads spreadsheets through
:func:`read_sheet`. Every cell comes back as a string, an empty cell as ``""``, so the callers
check and convert cells the same way whichever kind of file the chemist saved.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supraopt.errors import InputError

SPREADSHEETS = frozenset({".xlsx", ".xlsm"})
"""Suffixes read as Excel workbooks (openpyxl); everything else is read as CSV."""
DECIMAL_COMMA = re.compile(r"^(\s*[+-]?\d*),(\d+(?:[eE][+-]?\d+)?\s*)$")
"""A number written with a decimal comma ('4,70'), as a German or French spreadsheet saves CSV."""


def delimiter(header: str) -> str:
    """The cell separator a CSV header line uses: ';' or a tab when it has that and no comma (a European
    spreadsheet's CSV, whose numbers then carry decimal commas), else ','."""
    return next((d for d in ";\t" if d in header and "," not in header), ",")


def decimal_point(cell: str) -> str:
    """'4,70' -> '4.70'; any other text unchanged. Only for files whose cells are not split by commas."""
    return DECIMAL_COMMA.sub(r"\1.\2", cell)


@dataclass(frozen=True)
class Table:
    """Header names (stripped) and rows of text cells; ``first_row`` is the first data row's number
    as a spreadsheet shows it (the header is row 1 of a plain file)."""

    columns: list[str]
    rows: list[dict[str, str]]
    first_row: int = 2


def read_rows(path: Path, sheet: str | None = None, what: str = "CSV file") -> Table:
    """Read ``path`` (CSV, or ``.xlsx``: its first sheet or ``sheet``) as text cells.

    Raises:
        InputError: the file is missing, cannot be parsed, or a row has more cells than the header.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist.")
    if path.suffix.lower() in SPREADSHEETS:
        return read_sheet(path, sheet)
    if sheet is not None:
        raise InputError(f"--sheet {sheet!r} only applies to .xlsx files; {path} is read as CSV.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            separator = delimiter(handle.readline())
            handle.seek(0)
            reader = csv.reader(handle, delimiter=separator, strict=True)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{what} {path} cannot be read: it is empty.")
            lines = [(reader.line_num, line) for line in reader]
        if separator != ",":
            lines = [(number, [decimal_point(cell) for cell in line]) for number, line in lines]
    except (csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"{what} {path} cannot be read: {str(error).strip().splitlines()[0]}.") from None
    return _table(path, header, lines, first_row=2)


def read_sheet(path: Path, sheet: str | None = None) -> Table:
    """The first sheet (or the sheet named ``sheet``) of an ``.xlsx`` workbook as text cells.

    The first non-empty row is the header; numbers come back as Python prints them (``450.0`` ->
    ``'450'``), dates in ISO format, formulas as their last computed value.
    """
    import zipfile

    import openpyxl  # imported here: only spreadsheets need it

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} cannot be read as an Excel .xlsx workbook ({error}).") from None
    try:
        if sheet is None:
            ws = book.worksheets[0]
        elif sheet in book.sheetnames:
            ws = book[sheet]
        else:
            raise InputError(f"{path} has no sheet {sheet!r}; its sheets are {', '.join(map(repr, book.sheetnames))}.")
        cells = [[_text(v) for v in row] for row in ws.iter_rows(values_only=True)]
    finally:
        book.close()
    start = next((i for i, row in enumerate(cells) if any(row)), None)
    if start is None:
        raise InputError(f"{path}: sheet {ws.title!r} is empty.")
    lines = list(enumerate(cells[start + 1 :], start=start + 2))
    return _table(path, cells[start], lines, first_row=start + 2)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value).strip()


def _table(path: Path, header: list[str], lines: list[tuple[int, list[str]]], first_row: int) -> Table:
    """Rows as dicts; blank lines skipped, columns without a header dropped if they hold nothing."""
    names = [name.strip() for name in header]
    seen: set[str] = set()
    for name in names:
        if name and name in seen:
            raise InputError(f"{path}: column {name!r} appears twice in the header.")
        seen.add(name)
    rows = []
    for number, line in lines:
        if not any(cell.strip() for cell in line):
            continue
        for i, cell in enumerate(line):
            if cell.strip() and (i >= len(names) or not names[i]):
                raise InputError(
                    f"{path}: row {number} has a value ({cell.strip()!r}) in column {i + 1}, which has no header name."
                )
        cells = [*line, *[""] * (len(names) - len(line))]
        rows.append({name: cells[i] for i, name in enumerate(names) if name})
    return Table([name for name in names if name], rows, first_row)
