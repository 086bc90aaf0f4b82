"""Changes of the rig nobody told supraopt about: a Bayesian change-point test on the SP size.

A chip is replaced, a stock solution ages, a pump is recalibrated, and nobody says so (with
``--context chip=B`` the campaign knows: see :mod:`supraopt.context`). Without a word, every run
after the change measures sizes shifted by a common factor, and the old runs pull the model back.

**Model.** After the size GP (:class:`~supraopt.surrogate.PhysicsGP`) is fitted as usual, the
campaign asks whether the log sizes are better explained with one more linear parameter: an offset
``delta ~ N(0, tau^2)`` added to every run from run ``c`` on. Integrated out like the physics
parameters, it adds ``tau^2 u u^T`` to the training covariance ``K`` (``u``: the indicator of runs
``>= c``), so its Bayes factor against "no change" is exact and cheap (matrix determinant lemma)::

    log BF(c) = -1/2 log(1 + tau^2 a)  +  1/2 tau^2 b^2 / (1 + tau^2 a),   a = u'K^-1 u,  b = u'K^-1 r

with ``r`` the residual of the runs from the GP's mean; every ``c`` costs one suffix sum of
``K^-1`` (``O(n^2)`` in all). A change happens before any given run with prior probability
:data:`CHANGE_RATE`; the posterior over "no change" and every ``c`` follows. The scan runs at the
hyperparameters fitted without a change, which may have blamed the jump on extra noise, so it only
screens: the most probable ``c``, if above :data:`SCREEN`, is refitted with the change and adopted
when it is the more probable model (:func:`fit_with_changes`). Runs from ``c`` on then form a new
level of a pseudo-context :data:`DRIFT` (named after the experiment it starts at), which
:class:`~supraopt.context.ContextModel` turns into a hierarchical offset like a told chip swap, and
the next experiment is proposed for the newest level. The test is repeated on the refitted model
(up to :data:`MAX_CHANGES` changes), so a rig that drifts slowly becomes a staircase of levels.

**Cost on a rig that does not drift: no change in the suggestions.** With no change in the data,
the Bayes factor of every ``c`` is at most about one (the offset's Occam factor) times a small
prior, no change is adopted, and the campaign runs the model it always did. It pays the scan
(one more Cholesky of ``K``) and, when a candidate passes the screen, one size-GP fit. The
offset's scale ``tau`` is the preset's ``[context_effects]`` entry for ``drift`` (default: the
overall size scale, 8 %), learned between levels once a change is adopted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from supraopt.context import ContextEffect, effect_for
from supraopt.records import Context
from supraopt.surrogate import MAX_CHOLESKY, PhysicsGP

DRIFT = "(drift)"
"""Pseudo-context whose levels are the stretches of runs between detected changes."""
CHANGE_RATE = 0.02
"""Prior probability that the rig changed, unannounced, just before any given run."""
ADOPT = 0.5
"""Posterior probability of one change point above which the change is adopted."""
SCREEN = 0.05
"""Posterior probability (at the no-change fit's hyperparameters) above which a candidate change is refitted."""
MAX_CHANGES = 3
"""Changes adopted per fit at most (each costs one more GP fit)."""
WINDOW = 200
"""Only the latest this many runs are tested as the first run of a change."""


def drift_tau(effects: Mapping[str, ContextEffect]) -> float:
    """Prior sd of an unannounced change of the log size: the preset's ``drift`` effect (or its default)."""
    return effect_for(DRIFT, effects).tau


@dataclass(frozen=True)
class ChangePoint:
    """The most probable change among the runs tested."""

    index: int
    """Position (in time order) of the first run after the change."""
    probability: float
    """Posterior probability of a change exactly there."""
    none: float
    """Posterior probability of no change at all."""


def change_point(gp: PhysicsGP, z: Tensor, y: Tensor, tau: float, *, rate: float = CHANGE_RATE) -> ChangePoint | None:
    """The most probable single change point of the fitted ``gp``'s training runs ``z, y`` (in time
    order), or None with fewer than two runs. See the module docstring."""
    n = len(y)
    model = gp.model
    if model is None or n < 2 or n > MAX_CHOLESKY:
        return None
    with torch.no_grad():
        k = model.covar_module(z).to_dense() + torch.diag(model.likelihood.noise.reshape(-1))
        chol = torch.linalg.cholesky(k + 1e-9 * torch.eye(n, dtype=k.dtype))
        resid = (y - model.mean_module(z)).unsqueeze(-1)
        alpha = torch.cholesky_solve(resid, chol).squeeze(-1)  # K^-1 r
        m = min(n - 1, WINDOW)  # candidate first runs: n-m .. n-1
        tail = torch.eye(n, dtype=k.dtype)[:, n - m :]
        block = torch.cholesky_solve(tail, chol)[n - m :]  # m x m lower-right block of K^-1
        # a_c = sum of the block from c on (both ways), b_c = sum of alpha from c on
        suffix = block.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)
        a = suffix.diagonal()
        b = alpha[n - m :].flip(0).cumsum(0).flip(0)
        t2 = tau**2
        log_bf = -0.5 * torch.log1p(t2 * a) + 0.5 * t2 * b**2 / (1.0 + t2 * a)
        log_odds = log_bf + math.log(rate / (1.0 - rate))
        log_norm = torch.logsumexp(torch.cat([torch.zeros(1, dtype=k.dtype), log_odds]), 0)
        best = int(torch.argmax(log_odds))
    return ChangePoint(n - m + best, math.exp(float(log_odds[best] - log_norm)), math.exp(-float(log_norm)))


def mark(contexts: Sequence[Context], starts: Sequence[int], labels: Sequence[str]) -> list[Context]:
    """``contexts`` with :data:`DRIFT` set on every run: the label of the first run of its stretch
    (``starts``: positions where a stretch begins after a change)."""
    cuts = sorted(set(starts))
    out = []
    for i, context in enumerate(contexts):
        first = max([0, *(c for c in cuts if c <= i)])
        out.append({**context, DRIFT: f"from {labels[first]}"})
    return out


F = TypeVar("F")


@dataclass(frozen=True)
class Drifted(Generic[F]):
    """What :func:`fit_with_changes` found: the fit, the run contexts and proposal context it used."""

    fitted: F
    contexts: list[Context]
    context: Context
    changes: tuple[int, ...] = ()
    """Positions of the first run after each adopted change."""


def log_evidence(gp: PhysicsGP, z: Tensor, y: Tensor) -> float:
    """Log marginal likelihood of ``y`` under the fitted ``gp`` plus the log prior density of its
    fitted hyperparameters: the MAP objective, comparable between models with the same hyperparameters."""
    model = gp.model
    assert model is not None
    with torch.no_grad():
        k = model.covar_module(z).to_dense() + torch.diag(model.likelihood.noise.reshape(-1))
        k = k + 1e-9 * torch.eye(len(k), dtype=k.dtype)
        value = float(torch.distributions.MultivariateNormal(model.mean_module(z), k).log_prob(y))
        for _, module, prior, closure, _ in model.named_priors():
            value += float(prior.log_prob(closure(module)).sum())
    return value


def fit_with_changes(
    fit: Callable[[Sequence[Context], Context], tuple[PhysicsGP, Tensor, Callable[[], F]]],
    contexts: Sequence[Context],
    context: Context,
    y: Tensor,
    labels: Sequence[str],
    tau: float,
) -> Drifted[F]:
    """Fit; while the change-point scan of the fitted size GP finds a candidate worth a look, fit
    the size GP with that change and adopt it if it is the more probable model.

    The scan (:func:`change_point`) runs at the hyperparameters fitted without the change, which
    may have blamed the jump on noise (a repeat of a recipe that gave two different sizes), so it
    only screens: a candidate above :data:`SCREEN` is refitted with the change, and adopted when
    its posterior odds ``exp(evidence difference) * CHANGE_RATE / (1 - CHANGE_RATE)`` exceed
    ``ADOPT / (1 - ADOPT)`` (each model's evidence at its own MAP hyperparameters, :func:`log_evidence`).
    Only the adopted model is fitted beyond its size GP.

    Args:
        fit: fits the size GP for run contexts and a proposal context; returns it, its training
            inputs, and a function that finishes the fit (the other models) and returns it.
        contexts: the runs' contexts, in time order; ``y`` their log sizes.
        context: the context of the next experiments.
        labels: a name per run (its experiment id) to label the stretches with.
        tau: prior sd of a change of the log size.
    """
    starts: list[int] = []
    run_contexts, proposal = list(contexts), dict(context)
    gp, z, finish = fit(run_contexts, proposal)
    threshold = math.log(ADOPT / (1 - ADOPT)) - math.log(CHANGE_RATE / (1 - CHANGE_RATE))
    for _ in range(MAX_CHANGES):
        found = change_point(gp, z, y, tau)
        if found is None or found.probability <= SCREEN or found.index in starts or found.index == 0:
            break
        marked = mark(contexts, [*starts, found.index], labels)
        newest = {**context, DRIFT: marked[-1][DRIFT]}
        candidate = fit(marked, newest)
        if log_evidence(candidate[0], candidate[1], y) - log_evidence(gp, z, y) <= threshold:
            break
        starts.append(found.index)
        (gp, z, finish), run_contexts, proposal = candidate, marked, newest
    return Drifted(finish(), run_contexts, proposal, tuple(sorted(starts)))
