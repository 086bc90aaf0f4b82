"""A campaign: the spec plus its ledger. Suggest, record, ask again.

*The data is the state, the model is derived*: every :meth:`Campaign.suggest` refits the
surrogates from the ledger, so a campaign can be resumed, shared or corrected at any time.

    >>> campaign = Campaign.create("campaigns/my-450", model="cspbbr3-flow-focusing", target_nm=450)
    >>> [s] = campaign.suggest()
    >>> campaign.record(s.experiment_id, Measurement(diameter_nm=441.0, pdi_pct=4.8, n_particles=120))
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supraopt.errors import InputError, LedgerError, SpecError
from supraopt.ledger import OPEN, BatchRow, Experiment, Ledger, Status
from supraopt.preset import Preset
from supraopt.recipe import (
    REPEAT_NUDGE_C,
    REPEAT_NUDGE_LOG,
    Card,
    Recipe,
    TargetState,
    card,
    confirms,
    miss_distance,
    repeat_log_p_hit,
    same_recipe,
    target_states,
)
from supraopt.records import Context, Failure, Measurement, Plausible, RigLimits, validate_context
from supraopt.space import SearchSpace
from supraopt.spec import (
    SPEC_FILE,
    CampaignSpec,
    ContextVariable,
    LoopSettings,
    RigSettings,
    Target,
    check_plausible,
    check_targets,
    default_bounds,
    load_spec,
    plausible_ranges,
    preset_path,
    resolve_model,
)

if TYPE_CHECKING:  # torch, BoTorch and the models load only when something is fitted (status needs none)
    import torch

    from supraopt.acquisition import Goals, HitProbability, Outlook
    from supraopt.context import ContextModel
    from supraopt.surrogate import Feasibility, PhysicsGP, ResidualPrior

PLAIN_SIZE_RESIDUAL = {"sd": 0.5, "noise_sd": 0.02}
PLAIN_PDI_RESIDUAL = {"sd": 0.5, "noise_sd": 0.08}
"""Residual priors (:class:`~supraopt.surrogate.ResidualPrior` fields) of the physics-free GPs: they must
explain everything, so they start wide."""

MIN_PDI_PCT = 0.3
"""Floor under measured PDI values before taking logs (a 0 % CV is a measuring artefact)."""

UNREACHABLE_P = 0.01
"""A target whose P(any setting in the envelope hits) falls under this is declared out of reach."""
MIN_RUNS_FOR_VERDICT = 3
"""Finished runs (one of them measured at least) needed before a target may be declared out of
reach: the prior alone never does."""


@dataclass(frozen=True)
class Suggestion:
    """A proposed experiment, as stored in the ledger."""

    experiment_id: str
    settings: dict[str, float]
    prediction: dict[str, float]
    context: Context = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {"id": self.experiment_id, "settings": self.settings, "prediction": self.prediction}
        return data | ({"context": self.context} if self.context else {})


@dataclass(frozen=True)
class ModelOptions:
    """Switches for the model's ingredients. The defaults are supraopt; the rest exist for ablations."""

    physics: bool = True
    """Physics mean and kernel; False gives a plain GP with a constant mean (plain BO)."""
    feasibility: bool = True
    """Learn the failure window; False assumes every run gives SPs."""
    data_noise: bool = True
    """Noise from the measurement (n particles, CV); False learns a homoscedastic noise only."""
    random_start: int = 0
    """Number of first experiments drawn from a Sobol sequence instead of the model."""
    drift: bool = True
    """Detect changes of the rig nobody stated (:mod:`supraopt.drift`); costs nothing while there are none."""


def constant_gp(space: SearchSpace, log_center: float, residual: ResidualPrior) -> PhysicsGP:
    """A GP with an (integrated-out) constant mean and a Matérn residual: no physics at all."""
    import torch

    from supraopt.surrogate import PhysicsGP

    def fn(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return theta[..., :1] + 0.0 * x[..., 0]

    prior = (torch.tensor([log_center], dtype=torch.double), torch.tensor([2.0], dtype=torch.double))
    gp = PhysicsGP(fn, prior, ("log_mean",), space, residual)
    gp.inflatable = ()  # plain BO: a wide constant, nothing for the data to contradict
    return gp


@dataclass(frozen=True)
class Surrogates:
    """Everything fitted from the ledger for one suggestion."""

    size: PhysicsGP
    pdi: PhysicsGP
    feasibility: Feasibility
    acquisition: HitProbability
    """Hit probability for the first target."""
    pending_z: torch.Tensor
    context: Context = field(default_factory=dict)
    """The context the acquisition's GPs have fixed inside (the proposal's)."""
    context_model: ContextModel | None = None
    """How contexts enter the GPs; None when the campaign has none (the GPs see the 3 controls only)."""
    per_target: tuple[HitProbability, ...] = ()
    """Hit probability for every target, in the spec's order."""
    run_contexts: tuple[Context, ...] = ()
    """The measured runs' contexts as the model saw them (with the stretches of :mod:`supraopt.drift`)."""


@dataclass(frozen=True)
class CampaignStatus:
    """Summary for humans and scripts."""

    target: Target
    """The first target."""
    counts: dict[str, int]
    best: Experiment | None
    """Best run for the first target."""
    hit: bool
    """Every target is done: hit, and confirmed by its repeats when it asks for them."""
    experiments: list[Experiment] = field(default_factory=list)
    context: Context = field(default_factory=dict)
    """The campaign's current context: the conditions the next experiments run under."""
    targets: list[TargetState] = field(default_factory=list)
    """Every target's best run, hits and recipe."""
    recorded: dict[str, int] = field(default_factory=dict)
    """Experiment id -> seq of its first result event (:meth:`Ledger.result_order`): the run order."""

    def _run_order(self, experiment_id: str) -> float:
        return self.recorded.get(experiment_id, math.inf)  # ties (none recorded) keep the ledger's order

    @property
    def first_hit(self) -> Experiment | None:
        """The hit whose result was recorded first, in the ledger's record order (in a batch, not
        necessarily the lowest id; a later correction or a clock does not change it)."""
        hits = [e for e in self.experiments if self.is_hit(e)]
        return min(hits, key=lambda e: self._run_order(e.id), default=None)

    def first_hits(self) -> list[str | None]:
        """Each target's first hit (in record order, as :attr:`first_hit`), None for a target not hit."""
        return [min(s.hit_runs, key=self._run_order, default=None) for s in self.targets]

    def is_hit(self, e: Experiment) -> bool:
        m = e.measurement
        specs = [s.target for s in self.targets] or [self.target]
        return e.status is Status.DONE and m is not None and any(t.is_hit(m.diameter_nm, m.pdi_pct) for t in specs)

    def to_json(self) -> dict[str, Any]:
        first = self.first_hit
        return {
            "target": self.target.__dict__,
            "counts": self.counts,
            "hit": self.hit,
            "context": self.context,
            "targets": [t.to_json() | {"first_hit": f} for t, f in zip(self.targets, self.first_hits(), strict=True)],
            "best": None if self.best is None else experiment_json(self.best),
            "first_hit": None if first is None else first.id,
            "experiments": [{**experiment_json(e), "hit": self.is_hit(e)} for e in self.experiments],
        }


def experiment_json(e: Experiment) -> dict[str, Any]:
    return {
        "id": e.id,
        "status": str(e.status),
        "settings": e.settings,
        "prediction": e.prediction,
        "measurement": None if e.measurement is None else e.measurement.to_json(),
        "failure": None if e.failure is None else e.failure.reason,
        "note": e.note,
        "created_at": e.created_at.isoformat(),
        "context": e.context,
    }


def _reads_as_number(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


LAWS = {"SP sizes": "size law", "PDIs": "polydispersity law"}
"""The physics each outcome's prior belongs to, for :meth:`Assessment.notes`."""


@dataclass(frozen=True)
class Assessment:
    """Every target's state with the model's view: P(a repeat hits) and, for targets not yet hit,
    whether the spec still looks reachable (see :meth:`Campaign.assess`)."""

    states: list[TargetState]
    outlooks: dict[int, Outlook]
    """Target index -> outlook, for targets not hit yet once enough runs are measured."""
    widened: dict[str, float] = field(default_factory=dict)
    """Outcome ('SP sizes', 'PDIs') -> factor on its physics parameters' prior sds, where the runs lie far
    outside the preset's prior (:data:`~supraopt.surrogate.WIDENED`)."""

    @property
    def all_done(self) -> bool:
        return all(s.done for s in self.states)

    def unreachable(self) -> list[int]:
        """Indices of targets not hit whose P(any setting hits) is under :data:`UNREACHABLE_P`."""
        return [i for i, o in self.outlooks.items() if o.p_any_hit < UNREACHABLE_P and not self.states[i].hit]

    def open(self) -> list[int]:
        """Targets still to work on: not done and not out of reach."""
        out = set(self.unreachable())
        return [i for i, s in enumerate(self.states) if not s.done and i not in out]

    def messages(self) -> list[str]:
        """One line per target that looks out of reach, with the nearest achievable spec."""
        return [out_of_reach_message(self.states[i].target, self.outlooks[i]) for i in self.unreachable()]

    def notes(self, preset: str) -> list[str]:
        """One line per outcome whose runs lie far outside the preset's prior."""
        return [
            f"the {outcome} measured so far lie far outside the {preset} preset's prior: the model widened the "
            f"{LAWS[outcome]}'s parameter sds {factor:.1f}x and follows the runs. If this rig is not of the "
            "preset's kind, `supraopt fit FILE --into DIR` on past runs gives a new campaign a better start."
            for outcome, factor in self.widened.items()
        ]


def out_of_reach_message(target: Target, outlook: Outlook) -> str:
    """'450 nm ± 3 %, PDI ≤ 2 % looks out of reach ...' with the nearest spec the rig can make."""
    text = f"{target.label()} looks out of reach (P(any setting in the envelope hits) = {outlook.p_any_hit:.1%})"
    nearest = []
    if outlook.lowest_pdi_at_size is not None:
        nearest.append(
            f"the lowest PDI reachable at {target.diameter_nm:g} nm is about {outlook.lowest_pdi_at_size:.1f} %"
        )
    if outlook.size_range_nm is not None:
        low, high = outlook.size_range_nm
        nearest.append(f"under {target.pdi_max_pct:g} % PDI the rig makes about {low:.0f}-{high:.0f} nm")
    else:
        nearest.append(f"no setting is predicted under {target.pdi_max_pct:g} % PDI")
    return f"{text}: {'; '.join(nearest)}."


class Campaign:
    """A campaign folder: ``campaign.toml`` (the spec) and the ledger. Use :meth:`create` / :meth:`open`."""

    def __init__(
        self, directory: Path, spec: CampaignSpec, ledger: Ledger, options: ModelOptions | None = None
    ) -> None:
        self.directory, self.spec, self.ledger = directory, spec, ledger
        self.options = options or ModelOptions()
        self.preset = Preset.load(resolve_model(spec.model, directory))
        self.space = SearchSpace(spec.bounds)
        self.plausible: Plausible = plausible_ranges(resolve_model(spec.model, directory), spec.plausible)
        """What a rig of this kind can measure: results outside are refused (see ``[plausible]``)."""
        self.last_suggest_seconds = math.nan
        self.last_assessment: Assessment | None = None
        """What the last :meth:`propose` concluded about every target (out of reach, confirmed)."""
        self._fit_cache: tuple[str, Surrogates] | None = None
        self._assess_cache: tuple[str, Assessment] | None = None
        self._spec_mtime = self._spec_file_mtime()

    @cached_property
    def context_effects(self) -> dict[str, Any]:
        """The preset's ``[context_effects]`` (read on first use: it needs the model's modules)."""
        from supraopt.context import load_effects

        return load_effects(resolve_model(self.spec.model, self.directory))

    @cached_property
    def context_terms(self) -> dict[str, Any]:
        """The preset's ``[context_terms]``: numeric contexts its physics names (read on first use)."""
        from supraopt.context import load_terms

        return load_terms(resolve_model(self.spec.model, self.directory))

    # --- lifecycle --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | Path,
        model: str,
        target_nm: float | Iterable[float],
        *,
        tolerance: float = 0.03,
        pdi_max_pct: float = 6.0,
        confirm: int = 0,
        seed: int = 0,
        bounds: dict[str, tuple[float, float]] | None = None,
        rig: RigSettings | None = None,
        name: str | None = None,
        ledger_url: str | None = None,
        loop: LoopSettings | None = None,
        context: dict[str, ContextVariable] | None = None,
    ) -> Campaign:
        """Write ``DIR/campaign.toml`` and an empty ledger; refuses to overwrite a campaign.

        ``target_nm`` is one size or several (one campaign, one model, several targets sharing
        ``tolerance``, ``pdi_max_pct`` and ``confirm``).
        """
        directory = Path(directory)
        sizes = [target_nm] if isinstance(target_nm, (int, float)) else list(target_nm)
        if (directory / SPEC_FILE).exists():
            raise SpecError(f"{directory} already holds a campaign; pick another folder or open it.")
        preset_path(resolve_model(model, directory))
        spec = CampaignSpec(
            name=name or directory.name,
            model=model,
            targets=tuple(Target(float(d), float(tolerance), float(pdi_max_pct), confirm) for d in sizes),
            bounds=bounds or default_bounds(resolve_model(model, directory)),
            seed=seed,
            rig=rig or RigSettings(),
            ledger_url=ledger_url,
            loop=loop or LoopSettings(),
            context=context or {},
        )
        check_plausible(spec, plausible_ranges(resolve_model(model, directory)))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (SPEC_FILE + ".tmp")
            tmp.write_text(spec.to_toml(), encoding="utf-8")
            tmp.replace(directory / SPEC_FILE)
        except OSError as error:
            raise SpecError(f"cannot create the campaign in {str(directory)!r} ({error.strerror or error}).") from None
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | Path, options: ModelOptions | None = None) -> Campaign:
        directory = Path(directory)
        spec = load_spec(directory)
        url = spec.ledger_url or f"sqlite:///{(directory / 'ledger.sqlite').resolve()}"
        campaign = cls(directory, spec, Ledger(url), options)
        campaign.share_spec()
        return campaign

    def share_spec(self) -> None:
        """A campaign whose ``ledger_url`` is set keeps a copy of its spec in that ledger, for watchers
        without the folder (``supraopt dashboard --ledger-url``). Best effort: a read-only login skips it."""
        if self.spec.ledger_url is None:
            return
        with contextlib.suppress(LedgerError):
            self.ledger.share_spec(replace(self.spec, ledger_url=None).to_toml())

    def close(self) -> None:
        self.ledger.close()

    def restrict_to(self, limits: RigLimits) -> list[str]:
        """Search only inside a rig's hard limits as well as the campaign bounds; returns what narrowed."""
        bounds = dict(self.space.bounds)
        narrowed = []
        for name, (rig_low, rig_high) in limits.bounds.items():
            if name not in bounds:
                continue
            low, high = max(bounds[name][0], rig_low), min(bounds[name][1], rig_high)
            if low > high:
                raise SpecError(
                    f"campaign bounds {name}=[{bounds[name][0]:g}, {bounds[name][1]:g}] do not overlap the rig "
                    f"limits [{rig_low:g}, {rig_high:g}]; fix [bounds] in campaign.toml."
                )
            if (low, high) != bounds[name]:
                narrowed.append(f"{name} to [{low:g}, {high:g}]")
                bounds[name] = (low, high)
        self.space = SearchSpace(bounds)
        return narrowed

    def __enter__(self) -> Campaign:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- context ----------------------------------------------------------------------------------

    def check_context(
        self, context: Mapping[str, Any] | None, where: str = "context", assume: Mapping[str, str] | None = None
    ) -> tuple[Context, dict[str, str]]:
        """Validate a context against ``[context]`` in campaign.toml, or against the kinds remembered
        from each name's first use when there is no ``[context]``.

        Returns the clean context (numbers as floats, levels as text; a text that reads as a number
        is a number for a numeric context) and the kinds of names used for the first time. Raises
        :class:`InputError` naming the bad entry; writes nothing. ``assume``: kinds of names not yet
        remembered (a CSV file decides them over all its rows).
        """
        clean = validate_context(dict(context or {}), where)
        declared = self.spec.context
        kinds = (
            {n: v.kind for n, v in declared.items()} if declared else dict(assume or {}) | self.ledger.context_kinds()
        )
        out: Context = {}
        new: dict[str, str] = {}
        for name, value in clean.items():
            if declared and name not in declared:
                raise InputError(
                    f"{where} {name!r} is not declared: campaign.toml [context] declares {', '.join(declared)}."
                )
            kind = kinds.get(name) or new.get(name) or ("number" if _reads_as_number(value) else "category")
            if kind == "number":
                if not _reads_as_number(value):
                    unit = f" in {declared[name].unit}" if name in declared and declared[name].unit else ""
                    raise InputError(f"{where} {name}={value!r} is not a number: {name} is a measured number{unit}.")
                out[name] = float(value)
            else:
                out[name] = value if isinstance(value, str) else f"{value:g}"
            if name not in kinds:
                new[name] = kind
        return out, new

    def current_context(self) -> Context:
        """The conditions the next experiments run under (stated to ``suggest``; kept until changed)."""
        return self.ledger.current_context()

    def _context_kinds(self, contexts: Sequence[Context]) -> dict[str, str]:
        kinds = self.ledger.context_kinds() | {n: v.kind for n, v in self.spec.context.items()}  # declared win
        for context in contexts:
            for name, value in context.items():
                kinds.setdefault(name, "category" if isinstance(value, str) else "number")
        return kinds

    def _proposal_context(self, experiments: Sequence[Experiment], context: Context | None) -> Context:
        """The context to propose for: the given one (default: the current one), completed by the
        latest experiment's value of every name it does not state (the rig most likely still has it)."""
        out = dict(self.ledger.current_context() if context is None else context)
        for e in reversed(experiments):
            for name, value in e.context.items():
                out.setdefault(name, value)
        return out

    # --- model ------------------------------------------------------------------------------------

    def fit(self, experiments: Sequence[Experiment] | None = None, context: Context | None = None) -> Surrogates:
        """Fit the surrogates to the ledger (or to the given experiments), for proposals under
        ``context`` (default: the campaign's current context)."""
        import torch

        from supraopt.acquisition import HitProbability
        from supraopt.context import ContextModel
        from supraopt.drift import drift_tau, fit_with_changes
        from supraopt.surrogate import (
            DEFAULT_N_PARTICLES,
            AlwaysFeasible,
            FeasibilityModel,
            ResidualPrior,
            pdi_gp,
            pdi_noise_var,
            size_gp,
            size_noise_var,
            with_droplet_data,
        )

        experiments = self.ledger.experiments() if experiments is None else list(experiments)
        context = self._proposal_context(experiments, context)
        done = [e for e in experiments if e.status is Status.DONE and e.measurement is not None]
        failed = [e for e in experiments if e.status is Status.FAILED and e.failure is not None]
        open_ = [e for e in experiments if e.status in OPEN]
        z_done = self.space.to_unit(self.space.tensor([e.settings for e in done]))
        measured = [e.measurement for e in done if e.measurement is not None]
        diam = torch.tensor([m.diameter_nm for m in measured], dtype=torch.double)
        pdi = torch.tensor([max(m.pdi_pct, MIN_PDI_PCT) for m in measured], dtype=torch.double)
        counts = [m.n_particles for m in measured if m.n_particles is not None]
        n_typical = float(sorted(counts)[len(counts) // 2]) if counts else float(DEFAULT_N_PARTICLES)
        n_part = torch.tensor([float(m.n_particles or DEFAULT_N_PARTICLES) for m in measured], dtype=torch.double)
        opts = self.options
        size_noise = size_noise_var(pdi, n_part) if opts.data_noise else torch.full_like(diam, 1e-6)
        pdi_noise = pdi_noise_var(n_part) if opts.data_noise else torch.full_like(diam, 1e-6)
        if opts.physics:
            with_drops = [e for e in done if e.measurement is not None and e.measurement.droplet_um is not None]
            preset = with_droplet_data(
                self.preset,
                self.space,
                self.space.to_unit(self.space.tensor([e.settings for e in with_drops])),
                torch.log(torch.tensor([e.measurement.droplet_um for e in with_drops], dtype=torch.double)),  # type: ignore[union-attr]
            )
            size, pdi_model = size_gp(preset, self.space), pdi_gp(self.preset, self.space)
        else:
            size = constant_gp(self.space, math.log(self.spec.target.diameter_nm), ResidualPrior(**PLAIN_SIZE_RESIDUAL))
            pdi_model = constant_gp(
                self.space, math.log(self.spec.target.pdi_max_pct), ResidualPrior(**PLAIN_PDI_RESIDUAL)
            )
        base_size, base_pdi, z_controls = size, pdi_model, z_done

        def fit_gps(
            contexts: Sequence[Context], context: Context
        ) -> tuple[PhysicsGP, torch.Tensor, Callable[[], tuple[PhysicsGP, PhysicsGP, ContextModel | None]]]:
            """The size GP fitted for these run contexts, its inputs, and the rest of the fit to finish."""
            size, pdi_model, z_done = base_size, base_pdi, z_controls
            model = ContextModel(
                self._context_kinds([*contexts, context]),
                [*contexts, context],
                self.context_effects,
                self.context_terms,
            )
            context_model = None if model.empty else model
            if context_model is not None:
                size, pdi_model = context_model.wrap(size, size=True), context_model.wrap(pdi_model, size=False)
                z_done = torch.cat([z_done, context_model.columns(contexts)], -1)
            size.fit(z_done, torch.log(diam), size_noise)
            if context_model is not None:
                context_model.learn_tau(size, z_done, torch.log(diam), observed=contexts)

            def finish() -> tuple[PhysicsGP, PhysicsGP, ContextModel | None]:
                pdi_model.fit(
                    z_done, torch.log(pdi), pdi_noise, relinearise=1 if opts.physics and len(done) >= 3 else 0
                )
                if context_model is None:
                    return size, pdi_model, None
                fixed = context_model.fixed(context)
                return size.at_inputs(fixed), pdi_model.at_inputs(fixed), context_model

            return size, z_done, finish

        contexts = [e.context for e in done]
        if opts.drift:  # unannounced changes of the rig (supraopt/drift.py): none found, nothing changes
            drifted = fit_with_changes(
                fit_gps, contexts, context, torch.log(diam), [e.id for e in done], drift_tau(self.context_effects)
            )
            (size, pdi_model, context_model), contexts, context = drifted.fitted, drifted.contexts, drifted.context
        else:
            size, pdi_model, context_model = fit_gps(contexts, context)[2]()
        ok = self.space.tensor([e.settings for e in done])
        failures = [(self.space.tensor([e.settings])[0], e.failure.reason) for e in failed if e.failure]
        feasibility: Feasibility = AlwaysFeasible()
        if opts.feasibility:
            preset = self.preset
            if not opts.physics:  # no physics knowledge of the window either: edges at the bounds
                preset = replace(preset, window_mg_ml=self.spec.bounds["concentration_mg_ml"], window_log_sd=1.0)
            feasibility = FeasibilityModel(preset, self.space, ok, failures)
        per_target = tuple(HitProbability(size, pdi_model, feasibility, t, n_typical) for t in self.spec.targets)
        pending_z = self.space.to_unit(self.space.tensor([e.settings for e in open_]))
        return Surrogates(
            size,
            pdi_model,
            feasibility,
            per_target[0],
            pending_z,
            context,
            context_model,
            per_target=per_target,
            run_contexts=tuple(contexts),
        )

    def fitted(self, experiments: Sequence[Experiment], context: Context | None = None) -> Surrogates:
        """:meth:`fit`, reused while the experiments, the envelope, the targets and the context are unchanged.

        The context is resolved first (as :meth:`fit` would), so that the default context and the same
        context stated explicitly share one fit: ``suggest`` asks for both and would fit twice."""
        context = self._proposal_context(experiments, context)
        key = self._key(experiments, context)
        if self._fit_cache is None or self._fit_cache[0] != key:
            self._fit_cache = (key, self.fit(experiments, context))
        return self._fit_cache[1]

    def _key(self, experiments: Sequence[Experiment], context: Context | None = None) -> str:
        return repr(
            (
                [(e.id, e.status, e.settings, e.measurement, e.failure, e.context) for e in experiments],
                context,
                self.space.bounds,
                self.spec.targets,
                self.options,
            )
        )

    # --- targets: confirmed, out of reach, added ---------------------------------------------------

    def assess(self, experiments: Sequence[Experiment] | None = None) -> Assessment:
        """Every target's state with the model's P(a repeat hits) at its recipe, and for targets not
        hit yet (after :data:`MIN_RUNS_FOR_VERDICT` runs) whether they are in reach."""
        import torch

        from supraopt.acquisition import envelope_points, outlook
        from supraopt.surrogate import WIDENED

        experiments = self.ledger.experiments() if experiments is None else list(experiments)
        key = self._key(experiments)
        if self._assess_cache is not None and self._assess_cache[0] == key:
            return self._assess_cache[1]
        surrogates = self.fitted(experiments)
        states = target_states(self.spec.targets, experiments)
        measured = sum(1 for e in experiments if e.status is Status.DONE and e.measurement is not None)
        finished = measured + sum(1 for e in experiments if e.status is Status.FAILED)
        outlooks = {}
        envelope: dict[str, torch.Tensor] | None = None
        for i, state in enumerate(states):
            acq = surrogates.per_target[i]
            if state.recipes and state.target.confirm > 0:
                self.choose_recipe(state, acq)
            if not state.hit and measured >= 1 and finished >= MIN_RUNS_FOR_VERDICT:
                if envelope is None:
                    with torch.no_grad():
                        envelope = acq.moments(envelope_points(self.spec.seed))
                outlooks[i] = outlook(acq, self.spec.seed, envelope)
        widened = {
            outcome: gp.inflation**0.5
            for outcome, gp in (("SP sizes", surrogates.size), ("PDIs", surrogates.pdi))
            if gp.inflation > WIDENED
        }
        self._assess_cache = (key, Assessment(states, outlooks, widened))
        return self._assess_cache[1]

    def goals(self, assessment: Assessment, surrogates: Surrogates) -> Goals:
        """What the next experiments should serve: open targets (a recipe repeat for those awaiting
        confirmation), else every target not out of reach, else every target."""
        from supraopt.acquisition import Goal, Goals

        indices = assessment.open() or [i for i, s in enumerate(assessment.states) if not s.done]
        indices = indices or list(range(len(self.spec.targets)))
        goals = []
        for i in indices:
            state = assessment.states[i]
            repeat = None
            if state.repeats_wanted and state.repeat_settings is not None:
                repeat = self.space.to_unit(self.space.tensor([state.repeat_settings]))[0]
            goals.append(Goal(i, surrogates.per_target[i], repeat))
        return Goals(goals)

    def choose_recipe(self, state: TargetState, acq: HitProbability) -> None:
        """Give ``state`` the recipe to use: of those that confirm the target
        (:func:`~supraopt.recipe.confirms`), else of all, the one whose next run at its
        :meth:`repeat_point` is most likely to hit."""
        import torch

        n = state.target.confirm
        best: tuple[tuple[bool, float], Recipe, dict[str, float]] | None = None
        for recipe in state.recipes:
            z = self.repeat_point(acq, recipe).unsqueeze(0)
            with torch.no_grad():
                p = float(torch.exp(repeat_log_p_hit(acq, z))[0])
            key = (confirms(recipe.repeated(n), p), p)
            if best is None or key > best[0]:
                best = (key, recipe, self.space.settings(self.space.from_unit(z))[0])
        if best is not None:
            state.use(best[1], best[2], best[0][1])

    def repeat_point(self, acq: HitProbability, recipe: Recipe) -> torch.Tensor:
        """Where to repeat a recipe (unit cube): of its latest settings and nearby settings that are
        still the same recipe (flow ratio and temperature nudged, the concentration re-centred so
        the predicted size sits in the middle of the band), the one where one more run is most
        likely to hit (:func:`supraopt.recipe.repeat_log_p_hit`): the band's centre and the PDI's
        margin, not the point that happened to hit."""
        import torch

        from supraopt.acquisition import project_to_target

        latest = recipe.settings
        nudged = [
            latest
            | {"flow_ratio": latest["flow_ratio"] * math.exp(d_log_r), "temperature_c": latest["temperature_c"] + d_t}
            for d_log_r in (-REPEAT_NUDGE_LOG, 0.0, REPEAT_NUDGE_LOG)
            for d_t in (-REPEAT_NUDGE_C, 0.0, REPEAT_NUDGE_C)
        ]
        z_nudged = self.space.to_unit(self.space.tensor(nudged)).clamp(0.0, 1.0)
        moved = self.space.settings(self.space.from_unit(project_to_target(acq, z_nudged)))
        candidates = [latest] + [s for s in moved if same_recipe(recipe.anchor or latest, s)]
        z = self.space.to_unit(self.space.tensor(candidates))
        with torch.no_grad():
            return z[int(repeat_log_p_hit(acq, z).argmax())]

    def add_target(self, target: Target) -> list[str]:
        """Add a target to this campaign (rewrites campaign.toml); returns warnings (overlapping
        bands, a size outside what the fitted model thinks the envelope can make)."""
        from supraopt.acquisition import HitProbability, reach_nm

        spec = self.spec.with_added_target(target)
        warnings = [w for w in check_targets(spec.targets) if f"{target.diameter_nm:g} nm" in w]
        experiments = self.ledger.experiments()
        surrogates = self.fitted(experiments)
        hit = HitProbability(surrogates.size, surrogates.pdi, surrogates.feasibility, target, 50.0)
        low, high = reach_nm(hit, self.spec.seed)
        if not low <= target.diameter_nm <= high:
            warnings.append(
                f"{target.diameter_nm:g} nm is outside what the model expects this envelope to make "
                f"(about {low:.0f}-{high:.0f} nm); supraopt will try, and say when it looks out of reach."
            )
        path = self.directory / SPEC_FILE
        tmp = self.directory / (SPEC_FILE + ".tmp")
        tmp.write_text(spec.to_toml(), encoding="utf-8")
        tmp.replace(path)
        self.spec = spec
        self._spec_mtime = self._spec_file_mtime()
        self.share_spec()
        return warnings

    def _spec_file_mtime(self) -> float:
        try:
            return (self.directory / SPEC_FILE).stat().st_mtime
        except OSError:
            return math.nan

    def reload_targets(self) -> bool:
        """Pick up targets added to campaign.toml by another process (``supraopt target add``)."""
        mtime = self._spec_file_mtime()
        if mtime == self._spec_mtime or math.isnan(mtime):
            return False
        self._spec_mtime = mtime
        fresh = load_spec(self.directory)
        if fresh.targets == self.spec.targets:
            return False
        self.spec = replace(self.spec, targets=fresh.targets)
        return True

    def recipes(self) -> list[Card]:
        """The recipe card of every target (see :mod:`supraopt.recipe`)."""
        import torch

        from supraopt.acquisition import propose

        experiments = self.ledger.experiments()
        assessment = self.assess(experiments)
        surrogates = self.fitted(experiments)
        cards = []
        for i, state in enumerate(assessment.states):
            acq = surrogates.per_target[i]
            settings = state.repeat_settings or (state.recipe.settings if state.recipe is not None else None)
            if settings is None:  # not hit yet: the setting most likely to hit
                z = propose(acq, 1, torch.empty(0, self.space.dim, dtype=torch.double), self.spec.seed)
                settings = self.space.settings(self.space.from_unit(z))[0]
            z = self.space.to_unit(self.space.tensor([settings]))
            cards.append(card(state, acq, z, settings))
        return cards

    # --- the loop verbs ---------------------------------------------------------------------------

    def propose(
        self, n: int = 1, experiments: Sequence[Experiment] | None = None, context: Context | None = None
    ) -> list[tuple[dict, dict]]:
        """Compute `n` (settings, prediction) pairs without recording them, for runs under ``context``
        (a checked context, default: the current one)."""
        import torch

        if not (isinstance(n, int) and 1 <= n <= 64):
            raise InputError(f"number of experiments n={n!r} must be an integer between 1 and 64.")
        experiments = self.ledger.experiments() if experiments is None else list(experiments)
        try:
            return self._propose(n, experiments, context)
        except torch.linalg.LinAlgError as error:
            first = (str(error).splitlines() or ["no detail"])[0]
            raise SpecError(
                f"the model could not be computed for this campaign (numerical failure: {first}); "
                "check [bounds] in campaign.toml (an envelope far wider than the rig?) and the recorded results."
            ) from None

    def _propose(self, n: int, experiments: list[Experiment], context: Context | None) -> list[tuple[dict, dict]]:
        import torch
        from torch.quasirandom import SobolEngine

        from supraopt.acquisition import propose

        surrogates = self.fitted(experiments, context)
        assessment = self.last_assessment = self.assess(experiments)
        goals = self.goals(assessment, surrogates)
        seed = (self.spec.seed * 100_003 + len(experiments)) % 2**63
        torch.manual_seed(seed)
        if len(experiments) < self.options.random_start:
            sobol = SobolEngine(self.space.dim, scramble=True, seed=self.spec.seed)
            z = sobol.draw(len(experiments) + n)[-n:].to(torch.double)
        else:
            z = propose(goals, n, surrogates.pending_z, seed)
        settings = self.space.settings(self.space.from_unit(z))
        z_rounded = self.space.to_unit(self.space.tensor(settings))
        out = []
        for i, aim in enumerate(goals.aims(z_rounded)):
            goal = goals.goals[aim]
            [prediction] = goal.hit.predict(z_rounded[i : i + 1])
            extra = {"target_nm": goal.hit.target.diameter_nm, "repeat": float(goal.repeat is not None)}
            out.append((settings[i], prediction.to_json() | extra))
        return out

    def suggest(self, n: int = 1, context: Mapping[str, Any] | None = None) -> list[Suggestion]:
        """Propose `n` experiments, record them as pending (with their predictions) and return them.

        ``context`` states the conditions they will run under (``{"chip": "B", "room_c": 23.5}``):
        it updates the campaign's current context, which later calls keep, and is stored with each
        proposal. Without it the current context is used.
        """
        start = time.perf_counter()
        given, new_kinds = self.check_context(context)
        with self.ledger.exclusive():  # concurrent suggests see each other's pending experiments
            experiments = self.ledger.experiments()
            current = self.ledger.current_context() | given
            proposal_context = self._proposal_context(experiments, current)
            pairs = self.propose(n, experiments, proposal_context)
            ids = self.ledger.add_pending(
                pairs,
                context=proposal_context,
                current_context=current if given else None,
                context_kinds=new_kinds,
            )
        self.last_suggest_seconds = time.perf_counter() - start
        return [Suggestion(i, s, p, proposal_context) for i, (s, p) in zip(ids, pairs, strict=True)]

    def record(
        self,
        experiment_id: str,
        result: Measurement | Failure,
        *,
        note: str = "",
        correct: bool = False,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Record what the rig measured (or that the chemistry failed) for a suggested experiment.

        The run keeps the context it was suggested under; a measurement's own ``context`` and then
        ``context`` (e.g. ``{"chip": "C"}``: it ran on another chip) set or correct entries of it.
        """
        own = result.context if isinstance(result, Measurement) and result.context else {}
        reported, kinds_reported = self.check_context(own, "measurement context")
        given, kinds_given = self.check_context(context)
        merged, kinds = reported | given, kinds_reported | kinds_given
        if isinstance(result, Measurement) and result.context:
            result = replace(result, context=None)  # its checked values are in ``merged``
        if isinstance(result, Measurement):
            self.plausible.check_measurement(result)
        if correct:
            if not note:
                note = "corrected by user"
            self.ledger.correct(experiment_id, result, note, context=merged, context_kinds=kinds)
        elif isinstance(result, Measurement):
            self.ledger.record_measurement(experiment_id, result, note, context=merged, context_kinds=kinds)
        else:
            self.ledger.record_failure(experiment_id, result, note, context=merged, context_kinds=kinds)

    def add_run(
        self,
        settings: dict[str, Any],
        result: Measurement | Failure,
        note: str = "",
        context: Mapping[str, Any] | None = None,
    ) -> str:
        """Record a run that supraopt did not suggest (e.g. from a lab notebook); returns its new id."""
        clean = self.space.validate(settings)
        ctx, kinds = self.check_context(context)
        [experiment_id] = self.ledger.add_pending([(clean, {})], context=ctx, context_kinds=kinds)
        try:
            self.record(experiment_id, result, note=note or "added from past data")
        except LedgerError:  # pragma: no cover - the id was just created
            self.ledger.abandon(experiment_id, "could not record the result")
            raise
        return experiment_id

    def record_many(
        self, rows: Sequence[tuple[str, BatchRow]], source: str = "", context_kinds: dict[str, str] | None = None
    ) -> list[str]:
        """Record many results in one transaction (all or nothing); ``rows`` pairs a label (``row 7``) with each.

        Settings of new runs must lie inside the bounds and measurements must be plausible; the first
        bad row is refused, named by its label, before anything is written."""
        batch = []
        for where, row in rows:
            if isinstance(row.result, Measurement):
                self.plausible.check_measurement(row.result, where)
            if row.settings is not None:
                row = replace(
                    row, settings=self.space.validate(row.settings, where), note=row.note or "added from past data"
                )
            batch.append(row)
        return self.ledger.record_batch(batch, source, context_kinds)

    def status(self) -> CampaignStatus:
        """Counts, each target's best run and hits; from the ledger alone (fast) unless a target's
        repeats need the model's word to count as confirmed."""
        experiments = self.ledger.experiments()
        counts: dict[str, int] = {}
        for e in experiments:
            counts[str(e.status)] = counts.get(str(e.status), 0) + 1
        states = target_states(self.spec.targets, experiments)
        if any(s.confirmed_by_repeats and s.target.confirm for s in states):
            states = self.assess(experiments).states  # the model may veto a lucky run of repeats
        hit = all(s.done for s in states)
        return CampaignStatus(
            self.spec.target,
            counts,
            states[0].best,
            hit,
            experiments,
            self.ledger.current_context(),
            states,
            self.ledger.result_order(),
        )

    def physics_posterior(self) -> dict[str, tuple[float, float, float, float]]:
        """Fitted physics parameters: name -> (posterior mean, posterior sd, prior mean, prior sd)."""
        import torch

        experiments = self.ledger.experiments()
        done = [e for e in experiments if e.status is Status.DONE and e.measurement is not None]
        surrogates = self.fit(experiments)
        z = self.space.to_unit(self.space.tensor([e.settings for e in done]))
        if surrogates.context_model is not None:
            z = torch.cat([z, surrogates.context_model.columns(surrogates.run_contexts)], -1)
        ys = {
            "size": torch.log(torch.tensor([e.measurement.diameter_nm for e in done], dtype=torch.double)),  # type: ignore[union-attr]
            "pdi": torch.log(
                torch.tensor([max(e.measurement.pdi_pct, MIN_PDI_PCT) for e in done], dtype=torch.double)  # type: ignore[union-attr]
            ),
        }
        out = {}
        for key, gp in (("size", surrogates.size), ("pdi", surrogates.pdi)):
            mean, cov = gp.parameter_posterior(z, ys[key])
            for i, name in enumerate(gp.names):
                # a context part's prior: N(0, tau^2) with tau as learned, or a level's offset carried by fit --into
                prior_mean, prior_sd = self.preset.priors.get(name, (float(gp.prior_mean[i]), float(gp.prior_sd[i])))
                out[name] = (float(mean[i]), float(cov[i, i].clamp_min(0) ** 0.5), prior_mean, prior_sd)
        return out


__all__ = ["Campaign", "CampaignStatus", "Suggestion", "miss_distance"]
