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

    def components(self, z: Tensor) -> dict[str, Tensor]:
        """Predictive moments and log-probabilities at `n x 3` unit-cube points."""
        mu_d, var_d = self.size.moments(z)
        mu_p, var_p = self.pdi.moments(z)
        sd_d = torch.sqrt(var_d + self.size_noise_var(mu_p))
        sd_p = torch.sqrt(var_p + self.pdi_noise_var)
        log_size = log_interval_prob(mu_d, sd_d, self.log_low, self.log_high)
        log_pdi = torch.special.log_ndtr((self.log_pdi_max - mu_p) / sd_p)
        p_feas = self.feasibility.prob(z)
        log_hit = log_size + log_pdi + torch.log(p_feas.clamp_min(1e-300))
        return {"mu_d": mu_d, "sd_d": sd_d, "mu_p": mu_p, "sd_p": sd_p, "p_feas": p_feas, "log_hit": log_hit}

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
        draws = []
        for gp in (self.size, self.pdi):
            mean, cov = gp.joint(z)
            jitter = 1e-8 * cov.diagonal().mean().clamp_min(1e-12)
            eye = torch.eye(len(mean), dtype=mean.dtype)
            chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
            if int(info) != 0:
                chol = torch.linalg.cholesky(cov + 1e-6 * eye)
            eps = torch.randn(samples, len(mean), generator=generator, dtype=mean.dtype)
            draws.append(mean + eps @ chol.T)
        f_d, f_p = draws
        sd_d = torch.sqrt(self.size_noise_var(f_p))
        p_size = torch.exp(log_interval_prob(f_d, sd_d, self.log_low, self.log_high))
        p_pdi = torch.special.ndtr((self.log_pdi_max - f_p) / self.pdi_noise_var**0.5)
        with torch.no_grad():
            p_feas = self.feasibility.prob(z)
        return p_size * p_pdi * p_feas


def project_to_target(acq: HitProbability, z: Tensor, steps: int = 3) -> Tensor:
    """Move each point's concentration (first unit-cube axis) so the predicted size is the target."""
    log_target = 0.5 * (acq.log_low + acq.log_high)
    z = z.clone()
    for _ in range(steps):
        zc = z.clone().requires_grad_(True)
        mu, _ = acq.size.moments(zc)
        (grad,) = torch.autograd.grad(mu.sum(), zc)
        slope = grad[:, 0].clamp_min(1e-3)
        z[:, 0] = (z[:, 0] + (log_target - mu.detach()) / slope).clamp(0.0, 1.0)
    return z


def refine(acq: HitProbability, pool: Tensor, scores: Tensor, generator: torch.Generator) -> Tensor:
    """Local search: jitter the best points, project them onto the target again, keep all."""
    best = pool[torch.topk(scores, min(N_REFINE, len(pool))).indices]
    jitter = torch.randn(best.shape[0], REFINE_COPIES, best.shape[1], generator=generator, dtype=best.dtype)
    local = (best.unsqueeze(1) + REFINE_SD * jitter).reshape(-1, best.shape[1]).clamp(0.0, 1.0)
    return project_to_target(acq, local)


def propose(acq: HitProbability, n: int, pending: Tensor, seed: int) -> Tensor:
    """Choose `n` unit-cube points (`n x 3`) given `m x 3` pending points, reproducibly from ``seed``."""
    dim = pending.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    raw = SobolEngine(dim, scramble=True, seed=seed).draw(N_RAW).to(torch.double)
    pool = torch.cat([project_to_target(acq, raw), raw[: N_RAW // 2]])
    with torch.no_grad():
        scores = acq.log_p_hit(pool)
    local = refine(acq, pool, scores, generator)
    with torch.no_grad():
        pool, scores = torch.cat([local, pool]), torch.cat([acq.log_p_hit(local), scores])
    if n == 1 and len(pending) == 0:
        return pool[scores.argmax()].unsqueeze(0)
    return greedy_batch(acq, pool, scores, n, pending, seed)


def greedy_batch(acq: HitProbability, pool: Tensor, scores: Tensor, n: int, pending: Tensor, seed: int) -> Tensor:
    """Greedy maximisation of P(at least one of pending + chosen hits) over the best pool points."""
    order = torch.argsort(scores, descending=True)[:POOL_FOR_BATCH]
    pool = pool[order]
    points = torch.cat([pending, pool])
    generator = torch.Generator().manual_seed(seed)
    hits = acq.sampled_hits(points, MC_SAMPLES, generator)
    miss_all = torch.prod(1 - hits[:, : len(pending)], dim=1)  # samples: P(no pending run hits)
    taken = pending.clone()
    chosen: list[Tensor] = []
    pool_hits = hits[:, len(pending) :]
    for _ in range(n):
        gain = (miss_all.unsqueeze(1) * pool_hits).mean(0)
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
        miss_all = miss_all * (1 - pool_hits[:, i])
    if len(chosen) < n:
        raise InputError(f"could only find {len(chosen)} distinct experiments for a batch of {n=}; ask for fewer.")
    return torch.stack(chosen)
