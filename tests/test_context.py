"""Context variables (chip, NC batch, measured conditions): records, spec, ledger, CLI, CSV, model, loop, HTTP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.context import load_terms, name_key
from supraopt.errors import InputError, SpecError
from supraopt.ledger import Ledger
from supraopt.loop import run_campaign
from supraopt.records import Measurement, Proposal, validate_context
from supraopt.rigs.simulated import SimulatedRig, World
from supraopt.spec import ContextVariable, parse_context

runner = CliRunner()
SETTINGS = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "error:" not in result.output


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code ≠ 0, handled, exactly one line starting with 'error:' holding each fragment."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def declare(directory: Path, table: str) -> None:
    spec = directory / "campaign.toml"
    spec.write_text(spec.read_text() + "\n[context]\n" + table + "\n")


def status_json(directory: Path) -> dict:
    result = invoke("status", directory, "--json")
    assert_ok(result)
    return json.loads(result.output)


# --- records and spec ------------------------------------------------------------------------------------


def test_context_records_round_trip_and_old_json_still_reads() -> None:
    proposal = Proposal("E001", dict(SETTINGS), {"chip": "B", "room_c": 23.5})
    assert Proposal.from_json(json.loads(json.dumps(proposal.to_json()))) == proposal
    assert "context" not in Proposal("E001", dict(SETTINGS)).to_json()  # old servers forbid unknown fields
    assert Proposal.from_json({"experiment_id": "E001", "settings": SETTINGS}).context == {}
    m = Measurement(450.0, 5.0, 100, context={"chip": " B ", "room_c": 23})
    assert m.context == {"chip": "B", "room_c": 23.0}
    assert Measurement.from_json(m.to_json()) == m
    assert Measurement.from_json({"diameter_nm": 450.0, "pdi_pct": 5.0}).context is None


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [({"2chip": "A"}, "2chip"), ({"chip": ""}, "chip"), ({"room_c": math.nan}, "room_c"), ({"ok": True}, "ok")],
)
def test_bad_context_values_are_refused_by_name(bad: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        validate_context(bad)


def test_context_table_parses_plain_and_unit_forms_and_refuses_bad_kinds() -> None:
    parsed = parse_context({"chip": "category", "room_c": {"kind": "number", "unit": "°C"}})
    assert parsed == {"chip": ContextVariable("category"), "room_c": ContextVariable("number", "°C")}
    with pytest.raises(SpecError, match="chip"):
        parse_context({"chip": "text"})
    with pytest.raises(SpecError, match="unit"):
        parse_context({"room_c": {"kind": "number", "units": "C"}})


def test_declared_context_survives_the_toml_round_trip(campaign_dir: Path) -> None:
    declare(campaign_dir, 'chip = "category"\nroom_c = { kind = "number", unit = "°C" }')
    with Campaign.open(campaign_dir) as campaign:
        text = campaign.spec.to_toml()
        assert campaign.spec.context["room_c"].unit == "°C"
    (campaign_dir / "campaign.toml").write_text(text)
    with Campaign.open(campaign_dir) as campaign:
        assert campaign.spec.context == {"chip": ContextVariable("category"), "room_c": ContextVariable("number", "°C")}


# --- ledger ----------------------------------------------------------------------------------------------


def test_a_ledger_from_before_context_is_migrated_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the experiments table as supraopt wrote it before context existed
        conn.execute(
            sa.text(
                "CREATE TABLE experiments (seq INTEGER PRIMARY KEY AUTOINCREMENT, id VARCHAR(40) NOT NULL UNIQUE, "
                "status VARCHAR(16) NOT NULL, settings TEXT NOT NULL, prediction TEXT NOT NULL, "
                "created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL, note TEXT NOT NULL)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO experiments (id, status, settings, prediction, created_at, updated_at, note) VALUES "
                "('E001', 'pending', :s, '{}', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', '')"
            ),
            {"s": json.dumps(SETTINGS)},
        )
    engine.dispose()
    ledger = Ledger(url)
    assert ledger.get("E001").context == {}
    ledger.record_measurement("E001", Measurement(450.0, 5.0), context={"chip": "A"})
    assert ledger.get("E001").context == {"chip": "A"}
    ledger.close()
    assert Ledger(url).get("E001").context == {"chip": "A"}  # opening again is a no-op


# --- CLI contract ----------------------------------------------------------------------------------------


def test_suggest_context_is_stored_kept_inherited_and_corrected(campaign_dir: Path) -> None:
    assert_ok(invoke("suggest", campaign_dir, "--context", "chip=B", "--context", "room_c=23.5"))
    state = status_json(campaign_dir)
    assert state["context"] == {"chip": "B", "room_c": 23.5}
    assert state["experiments"][0]["context"] == {"chip": "B", "room_c": 23.5}
    # record inherits the proposal's context; --context corrects one entry for this run only
    assert_ok(invoke("record", campaign_dir, "E001", "--diameter-nm", 470, "--pdi", 5, "--context", "room_c=24"))
    # a later suggest keeps the current context and changes only what it states
    result = invoke("suggest", campaign_dir, "--json", "--context", "chip=C")
    assert_ok(result)
    assert json.loads(result.output)[0]["context"] == {"chip": "C", "room_c": 23.5}
    state = status_json(campaign_dir)
    assert [e["context"] for e in state["experiments"]] == [
        {"chip": "B", "room_c": 24.0},
        {"chip": "C", "room_c": 23.5},
    ]
    assert state["context"] == {"chip": "C", "room_c": 23.5}
    table = invoke("status", campaign_dir)
    assert_ok(table)
    assert "chip=C, room_c=23.5" in table.output


def test_bad_context_is_refused_in_one_line_and_writes_nothing(campaign_dir: Path, ledger_state, same_ledger) -> None:
    declare(campaign_dir, 'chip = "category"\nroom_c = { kind = "number", unit = "°C" }')
    before = ledger_state(campaign_dir)
    assert_one_line_error(invoke("suggest", campaign_dir, "--context", "operator=Ann"), "operator", "chip, room_c")
    assert_one_line_error(invoke("suggest", campaign_dir, "--context", "room_c=warm"), "room_c", "not a number")
    assert_one_line_error(invoke("suggest", campaign_dir, "--context", "chipB"), "chipB", "NAME=VALUE")
    with Campaign.open(campaign_dir) as campaign:
        [experiment_id] = campaign.ledger.add_pending([(SETTINGS, {})])
    before = ledger_state(campaign_dir)
    result = invoke("record", campaign_dir, experiment_id, "--diameter-nm", 450, "--pdi", 5, "--context", "nozzle=2")
    assert_one_line_error(result, "nozzle", "chip, room_c")
    same_ledger(before, ledger_state(campaign_dir))
    with Campaign.open(campaign_dir) as campaign:
        assert campaign.current_context() == {}


def test_undeclared_names_are_remembered_from_first_use(campaign: Campaign) -> None:
    [a] = campaign.ledger.add_pending([(SETTINGS, {})])
    campaign.record(a, Measurement(450.0, 5.0), context={"room_c": "22", "chip": "7"})
    assert campaign.ledger.get(a).context == {"room_c": 22.0, "chip": 7.0}
    with pytest.raises(InputError, match="room_c"):
        campaign.check_context({"room_c": "hot"})
    assert campaign.check_context({"nc_batch": "2024-03"}) == ({"nc_batch": "2024-03"}, {"nc_batch": "category"})


def test_csv_reads_context_columns_and_refuses_a_bad_one_before_writing(
    campaign_dir: Path, tmp_path: Path, ledger_state, same_ledger
) -> None:
    declare(campaign_dir, 'chip = "category"\nroom_c = "number"')
    with Campaign.open(campaign_dir) as campaign:
        [first] = campaign.ledger.add_pending([(SETTINGS, {})], context={"chip": "A"})
    good = tmp_path / "good.csv"
    good.write_text(
        "id,diameter_nm,pdi_pct,room_c,context.chip,concentration_mg_ml,flow_ratio,temperature_c\n"
        f"{first},450,5,22.5,,,,\n"
        ",430,5,,B,3,4,40\n"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("concentration_mg_ml,flow_ratio,temperature_c,diameter_nm,pdi_pct,room_c\n3,4,40,430,5,warm\n")
    before = ledger_state(campaign_dir)
    assert_one_line_error(invoke("record", campaign_dir, "--csv", bad), "row 2", "room_c")
    same_ledger(before, ledger_state(campaign_dir))
    assert_ok(invoke("record", campaign_dir, "--csv", good))
    with Campaign.open(campaign_dir) as campaign:
        contexts = [e.context for e in campaign.ledger.experiments()]
        assert contexts == [{"chip": "A", "room_c": 22.5}, {"chip": "B"}]
        exported = campaign.ledger.to_frame()
    assert list(exported["context.chip"]) == ["A", "B"]


# --- model -----------------------------------------------------------------------------------------------


def _runs_on(campaign: Campaign, world: World, context: dict, count: int, seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    z = torch.rand(count, 3, generator=rng, dtype=torch.double) * 0.5 + 0.25
    for settings in campaign.space.settings(campaign.space.from_unit(z)):
        c, r, t = settings.values()
        diameter = float(world.diameter_nm(c, r, t))
        campaign.add_run(settings, Measurement(diameter, float(world.pdi_pct(c, r, t)), 100), context=context)


def test_a_new_chip_starts_from_the_population_and_one_run_calibrates_it(campaign: Campaign) -> None:
    world = World.default()
    swapped = World.from_options({"droplet_k": world.droplet_k * 1.18}, world)
    _runs_on(campaign, world, {"chip": "A"}, 6, seed=1)
    probe = campaign.space.tensor([{"concentration_mg_ml": 3.2, "flow_ratio": 6.0, "temperature_c": 45.0}])
    z = campaign.space.to_unit(probe)
    truth_a, truth_b = (float(w.diameter_nm(3.2, 6.0, 45.0)) for w in (world, swapped))

    def predicted() -> dict[str, tuple[float, float]]:
        """Predicted size and its sd at the probe on each chip, from one fit (proposing for chip B)."""
        surrogates = campaign.fit(context={"chip": "B"})
        assert surrogates.context_model is not None
        out = {}
        for chip in ("A", "B"):
            size = surrogates.size.at_inputs(surrogates.context_model.fixed({"chip": chip}))
            with torch.no_grad():
                mean, var = size.moments(z)
            out[chip] = (math.exp(float(mean[0])), float(var[0]) ** 0.5)
        return out

    before = predicted()
    assert abs(before["A"][0] / truth_a - 1) < 0.03
    assert before["B"][1] > 2 * before["A"][1]  # a chip never run is uncertain by the between-chip spread
    _runs_on(campaign, swapped, {"chip": "B"}, 1, seed=2)  # one run on the new chip, elsewhere
    after = predicted()
    assert abs(after["B"][0] / truth_b - 1) < 0.04, (after, truth_b)
    assert abs(after["A"][0] / truth_a - 1) < 0.03  # chip A's runs are still chip A's


def test_a_numeric_context_the_physics_names_is_a_power_law_term_of_the_size(campaign: Campaign) -> None:
    """The preset's [context_terms] names the expansion ratio: campaigns fit the same term as ``supraopt fit``,
    ``e * ln(ratio)`` on the log droplet (hence SP) size, and predict a ratio never run from it."""
    world = World.default()
    rng = torch.Generator().manual_seed(4)
    z = torch.rand(12, 3, generator=rng, dtype=torch.double) * 0.5 + 0.25
    for i, settings in enumerate(campaign.space.settings(campaign.space.from_unit(z))):
        c, r, t = settings.values()
        ratio = (2.0, 3.0, 4.0)[i % 3]
        diameter = float(world.diameter_nm(c, r, t)) * ratio**0.3
        campaign.add_run(
            settings, Measurement(diameter, float(world.pdi_pct(c, r, t)), 100), context={"expansion": ratio}
        )
    posterior = campaign.physics_posterior()
    e, e_sd, prior_mean, prior_sd = posterior["expansion_exponent_e"]
    assert (prior_mean, prior_sd) == (0.0, 0.3) and e_sd < 0.1 and abs(e - 0.3) < 3 * e_sd, (e, e_sd)
    surrogates = campaign.fit(context={"expansion": 8.0})  # outside the ratios run: the physics term extrapolates
    assert "expansion_exponent_e" in surrogates.size.names and "expansion_exponent_e" not in surrogates.pdi.names
    settings = {"concentration_mg_ml": 4.0, "flow_ratio": 5.0, "temperature_c": 40.0}
    with torch.no_grad():
        mean, _ = surrogates.size.moments(campaign.space.to_unit(campaign.space.tensor([settings])))
    truth = float(world.diameter_nm(4.0, 5.0, 40.0)) * 8.0**0.3
    assert abs(math.exp(float(mean[0])) / truth - 1) < 0.06


def test_a_stated_aspect_ratio_moves_the_predicted_size_by_the_presets_exponent(campaign: Campaign) -> None:
    """Every run on chips of h/w = 1, then a chip twice as deep: the preset's ``[context_terms] aspect_ratio``
    (the same term ``supraopt fit`` gives an aspect-ratio column) expects SPs 2^c larger before any run on it."""
    exponent, sd = load_terms(campaign.spec.model)[name_key("aspect_ratio")].prior
    assert exponent > 0  # deeper channels, larger droplets (confined droplets: volume ~ h w^2)
    _runs_on(campaign, World.default(), {"aspect_ratio": 1.0}, 6, seed=5)
    settings = {"concentration_mg_ml": 4.0, "flow_ratio": 5.0, "temperature_c": 40.0}
    z = campaign.space.to_unit(campaign.space.tensor([settings]))
    at_1, at_2 = campaign.fit(context={"aspect_ratio": 1.0}), campaign.fit(context={"aspect_ratio": 2.0})
    assert "aspect_exponent_c" in at_2.size.names
    with torch.no_grad():
        mean_1, var_1 = at_1.size.moments(z)
        mean_2, var_2 = at_2.size.moments(z)
    ratio = math.exp(float(mean_2[0] - mean_1[0]))
    assert abs(ratio / 2.0**exponent - 1) < 0.03, (ratio, 2.0**exponent)
    assert float(var_2[0] - var_1[0]) > 0.5 * (sd * math.log(2.0)) ** 2  # the exponent is a prior, never run


def test_without_context_the_model_is_the_plain_one(campaign: Campaign) -> None:
    _runs_on(campaign, World.default(), {}, 3, seed=3)
    surrogates = campaign.fit()
    assert surrogates.context_model is None and surrogates.size.fixed_inputs is None
    assert len(surrogates.size.names) == 6


# --- closed loop and HTTP --------------------------------------------------------------------------------


def test_the_loop_stores_what_the_rig_reports_as_mounted(campaign: Campaign) -> None:
    rig = SimulatedRig(seed=1, mounted={"chip": "A"}, context_worlds={"chip": {"B": {"droplet_k": 1.5}}})
    run_campaign(campaign, rig, budget=1, poll_interval_s=0.0, stop_on_hit=False)
    rig.mount(chip="B")
    run_campaign(campaign, rig, budget=2, poll_interval_s=0.0, stop_on_hit=False)
    experiments = campaign.ledger.experiments()
    assert [e.context for e in experiments] == [{"chip": "A"}, {"chip": "B"}]
    assert campaign.current_context() == {"chip": "B"}
    assert "chip=B" in campaign.fit().size.names[-1]


def test_http_rig_and_rig_serve_carry_context() -> None:
    from _servers import serving

    from supraopt.rigs.http import HttpRig
    from supraopt.rigs.server import create_app

    token = "test-token-0123456789abcdef"
    rig = SimulatedRig(seed=1, mounted={"chip": "A"})
    with serving(create_app(rig, token)) as url:
        client = HttpRig(url, token=token, retries=0)
        assert client.context() == {"chip": "A"}
        client.submit(Proposal("E001", dict(SETTINGS), {"chip": "A", "room_c": 21.0}))
        status = client.poll("E001")
        assert status.result is not None and status.result.context == {"chip": "A"}  # type: ignore[union-attr]
        client.submit(Proposal("E002", dict(SETTINGS)))  # an old client's body: no context field
        assert client.poll("E002").state.value == "done"
        client.close()


def test_benchmark_scenarios_refuse_unknown_names_and_modes(tmp_path: Path) -> None:
    result = invoke("benchmark", "--scenario", "chip-drift", "--out", tmp_path)
    assert_one_line_error(result, "chip-drift", "stationary, chip-swap, batch-swap")
    result = invoke("benchmark", "--scenario", "chip-swap", "--strategy", "plain-bo", "--out", tmp_path)
    assert_one_line_error(result, "plain-bo", "told, not-told")
    assert not list(tmp_path.iterdir())


def test_a_measured_nozzle_width_moves_the_predicted_size_before_any_run_on_it(campaign: Campaign) -> None:
    """A new chip whose nozzle is measured 20 % wider: the droplet law's width enters the physics
    (``[context_terms] nozzle_um``), so the first suggestion for it already expects SPs ~20 % larger."""
    _runs_on(campaign, World.default(), {"nozzle_um": 5.0}, 6, seed=5)
    settings = {"concentration_mg_ml": 4.0, "flow_ratio": 5.0, "temperature_c": 40.0}
    z = campaign.space.to_unit(campaign.space.tensor([settings]))
    fitted_5, fitted_6 = campaign.fit(context={"nozzle_um": 5.0}), campaign.fit(context={"nozzle_um": 6.0})
    with torch.no_grad():
        at_5, var_5 = fitted_5.size.moments(z)
        at_6, var_6 = fitted_6.size.moments(z)
    ratio = math.exp(float(at_6[0] - at_5[0]))
    assert abs(ratio - 1.2) < 0.03, ratio
    # the exponent is a prior (sd 0.15), not a certainty: 6 um was never run, so it adds (0.15 ln 1.2)^2
    assert float(var_6[0] - var_5[0]) > 0.5 * (0.15 * math.log(1.2)) ** 2
