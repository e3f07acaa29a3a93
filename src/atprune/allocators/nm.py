"""Mixed N:M: an allocator's per-block rates rounded to one legal N per block for a fixed M.

The paper's mixed N:8 experiment (DominoSearch-style: each layer gets its own N, the mean stays 2:8 / 3:8 / 4:8)
takes any allocator's rates ``s_i`` (parameter-weighted mean ``S = 1 - N/M``) and keeps ``M (1 - s_i)`` weights of
every group of M in block i. That number must be an integer in ``[1, M - 1]``, so it is rounded by this rule:

1. ``N_i = floor(M (1 - s_i))`` clamped to ``[1, M - 1]``; remainders ``r_i = M (1 - s_i) - floor(.)``.
2. **Largest remainder** (Hamilton's method): while the parameter-weighted kept fraction
   ``sum_i p_i N_i / (M sum_i p_i)`` is below the target ``N / M``, add 1 to a block still below ``M - 1`` whose
   increment does not overshoot the target: first the blocks given fewest increments so far, among them the largest
   remainder, then the lower block index.
3. If clamping at ``N_i = 1`` left the kept fraction above the target, take 1 back the same way reversed
   (smallest remainder first), never below 1.

With equal block sizes (every decoder LLM atprune supports) the sum ``sum_i N_i = L N`` is reached exactly, so the
mean sparsity is exactly ``1 - N/M``. With unequal sizes the kept fraction is the largest the greedy reaches without
exceeding the target (sparsity at least S); the report gives the N of every block and the mean achieved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from atprune.errors import ConfigError


def round_to_nm(rates: Sequence[float], sizes: Sequence[int], n: int, m: int) -> list[int]:
    """One N per block for M-groups, from rates with parameter-weighted mean ``1 - n/m`` (module docstring rule).

    Args:
        rates: per-block sparsity ratios in [0, 1], input side first.
        sizes: prunable weights per block (same length).
        n, m: the mean pattern ``n:m`` (``0 < n < m``).

    Returns:
        ``N_i`` per block, each in ``[1, m - 1]``.

    Raises:
        ConfigError: ``m < 3`` with a non-uniform allocation (2:4-style M=2 has only N=1), or lengths differ.
    """
    if len(rates) != len(sizes):
        raise ConfigError(f"{len(rates)} rates for {len(sizes)} blocks")
    if m < 3:
        raise ConfigError(f"mixed N:M needs M >= 3 so that blocks can differ (M={m} allows only N=1); "
                          "use e.g. 4:8 or 2:4")
    kept = [m * (1.0 - r) for r in rates]
    floors = [math.floor(k + 1e-9) for k in kept]
    ns = [min(m - 1, max(1, f)) for f in floors]
    rem = [k - f for k, f in zip(kept, floors)]
    target = n * sum(sizes)  # sum_i p_i N_i must reach this (in units of weights / M)
    total = sum(p * k for p, k in zip(sizes, ns))
    extra = [0] * len(ns)  # increments given so far: a block gets a second one only after every other got one
    while total < target:
        fits = [i for i in range(len(ns)) if ns[i] < m - 1 and total + sizes[i] <= target]
        if not fits:
            break
        i = min(fits, key=lambda j: (extra[j], -rem[j], j))
        ns[i], total, extra[i] = ns[i] + 1, total + sizes[i], extra[i] + 1
    while total > target:  # clamping at N=1 overshot: take back from the smallest remainders, never below N=1
        fits = [i for i in range(len(ns)) if ns[i] > 1]
        if not fits:
            break
        i = min(fits, key=lambda j: (-extra[j], rem[j], -j))
        ns[i], total, extra[i] = ns[i] - 1, total - sizes[i], extra[i] - 1
    return ns
