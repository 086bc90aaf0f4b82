"""Recipes: which setting makes each target, how sure we are, and whether it is confirmed.

A *recipe* for a target is one setting (concentration, flow ratio, temperature) whose runs hit it:
a hit and the runs at (nearly) the same setting after it (:func:`same_recipe`: a repeat may nudge
the concentration so that the predicted size sits in the middle of the band). The recipe's
settings are those of its latest run.

* A target is **hit** when any measured run hits it.
* With ``confirm = N`` (per target, default 0) a hit is not the end: supraopt proposes ``N``
  repeats of the recipe, each at the recipe's *repeat setting*: the setting of the same recipe
  that the model, given every run so far, gives the highest probability that one more run hits
  (its concentration re-centred so the predicted size sits in the middle of the band), not the
  point that happened to hit.
* The target is **confirmed** (issue 11's definition) when the repeats hit too — the recipe has hit
  at least ``N + 1`` times with its last ``N`` runs all hits — or when the model gives one more run
  at the repeat setting a probability of hitting of at least :data:`CONFIRMED_P`. Repeats that hit
  while the model gives one more run less than :data:`CLEAN_REPEATS_P` do not confirm: a few hits
  in a row near the edge of the band can be luck.
* "One more run" includes every spread a repeat sees: the model's uncertainty about the mean at
  that setting, the sampling noise of size and PDI, and a calibration error whose size is known
  only to a range (:func:`repeat_log_p_hit`).
* A recipe whose last run missed is not repeated blindly: the next proposal for the target is the
  setting the model now believes most reliable (highest P(hit)), and that becomes the recipe once
  it hits.

:func:`target_states` reads the ledger only (no model); the campaign adds the model's repeat
setting and P(a repeat hits) where it matters (:meth:`supraopt.campaign.Campaign.assess`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supraopt.ledger import Experiment, Status
from supraopt.records import Measurement
from supraopt.spec import Target

if TYPE_CHECKING:  # status reads recipes without loading torch
    from torch import Tensor

    from supraopt.acquisition import HitProbability

CONFIRMED_P = 0.9
"""Posterior probability that one more repeat hits, above which a recipe counts as confirmed."""
CLEAN_REPEATS_P = 0.6
"""Repeats that hit confirm a recipe only if the model also gives one more run at least this."""


def confirms(repeated: bool, p_repeat: float | None) -> bool:
    """Whether a recipe confirms its target: its repeats have hit (:meth:`Recipe.repeated`) and the
    model does not give one more run less than :data:`CLEAN_REPEATS_P`, or the model gives it at least
    :data:`CONFIRMED_P`. ``p_repeat`` None: no model yet, the repeats speak alone."""
    if p_repeat is None:
        return repeated
    return (repeated and p_repeat >= CLEAN_REPEATS_P) or p_repeat >= CONFIRMED_P


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
    streak: int = 0
    """Hits in a row at the end of :attr:`runs`."""
    anchor: dict[str, float] = field(default_factory=dict)
    """Settings of its first run: every run of the recipe is :func:`same_recipe` as these."""

    @property
    def clean(self) -> bool:
        """Every run here hit: a repeat is the obvious next confirmation step."""
        return self.misses == 0

    def repeated(self, n: int) -> bool:
        """At least ``n + 1`` hits, the last ``n`` runs all hits: the repeats asked for have hit."""
        return self.hits >= n + 1 and self.streak >= n


@dataclass
class TargetState:
    """Where one target stands, from the ledger alone (see the module docstring)."""

    target: Target
    best: Experiment | None
    """Measured run closest to the target (in tolerance units)."""
    hit_runs: list[str] = field(default_factory=list)
    recipes: list[Recipe] = field(default_factory=list)
    """Every recipe that has hit this target; :attr:`recipe` is the one to use."""
    recipe: Recipe | None = None
    confirmed_by_repeats: bool = False
    """The recipe's repeats have hit (:meth:`Recipe.repeated`); the model may still veto them."""
    repeat_settings: dict[str, float] | None = None
    """Where the next repeat goes and what the card gives: the recipe's setting with the highest
    P(a repeat hits); None until a model has been fitted (then the recipe's latest settings)."""
    p_repeat: float | None = None
    """Model P(a further run at :attr:`repeat_settings` hits); None until a model has been fitted."""

    @property
    def hit(self) -> bool:
        return bool(self.hit_runs)

    def use(self, recipe: Recipe, settings: dict[str, float], p_repeat: float) -> None:
        """Make ``recipe`` the target's recipe, repeated at ``settings`` where the model gives one
        more run a chance ``p_repeat`` of hitting."""
        self.recipe, self.repeat_settings, self.p_repeat = recipe, settings, p_repeat
        self.confirmed_by_repeats = recipe.repeated(self.target.confirm)

    @property
    def confirmed(self) -> bool:
        if not self.hit:
            return False
        if self.target.confirm == 0:
            return True
        return confirms(self.confirmed_by_repeats, self.p_repeat)

    @property
    def done(self) -> bool:
        """Nothing left to do for this target: hit, and confirmed when it asks for repeats."""
        return self.confirmed

    @property
    def repeats_wanted(self) -> int:
        """Repeats still to run at the recipe (0 when done, when its repeats have all hit and only
        the model is still unsure, or when its last run missed)."""
        recipe, n = self.recipe, self.target.confirm
        if self.done or recipe is None or self.confirmed_by_repeats or recipe.streak == 0:
            return 0
        return max(n + 1 - recipe.hits, n - recipe.streak, 0)

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
            "repeat_settings": self.repeat_settings,
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
        state.recipes = recipes
        if recipes:
            # without a model: repeated as asked, then the most hits without a miss, the most hits, the latest
            n = target.confirm
            state.recipe = max(recipes, key=lambda r: (r.repeated(n), r.clean, r.hits, -r.misses, recipes.index(r)))
            state.confirmed_by_repeats = state.recipe.repeated(n)
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


REPEAT_NUDGE_LOG = SAME_RECIPE_LOG / 2
REPEAT_NUDGE_C = SAME_RECIPE_C / 2
"""Where a repeat may go (:meth:`supraopt.campaign.Campaign.repeat_point`): the flow ratio (natural
log) and temperature (°C) nudged by up to these, the concentration re-centred: still the same recipe."""


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
        outcomes = [_hits(target, e) for e in runs]
        streak = len(outcomes) - max((i + 1 for i, hit in enumerate(outcomes) if not hit), default=0)
        hits = sum(outcomes)
        latest, anchor = dict(runs[-1].settings), dict(runs[0].settings)
        recipes.append(Recipe(latest, [e.id for e in runs], hits, len(runs) - hits, streak, anchor))
    return recipes


CALIBRATION_SD_RANGE = (0.01, 0.015, 0.02)
"""The run-to-run calibration error of a sized sample is "~1-2 %" (SCIENCE.md section 6), not known
better for a given rig: a repeat's chance is averaged over this range rather than taken at its
middle (the acquisition's ``SEM_CALIBRATION_SD``), which overstates it on a rig at the top of it."""


def repeat_moments(acq: HitProbability, z: Tensor) -> dict[str, Tensor]:
    """:meth:`HitProbability.moments` of one more run at unit-cube points ``z``: the GPs' uncertainty
    about the mean there plus the measurement noise, with the calibration part of the size noise
    at the mean variance of :data:`CALIBRATION_SD_RANGE` (for the card's ± sd)."""
    import torch

    from supraopt.surrogate import SEM_CALIBRATION_SD

    m = acq.moments(z)
    mean_var = sum(c**2 for c in CALIBRATION_SD_RANGE) / len(CALIBRATION_SD_RANGE)
    return m | {"sd_d": torch.sqrt(m["sd_d"] ** 2 - SEM_CALIBRATION_SD**2 + mean_var)}


def repeat_log_p_hit(acq: HitProbability, z: Tensor) -> Tensor:
    """log P(one more run at unit-cube points ``z`` hits), with every spread a repeat sees: the GPs'
    uncertainty about the mean there, the sampling noise of size and PDI, and a calibration error
    averaged over :data:`CALIBRATION_SD_RANGE` (P(hit) averaged, not the variance)."""
    import torch

    from supraopt.surrogate import SEM_CALIBRATION_SD

    m = acq.moments(z)
    rest = m["sd_d"] ** 2 - SEM_CALIBRATION_SD**2
    logs = [acq.log_hit_given(m | {"sd_d": torch.sqrt(rest + c**2)}) for c in CALIBRATION_SD_RANGE]
    return torch.logsumexp(torch.stack(logs), 0) - math.log(len(logs))


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


def card(state: TargetState, acq: HitProbability, z: Tensor, settings: dict[str, float] | None) -> Card:
    """A recipe card: the fitted model's prediction of one more run at unit-cube point ``z``."""
    import torch

    if settings is None:
        return Card(state.target, state, None)
    with torch.no_grad():
        m = repeat_moments(acq, z)
        p_hit = float(torch.exp(repeat_log_p_hit(acq, z))[0])
    d, pdi = math.exp(float(m["mu_d"][0])), math.exp(float(m["mu_p"][0]))
    return Card(state.target, state, settings, d, d * float(m["sd_d"][0]), pdi, pdi * float(m["sd_p"][0]), p_hit)
