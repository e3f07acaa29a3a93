"""Search strategies for ATP's beta over its legal range [0, beta_max], and for beta with ATP's ``attn_offset``.

The strategies are pure functions of an objective ``f(beta) -> float`` (``f(beta, offset)`` for the offset search;
lower is better), so they can be tested on known functions, and a resumed search simply answers ``f`` from the
trials already recorded.

* ``grid``: the reference protocol (Wang et al., ATP), beta = 0.002, 0.004, ... while legal; we also evaluate
  beta = 0 (uniform) as the baseline.
* ``golden``: beta = 0 (uniform) and the two golden-section points of [0, beta_max] as a coarse bracket, then
  golden-section refinement (Kiefer 1953; Numerical Recipes 10.2): the next point goes into the larger of the two
  intervals beside the best point so far, at the golden fraction 0.382 of it. For a unimodal objective the
  bracket around the best point shrinks by about 0.618 per trial.
* ``offset_search`` (two parameters, beta and the attention/MLP offset D of :mod:`atprune.allocators.offset`), with a
  budget of T trials, the same budget plain ATP gets: beta first, by ``golden`` on T - 2 trials at D = 0 (the first is
  uniform, and these are the first T - 2 points plain ATP's golden search with T trials visits); then D at the best
  beta b, with two trials at D = +D0 and -D0, D0 = half the smaller side of D's legal interval at b (D = 0 is the
  point already measured); the best of all trials is kept (ties: D = 0, then the smaller beta). When D's interval at
  b is only {0} (a block rate of 0 or 1) the two offset trials are not run. Offsets are searched coarsely on purpose:
  one sign and one magnitude, for two prune passes beyond what plain ATP would share.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from atprune.allocators import beta_max
from atprune.errors import ConfigError

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...
STRATEGIES = ("golden", "grid")
OFFSET_TRIALS = 2  # offset_search's trials at the chosen beta: +D0 and -D0


def grid_betas(sparsity: float, blocks, step: float = 0.002, include_uniform: bool = True) -> list[float]:
    """``[0,] step, 2 step, ...`` up to ``beta_max(sparsity, blocks)`` inclusive (to 1e-12); ``blocks``: the number
    of blocks L or their sizes (see :func:`atprune.allocators.atp.beta_max`).

    Raises:
        ConfigError: if ``step`` is not positive.
    """
    if not step > 0:
        raise ConfigError(f"grid step must be > 0, got {step}")
    hi = beta_max(sparsity, blocks)
    betas = [0.0] if include_uniform else []
    k = 1
    while k * step <= hi + 1e-12:
        betas.append(round(k * step, 12))
        k += 1
    return betas


def golden_search(f: Callable[[float], float], hi: float, max_trials: int = 6) -> list[tuple[float, float]]:
    """Minimise ``f`` over ``[0, hi]`` with at most ``max_trials`` evaluations; never leaves ``[0, hi]``.

    Args:
        f: objective, lower is better; ``nan`` counts as worse than any number.
        hi: upper end of the legal range (``beta_max``).
        max_trials: evaluation budget (>= 3: uniform plus the two golden points).

    Returns:
        ``[(beta, f(beta)), ...]`` in evaluation order.

    Raises:
        ConfigError: ``max_trials < 3`` or ``hi < 0``.
    """
    if max_trials < 3:
        raise ConfigError(f"golden search needs --max-trials >= 3 (uniform + 2 golden points), got {max_trials}")
    if hi < 0:
        raise ConfigError(f"upper end of the beta range must be >= 0, got {hi}")
    seen: dict[float, float] = {}
    order: list[tuple[float, float]] = []

    def ev(x: float) -> None:
        value = f(x)
        seen[x] = value if value == value else math.inf
        order.append((x, value))

    for x in (0.0, (1 - GOLDEN) * hi, GOLDEN * hi):
        if x not in seen:
            ev(x)
    while len(order) < max_trials:
        xs = sorted(seen)
        k = min(range(len(xs)), key=lambda j: (seen[xs[j]], xs[j]))
        best = xs[k]
        left = xs[k - 1] if k > 0 else best
        right = xs[k + 1] if k + 1 < len(xs) else hi
        if right - best >= best - left:
            x = best + (1 - GOLDEN) * (right - best)
        else:
            x = best - (1 - GOLDEN) * (best - left)
        if x in seen or abs(x - best) <= 1e-12 * max(hi, 1e-12):
            break  # the bracket has collapsed
        ev(x)
    return order


def best_trial(trials: list[tuple[float, float]]) -> tuple[float, float]:
    """The ``(beta, value)`` with the lowest finite value (ties: the smaller beta).

    Raises:
        ValueError: if no trial has a finite value.
    """
    finite = [t for t in trials if math.isfinite(t[1])]
    if not finite:
        raise ValueError("no trial gave a finite selection metric")
    return min(finite, key=lambda t: (t[1], t[0]))


def offset_search(f: Callable[[float, float], float], beta_hi: float,
                  offset_range: Callable[[float], tuple[float, float]],
                  max_trials: int = 6) -> list[tuple[tuple[float, float], float]]:
    """Minimise ``f(beta, offset)`` with at most ``max_trials`` evaluations (rule: module docstring).

    Args:
        f: objective, lower is better (``nan`` is worse than any number).
        beta_hi: upper end of beta's legal range.
        offset_range: ``beta -> (lo, hi)``, the legal interval of the offset at that beta (``lo <= 0 <= hi``).
        max_trials: T, the whole budget (>= 5: three golden points of beta and the two offsets).

    Returns:
        ``[((beta, offset), f(beta, offset)), ...]`` in evaluation order; every offset strictly inside its range.

    Raises:
        ConfigError: ``max_trials < 5`` or ``beta_hi < 0``.
    """
    if max_trials < 3 + OFFSET_TRIALS:
        raise ConfigError(f"the beta + attn_offset search needs --max-trials >= {3 + OFFSET_TRIALS} (3 golden points "
                          f"of beta, then {OFFSET_TRIALS} offsets), got {max_trials}")
    order = [((b, 0.0), v) for b, v in golden_search(lambda b: f(b, 0.0), beta_hi, max_trials - OFFSET_TRIALS)]
    beta = best_trial([(b, v) for (b, _), v in order])[0]
    lo, hi = offset_range(beta)
    d0 = min(-lo, hi) / 2
    if d0 > 0:
        for d in (d0, -d0):
            order.append(((beta, d), f(beta, d)))
    return order


def best_offset_trial(trials: list[tuple[tuple[float, float], float]]) -> tuple[tuple[float, float], float]:
    """The ``((beta, offset), value)`` with the lowest finite value (ties: offset 0, then the smaller beta).

    Raises:
        ValueError: if no trial has a finite value.
    """
    finite = [t for t in trials if math.isfinite(t[1])]
    if not finite:
        raise ValueError("no trial gave a finite selection metric")
    return min(finite, key=lambda t: (t[1], t[0][1] != 0, t[0][0], t[0][1]))
