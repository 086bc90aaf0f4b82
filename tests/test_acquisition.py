"""Acquisition: the stable interval probability and what the first suggestions of a campaign look like."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from supraopt.acquisition import MIN_DISTANCE, HitProbability, log_interval_prob, project_to_target
from supraopt.campaign import Campaign
from supraopt.records import PARAMETERS
from supraopt.spec import Target
from supraopt.surrogate import FeasibilityModel, pdi_gp, size_gp

CSPBBR3 = "cspbbr3-flow-focusing"
WINDOW_MG_ML = (2.15, 7.3)


def reference_log_interval(mu: float, sd: float, low: float, high: float) -> float:
    mpmath.mp.dps = 60
    a, b = (mpmath.mpf(low) - mu) / sd, (mpmath.mpf(high) - mu) / sd
    if a > 0:  # upper tail: 1 - ncdf would cancel even at 60 digits, the mirror image does not
        a, b = -b, -a
    return float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))


# --- log_interval_prob -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mu", "sd", "low", "high"),
    [
        (0.0, 1.0, -1.0, 1.0),
        (0.3, 0.5, 0.0, 0.1),
        (6.1, 0.2, math.log(436.5), math.log(463.5)),
        (2.0, 1.0, -1.0, 0.0),
        (-2.0, 1.0, 0.0, 1.0),
        (0.0, 0.01, 0.5, 0.6),
        (0.0, 1.0, 8.0, 9.0),
        (0.0, 1.0, -9.0, -8.0),
        (0.0, 1.0, 40.0, 41.0),
        (0.0, 1.0, -41.0, -40.0),
        (0.0, 1.0, 60.0, 60.001),
        (0.0, 1e-3, 1.0, 2.0),
        (5.0, 1.0, 4.999999, 5.000001),
    ],
)
def test_log_interval_prob_matches_high_precision_reference(mu, sd, low, high):
    value = float(
        log_interval_prob(torch.tensor([mu], dtype=torch.double), torch.tensor([sd], dtype=torch.double), low, high)[0]
    )
    expected = reference_log_interval(mu, sd, low, high)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_log_interval_prob_equals_log_of_cdf_difference_where_that_is_accurate():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(500, generator=g, dtype=torch.double)
    sd = 0.2 + torch.rand(500, generator=g, dtype=torch.double)
    low, high = -0.5, 0.7
    p = torch.special.ndtr((high - mu) / sd) - torch.special.ndtr((low - mu) / sd)
    accurate = p > 1e-6  # the naive difference loses digits (then underflows) further out
    assert int(accurate.sum()) > 400
    value = log_interval_prob(mu, sd, low, high)
    assert torch.allclose(value[accurate], torch.log(p[accurate]), rtol=1e-8, atol=1e-12)
    assert bool(torch.isfinite(value).all())


def test_log_interval_prob_is_finite_and_ordered_far_in_the_tails():
    mu = torch.tensor([-1e4, -500.0, -50.0, 0.0, 50.0, 500.0, 1e4], dtype=torch.double)
    value = log_interval_prob(mu, torch.ones_like(mu), -1.0, 1.0)
    assert bool(torch.isfinite(value).all())
    assert bool((value <= 0).all())
    # symmetric about the interval's centre, and falling away from it
    assert torch.allclose(value, value.flip(0), rtol=1e-9)
    assert bool((value[:4].diff() > 0).all())


def test_log_interval_prob_gradient_is_finite_in_the_tails():
    mu = torch.tensor([-300.0, 0.0, 300.0], dtype=torch.double, requires_grad=True)
    value = log_interval_prob(mu, torch.ones_like(mu), -1.0, 1.0)
    (grad,) = torch.autograd.grad(value.sum(), mu)
    assert bool(torch.isfinite(grad).all())
    assert float(grad[0]) > 0 > float(grad[2])  # pulls the mean towards the interval


# --- the hit probability at the prior --------------------------------------------------------------


def prior_acquisition(preset, space, target_nm=450.0):
    size, pdi = size_gp(preset, space), pdi_gp(preset, space)
    feasibility = FeasibilityModel(preset, space, torch.empty(0, 3, dtype=torch.double), [])
    return HitProbability(size, pdi, feasibility, Target(target_nm), n_particles=100)


def test_projection_lands_the_predicted_size_on_the_target(preset, space):
    acq = prior_acquisition(preset, space)
    z = torch.rand(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.double)
    z[:, 0] = 0.5
    moved = project_to_target(acq, z)
    assert torch.equal(moved[:, 1:], z[:, 1:])  # only the concentration axis moves
    inside = (moved[:, 0] > 0) & (moved[:, 0] < 1)  # not stopped by the bounds
    assert int(inside.sum()) > 32
    mean, _ = acq.size.moments(moved[inside])
    assert torch.allclose(torch.exp(mean.detach()), torch.full_like(mean, 450.0), rtol=0.01)


def test_p_hit_is_highest_near_the_target_size(preset, space):
    acq = prior_acquisition(preset, space)
    z = space.to_unit(torch.tensor([[c, 4.0, 45.0] for c in (1.0, 4.0, 11.0)], dtype=torch.double))
    predictions = acq.predict(z)
    assert predictions[0].diameter_nm < 450.0 < predictions[2].diameter_nm
    p_hit = [p.p_hit for p in predictions]
    assert p_hit[1] > p_hit[0] and p_hit[1] > p_hit[2]
    for p in predictions:
        assert 0.0 <= p.p_hit <= p.p_feasible <= 1.0
        assert p.diameter_sd_nm > 0 and p.pdi_sd_pct > 0 and p.pdi_pct > 0


# --- suggestions on a fresh CsPbBr3 campaign ---------------------------------------------------------


def inside_bounds(settings: dict[str, float], bounds: dict[str, tuple[float, float]]) -> bool:
    return all(bounds[name][0] <= settings[name] <= bounds[name][1] for name in PARAMETERS)


def test_first_suggestion_is_in_the_known_window_and_on_target(campaign):
    [suggestion] = campaign.suggest()
    settings, prediction = suggestion.settings, suggestion.prediction
    assert WINDOW_MG_ML[0] < settings["concentration_mg_ml"] < WINDOW_MG_ML[1]
    assert prediction["diameter_nm"] == pytest.approx(450.0, rel=0.03)
    assert inside_bounds(settings, campaign.spec.bounds)
    assert 0.0 < prediction["p_hit"] <= prediction["p_feasible"] <= 1.0


def test_suggestions_are_deterministic_for_a_seed(tmp_path):
    def first(name: str, seed: int) -> list[dict[str, float]]:
        with Campaign.create(tmp_path / name, CSPBBR3, 450.0, seed=seed) as campaign:
            settings = [s.settings for s in campaign.suggest()]  # the single-point path
            settings += [s.settings for s in campaign.suggest(2)]  # the batch path, with a pending run
            assert all(inside_bounds(s, campaign.spec.bounds) for s in settings)
            return settings

    assert first("a", 7) == first("b", 7)
    first("c", 8)  # another seed may differ, but must be just as valid


def test_a_batch_holds_distinct_settings(campaign):
    batch = campaign.suggest(4)
    assert len(batch) == 4
    assert len({tuple(s.settings[name] for name in PARAMETERS) for s in batch}) == 4
    z = campaign.space.to_unit(campaign.space.tensor([s.settings for s in batch]))
    distances = torch.cdist(z, z) + torch.eye(4, dtype=torch.double)
    assert float(distances.min()) >= MIN_DISTANCE * 0.9  # allow for rounding of the settings
    assert len({s.experiment_id for s in batch}) == 4
    assert all(inside_bounds(s.settings, campaign.spec.bounds) for s in batch)


def test_a_second_suggestion_keeps_away_from_pending_experiments(campaign):
    first = campaign.suggest(2)
    second = campaign.suggest(2)
    space = campaign.space
    z_pending = space.to_unit(space.tensor([s.settings for s in first]))
    z_new = space.to_unit(space.tensor([s.settings for s in second]))
    assert float(torch.cdist(z_new, z_pending).min()) >= MIN_DISTANCE * 0.9
    assert {s.experiment_id for s in first}.isdisjoint(s.experiment_id for s in second)


@pytest.mark.parametrize(
    "target_nm", [60.0, 450.0, 5000.0], ids=["unreachably-small", "reachable", "unreachably-large"]
)
def test_settings_stay_inside_narrow_bounds(tmp_path, target_nm):
    bounds = {"concentration_mg_ml": (3.0, 5.0), "flow_ratio": (2.0, 6.0), "temperature_c": (30.0, 40.0)}
    with Campaign.create(tmp_path / "narrow", CSPBBR3, target_nm, bounds=bounds) as campaign:
        suggestions = campaign.suggest(3)
    for s in suggestions:
        assert inside_bounds(s.settings, bounds), s.settings
        assert all(math.isfinite(v) for v in s.prediction.values())
    predicted = [s.prediction["diameter_nm"] for s in suggestions]
    if target_nm < 100:
        assert max(predicted) < 450.0  # pushed to the small-size corner of the envelope
    if target_nm > 1000:
        assert min(predicted) > 450.0
