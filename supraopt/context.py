"""Context in the model: chips, NC batches and measured conditions the campaign records but does not set.

**Categorical context** (chip, NC batch, operator...). Each level gets an offset on the physics
parameters that context plausibly moves, declared in the preset's ``[context_effects]`` (a chip
moves the droplet prefactor ``log_droplet_k``, an NC batch the packing ``log_phi_inorg``; a name
the preset does not know moves the overall size scale). The offsets are extra linear parameters of
the physics GP (:class:`~supraopt.surrogate.PhysicsGP`): their Jacobian column is the level's
indicator times the Jacobian of the parameter they shift, so they are integrated out exactly like
the physics parameters. They are hierarchical: every offset ``~ N(0, tau^2)``, with ``tau`` (the
spread between levels, per context) having a log-normal prior from the preset and set to its MAP
value on a small grid once two levels have data. A new level therefore starts from the population
(the other levels' mean, with ``tau`` of extra uncertainty) and one run calibrates it. A run whose
context does not name a level is one more level, ``(not stated)``: the chip used before anyone
said which.

**Numeric context** (room temperature, NC core size...) is an input of the GP residual, scaled to
[0, 1] over the values seen; a run without a value sits in the middle.

The GP then has inputs ``[3 controls, numeric contexts, level indicators]``; for the acquisition,
:meth:`ContextModel.fixed` gives the columns of one context, and
:meth:`~supraopt.surrogate.PhysicsGP.at_inputs` a GP on the 3 controls with that context inside, so
the acquisition never sees context. A campaign without context never builds a :class:`ContextModel`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from supraopt.errors import SpecError
from supraopt.records import Context
from supraopt.spec import preset_path, read_toml
from supraopt.surrogate import PhysicsGP, UnitMap

SCALE = "scale"
"""Pseudo-parameter of ``[context_effects]``: a constant offset on the log SP size."""
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


DEFAULT_EFFECT = ContextEffect((SCALE,), 0.08)
"""For a context name the preset does not know: an offset on the overall size scale (8 % sd)."""


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
            effect = ContextEffect(tuple(parameters), float(entry["tau"]), float(entry.get("tau_log_sd", 0.5)))
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


class ContextSpace:
    """A :class:`~supraopt.surrogate.UnitMap` for ``[controls, context columns]``: the controls are
    mapped to physical units, the context columns passed through."""

    def __init__(self, space: UnitMap, extra: int) -> None:
        self.base, self.extra = space, extra

    @property
    def dim(self) -> int:
        return self.base.dim + self.extra

    def from_unit(self, z: Tensor) -> Tensor:
        d = self.base.dim
        return torch.cat([self.base.from_unit(z[..., :d]), z[..., d:]], -1)


@dataclass(frozen=True)
class _Offset:
    column: int
    """Index of the level's indicator among the context columns."""
    context: str
    level: str
    parameter: str


class ContextModel:
    """How contexts become GP inputs and physics offsets (see module docstring).

    Args:
        kinds: context name -> ``category`` or ``number``.
        contexts: the contexts of the training runs and of the experiments to propose (every
            level and value the model must know).
        effects: from :func:`load_effects`.
    """

    def __init__(
        self, kinds: Mapping[str, str], contexts: Sequence[Context], effects: Mapping[str, ContextEffect]
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
        self.offsets: list[_Offset] = []
        column = len(self.numbers)
        for name, levels in self.levels.items():
            for level in levels:
                for parameter in self.effects[name].parameters:
                    self.offsets.append(_Offset(column, name, level, parameter))
                column += 1
        self.width = column

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
        """``gp`` with context: level offsets on the parameters it has (and on :data:`SCALE` if
        ``size``), numeric contexts as residual inputs."""
        base_fn, p, d = gp.fn, len(gp.names), gp.space.dim
        offsets = [o for o in self.offsets if o.parameter in gp.names or (size and o.parameter == SCALE)]
        index = [gp.names.index(o.parameter) if o.parameter != SCALE else -1 for o in offsets]
        step = 1e-5

        def fn(x: Tensor, theta: Tensor) -> Tensor:
            base = theta[..., :p]
            value = base_fn(x[..., :d], base)
            columns: dict[int, Tensor] = {}  # Jacobian column of each shifted parameter, by central differences
            for j, (offset, k) in enumerate(zip(offsets, index, strict=True)):
                if k not in columns:
                    if k < 0:
                        columns[k] = torch.ones_like(value)
                    else:
                        shift = torch.zeros(p, dtype=theta.dtype)
                        shift[k] = step
                        columns[k] = (base_fn(x[..., :d], base + shift) - base_fn(x[..., :d], base - shift)) / (
                            2 * step
                        )
                value = value + theta[..., p + j : p + j + 1] * x[..., d + offset.column] * columns[k]
            return value

        mean = torch.cat([gp.prior_mean, torch.zeros(len(offsets), dtype=torch.double)])
        sd = torch.cat([gp.prior_sd, torch.tensor([self.effects[o.context].tau for o in offsets], dtype=torch.double)])
        names = gp.names + tuple(f"{o.parameter}[{o.context}={o.level}]" for o in offsets)
        space = ContextSpace(gp.space, self.width)
        return PhysicsGP(fn, (mean, sd), names, space, gp.residual, residual_dims=d + len(self.numbers))

    def learn_tau(self, gp: PhysicsGP, z: Tensor, y: Tensor, *, observed: Sequence[Context]) -> dict[str, float]:
        """Set each context's between-level sd to its MAP value on :data:`TAU_GRID` (residual
        hyperparameters fixed at their fit), for contexts with data on at least two levels."""
        groups = {name: [i for i, n in enumerate(gp.names) if f"[{name}=" in n] for name in self.levels}
        model = gp.model
        chosen: dict[str, float] = {}
        if model is None:
            return chosen
        kernel = model.covar_module.kernels[0]
        with torch.no_grad():
            noise = torch.diag(model.likelihood.noise.reshape(-1))
            mean = model.mean_module(z)
            for name, idx in groups.items():
                seen = {str(c.get(name, NOT_STATED)) for c in observed}
                if len(seen) < 2 or not idx:
                    continue
                effect = self.effects[name]
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
        model._clear_cache()  # type: ignore[operator]  # the posterior cache holds the old tau
        return chosen
