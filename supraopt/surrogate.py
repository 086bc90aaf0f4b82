"""Surrogates: GPs whose prior is the physics model, and a feasibility model for failed runs.

**Physics GP.** An outcome ``y(x) = f(x; theta) + g(x) + noise`` on a log scale, with the physics
parameters ``theta ~ N(mu, diag(sd^2))`` from the preset and ``g`` a Matérn-5/2 residual that
learns where the rig departs from the physics. The physics enters linearised about a point
``theta_lin`` (exact for the log size, which is linear in its parameters)::

    mean(x)      = f(x; theta_lin) + J(x) (mu - theta_lin)        PhysicsMean
    cov(x, x')   = J(x) Sigma J(x')^T  +  s^2 Matern(x, x')         PhysicsKernel + ScaleKernel

so the physics parameters are integrated out analytically: their posterior given the data is the
MAP estimate with its exact (Laplace) covariance, and the GP's predictive variance knows that,
how well the physics pins each direction (a move in flow ratio carries the droplet-law
exponent's uncertainty, a move in concentration the mass-balance exponent's). For the nonlinear
polydispersity law ``theta_lin`` is moved to the posterior mean and the GP refitted
(Gauss-Newton). Residual hyperparameters (lengthscales, outputscale, extra noise) are fitted by
MAP under their priors (BFGS on the log marginal likelihood plus log priors, :func:`fit_map`).

Inputs are unit-cube points (see :mod:`supraopt.space`); the mean and kernel map them back to
physical units themselves. Outcomes are modelled unstandardised on their physical log scale (no
outcome transform): ``log(diameter_nm)`` and ``log(pdi_pct)``. Measurement noise comes from the
data (standard error of a mean of n particles) plus a learned extra term.

**Feasibility.** Failed runs sit at the edges of a concentration window (hollow SPs below,
unstable droplets above: SCIENCE.md section 5). Each edge has a prior from the preset and a
posterior on a grid given every run: successes push edges outward, failures whose reason names
an edge pull that edge in, failures of unknown cause pull the nearer edge gently. Failures of
droplet generation ("jetting, no droplets") bound a second window, in flow ratio, whose edges
start outside the rig's envelope. A local penalty around every failed point keeps the optimiser
away from failures no window explains (a boiling coil, a leak).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import gpytorch
import torch
from gpytorch.constraints import GreaterThan
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, MaternKernel, ScaleKernel
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood
from gpytorch.means import Mean
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.models import ExactGP
from gpytorch.priors import GammaPrior, LogNormalPrior
from gpytorch.utils.warnings import GPInputWarning
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from supraopt import physics, torchfast
from supraopt.physics import PhysicsFn, Preset
from supraopt.space import SearchSpace

torchfast.install()  # integer broadcast_shapes without SymPy: a third of a second off every 'suggest'

FIT_SUBSET = 300
"""Hyperparameters are fitted on at most this many runs (the GP still conditions on all)."""
MAX_CHOLESKY = 20_000
"""Exact Cholesky up to this many runs (GPyTorch would switch to CG at 800)."""

INFLATION_LOG_SD = 1.0
"""Log-sd of the log-normal prior on the physics prior's variance inflation (mode 1: none)."""
INFLATION_RAW_OFF = -30.0
"""Raw value of an inflation of 1 (to 1e-13): a GP whose hyperparameters are not fitted keeps the prior."""
WIDENED = 2.0
"""A learned inflation above this is reported (``fit`` notes, ``suggest`` notes): the runs lie far outside the preset."""
INFLATION_RAW_START = -2.0
"""Where the MAP fit starts the raw inflation (1.13): at the 'off' value its gradient would vanish."""

SEM_CALIBRATION_SD = 0.015
"""Relative systematic error of one sized sample (SEM calibration, drying): SCIENCE.md section 6."""
DEFAULT_N_PARTICLES = 50
"""Particles assumed sized when a measurement does not say."""


@dataclass(frozen=True)
class ResidualPrior:
    """Prior scale of the GP residual and of the extra (unexplained) noise, on the log scale."""

    sd: float
    noise_sd: float
    lengthscale_mean: float = 0.5


SIZE_RESIDUAL = ResidualPrior(sd=0.06, noise_sd=0.01)
PDI_RESIDUAL = ResidualPrior(sd=0.25, noise_sd=0.08)


class UnitMap(Protocol):
    """What the GP needs of a search space: its dimension and the unit-cube -> physical map."""

    @property
    def dim(self) -> int: ...

    def from_unit(self, z: Tensor) -> Tensor: ...


class PhysicsMean(Mean):
    """GPyTorch mean: the physics model linearised about ``theta_lin``, fed unit-cube inputs."""

    def __init__(self, fn: PhysicsFn, space: UnitMap, prior_mean: Tensor, theta_lin: Tensor) -> None:
        super().__init__()
        self.fn, self.space = fn, space
        self.register_buffer("prior_mean", prior_mean)
        self.register_buffer("theta_lin", theta_lin)

    def forward(self, z: Tensor) -> Tensor:
        x = self.space.from_unit(z)
        value = self.fn(x, self.theta_lin)
        if torch.equal(self.theta_lin, self.prior_mean):
            return value
        return value + physics.jacobian(self.fn, x, self.theta_lin) @ (self.prior_mean - self.theta_lin)


class PhysicsKernel(Kernel):
    """GPyTorch kernel ``J(x) Sigma J(x')^T``: the covariance the uncertain physics parameters induce.

    ``Sigma`` is the prior's ``diag(sd^2)`` with the variances ``inflatable`` marks (1) times a learned
    ``inflation >= 1`` (log-normal prior, mode 1): when the data contradict the physics prior far
    beyond its sd (a rig whose droplets grow with the flow ratio), the marginal likelihood widens the
    prior and the data move the parameters, instead of the model insisting and the optimiser
    retrying the same corner. On data the prior explains, the inflation stays at 1.
    """

    def __init__(
        self, fn: PhysicsFn, space: UnitMap, prior_sd: Tensor, theta_lin: Tensor, inflatable: Tensor | None = None
    ) -> None:
        super().__init__()
        self.fn, self.space = fn, space
        self.register_buffer("prior_var", prior_sd**2)
        self.register_buffer("theta_lin", theta_lin)
        self.register_buffer("inflatable", torch.ones_like(prior_sd) if inflatable is None else inflatable)
        self.register_parameter(
            "raw_inflation", torch.nn.Parameter(torch.tensor(INFLATION_RAW_OFF, dtype=prior_sd.dtype))
        )
        self.register_constraint("raw_inflation", GreaterThan(1.0))
        self.register_prior("inflation_prior", LogNormalPrior(0.0, INFLATION_LOG_SD), lambda m: m.inflation)
        self._cache: tuple[Tensor, int, Tensor] | None = None  # (inputs, their version, Jacobian)

    @property
    def inflation(self) -> Tensor:
        return self.raw_inflation_constraint.transform(self.raw_inflation)

    def variance(self) -> Tensor:
        """The parameters' prior variances with the learned inflation."""
        return self.prior_var * (1.0 + (self.inflation - 1.0) * self.inflatable)

    def features(self, z: Tensor) -> Tensor:
        """`... x n x p` Jacobian of the physics at unit-cube points ``z`` (training inputs cached)."""
        if z.requires_grad:
            return physics.jacobian(self.fn, self.space.from_unit(z), self.theta_lin)
        # The same tensor object (kept alive here, so its memory cannot be reused) and unmodified.
        if self._cache is None or self._cache[0] is not z or self._cache[1] != z._version:
            self._cache = (z, z._version, physics.jacobian(self.fn, self.space.from_unit(z), self.theta_lin))
        return self._cache[2]

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params: object) -> Tensor:
        j1 = self.features(x1)
        var = self.variance()
        if diag:
            if torch.equal(x1, x2):
                return (j1**2 * var).sum(-1)
            return (j1 * var * self.features(x2)).sum(-1)
        j2 = j1 if torch.equal(x1, x2) else self.features(x2)
        return (j1 * var) @ j2.transpose(-1, -2)


class ExactModel(ExactGP):
    """An exact GP with the given mean, kernel and likelihood (what BoTorch's ``SingleTaskGP`` is here,
    without loading BoTorch and, through it, SciPy: 0.3-0.5 s off every ``suggest``)."""

    def __init__(self, z: Tensor, y: Tensor, likelihood: FixedNoiseGaussianLikelihood, mean: Mean, kernel: Kernel):
        super().__init__(z, y, likelihood)
        self.mean_module, self.covar_module = mean, kernel

    def forward(self, z: Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(z), self.covar_module(z))


def fit_map(model: ExactModel, maxiter: int = 60) -> None:
    """Fit ``model``'s hyperparameters by MAP: the negative log marginal likelihood plus log priors,
    minimised over the raw (unconstrained) parameters by :func:`minimise`. If the objective cannot
    be evaluated at the start (a matrix not positive definite), the starting values (the priors'
    modes) stay.
    """
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    z, y = model.train_inputs[0], model.train_targets

    def objective(x: Tensor) -> tuple[float, Tensor]:
        torch.nn.utils.vector_to_parameters(x, params)
        for p in params:
            p.grad = None
        try:
            value = -mll(model(z), y)
            value.backward()
        except (NotPSDError, torch.linalg.LinAlgError):
            return math.inf, torch.zeros_like(x)
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        return float(value.detach()), grad

    model.train()
    best = minimise(objective, torch.nn.utils.parameters_to_vector(params).detach().clone(), maxiter)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(best, params)
    model.eval()


def minimise(f: Callable[[Tensor], tuple[float, Tensor]], x: Tensor, maxiter: int) -> Tensor:
    """BFGS with a backtracking (Armijo) line search: the minimiser of a smooth ``f`` (value and
    gradient) from ``x``, or the best point reached in ``maxiter`` steps. Dense, for the handful of
    hyperparameters a GP has; ``f`` may return an infinite value where it is undefined."""
    fx, g = f(x)
    if not math.isfinite(fx):
        return x
    h = torch.eye(len(x), dtype=x.dtype)
    for step_no in range(maxiter):
        if float(g.abs().max()) < 1e-5:
            break
        d = -(h @ g)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            h = torch.eye(len(x), dtype=x.dtype)
            d, slope = -g, -float(g @ g)
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = f(x_new)
            if math.isfinite(f_new) and f_new <= fx + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-8:
                return x
        s, v = x_new - x, g_new - g
        sv = float(s @ v)
        if sv > 1e-12:
            if step_no == 0:  # scale the first inverse Hessian guess to the curvature seen
                h = h * (sv / float(v @ v))
            rho = 1.0 / sv
            eye = torch.eye(len(x), dtype=x.dtype)
            h = (eye - rho * torch.outer(s, v)) @ h @ (eye - rho * torch.outer(v, s)) + rho * torch.outer(s, s)
        done = fx - f_new < 1e-9 * max(1.0, abs(fx))
        x, fx, g = x_new, f_new, g_new
        if done:
            break
    return x


class PhysicsGP:
    """A GP on one log-scale outcome with the physics model as its prior (see module docstring)."""

    fit_subset = FIT_SUBSET
    """Hyperparameters are fitted on at most this many runs (the GP still conditions on all)."""

    def __init__(
        self,
        fn: PhysicsFn,
        prior: tuple[Tensor, Tensor],
        names: tuple[str, ...],
        space: UnitMap,
        residual: ResidualPrior,
        residual_dims: int | None = None,
    ) -> None:
        """
        Args:
            fn: physics model ``fn(x, theta)``: `n x d` physical inputs, `p` parameters -> `n` outcomes.
            prior: mean and sd (`p` each) of the independent normal priors of the parameters.
            names: the `p` parameter names, for reports.
            space: maps unit-cube inputs to physical ones (``from_unit``) and knows ``dim``.
            residual: prior scales of the GP residual and the extra noise.
            residual_dims: the residual sees only the first this many input columns (default: all);
                the others (context level indicators, see :mod:`supraopt.context`) enter the physics only.
        """
        self.fn, self.space, self.names, self.residual = fn, space, names, residual
        self.residual_dims = residual_dims
        self.inflatable: tuple[str, ...] | None = None
        """The parameters the learned inflation widens (default all; not context offsets, nor priors that
        are posteriors of measured droplets: :attr:`Preset.measured`)."""
        self.fixed_inputs: Tensor | None = None
        self.prior_mean, self.prior_sd = prior
        self.theta_lin = self.prior_mean.clone()
        self.model: ExactModel | None = None
        self._build_prior_modules()

    def _modules(self) -> tuple[PhysicsMean, Kernel]:
        dims = self.space.dim if self.residual_dims is None else self.residual_dims
        residual = ScaleKernel(
            MaternKernel(
                nu=2.5,
                ard_num_dims=dims,
                active_dims=None if dims == self.space.dim else tuple(range(dims)),
                lengthscale_prior=GammaPrior(3.0, 3.0 / self.residual.lengthscale_mean),
            ),
            outputscale_prior=GammaPrior(2.0, 2.0 / self.residual.sd**2),
        )
        residual.outputscale = self.residual.sd**2
        residual.base_kernel.lengthscale = self.residual.lengthscale_mean
        mean = PhysicsMean(self.fn, self.space, self.prior_mean, self.theta_lin)
        mask = (
            None
            if self.inflatable is None
            else torch.tensor([float(n in self.inflatable) for n in self.names], dtype=torch.double)
        )
        kernel = PhysicsKernel(self.fn, self.space, self.prior_sd, self.theta_lin, mask) + residual
        return mean, kernel.to(torch.double)

    def _build_prior_modules(self) -> None:
        self.prior_mean_module, self.prior_covar_module = self._modules()

    def fit(self, z: Tensor, y: Tensor, yvar: Tensor, *, relinearise: int = 0, fit_hypers: bool = True) -> PhysicsGP:
        """Condition on `n x 3` unit-cube inputs, `n` log outcomes and their `n` noise variances.

        Hyperparameters are fitted by MAP when there are at least 4 runs (fewer cannot inform
        them; the priors' modes are used). ``relinearise`` Gauss-Newton passes move the
        linearisation point to the physics parameters' posterior mean.
        """
        if z.shape[0] == 0:
            self.model = None
            return self
        hypers: dict[str, Tensor] | None = None
        for step in range(relinearise + 1):
            if step:
                self.theta_lin = self.parameter_posterior(z, y)[0]
            mean, kernel = self._modules()
            likelihood = FixedNoiseGaussianLikelihood(
                noise=yvar.clamp_min(1e-8),
                learn_additional_noise=True,
                noise_prior=GammaPrior(1.5, 1.5 / self.residual.noise_sd**2),
            )
            model = ExactModel(z, y, likelihood, mean, kernel).to(torch.double)
            model.likelihood.second_noise_covar.noise = self.residual.noise_sd**2
            if hypers is not None:  # a Gauss-Newton pass keeps the residual hyperparameters
                model.load_state_dict(hypers, strict=False)
            elif fit_hypers and z.shape[0] >= 4:
                model.load_state_dict(self._fit_hypers(z, y, yvar, mean, kernel), strict=False)
            hypers = {k: v for k, v in model.state_dict().items() if "raw_" in k}
            model.eval()
            self.model = model
        return self

    def _fit_hypers(self, z: Tensor, y: Tensor, yvar: Tensor, mean: Mean, kernel: Kernel) -> dict[str, Tensor]:
        """MAP residual hyperparameters; above :attr:`fit_subset` runs on a seeded random subset."""
        if z.shape[0] > self.fit_subset:
            keep = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))[: self.fit_subset]
            z, y, yvar = z[keep], y[keep], yvar[keep]
        likelihood = FixedNoiseGaussianLikelihood(
            noise=yvar.clamp_min(1e-8),
            learn_additional_noise=True,
            noise_prior=GammaPrior(1.5, 1.5 / self.residual.noise_sd**2),
        )
        likelihood.second_noise_covar.noise = self.residual.noise_sd**2
        model = ExactModel(z, y, likelihood, mean, kernel).to(torch.double)
        model.covar_module.kernels[0].raw_inflation.data.fill_(INFLATION_RAW_START)
        with gpytorch.settings.max_cholesky_size(MAX_CHOLESKY):
            fit_map(model)
        return {k: v for k, v in model.state_dict().items() if "raw_" in k}

    def at_inputs(self, fixed: Tensor) -> PhysicsGP:
        """This GP seen as a GP on fewer inputs: :meth:`moments` and :meth:`joint` append the columns
        ``fixed`` to every point (a campaign's context: the acquisition then sees the 3 controls only)."""
        view = copy.copy(self)
        view.fixed_inputs = fixed
        return view

    def _inputs(self, z: Tensor) -> Tensor:
        if self.fixed_inputs is None:
            return z
        return torch.cat([z, self.fixed_inputs.to(z).expand(*z.shape[:-1], -1)], -1)

    def moments(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent posterior mean and variance (`n` each) at unit-cube points; differentiable in ``z``."""
        z = self._inputs(z)
        with gpytorch.settings.max_cholesky_size(MAX_CHOLESKY), warnings.catch_warnings():
            # predicting at exactly the measured settings (a recipe's repeat) is meant
            warnings.simplefilter("ignore", GPInputWarning)
            if self.model is None:
                mean = self.prior_mean_module(z)
                var = self.prior_covar_module(z, diag=True)
                return mean, var
            dist = self.model(z)
            return dist.mean, dist.variance.clamp_min(1e-12)

    def joint(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent posterior mean `n` and covariance `n x n` at unit-cube points."""
        z = self._inputs(z)
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(MAX_CHOLESKY), warnings.catch_warnings():
            warnings.simplefilter("ignore", GPInputWarning)
            if self.model is None:
                return self.prior_mean_module(z), self.prior_covar_module(z).to_dense()
            dist = self.model(z)
            return dist.mean, dist.covariance_matrix

    @property
    def inflation(self) -> float:
        """The learned factor on the physics parameters' prior variances (1: the prior as the preset gives it)."""
        if self.model is None:
            return 1.0
        return float(self.model.covar_module.kernels[0].inflation.detach())

    def parameter_posterior(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and covariance of the physics parameters given the training data.

        ``theta | y ~ N(mu + Sigma J^T K^-1 (y - m), Sigma - Sigma J^T K^-1 J Sigma)``, with ``K``
        the full training covariance (physics + residual + noise) at the fitted hyperparameters.
        """
        if self.model is None or z.shape[0] == 0:
            return self.prior_mean.clone(), torch.diag(self.prior_sd**2)
        with torch.no_grad():
            model = self.model
            var = model.covar_module.kernels[0].variance()
            j = physics.jacobian(self.fn, self.space.from_unit(z), self.theta_lin)
            k = model.covar_module(z).to_dense() + torch.diag(model.likelihood.noise.reshape(-1))
            chol = torch.linalg.cholesky(k + 1e-9 * torch.eye(len(k), dtype=k.dtype))
            resid = (y - model.mean_module(z)).unsqueeze(-1)
            sj = j * var  # n x p: J Sigma
            a = torch.cholesky_solve(sj, chol)  # K^-1 J Sigma
            mean = self.prior_mean + (a.transpose(0, 1) @ resid).squeeze(-1)
            cov = torch.diag(var) - sj.transpose(0, 1) @ a
        return mean, 0.5 * (cov + cov.T)


def size_gp(preset: Preset, space: SearchSpace) -> PhysicsGP:
    """GP on ``log(diameter_nm)`` with the droplet law + mass balance as prior."""

    def fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_sp_diameter_nm(x, theta, preset)

    gp = PhysicsGP(fn, preset.prior(physics.SIZE_PARAMETERS), physics.SIZE_PARAMETERS, space, SIZE_RESIDUAL)
    gp.inflatable = preset.inflatable(physics.SIZE_PARAMETERS)
    return gp


DROPLET_RESIDUAL = ResidualPrior(sd=0.05, noise_sd=0.02)
DROPLET_NOISE_SD = 0.02
"""Relative error of one in-line droplet sizing (camera and image analysis)."""


def droplet_gp(preset: Preset, space: SearchSpace) -> PhysicsGP:
    """GP on ``log(droplet_um)`` with the droplet law as prior: the first stage of the two-stage model."""

    def fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_droplet_um(x, theta, preset)

    names = physics.DROPLET_PARAMETERS
    return PhysicsGP(fn, preset.prior(names), names, space, DROPLET_RESIDUAL)


def with_droplet_data(preset: Preset, space: SearchSpace, z: Tensor, log_droplet_um: Tensor) -> Preset:
    """The preset whose droplet-law priors are replaced by their posterior given measured droplets.

    When the rig sizes droplets in-line, the droplet stage is fitted directly (SCIENCE.md section 3)
    and its posterior becomes the SP-size GP's prior for ``log_droplet_k``, ``droplet_exponent_a``
    and ``droplet_temp_per_10c``; SP sizes then pin the packing fraction and exponent on their own.
    """
    if len(z) == 0:
        return preset
    gp = droplet_gp(preset, space).fit(z, log_droplet_um, torch.full_like(log_droplet_um, DROPLET_NOISE_SD**2))
    mean, cov = gp.parameter_posterior(z, log_droplet_um)
    sd = cov.diagonal().clamp_min(1e-12).sqrt()
    return preset.with_priors({name: (float(mean[i]), float(sd[i])) for i, name in enumerate(gp.names)}, measured=True)


def pdi_gp(preset: Preset, space: SearchSpace) -> PhysicsGP:
    """GP on ``log(pdi_pct)`` with the droplet + process polydispersity law as prior."""

    def fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_pdi_pct(x, theta, preset)

    return PhysicsGP(fn, preset.prior(physics.PDI_PARAMETERS), physics.PDI_PARAMETERS, space, PDI_RESIDUAL)


def size_noise_var(pdi_pct: Tensor, n_particles: Tensor) -> Tensor:
    """Variance of log(mean diameter): (CV / sqrt(n))^2 plus the systematic calibration error."""
    return (pdi_pct / 100.0) ** 2 / n_particles + SEM_CALIBRATION_SD**2


def pdi_noise_var(n_particles: Tensor) -> Tensor:
    """Variance of log(CV) from n particles: (1 / sqrt(2n))^2 plus 5 % of method scatter."""
    return 1.0 / (2.0 * n_particles) + 0.05**2


# --- feasibility ---------------------------------------------------------------------------------

HIGH_EDGE = re.compile(r"unstable|merg|coalesc|clog|sediment|too (concentrated|high)|aggregat|block", re.I)
LOW_EDGE = re.compile(r"hollow|cream|buoyant|broken|shell|incomplete|too (dilute|low)|no (sp|supra)", re.I)
FLOW_FAILURE = re.compile(r"jet|no droplet|flow|pressure|tip.?stream", re.I)
"""Failures of droplet generation: they bound a window in flow ratio instead."""
HEAT_FAILURE = re.compile(
    r"boil|bubbl|overheat|too (hot|warm)|heat|thermal|vapou?r|evaporat|"
    r"(leak|seal|melt|soft)\w*.{0,30}(hot|high.?t|temperature|°c|deg)",
    re.I,
)
"""Failures that name heat: they bound a window in temperature from above."""
NOT_AN_EDGE = re.compile(r"boil|bubble|leak|pump|tub(e|ing)|nozzle|wet", re.I)
"""Failures of the hardware: only penalised where they happened."""


def failure_edge(reason: str) -> str | None:
    """What a failure reason points to: the concentration window's 'high' or 'low' edge, the
    flow-ratio window ('flow'), the temperature window's upper edge ('heat'), the hardware
    ('other'), or None (unknown)."""
    if HEAT_FAILURE.search(reason):
        return "heat"
    if FLOW_FAILURE.search(reason):
        return "flow"
    if NOT_AN_EDGE.search(reason):
        return "other"
    high, low = bool(HIGH_EDGE.search(reason)), bool(LOW_EDGE.search(reason))
    if high == low:
        return None
    return "high" if high else "low"


class Feasibility(Protocol):
    """What the acquisition needs of a feasibility model."""

    def prob(self, z: Tensor) -> Tensor:
        """P(the run gives usable SPs) at `... x d` unit-cube points."""
        ...


class AlwaysFeasible:
    """Feasibility model of the ablation without one: every run gives SPs."""

    def prob(self, z: Tensor) -> Tensor:
        return torch.ones(z.shape[:-1], dtype=z.dtype)


class Window:
    """Posterior of a ``[low, high]`` window on one log axis, each edge on a grid (see FeasibilityModel)."""

    GRID = 600
    SOFTNESS = 0.05
    """Width of an edge in natural-log units (edges are sharp: SCIENCE.md section 5)."""

    def __init__(self, low: float, high: float, sd: float, span: tuple[float, float]) -> None:
        """Edges' prior means ``low``/``high`` and sd (natural logs); ``span``: the axis' log bounds."""
        # both edges may end up anywhere on the axis (and a little beyond it)
        grid = torch.linspace(min(span[0], low) - 3 * sd, max(span[1], high) + 3 * sd, self.GRID, dtype=torch.double)
        self.low_grid, self.high_grid = grid, grid
        self.log_low = -0.5 * ((self.low_grid - low) / sd) ** 2
        self.log_high = -0.5 * ((self.high_grid - high) / sd) ** 2

    @classmethod
    def open_envelope(cls, span: tuple[float, float], inside_mass: float, margin: float) -> Window:
        """A window with no known edges: each edge most likely beyond the envelope ``span`` (uniform
        over ``margin`` outside it), with ``inside_mass`` spread evenly inside, so that a few failures
        can bring it in without the prior favouring any setting inside."""
        window = cls(span[0] - margin / 2, span[1] + margin / 2, margin / 2, span)
        grid = window.low_grid
        inside = (grid >= span[0]) & (grid <= span[1])
        below, above = grid < span[0], grid > span[1]
        low_prior = torch.where(inside, inside_mass / inside.sum(), (1 - inside_mass) / below.sum())
        high_prior = torch.where(inside, inside_mass / inside.sum(), (1 - inside_mass) / above.sum())
        window.log_low = torch.where(above, -torch.inf, torch.log(low_prior))
        window.log_high = torch.where(below, -torch.inf, torch.log(high_prior))
        return window

    def inside(self, u: float, mislabel: float) -> None:
        """A run at ``u`` worked: both edges are probably beyond it."""
        self.log_low += _log_mix(torch.special.ndtr((u - self.low_grid) / self.SOFTNESS), mislabel)
        self.log_high += _log_mix(torch.special.ndtr((self.high_grid - u) / self.SOFTNESS), mislabel)

    def outside(self, u: float, edge: str, mislabel: float) -> None:
        """A run at ``u`` failed beyond the ``edge`` ('low' or 'high')."""
        if edge == "high":
            self.log_high += _log_mix(torch.special.ndtr((u - self.high_grid) / self.SOFTNESS), mislabel)
        else:
            self.log_low += _log_mix(torch.special.ndtr((self.low_grid - u) / self.SOFTNESS), mislabel)

    def edges(self) -> tuple[float, float]:
        """Posterior-mean edges (natural logs)."""
        low = float((torch.softmax(self.log_low, 0) * self.low_grid).sum())
        high = float((torch.softmax(self.log_high, 0) * self.high_grid).sum())
        return low, high

    def nearer_edge(self, u: float) -> str:
        low, high = self.edges()
        return "high" if u - low > high - u else "low"

    def prob(self, u: Tensor) -> Tensor:
        """P(inside) at log values ``u`` (any shape); differentiable."""
        u = u.unsqueeze(-1)
        w_low, w_high = torch.softmax(self.log_low, 0), torch.softmax(self.log_high, 0)
        low, high = w_low > 1e-12, w_high > 1e-12  # grid points without weight change nothing (< 1e-9 in all)
        p_low = (w_low[low] * torch.special.ndtr((u - self.low_grid[low]) / self.SOFTNESS)).sum(-1)
        p_high = (w_high[high] * torch.special.ndtr((self.high_grid[high] - u) / self.SOFTNESS)).sum(-1)
        return p_low * p_high


def _log_mix(p: Tensor, mislabel: float) -> Tensor:
    return torch.log(mislabel + (1 - 2 * mislabel) * p)


class FeasibilityModel:
    """Probability that a run at given settings yields usable SPs (see module docstring).

    Three windows: in concentration (prior from the preset's known window), in flow ratio (prior:
    the whole envelope works, until droplet-generation failures say otherwise) and an upper edge in
    temperature (a boiling coil, a seal that leaks when hot), times a local penalty around every
    failed run. The temperature edge is learned from failures whose reason names heat and from
    failures of unknown cause above the temperatures that worked; it stays out of the model (no
    effect at all) until such a failure is recorded.

    Args:
        preset: supplies the prior concentration window (edges and their log-sd).
        space: maps settings to the unit cube.
        ok: `n_ok x 3` settings (physical) of runs that gave SPs.
        failures: `(settings as a 3-vector, reason)` of every failed run.
    """

    MISLABEL = 0.03
    """Probability that a run's outcome has nothing to do with a window."""
    UNKNOWN_CAUSE = 0.25
    """The same for a failure whose reason names no edge: it moves the nearer edge, but gently."""
    FLOW_INSIDE = 0.1
    """Prior probability that a flow-ratio edge lies inside the envelope (the rig's bounds)."""
    FLOW_MISLABEL = 0.05
    HEAT_INSIDE = 0.2
    """Prior probability that the temperature edge lies inside the envelope, once a failure hints at it."""
    HEAT_MISLABEL = 0.05
    PENALTY = 0.9
    PENALTY_RADIUS = 0.07

    def __init__(self, preset: Preset, space: SearchSpace, ok: Tensor, failures: Sequence[tuple[Tensor, str]]) -> None:
        self.space = space
        low, high = (math.log(v) for v in preset.window_mg_ml)
        (c_low, c_high), (r_low, r_high) = space.bounds["concentration_mg_ml"], space.bounds["flow_ratio"]
        r_span = (math.log(r_low), math.log(r_high))
        self.concentration = Window(low, high, preset.window_log_sd, (math.log(c_low), math.log(c_high)))
        self.flow = Window.open_envelope(r_span, inside_mass=self.FLOW_INSIDE, margin=2.0)
        x_fail = torch.stack([f[0] for f in failures]) if failures else torch.empty(0, space.dim, dtype=torch.double)
        self.fail_points = space.to_unit(x_fail)
        log_ok = torch.log(ok[:, :2]) if len(ok) else torch.empty(0, 2, dtype=torch.double)
        for u_c, u_r in log_ok.tolist():
            self.concentration.inside(u_c, self.MISLABEL)
            self.flow.inside(u_r, self.MISLABEL)
        self.temperature = self._temperature_window(space, ok, failures)
        for x, reason in failures:
            u_c, u_r = math.log(float(x[0])), math.log(float(x[1]))
            edge = failure_edge(reason)
            if edge in ("other", "heat"):
                continue  # the local penalty (and the temperature window) keep the optimiser away
            if edge == "flow":
                # which side: relative to the runs that worked, else to the middle of the envelope
                middle = float(log_ok[:, 1].median()) if len(log_ok) else 0.5 * (r_span[0] + r_span[1])
                self.flow.outside(u_r, "low" if u_r < middle else "high", self.FLOW_MISLABEL)
                continue
            mislabel = self.MISLABEL if edge else self.UNKNOWN_CAUSE
            self.concentration.outside(u_c, edge or self.concentration.nearer_edge(u_c), mislabel)

    def _temperature_window(
        self, space: SearchSpace, ok: Tensor, failures: Sequence[tuple[Tensor, str]]
    ) -> Window | None:
        """An upper temperature edge on the unit temperature axis, or None while nothing hints at one.

        Heat failures pull the edge below them firmly; failures of unknown cause pull it gently when
        they happened hotter than the median run that worked (else the concentration window explains
        them); every run that worked pushes it above itself.
        """
        t_low, t_high = space.bounds["temperature_c"]
        scale = max(t_high - t_low, 1e-9)
        ok_t = sorted(float(t) for t in ok[:, 2]) if len(ok) else []
        middle = ok_t[len(ok_t) // 2] if ok_t else 0.5 * (t_low + t_high)
        evidence = []
        for x, reason in failures:
            edge, t = failure_edge(reason), float(x[2])
            if edge == "heat":
                evidence.append(((t - t_low) / scale, self.HEAT_MISLABEL))
            elif edge is None and t > middle:
                evidence.append(((t - t_low) / scale, self.UNKNOWN_CAUSE))
        if not evidence:
            return None
        window = Window.open_envelope((0.0, 1.0), inside_mass=self.HEAT_INSIDE, margin=1.0)
        window.log_low = torch.where(window.low_grid < 0.0, 0.0, -torch.inf)  # no lower edge
        for t in ok_t:
            window.inside((t - t_low) / scale, self.MISLABEL)
        for u, mislabel in evidence:
            window.outside(u, "high", mislabel)
        self._t_low, self._t_scale = t_low, scale
        return window

    def edge_temperature_c(self) -> float | None:
        """Posterior-mean upper temperature edge (°C), None while no failure hints at one."""
        if self.temperature is None:
            return None
        return self._t_low + self._t_scale * self.temperature.edges()[1]

    def edges_mg_ml(self) -> tuple[float, float]:
        """Posterior-mean concentration window edges, in mg/mL."""
        low, high = self.concentration.edges()
        return math.exp(low), math.exp(high)

    def prob(self, z: Tensor) -> Tensor:
        """P(feasible) at `... x 3` unit-cube points (`...`); differentiable in ``z``."""
        log_x = torch.log(self.space.from_unit(z)[..., :2])
        p = self.concentration.prob(log_x[..., 0]) * self.flow.prob(log_x[..., 1])
        if self.temperature is not None:
            p = p * self.temperature.prob(z[..., 2])
        if len(self.fail_points):
            d2 = ((z.unsqueeze(-2) - self.fail_points) ** 2).sum(-1)
            bump = self.PENALTY * torch.exp(-0.5 * d2 / self.PENALTY_RADIUS**2)
            p = p * torch.prod(1 - bump, dim=-1)
        return p
