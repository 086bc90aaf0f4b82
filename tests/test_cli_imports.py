"""Commands that fit nothing must not import torch, pandas, SciPy or SQLAlchemy: they would take seconds to start.

The commands run in-process (CliRunner) inside a fresh Python subprocess, so that what this test
process has already imported does not hide an import; after each command the subprocess notes
which heavy modules have appeared in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from supraopt.cli import app

HEAVY = ("torch", "pandas", "botorch", "matplotlib", "scipy", "sqlalchemy")
folder = Path(sys.argv[1])
campaign = str(folder / "c")
(folder / "results.csv").write_text(
    "concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n4,3,25,450,4\n5,3,30,470,5\n"
)
import openpyxl
book = openpyxl.Workbook()
book.active.append(["concentration_mg_ml", "flow_ratio", "temperature_c", "diameter_nm", "pdi_pct"])
book.active.append([3.5, 2.5, 35, 430, 4.5])
book.save(folder / "results.xlsx")
commands = [
    ["--help"],
    ["init", campaign],
    ["record", campaign, "--csv", str(folder / "results.csv")],
    ["record", campaign, "--csv", str(folder / "results.xlsx")],
    ["record", campaign, "E001", "--diameter-nm", "451", "--pdi", "4", "--correct"],
    ["status", campaign],
    ["status", campaign, "--json"],
    ["export", campaign, "--csv", str(folder / "out.csv")],
    *([verb, "--help"] for verb in ("init", "suggest", "record", "status", "export", "run", "demo", "fit", "plot")),
]
report = []
runner = CliRunner()
for args in commands:
    result = runner.invoke(app, args)
    loaded = [name for name in HEAVY if name in sys.modules]
    report.append({"args": args[:1] + args[2:3], "exit": result.exit_code, "output": result.output[-4000:], "heavy": loaded})
print(json.dumps(report))
"""


def test_commands_that_fit_nothing_import_nothing_heavy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 17
    for step in report:
        assert step["exit"] == 0, step
        assert step["heavy"] == [], f"{step['args']} imported {step['heavy']}"
    assert "Recorded 2 result(s)" in report[2]["output"] and "Recorded 1 result(s)" in report[3]["output"]
    assert "E003" in report[5]["output"]  # the .xlsx row really was recorded


SUGGEST = r"""
import json, sys
from typer.testing import CliRunner
from supraopt.cli import app

runner = CliRunner()
campaign = sys.argv[1]
assert runner.invoke(app, ["init", campaign]).exit_code == 0
csv = campaign + ".csv"
with open(csv, "w") as f:
    f.write("concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct\n")
    f.write("4,3,25,450,4.5\n6,2.5,30,520,4.8\n3,4,35,380,5.2\n5,3.5,28,470,4.4\n")
assert runner.invoke(app, ["record", campaign, "--csv", csv]).exit_code == 0
result = runner.invoke(app, ["suggest", campaign, "--json"])
print(json.dumps({"exit": result.exit_code, "output": result.output[-2000:],
                  "loaded": [m for m in ("botorch", "scipy", "sympy") if m in sys.modules]}))
"""


def test_suggest_fits_without_botorch_or_scipy(tmp_path: Path) -> None:
    """A suggestion fits its GPs (4 runs: hyperparameters by MAP) with GPyTorch alone: importing BoTorch
    would pull in SciPy's optimiser and spatial modules, half a second of every ``suggest``."""
    done = subprocess.run(
        [sys.executable, "-c", SUGGEST, str(tmp_path / "c")], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0, report["output"]
    assert json.loads(report["output"])  # a real suggestion came out
    assert report["loaded"] == [], report
