"""Recipes: which setting makes each target, how sure we are, and whether it is confirmed.

A *recipe* for a target is one setting (concentration, flow ratio, temperature) whose runs hit it:
a hit and the runs at (nearly) the same setting after it (:func:`same_recipe`: a repeat may nudge
the concentration so that the predicted size sits in the middle of the band). The recipe's
settings are those of its latest run.

* A target is **hit** when any measured run hits it.
* With ``confirm = N`` (per target, default 0) a hit is not the end: supraopt proposes ``N``
  repeats of the recipe. The target is **confirmed** when a recipe has hit on its first run and on
  ``N`` repeats with no miss, or when the model gives a further repeat at the recipe a probability
  of hitting of at least :data:`CONFIRMED_P` (runs elsewhere count as evidence too).
* A recipe with a miss among its repeats is not repeated blindly any more: the next proposal for
  the target is the setting the model now believes most reliable (highest P(hit)), and that
  becomes the recipe once it hits.

:func:`target_states` reads the ledger only (no model); the campaign adds the model's P(a repeat
hits) where it matters (:meth:`supraopt.campaign.Campaign.assess`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supraopt.ledger import Experiment, Status
from supraopt.records import Measurement
from supraopt.spec import Target

if TYPE_CHECKING:  # status reads recipes without loading torch
    from supraopt.acquisition import HitProbability

CONFIRMED_P = 0.9
"""Posterior probability that one more repeat hits, above which a recipe counts as confirmed."""
CLEAN_REPEATS_P = 0.6
"""Clean repeats confirm a recipe only if the model also gives one more repeat at least this
probability of hitting: three hits in a row at the edge of the band can be luck."""


def miss_distance(target: Target, measurement: Measurement) -> float:
    """How far a result is from the target in units of the tolerances: a hit is <= 1."""
    size = abs(measurement.diameter_nm / target.diameter_nm - 1.0) / target.tolerance
    return max(size, measurement.pdi_pct / target.pdi_max_pct)


@dataclass(frozen=True)
class Recipe:
    """Runs at one setting that hit a target at least once."""

    settings: dict[str, float]
    runs: list[str]
    """Ids of every measured run at this setting, in order."""
    hits: int
    misses: int

    @property
    def clean(self) -> bool:
        """Every run here hit: a repeat is the obvious next confirmation step."""
        return self.misses == 0


@dataclass
class TargetState:
    """Where one target stands, from the ledger alone (see the module docstring)."""

    target: Target
    best: Experiment | None
    """Measured run closest to the target (in tolerance units)."""
    hit_runs: list[str] = field(default_factory=list)
    recipe: Recipe | None = None
    confirmed_by_repeats: bool = False
    p_repeat: float | None = None
    """Model P(a further repeat at the recipe hits); None until a model has been fitted."""

    @property
    def hit(self) -> bool:
        return bool(self.hit_runs)

    @property
    def confirmed(self) -> bool:
        if not self.hit:
            return False
        if self.target.confirm == 0:
            return True
        if self.confirmed_by_repeats and (self.p_repeat is None or self.p_repeat >= CLEAN_REPEATS_P):
            return True
        return self.p_repeat is not None and self.p_repeat >= CONFIRMED_P

    @property
    def done(self) -> bool:
        """Nothing left to do for this target: hit, and confirmed when it asks for repeats."""
        return self.confirmed

    @property
    def repeats_wanted(self) -> int:
        """Repeats still to run at the recipe (0 when done or when the recipe has missed)."""
        if self.done or self.recipe is None or not self.recipe.clean or self.confirmed_by_repeats:
            return 0
        return max(self.target.confirm + 1 - self.recipe.hits, 0)

    @property
    def verdict(self) -> str:
        if not self.hit:
            return "not hit"
        if self.target.confirm == 0:
            return "hit"
        return "confirmed" if self.confirmed else "hit, not confirmed"

    def to_json(self) -> dict[str, Any]:
        m = self.best.measurement if self.best is not None else None
        return {
            "target": self.target.__dict__,
            "hit": self.hit,
            "confirmed": self.confirmed,
            "done": self.done,
            "verdict": self.verdict,
            "hit_runs": self.hit_runs,
            "best": None
            if self.best is None or m is None
            else {"id": self.best.id, "diameter_nm": m.diameter_nm, "pdi_pct": m.pdi_pct},
            "recipe": None if self.recipe is None else self.recipe.__dict__,
            "p_repeat_hits": self.p_repeat,
        }


def target_states(targets: tuple[Target, ...], experiments: list[Experiment]) -> list[TargetState]:
    """Each target's best run, hits, recipe and confirmation by repeats, from the ledger."""
    measured = [e for e in experiments if e.status is Status.DONE and e.measurement is not None]
    states = []
    for target in targets:
        best = min(measured, key=lambda e: miss_distance(target, e.measurement), default=None)  # type: ignore[arg-type]
        hit_runs = [e.id for e in measured if _hits(target, e)]
        state = TargetState(target, best, hit_runs)
        recipes = _recipes(target, measured)
        if recipes:
            # the most hits without a miss, then the most hits, then the latest
            state.recipe = max(recipes, key=lambda r: (r.clean, r.hits, -r.misses, recipes.index(r)))
            state.confirmed_by_repeats = any(r.clean and r.hits >= target.confirm + 1 for r in recipes)
        states.append(state)
    return states


def _hits(target: Target, e: Experiment) -> bool:
    m = e.measurement
    return m is not None and target.is_hit(m.diameter_nm, m.pdi_pct)


SAME_RECIPE_LOG = 0.12
"""Runs whose concentration and flow ratio differ by at most this (natural log, ~12 %) ..."""
SAME_RECIPE_C = 1.5
"""... and whose temperatures differ by at most this (°C) are one recipe, re-centred: a repeat may
nudge the concentration so that the predicted size sits in the middle of the band."""


def same_recipe(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two settings are the same recipe (a repeat, perhaps re-centred on the target)."""
    try:
        logs = [abs(math.log(a[k] / b[k])) for k in ("concentration_mg_ml", "flow_ratio")]
        return max(logs) <= SAME_RECIPE_LOG and abs(a["temperature_c"] - b["temperature_c"]) <= SAME_RECIPE_C
    except (KeyError, ValueError, ZeroDivisionError):
        return a == b


def _recipes(target: Target, measured: list[Experiment]) -> list[Recipe]:
    """Runs grouped into recipes (each group anchored at a hit); a recipe's settings are its latest run's."""
    groups: list[list[Experiment]] = []
    for e in measured:
        group = next((g for g in groups if same_recipe(g[0].settings, e.settings)), None)
        if group is not None:
            group.append(e)
        elif _hits(target, e):
            groups.append([e])
    recipes = []
    for runs in groups:
        hits = sum(_hits(target, e) for e in runs)
        recipes.append(Recipe(dict(runs[-1].settings), [e.id for e in runs], hits, len(runs) - hits))
    return recipes


@dataclass(frozen=True)
class Card:
    """The recipe card of one target: what goes into the lab notebook."""

    target: Target
    state: TargetState
    settings: dict[str, float] | None
    """The recipe (or, before a hit, the setting most likely to hit)."""
    diameter_nm: float | None = None
    diameter_sd_nm: float | None = None
    pdi_pct: float | None = None
    pdi_sd_pct: float | None = None
    p_hit: float | None = None
    """P(one more run at these settings hits)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.__dict__,
            "status": self.state.verdict,
            "settings": self.settings,
            "predicted_diameter_nm": self.diameter_nm,
            "predicted_diameter_sd_nm": self.diameter_sd_nm,
            "predicted_pdi_pct": self.pdi_pct,
            "predicted_pdi_sd_pct": self.pdi_sd_pct,
            "p_repeat_hits": self.p_hit,
            "backing_runs": [] if self.state.recipe is None else self.state.recipe.runs,
            "hits": 0 if self.state.recipe is None else self.state.recipe.hits,
            "misses": 0 if self.state.recipe is None else self.state.recipe.misses,
        }


def card(state: TargetState, acq: HitProbability, z: Any, settings: dict[str, float] | None) -> Card:
    """A recipe card from the fitted model's prediction at the recipe's unit-cube point ``z``."""
    if settings is None:
        return Card(state.target, state, None)
    [p] = acq.predict(z)
    return Card(state.target, state, settings, p.diameter_nm, p.diameter_sd_nm, p.pdi_pct, p.pdi_sd_pct, p.p_hit)
