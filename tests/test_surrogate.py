"""Physics-mean GPs (scale choice, parameter posterior, physics kernel) and the feasibility model."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch

from supraopt import physics
from supraopt.physics import PDI_PARAMETERS, SIZE_PARAMETERS, Preset
from supraopt.space import SearchSpace
from supraopt.surrogate import (
    ExactModel,
    FeasibilityModel,
    failure_edge,
    fit_map,
    minimise,
    pdi_gp,
    pdi_noise_var,
    size_gp,
    size_noise_var,
)

LOG_PHI = SIZE_PARAMETERS.index("log_phi_inorg")
LOG_K = SIZE_PARAMETERS.index("log_droplet_k")
DELTA = SIZE_PARAMETERS.index("exponent_delta")


def physical(rows: list[tuple[float, float, float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.double)


def random_unit(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.double)


# --- MAP fitting ------------------------------------------------------------------------------------


def test_minimise_finds_the_minimum_of_a_curved_valley():
    def rosenbrock(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        a, b = float(x[0]), float(x[1])
        value = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        grad = torch.tensor([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], dtype=torch.double)
        return value, grad

    best = minimise(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.double), maxiter=200)
    assert torch.allclose(best, torch.ones(2, dtype=torch.double), atol=1e-3)


def test_minimise_steps_around_where_the_objective_is_undefined():
    def walled(x: torch.Tensor) -> tuple[float, torch.Tensor]:  # (x - 2)^2, undefined beyond x = 2.5
        if float(x[0]) > 2.5:
            return math.inf, torch.zeros(1, dtype=torch.double)
        return float((x[0] - 2) ** 2), 2 * (x - 2)

    best = minimise(walled, torch.tensor([-10.0], dtype=torch.double), maxiter=50)
    assert abs(float(best[0]) - 2.0) < 1e-3
    assert minimise(walled, torch.tensor([3.0], dtype=torch.double), maxiter=50).item() == 3.0  # undefined start


def test_fit_map_recovers_a_long_lengthscale_and_lowers_the_objective():
    z = torch.linspace(0, 1, 30, dtype=torch.double).unsqueeze(-1)
    y = torch.sin(2 * z.squeeze(-1))  # smooth on the unit interval: a lengthscale well above the start
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5)).double()
    kernel.base_kernel.lengthscale = 0.05
    model = ExactModel(z, y, likelihood, gpytorch.means.ConstantMean().double(), kernel)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)

    def loss() -> float:
        model.train()
        with torch.no_grad():
            return float(-mll(model(z), y))

    before = loss()
    fit_map(model)
    assert not model.training  # left ready to predict
    assert loss() < before - 0.5
    assert kernel.base_kernel.lengthscale.item() > 0.3


# --- scale choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fn", "names"),
    [(size_gp, physics.log_sp_diameter_nm, SIZE_PARAMETERS), (pdi_gp, physics.log_pdi_pct, PDI_PARAMETERS)],
    ids=["size", "pdi"],
)
def test_prior_mean_is_the_physics_at_physical_settings(preset, space, make, fn, names):
    """Pins the scale choice: unit-cube inputs, outcomes on their physical log scale (not standardised)."""
    gp = make(preset, space)
    x = physical([(0.5, 1.0, 20.0), (2.15, 3.0, 25.0), (4.0, 4.0, 50.0), (12.0, 20.0, 80.0)])
    z = space.to_unit(x)
    assert float(z.min()) >= -1e-12 and float(z.max()) <= 1 + 1e-12
    mean, var = gp.moments(z)
    theta, _ = preset.prior(names)
    assert torch.allclose(mean, fn(x, theta, preset), atol=1e-10)
    assert bool((var > 0).all())


def test_prior_mean_is_in_log_nanometres(preset, space):
    gp = size_gp(preset, space)
    mean, _ = gp.moments(space.to_unit(physical([(4.0, 4.0, 25.0)])))
    assert 100.0 < math.exp(float(mean[0])) < 2000.0  # a log diameter in nm, not a standardised value


def test_fitted_gp_predicts_on_the_physical_log_scale(preset, space):
    """With data far from the physics prior the posterior mean tracks the data, unstandardised."""
    gp = size_gp(preset, space)
    z = random_unit(6, seed=3)
    truth, _ = preset.prior(SIZE_PARAMETERS)
    y = physics.log_sp_diameter_nm(space.from_unit(z), truth, preset) + 0.2  # all SPs 22 % larger
    gp.fit(z, y, torch.full_like(y, 1e-4))
    with gpytorch.settings.debug(False):  # reading the posterior at the training inputs on purpose
        mean, var = gp.moments(z)
    assert torch.allclose(mean, y, atol=0.03)
    assert bool((var.sqrt() < 0.05).all())
    # the model's mean function is still the physics in physical units (inputs mapped back from the cube)
    assert gp.model is not None
    with torch.no_grad():
        assert torch.allclose(gp.model.mean_module(z), physics.log_sp_diameter_nm(space.from_unit(z), truth, preset))


def test_fit_with_no_data_keeps_the_prior(preset, space):
    gp = size_gp(preset, space)
    empty = torch.empty(0, 3, dtype=torch.double)
    gp.fit(empty, torch.empty(0, dtype=torch.double), torch.empty(0, dtype=torch.double))
    assert gp.model is None
    mean, cov = gp.parameter_posterior(empty, torch.empty(0, dtype=torch.double))
    prior_mean, prior_sd = preset.prior(SIZE_PARAMETERS)
    assert torch.allclose(mean, prior_mean) and torch.allclose(cov.diagonal().sqrt(), prior_sd)


# --- parameter posterior ---------------------------------------------------------------------------


def test_parameter_posterior_moves_toward_the_truth(preset, space):
    prior_mean, prior_sd = preset.prior(SIZE_PARAMETERS)
    truth = prior_mean.clone()
    truth[DELTA] = 0.15
    truth[LOG_PHI] = prior_mean[LOG_PHI] - 0.3
    z = random_unit(12, seed=0)
    y = physics.log_sp_diameter_nm(space.from_unit(z), truth, preset)
    gp = size_gp(preset, space).fit(z, y, torch.full_like(y, 0.015**2))
    mean, cov = gp.parameter_posterior(z, y)
    sd = cov.diagonal().clamp_min(0).sqrt()

    # the exponent is identifiable: it lands near the truth and is far better known than a priori
    assert abs(float(mean[DELTA]) - 0.15) < 0.3 * 0.15
    assert float(sd[DELTA]) < 0.5 * float(prior_sd[DELTA])
    # log_phi only enters with log_k as one offset (k / phi^(1/3)): it moves the right way, and the
    # identifiable combination lands on the truth with a much smaller sd than its prior
    assert float(mean[LOG_PHI]) < float(prior_mean[LOG_PHI])
    assert float(sd[LOG_PHI]) < float(prior_sd[LOG_PHI]) * gp.inflation**0.5
    w = torch.zeros(len(SIZE_PARAMETERS), dtype=torch.double)
    w[LOG_K], w[LOG_PHI] = 1.0, -1.0 / 3.0
    combo_prior_sd = float((w**2 * prior_sd**2).sum().sqrt())
    combo_sd = float((w @ cov @ w).clamp_min(0).sqrt())
    assert abs(float(w @ mean) - float(w @ truth)) < 0.05
    assert abs(float(w @ prior_mean) - float(w @ truth)) > 0.09  # the prior was off: the data moved it
    assert combo_sd < 0.5 * combo_prior_sd
    # data the prior explains barely widen it, and every posterior sd is at most its (widened) prior sd
    assert 1.0 <= gp.inflation < 1.2
    assert bool((sd <= prior_sd * gp.inflation**0.5 * (1 + 1e-9)).all())


@pytest.mark.parametrize("n", [4, 8])
def test_data_far_outside_the_prior_widen_it_and_move_the_exponent(preset, space, n):
    """A rig whose droplets grow with the flow ratio (exponent a = -0.2 where the prior says 0.33 ± 0.08,
    6.6 sd away): the learned inflation widens the physics prior, so the data set the exponent."""
    prior_mean, _ = preset.prior(SIZE_PARAMETERS)
    a = SIZE_PARAMETERS.index("droplet_exponent_a")
    truth = prior_mean.clone()
    truth[a] = -0.2
    z = random_unit(n, seed=1)
    y = physics.log_sp_diameter_nm(space.from_unit(z), truth, preset)
    gp = size_gp(preset, space).fit(z, y, torch.full_like(y, 0.015**2))
    mean, _ = gp.parameter_posterior(z, y)
    assert gp.inflation > 2.0
    assert abs(float(mean[a]) + 0.2) < 0.05
    # and it predicts the trend where it has no run: at a flow ratio twice the largest seen
    far = z[z[:, 1].argmax()].clone().unsqueeze(0)
    far_x = space.from_unit(far)
    far_x[0, 1] = min(2 * float(far_x[0, 1]), space.bounds["flow_ratio"][1])
    far = space.to_unit(far_x)
    with torch.no_grad():
        mu, var = gp.moments(far)
    truth_far = physics.log_sp_diameter_nm(far_x, truth, preset)
    assert abs(float(mu[0] - truth_far[0])) < 0.03 + 2 * float(var[0]) ** 0.5


def test_parameter_posterior_covariance_is_symmetric_positive(preset, space):
    prior_mean, _ = preset.prior(SIZE_PARAMETERS)
    z = random_unit(5, seed=4)
    y = physics.log_sp_diameter_nm(space.from_unit(z), prior_mean, preset)
    gp = size_gp(preset, space).fit(z, y, torch.full_like(y, 0.015**2))
    _, cov = gp.parameter_posterior(z, y)
    assert torch.allclose(cov, cov.T)
    assert float(torch.linalg.eigvalsh(cov).min()) > -1e-10


# --- physics kernel --------------------------------------------------------------------------------


def _sd_after_one_run(preset: Preset, space: SearchSpace, factor: float) -> tuple[float, float]:
    """Predictive sd of log size at c × factor and at r × factor from one run at the reference point."""
    gp = size_gp(preset, space)
    c0, r0, t0 = preset.reference_concentration_mg_ml, preset.reference_flow_ratio, preset.reference_temperature_c
    z0 = space.to_unit(physical([(c0, r0, t0)]))
    theta, _ = preset.prior(SIZE_PARAMETERS)
    y0 = physics.log_sp_diameter_nm(space.from_unit(z0), theta, preset)
    gp.fit(z0, y0, torch.full_like(y0, 0.015**2))
    _, var = gp.moments(space.to_unit(physical([(c0, r0, t0), (c0 * factor, r0, t0), (c0, r0 * factor, t0)])))
    sd = var.sqrt().tolist()
    assert sd[0] < 0.03  # pinned at the run itself
    return sd[1], sd[2]


def test_sd_grows_more_along_flow_ratio_when_its_exponent_is_the_uncertain_one(preset, space):
    # the mass balance fixes the concentration exponent (tight delta); the droplet exponent a is uncertain
    tight_delta = preset.with_priors({"exponent_delta": (0.0, 0.01), "droplet_exponent_a": (0.33, 0.1)})
    sd_c, sd_r = _sd_after_one_run(tight_delta, space, factor=2.5)
    assert sd_r > 1.5 * sd_c


def test_physics_kernel_follows_whichever_exponent_is_uncertain(preset, space):
    # swapping the uncertainties swaps the ordering: the kernel, not the geometry, carries it
    tight_a = preset.with_priors({"exponent_delta": (0.0, 0.1), "droplet_exponent_a": (0.33, 0.01)})
    sd_c, sd_r = _sd_after_one_run(tight_a, space, factor=2.5)
    assert sd_c > 1.5 * sd_r


def test_sd_grows_away_from_a_run_in_every_direction(preset, space):
    gp = size_gp(preset, space)
    z0 = torch.full((1, 3), 0.5, dtype=torch.double)
    theta, _ = preset.prior(SIZE_PARAMETERS)
    y0 = physics.log_sp_diameter_nm(space.from_unit(z0), theta, preset)
    gp.fit(z0, y0, torch.full_like(y0, 0.015**2))
    for dim in range(3):
        line = z0.repeat(5, 1)
        line[:, dim] = torch.linspace(0.5, 1.0, 5, dtype=torch.double)
        sd = gp.moments(line)[1].detach().sqrt()
        assert bool((sd.diff() > 0).all()), dim


def test_noise_variances_shrink_with_more_particles():
    pdi = torch.tensor([5.0, 5.0], dtype=torch.double)
    n = torch.tensor([20.0, 200.0], dtype=torch.double)
    size_var = size_noise_var(pdi, n)
    assert float(size_var[1]) < float(size_var[0])
    assert float(pdi_noise_var(n)[1]) < float(pdi_noise_var(n)[0])
    # more polydisperse samples give a noisier mean
    assert float(size_noise_var(torch.tensor([15.0]), torch.tensor([50.0]))[0]) > float(
        size_noise_var(torch.tensor([3.0]), torch.tensor([50.0]))[0]
    )


# --- feasibility -----------------------------------------------------------------------------------

BELOW = [1.5, 2.0, 2.5, 3.0]  # mg/mL
ABOVE = [6.5, 7.0, 8.0, 9.0]
NO_RUNS = torch.empty(0, 3, dtype=torch.double)


def feasibility(preset, space, failures=(), ok=()):
    # failures at a flow ratio and temperature far from where P(feasible) is read
    fails = [(physical([(c, 10.0, 25.0)])[0], reason) for c, reason in failures]
    runs = physical([(c, 4.0, 40.0) for c in ok]) if ok else NO_RUNS
    return FeasibilityModel(preset, space, runs, fails)


def p_feasible(model, space, concentrations):
    z = space.to_unit(physical([(c, 2.0, 60.0) for c in concentrations]))
    return model.prob(z)


def test_prior_window_matches_the_preset(preset, space):
    model = feasibility(preset, space)
    low, high = model.edges_mg_ml()
    assert low == pytest.approx(preset.window_mg_ml[0], rel=0.02)
    assert high == pytest.approx(preset.window_mg_ml[1], rel=0.02)
    p = p_feasible(model, space, [0.6, 4.0, 11.5])
    assert float(p[1]) > 0.8 and float(p[0]) < 0.1 and float(p[2]) < 0.3


def test_unstable_droplets_at_high_c_lower_p_above_not_below(preset, space):
    base = feasibility(preset, space)
    failed = feasibility(preset, space, [(6.0, "droplets unstable")])
    assert torch.all(p_feasible(failed, space, ABOVE) < 0.5 * p_feasible(base, space, ABOVE))
    assert torch.allclose(p_feasible(failed, space, BELOW), p_feasible(base, space, BELOW), rtol=0.05)
    assert failed.edges_mg_ml()[1] < 6.0 < base.edges_mg_ml()[1]
    assert failed.edges_mg_ml()[0] == pytest.approx(base.edges_mg_ml()[0])


def test_hollow_at_low_c_lowers_p_below_not_above(preset, space):
    base = feasibility(preset, space)
    failed = feasibility(preset, space, [(3.0, "hollow particles")])
    assert torch.all(p_feasible(failed, space, BELOW) < 0.5 * p_feasible(base, space, BELOW))
    assert torch.allclose(p_feasible(failed, space, ABOVE), p_feasible(base, space, ABOVE), rtol=0.05)
    assert failed.edges_mg_ml()[0] > 3.0 > base.edges_mg_ml()[0]


@pytest.mark.parametrize(("c", "edge_reason"), [(6.0, "droplets unstable"), (3.0, "hollow particles")])
def test_unknown_failure_reason_moves_the_nearer_edge_gently(preset, space, c, edge_reason):
    base = feasibility(preset, space)
    unknown = feasibility(preset, space, [(c, "the vial fell over")])
    named = feasibility(preset, space, [(c, edge_reason)])
    side = 1 if edge_reason == "droplets unstable" else 0
    moved = [abs(f.edges_mg_ml()[side] - base.edges_mg_ml()[side]) for f in (unknown, named)]
    assert 0 < moved[0] < moved[1]  # the same edge, less far than for a named reason
    assert unknown.edges_mg_ml()[1 - side] == pytest.approx(base.edges_mg_ml()[1 - side])


def test_a_flow_failure_leaves_the_window_alone_but_is_avoided_locally(preset, space):
    base = feasibility(preset, space)
    jetting = feasibility(preset, space, [(4.0, "jetting, no droplets")])
    assert jetting.edges_mg_ml() == pytest.approx(base.edges_mg_ml())
    at_the_failure = space.to_unit(physical([(4.0, 10.0, 25.0)]))
    assert float(jetting.prob(at_the_failure)[0]) < 0.2 * float(base.prob(at_the_failure)[0])


def test_successes_push_the_edges_outward(preset, space):
    base = feasibility(preset, space)
    widened = feasibility(preset, space, ok=[1.5, 10.0])
    assert widened.edges_mg_ml()[0] < 1.5 < base.edges_mg_ml()[0]
    assert widened.edges_mg_ml()[1] > 10.0 > base.edges_mg_ml()[1]
    assert torch.all(p_feasible(widened, space, [1.6, 9.5]) > p_feasible(base, space, [1.6, 9.5]))


def test_a_failure_penalises_its_own_neighbourhood(preset, space):
    # an unexplained failure in the middle of the window: the point itself becomes unattractive
    z_fail = space.to_unit(physical([(4.0, 10.0, 25.0)]))
    model = FeasibilityModel(preset, space, NO_RUNS, [(physical([(4.0, 10.0, 25.0)])[0], "droplets unstable")])
    base = feasibility(preset, space)
    assert float(model.prob(z_fail)[0]) < 0.2 * float(base.prob(z_fail)[0])


def test_p_feasible_is_a_probability(preset, space):
    model = feasibility(preset, space, [(6.0, "unstable"), (2.5, "hollow")], ok=[4.0])
    p = model.prob(torch.rand(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.double))
    assert bool(((p >= 0) & (p <= 1)).all())


@pytest.mark.parametrize(
    ("reason", "edge"),
    [
        ("droplets unstable", "high"),
        ("Droplets MERGE in the coil", "high"),
        ("channel clogged", "high"),
        ("jetting, no droplets", "flow"),
        ("pressure spike in the coil", "flow"),
        ("the heater boiled the toluene", "heat"),
        ("a seal leaks at high temperature", "heat"),
        ("leak at the fitting", "other"),
        ("SPs sediment", "high"),
        ("hollow particles", "low"),
        ("broken shells", "low"),
        ("SPs cream", "low"),
        ("too dilute", "low"),
        ("pump stopped", "other"),
        ("the vial fell over", None),
        ("unstable and hollow", None),
        ("", None),
    ],
)
def test_failure_edge_mapping(reason, edge):
    assert failure_edge(reason) == edge


def test_physics_kernel_never_reuses_the_features_of_another_tensor(preset, space):
    """The Jacobian cache (for training inputs) must not hand one tensor's features to another."""
    kernel = size_gp(preset, space).prior_covar_module.kernels[0]
    first = random_unit(5, 1)
    expected_second = physics.jacobian(
        kernel.fn, space.from_unit(random_unit(5, 2)), kernel.theta_lin
    )  # computed before any caching
    assert torch.equal(kernel.features(first), kernel.features(first))
    del first  # its memory may now be handed to the next tensor of the same size
    second = random_unit(5, 2)
    assert torch.allclose(kernel.features(second), expected_second)
    second.add_(0.1)  # changed in place: the cache must notice
    assert torch.allclose(
        kernel.features(second), physics.jacobian(kernel.fn, space.from_unit(second), kernel.theta_lin)
    )


def test_jetting_at_low_flow_ratio_closes_the_low_flow_side(preset, space):
    """Droplet-generation failures bound a window in flow ratio, on the side away from the runs that worked."""
    ok = physical([(4.0, 8.0, 40.0), (4.0, 10.0, 40.0)])
    jetting = [(physical([(4.0, r, 40.0)])[0], "jetting, no droplets") for r in (4.5, 4.0)]
    base, once, twice = (FeasibilityModel(preset, space, ok, jetting[:k]) for k in range(3))

    def p_at(model, r):  # read away from the failures' own neighbourhood
        return float(model.prob(space.to_unit(physical([(4.0, r, 70.0)])))[0])

    assert p_at(twice, 2.5) < p_at(once, 2.5) < 0.8 * p_at(base, 2.5)
    assert p_at(twice, 2.5) < 0.2 * p_at(base, 2.5)  # two failures: the low side is closed
    assert p_at(twice, 9.0) == pytest.approx(p_at(base, 9.0), rel=0.02)  # the side that worked is not
    assert twice.edges_mg_ml() == pytest.approx(base.edges_mg_ml())  # the concentration window is untouched
    assert min(p_at(base, 1.2), p_at(base, 19.0)) > 0.85  # no failures: the whole envelope is open
