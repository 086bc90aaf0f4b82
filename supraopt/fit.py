"""Learning from past experiments: read a table of runs, fit the physics, cross-validate, seed a campaign.

The flow, one function per step::

    read_runs(path, preset)      CSV / Parquet -> Runs (supraopt.pastdata): canonical columns and units
    fit_runs(runs, model)        -> FitResult: per stage, physics parameters (MAP + Laplace) and a GP
                                    residual; cross_validate compares physics only, GP only, physics + GP
    seed_campaign(result, DIR)   DIR/prior.toml (the preset with the fitted priors) + a new campaign

Two stages, fitted when the data hold them (SCIENCE.md section 3: fit the droplet stage directly
when the rig measures droplets):

* **supraparticle**: concentration, flow ratio, temperature -> SP diameter and polydispersity, with
  :func:`supraopt.surrogate.size_gp` / :func:`~supraopt.surrogate.pdi_gp` (droplet law + mass balance).
* **droplet**: flow ratio and, where present, capillary number, orifice width, channel aspect
  ratio and temperature -> droplet diameter, with the log-linear law
  ``d_drop = k * w * r^-a * Ca^b * (h/w)^c * exp(b_T * (T - T_ref) / 10)``. Only the columns that
  are present and vary enter. When the droplet law is the preset's own (flow ratio and
  temperature only, the preset's nozzle), its posterior becomes the SP stage's prior for the
  droplet parameters: then SP sizes identify the packing fraction separately.

**Contexts** (``--context``, :class:`supraopt.pastdata.Context`): a category gets per-level offsets on
the parameter it moves (:data:`OFFSET_TARGETS`), extra linear parameters of the linearised physics
with a learned between-level sd (:class:`LevelOffsets`, :class:`ContextGP`); a number is a GP input
and, where the droplet law names it (:data:`DROPLET_CONTEXT_TERMS`), a power-law term. Predictive
variances are calibrated on leave-one-out residuals (:func:`loo_scale`); :func:`holdout` fits a few
runs and predicts the rest (``--train-rows``).

The physics parameters of the size laws enter linearly on the log scale, so their Laplace
posterior from :meth:`~supraopt.surrogate.PhysicsGP.parameter_posterior` is exact (given the GP
residual's hyperparameters); for the polydispersity law it is a Gauss-Newton approximation.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gpytorch
import numpy as np
import pandas as pd
import torch
from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from gpytorch.kernels import Kernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import LogNormalPrior
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from supraopt import physics
from supraopt.campaign import MIN_PDI_PCT, Campaign
from supraopt.errors import InputError, SpecError
from supraopt.pastdata import CATEGORY, DROPLET_INPUTS, SP_INPUTS, Context, Runs, read_runs
from supraopt.physics import PhysicsFn, Preset
from supraopt.space import SearchSpace
from supraopt.spec import SPEC_FILE, Target, preset_path, read_toml
from supraopt.surrogate import (
    DEFAULT_N_PARTICLES,
    DROPLET_NOISE_SD,
    PDI_RESIDUAL,
    SIZE_RESIDUAL,
    FeasibilityModel,
    PhysicsGP,
    ResidualPrior,
    pdi_noise_var,
    size_noise_var,
)

PRIOR_FILE = "prior.toml"
TRANSFER_FLOOR = 0.5
"""A seeded campaign's prior sd is at least this fraction of the preset's: another day, another chip."""
Z90 = 1.6448536269514722
MODELS = ("physics only", "GP only", "physics + GP")

DROPLET_RESIDUAL = ResidualPrior(sd=0.15, noise_sd=0.1)
"""Droplet stage: regime changes (dripping -> jetting) move sizes by tens of percent, and published
data sets pool devices whose differences the columns do not hold: a broad prior on the extra noise."""
DROPLET_TERMS = {
    "flow_ratio": "droplet_exponent_a",
    "capillary_number": "capillary_exponent_b",
    "aspect_ratio": "aspect_exponent_c",
    "temperature_c": "droplet_temp_per_10c",
}
"""Droplet-law input -> its parameter (orifice width enters as ``w``, without a parameter)."""
UNKNOWN_DEVICE_LOG_K_SD = 3.0
"""Prior sd of ln k for droplet-only data without an orifice width: the preset's nozzle says nothing then."""
DROPLET_PRIORS = {
    "capillary_exponent_b": (-0.2, 0.1),
    "aspect_exponent_c": (0.0, 0.3),
    "expansion_exponent_e": (0.0, 0.3),
}
"""Priors of the droplet-law terms the presets do not carry (SCIENCE.md section 3)."""
DROPLET_CONTEXT_TERMS = {"expansionratio": "expansion_exponent_e", "expansion": "expansion_exponent_e"}
"""Numeric context columns (name key: lower case, letters and digits) the droplet law names: a power-law term
``(value)^e``. Orifice width and aspect ratio are fields already (``--map``)."""
OFFSET_TARGETS = {"droplet_um": ("log_droplet_k", 1.0), "diameter_nm": ("log_phi_inorg", -1.0 / 3.0)}
"""Outcome -> the physics parameter a categorical context shifts per level, and d(log outcome)/d(parameter):
a chip or regime moves the droplet prefactor, an NC batch the packing (the size scale of the SPs)."""
BETWEEN_LEVEL_SD = 0.15
"""Prior median of the between-level sd of a category's offsets, as the log-size change it causes: another
chip moves droplets by 10-20 % (a chip swap; SCIENCE.md section 3); log-normal prior with a log-sd of 1, so 0.05-0.4 are all plausible."""


# --- stages: inputs, outcomes, physics ------------------------------------------------------------


class InputBox:
    """Unit-cube map of a stage's inputs over the data's range: log axes, temperature linear.

    ``linear`` names further inputs on a linear axis (a numeric context with values <= 0), ``indicator``
    the 0/1 columns of a category's levels, passed through unchanged.
    """

    def __init__(
        self, names: Sequence[str], x: Tensor, linear: Sequence[str] = (), indicator: Sequence[str] = ()
    ) -> None:
        self.names = tuple(names)
        flat = {"temperature_c", *linear, *indicator}
        self._log = torch.tensor([n not in flat for n in self.names])
        warped = torch.where(self._log, torch.log(x), x)
        self._low = warped.min(0).values
        width = warped.max(0).values - self._low
        self._width = torch.where(width > 0, width, torch.ones_like(width))
        fixed = torch.tensor([n in indicator for n in self.names])
        self._low = torch.where(fixed, torch.zeros_like(self._low), self._low)
        self._width = torch.where(fixed, torch.ones_like(self._width), self._width)

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_unit(self, x: Tensor) -> Tensor:
        return (torch.where(self._log, torch.log(x.clamp_min(1e-300)), x) - self._low) / self._width

    def from_unit(self, z: Tensor) -> Tensor:
        warped = self._low + z * self._width
        return torch.where(self._log, torch.exp(warped), warped)


class JoinedBox:
    """The campaign's search space for the first three inputs, an :class:`InputBox` for the context columns."""

    def __init__(self, head: SearchSpace, tail: InputBox) -> None:
        self.head, self.tail = head, tail

    @property
    def dim(self) -> int:
        return self.head.dim + self.tail.dim

    def to_unit(self, x: Tensor) -> Tensor:
        k = self.head.dim
        return torch.cat([self.head.to_unit(x[..., :k]), self.tail.to_unit(x[..., k:])], -1)

    def from_unit(self, z: Tensor) -> Tensor:
        k = self.head.dim
        return torch.cat([self.head.from_unit(z[..., :k]), self.tail.from_unit(z[..., k:])], -1)


@dataclass(frozen=True)
class LevelOffsets:
    """A category's per-level offsets on one physics parameter, with a learned between-level sd.

    The offsets are extra linear parameters of the linearised physics: level ``l``'s Jacobian column is
    its 0/1 indicator times ``gain`` (the shifted parameter's column, constant for the log-linear size
    laws). Their prior is ``N(0, (sd / gain)^2)`` with ``sd`` (on the log-outcome scale) a hyperparameter
    fitted with the GP's, under a log-normal prior: hierarchical shrinkage, a level with few runs stays
    near the population.
    """

    context: str
    parameter: str
    gain: float
    levels: tuple[str, ...]
    columns: tuple[int, ...]
    """Indices of the levels' indicator columns among the stage's inputs."""
    prior_sd: float = BETWEEN_LEVEL_SD

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{self.parameter}[{self.context}={level}]" for level in self.levels)


class LevelOffsetKernel(Kernel):
    """``sd^2 * [same level]``: the covariance per-level offsets of a category induce on a log outcome."""

    def __init__(self, offsets: LevelOffsets) -> None:
        super().__init__()
        self.columns = list(offsets.columns)
        self.register_parameter("raw_between_sd", torch.nn.Parameter(torch.tensor(math.log(offsets.prior_sd))))
        self.register_prior(
            "between_sd_prior",
            LogNormalPrior(math.log(offsets.prior_sd), 1.0),
            lambda m: m.between_sd,
            lambda m, v: m.initialize(raw_between_sd=torch.log(torch.as_tensor(v, dtype=torch.double))),
        )  # the setter lets BoTorch restart a failed fit from a draw of the prior

    @property
    def between_sd(self) -> Tensor:
        return torch.exp(self.raw_between_sd)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params: object) -> Tensor:
        a, b = x1[..., self.columns], x2[..., self.columns]
        scale = self.between_sd**2
        if diag:
            return scale * (a * b).sum(-1)
        return scale * (a @ b.transpose(-1, -2))


HYPER_SUBSET = 1000
"""Residual hyperparameters of a fit are set on at most this many runs (the campaign's GPs use 300)."""


class ContextGP(PhysicsGP):
    """:class:`~supraopt.surrogate.PhysicsGP` with per-level offsets of categorical contexts (fit layer only).

    The physics parameters and the offsets are integrated out together; :meth:`parameter_posterior`
    returns both (offsets last, in parameter units).
    """

    fit_subset = HYPER_SUBSET
    """Past-data fits are one-off and pool devices: a residual with that much structure needs more than
    a 300-run subset to set its lengthscales (5-fold CV MAPE on the 998-run DAFD set 6.4 -> 6.0 %)."""

    def __init__(self, *args: Any, offsets: Sequence[LevelOffsets] = (), **kwargs: Any) -> None:
        self.offsets = tuple(offsets)
        super().__init__(*args, **kwargs)

    def _modules(self) -> tuple[Any, Kernel]:
        mean, kernel = super()._modules()
        for offsets in self.offsets:
            kernel = kernel + LevelOffsetKernel(offsets)
        return mean, kernel.to(torch.double)

    def between_sds(self) -> list[float]:
        """The fitted between-level sd of each category (log-outcome scale)."""
        if self.model is None:
            return [o.prior_sd for o in self.offsets]
        kernels = [k for k in self.model.covar_module.kernels if isinstance(k, LevelOffsetKernel)]
        return [float(k.between_sd.detach()) for k in kernels]

    def parameter_posterior(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and covariance of the physics parameters, then every level's offset."""
        if not self.offsets:
            return super().parameter_posterior(z, y)
        sds = self.between_sds()
        var = torch.cat(
            [self.prior_sd**2]
            + [
                torch.full((len(o.levels),), (sd / abs(o.gain)) ** 2, dtype=torch.double)
                for o, sd in zip(self.offsets, sds, strict=True)
            ]
        )
        prior_mean = torch.cat([self.prior_mean, torch.zeros(len(var) - len(self.prior_mean), dtype=torch.double)])
        if self.model is None or z.shape[0] == 0:
            return prior_mean, torch.diag(var)
        with torch.no_grad():
            model = self.model
            j = physics.jacobian(self.fn, self.space.from_unit(z), self.theta_lin)
            j = torch.cat([j] + [o.gain * z[:, list(o.columns)] for o in self.offsets], -1)
            k = model.covar_module(z).to_dense() + torch.diag(model.likelihood.noise.reshape(-1))
            chol = torch.linalg.cholesky(k + 1e-9 * torch.eye(len(k), dtype=k.dtype))
            resid = (y - model.mean_module(z)).unsqueeze(-1)
            sj = j * var
            a = torch.cholesky_solve(sj, chol)
            mean = prior_mean + (a.transpose(0, 1) @ resid).squeeze(-1)
            cov = torch.diag(var) - sj.transpose(0, 1) @ a
        return mean, 0.5 * (cov + cov.T)


@dataclass(frozen=True)
class Outcome:
    """One log-scale outcome of a stage and the physics that explains it."""

    column: str
    label: str
    unit: str
    y: Tensor
    """`n` natural logs of the measured values."""
    yvar: Tensor
    """`n` measurement-noise variances of ``y``."""
    fn: PhysicsFn
    names: tuple[str, ...]
    prior: tuple[Tensor, Tensor]
    residual: ResidualPrior
    relinearise: int = 0
    offsets: tuple[LevelOffsets, ...] = ()
    """Categorical contexts' per-level offsets on this outcome's physics."""

    def gp(self, space: InputBox | SearchSpace | JoinedBox, physics_only: bool = False) -> ContextGP:
        """The physics + GP model, or with the residual switched off (its misfit then counts as noise)."""
        residual = ResidualPrior(sd=1e-4, noise_sd=self.residual.sd) if physics_only else self.residual
        if space.dim > 3:
            # typical distances in a d-dimensional unit cube grow like sqrt(d): so does the prior lengthscale
            # (Hvarfner et al. 2024; BoTorch's default since 0.12), else extra inputs make small fits wiggly
            residual = replace(residual, lengthscale_mean=residual.lengthscale_mean * math.sqrt(space.dim / 3))
        return ContextGP(self.fn, self.prior, self.names, space, residual, offsets=self.offsets)

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names + tuple(n for o in self.offsets for n in o.names)


@dataclass(frozen=True)
class Stage:
    """What one stage's fit sees: `n x d` physical inputs, their unit-cube map and the outcomes."""

    name: str
    inputs: tuple[str, ...]
    x: Tensor
    space: InputBox | SearchSpace | JoinedBox
    rows: tuple[int, ...]
    outcomes: tuple[Outcome, ...]
    own_law: bool = False
    """A droplet stage whose law is the preset's own (flow ratio and temperature, the preset's nozzle)."""
    contexts: tuple[Context, ...] = ()
    """Context columns the stage uses (numbers as inputs after the settings, categories as 0/1 columns)."""

    @property
    def z(self) -> Tensor:
        return self.space.to_unit(self.x)


def context_columns(runs: Runs, ok: pd.DataFrame) -> tuple[list[str], Tensor, list[str], list[str]]:
    """The contexts as input columns: names, `n x m` values, names on a linear axis, indicator names.

    A number is one column (log axis when all values are positive); a category one 0/1 column per level.
    """
    names: list[str] = []
    columns: list[np.ndarray] = []
    linear: list[str] = []
    indicator: list[str] = []
    for context in runs.contexts:
        values = ok[context.key]
        if context.kind == CATEGORY:
            for level in context.levels:
                names.append(f"{context.column}={level}")
                indicator.append(names[-1])
                columns.append((values == level).to_numpy(float))
        else:
            names.append(context.key)
            columns.append(values.to_numpy(float))
            if (values <= 0).any():
                linear.append(context.key)
    x = torch.tensor(np.stack(columns, 1) if columns else np.zeros((len(ok), 0)), dtype=torch.double)
    return names, x, linear, indicator


def _offsets(runs: Runs, names: Sequence[str], outcome: str) -> tuple[LevelOffsets, ...]:
    """Per-level offsets of every category on the parameter it shifts for ``outcome``."""
    parameter, gain = OFFSET_TARGETS[outcome]
    found = []
    for context in runs.contexts:
        if context.kind == CATEGORY:
            columns = tuple(names.index(f"{context.column}={level}") for level in context.levels)
            found.append(LevelOffsets(context.column, parameter, gain, context.levels, columns))
    return tuple(found)


def sp_stage(runs: Runs, preset: Preset) -> Stage:
    """Concentration, flow ratio, temperature (and contexts) -> SP diameter (and PDI when measured)."""
    ok = runs.ok()
    everything = runs.frame  # failed runs widen the box: the feasibility map needs them inside it
    space = SearchSpace({p: (float(everything[p].min()), float(everything[p].max())) for p in SP_INPUTS})
    x = torch.tensor(ok[list(SP_INPUTS)].to_numpy(float), dtype=torch.double)
    extra, x_extra, linear, indicator = context_columns(runs, ok)
    inputs: tuple[str, ...] = SP_INPUTS
    box: SearchSpace | JoinedBox = space
    if extra:
        inputs = (*SP_INPUTS, *extra)
        box = JoinedBox(space, InputBox(extra, x_extra, linear, indicator))
        x = torch.cat([x, x_extra], -1)
    n = _column(ok, "n_particles", float(DEFAULT_N_PARTICLES))
    pdi = _column(ok, "pdi_pct", 5.0).clamp_min(MIN_PDI_PCT)

    def size_fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_sp_diameter_nm(x, theta, preset)

    def pdi_fn(x: Tensor, theta: Tensor) -> Tensor:
        return physics.log_pdi_pct(x, theta, preset)

    diameter = torch.tensor(ok["diameter_nm"].to_numpy(float), dtype=torch.double)
    outcomes = [
        Outcome(
            "diameter_nm", "SP diameter", "nm", torch.log(diameter), size_noise_var(pdi, n), size_fn,
            physics.SIZE_PARAMETERS, preset.prior(physics.SIZE_PARAMETERS), SIZE_RESIDUAL,
            offsets=_offsets(runs, inputs, "diameter_nm"),
        )
    ]  # fmt: skip
    if "pdi_pct" in ok:
        outcomes.append(
            Outcome(
                "pdi_pct", "PDI", "%", torch.log(pdi), pdi_noise_var(n), pdi_fn,
                physics.PDI_PARAMETERS, preset.prior(physics.PDI_PARAMETERS), PDI_RESIDUAL, relinearise=1,
            )
        )  # fmt: skip
    return Stage("supraparticle", inputs, x, box, tuple(ok["row"]), tuple(outcomes), contexts=runs.contexts)


def _column(frame: pd.DataFrame, name: str, default: float) -> Tensor:
    values = frame[name].to_numpy(float) if name in frame else np.full(len(frame), default)
    return torch.tensor(values, dtype=torch.double)


def droplet_law(
    inputs: Sequence[str],
    width_um: float | None,
    reference_temperature_c: float,
    extra_terms: Sequence[str] = (),
) -> PhysicsFn:
    """``ln d_drop = ln k + ln w - a ln r + b ln Ca + c ln(h/w) + b_T (T - T_ref)/10`` over the given inputs.

    ``theta`` holds ``ln k`` then one parameter per input in :data:`DROPLET_TERMS` order, then one
    power-law exponent per input named in ``extra_terms`` (numeric contexts the law names, e.g. the
    expansion ratio); the orifice width comes from the inputs when it varies, else it is the constant
    ``width_um``.
    """
    terms = [(inputs.index(name), name) for name in DROPLET_TERMS if name in inputs]
    terms += [(inputs.index(name), name) for name in extra_terms]
    width_index = inputs.index("orifice_width_um") if "orifice_width_um" in inputs else None

    def fn(x: Tensor, theta: Tensor) -> Tensor:
        log_w = torch.log(x[..., width_index]) if width_index is not None else math.log(width_um or 1.0)
        out = theta[..., 0:1] + log_w
        for j, (i, name) in enumerate(terms, start=1):
            value = x[..., i]
            if name == "flow_ratio":
                feature = -torch.log(value)
            elif name == "temperature_c":
                feature = (value - reference_temperature_c) / 10.0
            else:
                feature = torch.log(value)
            out = out + theta[..., j : j + 1] * feature
        return out

    return fn


def droplet_context_term(context: Context) -> str | None:
    """The droplet-law parameter a numeric context names (expansion ratio), else None."""
    key = re.sub(r"[^a-z0-9]", "", context.column.lower())
    return DROPLET_CONTEXT_TERMS.get(key) if context.kind != CATEGORY else None


def droplet_stage(runs: Runs, preset: Preset) -> Stage | None:
    """Flow ratio and whatever else varies (Ca, orifice width, aspect ratio, temperature) -> droplet diameter.

    Contexts follow: numbers the law names get a power-law term, every number is a GP input, every
    category per-level offsets on ``log_droplet_k`` (and 0/1 GP inputs). None when no input varies.
    """
    ok = runs.ok()
    settings = tuple(c for c in DROPLET_INPUTS if c in ok and ok[c].nunique() > 1)
    if not settings:
        return None
    width = None
    if "orifice_width_um" not in settings:
        width = float(ok["orifice_width_um"].iloc[0]) if "orifice_width_um" in ok else preset.nozzle_um
    extra, x_extra, linear, indicator = context_columns(runs, ok)
    inputs = (*settings, *extra)
    named = [(c.key, term) for c in runs.contexts if (term := droplet_context_term(c)) and c.key in inputs]
    names = (
        "log_droplet_k",
        *(DROPLET_TERMS[c] for c in DROPLET_TERMS if c in inputs),
        *(term for _, term in named),
    )
    pairs = [preset.priors.get(n) or DROPLET_PRIORS[n] for n in names]
    if not runs.has_sp and "orifice_width_um" not in ok:  # someone else's device, width unknown: k * w is too
        pairs[0] = (pairs[0][0], UNKNOWN_DEVICE_LOG_K_SD)
    prior = tuple(torch.tensor(column, dtype=torch.double) for column in zip(*pairs, strict=True))
    x = torch.tensor(ok[list(settings)].to_numpy(float), dtype=torch.double)
    x = torch.cat([x, x_extra], -1)
    y = torch.log(torch.tensor(ok["droplet_um"].to_numpy(float), dtype=torch.double))
    law = droplet_law(inputs, width, preset.reference_temperature_c, [key for key, _ in named])
    outcome = Outcome(
        "droplet_um", "droplet diameter", "µm", y, torch.full_like(y, DROPLET_NOISE_SD**2),
        law, names, (prior[0], prior[1]), DROPLET_RESIDUAL, offsets=_offsets(runs, inputs, "droplet_um"),
    )  # fmt: skip
    own = set(names) <= set(physics.DROPLET_PARAMETERS) and width == preset.nozzle_um
    box = InputBox(inputs, x, linear, indicator)
    return Stage("droplet", inputs, x, box, tuple(ok["row"]), (outcome,), own, runs.contexts)


# --- fitting and cross-validation ---------------------------------------------------------------


@dataclass(frozen=True)
class Posterior:
    """Physics parameters of one outcome: prior mean and sd, posterior mean and covariance."""

    names: tuple[str, ...]
    prior_mean: Tensor
    prior_sd: Tensor
    mean: Tensor
    cov: Tensor

    @property
    def sd(self) -> Tensor:
        return self.cov.diagonal().clamp_min(0).sqrt()

    def combination(self, weights: Mapping[str, float]) -> tuple[float, float]:
        """Posterior mean and sd of ``sum(w * theta)``, e.g. ``{'log_droplet_k': 1, 'log_phi_inorg': -1/3}``."""
        w = torch.tensor([weights.get(n, 0.0) for n in self.names], dtype=torch.double)
        return float(w @ self.mean), float((w @ self.cov @ w).clamp_min(0).sqrt())

    def table(self, stage: str) -> pd.DataFrame:
        rows = []
        for i, name in enumerate(self.names):
            mean, sd = float(self.mean[i]), float(self.sd[i])
            reads = f"{name[4:]} ≈ {math.exp(mean):.3g}" if name.startswith("log_") else ""
            rows.append(
                {
                    "stage": stage,
                    "parameter": name,
                    "prior_mean": float(self.prior_mean[i]),
                    "prior_sd": float(self.prior_sd[i]),
                    "posterior_mean": mean,
                    "posterior_sd": sd,
                    "sd_ratio": sd / float(self.prior_sd[i]),
                    "reads_as": reads,
                }
            )
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class CVResult:
    """k-fold cross-validation of the three models on one stage."""

    stage: str
    folds: int
    table: pd.DataFrame
    """One row per model (index), for each outcome: RMSE, MAPE (%) and coverage of the 90 % interval."""
    predictions: pd.DataFrame
    """Long format: row, outcome, model, measured, predicted, lower90, upper90 and the stage's inputs."""


@dataclass(frozen=True)
class StageFit:
    """One stage fitted to all its runs, with its cross-validation (None when skipped)."""

    stage: Stage
    gps: dict[str, ContextGP]
    """Outcome column -> the physics + GP model fitted to all runs."""
    posteriors: dict[str, Posterior]
    cv: CVResult | None
    interval_scales: dict[str, float] | None = None
    """Outcome column -> the leave-one-out variance factor of the fit to all runs (see :func:`loo_scale`)."""


@contextmanager
def quiet_fitting() -> Iterator[None]:
    """Fit on one thread, hiding the warnings the fit causes on purpose (each with its reason).

    The matrices are small (hundreds of runs): a second thread only adds contention, ten times
    slower on a busy two-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputDataWarning)  # log outcomes are modelled unstandardised on purpose
        warnings.simplefilter("ignore", NumericalWarning)  # jitter added to a nearly singular matrix; fit recovers
        warnings.simplefilter("ignore", OptimizationWarning)  # L-BFGS stops on a flat MAP surface; iterate usable
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def loo_scale(gp: PhysicsGP, z: Tensor, y: Tensor) -> float:
    """Variance factor that makes the fitted model's 90 % intervals cover 90 % of its leave-one-out residuals.

    The exact leave-one-out residuals of a GP at fixed hyperparameters, ``[K^-1 r]_i / [K^-1]_ii`` with
    variance ``1 / [K^-1]_ii``, say how well the model's own intervals fit runs it has not seen. On few
    runs the MAP hyperparameters fit the noise they were fitted on, and the intervals come out too
    narrow; this factor (a split-conformal quantile, with its finite-sample correction, so it widens
    more on fewer runs) puts them right. Clamped to [0.5, 25]: it corrects the scale, not the model.
    """
    n = z.shape[0]
    if gp.model is None or n < 4:
        return 1.0
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(20_000):
        model = gp.model
        k = model.covar_module(z).to_dense() + torch.diag(model.likelihood.noise.reshape(-1))
        chol = torch.linalg.cholesky(k + 1e-9 * torch.eye(n, dtype=k.dtype))
        inverse = torch.cholesky_inverse(chol)
        alpha = inverse @ (y - model.mean_module(z))
        score = (alpha / inverse.diagonal().sqrt()).abs()
    level = min(1.0, math.ceil((n + 1) * 0.9) / n)
    return float(min(max((float(torch.quantile(score, level)) / Z90) ** 2, 0.5), 25.0))


def _predict(gp: PhysicsGP, z: Tensor, yvar: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance of a new measurement (latent + data noise + learned extra noise)."""
    with torch.no_grad():
        mean, var = gp.moments(z)
        extra = gp.model.likelihood.second_noise_covar.noise.reshape(()) if gp.model is not None else 0.0
    return mean, scale * (var + yvar + extra)


def _gp_only(z: Tensor, y: Tensor, z_test: Tensor) -> tuple[Tensor, Tensor]:
    """BoTorch's default GP: constant mean, Matérn-5/2 ARD, standardised outcome, learned noise."""
    model = SingleTaskGP(z, y.unsqueeze(-1))
    with gpytorch.settings.max_cholesky_size(20_000):
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        with torch.no_grad():
            posterior = model.posterior(z_test, observation_noise=True)
    return posterior.mean.squeeze(-1), posterior.variance.squeeze(-1)


def fit_stage(stage: Stage, folds: int = 5, seed: int = 0) -> StageFit:
    """Fit each outcome's physics + GP to all runs, read off the parameter posterior, cross-validate."""
    z = stage.z
    gps, posteriors, scales = {}, {}, {}
    with quiet_fitting():
        for o in stage.outcomes:
            gp = o.gp(stage.space)
            gp.fit(z, o.y, o.yvar, relinearise=o.relinearise)
            mean, cov = gp.parameter_posterior(z, o.y)
            sds = [
                torch.full((len(off.levels),), sd / abs(off.gain))
                for off, sd in zip(o.offsets, gp.between_sds(), strict=True)
            ]
            prior_mean = torch.cat([o.prior[0], torch.zeros(len(mean) - len(o.prior[0]), dtype=torch.double)])
            prior_sd = torch.cat([o.prior[1], *sds]).to(torch.double)
            gps[o.column] = gp
            posteriors[o.column] = Posterior(o.all_names, prior_mean, prior_sd, mean, cov)
            scales[o.column] = loo_scale(gp, z, o.y)
    cv = cross_validate(stage, folds, seed) if folds >= 2 and len(stage.rows) >= 4 else None
    return StageFit(stage, gps, posteriors, cv, scales)


def _split_predictions(stage: Stage, train: np.ndarray, test: np.ndarray) -> list[pd.DataFrame]:
    """Fit the three models on ``train`` rows (indices into the stage), predict ``test``: long-format rows."""
    z = stage.z
    parts = []
    for o in stage.outcomes:
        for model in MODELS:
            if model == "GP only":
                mean, var = _gp_only(z[train], o.y[train], z[test])
            else:
                gp = o.gp(stage.space, physics_only=model == "physics only")
                gp.fit(z[train], o.y[train], o.yvar[train], relinearise=o.relinearise)
                mean, var = _predict(gp, z[test], o.yvar[test], loo_scale(gp, z[train], o.y[train]))
            mean, sd = mean.detach(), var.detach().clamp_min(1e-12).sqrt()
            part = pd.DataFrame(
                {
                    "row": np.asarray(stage.rows)[test],
                    "outcome": o.column,
                    "model": model,
                    "measured": torch.exp(o.y[test]).numpy(),
                    "predicted": torch.exp(mean).numpy(),
                    "lower90": torch.exp(mean - Z90 * sd).numpy(),
                    "upper90": torch.exp(mean + Z90 * sd).numpy(),
                }
            )
            for j, name in enumerate(stage.inputs):
                part[name] = stage.x[test, j].numpy()
            parts.append(part)
    return parts


def cross_validate(stage: Stage, folds: int = 5, seed: int = 0) -> CVResult:
    """k-fold CV (seeded split) of physics only, GP only and physics + GP on every outcome of a stage."""
    n = len(stage.rows)
    k = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    parts = []
    with quiet_fitting():
        for test in np.array_split(order, k):
            parts += _split_predictions(stage, np.setdiff1d(order, test), test)
    predictions = pd.concat(parts, ignore_index=True).sort_values(["outcome", "model", "row"], kind="stable")
    return CVResult(stage.name, k, _metrics(predictions, stage.outcomes), predictions.reset_index(drop=True))


@dataclass(frozen=True)
class HoldoutResult:
    """Fits on a few random runs predicting all the others, repeated: how a small data set really does."""

    stage: str
    train_rows: int
    draws: int
    table: pd.DataFrame
    """One row per model: the median over draws of each metric (MAPE, RMSE, 90 % coverage)."""
    per_draw: pd.DataFrame
    """The metrics of every draw (column 'draw')."""


def holdout(stage: Stage, train_rows: int, draws: int = 10, seed: int = 0) -> HoldoutResult:
    """Fit the three models on ``train_rows`` random runs, predict the rest; ``draws`` seeded repeats.

    Unlike k-fold CV on a small table, the held-out runs here are many (all the others), so the
    MAPE and the coverage of the 90 % intervals are measured, not guessed from a handful of folds.
    """
    n = len(stage.rows)
    if not 4 <= train_rows < n:
        raise InputError(
            f"--train-rows {train_rows} must be at least 4 and below the {n} runs of the {stage.name} stage."
        )
    tables = []
    with quiet_fitting():
        for draw in range(draws):
            order = np.random.default_rng([seed, draw]).permutation(n)
            parts = _split_predictions(stage, order[:train_rows], order[train_rows:])
            table = _metrics(pd.concat(parts, ignore_index=True), stage.outcomes)
            tables.append(table.reset_index().assign(draw=draw))
    per_draw = pd.concat(tables, ignore_index=True)
    summary = per_draw.drop(columns="draw").groupby("model", sort=False).median()
    return HoldoutResult(stage.name, train_rows, draws, summary.reindex(list(MODELS)), per_draw)


def _metrics(predictions: pd.DataFrame, outcomes: Sequence[Outcome]) -> pd.DataFrame:
    table = pd.DataFrame(index=pd.Index(MODELS, name="model"))
    for o in outcomes:
        sub = predictions[predictions["outcome"] == o.column]
        for model, g in sub.groupby("model"):
            error = g["predicted"] - g["measured"]
            table.loc[model, f"{o.label} RMSE ({o.unit})"] = float(np.sqrt((error**2).mean()))
            table.loc[model, f"{o.label} MAPE (%)"] = float((error.abs() / g["measured"]).mean() * 100)
            inside = (g["measured"] >= g["lower90"]) & (g["measured"] <= g["upper90"])
            table.loc[model, f"{o.label} 90% coverage"] = float(inside.mean())
    return table


@dataclass(frozen=True)
class FitResult:
    """Everything ``supraopt fit`` learned from a table of past runs."""

    runs: Runs
    model: str
    preset: Preset
    """The preset the SP stage started from (droplet-stage priors folded in when they apply)."""
    sp: StageFit | None
    droplet: StageFit | None
    feasibility: FeasibilityModel | None
    notes: tuple[str, ...]
    holdouts: tuple[HoldoutResult, ...] = ()
    """Fits on a few runs predicting the rest (``train_rows`` of :func:`fit_runs`), one per stage."""

    def stages(self) -> list[StageFit]:
        return [s for s in (self.sp, self.droplet) if s is not None]

    def parameters(self) -> pd.DataFrame:
        """Every fitted physics parameter, one row each: the preset's prior, the posterior and their sd ratio.

        The prior shown is the preset's, also where a two-stage fit started the SP stage from the
        droplet stage's posterior: the ratio then says how much all the data taught together.
        """
        table = pd.concat(
            [p.table(s.stage.name) for s in self.stages() for p in s.posteriors.values()], ignore_index=True
        )
        priors = {**DROPLET_PRIORS, **Preset.load(self.model).priors}
        table["prior_mean"] = [
            priors[n][0] if n in priors else m for n, m in zip(table["parameter"], table["prior_mean"], strict=True)
        ]
        table["prior_sd"] = [
            priors[n][1] if n in priors else sd for n, sd in zip(table["parameter"], table["prior_sd"], strict=True)
        ]
        table["sd_ratio"] = table["posterior_sd"] / table["prior_sd"]
        return table

    def context_summary(self) -> list[str]:
        """One line per context: how each stage used it (for the CV table's caption and fit.json)."""
        lines = []
        for stage in self.stages():
            for context in stage.stage.contexts:
                if context.kind == CATEGORY:
                    used = []
                    for column, gp in stage.gps.items():
                        offsets = next((o for o in gp.offsets if o.context == context.column), None)
                        if offsets is not None:
                            sd = gp.between_sds()[gp.offsets.index(offsets)]
                            used.append(
                                f"offsets on {offsets.parameter} (between-level sd of {column} {sd:.3g} on the log scale)"
                            )
                    how = "; ".join(used) or "GP input"
                    lines.append(
                        f"{stage.stage.name} stage: {context.column} (category, {len(context.levels)} levels): {how} and GP input"
                    )
                else:
                    term = droplet_context_term(context) if stage.stage.name == "droplet" else None
                    how = f"GP input and power-law term {term}" if term else "GP input"
                    lines.append(f"{stage.stage.name} stage: {context.column} (number): {how}")
        return lines

    def prior_updates(self, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
        """Preset parameter -> (posterior mean, max(posterior sd, floor x preset sd)) for a new campaign."""
        base = Preset.load(self.model)
        problem = transfer_problem(self.runs, base)
        if problem is not None:
            raise InputError(problem)
        if self.sp is not None:
            posteriors = list(self.sp.posteriors.values())
        else:
            assert self.droplet is not None  # transfer_problem says no when neither stage was fitted
            posteriors = list(self.droplet.posteriors.values())
        updates = {}
        for p in posteriors:
            for i, name in enumerate(p.names):
                if name not in base.priors:  # a context's level offsets: the campaign has no such level (yet)
                    continue
                sd = max(float(p.sd[i]), floor * base.priors[name][1])
                updates[name] = (float(p.mean[i]), sd)
        return updates


def transfer_problem(runs: Runs, preset: Preset) -> str | None:
    """Why a fit of these runs cannot seed a campaign on ``preset`` (``fit --into``), None when it can.

    Known before any fitting, so ``fit --into`` refuses at once. SP diameters always transfer. Droplet
    sizes alone transfer only the preset's own droplet law (flow ratio and temperature), and only when
    the data state the orifice width and it is the preset's nozzle: without a width, a fitted ``k``
    is ``k * w`` of some other device (a 150 µm chip read as the 5 µm nozzle puts ``log_droplet_k``
    many prior sds away and the first suggestion in a corner), so the preset's droplet law is kept
    and ``--into`` refuses rather than carry the other device's law in.
    """
    if runs.has_sp:
        return None
    stage = droplet_stage(runs, preset) if runs.has_droplets else None
    if stage is None:
        return "the droplet sizes have no varying flow condition, so there is nothing to transfer; --into needs SP diameters."
    same_law = set(stage.outcomes[0].all_names) <= set(physics.DROPLET_PARAMETERS)
    if same_law and not stage.own_law:
        width = float(runs.frame["orifice_width_um"].iloc[0])
        return (
            f"the droplets come from a {width:g} µm orifice, not the preset's {preset.nozzle_um:g} µm nozzle; --into "
            "keeps the preset's droplet law and refuses (--into needs SP diameters, or droplets from that nozzle)."
        )
    if not stage.own_law:
        return (
            "the droplet data use inputs the preset's droplet law lacks (capillary number, orifice width, aspect "
            "ratio, contexts), so there is no preset prior to update; --into needs SP diameters."
        )
    if "orifice_width_um" not in runs.frame:
        return (
            f"the droplet data give no orifice width, so their droplet law may be another device's; --into keeps "
            f"the preset's droplet law (nozzle {preset.nozzle_um:g} µm) and refuses: add a column with the orifice "
            "width (--map orifice_width=COLUMN) if they come from that nozzle, else --into needs SP diameters."
        )
    return None


def check_into(runs: Runs, model: str, directory: Path, target_nm: float) -> None:
    """Everything ``fit --into DIR --target-nm X`` needs, checked before the fit (nothing is written on a refusal)."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--into {directory} is a file; pick a new folder.")
    check_new_campaign_dir(directory)
    try:
        Target(float(target_nm))  # a bad target fails here, not after the fit
    except SpecError as error:
        raise InputError(f"--target-nm {target_nm:g}: {error}") from None
    problem = transfer_problem(runs, Preset.load(model))
    if problem is not None:
        raise InputError(problem)


def fit_runs(
    runs: Runs,
    model: str = "cspbbr3-flow-focusing",
    folds: int = 5,
    seed: int = 0,
    train_rows: int | None = None,
    draws: int = 10,
) -> FitResult:
    """Fit every stage the runs hold, droplet first (its posterior can inform the SP stage), with CV.

    Args:
        runs: from :func:`read_runs`.
        model: physics preset (name in ``models/`` or path) whose constants and priors to start from.
        folds: k of the k-fold cross-validation; below 2 skips it.
        seed: seeds the split into folds (and the draws of ``train_rows``).
        train_rows: when given, also fit on this many random runs and predict all the others,
            ``draws`` times (see :func:`holdout`): the small-data benchmark.
        draws: repeats of the ``train_rows`` fit.
    """
    preset = Preset.load(model)
    notes = list(runs.notes)
    droplet = sp = feasibility = None
    if runs.has_droplets:
        stage = droplet_stage(runs, preset)
        if stage is None:
            notes.append("droplet diameters are given, but no flow condition varies: no droplet-stage fit.")
        else:
            droplet = fit_stage(stage, folds, seed)
    if runs.has_sp:
        if droplet is not None and droplet.stage.own_law:
            # the SP stage's CV then starts from droplet sizes of every run, held-out ones included:
            # a small leak, of a different measurement (droplets), never of the SP sizes it predicts
            post = droplet.posteriors["droplet_um"]
            preset = preset.with_priors({n: (float(post.mean[i]), float(post.sd[i])) for i, n in enumerate(post.names)})
            notes.append("two-stage fit: the droplet-stage posterior is the SP stage's prior for the droplet law.")
        else:
            notes.append(
                "from SP diameters alone only log_droplet_k - log_phi_inorg/3 and droplet_temp_per_10c + "
                "packing_temp_per_10c are identified; their parts lean on the priors (droplet sizes would split them)."
            )
        stage = sp_stage(runs, preset)
        sp = fit_stage(stage, folds, seed)
        failed = runs.frame[runs.frame["failed"] != ""]
        x_failed = torch.tensor(failed[list(SP_INPUTS)].to_numpy(float), dtype=torch.double).reshape(-1, 3)
        failures = list(zip(x_failed, failed["failed"], strict=True))
        space = stage.space.head if isinstance(stage.space, JoinedBox) else stage.space
        assert isinstance(space, SearchSpace)  # sp_stage's space is the campaign kind (then its contexts)
        feasibility = FeasibilityModel(preset, space, stage.x[:, : space.dim], failures)
    for fitted in (sp, droplet):
        if fitted is not None and fitted.cv is None:
            notes.append(f"{fitted.stage.name} stage: no cross-validation (fewer than 4 runs, or --folds below 2).")
    fitted_stages = [s for s in (sp, droplet) if s is not None]
    holdouts = tuple(holdout(s.stage, train_rows, draws, seed) for s in fitted_stages) if train_rows else ()
    return FitResult(runs, model, preset, sp, droplet, feasibility, tuple(notes), holdouts)


# --- outputs and transfer -----------------------------------------------------------------------


def write_tables(result: FitResult, out: Path) -> list[Path]:
    """``parameters.csv``, ``cv_<stage>.csv``, ``cv_predictions.csv`` and ``fit.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "parameters.csv"]
    result.parameters().to_csv(written[0], index=False)
    cvs = [s.cv for s in result.stages() if s.cv is not None]
    for cv in cvs:
        path = out / f"cv_{cv.stage}.csv"
        cv.table.to_csv(path)
        written.append(path)
    if cvs:
        path = out / "cv_predictions.csv"
        pd.concat([cv.predictions.assign(stage=cv.stage) for cv in cvs]).to_csv(path, index=False)
        written.append(path)
    for h in result.holdouts:
        path = out / f"holdout_{h.stage}.csv"
        h.per_draw.to_csv(path, index=False)
        written.append(path)
    summary = {
        "source": result.runs.source,
        "model": result.model,
        "runs": len(result.runs.frame),
        "failed": int((result.runs.frame["failed"] != "").sum()),
        "columns": {k: {"column": c, "unit": u} for k, (c, u) in result.runs.mapping.items()},
        "notes": list(result.notes),
        "parameters": result.parameters().to_dict("records"),
        "cross_validation": {cv.stage: cv.table.reset_index().to_dict("records") for cv in cvs},
        "contexts": result.context_summary(),
        "unused_columns": {u.column: u.hint for u in result.runs.unused},
        "holdout": {
            h.stage: {"train_rows": h.train_rows, "draws": h.draws, "median": h.table.reset_index().to_dict("records")}
            for h in result.holdouts
        },
    }
    path = out / "fit.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    written.append(path)
    return written


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. a [context_effects] entry
        return "{ " + ", ".join(f"{key} = {_toml(v)}" for key, v in value.items()) + " }"
    raise InputError(f"cannot write {value!r} to a preset file.")


def write_prior(result: FitResult, path: Path, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
    """Write a full preset file: the fitted model's tables with ``[priors]`` replaced by the fit."""
    data = read_toml(preset_path(result.model))
    updates = result.prior_updates(floor)
    priors = {name: list(pair) for name, pair in data["priors"].items()}
    priors.update({name: [float(f"{mean:.6g}"), float(f"{sd:.6g}")] for name, (mean, sd) in updates.items()})
    lines = [
        f"# Fitted by 'supraopt fit' from {result.runs.source} ({len(result.runs.frame)} runs), starting from preset",
        f"# {result.model!r}. Priors: posterior mean, sd = max(posterior sd, {floor:g} x preset sd) to stay humble",
        "# about transfer between rigs and days. The past runs are carried by these priors, not by the ledger.",
        f"name = {_toml(str(data.get('name', 'preset')) + '-fitted')}",
        f"description = {_toml('Fitted from past runs: ' + str(data.get('description', '')))}",
    ]
    for table, values in data.items():
        if not isinstance(values, dict):
            continue
        lines += ["", f"[{table}]"]
        source = priors if table == "priors" else values
        lines += [f"{key} = {_toml(value)}" for key, value in source.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return updates


def check_new_campaign_dir(directory: Path) -> None:
    """Refuse a folder that already holds a campaign or a fitted prior (nothing is overwritten)."""
    if (directory / SPEC_FILE).exists() or (directory / PRIOR_FILE).exists():
        raise InputError(f"{directory} already holds a campaign or a {PRIOR_FILE}; pick a new folder for --into.")


def seed_campaign(result: FitResult, directory: str | Path, target_nm: float, **options: Any) -> Campaign:
    """A new campaign in ``directory`` whose preset is ``prior.toml``, written from the fit.

    The past runs are not copied into its ledger: they are in the prior already, and counting
    them twice would make the campaign overconfident.
    """
    directory = Path(directory)
    check_into(result.runs, result.model, directory, target_nm)
    result.prior_updates()  # fails early, before anything is written, when there is nothing to transfer
    directory.mkdir(parents=True, exist_ok=True)
    write_prior(result, directory / PRIOR_FILE)
    return Campaign.create(directory, PRIOR_FILE, target_nm, **options)


__all__ = [
    "CVResult",
    "FitResult",
    "Posterior",
    "Runs",
    "check_into",
    "check_new_campaign_dir",
    "cross_validate",
    "droplet_stage",
    "fit_runs",
    "read_runs",
    "seed_campaign",
    "sp_stage",
    "write_prior",
    "write_tables",
]
