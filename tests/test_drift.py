"""Unannounced changes of the rig (supraopt/drift.py): found when the sizes jump, invisible when they do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from supraopt.campaign import Campaign, ModelOptions
from supraopt.drift import DRIFT, change_point, mark
from supraopt.records import Measurement
from supraopt.rigs.simulated import World


def _runs(campaign: Campaign, world: World, count: int, seed: int, noise: float = 0.01) -> None:
    """``count`` runs at random settings, sizes with ``noise`` relative scatter, no context stated."""
    rng = np.random.default_rng(seed)
    z = torch.tensor(rng.uniform(0.25, 0.75, (count, 3)), dtype=torch.double)
    for settings in campaign.space.settings(campaign.space.from_unit(z)):
        c, r, t = settings.values()
        diameter = float(world.diameter_nm(c, r, t)) * math.exp(noise * rng.standard_normal())
        campaign.add_run(settings, Measurement(diameter, float(world.pdi_pct(c, r, t)), 100))


def _size_fit(campaign: Campaign):
    done = campaign.ledger.experiments()
    z = campaign.space.to_unit(campaign.space.tensor([e.settings for e in done]))
    y = torch.log(torch.tensor([e.measurement.diameter_nm for e in done], dtype=torch.double))
    campaign.options = ModelOptions(drift=False)
    return campaign.fit().size, z, y


def test_the_scan_finds_a_jump_where_it_happened_and_none_without_one(campaign: Campaign) -> None:
    world = World.default()
    _runs(campaign, world, 7, seed=1)
    gp, z, y = _size_fit(campaign)
    steady = change_point(gp, z, y, 0.08)
    assert steady is not None and steady.none > 0.8, steady
    _runs(campaign, World.from_options({"droplet_k": world.droplet_k * 1.18}, world), 2, seed=1)  # repeats
    gp, z, y = _size_fit(campaign)
    jumped = change_point(gp, z, y, 0.08)
    assert jumped is not None and jumped.index == 7 and jumped.none < 0.01, jumped


def test_a_campaign_not_told_of_a_new_chip_learns_it_from_the_sizes(campaign: Campaign) -> None:
    world = World.default()
    swapped = World.from_options({"droplet_k": world.droplet_k * 0.85}, world)
    _runs(campaign, world, 6, seed=3)
    _runs(campaign, swapped, 2, seed=3)  # the first two recipes again, on the new chip
    probe = campaign.ledger.experiments()[0].settings
    z = campaign.space.to_unit(campaign.space.tensor([probe]))
    truth_new = float(swapped.diameter_nm(*probe.values()))

    def predicted(options: ModelOptions) -> float:
        campaign.options = options
        surrogates = campaign.fit()
        with torch.no_grad():
            return math.exp(float(surrogates.size.moments(z)[0][0]))

    assert abs(predicted(ModelOptions(drift=False)) / truth_new - 1) > 0.06  # the old chip's runs pull it back
    assert abs(predicted(ModelOptions()) / truth_new - 1) < 0.04
    levels = [c[DRIFT] for c in campaign.fit().run_contexts]
    assert levels == ["from E001"] * 6 + ["from E007"] * 2
    assert "log_droplet_k" in campaign.physics_posterior()  # the report still works with the stretches


def test_without_a_change_the_suggestions_are_those_of_the_model_without_drift(campaign: Campaign) -> None:
    _runs(campaign, World.default(), 5, seed=5, noise=0.03)
    with_drift = campaign.fit()
    assert with_drift.context_model is None and DRIFT not in with_drift.context
    [(settings, prediction)] = campaign.propose(1)
    campaign.options = ModelOptions(drift=False)
    campaign._fit_cache = campaign._assess_cache = None
    [(plain_settings, plain_prediction)] = campaign.propose(1)
    assert settings == plain_settings
    assert prediction["p_hit"] == pytest.approx(plain_prediction["p_hit"], rel=1e-4)  # refits agree to ~1e-6


def test_mark_labels_each_stretch_by_its_first_run() -> None:
    marked = mark([{}, {"chip": "A"}, {}, {}], [2], ["E1", "E2", "E3", "E4"])
    assert [m[DRIFT] for m in marked] == ["from E1", "from E1", "from E3", "from E3"]
    assert marked[1]["chip"] == "A"
