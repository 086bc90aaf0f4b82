"""The campaign spec: TOML round trip and one clear error per kind of bad input."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supraopt.errors import SpecError
from supraopt.records import PARAMETERS
from supraopt.spec import (
    SPEC_FILE,
    CampaignSpec,
    LoopSettings,
    RigSettings,
    Target,
    default_bounds,
    load_spec,
    parse_spec,
    read_toml,
)

MODEL = "cspbbr3-flow-focusing"


def minimal(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": MODEL, "target": {"diameter_nm": 450.0}}
    data.update(changes)
    return data


def round_trip(spec: CampaignSpec) -> CampaignSpec:
    return parse_spec(tomllib.loads(spec.to_toml()))


# --- round trip ----------------------------------------------------------------------------------

finite = {"allow_nan": False, "allow_infinity": False}
BMP = st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",))
targets = st.builds(
    Target,
    diameter_nm=st.floats(min_value=20.0, max_value=5e4, **finite),
    tolerance=st.floats(min_value=1e-6, max_value=0.499, **finite),
    pdi_max_pct=st.floats(min_value=0.5, max_value=100.0, **finite),
)


@st.composite
def bounds(draw: st.DrawFn) -> dict[str, tuple[float, float]]:
    out = {}
    for name in PARAMETERS:
        low_min, high_max = {"temperature_c": (-40.0, 200.0), "flow_ratio": (1e-2, 1e3)}.get(name, (1e-3, 500.0))
        low = draw(st.floats(min_value=low_min, max_value=high_max / 2, **finite))
        high = draw(st.floats(min_value=low, max_value=high_max, exclude_min=True, **finite))
        out[name] = (low, high)
    return out


loops = st.builds(
    LoopSettings,
    budget=st.integers(1, 10_000),
    batch=st.integers(1, 64),
    stop_on_hit=st.booleans(),
    poll_interval_s=st.floats(min_value=0, max_value=1e5, **finite),
    rig_timeout_s=st.floats(min_value=0, max_value=1e5, **finite),
    max_rig_errors=st.integers(1, 100),
)


@settings(max_examples=150, deadline=None)
@given(target=targets, bounds=bounds(), seed=st.integers(-(2**31), 2**31), loop=loops)
def test_to_toml_round_trips(target, bounds, seed, loop):
    spec = CampaignSpec(name="run-1", model=MODEL, targets=(target,), bounds=bounds, seed=seed, loop=loop)
    assert round_trip(spec) == spec


@settings(max_examples=50, deadline=None)
@given(
    options=st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True),
        # texts here stay in the basic multilingual plane: wider ones are test_any_campaign_name_round_trips
        st.one_of(st.integers(-(10**6), 10**6), st.floats(**finite), st.booleans(), st.text(BMP, max_size=20)),
        max_size=4,
    ),
    ledger_url=st.one_of(st.none(), st.just("postgresql+psycopg://user@host/db")),
)
def test_rig_options_and_ledger_url_round_trip(options, ledger_url):
    spec = CampaignSpec(
        name="run",
        model=MODEL,
        targets=(Target(450.0),),
        bounds=default_bounds(MODEL),
        rig=RigSettings("manual", options),
        ledger_url=ledger_url,
    )
    assert round_trip(spec) == spec


@settings(max_examples=100, deadline=None)
@given(name=st.text(max_size=30))
def test_any_campaign_name_round_trips(name):
    # campaign names come from folder names, which may hold any character a file system allows
    spec = CampaignSpec(name=name, model=MODEL, targets=(Target(450.0),), bounds=default_bounds(MODEL))
    assert round_trip(spec) == spec


def test_round_trip_of_a_name_outside_the_basic_multilingual_plane():
    spec = CampaignSpec(
        name="CsPbBr3 \U0001f52c 450 nm", model=MODEL, targets=(Target(450.0),), bounds=default_bounds(MODEL)
    )
    assert round_trip(spec).name == spec.name


def test_missing_bounds_come_from_the_preset():
    spec = parse_spec(minimal())
    assert spec.bounds == default_bounds(MODEL)
    assert spec.seed == 0 and spec.target.tolerance == Target(450.0).tolerance


def test_load_spec_reads_the_file(tmp_path):
    spec = CampaignSpec(
        name="x", model=MODEL, targets=(Target(300.0, 0.05, 8.0),), bounds=default_bounds(MODEL), seed=3
    )
    (tmp_path / SPEC_FILE).write_text(spec.to_toml(), encoding="utf-8")
    assert load_spec(tmp_path) == spec


def test_with_target_changes_only_the_target():
    spec = parse_spec(minimal())
    changed = spec.with_target(diameter_nm=600.0)
    assert changed.target.diameter_nm == 600.0
    assert changed.target.tolerance == spec.target.tolerance
    assert changed.bounds == spec.bounds and spec.target.diameter_nm == 450.0


@pytest.mark.parametrize(
    ("diameter", "pdi", "hit"),
    [
        (450.0, 5.9, True),
        (463.4, 5.0, True),
        (436.6, 5.0, True),
        (464.0, 5.0, False),
        (435.0, 5.0, False),
        (450.0, 6.1, False),
    ],
)
def test_target_is_hit(diameter, pdi, hit):
    assert Target(450.0, 0.03, 6.0).is_hit(diameter, pdi) is hit


# --- validation ----------------------------------------------------------------------------------


def test_unknown_top_level_key():
    with pytest.raises(SpecError, match=r"unknown key\(s\) in the top level: colour"):
        parse_spec(minimal(colour="blue"))


@pytest.mark.parametrize("tolerance", [0.0, -0.03, 0.5, 2.0, float("nan")])
def test_bad_tolerance_direct(tolerance):
    with pytest.raises(SpecError, match=r"tolerance=.*must be a fraction"):
        Target(450.0, tolerance)


@pytest.mark.parametrize("tolerance", [0.0, -0.03, 2.0])
def test_bad_tolerance_in_the_file_says_what_is_wrong(tolerance):
    # the error must say the tolerance is out of range, not that the values are not numbers
    with pytest.raises(SpecError, match=r"tolerance=.*must be a fraction") as info:
        parse_spec(minimal(target={"diameter_nm": 450.0, "tolerance": tolerance}))
    assert "must be numbers" not in str(info.value)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ({"diameter_nm": -5.0}, r"diameter_nm=-5\.0 must be a positive size"),
        ({"diameter_nm": 450.0, "pdi_max_pct": 0.0}, r"pdi_max_pct=0\.0 must be a percentage"),
        ({"diameter_nm": "big"}, r"\[target\].*big"),
        ({"diameter_nm": 450.0, "colour": 1.0}, r"unknown key\(s\) in \[target\]: colour"),
        ({"tolerance": 0.03}, r"missing required key \[target\] 'diameter_nm'"),
    ],
    ids=["negative-size", "zero-pdi", "text", "unknown-key", "missing-size"],
)
def test_bad_target(target, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(minimal(target=target))


def test_bounds_low_above_high():
    bad = {**default_bounds(MODEL), "flow_ratio": (10.0, 2.0)}
    with pytest.raises(
        SpecError,
        match=r"\[bounds\] flow_ratio=\[10\.0, 2\.0\] must be a \[low, high\] pair of finite numbers with low < high",
    ):
        parse_spec(minimal(bounds={k: list(v) for k, v in bad.items()}))


@pytest.mark.parametrize("name", ["concentration_mg_ml", "flow_ratio"])
def test_negative_bounds(name):
    bad = {**default_bounds(MODEL), name: (-1.0, 5.0)}
    with pytest.raises(SpecError, match=rf"bounds {name}=\[-1\.0, 5\.0\] must be positive"):
        parse_spec(minimal(bounds={k: list(v) for k, v in bad.items()}))


def test_temperature_bounds_may_be_below_zero():
    ok = {**default_bounds(MODEL), "temperature_c": (-10.0, 5.0)}
    assert parse_spec(minimal(bounds={k: list(v) for k, v in ok.items()})).bounds["temperature_c"] == (-10.0, 5.0)


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        ({"concentration_mg_ml": [1.0, 2.0]}, r"\[bounds\] must give all of"),
        ({**{k: list(v) for k, v in default_bounds(MODEL).items()}, "pressure_bar": [1.0, 2.0]}, r"pressure_bar"),
        ({**{k: list(v) for k, v in default_bounds(MODEL).items()}, "flow_ratio": 3.0}, r"\[low, high\] pair"),
        ({**{k: list(v) for k, v in default_bounds(MODEL).items()}, "flow_ratio": ["a", "b"]}, r"\[low, high\] pair"),
        (
            {**{k: list(v) for k, v in default_bounds(MODEL).items()}, "flow_ratio": [1.0, float("inf")]},
            r"finite numbers",
        ),
    ],
    ids=["missing-parameter", "extra-parameter", "not-a-pair", "text", "infinite"],
)
def test_malformed_bounds(bounds, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(minimal(bounds=bounds))


def test_unknown_preset():
    with pytest.raises(SpecError, match=r"unknown model preset 'pbs-magic'"):
        parse_spec(minimal(model="pbs-magic"))


def test_missing_model():
    with pytest.raises(SpecError, match=r"missing required key 'model'"):
        parse_spec({"target": {"diameter_nm": 450.0}})


@pytest.mark.parametrize("seed", [1.5, "7", True])
def test_bad_seed(seed):
    with pytest.raises(SpecError, match=r"seed=.* must be an integer"):
        parse_spec(minimal(seed=seed))


@pytest.mark.parametrize(
    ("loop", "match"),
    [
        ({"budget": 0}, r"budget=0 must be a positive integer"),
        ({"batch": 65}, r"batch=65 must be an integer between 1 and 64"),
        ({"poll_interval_s": -1.0}, r"poll_interval_s=-1\.0 must be a non-negative"),
        ({"max_rig_errors": 0}, r"max_rig_errors=0"),
        ({"speed": 2}, r"unknown key\(s\) in \[loop\]: speed"),
    ],
)
def test_bad_loop(loop, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(minimal(loop=loop))


def test_unknown_rig_key():
    with pytest.raises(SpecError, match=r"unknown key\(s\) in \[rig\]: speed"):
        parse_spec(minimal(rig={"adapter": "manual", "speed": 3}))


def test_malformed_toml_names_the_file(tmp_path):
    (tmp_path / SPEC_FILE).write_text("name = 'x'\n[target\ndiameter_nm = 450\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"campaign\.toml is not valid TOML") as info:
        load_spec(tmp_path)
    assert "\n" not in str(info.value)


def test_not_a_campaign_folder(tmp_path):
    with pytest.raises(SpecError, match=r"is not a campaign folder.*supraopt init"):
        load_spec(tmp_path)


def test_read_toml_of_a_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.toml does not exist"):
        read_toml(tmp_path / "nope.toml")


def test_spec_errors_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown key"):
        parse_spec(minimal(colour="blue"))


# --- strict types: every case found by hand in issue 9 -------------------------------------------


BOUNDS = {k: list(v) for k, v in default_bounds(MODEL).items()}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"target": 5}, r"\[target\] must be a table"),
        ({"bounds": [1, 2]}, r"\[bounds\] must be a table"),
        ({"rig": 5}, r"\[rig\] must be a table"),
        ({"loop": "x"}, r"\[loop\] must be a table"),
        ({"rig": {"options": "abc"}}, r"\[rig.options\] must be a table"),
        ({"plausible": 1.5}, r"\[plausible\] must be a table"),
        ({"loop": {"stop_on_hit": "no"}}, r"\[loop\] stop_on_hit='no' must be true or false"),
        ({"loop": {"budget": True}}, r"\[loop\] budget=True must be an integer"),
        ({"loop": {"budget": 2.5}}, r"\[loop\] budget=2.5 must be an integer"),
        ({"loop": {"poll_interval_s": "1"}}, r"\[loop\] poll_interval_s='1' must be a finite number"),
        ({"target": {"diameter_nm": True}}, r"\[target\] diameter_nm=True must be a finite number"),
        ({"target": {"diameter_nm": "450"}}, r"\[target\] diameter_nm='450' must be a finite number"),
        ({"target": {"diameter_nm": 1e-300}}, r"diameter_nm=1e-300 nm is not plausible"),
        ({"target": {"diameter_nm": 9_999_999.0}}, r"diameter_nm=1e\+07 nm is not plausible"),
        ({"target": {"diameter_nm": 450.0, "pdi_max_pct": 0.06}}, r"pdi_max_pct=0.06 % .*fraction.*give 6"),
        ({"bounds": {**BOUNDS, "flow_ratio": [5.0, 5.0]}}, r"flow_ratio=\[5.0, 5.0\] must be .*low < high"),
        ({"bounds": {**BOUNDS, "concentration_mg_ml": [1e-300, 1e300]}}, r"concentration_mg_ml=\[1e-300, 1e\+300\]"),
        ({"bounds": {**BOUNDS, "temperature_c": [20.0, 5000.0]}}, r"temperature_c=\[20, 5000\] °C is not plausible"),
        ({"bounds": {**BOUNDS, "flow_ratio": [1, [[2]]]}}, r"\[bounds\] flow_ratio=.*pair"),
        ({"name": 5}, r"name=5 must be a .*text"),
        ({"model": 5}, r"model=5 must be a non-empty text"),
        ({"ledger_url": 5}, r"ledger_url=5 must be a non-empty text"),
        ({"rig": {"adapter": ""}}, r"\[rig\] adapter='' must be a non-empty text"),
        ({"plausible": {"pdi_pct": [5.0, 1.0]}}, r"\[plausible\] pdi_pct=\[5.0, 1.0\]"),
        ({"plausible": {"colour": [1.0, 2.0]}}, r"unknown key\(s\) in \[plausible\]: colour"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_strict_types_name_the_key(changes, match):
    with pytest.raises(SpecError, match=match) as info:
        parse_spec(minimal(**changes))
    assert str(info.value).startswith("campaign.toml") or "bounds" in str(info.value)
    assert "\n" not in str(info.value)


def test_plausible_table_overrides_the_preset_for_an_unusual_system():
    spec = parse_spec(
        minimal(
            target={"diameter_nm": 450.0, "pdi_max_pct": 0.2},
            plausible={"pdi_pct": [0.01, 50.0], "temperature_c": [-40.0, 400.0]},
            bounds={**BOUNDS, "temperature_c": [20.0, 350.0]},
        )
    )
    assert spec.target.pdi_max_pct == 0.2 and spec.bounds["temperature_c"] == (20.0, 350.0)
    assert round_trip(spec) == spec  # the override survives to_toml


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'model = "\xff\xfe"\n', r"is not UTF-8"),
        (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", r"nests arrays or tables too deeply|not valid TOML"),
        (b'model="cspbbr3-flow-focusing"\ntarget = 5\n', r"\[target\] must be a table"),
    ],
    ids=["not-utf8", "deep-nesting", "target-scalar"],
)
def test_unreadable_files_are_one_line(tmp_path, content, match):
    (tmp_path / SPEC_FILE).write_bytes(content)
    with pytest.raises(SpecError, match=match) as info:
        load_spec(tmp_path)
    assert "\n" not in str(info.value)


def test_a_campaign_toml_that_is_a_folder(tmp_path):
    (tmp_path / SPEC_FILE).mkdir()
    with pytest.raises(SpecError, match=r"not a campaign folder"):
        load_spec(tmp_path)
