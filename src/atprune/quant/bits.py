"""Mixed precision on ATP's schedule: more bits for the input-side blocks, fewer for the output-side ones.

ATP (the paper this package implements) gives block i of L the sparsity ``S - beta (L-1)/2 + beta i``: increasing
toward the output. The same monotone schedule for bit widths (the paper's mixed-precision remark; LIMPQ's
observation that layers differ in how many bits they need) is ``t_i = B + step (c - i)`` with ``c`` the
parameter-weighted mean block index, so the weighted mean of ``t`` is exactly ``B``. Real blocks take integer widths
from a set (e.g. {2, 3, 4, 8}); :func:`atp_bits` rounds ``t`` to it without exceeding the budget.
"""

from __future__ import annotations

import math

from atprune.errors import ConfigError


def atp_bits(mean_bits: float, step: float, sizes: list[int], choices=(2, 3, 4, 8)) -> list[int]:
    """Bit width of each block.

    Every block starts at the largest allowed width not above its target ``t_i``; then, while the budget
    ``mean_bits * sum(sizes)`` allows, the block with the largest fractional remainder
    ``(t_i - b_i) / (next_i - b_i)`` (ties: the input-side block first) moves up to its next allowed width, if that
    move fits the budget. The weighted mean is never above ``mean_bits``; it equals it whenever the moves can fill
    the budget exactly (e.g. equal blocks, consecutive widths).

    Args:
        mean_bits: target parameter-weighted mean ``B``.
        step: bits per block of the linear schedule (0: uniform at ``B`` rounded as above).
        sizes: quantized weights per block (``L`` positive ints).
        choices: allowed widths.

    Returns:
        ``L`` ints from ``choices``.

    Raises:
        ConfigError: ``mean_bits`` outside ``[min(choices), max(choices)]``, negative ``step`` or empty ``sizes``.
    """
    levels = sorted(set(int(c) for c in choices))
    if not sizes or min(sizes) <= 0:
        raise ConfigError("mixed precision needs at least one block with weights")
    if not levels[0] <= mean_bits <= levels[-1]:
        raise ConfigError(f"mean bits {mean_bits:g} outside the allowed widths {levels[0]}..{levels[-1]}")
    if step < 0:
        raise ConfigError(f"bits step must be >= 0, got {step:g}")
    total = sum(sizes)
    centre = sum(i * p for i, p in enumerate(sizes)) / total
    targets = [min(max(mean_bits + step * (centre - i), levels[0]), levels[-1]) for i in range(len(sizes))]
    bits = [max(b for b in levels if b <= t + 1e-9) for t in targets]
    budget = mean_bits * total - sum(b * p for b, p in zip(bits, sizes))
    while True:
        best = None
        for i, (b, t, p) in enumerate(zip(bits, targets, sizes)):
            up = [x for x in levels if x > b]
            if not up or p * (up[0] - b) > budget + 1e-6 * total:
                continue
            priority = (t - b) / (up[0] - b)
            if best is None or priority > best[0] + 1e-12:
                best = (priority, i, up[0])
        if best is None:
            return bits
        _, i, nxt = best
        budget -= sizes[i] * (nxt - bits[i])
        bits[i] = nxt


def mean_bits(bits: list[int], sizes: list[int]) -> float:
    """Parameter-weighted mean of per-block bits."""
    return sum(b * p for b, p in zip(bits, sizes)) / sum(sizes)


def step_max(mean_bits: float, sizes: list[int], choices=(2, 3, 4, 8)) -> float:
    """The largest legal step of :func:`atp_bits`: the largest ``step`` at which no block's target
    ``t_i = B + step (c - i)`` leaves ``[min(choices), max(choices)]`` before clamping, i.e.
    ``min((max - B) / c, (B - min) / (L - 1 - c))`` with ``c`` the parameter-weighted mean block index (a side
    with no block beyond the centre sets no bound). Within it the unrounded targets keep the weighted mean exactly
    ``B`` (as ATP's ``beta_max`` keeps every rate in [0, 1)); beyond it the end blocks are clamped and the schedule
    stops being linear.

    Args:
        mean_bits: ``B``; sizes: quantized weights per block (``L`` positive ints); choices: allowed widths.

    Returns:
        A float >= 0 (0 when ``B`` is one end of the choices or there is a single block).

    Raises:
        ConfigError: as :func:`atp_bits` (``B`` outside the choices, empty sizes).
    """
    levels = sorted(set(int(c) for c in choices))
    if not sizes or min(sizes) <= 0:
        raise ConfigError("mixed precision needs at least one block with weights")
    if not levels[0] <= mean_bits <= levels[-1]:
        raise ConfigError(f"mean bits {mean_bits:g} outside the allowed widths {levels[0]}..{levels[-1]}")
    centre = sum(i * p for i, p in enumerate(sizes)) / sum(sizes)
    bounds = [(levels[-1] - mean_bits) / centre if centre > 1e-12 else math.inf,
              (mean_bits - levels[0]) / (len(sizes) - 1 - centre) if len(sizes) - 1 - centre > 1e-12 else math.inf]
    hi = min(bounds)
    return 0.0 if math.isinf(hi) else float(hi)
