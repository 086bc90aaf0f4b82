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
* **droplet**: flow ratio and, where present, capillary number, orifice width and temperature ->
  droplet diameter, with the log-linear law ``d_drop = k * w * r^-a * Ca^b * exp(b_T * (T - T_ref) / 10)``.
  Only the columns that are present and vary enter. The channel aspect ratio ``h/w`` is read as a
  numeric context (:data:`~supraopt.pastdata.CONTEXT_FIELDS`): the preset's ``[context_terms]`` give
  it its term ``(h/w)^c``, in both stages, as in campaigns. When the droplet law is the preset's own (flow ratio and
  temperature only, the preset's nozzle), its posterior becomes the SP stage's prior for the
  droplet parameters: then SP sizes identify the packing fraction separately.

**Contexts** (``--context``, :class:`supraopt.pastdata.Context`) enter as in campaigns
(:mod:`supraopt.context`, one implementation): a category gets per-level offsets on the parameter
the preset's ``[context_effects]`` says it moves, with a learned between-level sd; a number is a GP
input and, where the preset's ``[context_terms]`` names it (expansion ratio), a power-law term of
the size. Every context is also an input of the GP residual (past data pool devices whose regimes
differ in shape, not only in scale). ``seed_campaign`` carries both into the new campaign
(:meth:`FitResult.context_transfer`). Predictive variances are calibrated on leave-one-out
residuals (:func:`loo_scale`); :func:`holdout` fits a few runs and predicts the rest (``--train-rows``).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gpytorch
import numpy as np
import pandas as pd
import torch
from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from supraopt import physics
from supraopt.campaign import MIN_PDI_PCT, Campaign
from supraopt.context import (
    ContextEffect,
    LinearPart,
    PhysicsTerm,
    add_parts,
    effect_for,
    learn_tau,
    level_parts,
    load_effects,
    load_terms,
    term_for,
    term_part,
)
from supraopt.errors import InputError, SpecError
from supraopt.pastdata import CATEGORY, DROPLET_INPUTS, SP_INPUTS, Context, Runs, read_runs
from supraopt.physics import PhysicsFn, Preset
from supraopt.records import validate_context
from supraopt.space import SearchSpace
from supraopt.spec import SPEC_FILE, ContextVariable, Target, preset_path, read_toml
from supraopt.surrogate import (
    DEFAULT_N_PARTICLES,
    DROPLET_NOISE_SD,
    PDI_RESIDUAL,
    SIZE_RESIDUAL,
    WIDENED,
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
    "temperature_c": "droplet_temp_per_10c",
}
"""Droplet-law input -> its parameter (orifice width enters as ``w``, without a parameter)."""
UNKNOWN_DEVICE_LOG_K_SD = 3.0
"""Prior sd of ln k for droplet-only data without an orifice width: the preset's nozzle says nothing then."""
DROPLET_PRIORS = {"capillary_exponent_b": (-0.2, 0.1)}
"""Priors of the droplet-law terms the presets do not carry (SCIENCE.md section 3)."""


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


HYPER_SUBSET = 1000
"""Residual hyperparameters of a fit are set on at most this many runs (the campaign's GPs use 300): past-data
fits are one-off and pool devices, and a residual with that much structure needs more than a 300-run subset
to set its lengthscales (5-fold CV MAPE on the 998-run DAFD set 6.4 -> 6.0 %)."""


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
    parts: tuple[LinearPart, ...] = ()
    """Contexts in this outcome's physics: categories' level offsets, named numbers' power-law terms."""
    effects: Mapping[str, ContextEffect] = field(default_factory=dict)
    """Category -> its effect (the prior of its between-level sd)."""
    inflatable: tuple[str, ...] | None = None
    """Parameters whose prior the fit may widen (:attr:`PhysicsGP.inflatable`); None: all of ``names``."""

    def gp(self, space: InputBox | SearchSpace | JoinedBox, physics_only: bool = False) -> PhysicsGP:
        """The physics + GP model, or with the residual switched off (its misfit then counts as noise)."""
        residual = ResidualPrior(sd=1e-4, noise_sd=self.residual.sd) if physics_only else self.residual
        if space.dim > 3:
            # typical distances in a d-dimensional unit cube grow like sqrt(d): so does the prior lengthscale
            # (Hvarfner et al. 2024; BoTorch's default since 0.12), else extra inputs make small fits wiggly
            residual = replace(residual, lengthscale_mean=residual.lengthscale_mean * math.sqrt(space.dim / 3))
        gp = PhysicsGP(self.fn, self.prior, self.names, space, residual)
        gp.fit_subset = HYPER_SUBSET
        gp.inflatable = self.inflatable
        return add_parts(gp, self.parts) if self.parts else gp

    def fit(
        self, space: InputBox | SearchSpace | JoinedBox, z: Tensor, rows: Any, physics_only: bool = False
    ) -> PhysicsGP:
        """:meth:`gp` fitted to the runs ``rows`` (indices into ``z``), the between-level sds learned."""
        gp = self.gp(space, physics_only).fit(z[rows], self.y[rows], self.yvar[rows], relinearise=self.relinearise)
        levels: dict[str, set[int]] = {name: set() for name in self.effects}
        for part in self.parts:
            if part.context and bool((z[rows, part.column] > 0.5).any()):
                levels[part.context].add(part.column)
        seen = {name: len(columns) for name, columns in levels.items()}
        learn_tau(gp, z[rows], self.y[rows], self.effects, seen)
        return gp

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names + tuple(part.name for part in self.parts)


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


ContextPriors = tuple[Mapping[str, ContextEffect], Mapping[str, PhysicsTerm]]
"""A preset's ``[context_effects]`` and ``[context_terms]`` (:func:`context_priors`)."""


def context_priors(model: str) -> ContextPriors:
    """What the preset says contexts do: :func:`~supraopt.context.load_effects` and :func:`~supraopt.context.load_terms`."""
    return load_effects(model), load_terms(model)


def _parts(
    runs: Runs, names: Sequence[str], physics_names: Sequence[str], priors: ContextPriors, *, size: bool
) -> tuple[tuple[LinearPart, ...], dict[str, ContextEffect]]:
    """The contexts' parts of one outcome's physics (named numbers' terms, then categories' level offsets)
    and each category's effect. ``names``: the stage's inputs; ``physics_names``: the outcome's parameters."""
    effects, terms = priors
    parts: list[LinearPart] = []
    used: dict[str, ContextEffect] = {}
    if size:
        for context in runs.contexts:
            term = term_for(context.column, terms) if context.kind != CATEGORY else None
            if term is None or context.key not in names or term.parameter in physics_names:
                continue
            if bool((runs.ok()[context.key] > 0).all()):  # ln(value): a term only for positive values
                parts.append(term_part(term, names.index(context.key)))
    for context in runs.contexts:
        if context.kind == CATEGORY:
            effect = effect_for(context.column, effects)
            columns = [names.index(f"{context.column}={level}") for level in context.levels]
            found = level_parts(context.column, context.levels, columns, effect, physics_names, size=size)
            if found:
                parts += found
                used[context.column] = effect
    return tuple(parts), used


def sp_stage(runs: Runs, preset: Preset, priors: ContextPriors) -> Stage:
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
    size_parts = _parts(runs, inputs, physics.SIZE_PARAMETERS, priors, size=True)
    outcomes = [
        Outcome(
            "diameter_nm", "SP diameter", "nm", torch.log(diameter), size_noise_var(pdi, n), size_fn,
            physics.SIZE_PARAMETERS, preset.prior(physics.SIZE_PARAMETERS), SIZE_RESIDUAL, 0,
            *size_parts, inflatable=preset.inflatable(physics.SIZE_PARAMETERS),
        )
    ]  # fmt: skip
    if "pdi_pct" in ok:
        outcomes.append(
            Outcome(
                "pdi_pct", "PDI", "%", torch.log(pdi), pdi_noise_var(n), pdi_fn,
                physics.PDI_PARAMETERS, preset.prior(physics.PDI_PARAMETERS), PDI_RESIDUAL, 1,
                *_parts(runs, inputs, physics.PDI_PARAMETERS, priors, size=False),
            )
        )  # fmt: skip
    return Stage("supraparticle", inputs, x, box, tuple(ok["row"]), tuple(outcomes), contexts=runs.contexts)


def _column(frame: pd.DataFrame, name: str, default: float) -> Tensor:
    values = frame[name].to_numpy(float) if name in frame else np.full(len(frame), default)
    return torch.tensor(values, dtype=torch.double)


def droplet_law(inputs: Sequence[str], width_um: float | None, reference_temperature_c: float) -> PhysicsFn:
    """``ln d_drop = ln k + ln w - a ln r + b ln Ca + b_T (T - T_ref)/10`` over the given inputs.

    ``theta`` holds ``ln k`` then one parameter per input in :data:`DROPLET_TERMS` order; the orifice
    width comes from the inputs when it varies, else it is the constant ``width_um``. (Numeric contexts
    the physics names, e.g. the aspect and expansion ratios, are added as parts: :func:`_parts`.)
    """
    terms = [(inputs.index(name), name) for name in DROPLET_TERMS if name in inputs]
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


def droplet_stage(runs: Runs, preset: Preset, priors: ContextPriors) -> Stage | None:
    """Flow ratio and whatever else varies (Ca, orifice width, temperature) -> droplet diameter.

    Contexts follow: numbers the preset names get a power-law term, every number is a GP input, every
    category per-level offsets where its effect is in the droplet law (``log_droplet_k`` or the scale;
    an NC batch moves no droplet) and 0/1 GP inputs. None when no input varies.
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
    names = ("log_droplet_k", *(DROPLET_TERMS[c] for c in DROPLET_TERMS if c in inputs))
    pairs = [preset.priors.get(n) or DROPLET_PRIORS[n] for n in names]
    if not runs.has_sp and "orifice_width_um" not in ok:  # someone else's device, width unknown: k * w is too
        pairs[0] = (pairs[0][0], UNKNOWN_DEVICE_LOG_K_SD)
    prior = tuple(torch.tensor(column, dtype=torch.double) for column in zip(*pairs, strict=True))
    x = torch.tensor(ok[list(settings)].to_numpy(float), dtype=torch.double)
    x = torch.cat([x, x_extra], -1)
    y = torch.log(torch.tensor(ok["droplet_um"].to_numpy(float), dtype=torch.double))
    law = droplet_law(inputs, width, preset.reference_temperature_c)
    outcome = Outcome(
        "droplet_um", "droplet diameter", "µm", y, torch.full_like(y, DROPLET_NOISE_SD**2),
        law, names, (prior[0], prior[1]), DROPLET_RESIDUAL, 0, *_parts(runs, inputs, names, priors, size=True),
    )  # fmt: skip
    own = set(outcome.all_names) <= set(physics.DROPLET_PARAMETERS) and width == preset.nozzle_um
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
    gps: dict[str, PhysicsGP]
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
            gp = o.fit(stage.space, z, slice(None))
            mean, cov = gp.parameter_posterior(z, o.y)
            gps[o.column] = gp
            # the level offsets' prior sd is their between-level sd as learned
            posteriors[o.column] = Posterior(gp.names, gp.prior_mean.clone(), gp.prior_sd.clone(), mean, cov)
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
                gp = o.fit(stage.space, z, train, physics_only=model == "physics only")
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
                used = []
                for o in stage.stage.outcomes:
                    gp = stage.gps[o.column]
                    for parameter in dict.fromkeys(p.parameter for p in o.parts if p.context == context.column):
                        i = gp.names.index(f"{parameter}[{context.column}={context.levels[0]}]")
                        used.append(
                            f"offsets on {parameter} of {o.column} (between-level sd {float(gp.prior_sd[i]):.3g})"
                        )
                    if context.key in stage.stage.inputs:
                        column = stage.stage.inputs.index(context.key)
                        used += [
                            f"power-law term {p.name} of {o.column}"
                            for p in o.parts
                            if p.reference and p.column == column
                        ]
                kind = f"category, {len(context.levels)} levels" if context.kind == CATEGORY else "number"
                how = "; ".join([*used, "GP input"])
                lines.append(f"{stage.stage.name} stage: {context.column} ({kind}): {how}")
        return lines

    def context_transfer(self, floor: float = TRANSFER_FLOOR) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        """What ``--into`` carries of the contexts: the new campaign's ``[context]`` (name -> kind), and the
        preset's ``[context_effects]`` and ``[context_terms]`` entries the fit learned.

        A category's entry holds its fitted between-level sd as ``tau`` and every level's offset as
        ``levels`` (posterior mean, sd at least ``floor`` x tau: another day), so a known chip starts
        calibrated and a new one from the population. A named number's term carries its exponent.
        """
        fitted = self.sp if self.sp is not None else self.droplet
        kinds = {c.column: c.kind for c in self.runs.contexts}
        effects: dict[str, Any] = {}
        terms: dict[str, Any] = {}
        if fitted is None:
            return kinds, effects, terms
        for o in fitted.stage.outcomes:
            gp, post = fitted.gps[o.column], fitted.posteriors[o.column]
            for context in self.runs.contexts:
                parts = [p for p in o.parts if p.context == context.column]
                if not parts:
                    continue
                parameter = parts[0].parameter
                tau = float(gp.prior_sd[gp.names.index(parts[0].name)])
                levels = {}
                for level in context.levels:
                    i = post.names.index(f"{parameter}[{context.column}={level}]")
                    levels[level] = [_round(float(post.mean[i])), _round(max(float(post.sd[i]), floor * tau))]
                effect = o.effects[context.column]
                effects[context.column.lower()] = {
                    "parameters": [parameter],
                    "tau": _round(tau),
                    "tau_log_sd": effect.tau_log_sd,
                    "levels": levels,
                }
            for part in o.parts:
                if part.reference is not None:
                    column = fitted.stage.inputs[part.column]
                    i = post.names.index(part.name)
                    sd = max(float(post.sd[i]), floor * part.prior[1])
                    name = next(c.column for c in self.runs.contexts if c.key == column)
                    terms[name] = {
                        "parameter": part.name,
                        "prior": [_round(float(post.mean[i])), _round(sd)],
                        "reference": part.reference,
                    }
        return kinds, effects, terms

    def prior_updates(self, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
        """Preset parameter -> (posterior mean, max(posterior sd, floor x preset sd)) for a new campaign."""
        base = Preset.load(self.model)
        problem = transfer_problem(self.runs, self.model)
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
                if name not in base.priors:  # a context's level offsets and terms: see context_transfer
                    continue
                sd = max(float(p.sd[i]), floor * base.priors[name][1])
                updates[name] = (float(p.mean[i]), sd)
        return updates


def transfer_problem(runs: Runs, model: str) -> str | None:
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
    preset = Preset.load(model)
    stage = droplet_stage(runs, preset, context_priors(model)) if runs.has_droplets else None
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
    problem = transfer_problem(runs, model)
    if problem is not None:
        raise InputError(problem)
    for context in runs.contexts:
        try:
            validate_context({context.column: "x"}, "--context")
        except InputError as error:
            raise InputError(f"{error} --into declares it in campaign.toml [context]: rename the column.") from None


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
    priors = context_priors(model)
    notes = list(runs.notes)
    droplet = sp = feasibility = None
    if runs.has_droplets:
        stage = droplet_stage(runs, preset, priors)
        if stage is None:
            notes.append("droplet diameters are given, but no flow condition varies: no droplet-stage fit.")
        else:
            droplet = fit_stage(stage, folds, seed)
    if runs.has_sp:
        if droplet is not None and droplet.stage.own_law:
            # the SP stage's CV then starts from droplet sizes of every run, held-out ones included:
            # a small leak, of a different measurement (droplets), never of the SP sizes it predicts
            post = droplet.posteriors["droplet_um"]
            droplet_law = {n: (float(post.mean[i]), float(post.sd[i])) for i, n in enumerate(post.names)}
            preset = preset.with_priors(droplet_law, measured=True)
            notes.append("two-stage fit: the droplet-stage posterior is the SP stage's prior for the droplet law.")
        else:
            notes.append(
                "from SP diameters alone only log_droplet_k - log_phi_inorg/3 and droplet_temp_per_10c + "
                "packing_temp_per_10c are identified; their parts lean on the priors (droplet sizes would split them)."
            )
        stage = sp_stage(runs, preset, priors)
        sp = fit_stage(stage, folds, seed)
        failed = runs.frame[runs.frame["failed"] != ""]
        x_failed = torch.tensor(failed[list(SP_INPUTS)].to_numpy(float), dtype=torch.double).reshape(-1, 3)
        failures = list(zip(x_failed, failed["failed"], strict=True))
        space = stage.space.head if isinstance(stage.space, JoinedBox) else stage.space
        assert isinstance(space, SearchSpace)  # sp_stage's space is the campaign kind (then its contexts)
        feasibility = FeasibilityModel(preset, space, stage.x[:, : space.dim], failures)
    fitted_stages = [s for s in (sp, droplet) if s is not None]
    for fitted in fitted_stages:
        for column, gp in fitted.gps.items():
            if gp.inflation > WIDENED:
                notes.append(
                    f"{fitted.stage.name} stage, {column}: the runs lie far outside {model}'s prior; the fit widened "
                    f"its parameter sds {gp.inflation**0.5:.1f}x to follow them (a preset closer to this rig would "
                    "predict better from few runs)."
                )
        if fitted.cv is None:
            notes.append(f"{fitted.stage.name} stage: no cross-validation (fewer than 4 runs, or --folds below 2).")
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


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _key(key: str) -> str:
    """A TOML key: bare when it can be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


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
        return "{ " + ", ".join(f"{_key(str(key))} = {_toml(v)}" for key, v in value.items()) + " }"
    raise InputError(f"cannot write {value!r} to a preset file.")


def write_prior(result: FitResult, path: Path, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
    """Write a full preset file: the fitted model's tables with ``[priors]`` replaced by the fit."""
    data = read_toml(preset_path(result.model))
    updates = result.prior_updates(floor)
    priors = {name: list(pair) for name, pair in data["priors"].items()}
    priors.update({name: [float(f"{mean:.6g}"), float(f"{sd:.6g}")] for name, (mean, sd) in updates.items()})
    _, effects, terms = result.context_transfer(floor)
    if effects:
        data["context_effects"] = {**data.get("context_effects", {}), **effects}
    if terms:
        data["context_terms"] = {**data.get("context_terms", {}), **terms}
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
        lines += [f"{_key(key)} = {_toml(value)}" for key, value in source.items()]
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
    kinds, _, _ = result.context_transfer()
    directory.mkdir(parents=True, exist_ok=True)
    write_prior(result, directory / PRIOR_FILE)
    context = {name: ContextVariable(kind) for name, kind in kinds.items()}
    return Campaign.create(directory, PRIOR_FILE, target_nm, context=context, **options)


def transfer_summary(result: FitResult) -> list[str]:
    """What ``--into`` carried into the new campaign, one line per item (for the command's output)."""
    kinds, effects, terms = result.context_transfer()
    lines = [f"physics priors: {', '.join(result.prior_updates())}"]
    for name, kind in kinds.items():
        effect, term = effects.get(name.lower()), terms.get(name)
        if effect is not None:
            levels = ", ".join(f"{level} {mean:+.3g} ± {sd:.2g}" for level, (mean, sd) in effect["levels"].items())
            how = (
                f"level offsets on {effect['parameters'][0]} ({levels}; a new level starts from the population, "
                f"between-level sd {effect['tau']:.3g})"
            )
        elif term is not None:
            how = f"power-law term {term['parameter']} {term['prior'][0]:.3g} ± {term['prior'][1]:.2g}"
        else:
            how = "declared only (a GP input once runs state it)"
        lines.append(f"context {name} ({kind}) in campaign.toml [context]: {how}")
    return lines


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
    "transfer_summary",
    "write_prior",
    "write_tables",
]
