"""Property-based fuzz of the command line: commands x argument values x corrupt files (issue 9).

Every example copies a small campaign (two open experiments, one done, one failed), may damage its
campaign.toml or ledger, runs one command through the real entry point in this process and checks:

* never a traceback; a refusal is one ``error:`` line on stderr and a non-zero exit;
* a refusal leaves the ledger unchanged (its SQL dump, or its bytes when it is not a database);
* no command rewrites campaign.toml, and ``export`` alters none of the campaign's files.

The figures (inputs tried, clean refusals, accepted, tracebacks, ledger changes) are printed at the
end: ``.venv/bin/pytest -s -q tests/test_fuzz_cli.py``; ``SUPRAOPT_FUZZ_EXAMPLES=5000`` tries more.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli_harness import SETTINGS, cli, files_snapshot, ledger_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supraopt.campaign import Campaign
from supraopt.records import Failure, Measurement

EXAMPLES = int(os.environ.get("SUPRAOPT_FUZZ_EXAMPLES", "1000"))
FIGURES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("fuzz") / "C"
    with Campaign.create(directory, "cspbbr3-flow-focusing", 450.0) as campaign:
        ids = campaign.ledger.add_pending([(SETTINGS, {}), ({**SETTINGS, "flow_ratio": 6.0}, {})] * 2)
        campaign.record(ids[2], Measurement(441.0, 4.8, n_particles=120))
        campaign.record(ids[3], Failure("droplets unstable"))
    yield directory
    total = sum(FIGURES[k] for k in ("refused", "accepted"))
    print(
        f"\nCLI fuzz: {total} inputs tried, {FIGURES['refused']} clean refusals, {FIGURES['accepted']} accepted, "
        f"{FIGURES['tracebacks']} tracebacks, {FIGURES['ledger_changes']} ledger changes on a refusal, "
        f"{FIGURES['export_changes']} campaign files altered by export; by command: "
        + ", ".join(f"{k.removeprefix('cmd:')} {v}" for k, v in sorted(FIGURES.items()) if k.startswith("cmd:"))
    )


# --- values ------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "-1e-13", "1e-300", "9999999", "1e23", "0.05", "5", "450", "nan", "inf", "-inf"]),
    st.sampled_from(["abc", "", " ", "1,5", "0x10", "1e999", "--pdi", "True", "١٢"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**25), 10**25).map(str),
)
TEXT = st.one_of(st.sampled_from(["", " ", "--pdi", "-", "hollow", "E001", "x" * 300]), st.text(max_size=20))
IDS = st.sampled_from(["E001", "E002", "E003", "E004", "E999", "", "e001", "E1", "--pdi", "../E001"])
TOML_VALUES = st.sampled_from(
    ["5", "true", '"no"', "[1, 2]", "[5, 5]", "[1e-300, 1e300]", "[20.0, 5000.0]", "{}", '"abc"', "-1", "nan",
     "[[1]]", '{ x = 1 }', "0.06", '""', "[1, 2, 3]", "1e309", "[true, false]"]
)  # fmt: skip
TOML_KEYS = st.sampled_from(
    [
        "target",
        "bounds",
        "rig",
        "loop",
        "model",
        "name",
        "seed",
        "ledger_url",
        "plausible",
        "colour",
        "target.diameter_nm",
        "target.tolerance",
        "target.pdi_max_pct",
        "loop.budget",
        "loop.batch",
        "loop.stop_on_hit",
        "loop.poll_interval_s",
        "rig.adapter",
        "rig.options",
        "bounds.flow_ratio",
        "bounds.temperature_c",
        "bounds.concentration_mg_ml",
        "plausible.pdi_pct",
        "plausible.diameter_nm",
    ]
)
CSV_HEADERS = st.lists(
    st.sampled_from(
        [
            "id",
            "diameter_nm",
            "pdi_pct",
            "n_particles",
            "droplet_um",
            "failed",
            "note",
            "concentration_mg_ml",
            "flow_ratio",
            "temperature_c",
            "colour",
            "",
        ]
    ),
    min_size=1,
    max_size=8,
)
CELLS = st.one_of(NUMBERS, IDS, TEXT.filter(lambda t: "\n" not in t and "\r" not in t))


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["table", "table", "table", "binary", "empty", "good"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "empty":
        return b""
    if kind == "good":
        rows = ["concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct", "4.0,4.0,40.0,441.5,4.8"]
        rows += [draw(st.sampled_from(["E001,,,452,5.1", "3.0,4.0,40.0,400,0.05", "E002,,,,,", "4,4,40,441.5,4.8"]))]
        return ("\n".join(rows) + "\n").encode()
    headers = draw(CSV_HEADERS)
    lines = [",".join(headers)]
    for _ in range(draw(st.integers(0, 4))):
        lines.append(",".join(draw(CELLS).replace(",", ";").replace('"', "") for _ in headers))
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


# --- corruptions -------------------------------------------------------------------------------------


def damage_spec(directory: Path, kind: str, key: str, value: str, junk: bytes) -> None:
    path = directory / "campaign.toml"
    if kind == "value":
        table, _, name = key.rpartition(".")
        lines = path.read_text(encoding="utf-8").splitlines()
        section = ""
        for i, line in enumerate(lines):
            if line.startswith("["):
                section = line.split("]")[0].strip("[")
            elif section == table and line.split("=")[0].strip() == name:
                lines[i] = f"{name} = {value}"
                break
        else:
            lines.insert(
                0 if not table else len(lines), f"{name} = {value}" if not table else f"[{table}]\n{name} = {value}"
            )
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "bytes":
        path.write_bytes(junk)
    elif kind == "not-utf8":
        path.write_bytes(b'model = "\xff\xfe"\n')
    elif kind == "deep":
        path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    elif kind == "missing":
        path.unlink()


LEDGER_DAMAGE = {
    "bad-json": "UPDATE experiments SET settings = '{bad' WHERE id = 'E002'",
    "null-settings": "UPDATE experiments SET settings = 'null' WHERE id = 'E001'",
    "nan-settings": """UPDATE experiments SET settings = '{"concentration_mg_ml": NaN, "flow_ratio": 4,
                       "temperature_c": 40}' WHERE id = 'E003'""",
    "bad-time": "UPDATE experiments SET updated_at = 'yesterday' WHERE id = 'E004'",
    "bad-status": "PRAGMA ignore_check_constraints = 1; UPDATE experiments SET status = 'weird' WHERE id = 'E002'",
    "bad-result": 'UPDATE events SET payload = \'{"measurement": {"diameter_nm": "x"}}\' WHERE kind = \'measured\'',
    "bad-event-time": "UPDATE events SET at = '' WHERE experiment_id = 'E001'",
}


def damage_ledger(directory: Path, kind: str, junk: bytes) -> None:
    path = directory / "ledger.sqlite"
    if kind in LEDGER_DAMAGE:
        with sqlite3.connect(path) as connection:
            connection.executescript(LEDGER_DAMAGE[kind])
        connection.close()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "junk":
        path.write_bytes(junk)
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


# --- commands ----------------------------------------------------------------------------------------


def paths(c: str) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            f"{c}/campaign.toml",
            f"{c}/ledger.sqlite",
            f"{c}/ledger.sqlite-wal",
            f"{c}/run.log",
            f"{c}/ledger.sqlite.lock",
            "",
            "/",
            ".",
            c,
            "link.csv",
            "fifo",
            "/dev/null",
            "old.csv",
            "new.csv",
            f"{c}/out.csv",
            "nodir/x.csv",
            f"{c}/campaign.toml/x.csv",
            "x" * 300 + ".csv",
            "/proc/x",
            "data.csv",
            "afile",
        ]
    )


@st.composite
def commands(draw: st.DrawFn, c: str) -> list[str]:
    verb = draw(st.sampled_from(["status", "export", "record", "record", "record-csv", "init", "cheap-heavy"]))
    if verb == "status":
        return ["status", c, *draw(st.sampled_from([[], ["--json"], ["--colour"]]))]
    if verb == "export":
        return ["export", c, "--csv", draw(paths(c)), *draw(st.sampled_from([[], ["--force"]]))]
    if verb == "record-csv":
        args = ["record", c, "--csv", draw(st.sampled_from(["data.csv", "data.csv", "data.csv", c, "nothere.csv"]))]
        args += draw(st.sampled_from([[], ["--skip-duplicates"], ["--allow-duplicates"], ["--pdi", "5"], ["E001"]]))
        return args
    if verb == "record":
        args = ["record", c, draw(IDS)]
        options = ["--diameter-nm", "--pdi", "--n-particles", "--droplet-um", "--failed", "--note", "--pdi-unit"]
        for option in draw(st.lists(st.sampled_from([*options, "--correct", "--csv"]), max_size=5)):
            if option == "--correct":
                args.append(option)
            elif option in ("--failed", "--note", "--pdi-unit"):
                args += [option, draw(st.one_of(TEXT, st.sampled_from(["fraction", "%"])))]
            elif option == "--csv":
                args += [option, "data.csv"]
            else:
                args += [option, draw(NUMBERS)]
        return args
    if verb == "init":
        folder = draw(st.sampled_from(["", "new", "afile", "afile/sub", "/proc/x", "x" * 300, c, f"{c}/campaign.toml"]))
        args = ["init", folder]
        for option in draw(
            st.lists(st.sampled_from(["--target-nm", "--pdi-max", "--tolerance", "--seed"]), max_size=3)
        ):
            args += [option, draw(NUMBERS)]
        if draw(st.booleans()):
            args += ["--model", draw(st.sampled_from(["nope", "", "cdse-source-sink", f"{c}/campaign.toml"]))]
        return args
    # heavy verbs (model fits, the runner) only with arguments they must refuse before any work
    return draw(
        st.sampled_from(
            [
                ["suggest", c, "-n", "0"],
                ["suggest", c, "-n", "65"],
                ["suggest", c, "-n", "abc"],
                ["run", c, "--rig", ""],
                ["demo", "D", "--budget", "0"],
                ["demo", "afile"],
                ["plot", c, "--out", "afile"],
                ["plot", c, "--out", f"{c}/campaign.toml"],
                ["fit", c],
                ["fit", "data.csv", "--into", "afile", "--target-nm", "450"],
                ["fit", "data.csv", "--out", "afile"],
                ["fit", "nothere.csv"],
                ["nonsense", c],
            ]
        )
    )


SPEC_DAMAGE = st.sampled_from(["none"] * 6 + ["value"] * 4 + ["bytes", "not-utf8", "deep", "folder", "missing"])
LEDGER_KINDS = st.sampled_from(["none"] * 8 + [*LEDGER_DAMAGE, "empty", "junk", "truncated"])


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzz_cli(template: Path, data: st.DataObject) -> None:
    work = template.parent / "work"
    cwd = Path.cwd()
    try:
        if not work.is_dir():  # what the paths point at, made once: a file, a CSV, a link, a FIFO
            work.mkdir()
            (work / "afile").write_text("not a folder\n")
            (work / "link.csv").symlink_to("C/campaign.toml")
            os.mkfifo(work / "fifo")
        os.chdir(work)
        for leftover in ("C", "new", "D"):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(template, "C")
        Path("old.csv").write_text("a,b\n1,2\n")
        Path("new.csv").unlink(missing_ok=True)
        Path("data.csv").write_bytes(data.draw(csv_files(), label="csv"))
        spec_kind = data.draw(SPEC_DAMAGE, label="campaign.toml damage")
        damage_spec(
            Path("C"), spec_kind, data.draw(TOML_KEYS), data.draw(TOML_VALUES), data.draw(st.binary(max_size=64))
        )
        damage_ledger(Path("C"), data.draw(LEDGER_KINDS, label="ledger damage"), data.draw(st.binary(max_size=64)))
        args = data.draw(commands("C"), label="command")
        spec_before = files_snapshot(Path("C"))
        ledger_before = ledger_snapshot(Path("C"))
        outcome = cli(*args)
        FIGURES[f"cmd:{args[0]}"] += 1
        FIGURES["refused" if outcome.refused else "accepted"] += 1
        if outcome.crash is not None or "Traceback" in outcome.out + outcome.err:
            FIGURES["tracebacks"] += 1
        ledger_changed = ledger_snapshot(Path("C")) != ledger_before
        if outcome.refused and ledger_changed:
            FIGURES["ledger_changes"] += 1
        files_after = files_snapshot(Path("C"))
        toml_changed = files_after.get("campaign.toml") != spec_before.get("campaign.toml")
        export_changed = args[0] == "export" and (
            ledger_changed or {k: v for k, v in files_after.items() if k != "out.csv"} != spec_before
        )
        FIGURES["export_changes"] += export_changed
        assert not outcome.problems(), (args, outcome.problems())
        assert not (outcome.refused and ledger_changed), (args, "a refusal changed the ledger", outcome.err)
        assert not toml_changed, (args, "campaign.toml was rewritten")
        assert not export_changed, (args, "export altered the campaign's files")
    finally:
        os.chdir(cwd)
