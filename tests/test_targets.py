"""Several targets in one campaign, confirmed recipes, knowing when to stop, the temperature window."""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from supraopt.campaign import Campaign
from supraopt.cli import app
from supraopt.errors import SpecError
from supraopt.loop import StopReason, run_campaign
from supraopt.physics import Preset
from supraopt.recipe import same_recipe, target_states
from supraopt.records import Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.space import SearchSpace
from supraopt.spec import CampaignSpec, Target, check_targets, default_bounds, load_spec, parse_spec
from supraopt.surrogate import FeasibilityModel, failure_edge

MODEL = "cspbbr3-flow-focusing"
runner = CliRunner()


def invoke(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --- spec ----------------------------------------------------------------------------------------------


def test_targets_table_round_trips_and_the_old_target_table_still_loads():
    spec = CampaignSpec(
        name="ladder",
        model=MODEL,
        targets=(Target(350.0), Target(450.0, 0.05, 5.0, confirm=2), Target(650.0)),
        bounds=default_bounds(MODEL),
    )
    text = spec.to_toml()
    assert text.count("[[targets]]") == 3
    again = parse_spec(tomllib.loads(text))
    assert again == spec and again.target == Target(350.0)
    old = parse_spec({"model": MODEL, "target": {"diameter_nm": 450.0, "pdi_max_pct": 5.0}})
    assert old.targets == (Target(450.0, 0.03, 5.0),)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        ([{"diameter_nm": 450.0}, {"diameter_nm": 450.0}], "450 nm is given twice"),
        ([{"diameter_nm": 450.0, "confirm": -1}], r"confirm=-1"),
        ([{"diameter_nm": 450.0, "confirm": 1000}], r"confirm=1000"),
        ([{"diameter_nm": 450.0, "confirm": 1.5}], r"confirm=1.5"),
        ([{"diameter_nm": 450.0, "size": 3}], r"unknown key\(s\) in \[\[targets\]\]: size"),
        ([], r"\[\[targets\]\] must be one or more tables"),
    ],
)
def test_bad_targets_are_refused_with_the_value(targets, match):
    with pytest.raises(SpecError, match=match):
        parse_spec({"model": MODEL, "targets": targets})


def test_overlapping_bands_warn_that_one_run_may_serve_both():
    [warning] = check_targets((Target(450.0, 0.05), Target(480.0, 0.05), Target(700.0)))
    assert "450 nm and 480 nm overlap" in warning and "one run may serve both" in warning
    assert check_targets((Target(450.0), Target(550.0))) == []


# --- CLI: init, target add, status, recipe --------------------------------------------------------------


def test_init_with_several_targets_then_target_add(tmp_path):
    directory = tmp_path / "ladder"
    result = invoke("init", directory, "--target-nm", 350, "--target-nm", 450, "--target-nm", 550, "--pdi-max", 5)
    assert result.exit_code == 0, result.output
    spec = load_spec(directory)
    assert [t.diameter_nm for t in spec.targets] == [350.0, 450.0, 550.0]
    assert {t.pdi_max_pct for t in spec.targets} == {5.0}

    result = invoke("target", "add", directory, 650)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert [t.diameter_nm for t in load_spec(directory).targets] == [350.0, 450.0, 550.0, 650.0]

    result = invoke("target", "add", directory, 20000)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "outside what the model expects" in result.output
    one_line_error(invoke("target", "add", directory, 450), "450 nm is given twice")
    assert len(load_spec(directory).targets) == 5  # the refused one was not written

    status = json.loads(invoke("status", directory, "--json").output)
    assert [t["target"]["diameter_nm"] for t in status["targets"]] == [350.0, 450.0, 550.0, 650.0, 20000.0]
    assert not any(t["hit"] for t in status["targets"])


def test_a_running_campaign_picks_up_an_added_target(tmp_path):
    with Campaign.create(tmp_path / "c", MODEL, 450.0) as running, Campaign.open(tmp_path / "c") as other:
        assert not running.reload_targets()
        assert other.add_target(Target(650.0)) == []
        assert running.reload_targets() and [t.diameter_nm for t in running.spec.targets] == [450.0, 650.0]


def test_init_refuses_duplicates_and_bad_confirm(tmp_path):
    one_line_error(invoke("init", tmp_path / "a", "--target-nm", 450, "--target-nm", 450), "450 nm is given twice")
    one_line_error(invoke("init", tmp_path / "b", "--confirm", -2), "confirm=-2")
    one_line_error(invoke("init", tmp_path / "c", "--confirm", 500), "confirm=500")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = invoke("init", tmp_path / "d", "--target-nm", 450, "--target-nm", 460)
    assert result.exit_code == 0 and "one run may serve both" in result.output


# --- recipes and confirmation (from the ledger alone) ----------------------------------------------------

S1 = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}
S2 = {"concentration_mg_ml": 5.0, "flow_ratio": 4.0, "temperature_c": 40.0}


def measured(d: float, pdi: float = 4.0) -> Measurement:
    return Measurement(diameter_nm=d, pdi_pct=pdi, n_particles=150)


def test_a_target_is_confirmed_by_clean_repeats_only(tmp_path):
    with Campaign.create(tmp_path / "c", MODEL, [450.0, 600.0], confirm=2) as campaign:
        campaign.add_run(S1, measured(452.0))
        campaign.add_run(S1, measured(447.0))
        [t450, t600] = target_states(campaign.spec.targets, campaign.ledger.experiments())
        assert t450.hit and not t450.confirmed and t450.repeats_wanted == 1 and not t600.hit
        campaign.add_run(S1, measured(470.0))  # a repeat misses: the recipe is no longer repeated blindly
        [t450, _] = target_states(campaign.spec.targets, campaign.ledger.experiments())
        assert t450.recipe is not None and t450.recipe.misses == 1 and t450.repeats_wanted == 0
        for _ in range(3):
            campaign.add_run(S2, measured(455.0))
        [t450, t600] = target_states(campaign.spec.targets, campaign.ledger.experiments())
        assert t450.confirmed and t450.recipe is not None and t450.recipe.settings == S2
        assert t450.recipe.hits == 3 and not t600.done


def test_after_a_hit_confirm_proposes_the_recipe_and_the_card_shows_it(tmp_path):
    with Campaign.create(tmp_path / "c", MODEL, 450.0, confirm=2) as campaign:
        campaign.add_run({**S1, "concentration_mg_ml": 2.0}, measured(380.0))
        hit_id = campaign.add_run(S1, measured(451.0))
        [suggestion] = campaign.suggest()  # the recipe again, perhaps re-centred or nudged
        assert same_recipe(suggestion.settings, S1) and suggestion.prediction["repeat"] == 1.0
        [card] = campaign.recipes()
        # the card gives the setting the repeat goes to, not the point that happened to hit
        assert card.settings == suggestion.settings and card.state.recipe is not None
        assert card.state.recipe.runs == [hit_id]
        assert card.p_hit is not None and 0 < card.p_hit < 1 and card.diameter_nm is not None
    result = invoke("recipe", tmp_path / "c", "--json")
    assert result.exit_code == 0, result.output
    [data] = json.loads(result.output)
    assert (
        data["settings"] == suggestion.settings
        and data["backing_runs"] == [hit_id]
        and data["status"] == "hit, not confirmed"
    )


def test_one_model_serves_several_targets_and_a_batch_spreads_over_them(tmp_path):
    with Campaign.create(tmp_path / "c", MODEL, [350.0, 600.0]) as campaign:
        campaign.add_run(S1, measured(455.0))
        suggestions = campaign.suggest(2)
        aims = {s.prediction["target_nm"] for s in suggestions}
        assert aims == {350.0, 600.0}
        for s in suggestions:  # each aims at the size it is predicted to make
            assert abs(math.log(s.prediction["diameter_nm"] / s.prediction["target_nm"])) < 0.1
        first = suggestions[0].prediction["target_nm"]
        campaign.record(suggestions[0].experiment_id, measured(first))
        experiments = campaign.ledger.experiments()
        goals = campaign.goals(campaign.assess(experiments), campaign.fitted(experiments))
        assert [g.hit.target.diameter_nm for g in goals.goals] == [350.0 if first == 600.0 else 600.0]


# --- knowing when to stop -------------------------------------------------------------------------------


def test_out_of_reach_only_when_the_data_say_so(tmp_path):
    with Campaign.create(tmp_path / "c", MODEL, [450.0]) as campaign:
        for c, d in ((3.0, 400.0), (4.0, 430.0), (5.0, 475.0)):
            campaign.add_run({**S1, "concentration_mg_ml": c}, measured(d, 5.0))
        reachable = campaign.assess()
        assert reachable.unreachable() == [] and reachable.outlooks[0].p_any_hit > 0.05
    with Campaign.create(tmp_path / "d", MODEL, [450.0], pdi_max_pct=1.5) as campaign:
        for t in (25.0, 40.0, 55.0):
            for c, d in ((3.0, 400.0), (4.0, 440.0), (5.0, 470.0)):
                campaign.add_run({"concentration_mg_ml": c, "flow_ratio": 4.0, "temperature_c": t}, measured(d, 5.0))
        verdict = campaign.assess()
        assert verdict.unreachable() == [0]
        [message] = verdict.messages()
        assert "450 nm" in message and "out of reach" in message and "lowest PDI reachable at 450 nm" in message


class FloorRig:
    """Sizes follow the mass balance; the PDI never goes under 5 %."""

    def limits(self) -> RigLimits:
        return RigLimits(bounds=dict(default_bounds(MODEL)))

    def submit(self, proposal: Proposal) -> None:
        self.runs = {**getattr(self, "runs", {}), proposal.experiment_id: proposal.settings}

    def poll(self, experiment_id: str) -> RunStatus:
        s = self.runs[experiment_id]
        d = 440.0 * (s["concentration_mg_ml"] / 4.0) ** (1 / 3) * (s["flow_ratio"] / 4.0) ** -0.3
        result = measured(d, 5.0 + 0.02 * abs(s["temperature_c"] - 40))
        return RunStatus(experiment_id, RunState.DONE, result)

    def cancel(self, experiment_id: str) -> None:
        pass


def test_run_stops_when_the_spec_is_out_of_reach(tmp_path):
    with Campaign.create(tmp_path / "c", MODEL, 450.0, pdi_max_pct=1.5) as campaign:
        for t in (25.0, 55.0):
            campaign.add_run({**S1, "temperature_c": t}, measured(440.0, 5.3))
        summary = run_campaign(campaign, FloorRig(), budget=15, poll_interval_s=0.0)  # type: ignore[arg-type]
    assert summary.reason is StopReason.OUT_OF_REACH and summary.experiments_used <= 8, summary
    assert "lowest PDI reachable" in summary.message


# --- the temperature window ------------------------------------------------------------------------------


def test_heat_failures_teach_a_temperature_window(space: SearchSpace, preset: Preset):
    assert failure_edge("coil boiling") == "heat" and failure_edge("leak at high temperature") == "heat"
    assert failure_edge("pump stalled") == "other"
    ok = torch.tensor([[4.0, 4.0, t] for t in (25.0, 30.0, 35.0, 40.0)], dtype=torch.double)
    plain = FeasibilityModel(preset, space, ok, [])
    assert plain.temperature is None and plain.edge_temperature_c() is None
    hot = [(torch.tensor([4.0, 4.0, t], dtype=torch.double), "coil boiling") for t in (52.0, 60.0)]
    model = FeasibilityModel(preset, space, ok, hot)
    edge = model.edge_temperature_c()
    assert edge is not None and 40.0 < edge < 52.0
    points = space.to_unit(torch.tensor([[3.0, 6.0, 35.0], [3.0, 6.0, 58.0]], dtype=torch.double))
    p_cool, p_hot = model.prob(points).tolist()
    assert p_cool > 0.8 and p_hot < 0.15  # far from the failed points: the window, not the penalty
    unexplained = [(torch.tensor([4.0, 4.0, t], dtype=torch.double), "no usable particles") for t in (50.0, 55.0, 60.0)]
    assert FeasibilityModel(preset, space, ok, unexplained).edge_temperature_c() is not None
    cold = [(torch.tensor([4.0, 4.0, 22.0], dtype=torch.double), "no usable particles")]
    assert FeasibilityModel(preset, space, ok, cold).temperature is None
