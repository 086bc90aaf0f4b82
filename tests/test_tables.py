"""Reading tables without pandas: CSV and Excel .xlsx cells as text, for record --csv and fit."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import openpyxl
import pytest
from typer.testing import CliRunner

from supraopt.cli import app
from supraopt.errors import InputError
from supraopt.pastdata import read_runs
from supraopt.physics import Preset
from supraopt.tables import read_rows

REPO = Path(__file__).resolve().parent.parent


def workbook(path: Path, sheets: dict[str, list[list[object]]]) -> Path:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    book.save(path)
    return path


def test_csv_cells_come_back_as_text(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("\ufeffid, diameter_nm ,pdi_pct,\nE001,450,4.5,\n\n E002 ,,3\n", encoding="utf-8")
    table = read_rows(path)
    assert table.columns == ["id", "diameter_nm", "pdi_pct"]  # BOM and spaces gone, the empty column dropped
    assert table.rows == [
        {"id": "E001", "diameter_nm": "450", "pdi_pct": "4.5"},
        {"id": " E002 ", "diameter_nm": "", "pdi_pct": "3"},
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,id\nE001,E002\n", r"column 'id' appears twice"),
        ("id,diameter_nm\nE001,450,9\n", r"row 2 has a value \('9'\) in column 3, which has no header name"),
        ("", r"cannot be read: it is empty"),
        ('id\n"E001\n', r"cannot be read"),
    ],
)
def test_bad_csv_files_are_one_sentence(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_rows(path)


def test_xlsx_first_sheet_or_a_named_one(tmp_path: Path) -> None:
    path = workbook(
        tmp_path / "runs.xlsx",
        {
            "first": [[], [], ["id", "diameter_nm", "pdi_pct", "day"], ["E001", 450.0, 4.25, dt.date(2026, 5, 4)]],
            "May runs": [["id", "diameter_nm", "pdi_pct"], ["E002", 431, None]],
        },
    )  # fmt: skip
    first = read_rows(path)  # the first non-empty row is the header
    assert first.rows == [{"id": "E001", "diameter_nm": "450", "pdi_pct": "4.25", "day": "2026-05-04T00:00:00"}]
    assert first.first_row == 4
    named = read_rows(path, "May runs")
    assert named.rows == [{"id": "E002", "diameter_nm": "431", "pdi_pct": ""}] and named.first_row == 2
    with pytest.raises(InputError, match=r"has no sheet 'June'; its sheets are 'first', 'May runs'"):
        read_rows(path, "June")
    (tmp_path / "runs.csv").write_text("id\nE001\n")
    with pytest.raises(InputError, match=r"--sheet 'May runs' only applies to .xlsx"):
        read_rows(tmp_path / "runs.csv", "May runs")
    (tmp_path / "broken.xlsx").write_text("not a zip file")
    with pytest.raises(InputError, match=r"cannot be read as an Excel .xlsx workbook"):
        read_rows(tmp_path / "broken.xlsx")


def test_fit_reads_an_xlsx_sheet_like_the_same_csv(tmp_path: Path) -> None:
    source = REPO / "examples" / "data" / "twin_runs.csv"
    with open(source, encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")]
    cells = [rows[0]] + [
        [float(v) if v.replace(".", "", 1).replace("-", "", 1).isdigit() else v for v in r] for r in rows[1:]
    ]
    path = workbook(tmp_path / "twin.xlsx", {"readme": [["see the other sheet"]], "runs": cells})
    preset = Preset.load("cspbbr3-flow-focusing")
    from_csv = read_runs(source, preset)
    from_xlsx = read_runs(path, preset, sheet="runs")
    assert from_xlsx.mapping == from_csv.mapping
    assert from_xlsx.frame["row"].tolist() == list(range(2, 2 + len(cells) - 1))  # as Excel numbers its rows
    same = [c for c in from_csv.frame.columns if c != "row"]
    assert from_xlsx.frame[same].round(9).equals(from_csv.frame[same].round(9))


def test_record_with_a_missing_sheet_is_a_one_line_error(campaign_dir: Path, tmp_path: Path) -> None:
    path = workbook(tmp_path / "r.xlsx", {"Sheet1": [["id", "diameter_nm", "pdi_pct"]]})
    result = CliRunner().invoke(app, ["record", str(campaign_dir), "--csv", str(path), "--sheet", "Sheet2"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {path} has no sheet 'Sheet2'; its sheets are 'Sheet1'."


def test_a_european_csv_reads_like_the_same_csv_with_commas(tmp_path: Path) -> None:
    """Excel in a German or French locale saves CSV with ';' between cells and decimal commas."""
    source = REPO / "examples" / "data" / "twin_runs.csv"
    text = source.read_text(encoding="utf-8")
    european = "\n".join(
        line if line.startswith("#") else ";".join(cell.replace(".", ",") for cell in line.split(","))
        for line in text.splitlines()
    )
    path = tmp_path / "twin_de.csv"
    path.write_text(european, encoding="utf-8-sig")
    preset = Preset.load("cspbbr3-flow-focusing")
    ours, theirs = read_runs(source, preset), read_runs(path, preset)
    assert theirs.mapping == ours.mapping
    same = list(ours.frame.columns)
    assert theirs.frame[same].round(9).equals(ours.frame[same].round(9))
    data = [line for line in european.splitlines() if not line.startswith("#")]
    (tmp_path / "no_comments.csv").write_text("\n".join(data), encoding="utf-8")
    table = read_rows(tmp_path / "no_comments.csv")  # record --csv reads through here
    assert table.columns[:3] == ["Sample", "c (mg/mL)", "Qc/Qd"]
    assert [row["c (mg/mL)"] for row in table.rows[:2]] == ["2.59", "5.533"]


def test_a_comma_in_a_comma_separated_file_is_not_a_decimal_point(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text('id,note\nE001,"4,70"\n', encoding="utf-8")
    assert read_rows(path).rows == [{"id": "E001", "note": "4,70"}]
