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

The physics parameters of the size laws enter linearly on the log scale, so their Laplace
posterior from :meth:`~supraopt.surrogate.PhysicsGP.parameter_posterior` is exact (given the GP
residual's hyperparameters); for the polydispersity law it is a Gauss-Newton approximation.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
from supraopt.errors import InputError
from supraopt.pastdata import DROPLET_INPUTS, SP_INPUTS, Runs, read_runs
from supraopt.physics import PhysicsFn, Preset
from supraopt.space import SearchSpace
from supraopt.spec import SPEC_FILE, preset_path, read_toml
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
DROPLET_PRIORS = {"capillary_exponent_b": (-0.2, 0.1), "aspect_exponent_c": (0.0, 0.3)}
"""Priors of the droplet-law terms the presets do not carry (SCIENCE.md section 3)."""


# --- stages: inputs, outcomes, physics ------------------------------------------------------------


class InputBox:
    """Unit-cube map of a stage's inputs over the data's range: log axes, temperature linear."""

    def __init__(self, names: Sequence[str], x: Tensor) -> None:
        self.names = tuple(names)
        self._log = torch.tensor([n != "temperature_c" for n in self.names])
        warped = torch.where(self._log, torch.log(x), x)
        self._low = warped.min(0).values
        width = warped.max(0).values - self._low
        self._width = torch.where(width > 0, width, torch.ones_like(width))

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_unit(self, x: Tensor) -> Tensor:
        return (torch.where(self._log, torch.log(x.clamp_min(1e-300)), x) - self._low) / self._width

    def from_unit(self, z: Tensor) -> Tensor:
        warped = self._low + z * self._width
        return torch.where(self._log, torch.exp(warped), warped)


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

    def gp(self, space: InputBox | SearchSpace, physics_only: bool = False) -> PhysicsGP:
        """The physics + GP model, or with the residual switched off (its misfit then counts as noise)."""
        residual = ResidualPrior(sd=1e-4, noise_sd=self.residual.sd) if physics_only else self.residual
        return PhysicsGP(self.fn, self.prior, self.names, space, residual)


@dataclass(frozen=True)
class Stage:
    """What one stage's fit sees: `n x d` physical inputs, their unit-cube map and the outcomes."""

    name: str
    inputs: tuple[str, ...]
    x: Tensor
    space: InputBox | SearchSpace
    rows: tuple[int, ...]
    outcomes: tuple[Outcome, ...]
    own_law: bool = False
    """A droplet stage whose law is the preset's own (flow ratio and temperature, the preset's nozzle)."""

    @property
    def z(self) -> Tensor:
        return self.space.to_unit(self.x)


def sp_stage(runs: Runs, preset: Preset) -> Stage:
    """Concentration, flow ratio, temperature -> SP diameter (and PDI when measured)."""
    ok = runs.ok()
    everything = runs.frame  # failed runs widen the box: the feasibility map needs them inside it
    space = SearchSpace({p: (float(everything[p].min()), float(everything[p].max())) for p in SP_INPUTS})
    x = torch.tensor(ok[list(SP_INPUTS)].to_numpy(float), dtype=torch.double)
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
        )
    ]  # fmt: skip
    if "pdi_pct" in ok:
        outcomes.append(
            Outcome(
                "pdi_pct", "PDI", "%", torch.log(pdi), pdi_noise_var(n), pdi_fn,
                physics.PDI_PARAMETERS, preset.prior(physics.PDI_PARAMETERS), PDI_RESIDUAL, relinearise=1,
            )
        )  # fmt: skip
    return Stage("supraparticle", SP_INPUTS, x, space, tuple(ok["row"]), tuple(outcomes))


def _column(frame: pd.DataFrame, name: str, default: float) -> Tensor:
    values = frame[name].to_numpy(float) if name in frame else np.full(len(frame), default)
    return torch.tensor(values, dtype=torch.double)


def droplet_law(inputs: Sequence[str], width_um: float | None, reference_temperature_c: float) -> PhysicsFn:
    """``ln d_drop = ln k + ln w - a ln r + b ln Ca + c ln(h/w) + b_T (T - T_ref)/10`` over the given inputs.

    ``theta`` holds ``ln k`` then one parameter per input in :data:`DROPLET_TERMS` order; the orifice
    width comes from the inputs when it varies, else it is the constant ``width_um``.
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


def droplet_stage(runs: Runs, preset: Preset) -> Stage | None:
    """Flow ratio and whatever else varies (Ca, orifice width, aspect ratio, temperature) -> droplet diameter.

    None when no input varies (nothing to learn a law from).
    """
    ok = runs.ok()
    inputs = tuple(c for c in DROPLET_INPUTS if c in ok and ok[c].nunique() > 1)
    if not inputs:
        return None
    width = None
    if "orifice_width_um" not in inputs:
        width = float(ok["orifice_width_um"].iloc[0]) if "orifice_width_um" in ok else preset.nozzle_um
    names = ("log_droplet_k", *(DROPLET_TERMS[c] for c in DROPLET_TERMS if c in inputs))
    pairs = [preset.priors.get(n) or DROPLET_PRIORS[n] for n in names]
    if not runs.has_sp and "orifice_width_um" not in ok:  # someone else's device, width unknown: k * w is too
        pairs[0] = (pairs[0][0], UNKNOWN_DEVICE_LOG_K_SD)
    prior = tuple(torch.tensor(column, dtype=torch.double) for column in zip(*pairs, strict=True))
    x = torch.tensor(ok[list(inputs)].to_numpy(float), dtype=torch.double)
    y = torch.log(torch.tensor(ok["droplet_um"].to_numpy(float), dtype=torch.double))
    outcome = Outcome(
        "droplet_um", "droplet diameter", "µm", y, torch.full_like(y, DROPLET_NOISE_SD**2),
        droplet_law(inputs, width, preset.reference_temperature_c), names, (prior[0], prior[1]), DROPLET_RESIDUAL,
    )  # fmt: skip
    own = set(names) <= set(physics.DROPLET_PARAMETERS) and width == preset.nozzle_um
    return Stage("droplet", inputs, x, InputBox(inputs, x), tuple(ok["row"]), (outcome,), own)


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


def _predict(gp: PhysicsGP, z: Tensor, yvar: Tensor) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance of a new measurement (latent + data noise + learned extra noise)."""
    with torch.no_grad():
        mean, var = gp.moments(z)
        extra = gp.model.likelihood.second_noise_covar.noise.reshape(()) if gp.model is not None else 0.0
    return mean, var + yvar + extra


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
    gps, posteriors = {}, {}
    with quiet_fitting():
        for o in stage.outcomes:
            gp = o.gp(stage.space).fit(z, o.y, o.yvar, relinearise=o.relinearise)
            mean, cov = gp.parameter_posterior(z, o.y)
            gps[o.column] = gp
            posteriors[o.column] = Posterior(o.names, o.prior[0], o.prior[1], mean, cov)
    cv = cross_validate(stage, folds, seed) if folds >= 2 and len(stage.rows) >= 4 else None
    return StageFit(stage, gps, posteriors, cv)


def cross_validate(stage: Stage, folds: int = 5, seed: int = 0) -> CVResult:
    """k-fold CV (seeded split) of physics only, GP only and physics + GP on every outcome of a stage."""
    n = len(stage.rows)
    k = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    z = stage.z
    parts = []
    with quiet_fitting():
        for test in np.array_split(order, k):
            train = np.setdiff1d(order, test)
            for o in stage.outcomes:
                for model in MODELS:
                    if model == "GP only":
                        mean, var = _gp_only(z[train], o.y[train], z[test])
                    else:
                        gp = o.gp(stage.space, physics_only=model == "physics only")
                        gp.fit(z[train], o.y[train], o.yvar[train], relinearise=o.relinearise)
                        mean, var = _predict(gp, z[test], o.yvar[test])
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
    predictions = pd.concat(parts, ignore_index=True).sort_values(["outcome", "model", "row"], kind="stable")
    return CVResult(stage.name, k, _metrics(predictions, stage.outcomes), predictions.reset_index(drop=True))


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
        table["prior_mean"] = [priors[n][0] for n in table["parameter"]]
        table["prior_sd"] = [priors[n][1] for n in table["parameter"]]
        table["sd_ratio"] = table["posterior_sd"] / table["prior_sd"]
        return table

    def prior_updates(self, floor: float = TRANSFER_FLOOR) -> dict[str, tuple[float, float]]:
        """Preset parameter -> (posterior mean, max(posterior sd, floor x preset sd)) for a new campaign."""
        base = Preset.load(self.model)
        if self.sp is not None:
            posteriors = list(self.sp.posteriors.values())
        elif self.droplet is not None and self.droplet.stage.own_law:
            posteriors = list(self.droplet.posteriors.values())
        else:
            raise InputError(
                "the droplet data use inputs the preset's droplet law lacks (capillary number, orifice width, "
                "aspect ratio), so there is no preset prior to update; --into needs SP diameters."
            )
        updates = {}
        for p in posteriors:
            for i, name in enumerate(p.names):
                sd = max(float(p.sd[i]), floor * base.priors[name][1])
                updates[name] = (float(p.mean[i]), sd)
        return updates


def fit_runs(runs: Runs, model: str = "cspbbr3-flow-focusing", folds: int = 5, seed: int = 0) -> FitResult:
    """Fit every stage the runs hold, droplet first (its posterior can inform the SP stage), with CV.

    Args:
        runs: from :func:`read_runs`.
        model: physics preset (name in ``models/`` or path) whose constants and priors to start from.
        folds: k of the k-fold cross-validation; below 2 skips it.
        seed: seeds the split into folds.
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
        assert isinstance(stage.space, SearchSpace)  # sp_stage's space is the campaign kind
        feasibility = FeasibilityModel(preset, stage.space, stage.x, failures)
    for fitted in (sp, droplet):
        if fitted is not None and fitted.cv is None:
            notes.append(f"{fitted.stage.name} stage: no cross-validation (fewer than 4 runs, or --folds below 2).")
    return FitResult(runs, model, preset, sp, droplet, feasibility, tuple(notes))


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
    summary = {
        "source": result.runs.source,
        "model": result.model,
        "runs": len(result.runs.frame),
        "failed": int((result.runs.frame["failed"] != "").sum()),
        "columns": {k: {"column": c, "unit": u} for k, (c, u) in result.runs.mapping.items()},
        "notes": list(result.notes),
        "parameters": result.parameters().to_dict("records"),
        "cross_validation": {cv.stage: cv.table.reset_index().to_dict("records") for cv in cvs},
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
    check_new_campaign_dir(directory)
    result.prior_updates()  # fails early, before anything is written, when there is nothing to transfer
    directory.mkdir(parents=True, exist_ok=True)
    write_prior(result, directory / PRIOR_FILE)
    return Campaign.create(directory, PRIOR_FILE, target_nm, **options)


__all__ = [
    "CVResult",
    "FitResult",
    "Posterior",
    "Runs",
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
