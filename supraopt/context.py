"""Context in the model: chips, NC batches and measured conditions a run records but does not set.

One implementation, used by campaigns (:class:`ContextModel`) and by ``supraopt fit``
(:mod:`supraopt.fit`): both add context to a :class:`~supraopt.surrogate.PhysicsGP` as extra
*linear parts* of the physics (:class:`LinearPart`, :func:`add_parts`)::

    f(x; theta, beta) = f(x; theta) + sum_j beta_j * feature_j(x) * d f / d theta_k(j)

with ``theta_k(j)`` the physics parameter part ``j`` shifts (or :data:`SCALE`, the log outcome
itself), so the parts are integrated out exactly like the physics parameters and appear in
:meth:`~supraopt.surrogate.PhysicsGP.parameter_posterior` under their own names.

**Categorical context** (chip, NC batch, operator, flow regime...). Each level gets an offset
part, ``feature`` its 0/1 indicator, on the parameters the preset's ``[context_effects]`` declares
for that name (a chip moves the droplet prefactor ``log_droplet_k``, an NC batch the packing
``log_phi_inorg``; a name the preset does not know moves the overall size scale). The offsets are
hierarchical: every offset ``~ N(0, tau^2)``, with ``tau`` (the spread between levels, per
context) having a log-normal prior from the preset and set to its MAP value on a small grid
(:func:`learn_tau`) once two levels have data. A new level therefore starts from the population
(the other levels' mean, with ``tau`` of extra uncertainty) and one run calibrates it. A level
the preset knows from a fit (``levels`` in its ``[context_effects]`` entry, written by
``fit --into``) starts from its fitted offset instead. In a campaign, a run whose context does not
name a level is one more level, ``(not stated)``: the chip used before anyone said which.

**Numeric context** (room temperature, NC core size, expansion ratio...) is an input of the GP
residual, and where the preset's ``[context_terms]`` names it, a power-law term of the size:
``feature = ln(value / reference)`` on :data:`SCALE` (:func:`load_terms`; the expansion ratio of a
flow-focusing junction, SCIENCE.md section 3).

In a campaign the GP has inputs ``[3 controls, numeric contexts, level indicators]``; for the
acquisition, :meth:`ContextModel.fixed` gives the columns of one context, and
:meth:`~supraopt.surrogate.PhysicsGP.at_inputs` a GP on the 3 controls with that context inside, so
the acquisition never sees context. A campaign without context never builds a :class:`ContextModel`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from supraopt.errors import SpecError
from supraopt.records import Context
from supraopt.spec import preset_path, read_toml
from supraopt.surrogate import PhysicsGP, UnitMap

SCALE = "scale"
"""Pseudo-parameter of ``[context_effects]``: a constant offset on the log outcome (SP or droplet size)."""
NOT_STATED = "(not stated)"
"""Level of runs whose context does not name this categorical variable."""
TAU_GRID = (0.25, 0.4, 0.63, 1.0, 1.6, 2.5, 4.0)
"""Multiples of the preset's tau tried when learning the spread between levels."""


@dataclass(frozen=True)
class ContextEffect:
    """What the levels of one categorical context move, and the prior of their spread."""

    parameters: tuple[str, ...]
    """Physics parameter names (or :data:`SCALE`) each level shifts."""
    tau: float
    """Prior median of the between-level sd of the shifts, in each parameter's own units."""
    tau_log_sd: float = 0.5
    """Prior sd of log(tau)."""
    levels: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Levels already calibrated (by ``fit --into``): level -> prior (mean, sd) of its offset."""


DEFAULT_EFFECT = ContextEffect((SCALE,), 0.08)
"""For a context name the preset does not know: an offset on the overall size scale (8 % sd)."""


@dataclass(frozen=True)
class PhysicsTerm:
    """A numeric context the physics names: ``parameter * ln(value / reference)`` added to the log size."""

    parameter: str
    prior: tuple[float, float]
    """Prior (mean, sd) of the exponent."""
    reference: float = 1.0
    """Value at which the term is zero (the preset's prefactor holds there)."""


def name_key(name: str) -> str:
    """How context names are matched: lower case, letters and digits only (``Expansion ratio`` -> ``expansionratio``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _two_floats(value: object) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{value!r} must be [mean, sd]")
    mean, sd = float(value[0]), float(value[1])
    if not sd > 0:
        raise ValueError(f"sd {sd} must be positive")
    return mean, sd


def load_effects(model: str) -> dict[str, ContextEffect]:
    """The preset's ``[context_effects]``: name -> effect (``default`` for names it does not list)."""
    path = preset_path(model)
    table = read_toml(path).get("context_effects", {})
    effects = {"default": DEFAULT_EFFECT}
    for name, entry in table.items():
        try:
            parameters = entry["parameters"]
            if isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters):
                raise TypeError("parameters must be a list of names")
            levels = {str(level): _two_floats(pair) for level, pair in dict(entry.get("levels", {})).items()}
            effect = ContextEffect(tuple(parameters), float(entry["tau"]), float(entry.get("tau_log_sd", 0.5)), levels)
        except (KeyError, TypeError, ValueError) as error:
            raise SpecError(
                f"preset {path}: [context_effects] {name}={entry!r} must be "
                f'{{ parameters = ["log_droplet_k"], tau = 0.1 }} ({error}).'
            ) from None
        if not (effect.tau > 0 and effect.tau_log_sd > 0):
            raise SpecError(f"preset {path}: [context_effects] {name}: tau and tau_log_sd must be positive.")
        effects[name] = effect
    return effects


def effect_for(name: str, effects: Mapping[str, ContextEffect]) -> ContextEffect:
    """The effect of a context name: its own entry, else the first entry its name contains
    (``chip_id`` -> ``chip``), else ``default``."""
    key = name.lower()
    if key in effects:
        return effects[key]
    for known, effect in effects.items():
        if known != "default" and known in key:
            return effect
    return effects.get("default", DEFAULT_EFFECT)


def load_terms(model: str) -> dict[str, PhysicsTerm]:
    """The preset's ``[context_terms]``: matched name (:func:`name_key`) -> the physics term it enters."""
    path = preset_path(model)
    terms = {}
    for name, entry in read_toml(path).get("context_terms", {}).items():
        try:
            term = PhysicsTerm(str(entry["parameter"]), _two_floats(entry["prior"]), float(entry.get("reference", 1.0)))
            if not term.reference > 0:
                raise ValueError(f"reference {term.reference} must be positive")
        except (KeyError, TypeError, ValueError) as error:
            raise SpecError(
                f"preset {path}: [context_terms] {name}={entry!r} must be "
                f'{{ parameter = "expansion_exponent_e", prior = [0.0, 0.3] }} ({error}).'
            ) from None
        terms[name_key(name)] = term
    return terms


def term_for(name: str, terms: Mapping[str, PhysicsTerm]) -> PhysicsTerm | None:
    """The physics term a numeric context's name enters (``Expansion ratio`` -> the expansion exponent), or None."""
    return terms.get(name_key(name))


# --- the linear parts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearPart:
    """An extra linear parameter of the physics: ``beta * feature(x[column]) * d f / d(parameter)``."""

    name: str
    """Its name in reports, e.g. ``log_droplet_k[chip=B]`` or ``expansion_exponent_e``."""
    column: int
    """The input column it reads, among the GP's physical inputs."""
    parameter: str
    """The physics parameter whose Jacobian column it scales, or :data:`SCALE` (the log outcome itself)."""
    prior: tuple[float, float]
    """Prior (mean, sd) of ``beta``."""
    reference: float | None = None
    """None: ``feature`` is the 0/1 level indicator; else ``ln(value / reference)`` (a numeric term)."""
    context: str = ""
    """The categorical context whose between-level sd is this offset's prior sd ('' if calibrated or a term)."""


def level_parts(
    context: str,
    levels: Sequence[str],
    columns: Sequence[int],
    effect: ContextEffect,
    names: Sequence[str],
    *,
    size: bool,
) -> list[LinearPart]:
    """One offset per level on each parameter of ``effect`` the physics has (:data:`SCALE` if ``size``)."""
    parts = []
    for parameter in effect.parameters:
        if parameter not in names and not (size and parameter == SCALE):
            continue
        for level, column in zip(levels, columns, strict=True):
            known = effect.levels.get(level)
            parts.append(
                LinearPart(
                    f"{parameter}[{context}={level}]",
                    column,
                    parameter,
                    known or (0.0, effect.tau),
                    context="" if known else context,
                )
            )
    return parts


def term_part(term: PhysicsTerm, column: int) -> LinearPart:
    """The power-law term of a numeric context the physics names (:func:`term_for`)."""
    return LinearPart(term.parameter, column, SCALE, term.prior, reference=term.reference)


def add_parts(
    gp: PhysicsGP, parts: Sequence[LinearPart], space: UnitMap | None = None, residual_dims: int | None = None
) -> PhysicsGP:
    """``gp`` with the linear parts added to its physics (module docstring).

    Args:
        gp: the physics GP; its ``fn`` is handed the full `n x d` physical inputs.
        parts: from :func:`level_parts` and :func:`term_part`.
        space: the map of the inputs the parts read (default: ``gp.space``).
        residual_dims: the residual sees only the first this many inputs (default: ``gp``'s).
    """
    base_fn, p = gp.fn, len(gp.names)
    index = [gp.names.index(part.parameter) if part.parameter != SCALE else -1 for part in parts]
    step = 1e-5

    def fn(x: Tensor, theta: Tensor) -> Tensor:
        base = theta[..., :p]
        value = base_fn(x, base)
        columns: dict[int, Tensor] = {}  # Jacobian column of each shifted parameter, by central differences
        for j, (part, k) in enumerate(zip(parts, index, strict=True)):
            if k not in columns:
                if k < 0:
                    columns[k] = torch.ones_like(value)
                else:
                    shift = torch.zeros(p, dtype=theta.dtype)
                    shift[k] = step
                    columns[k] = (base_fn(x, base + shift) - base_fn(x, base - shift)) / (2 * step)
            feature = x[..., part.column]
            if part.reference is not None:
                feature = torch.log(feature.clamp_min(1e-300) / part.reference)
            value = value + theta[..., p + j : p + j + 1] * feature * columns[k]
        return value

    mean = torch.cat([gp.prior_mean, torch.tensor([part.prior[0] for part in parts], dtype=torch.double)])
    sd = torch.cat([gp.prior_sd, torch.tensor([part.prior[1] for part in parts], dtype=torch.double)])
    names = gp.names + tuple(part.name for part in parts)
    dims = gp.residual_dims if residual_dims is None else residual_dims
    out = PhysicsGP(fn, (mean, sd), names, space or gp.space, gp.residual, residual_dims=dims)
    out.fit_subset = gp.fit_subset
    out.inflatable = gp.names if gp.inflatable is None else gp.inflatable
    return out


def learn_tau(
    gp: PhysicsGP, z: Tensor, y: Tensor, effects: Mapping[str, ContextEffect], seen: Mapping[str, int]
) -> dict[str, float]:
    """Set each context's between-level sd to its MAP value on :data:`TAU_GRID` (residual
    hyperparameters fixed at their fit), for the contexts with data on at least two levels.

    Args:
        gp: fitted, with level offsets from :func:`add_parts` (calibrated levels keep their prior).
        z, y: its training inputs and outcomes.
        effects: context name -> its effect (the prior median and log-sd of ``tau``).
        seen: context name -> how many of its levels have data.
    """
    model = gp.model
    chosen: dict[str, float] = {}
    if model is None:
        return chosen
    kernel = model.covar_module.kernels[0]
    with torch.no_grad():
        noise = torch.diag(model.likelihood.noise.reshape(-1))
        mean = model.mean_module(z)
        for name, effect in effects.items():
            idx = [
                i for i, n in enumerate(gp.names) if f"[{name}=" in n and n.rsplit("=", 1)[1][:-1] not in effect.levels
            ]
            if seen.get(name, 0) < 2 or not idx:
                continue
            best, best_score = effect.tau, -math.inf
            for factor in TAU_GRID:
                tau = effect.tau * factor
                kernel.prior_var[idx] = tau**2
                k = model.covar_module(z).to_dense() + noise
                dist = torch.distributions.MultivariateNormal(mean, k + 1e-9 * torch.eye(len(k), dtype=k.dtype))
                score = float(dist.log_prob(y)) - 0.5 * (math.log(factor) / effect.tau_log_sd) ** 2
                if score > best_score:
                    best, best_score = tau, score
            kernel.prior_var[idx] = best**2
            gp.prior_sd[idx] = best
            chosen[name] = best
    model._clear_cache()  # the posterior cache holds the old tau
    return chosen


# --- campaigns ----------------------------------------------------------------------------------


class ContextSpace:
    """A :class:`~supraopt.surrogate.UnitMap` for ``[controls, context columns]``: the controls are
    mapped to physical units, numeric contexts back to their values, level indicators passed through."""

    def __init__(self, space: UnitMap, extra: int, numbers: Sequence[tuple[float, float]] = ()) -> None:
        self.base, self.extra = space, extra
        self._low = torch.tensor([low for low, _ in numbers], dtype=torch.double)
        self._width = torch.tensor([high - low for low, high in numbers], dtype=torch.double)

    @property
    def dim(self) -> int:
        return self.base.dim + self.extra

    def from_unit(self, z: Tensor) -> Tensor:
        d, m = self.base.dim, len(self._low)
        numbers = self._low.to(z) + z[..., d : d + m] * self._width.to(z)
        return torch.cat([self.base.from_unit(z[..., :d]), numbers, z[..., d + m :]], -1)


class ContextModel:
    """How a campaign's contexts become GP inputs and physics parts (see module docstring).

    Args:
        kinds: context name -> ``category`` or ``number``.
        contexts: the contexts of the training runs and of the experiments to propose (every
            level and value the model must know).
        effects: from :func:`load_effects`.
        terms: from :func:`load_terms`.
    """

    def __init__(
        self,
        kinds: Mapping[str, str],
        contexts: Sequence[Context],
        effects: Mapping[str, ContextEffect],
        terms: Mapping[str, PhysicsTerm] | None = None,
    ) -> None:
        self.numbers: dict[str, tuple[float, float]] = {}
        self.levels: dict[str, list[str]] = {}
        for name in sorted(kinds):
            if kinds[name] == "number":
                values = [float(c[name]) for c in contexts if isinstance(c.get(name), float)]
                if values:
                    self.numbers[name] = (min(values), max(values))
            else:
                levels = [str(c.get(name, NOT_STATED)) for c in contexts]
                if any(level != NOT_STATED for level in levels):
                    self.levels[name] = list(dict.fromkeys(levels))
        self.effects = {name: effect_for(name, effects) for name in self.levels}
        self.terms = {
            name: term
            for name, (low, _) in self.numbers.items()
            if (term := term_for(name, terms or {})) is not None and low > 0
        }
        self.width = len(self.numbers) + sum(len(levels) for levels in self.levels.values())

    @property
    def empty(self) -> bool:
        return self.width == 0

    def columns(self, contexts: Sequence[Context]) -> Tensor:
        """`n x width` context columns: scaled numbers, then one indicator per categorical level."""
        out = torch.zeros(len(contexts), self.width, dtype=torch.double)
        for i, c in enumerate(contexts):
            for j, (name, (low, high)) in enumerate(self.numbers.items()):
                value = c.get(name)
                out[i, j] = 0.5 if not isinstance(value, float) or high == low else (value - low) / (high - low)
            column = len(self.numbers)
            for name, levels in self.levels.items():
                out[i, column + levels.index(str(c.get(name, NOT_STATED)))] = 1.0
                column += len(levels)
        return out

    def fixed(self, context: Context) -> Tensor:
        """The `width` columns of one context, for :meth:`~supraopt.surrogate.PhysicsGP.at_inputs`."""
        return self.columns([context])[0]

    def wrap(self, gp: PhysicsGP, *, size: bool) -> PhysicsGP:
        """``gp`` with context: level offsets on the parameters it has (and on :data:`SCALE` and the
        numeric contexts' physics terms if ``size``), numeric contexts as residual inputs."""
        d = gp.space.dim
        parts = []
        if size:
            parts += [term_part(term, d + list(self.numbers).index(name)) for name, term in self.terms.items()]
        column = d + len(self.numbers)
        for name, levels in self.levels.items():
            columns = range(column, column + len(levels))
            parts += level_parts(name, levels, columns, self.effects[name], gp.names, size=size)
            column += len(levels)
        space = ContextSpace(gp.space, self.width, [self.numbers[n] for n in self.numbers])
        return add_parts(gp, parts, space, residual_dims=d + len(self.numbers))

    def learn_tau(self, gp: PhysicsGP, z: Tensor, y: Tensor, *, observed: Sequence[Context]) -> dict[str, float]:
        """:func:`learn_tau` for the contexts of the training runs ``observed``."""
        seen = {name: len({str(c.get(name, NOT_STATED)) for c in observed}) for name in self.levels}
        return learn_tau(gp, z, y, self.effects, seen)
