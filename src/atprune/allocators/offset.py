"""One offset between the attention and the MLP sublayers of every block, the block's rate kept (ATP's ``attn_offset``).

ATP gives every layer of block i the block's rate s_i. With an offset D, block i's attention projections get
``s_i + D m_i / (a_i + m_i)`` and its MLP projections ``s_i - D a_i / (a_i + m_i)``, where a_i and m_i are the
block's attention and MLP parameter counts, so that

* the block's parameter-weighted rate stays exactly s_i: ``a_i (s_i + D m_i/T) + m_i (s_i - D a_i/T) = s_i T``
  (``T = a_i + m_i``), hence ATP's progression across blocks and the model's mean S are unchanged;
* attention minus MLP is D in every block (D > 0: attention is pruned more).

D = 0 is plain ATP. A D other than 0 is legal when every layer rate lies in [0, 1); with ``fa_i = m_i / T`` and
``fm_i = a_i / T`` this is the interval

    max_i max(-s_i / fa_i, -(1 - s_i) / fm_i)  <=  D  <=  min_i min((1 - s_i) / fa_i, s_i / fm_i),

closed where a rate reaches 0 (``-s_i/fa_i``, ``s_i/fm_i``) and open where it would reach 1. A block with a rate of
0 or 1 (ATP at its largest beta) leaves only D = 0. A block without attention (or without MLP) adds no bound and its
layers keep s_i.

Motivation only, the rule is atprune's own: LSA (ICLR 2026) and OWL's per-layer variants (Yin et al. 2024) report that
attention and MLP projections tolerate different sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from atprune.errors import ConfigError


def split_rate(rate: float, attn: int, mlp: int, offset: float) -> tuple[float, float]:
    """``(attention rate, MLP rate)`` of one block of rate ``rate`` with ``attn`` and ``mlp`` prunable weights
    (``attn + mlp >= 1``); ``offset == 0`` returns ``(rate, rate)`` exactly."""
    if offset == 0:
        return rate, rate
    total = attn + mlp
    return rate + offset * mlp / total, rate - offset * attn / total


def offset_interval(rates: Sequence[float], sublayers: Sequence[tuple[int, int]]) -> tuple[float, float, str]:
    """The legal non-zero offsets for these block rates (module docstring).

    Args:
        rates: block rates s_i (floats in [0, 1]).
        sublayers: ``(a_i, m_i)`` per block: attention and MLP prunable weights.

    Returns:
        ``(lo, hi, text)``: the bounds (lo <= 0 <= hi) and the interval written with its brackets, e.g.
        ``"(-0.75, 0.5)"``; never wider than ``(-1, 1)`` (ATP's check of ``attn_offset``), which is also the
        interval when no block has both sublayers.
    """
    lo, hi, lo_closed, hi_closed = -1.0, 1.0, False, False  # attn_offset's own range, |D| < 1
    for s, (a, m) in zip(rates, sublayers):
        if not (a and m):  # one sublayer only: its layers keep s_i whatever D, no bound
            continue
        fa, fm = m / (a + m), a / (a + m)
        # (bound, closed): a rate may reach 0 but not 1
        uppers = ([((1 - s) / fa, False)] if fa else []) + ([(s / fm, True)] if fm else [])
        lowers = ([(-s / fa, True)] if fa else []) + ([(-(1 - s) / fm, False)] if fm else [])
        for bound, closed in uppers:
            if bound < hi or (bound == hi and not closed):
                hi, hi_closed = bound, closed
        for bound, closed in lowers:
            if bound > lo or (bound == lo and not closed):
                lo, lo_closed = bound, closed
    lo, hi = lo + 0.0, hi + 0.0  # no "-0"
    text = f"{'[' if lo_closed else '('}{lo:.6g}, {hi:.6g}{']' if hi_closed else ')'}"
    return lo, hi, text


def split_rates(rates: Sequence[float], sublayers: Sequence[tuple[int, int]], offset: float,
                what: str = "") -> list[tuple[float, float]]:
    """``[(attention rate, MLP rate)]`` per block (:func:`split_rate`), checked.

    Args:
        what: the run's description for the message (e.g. ``"sparsity 0.6, beta 0.1"``).

    Raises:
        ConfigError: if a layer rate leaves [0, 1) (for ``offset != 0``); the message gives the legal interval.
    """
    pairs = [split_rate(s, a, m, offset) for s, (a, m) in zip(rates, sublayers)]
    if offset != 0 and any(not 0 <= r < 1 for pair, (a, m) in zip(pairs, sublayers)
                           for r, n in zip(pair, (a, m)) if n):
        lo, hi, text = offset_interval(rates, sublayers)
        where = f" at {what}" if what else ""
        legal = (f"so it must be 0 or in {text}" if lo < hi else
                 "and a block rate of 0 or 1 leaves only 0")
        raise ConfigError(f"illegal attn_offset {offset:g}{where}: every attention and MLP rate must stay in [0, 1), "
                          f"{legal}")
    return pairs
