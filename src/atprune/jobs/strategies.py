"""Search strategies for ATP's beta over its legal range [0, beta_max].

Both strategies are pure functions of an objective ``f(beta) -> float`` (lower is better), so they can be
tested on known functions, and a resumed search simply answers ``f`` from the trials already recorded.

* ``grid``: the reference protocol (Wang et al., ATP), beta = 0.002, 0.004, ... while legal; we also evaluate
  beta = 0 (uniform) as the baseline.
* ``golden``: beta = 0 (uniform) and the two golden-section points of [0, beta_max] as a coarse bracket, then
  golden-section refinement (Kiefer 1953; Numerical Recipes 10.2): the next point goes into the larger of the two
  intervals beside the best point so far, at the golden fraction 0.382 of it. For a unimodal objective the
  bracket around the best point shrinks by about 0.618 per trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from atprune.allocators import beta_max
from atprune.errors import ConfigError

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...
STRATEGIES = ("golden", "grid")


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
