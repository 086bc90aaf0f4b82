"""Loading a rig adapter from a campaign's [rig] table: every branch and every error."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from supraopt.errors import SpecError
from supraopt.records import Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import ManualRig, Rig, SimulatedRig, load_rig
from supraopt.rigs.simulated import World

SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


class TinyRig:
    """A complete adapter in a dozen lines, as a lab engineer would write one."""

    def __init__(self, port: str = "/dev/null") -> None:
        self.port = port
        self.runs: dict[str, dict[str, float]] = {}

    def limits(self) -> RigLimits:
        return RigLimits({"temperature_c": (20.0, 60.0)})

    def submit(self, proposal: Proposal) -> None:
        self.runs.setdefault(proposal.experiment_id, proposal.settings)

    def poll(self, experiment_id: str) -> RunStatus:
        return RunStatus(experiment_id, RunState.RUNNING if experiment_id in self.runs else RunState.LOST)

    def cancel(self, experiment_id: str) -> None:
        self.runs.pop(experiment_id, None)


class NotARig:
    def limits(self) -> RigLimits:
        return RigLimits()

    submit = None


class ExplodingRig(TinyRig):
    def __init__(self) -> None:
        raise ConnectionError("serial port busy.")


def test_simulated_keeps_its_state_in_the_campaign_folder(tmp_path: Path) -> None:
    rig = load_rig("simulated", {"seed": 3, "droplet_k": 1.3}, tmp_path)
    assert isinstance(rig, SimulatedRig) and isinstance(rig, Rig)
    assert rig.world.droplet_k == 1.3
    rig.submit(Proposal("E001", SETTINGS))
    assert (tmp_path / "rig-state" / "simulated.sqlite").is_file()
    assert "E001" in load_rig("simulated", {}, tmp_path).book  # a fresh twin knows the run
    elsewhere = tmp_path / "other.sqlite"
    load_rig("simulated", {"state_path": str(elsewhere)}, tmp_path).submit(Proposal("E001", SETTINGS))
    assert elsewhere.is_file()


def test_simulated_follows_the_campaign_model(tmp_path: Path) -> None:
    (tmp_path / "campaign.toml").write_text('model = "cdse-source-sink"\n[target]\ndiameter_nm = 12000.0\n')
    rig = load_rig("simulated", {}, tmp_path)
    assert isinstance(rig, SimulatedRig)
    assert rig.world == World.default("cdse-source-sink")
    explicit = load_rig("simulated", {"preset": "cspbbr3-flow-focusing"}, tmp_path)
    assert isinstance(explicit, SimulatedRig) and explicit.world == World.default("cspbbr3-flow-focusing")


def test_manual_works_in_the_campaign_folder(tmp_path: Path) -> None:
    rig = load_rig("manual", {"instructions_file": "todo.txt"}, tmp_path)
    assert isinstance(rig, ManualRig)
    assert rig.instructions == tmp_path / "todo.txt"


class PrefixedRig(TinyRig):
    def __init__(self, port: str = "/dev/null", id_prefix: str = "") -> None:
        super().__init__(port)
        self.id_prefix = id_prefix


def test_http_is_imported_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("supraopt.rigs.http")
    module.HttpRig = PrefixedRig  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "supraopt.rigs.http", module)
    rig = load_rig("http", {"port": "http://rig.local"}, Path("."))
    assert isinstance(rig, PrefixedRig) and rig.port == "http://rig.local"


def test_http_ids_are_prefixed_per_campaign_folder(tmp_path: Path) -> None:
    """Two campaigns sharing one rig server must not collide on E001."""
    options = {"url": "http://127.0.0.1:9", "token": "x" * 32}
    first = load_rig("http", options, tmp_path / "lab 450 nm")
    second = load_rig("http", options, tmp_path / "other")
    again = load_rig("http", options, tmp_path / "lab 450 nm")
    assert first.id_prefix.startswith("lab-450-nm-")  # type: ignore[attr-defined]
    assert first.id_prefix != second.id_prefix  # type: ignore[attr-defined]
    assert first.id_prefix == again.id_prefix  # type: ignore[attr-defined]  # stable: a restart finds its runs
    explicit = load_rig("http", {**options, "id_prefix": "mine-"}, tmp_path / "other")
    assert explicit.id_prefix == "mine-"  # type: ignore[attr-defined]


def test_http_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "supraopt.rigs.http", None)
    with pytest.raises(SpecError, match=r"rig adapter 'http': module 'supraopt.rigs.http' not found"):
        load_rig("http", {}, Path("."))


def test_dotted_path_to_a_class(tmp_path: Path) -> None:
    rig = load_rig(f"{__name__}:TinyRig", {"port": "COM3"}, tmp_path)
    assert isinstance(rig, TinyRig) and rig.port == "COM3"
    assert isinstance(rig, Rig)


@pytest.mark.parametrize(
    ("adapter", "options", "message"),
    [
        ("robot", {}, r"unknown rig adapter 'robot': use 'simulated', 'manual', 'http'"),
        ("a:b:c", {}, r"unknown rig adapter 'a:b:c'"),
        (
            "no_such_package_xyz.rig:Rig",
            {},
            r"'no_such_package_xyz.rig:Rig': module 'no_such_package_xyz.rig' not found",
        ),
        (f"{__name__}:MissingRig", {}, r"has no class 'MissingRig'"),
        (f"{__name__}:NotARig", {}, r"is not a rig: it lacks submit\(\), poll\(\), cancel\(\)"),
        (f"{__name__}:TinyRig", {"baud": 9600}, r"TinyRig' rejected its options \{'baud': 9600\}: .*baud"),
        (f"{__name__}:ExplodingRig", {}, r"rejected its options \{\}: serial port busy\.$"),
        ("simulated", {"colour": "red"}, r"'simulated' rejected its options .*unknown simulated rig option 'colour'"),
        ("simulated", {"droplet_k": -1.0}, r"'simulated' rejected .*droplet_k=-1.0 must be positive"),
        ("simulated", {"preset": "no-such-preset"}, r"'simulated' rejected .*unknown model preset 'no-such-preset'"),
        ("manual", {"speed": 2}, r"'manual' rejected its options .*speed"),
    ],
)
def test_errors_name_the_adapter_and_the_problem(
    tmp_path: Path, adapter: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        load_rig(adapter, options, tmp_path)


def test_a_module_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_rig_module.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match=r"importing 'broken_rig_module' failed: No module named 'no_such_dependency"):
        load_rig("broken_rig_module:Rig", {}, tmp_path)


def test_rig_modules_do_not_import_torch() -> None:
    code = "import sys, supraopt.rigs; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_dot_instead_of_the_colon_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"'truthrig.TruthRig' \(did you mean 'truthrig:TruthRig'\?\).*'module:Class'"):
        load_rig("truthrig.TruthRig", {}, tmp_path)


def test_module_not_found_lists_the_folders_searched(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="module 'nowhere_rig_xyz' not found") as error:
        load_rig("nowhere_rig_xyz:Rig", {}, tmp_path)
    assert str(Path.cwd()) in str(error.value) and str(tmp_path.resolve()) in str(error.value)


def test_run_says_which_file_a_user_adapter_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supraopt.campaign import Campaign
    from supraopt.loop import run

    module = tmp_path / "origin_rig_module.py"
    module.write_text(
        "class StopRig:\n"
        "    def limits(self):\n        raise KeyboardInterrupt  # stop the loop before anything runs\n"
        "    def submit(self, proposal): ...\n    def poll(self, experiment_id): ...\n"
        "    def cancel(self, experiment_id): ...\n"
    )
    directory = tmp_path / "c"
    Campaign.create(directory, "cspbbr3-flow-focusing", 450.0).close()
    monkeypatch.chdir(tmp_path)
    events: list[Any] = []
    run(directory, "origin_rig_module:StopRig", progress=events.append)
    assert events[0].kind == "rig"
    assert events[0].text() == f"-- rig adapter origin_rig_module:StopRig loaded from {module}"
