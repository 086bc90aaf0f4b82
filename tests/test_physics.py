"""The physics prior: mass balance, droplet law, polydispersity law, Jacobians and presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from supraopt import physics
from supraopt.errors import SpecError
from supraopt.physics import PDI_PARAMETERS, SIZE_PARAMETERS, Preset
from supraopt.records import PARAMETERS
from supraopt.spec import MODELS_DIR

PRESET_NAMES = sorted(p.stem for p in MODELS_DIR.glob("*.toml"))


def settings(rows: list[tuple[float, float, float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.double)


def size_theta(preset: Preset, **changes: float) -> torch.Tensor:
    mean, _ = preset.prior(SIZE_PARAMETERS)
    for name, value in changes.items():
        mean[SIZE_PARAMETERS.index(name)] = value
    return mean


# --- mass balance --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("concentration", "droplet_um", "paper_nm"),
    [(2.15, 3.1, 280.0), (7.3, 4.78, 700.0)],
    ids=["low-edge", "high-edge"],
)
def test_cspbbr3_preset_reproduces_paper_extremes(preset, concentration, droplet_um, paper_nm):
    theta = size_theta(preset)
    x = settings([(concentration, preset.reference_flow_ratio, preset.reference_temperature_c)])
    log_drop = torch.log(torch.tensor([droplet_um], dtype=torch.double))
    diameter = math.exp(float(physics.log_sp_from_droplet(x, log_drop, theta, preset)[0]))
    assert abs(diameter / paper_nm - 1.0) < 0.15


def test_cspbbr3_prior_droplet_law_puts_paper_droplets_inside_the_flow_bounds(preset):
    # d_drop = k w r^-a  =>  r = (k w / d)^(1/a); the paper's 3.1-4.78 µm must be reachable
    log_k, a = preset.priors["log_droplet_k"][0], preset.priors["droplet_exponent_a"][0]
    low, high = preset.bounds["flow_ratio"]
    for droplet_um in (3.1, 4.78):
        ratio = math.exp((log_k + math.log(preset.nozzle_um) - math.log(droplet_um)) / a)
        assert low <= ratio <= high
        x = settings([(4.0, ratio, preset.reference_temperature_c)])
        assert math.exp(float(physics.log_droplet_um(x, size_theta(preset), preset)[0])) == pytest.approx(droplet_um)


def test_sp_volume_is_linear_in_concentration_times_droplet_volume():
    c = torch.tensor([0.5, 1.0, 2.15, 4.0, 7.3, 12.0], dtype=torch.double)
    d = torch.tensor([2.0, 3.1, 3.5, 4.78, 6.0, 10.0], dtype=torch.double)
    cc, dd = torch.meshgrid(c, d, indexing="ij")
    volume = physics.sp_volume_um3(cc, dd, phi_inorg=0.5, density_g_cm3=4.8)
    drop_volume = math.pi / 6.0 * dd**3
    ratio = volume / (cc * drop_volume)
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-12)
    # doubling c doubles the volume; doubling the droplet volume does too
    assert torch.allclose(physics.sp_volume_um3(2 * cc, dd, 0.5, 4.8), 2 * volume)
    assert torch.allclose(physics.sp_volume_um3(cc, dd * 2 ** (1 / 3), 0.5, 4.8), 2 * volume)
    # and the constant is 1 / (rho * phi_inorg), with c converted from mg/mL to g/cm³
    assert float(ratio.flatten()[0]) == pytest.approx(1e-3 / (4.8 * 0.5), rel=1e-12)


def test_sp_volume_falls_with_denser_packing_and_denser_material():
    c, d = torch.tensor([4.0], dtype=torch.double), torch.tensor([4.0], dtype=torch.double)
    assert physics.sp_volume_um3(c, d, 0.6, 4.8) < physics.sp_volume_um3(c, d, 0.4, 4.8)
    assert physics.sp_volume_um3(c, d, 0.5, 5.8) < physics.sp_volume_um3(c, d, 0.5, 4.8)


def test_size_law_with_delta_zero_is_exact_mass_balance(preset):
    theta = size_theta(preset, exponent_delta=0.0, packing_temp_per_10c=0.0, droplet_temp_per_10c=0.0)
    rows = [(c, r, t) for c in (0.5, 2.15, 4.0, 7.3, 12.0) for r in (1.0, 3.0, 20.0) for t in (20.0, 50.0)]
    x = settings(rows)
    d_sp_um = torch.exp(physics.log_sp_diameter_nm(x, theta, preset)) / 1000.0
    d_drop_um = torch.exp(physics.log_droplet_um(x, theta, preset))
    v_sp = math.pi / 6.0 * d_sp_um**3
    phi = math.exp(float(theta[SIZE_PARAMETERS.index("log_phi_inorg")]))
    expected = physics.sp_volume_um3(x[:, 0], d_drop_um, phi, preset.density_g_cm3)
    assert torch.allclose(v_sp, expected, rtol=1e-10)
    ratio = v_sp / (x[:, 0] * d_drop_um**3)
    assert float(ratio.max() / ratio.min()) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("delta", [-0.1, 0.0, 0.05, 0.2])
def test_concentration_exponent_is_one_third_plus_delta(preset, delta):
    theta = size_theta(preset, exponent_delta=delta)
    c = torch.tensor([1.0, 3.0, 9.0], dtype=torch.double, requires_grad=True)
    x = torch.stack([c, torch.full_like(c, 5.0), torch.full_like(c, 30.0)], dim=-1)
    log_d = physics.log_sp_diameter_nm(x, theta, preset)
    (slope,) = torch.autograd.grad(log_d.sum(), c)
    exponent = slope * c.detach()  # d log d / d log c
    assert torch.allclose(exponent, torch.full_like(exponent, 1 / 3 + delta), atol=1e-10)
    if delta != 0.0:
        assert (exponent - 1 / 3).abs().min() > 0.5 * abs(delta)


def test_delta_leaves_the_reference_concentration_unchanged(preset):
    x = settings([(preset.reference_concentration_mg_ml, 5.0, 30.0), (2.0, 5.0, 30.0)])
    flat = physics.log_sp_diameter_nm(x, size_theta(preset, exponent_delta=0.0), preset)
    bent = physics.log_sp_diameter_nm(x, size_theta(preset, exponent_delta=0.2), preset)
    assert float(bent[0]) == pytest.approx(float(flat[0]), abs=1e-12)
    assert float(bent[1]) < float(flat[1])  # below c_ref a steeper law gives smaller SPs


def test_higher_flow_ratio_gives_smaller_droplets_and_sps(preset):
    theta = size_theta(preset)
    x = settings([(4.0, r, 25.0) for r in (1.0, 2.0, 5.0, 10.0, 20.0)])
    drop = physics.log_droplet_um(x, theta, preset)
    sp = physics.log_sp_diameter_nm(x, theta, preset)
    assert bool((drop.diff() < 0).all())
    assert bool((sp.diff() < 0).all())


def test_batched_parameters_broadcast(preset):
    mean, sd = preset.prior(SIZE_PARAMETERS)
    thetas = mean + sd * torch.randn(
        5, len(SIZE_PARAMETERS), generator=torch.Generator().manual_seed(0), dtype=torch.double
    )
    x = settings([(1.0, 2.0, 20.0), (4.0, 4.0, 40.0), (9.0, 15.0, 70.0)])
    batched = physics.log_sp_diameter_nm(x, thetas, preset)
    assert batched.shape == (5, 3)
    for i in range(5):
        assert torch.allclose(batched[i], physics.log_sp_diameter_nm(x, thetas[i], preset))


# --- polydispersity ------------------------------------------------------------------------------


def test_pdi_prior_falls_with_temperature_towards_about_50_c(preset):
    theta, _ = preset.prior(PDI_PARAMETERS)
    temps = torch.arange(20.0, 81.0, 1.0, dtype=torch.double)
    x = torch.stack([torch.full_like(temps, 4.0), torch.full_like(temps, 4.0), temps], dim=-1)
    pdi = torch.exp(physics.log_pdi_pct(x, theta, preset))
    warm = temps <= 45.0
    assert bool((pdi[warm].diff() < 0).all()), "PDI must fall from 20 °C while warming towards the optimum"
    best_t = float(temps[pdi.argmin()])
    assert 40.0 <= best_t <= 60.0
    assert float(pdi[-1]) > float(pdi.min())  # too hot is worse again: an optimum, not a plateau
    assert 1.0 < float(pdi.min()) < float(pdi[0]) < 15.0  # plausible percentages


def test_pdi_is_the_quadrature_sum_of_droplet_and_process_terms(preset):
    theta, _ = preset.prior(PDI_PARAMETERS)
    p = dict(zip(PDI_PARAMETERS, theta.tolist(), strict=True))
    rows = [(c, r, t) for c in (1.0, 6.0) for r in (1.0, 4.0, 20.0) for t in (20.0, 45.0, 80.0)]
    x = settings(rows)
    pdi = torch.exp(physics.log_pdi_pct(x, theta, preset))
    for (c, r, t), value in zip(rows, pdi.tolist(), strict=True):
        u = (t - preset.reference_temperature_c) / 10.0
        log_c = math.log(c / preset.reference_concentration_mg_ml)
        kappa = math.exp(p["log_cv_drop_kappa"])
        cv_drop = math.exp(p["log_cv_drop_pct"]) * (1 + kappa * (math.log(r) - p["log_cv_drop_r_opt"]) ** 2)
        log_process = p["log_cv_process_pct"] - p["process_temp_slope"] * u + p["process_temp_curvature"] * u**2
        log_process += p.get("process_conc_slope", 0.0) * log_c
        cv_process = math.exp(log_process)
        assert value == pytest.approx(math.hypot(cv_drop, cv_process), rel=1e-10)
        assert value >= max(cv_drop, cv_process)


def test_pdi_tends_to_the_droplet_cv_when_the_process_term_vanishes(preset):
    theta, _ = preset.prior(PDI_PARAMETERS)
    theta[PDI_PARAMETERS.index("log_cv_process_pct")] = -20.0
    r_opt = math.exp(float(theta[PDI_PARAMETERS.index("log_cv_drop_r_opt")]))
    x = settings([(4.0, r_opt, 25.0)])
    cv0 = math.exp(float(theta[PDI_PARAMETERS.index("log_cv_drop_pct")]))
    assert math.exp(float(physics.log_pdi_pct(x, theta, preset)[0])) == pytest.approx(cv0, rel=1e-9)


def test_droplet_cv_is_lowest_at_the_optimal_ratio(preset):
    theta, _ = preset.prior(PDI_PARAMETERS)
    theta[PDI_PARAMETERS.index("log_cv_process_pct")] = -20.0
    r_opt = math.exp(float(theta[PDI_PARAMETERS.index("log_cv_drop_r_opt")]))
    x = settings([(4.0, r, 25.0) for r in (r_opt / 3, r_opt, r_opt * 3)])
    pdi = physics.log_pdi_pct(x, theta, preset)
    assert float(pdi[1]) < float(pdi[0]) and float(pdi[1]) < float(pdi[2])


# --- Jacobian ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "fn"),
    [(SIZE_PARAMETERS, physics.log_sp_diameter_nm), (PDI_PARAMETERS, physics.log_pdi_pct)],
    ids=["size", "pdi"],
)
def test_jacobian_matches_finite_differences(preset, names, fn):
    mean, sd = preset.prior(names)
    theta = mean + 0.5 * sd * torch.randn(len(names), generator=torch.Generator().manual_seed(1), dtype=torch.double)
    x = settings([(0.7, 1.5, 22.0), (3.0, 4.0, 45.0), (11.0, 18.0, 75.0)])

    def f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return fn(x, theta, preset)

    jac = physics.jacobian(f, x, theta)
    assert jac.shape == (3, len(names))
    h = 1e-6
    for j in range(len(names)):
        step = torch.zeros_like(theta)
        step[j] = h
        numeric = (f(x, theta + step) - f(x, theta - step)) / (2 * h)
        assert torch.allclose(jac[:, j], numeric, atol=1e-7, rtol=1e-6), names[j]


def test_jacobian_of_size_is_independent_of_theta(preset):
    # log size is linear in its parameters, so the linearised GP prior is exact
    def f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return physics.log_sp_diameter_nm(x, theta, preset)

    mean, sd = preset.prior(SIZE_PARAMETERS)
    x = settings([(1.0, 2.0, 20.0), (8.0, 12.0, 70.0)])
    assert torch.allclose(physics.jacobian(f, x, mean), physics.jacobian(f, x, mean + 2 * sd), atol=1e-12)


# --- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_shipped_presets_load_and_are_consistent(name):
    preset = Preset.load(name)
    assert set(preset.priors) == set(SIZE_PARAMETERS + PDI_PARAMETERS)
    assert all(sd > 0 for _, sd in preset.priors.values())
    assert set(preset.bounds) == set(PARAMETERS)
    for low, high in preset.bounds.values():
        assert low < high
    c_low, c_high = preset.bounds["concentration_mg_ml"]
    w_low, w_high = preset.window_mg_ml
    assert c_low <= w_low < w_high <= c_high
    assert c_low <= preset.reference_concentration_mg_ml <= c_high
    assert preset.density_g_cm3 > 0 and preset.nozzle_um > 0 and preset.window_log_sd > 0


def test_preset_loads_from_a_path(tmp_path):
    path = tmp_path / "copy.toml"
    path.write_text((MODELS_DIR / "cspbbr3-flow-focusing.toml").read_text(encoding="utf-8"), encoding="utf-8")
    assert Preset.load(str(path)).priors == Preset.load("cspbbr3-flow-focusing").priors


def test_with_priors_replaces_only_the_named_priors(preset):
    changed = preset.with_priors({"exponent_delta": (0.2, 0.01)})
    assert changed.priors["exponent_delta"] == (0.2, 0.01)
    assert preset.priors["exponent_delta"] != (0.2, 0.01)
    assert {k: v for k, v in changed.priors.items() if k != "exponent_delta"} == {
        k: v for k, v in preset.priors.items() if k != "exponent_delta"
    }


def _broken_preset(tmp_path: Path, old: str, new: str) -> str:
    text = (MODELS_DIR / "cspbbr3-flow-focusing.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("exponent_delta = [0.0, 0.08]", "", r"missing key 'exponent_delta'"),
        ("[window]", "[windows]", r"missing key 'window'"),
        ("nozzle_um = 5.0", "", r"missing key 'nozzle_um'"),
        ("exponent_delta = [0.0, 0.08]", "exponent_delta = [0.0, 0.0]", r"sd of exponent_delta=0\.0 must be positive"),
        (
            "log_phi_inorg = [-0.69, 0.2]",
            "log_phi_inorg = [-0.69, -0.2]",
            r"sd of log_phi_inorg=-0\.2 must be positive",
        ),
        ("density_g_cm3 = 4.8", 'density_g_cm3 = "heavy"', r"malformed value.*heavy"),
        ("log_droplet_k = [0.18, 0.25]", "log_droplet_k = [0.18]", r"malformed value"),
        ("[constants]", "[constants", r"not valid TOML"),
    ],
    ids=[
        "missing-prior",
        "missing-table",
        "missing-constant",
        "zero-sd",
        "negative-sd",
        "text",
        "short-pair",
        "bad-toml",
    ],
)
def test_malformed_preset_is_a_spec_error_naming_the_problem(tmp_path, old, new, match):
    path = _broken_preset(tmp_path, old, new)
    with pytest.raises(SpecError, match=match) as info:
        Preset.load(path)
    assert "broken.toml" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_names_the_choices():
    with pytest.raises(SpecError, match=r"unknown model preset 'no-such-preset'.*cspbbr3-flow-focusing"):
        Preset.load("no-such-preset")


def test_pdi_prior_rises_towards_the_hollow_low_concentration_edge(preset):
    theta, _ = preset.prior(PDI_PARAMETERS)
    x = settings([(c, 4.0, 25.0) for c in (0.5, 1.0, 2.15, 4.0, 7.3)])
    pdi = physics.log_pdi_pct(x, theta, preset)
    assert bool((pdi.diff() < 0).all())
