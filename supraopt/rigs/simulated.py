"""A digital twin of the source papers' rigs: the default adapter, for tutorials, tests and benchmarks.

The twin is written independently of the optimiser's prior (it never imports
:mod:`supraopt.physics`) and holds physics the prior lacks: a dripping-to-jetting transition in
the droplet law, a packing fraction that loosens with temperature inside the mass balance, a CV
rise near the hollow edge, soft and tilted failure edges, and SEM-like measurement noise.

:class:`World` holds the hidden constants and the noise-free laws; :class:`SimulatedRig` wraps a
world in the rig adapter protocol (:mod:`supraopt.rigs.base`), keeping its runs in a
:class:`~supraopt.rigs.runbook.RunBook` so it survives a restart of the process that owns it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from supraopt.errors import InputError, LimitViolation, RigError, SpecError
from supraopt.records import PARAMETERS, Failure, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs.runbook import Entry, RunBook
from supraopt.spec import default_bounds, preset_path, read_toml

DEFAULT_PRESET = "cspbbr3-flow-focusing"
UNSTABLE = "droplets unstable"
HOLLOW = "hollow particles"
NO_DROPLETS = "jetting, no droplets"
STATE_FILE = "simulated.sqlite"
"""The twin's run book in its state folder."""
MIN_WINDOW_RATIO = 2.0
"""A random world's window (high edge / low edge, inside the bounds) is at least this wide everywhere."""
MAX_BEST_PDI_PCT = 5.5
"""A random world has a feasible point whose true PDI is below this."""
MAX_WORST_PDI_PCT = 60.0
"""... and no feasible point whose true PDI is above this: a rig whose runs succeed but give a CV of 100 %
or more (which ``record`` refuses as implausible) makes no supraparticles there, it does not exist."""
PRIOR_Z = 2.5
"""A random world draws a prior-named constant within this many prior sds of the prior mean."""
Array = npt.NDArray[np.float64]
_POSITIVE = (
    "nozzle_um",
    "density_g_cm3",
    "reference_concentration_mg_ml",
    "reference_flow_ratio",
    "droplet_k",
    "jet_flow_ratio",
    "jet_width_log",
    "cv_drop_r_opt",
    "hollow_cv_width_log",
    "window_low_mg_ml",
    "edge_softness_log",
)
_NON_NEGATIVE = (
    "jet_cv_pct",
    "cv_drop_pct",
    "cv_drop_kappa",
    "cv_process_pct",
    "hollow_cv_pct",
    "calibration_sd",
    "droplet_noise_sd",
)


def _expit(z: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # logistic function without overflow warnings


@dataclass(frozen=True)
class World:
    """Hidden constants of one simulated rig, and its noise-free laws.

    With ``u = (T - reference_temperature_c) / 10`` and ``r`` the flow ratio Q_c/Q_d::

        d_drop_um = droplet_k * nozzle_um * r^-a * exp(droplet_temp_per_10c * u)
                    (a -> jet_exponent above jet_flow_ratio, smoothly over jet_width_log)
        phi(T)    = phi_inorg * exp(-phi_temp_per_10c * u)
        d_SP_nm   = 1000 * d_drop_um * (c * 1e-3 / (density_g_cm3 * phi(T)))^(1/3)
                    * (c / reference_concentration_mg_ml)^exponent_delta
        CV_drop   = cv_drop_pct * (1 + cv_drop_kappa * ln(r / cv_drop_r_opt)^2) + jet_cv_pct * jetting
        CV_proc   = cv_process_pct * exp(-process_temp_slope * u + process_temp_curvature * u^2)
                    + hollow rise near the low edge
        PDI       = sqrt(CV_drop^2 + CV_proc^2)                      (percent)

    Runs fail above the high concentration edge ("droplets unstable"), below the low edge
    ("hollow particles") and, when ``no_droplets_ratio`` is set, above that flow ratio ("jetting,
    no droplets"); each edge is a logistic ramp of failure probability, tilted in ln r and u.
    """

    # -- materials and chip (preset [constants]) --
    nozzle_um: float
    """Nozzle (orifice) width w, µm."""
    density_g_cm3: float
    """Nanocrystal density rho, g/cm³."""
    reference_concentration_mg_ml: float
    """Pivot c_ref of the exponent departure delta, mg/mL."""
    reference_flow_ratio: float
    """Pivot r_ref of the edge tilts in flow ratio, Q_c/Q_d."""
    reference_temperature_c: float
    """Pivot T_ref of every temperature term, °C."""
    # -- droplet law --
    droplet_k: float
    """Prefactor k of the droplet law, d_drop / w at r = 1 and T_ref (dimensionless)."""
    droplet_exponent_a: float
    """Flow-ratio exponent a in dripping (d_drop ∝ r^-a)."""
    droplet_temp_per_10c: float
    """Change of ln d_drop per 10 °C."""
    jet_flow_ratio: float
    """Flow ratio r_jet where dripping turns to jetting, Q_c/Q_d."""
    jet_exponent: float
    """Flow-ratio exponent well inside the jetting regime."""
    jet_width_log: float
    """Width of the dripping-jetting transition, natural-log units of r."""
    jet_cv_pct: float
    """Extra droplet CV in full jetting, percent."""
    # -- mass balance --
    phi_inorg: float
    """Inorganic volume fraction of a finished SP at T_ref (dimensionless)."""
    phi_temp_per_10c: float
    """Decrease of ln phi per 10 °C (warmer: looser packing, larger SPs)."""
    exponent_delta: float
    """Departure of the concentration exponent from 1/3, pivoting about c_ref."""
    # -- polydispersity --
    cv_drop_pct: float
    """Droplet-diameter CV at the best flow ratio, percent."""
    cv_drop_r_opt: float
    """Flow ratio with the most uniform droplets, Q_c/Q_d."""
    cv_drop_kappa: float
    """Growth of the droplet CV with ln(r / r_opt)^2 (dimensionless)."""
    cv_process_pct: float
    """Process CV (merging, satellites...) at T_ref, percent."""
    process_temp_slope: float
    """Fall of ln CV_process per 10 °C."""
    process_temp_curvature: float
    """Curvature of ln CV_process per (10 °C)²: > 0 gives a hot optimum."""
    hollow_cv_pct: float
    """Extra process CV right at the low (hollow) edge, percent; saturates at twice that below it."""
    hollow_cv_width_log: float
    """Decay length of the hollow-edge CV rise, natural-log units of c."""
    # -- failure window --
    window_low_mg_ml: float
    """Low concentration edge at r_ref and T_ref (hollow particles below), mg/mL."""
    window_high_mg_ml: float
    """High concentration edge at r_ref and T_ref (droplets unstable above), mg/mL."""
    low_flow_tilt: float
    """Change of ln(low edge) per unit ln(r / r_ref)."""
    low_temp_tilt: float
    """Change of ln(low edge) per 10 °C."""
    high_flow_tilt: float
    """Change of ln(high edge) per unit ln(r / r_ref)."""
    high_temp_tilt: float
    """Change of ln(high edge) per 10 °C."""
    edge_softness_log: float
    """Width of every failure-probability ramp, natural-log units (0.03: a few % of c)."""
    no_droplets_ratio: float | None = None
    """Flow ratio above which the jet no longer breaks up ("jetting, no droplets"); None: off."""
    # -- measurement --
    n_particles_min: int = 80
    """Fewest SPs sized in one SEM measurement."""
    n_particles_max: int = 200
    """Most SPs sized in one SEM measurement."""
    calibration_sd: float = 0.015
    """Relative sd of the per-run SEM calibration factor (multiplies every sized diameter)."""
    camera: bool = False
    """Whether the rig reports the droplet diameter measured in-line."""
    droplet_noise_sd: float = 0.01
    """Relative sd of the in-line droplet measurement."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"simulated world {item.name}={value} must be a finite number.")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise InputError(f"simulated world {name}={getattr(self, name)} must be positive.")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise InputError(f"simulated world {name}={getattr(self, name)} must not be negative.")
        if not 0 < self.phi_inorg <= 1:
            raise InputError(f"simulated world phi_inorg={self.phi_inorg} must be a fraction in (0, 1].")
        if self.window_high_mg_ml <= self.window_low_mg_ml:
            raise InputError(
                f"simulated world window_high_mg_ml={self.window_high_mg_ml} must exceed "
                f"window_low_mg_ml={self.window_low_mg_ml}."
            )
        if self.no_droplets_ratio is not None and self.no_droplets_ratio <= 0:
            raise InputError(f"simulated world no_droplets_ratio={self.no_droplets_ratio} must be positive.")
        if not 2 <= self.n_particles_min <= self.n_particles_max:
            raise InputError(
                f"simulated world n_particles_min={self.n_particles_min} and n_particles_max="
                f"{self.n_particles_max} must satisfy 2 <= min <= max."
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def default(cls, preset: str = DEFAULT_PRESET) -> World:
        """The world a preset describes: prior means, the known window, and moderate twin extras."""
        data = read_toml(preset_path(preset))
        try:
            return cls._from_preset(data["constants"], data["window"], data["priors"])
        except InputError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise SpecError(f"preset {preset!r} cannot define a simulated world: missing or bad {error}.") from None

    @classmethod
    def _from_preset(cls, constants: dict[str, Any], window: dict[str, Any], priors: dict[str, Any]) -> World:
        prior = {name: float(pair[0]) for name, pair in priors.items()}
        r_ref = float(constants["reference_flow_ratio"])
        return cls(
            nozzle_um=float(constants["nozzle_um"]),
            density_g_cm3=float(constants["density_g_cm3"]),
            reference_concentration_mg_ml=float(constants["reference_concentration_mg_ml"]),
            reference_flow_ratio=r_ref,
            reference_temperature_c=float(constants["reference_temperature_c"]),
            droplet_k=math.exp(prior["log_droplet_k"]),
            droplet_exponent_a=prior["droplet_exponent_a"],
            droplet_temp_per_10c=prior["droplet_temp_per_10c"],
            jet_flow_ratio=3.0 * r_ref,
            jet_exponent=0.5,
            jet_width_log=0.2,
            jet_cv_pct=3.0,
            phi_inorg=math.exp(prior["log_phi_inorg"]),
            phi_temp_per_10c=3.0 * prior["packing_temp_per_10c"],  # d ∝ phi^(-1/3)
            exponent_delta=prior["exponent_delta"],
            cv_drop_pct=math.exp(prior["log_cv_drop_pct"]),
            cv_drop_r_opt=math.exp(prior["log_cv_drop_r_opt"]),
            cv_drop_kappa=math.exp(prior["log_cv_drop_kappa"]),
            cv_process_pct=math.exp(prior["log_cv_process_pct"]),
            process_temp_slope=prior["process_temp_slope"],
            process_temp_curvature=prior["process_temp_curvature"],
            hollow_cv_pct=4.0,
            hollow_cv_width_log=0.3,
            window_low_mg_ml=float(window["concentration_low_mg_ml"]),
            window_high_mg_ml=float(window["concentration_high_mg_ml"]),
            low_flow_tilt=0.0,
            low_temp_tilt=0.02,
            high_flow_tilt=0.0,
            high_temp_tilt=-0.02,
            edge_softness_log=0.03,
        )

    @classmethod
    def random(cls, seed: int, preset: str = DEFAULT_PRESET, spread: float = 1.0) -> World:
        """A randomised world about :meth:`default`, reproducible by ``seed``.

        Each constant is drawn uniformly from an interval about its default value (on a log scale for
        positive scale-like constants): prior-named ones within ``PRIOR_Z`` prior sds of the prior
        mean, clipped to physical limits; window edges up to ×1.6 each way; the twin extras over the
        ranges written below. ``spread`` scales every interval about the default (0 gives the default
        world). Window, then polydispersity constants are redrawn until the window is at least
        ``MIN_WINDOW_RATIO`` wide everywhere inside the bounds, some feasible point has a PDI
        below ``MAX_BEST_PDI_PCT`` and none above ``MAX_WORST_PDI_PCT``.
        """
        if not (isinstance(spread, (int, float)) and math.isfinite(spread) and spread >= 0):
            raise InputError(f"spread={spread!r} must be a non-negative number.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"world seed={seed!r} must be a non-negative integer.")
        base = cls.default(preset)
        priors = {name: (float(m), float(s)) for name, (m, s) in read_toml(preset_path(preset))["priors"].items()}
        bounds = default_bounds(preset)
        r_low, r_high = bounds["flow_ratio"]
        r_ref = base.reference_flow_ratio
        rng = np.random.default_rng([seed, 0x5EED])

        def draw(name: str, low: float, high: float, hard: tuple[float, float], log: bool) -> float:
            """Uniform in [low, high] stretched by ``spread`` about the default and cut to ``hard``."""
            default = float(getattr(base, name))
            if spread == 0:
                return default

            def scale(value: float) -> float:
                return (math.log(value) if value > 0 else -math.inf) if log else value

            centre = scale(default)
            lo = max(scale(hard[0]), centre - spread * (centre - scale(low)))
            hi = min(scale(hard[1]), centre + spread * (scale(high) - centre))
            if not lo < hi:  # the default lies outside the physical limits: clip it
                return min(max(default, hard[0]), hard[1])
            value = float(rng.uniform(lo, hi))
            return math.exp(value) if log else value

        def near(name: str, half_width: float, hard: tuple[float, float]) -> float:
            centre = getattr(base, name)
            return draw(name, centre - half_width, centre + half_width, hard, log=False)

        def from_prior(name: str, prior: str, hard: tuple[float, float], factor: float = 1.0) -> float:
            mean, sd = priors[prior]
            low, high = mean - PRIOR_Z * sd, mean + PRIOR_Z * sd
            if prior.startswith("log_"):
                return draw(name, math.exp(low), math.exp(high), hard, log=True)
            return draw(name, factor * low, factor * high, hard, log=False)

        world = dataclasses.replace(
            base,
            droplet_k=from_prior("droplet_k", "log_droplet_k", (0.7, 1.7)),
            droplet_exponent_a=from_prior("droplet_exponent_a", "droplet_exponent_a", (0.15, 0.45)),
            droplet_temp_per_10c=from_prior("droplet_temp_per_10c", "droplet_temp_per_10c", (-0.15, 0.15)),
            phi_inorg=from_prior("phi_inorg", "log_phi_inorg", (0.05, 0.65)),
            phi_temp_per_10c=from_prior("phi_temp_per_10c", "packing_temp_per_10c", (-0.05, 0.3), factor=3.0),
            exponent_delta=from_prior("exponent_delta", "exponent_delta", (-0.05, 0.2)),
            jet_flow_ratio=draw("jet_flow_ratio", 1.5 * r_ref, 6.0 * r_ref, (r_low, math.inf), log=True),
            jet_exponent=draw("jet_exponent", 0.3, 0.7, (0.1, 1.0), log=False),
            jet_width_log=draw("jet_width_log", 0.1, 0.4, (0.05, 1.0), log=True),
            calibration_sd=draw("calibration_sd", 0.01, 0.02, (0.0, 0.05), log=False),
        )
        low_edge, high_edge = base.window_low_mg_ml, base.window_high_mg_ml
        for _ in range(1000):
            low = draw("window_low_mg_ml", low_edge / 1.6, low_edge * 1.6, (0, math.inf), log=True)
            high = draw("window_high_mg_ml", high_edge / 1.6, high_edge * 1.6, (0, math.inf), log=True)
            if high < MIN_WINDOW_RATIO * low:
                continue
            candidate = dataclasses.replace(
                world,
                window_low_mg_ml=low,
                window_high_mg_ml=high,
                low_flow_tilt=near("low_flow_tilt", 0.06, (-0.2, 0.2)),
                low_temp_tilt=near("low_temp_tilt", 0.03, (-0.1, 0.1)),
                high_flow_tilt=near("high_flow_tilt", 0.06, (-0.2, 0.2)),
                high_temp_tilt=near("high_temp_tilt", 0.03, (-0.1, 0.1)),
                edge_softness_log=draw("edge_softness_log", 0.01, 0.06, (0.003, 0.2), log=True),
            )
            if candidate.narrowest_window_ratio(bounds) >= MIN_WINDOW_RATIO:
                world = candidate
                break
        else:
            raise InputError(f"spread={spread} leaves no window ×{MIN_WINDOW_RATIO:g} wide inside {preset}'s bounds.")
        for _ in range(1000):
            candidate = dataclasses.replace(
                world,
                cv_drop_pct=from_prior("cv_drop_pct", "log_cv_drop_pct", (1.0, 5.0)),
                cv_drop_r_opt=from_prior("cv_drop_r_opt", "log_cv_drop_r_opt", (r_low, r_high)),
                cv_drop_kappa=from_prior("cv_drop_kappa", "log_cv_drop_kappa", (0.03, 1.0)),
                cv_process_pct=from_prior("cv_process_pct", "log_cv_process_pct", (1.0, 12.0)),
                process_temp_slope=from_prior("process_temp_slope", "process_temp_slope", (0.0, 0.6)),
                process_temp_curvature=from_prior("process_temp_curvature", "process_temp_curvature", (0.0, 0.15)),
                jet_cv_pct=draw("jet_cv_pct", 1.0, 8.0, (0.0, 20.0), log=True),
                hollow_cv_pct=draw("hollow_cv_pct", 1.0, 10.0, (0.0, 20.0), log=True),
                hollow_cv_width_log=draw("hollow_cv_width_log", 0.15, 0.6, (0.05, 2.0), log=True),
            )
            best, worst = candidate.pdi_range_pct(bounds)
            if best < MAX_BEST_PDI_PCT and worst < MAX_WORST_PDI_PCT:
                return candidate
        raise InputError(
            f"spread={spread} gives no world with a PDI between {MAX_BEST_PDI_PCT} and {MAX_WORST_PDI_PCT} % "
            f"in {preset}."
        )

    @classmethod
    def from_options(cls, options: dict[str, Any], base: World) -> World:
        """``base`` with the named constants replaced; unknown names or bad values raise InputError."""
        known = {item.name for item in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for name, value in options.items():
            if name not in known:
                raise InputError(f"unknown simulated rig option {name!r}: expected one of {', '.join(sorted(known))}.")
            current = getattr(base, name)
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    raise InputError(f"simulated rig option {name}={value!r} must be true or false.")
            elif isinstance(current, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InputError(f"simulated rig option {name}={value!r} must be an integer.")
            elif not (value is None and name == "no_droplets_ratio"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"simulated rig option {name}={value!r} must be a number.")
                value = float(value)
            changes[name] = value
        return dataclasses.replace(base, **changes)

    # ------------------------------------------------------------------ noise-free laws (vectorised)

    def _u(self, temperature_c: npt.ArrayLike) -> Array:
        return (np.asarray(temperature_c, dtype=float) - self.reference_temperature_c) / 10.0

    def _jet_x(self, flow_ratio: npt.ArrayLike) -> Array:
        """Distance into the jetting regime in transition widths."""
        return np.log(np.asarray(flow_ratio, dtype=float) / self.jet_flow_ratio) / self.jet_width_log

    def droplet_um(self, flow_ratio: npt.ArrayLike, temperature_c: npt.ArrayLike) -> Array:
        """True mean droplet diameter, µm."""
        ln_r = np.log(np.asarray(flow_ratio, dtype=float))
        bend = (
            (self.jet_exponent - self.droplet_exponent_a)
            * self.jet_width_log
            * np.logaddexp(0.0, self._jet_x(flow_ratio))
        )
        log_d = -self.droplet_exponent_a * ln_r - bend + self.droplet_temp_per_10c * self._u(temperature_c)
        return self.droplet_k * self.nozzle_um * np.exp(log_d)

    def sp_from_droplet_nm(
        self, concentration_mg_ml: npt.ArrayLike, droplet_um: npt.ArrayLike, temperature_c: npt.ArrayLike
    ) -> Array:
        """True mean SP diameter from a droplet diameter by mass balance, nm."""
        c = np.asarray(concentration_mg_ml, dtype=float)
        phi = self.phi_inorg * np.exp(-self.phi_temp_per_10c * self._u(temperature_c))
        balance = np.cbrt(c * 1e-3 / (self.density_g_cm3 * phi))
        return (
            1000.0
            * np.asarray(droplet_um, dtype=float)
            * balance
            * (c / self.reference_concentration_mg_ml) ** self.exponent_delta
        )

    def diameter_nm(
        self, concentration_mg_ml: npt.ArrayLike, flow_ratio: npt.ArrayLike, temperature_c: npt.ArrayLike
    ) -> Array:
        """True mean SP diameter, nm."""
        return self.sp_from_droplet_nm(concentration_mg_ml, self.droplet_um(flow_ratio, temperature_c), temperature_c)

    def window_mg_ml(self, flow_ratio: npt.ArrayLike, temperature_c: npt.ArrayLike) -> tuple[Array, Array]:
        """Low and high concentration edges (mid-ramp) at these flow ratios and temperatures, mg/mL."""
        x = np.log(np.asarray(flow_ratio, dtype=float) / self.reference_flow_ratio)
        u = self._u(temperature_c)
        low = self.window_low_mg_ml * np.exp(self.low_flow_tilt * x + self.low_temp_tilt * u)
        high = self.window_high_mg_ml * np.exp(self.high_flow_tilt * x + self.high_temp_tilt * u)
        return low, high

    def pdi_pct(
        self, concentration_mg_ml: npt.ArrayLike, flow_ratio: npt.ArrayLike, temperature_c: npt.ArrayLike
    ) -> Array:
        """True polydispersity (CV of the SP diameter), percent."""
        r = np.asarray(flow_ratio, dtype=float)
        u = self._u(temperature_c)
        low, _ = self.window_mg_ml(flow_ratio, temperature_c)
        cv_drop = self.cv_drop_pct * (1.0 + self.cv_drop_kappa * np.log(r / self.cv_drop_r_opt) ** 2)
        cv_drop = cv_drop + self.jet_cv_pct * _expit(self._jet_x(r))
        cv_process = self.cv_process_pct * np.exp(-self.process_temp_slope * u + self.process_temp_curvature * u**2)
        depth = np.log(np.asarray(concentration_mg_ml, dtype=float) / low) / self.hollow_cv_width_log
        cv_process = cv_process + 2.0 * self.hollow_cv_pct * _expit(-depth)
        return np.hypot(cv_drop, cv_process)

    def failure_probabilities(
        self, concentration_mg_ml: npt.ArrayLike, flow_ratio: npt.ArrayLike, temperature_c: npt.ArrayLike
    ) -> dict[str, Array]:
        """Failure reason -> probability that a run fails that way, in the order they are checked."""
        ln_c = np.log(np.asarray(concentration_mg_ml, dtype=float))
        low, high = self.window_mg_ml(flow_ratio, temperature_c)
        soft = self.edge_softness_log
        if self.no_droplets_ratio is None:
            no_droplets = np.zeros_like(ln_c)
        else:
            no_droplets = _expit(np.log(np.asarray(flow_ratio, dtype=float) / self.no_droplets_ratio) / soft)
        return {
            NO_DROPLETS: no_droplets,
            UNSTABLE: _expit((ln_c - np.log(high)) / soft),
            HOLLOW: _expit((np.log(low) - ln_c) / soft),
        }

    def truth(self, settings: dict[str, float]) -> tuple[float, float, str | None]:
        """Noise-free ``(diameter_nm, pdi_pct, failure reason or None)``; fails where a mode is > 50 % likely."""
        c, r, t = (settings[name] for name in PARAMETERS)
        reason = next((k for k, p in self.failure_probabilities(c, r, t).items() if float(p) > 0.5), None)
        return float(self.diameter_nm(c, r, t)), float(self.pdi_pct(c, r, t)), reason

    def sample(self, settings: dict[str, float], rng: np.random.Generator) -> Measurement | Failure:
        """One noisy run: a failure drawn from the soft edges, else an SEM-like measurement."""
        c, r, t = (settings[name] for name in PARAMETERS)
        chances = rng.random(3)
        for chance, (reason, probability) in zip(chances, self.failure_probabilities(c, r, t).items(), strict=True):
            if chance < float(probability):
                return Failure(reason)
        n = int(rng.integers(self.n_particles_min, self.n_particles_max + 1))
        mean, cv = float(self.diameter_nm(c, r, t)), float(self.pdi_pct(c, r, t)) / 100.0
        sigma = math.sqrt(math.log1p(cv**2))
        sizes = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)
        calibration = rng.normal(1.0, self.calibration_sd)
        droplet_error = rng.normal(1.0, self.droplet_noise_sd)
        return Measurement(
            diameter_nm=float(sizes.mean() * calibration),
            pdi_pct=float(sizes.std(ddof=1) / sizes.mean() * 100.0),
            n_particles=n,
            droplet_um=float(self.droplet_um(r, t) * droplet_error) if self.camera else None,
        )

    # ------------------------------------------------------------------ checks used by random()

    def narrowest_window_ratio(self, bounds: dict[str, tuple[float, float]]) -> float:
        """Smallest high/low edge ratio, clipped to the concentration bounds, over the flow and temperature bounds."""
        c_low, c_high = bounds["concentration_mg_ml"]
        corners = np.array([(r, t) for r in bounds["flow_ratio"] for t in bounds["temperature_c"]])
        low, high = self.window_mg_ml(corners[:, 0], corners[:, 1])  # edges are log-linear: extremes at corners
        return float(np.min(np.minimum(high, c_high) / np.maximum(low, c_low)))

    def pdi_range_pct(self, bounds: dict[str, tuple[float, float]], points: int = 24) -> tuple[float, float]:
        """Lowest and highest true PDI over a grid of feasible settings inside ``bounds`` (inf, inf when
        none is feasible)."""
        axes = [np.geomspace(*bounds[name], points) for name in PARAMETERS[:2]]
        axes.append(np.linspace(*bounds["temperature_c"], points // 2))
        c, r, t = np.meshgrid(*axes, indexing="ij")
        feasible = np.all([p <= 0.5 for p in self.failure_probabilities(c, r, t).values()], axis=0)
        pdi = self.pdi_pct(c, r, t)
        if not feasible.any():
            return math.inf, math.inf
        return float(pdi[feasible].min()), float(pdi[feasible].max())


class SimulatedRig:
    """Rig adapter around a :class:`World`; results are drawn deterministically from (seed, experiment id).

    Its runs are kept in a :class:`~supraopt.rigs.runbook.RunBook`, so a restarted twin (a new object,
    a new process) knows every run it started and never starts one twice.

    Args:
        preset: physics preset the world and the default limits come from.
        seed: seeds every run's noise together with its experiment id.
        world_seed: when given, use ``World.random(world_seed, preset)`` instead of the default world.
        duration_s: seconds a run takes before ``poll`` reports its result.
        state_dir: folder for the run book ``simulated.sqlite`` (supraopt passes ``<campaign>/rig-state``).
        state_path: the run book file itself, overriding ``state_dir``. A JSON state file written by
            older versions is converted in place (its old text kept as ``<name>.v1``).
            Neither given: runs are kept in memory only.
        limits: parameter -> [low, high] overriding the preset's bounds.
        clock: seconds since the epoch (tests pass a fake); must agree across restarts.
        context_worlds: context name -> level -> World fields that level overrides, to play chip or
            NC batch swaps, e.g. ``{"chip": {"B": {"droplet_k": 1.35}}}`` (levels not listed: no change).
        mounted: context name -> level mounted now (e.g. ``{"chip": "A"}``); :meth:`mount` swaps it.
        report_context: whether :meth:`context` and each measurement tell what was mounted (False plays a
            rig that changes under the campaign without saying so).
        **world_options: any :class:`World` field, overriding the chosen world's value.
    """

    def __init__(
        self,
        preset: str = DEFAULT_PRESET,
        seed: int = 0,
        world_seed: int | None = None,
        duration_s: float = 0.0,
        state_path: str | os.PathLike[str] | None = None,
        limits: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        state_dir: str | os.PathLike[str] | None = None,
        context_worlds: dict[str, dict[str, dict[str, Any]]] | None = None,
        mounted: dict[str, str] | None = None,
        report_context: bool = True,
        **world_options: Any,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"simulated rig seed={seed!r} must be a non-negative integer.")
        if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s >= 0):
            raise InputError(f"simulated rig duration_s={duration_s!r} must be a non-negative number of seconds.")
        base = World.default(preset) if world_seed is None else World.random(world_seed, preset)
        self.world = World.from_options(world_options, base)
        self.context_worlds = {
            str(k): {str(lv): dict(o) for lv, o in v.items()} for k, v in (context_worlds or {}).items()
        }
        for levels in self.context_worlds.values():
            for overrides in levels.values():
                World.from_options(overrides, self.world)  # unknown names fail now, not at the first run
        self.mounted: dict[str, str] = {}
        self.report_context = bool(report_context)
        self.mount(**(mounted or {}))
        self.seed = seed
        self.duration_s = float(duration_s)
        self.clock = clock
        bounds = default_bounds(preset)
        for name, pair in (limits or {}).items():
            if name not in PARAMETERS:
                raise InputError(f"simulated rig limits name unknown parameter {name!r}: use {', '.join(PARAMETERS)}.")
            try:
                bounds[name] = (float(pair[0]), float(pair[1]))
            except (TypeError, ValueError, IndexError):
                raise InputError(f"simulated rig limits {name}={pair!r} must be a [low, high] pair.") from None
        self._limits = RigLimits(bounds)
        if state_path is not None:
            self.state_path: Path | None = Path(state_path)
        elif state_dir is not None:
            self.state_path = Path(state_dir) / STATE_FILE
        else:
            self.state_path = None
        if self.state_path is not None:
            _convert_json_state(self.state_path)
        self.book = RunBook(self.state_path)

    def limits(self) -> RigLimits:
        return self._limits

    def mount(self, **levels: str) -> None:
        """Swap what is mounted, e.g. ``mount(chip="B")``: later runs use that level's world."""
        for name, level in levels.items():
            if not isinstance(level, str) or not level.strip():
                raise InputError(f"simulated rig mounted {name}={level!r} must be a non-empty level name.")
            self.mounted[name] = level

    def context(self) -> dict[str, str] | None:
        """What is mounted now (None when the rig does not report it)."""
        return dict(self.mounted) if self.report_context and self.mounted else None

    def world_for(self, mounted: dict[str, str]) -> World:
        """The world of runs made with ``mounted`` levels."""
        overrides: dict[str, Any] = {}
        for name, level in mounted.items():
            overrides |= self.context_worlds.get(name, {}).get(level, {})
        return World.from_options(overrides, self.world) if overrides else self.world

    def submit(self, proposal: Proposal) -> None:
        """Accept a run; a known id is a no-op; settings outside the limits raise LimitViolation."""
        if proposal.experiment_id in self.book:
            return
        problems = self._limits.violations(proposal.settings)
        if problems:
            raise LimitViolation(f"experiment {proposal.experiment_id} not submitted: {'; '.join(problems)}.")
        settings = {name: float(proposal.settings[name]) for name in PARAMETERS}
        self.book.claim(
            Proposal(proposal.experiment_id, settings), submitted_at=self.clock(), mounted=dict(self.mounted)
        )

    def poll(self, experiment_id: str) -> RunStatus:
        run = self.book.get(experiment_id)
        if run is None:
            return RunStatus(experiment_id, RunState.LOST, message="the simulated rig has no run under this id")
        if run.state in (RunState.CANCELLED, RunState.DONE, RunState.FAILED):
            return run.status()
        if not self._finished(run):
            return RunStatus(experiment_id, RunState.RUNNING)
        mounted = {str(k): str(v) for k, v in run.info.get("mounted", {}).items()}
        result = self.world_for(mounted).sample(run.settings, self._rng(experiment_id))
        if isinstance(result, Measurement) and mounted and self.report_context:
            result = dataclasses.replace(result, context=dict(mounted))
        return self.book.finish(experiment_id, result).status()

    def cancel(self, experiment_id: str) -> None:
        """Stop a run still in progress; unknown or finished runs are left as they are."""
        run = self.book.get(experiment_id)
        if run is None or run.state is not RunState.QUEUED or self._finished(run):
            return
        self.book.update(experiment_id, RunState.CANCELLED)

    def _finished(self, run: Entry) -> bool:
        return bool(self.clock() - float(run.info["submitted_at"]) >= self.duration_s)

    def _rng(self, experiment_id: str) -> np.random.Generator:
        digest = hashlib.sha256(experiment_id.encode()).digest()
        return np.random.default_rng([self.seed, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])


def _convert_json_state(path: Path) -> None:
    """Turn the JSON state file of older versions into a run book at the same path (kept as ``<name>.v1``).

    Crash-safe: the run book is built in a temporary file and renamed over the JSON file only when
    complete; a kill before that leaves the JSON file, converted again next time.
    """
    try:
        with open(path, "rb") as stream:
            head = stream.read(16)
    except FileNotFoundError:
        return
    except OSError as error:
        raise RigError(f"simulated rig state {path} is unreadable ({error.strerror}); check it.") from None
    if head.startswith(b"SQLite format 3") or not head.strip():
        return
    try:
        runs = json.loads(path.read_text())["runs"]
        parsed = {
            str(key): (
                {name: float(run["settings"][name]) for name in PARAMETERS},
                float(run["submitted_at"]),
                bool(run["cancelled"]),
            )
            for key, run in runs.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise RigError(f"simulated rig state {path} is unreadable ({error}); move it away to start afresh.") from None
    temporary = path.with_name(f".{path.name}.converting")
    for leftover in (temporary, Path(f"{temporary}-wal"), Path(f"{temporary}-shm")):
        leftover.unlink(missing_ok=True)
    with RunBook(temporary) as book:
        for experiment_id, (settings, submitted_at, cancelled) in parsed.items():
            book.claim(Proposal(experiment_id, settings), submitted_at=submitted_at)
            if cancelled:
                book.update(experiment_id, RunState.CANCELLED)
    shutil.copyfile(path, path.with_name(path.name + ".v1"))
    os.replace(temporary, path)
