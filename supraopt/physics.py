"""The physics prior, in torch (differentiable in settings and parameters), and its presets.

Three laws, from ``shared/SCIENCE.md``:

* droplet size from flow (section 3)::

      d_drop = k * w * r^(-a) * exp(b_T * u_T)           r = Q_c / Q_d,  u_T = (T - T_ref) / 10

* SP size by mass balance (section 2), with an exponent free to depart from 1/3 about the
  reference concentration and a packing fraction that loosens with temperature::

      d_SP = d_drop * (c / (rho * phi_inorg))^(1/3) * (c / c_ref)^delta * exp(tau * u_T)

* polydispersity (section 4), droplet and process terms in quadrature, in percent::

      CV_SP^2 = CV_drop^2 + CV_process^2
      CV_drop = cv0 * (1 + kappa * ln(r / r_opt)^2)
      CV_process = p0 * exp(-s * u_T + h * u_T^2) * (c / c_ref)^q
                                         (h > 0 allows a hot optimum; q < 0: hollow, defective
                                          SPs towards the low-concentration edge)

Parameters live in an unconstrained space (``log_`` prefix = natural log) with independent normal
priors ``(mean, sd)`` read from a preset in ``models/``. Functions take settings as an `n x 3`
tensor in physical units (columns: :data:`supraopt.records.PARAMETERS`) and a parameter vector
``theta`` (`p` or `b x p`) in the order of :data:`SIZE_PARAMETERS` / :data:`PDI_PARAMETERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from supraopt.preset import DROPLET_PARAMETERS, PDI_PARAMETERS, SIZE_PARAMETERS, Preset  # noqa: F401 - re-exported

PhysicsFn = Callable[[Tensor, Tensor], Tensor]


def _columns(x: Tensor, preset: Preset) -> tuple[Tensor, Tensor, Tensor]:
    """log(c / c_ref), log(r / r_ref) and u_T = (T - T_ref)/10 from an `n x 3` physical tensor."""
    log_c = torch.log(x[..., 0] / preset.reference_concentration_mg_ml)
    log_r = torch.log(x[..., 1] / preset.reference_flow_ratio)
    u_t = (x[..., 2] - preset.reference_temperature_c) / 10.0
    return log_c, log_r, u_t


def _split(theta: Tensor, count: int) -> list[Tensor]:
    return [theta[..., i : i + 1] for i in range(count)]


def log_droplet_um(x: Tensor, theta: Tensor, preset: Preset) -> Tensor:
    """Natural log of the droplet diameter (µm) from flow ratio and temperature.

    Args:
        x: `n x 3` physical settings.
        theta: `p` or `b x p` parameters, first three of :data:`SIZE_PARAMETERS`.
    Returns:
        `n` (or `b x n`) log droplet diameters.
    """
    log_k, a, b_t = _split(theta, 3)
    _, log_r, u_t = _columns(x, preset)
    log_r_abs = log_r + math.log(preset.reference_flow_ratio)
    return log_k + math.log(preset.nozzle_um) - a * log_r_abs + b_t * u_t


def log_sp_from_droplet(x: Tensor, log_drop_um: Tensor, theta: Tensor, preset: Preset) -> Tensor:
    """Natural log of the SP diameter (nm) by mass balance from a (log) droplet diameter in µm."""
    log_phi, delta, tau = _split(theta[..., 3:6], 3)
    log_c, _, u_t = _columns(x, preset)
    c_g_cm3 = x[..., 0] * 1e-3
    third = (torch.log(c_g_cm3) - math.log(preset.density_g_cm3) - log_phi) / 3.0
    return log_drop_um + math.log(1000.0) + third + delta * log_c + tau * u_t


def log_sp_diameter_nm(x: Tensor, theta: Tensor, preset: Preset) -> Tensor:
    """Natural log of the SP diameter (nm): droplet law then mass balance. Shapes as above."""
    return log_sp_from_droplet(x, log_droplet_um(x, theta, preset), theta, preset)


def log_pdi_pct(x: Tensor, theta: Tensor, preset: Preset) -> Tensor:
    """Natural log of the SP polydispersity (CV in %), droplet and process terms in quadrature."""
    log_cv0, log_r_opt, log_kappa, log_p0, slope, curvature, conc_slope = _split(theta, 7)
    log_c, log_r, u_t = _columns(x, preset)
    log_r_abs = log_r + math.log(preset.reference_flow_ratio)
    cv_drop = torch.exp(log_cv0) * (1.0 + torch.exp(log_kappa) * (log_r_abs - log_r_opt) ** 2)
    cv_process = torch.exp(log_p0 - slope * u_t + curvature * u_t**2 + conc_slope * log_c)
    return 0.5 * torch.log(cv_drop**2 + cv_process**2)


def sp_volume_um3(concentration_mg_ml: Tensor, droplet_um: Tensor, phi_inorg: float, density_g_cm3: float) -> Tensor:
    """Exact mass balance: SP volume = c * V_drop / (rho * phi_inorg), in µm³ (1/3 law, no extras)."""
    v_drop = math.pi / 6.0 * droplet_um**3
    return concentration_mg_ml * 1e-3 * v_drop / (density_g_cm3 * phi_inorg)


JACOBIAN_STEP = 1e-5


def jacobian(fn: PhysicsFn, x: Tensor, theta: Tensor) -> Tensor:
    """`... x p` Jacobian of ``fn(x, theta)`` with respect to a `p` parameter vector.

    Central differences evaluated in one call on a batch of `2p` perturbed parameter vectors
    (every physics function here accepts `b x p` parameters): exact for the log-linear size laws,
    accurate to ~1e-10 for the polydispersity law in double precision, differentiable in ``x``,
    and an order of magnitude cheaper than ``torch.func.jacfwd`` on first use.
    """
    p = theta.shape[-1]
    flat = x.reshape(-1, x.shape[-1])
    shift = JACOBIAN_STEP * torch.eye(p, dtype=theta.dtype)
    values = fn(flat, torch.cat([theta + shift, theta - shift]))  # 2p x N
    j = (values[:p] - values[p:]).transpose(0, 1) / (2 * JACOBIAN_STEP)
    return j.reshape(*x.shape[:-1], p)
