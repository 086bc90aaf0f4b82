"""Acquisition: propose the experiments most likely to *hit* the target.

A run hits when its measured diameter is within the relative tolerance of the target and its
measured polydispersity is under the ceiling. For one experiment supraopt maximises::

    log P(hit) = log P(size in band) + log P(PDI under ceiling) + log P(feasible)

with Gaussian predictive distributions (GP latent variance plus the expected measurement
noise) of log diameter and log PDI. Working in log space keeps the criterion informative when
every probability is tiny (far from the target, early in a campaign).

Candidates come from a scrambled Sobol set that is also *projected onto the target*: each point's
concentration is moved by Newton steps on the size posterior mean until the predicted diameter is
the target (the mass balance inverted); the best few are then refined by a local search (jittered
copies, projected again).

For a batch, or when experiments are pending, supraopt maximises greedily the probability that
*at least one* of the batch (pending included) hits, estimated from joint posterior samples: a
point whose outcome is already covered by a correlated pending run adds little, so a batch
spreads out and never repeats a pending experiment (points closer than :data:`MIN_DISTANCE` in
the unit cube to a chosen or pending one are also excluded outright).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.quasirandom import SobolEngine

from supraopt.errors import InputError
from supraopt.spec import Target
from supraopt.surrogate import SEM_CALIBRATION_SD, Feasibility, PhysicsGP

MIN_DISTANCE = 0.02
N_RAW = 512
N_REFINE = 8
REFINE_COPIES = 16
REFINE_SD = 0.04
MC_SAMPLES = 256
POOL_FOR_BATCH = 300


def log_interval_prob(mu: Tensor, sd: Tensor, low: float, high: float) -> Tensor:
    """Stable ``log P(low < Y < high)`` for ``Y ~ N(mu, sd^2)``."""
    a, b = (low - mu) / sd, (high - mu) / sd
    flip = a > 0  # use the mirror image so both ends sit in the lower tail
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp((log_a - log_b).clamp_max(-1e-12)))


@dataclass(frozen=True)
class Prediction:
    """What supraopt expects of a proposed run; stored with it to compare with the outcome."""

    diameter_nm: float
    diameter_sd_nm: float
    pdi_pct: float
    pdi_sd_pct: float
    p_feasible: float
    p_hit: float

    def to_json(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


class HitProbability:
    """P(hit) of a run at unit-cube points, from the size and PDI GPs and the feasibility model.

    Args:
        size: GP on log diameter (nm).
        pdi: GP on log polydispersity (%).
        feasibility: P(the run gives SPs at all).
        target: the campaign target.
        n_particles: particles a measurement typically sizes (sets the expected measurement noise).
    """

    def __init__(
        self, size: PhysicsGP, pdi: PhysicsGP, feasibility: Feasibility, target: Target, n_particles: float
    ) -> None:
        self.size, self.pdi, self.feasibility, self.target = size, pdi, feasibility, target
        self.n_particles = n_particles
        self.log_low = math.log(target.diameter_nm * (1 - target.tolerance))
        self.log_high = math.log(target.diameter_nm * (1 + target.tolerance))
        self.log_pdi_max = math.log(target.pdi_max_pct)
        self.pdi_noise_var = 1.0 / (2.0 * n_particles) + 0.05**2

    def size_noise_var(self, log_pdi: Tensor) -> Tensor:
        return (torch.exp(log_pdi) / 100.0) ** 2 / self.n_particles + SEM_CALIBRATION_SD**2

    def moments(self, z: Tensor) -> dict[str, Tensor]:
        """Predictive moments (log size, log PDI, with measurement noise) and P(feasible) at `n x 3`
        points: the same for every target, so computed once for several."""
        mu_d, var_d = self.size.moments(z)
        mu_p, var_p = self.pdi.moments(z)
        sd_d = torch.sqrt(var_d + self.size_noise_var(mu_p))
        sd_p = torch.sqrt(var_p + self.pdi_noise_var)
        return {"mu_d": mu_d, "sd_d": sd_d, "mu_p": mu_p, "sd_p": sd_p, "p_feas": self.feasibility.prob(z)}

    def log_hit_given(self, m: dict[str, Tensor]) -> Tensor:
        """log P(hit) from :meth:`moments` (of any target's HitProbability on the same model)."""
        log_size = log_interval_prob(m["mu_d"], m["sd_d"], self.log_low, self.log_high)
        log_pdi = torch.special.log_ndtr((self.log_pdi_max - m["mu_p"]) / m["sd_p"])
        return log_size + log_pdi + torch.log(m["p_feas"].clamp_min(1e-300))

    def components(self, z: Tensor) -> dict[str, Tensor]:
        """Predictive moments and log-probabilities at `n x 3` unit-cube points."""
        m = self.moments(z)
        return m | {"log_hit": self.log_hit_given(m)}

    def log_p_hit(self, z: Tensor) -> Tensor:
        return self.components(z)["log_hit"]

    def predict(self, z: Tensor) -> list[Prediction]:
        """Predictions to store with proposals: median diameter and PDI with their sd's."""
        with torch.no_grad():
            c = self.components(z)
        out = []
        for i in range(z.shape[0]):
            d = torch.exp(c["mu_d"][i])
            p = torch.exp(c["mu_p"][i])
            out.append(
                Prediction(
                    diameter_nm=float(d),
                    diameter_sd_nm=float(d * c["sd_d"][i]),
                    pdi_pct=float(p),
                    pdi_sd_pct=float(p * c["sd_p"][i]),
                    p_feasible=float(c["p_feas"][i]),
                    p_hit=float(torch.exp(c["log_hit"][i])),
                )
            )
        return out

    # --- batch: P(at least one hits) from joint samples ------------------------------------------

    def sampled_hits(self, z: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """`samples x n` probabilities that each run hits, given joint latent posterior draws."""
        return self.hits_given(z, *draw_latents(self, z, samples, generator))

    def hits_given(self, z: Tensor, f_d: Tensor, f_p: Tensor) -> Tensor:
        """P(each run hits) given latent draws `samples x n` of log size and log PDI at ``z``."""
        sd_d = torch.sqrt(self.size_noise_var(f_p))
        p_size = torch.exp(log_interval_prob(f_d, sd_d, self.log_low, self.log_high))
        p_pdi = torch.special.ndtr((self.log_pdi_max - f_p) / self.pdi_noise_var**0.5)
        with torch.no_grad():
            p_feas = self.feasibility.prob(z)
        return p_size * p_pdi * p_feas


def draw_latents(acq: HitProbability, z: Tensor, samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Joint posterior draws (`samples x n` each) of log size and log PDI at ``z``."""
    draws = []
    for gp in (acq.size, acq.pdi):
        mean, cov = gp.joint(z)
        jitter = 1e-8 * cov.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(len(mean), dtype=mean.dtype)
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) != 0:
            chol = torch.linalg.cholesky(cov + 1e-6 * eye)
        eps = torch.randn(samples, len(mean), generator=generator, dtype=mean.dtype)
        draws.append(mean + eps @ chol.T)
    return draws[0], draws[1]


@dataclass(frozen=True)
class Goal:
    """One target the next experiments serve: to hit it, or to repeat its recipe (confirmation)."""

    index: int
    """Position of the target in the campaign's list."""
    hit: HitProbability
    repeat: Tensor | None = None
    """Unit-cube point of the recipe to repeat; only a run there counts for this goal."""

    def log_p_hit(self, z: Tensor, moments: dict[str, Tensor] | None = None) -> Tensor:
        log_hit = self.hit.log_hit_given(self.hit.moments(z) if moments is None else moments)
        if self.repeat is None:
            return log_hit
        return torch.where(is_at(z, self.repeat), log_hit, torch.full_like(log_hit, -torch.inf))

    def hits_given(self, z: Tensor, f_d: Tensor, f_p: Tensor) -> Tensor:
        hits = self.hit.hits_given(z, f_d, f_p)
        return hits if self.repeat is None else hits * is_at(z, self.repeat)


def is_at(z: Tensor, point: Tensor) -> Tensor:
    """Which rows of ``z`` are (to rounding) the unit-cube ``point``."""
    return (z - point).abs().amax(-1) < 1e-6


class Goals:
    """Expected number of goals a run serves: the sum of its hit probabilities over the goals.

    A run lands at one size, so with bands that do not overlap it can hit at most one target and
    the expected number of targets it hits is the sum of its per-target hit probabilities. With a
    single goal this is exactly :class:`HitProbability`.
    """

    def __init__(self, goals: list[Goal]) -> None:
        if not goals:
            raise ValueError("Goals needs at least one goal.")
        self.goals = goals

    @property
    def first(self) -> HitProbability:
        return self.goals[0].hit

    def log_p_hits(self, z: Tensor) -> Tensor:
        """`n x K` log P(hit) of every goal (the model's moments computed once for all)."""
        moments = self.first.moments(z)
        return torch.stack([g.log_p_hit(z, moments) for g in self.goals], dim=-1)

    def log_score(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.log_p_hits(z), dim=-1)

    def aims(self, z: Tensor) -> list[int]:
        """For each point, the goal (position in :attr:`goals`) it most likely serves."""
        with torch.no_grad():
            return [int(i) for i in self.log_p_hits(z).argmax(-1)]

    def sampled_hits(self, z: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """`K x samples x n` hit probabilities of every goal, from shared joint latent draws."""
        f_d, f_p = draw_latents(self.first, z, samples, generator)
        return torch.stack([g.hits_given(z, f_d, f_p) for g in self.goals])


def as_goals(acq: HitProbability | Goals) -> Goals:
    return acq if isinstance(acq, Goals) else Goals([Goal(0, acq)])


def project_to_target(acq: HitProbability, z: Tensor, steps: int = 3, log_target: Tensor | None = None) -> Tensor:
    """Move each point's concentration (first unit-cube axis) so the predicted size is the target
    (``log_target``: one log size per point, default the target of ``acq``)."""
    target = 0.5 * (acq.log_low + acq.log_high) if log_target is None else log_target
    z = z.clone()
    for _ in range(steps):
        zc = z.clone().requires_grad_(True)
        mu, _ = acq.size.moments(zc)
        (grad,) = torch.autograd.grad(mu.sum(), zc)
        slope = grad[:, 0].clamp_min(1e-3)
        z[:, 0] = (z[:, 0] + (target - mu.detach()) / slope).clamp(0.0, 1.0)
    return z


def refine(goals: Goals, pool: Tensor, scores: Tensor, generator: torch.Generator) -> Tensor:
    """Local search: jitter the best points, project them onto the target they aim at, keep all."""
    best = pool[torch.topk(scores, min(N_REFINE, len(pool))).indices]
    jitter = torch.randn(best.shape[0], REFINE_COPIES, best.shape[1], generator=generator, dtype=best.dtype)
    local = (best.unsqueeze(1) + REFINE_SD * jitter).reshape(-1, best.shape[1]).clamp(0.0, 1.0)
    centres = torch.tensor([0.5 * (g.hit.log_low + g.hit.log_high) for g in goals.goals], dtype=best.dtype)
    aims = torch.tensor(goals.aims(best), dtype=torch.long).repeat_interleave(REFINE_COPIES)
    return project_to_target(goals.first, local, log_target=centres[aims])


def candidate_pool(goals: Goals, seed: int, dim: int) -> tuple[Tensor, Tensor]:
    """Sobol points projected onto every goal's target, some unprojected, refined, and the repeats."""
    generator = torch.Generator().manual_seed(seed)
    raw = SobolEngine(dim, scramble=True, seed=seed).draw(N_RAW).to(torch.double)
    parts = [project_to_target(g.hit, raw) for g in goals.goals if g.repeat is None]
    parts.append(raw[: N_RAW // 2])
    parts += [g.repeat.unsqueeze(0) for g in goals.goals if g.repeat is not None]
    pool = torch.cat(parts)
    with torch.no_grad():
        scores = goals.log_score(pool)
    if any(g.repeat is None for g in goals.goals):
        local = refine(goals, pool, scores, generator)
        with torch.no_grad():
            pool, scores = torch.cat([local, pool]), torch.cat([goals.log_score(local), scores])
    return pool, scores


def propose(acq: HitProbability | Goals, n: int, pending: Tensor, seed: int) -> Tensor:
    """Choose `n` unit-cube points (`n x 3`) given `m x 3` pending points, reproducibly from ``seed``.

    With several goals the criterion is the expected number of goals served (see :class:`Goals`).
    """
    goals = as_goals(acq)
    pool, scores = candidate_pool(goals, seed, pending.shape[-1])
    if n == 1 and len(pending) == 0:
        return pool[scores.argmax()].unsqueeze(0)
    return greedy_batch(goals, pool, scores, n, pending, seed)


def greedy_batch(
    acq: HitProbability | Goals, pool: Tensor, scores: Tensor, n: int, pending: Tensor, seed: int
) -> Tensor:
    """Greedy maximisation of the expected number of goals hit by at least one of pending + chosen."""
    goals = as_goals(acq)
    order = torch.argsort(scores, descending=True)[:POOL_FOR_BATCH]
    pool = pool[order]
    points = torch.cat([pending, pool])
    generator = torch.Generator().manual_seed(seed)
    hits = goals.sampled_hits(points, MC_SAMPLES, generator)  # goals x samples x points
    miss_all = torch.prod(1 - hits[:, :, : len(pending)], dim=2)  # goals x samples: no pending run hits
    taken = pending.clone()
    chosen: list[Tensor] = []
    pool_hits = hits[:, :, len(pending) :]
    for _ in range(n):
        gain = (miss_all.unsqueeze(2) * pool_hits).mean(1).sum(0)
        # log-scale fallback so that ties at ~0 are broken by the single-point criterion
        key = torch.where(gain > 1e-12, torch.log(gain.clamp_min(1e-300)), scores[order] - 1e3)
        if len(taken):
            too_close = torch.cdist(pool, taken).min(dim=1).values < MIN_DISTANCE
            key = torch.where(too_close, torch.full_like(key, -torch.inf), key)
        i = int(key.argmax())
        if not torch.isfinite(key[i]):
            break
        chosen.append(pool[i])
        taken = torch.cat([taken, pool[i : i + 1]])
        miss_all = miss_all * (1 - pool_hits[:, :, i])
    if len(chosen) < n:
        raise InputError(f"could only find {len(chosen)} distinct experiments for a batch of {n=}; ask for fewer.")
    return torch.stack(chosen)


# --- is the spec within reach? -------------------------------------------------------------------

VERDICT_SAMPLES = 512
VERDICT_POINTS = 150
ENVELOPE_POINTS = 512


@dataclass(frozen=True)
class Outlook:
    """Whether a target looks reachable inside the envelope, and the nearest spec that is."""

    p_any_hit: float
    """Posterior probability that some setting inside the envelope hits (a draw of the model's
    functions; max over settings of that draw's hit probability; averaged over draws)."""
    lowest_pdi_at_size: float | None
    """Lowest predicted PDI (%) among likely feasible settings predicted to land in the size band."""
    size_range_nm: tuple[float, float] | None
    """Predicted sizes (nm) of likely feasible settings whose predicted PDI is under the ceiling."""


def outlook(acq: HitProbability, seed: int, envelope_moments: dict[str, Tensor] | None = None) -> Outlook:
    """P(any setting hits) and the nearest achievable spec, from the fitted surrogates.

    ``envelope_moments``: :meth:`HitProbability.moments` at :func:`envelope_points` (the same for
    every target of a campaign, so computed once by the caller).
    """
    generator = torch.Generator().manual_seed(seed)
    envelope = envelope_points(seed)
    with torch.no_grad():
        m_env = acq.moments(envelope) if envelope_moments is None else envelope_moments
    projected = project_to_target(acq, envelope)
    with torch.no_grad():
        m_proj = acq.moments(projected)
    m = {k: torch.cat([m_proj[k], m_env[k]]) for k in m_env}
    log_hit = acq.log_hit_given(m)
    pool = torch.cat([projected, envelope])
    best = pool[torch.argsort(log_hit, descending=True)[:VERDICT_POINTS]]
    hits = acq.sampled_hits(best, VERDICT_SAMPLES, generator)
    p_any = float(hits.amax(dim=1).mean())
    feasible = m["p_feas"] >= 0.5
    in_band = feasible & (m["mu_d"] >= acq.log_low) & (m["mu_d"] <= acq.log_high)
    lowest = float(torch.exp(m["mu_p"][in_band].min())) if bool(in_band.any()) else None
    under = feasible & (m["mu_p"] <= acq.log_pdi_max)
    size_range = None
    if bool(under.any()):
        sizes = torch.exp(m["mu_d"][under])
        size_range = (float(sizes.min()), float(sizes.max()))
    return Outlook(p_any, lowest, size_range)


def envelope_points(seed: int) -> Tensor:
    """Scrambled Sobol points over the unit cube used to survey the envelope."""
    return SobolEngine(3, scramble=True, seed=seed).draw(ENVELOPE_POINTS).to(torch.double)


def reach_nm(acq: HitProbability, seed: int) -> tuple[float, float]:
    """Sizes (nm) the model expects somewhere in the envelope at likely feasible settings (any PDI),
    widened by two predictive sd: what a new target should lie within."""
    envelope = envelope_points(seed)
    with torch.no_grad():
        c = acq.moments(envelope)
    feasible = c["p_feas"] >= 0.5
    if not bool(feasible.any()):
        feasible = torch.ones_like(feasible)
    mu, sd = c["mu_d"][feasible], c["sd_d"][feasible]
    return float(torch.exp((mu - 2 * sd).min())), float(torch.exp((mu + 2 * sd).max()))
