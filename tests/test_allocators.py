"""Layer-wise sparsity allocators: uniform and ATP (arithmetic progression)."""

from __future__ import annotations

import math
import re

import pytest

from atprune.allocators import ALLOCATORS, ATPAllocator, UniformAllocator, atp_rates, beta_max, get_allocator
from atprune.errors import ConfigError

# (S, L) pairs from the spec plus a few edge-ish ones
PAIRS = [(0.5, 32), (0.7, 30), (0.2, 12), (0.9, 80), (0.6, 2), (0.05, 7)]


def _expected_beta_max(s: float, n: int) -> float:
    return min(2 * s, 2 * (1 - s)) / (n - 1)


def _numbers(msg: str) -> list[float]:
    return [float(t) for t in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", msg)]


# ---------------------------------------------------------------- beta_max

@pytest.mark.parametrize("s,n", PAIRS)
def test_beta_max_formula(s, n):
    assert beta_max(s, n) == pytest.approx(_expected_beta_max(s, n), rel=1e-12, abs=0)


def test_beta_max_single_block_is_zero():
    assert beta_max(0.5, 1) == 0.0
    assert atp_rates(0.5, 1, 0.0) == [0.5]
    with pytest.raises(ConfigError):
        atp_rates(0.5, 1, 0.01)


# ---------------------------------------------------------------- atp_rates

@pytest.mark.parametrize("s,n", PAIRS)
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.999])
def test_atp_rates_progression(s, n, frac):
    beta = frac * _expected_beta_max(s, n)
    rates = atp_rates(s, n, beta)
    assert len(rates) == n
    assert all(isinstance(r, float) for r in rates)
    assert sum(rates) / n == pytest.approx(s, abs=1e-9)
    assert rates[0] == pytest.approx(s - beta * (n - 1) / 2, abs=1e-12)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(d > 0 for d in steps), "rates must be strictly increasing"
    for d in steps:
        assert d == pytest.approx(beta, rel=1e-9, abs=1e-12)
    assert all(0.0 <= r <= 1.0 for r in rates)


@pytest.mark.parametrize("s,n", PAIRS)
def test_atp_beta_zero_equals_uniform(s, n):
    rates = atp_rates(s, n, 0.0)
    assert rates == list(UniformAllocator().allocate(s, n).rates)
    assert rates == [s] * n


@pytest.mark.parametrize("s,n", PAIRS)
def test_atp_at_beta_max_stays_in_unit_interval_and_hits_endpoint(s, n):
    bm = _expected_beta_max(s, n)
    rates = atp_rates(s, n, bm)
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert sum(rates) / n == pytest.approx(s, abs=1e-9)
    hits_zero = rates[0] == pytest.approx(0.0, abs=1e-9)
    hits_one = rates[-1] == pytest.approx(1.0, abs=1e-9)
    assert hits_zero or hits_one
    # which endpoint is hit follows from which side of 0.5 the target lies on
    if s < 0.5:
        assert hits_zero and not hits_one
    elif s > 0.5:
        assert hits_one and not hits_zero
    else:
        assert hits_zero and hits_one


@pytest.mark.parametrize("s,n", PAIRS)
def test_atp_beta_above_max_raises_with_bound_in_message(s, n):
    bm = _expected_beta_max(s, n)
    with pytest.raises(ConfigError) as exc:
        atp_rates(s, n, bm * 1.01)
    nums = _numbers(str(exc.value))
    assert any(math.isclose(x, bm, rel_tol=1e-5) for x in nums), (str(exc.value), bm)


@pytest.mark.parametrize("s,n", PAIRS)
@pytest.mark.parametrize("beta", [-1e-6, -0.01, -1.0])
def test_atp_negative_beta_raises_with_bound_in_message(s, n, beta):
    bm = _expected_beta_max(s, n)
    with pytest.raises(ConfigError) as exc:
        atp_rates(s, n, beta)
    nums = _numbers(str(exc.value))
    assert any(math.isclose(x, bm, rel_tol=1e-5) for x in nums), (str(exc.value), bm)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_atp_illegal_sparsity_raises(s):
    with pytest.raises(ConfigError):
        atp_rates(s, 10, 0.0)
    with pytest.raises(ConfigError):
        ATPAllocator(beta=0.0).check(s, 10)
    with pytest.raises(ConfigError):
        list(UniformAllocator().allocate(s, 10).rates)
    with pytest.raises(ConfigError):
        UniformAllocator().check(s, 10)


def test_atp_zero_blocks_raises():
    with pytest.raises(ConfigError):
        atp_rates(0.5, 0, 0.0)


def test_atp_allocator_gives_the_hand_computed_rates():
    # L = 4, S = 0.5, beta = 0.1: s_i = 0.5 - 0.1 * 3/2 + 0.1 i = 0.35, 0.45, 0.55, 0.65
    alloc = ATPAllocator(beta=0.1)
    assert list(alloc.allocate(0.5, 4).rates) == pytest.approx([0.35, 0.45, 0.55, 0.65], abs=1e-15)
    alloc.check(0.5, 4)  # legal: 0.1 <= min(1, 1) / 3
    with pytest.raises(ConfigError, match=r"\[0, 0\.0322581\]"):
        ATPAllocator(beta=0.1).check(0.5, 32)  # 0.1 > 1/31
    assert ATPAllocator(beta=0.01).describe() == {"name": "atp", "beta": 0.01}


def test_atp_on_blocks_of_different_sizes_keeps_the_weighted_mean():
    # sizes 1, 1, 2: weighted mean index ibar = (0 + 1 + 2 * 2) / 4 = 1.25, so with S = 0.5, beta = 0.1 the rates
    # are 0.5 - 0.125 + 0.1 i = 0.375, 0.475, 0.575 (the arithmetic mean would give 0.4, 0.5, 0.6)
    sizes = [1, 1, 2]
    rates = ATPAllocator(beta=0.1).allocate(0.5, sizes).rates
    assert list(rates) == pytest.approx([0.375, 0.475, 0.575], abs=1e-15)
    assert sum(r * p for r, p in zip(rates, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-15)
    assert rates[1] - rates[0] == pytest.approx(0.1) and rates[2] - rates[1] == pytest.approx(0.1)
    # the legal range, by brute force over a fine grid: every rate in [0, 1]
    sizes = [3, 1, 1, 1, 5]
    for s in (0.2, 0.7):
        ibar = sum(i * p for i, p in enumerate(sizes)) / sum(sizes)
        legal = [k * 1e-4 for k in range(1, 5000) if all(0 <= s - k * 1e-4 * ibar + k * 1e-4 * i <= 1
                                                         for i in range(len(sizes)))]
        assert beta_max(s, sizes) == pytest.approx(max(legal), abs=1e-4)
        atp_rates(s, sizes, beta_max(s, sizes))  # the bound itself is legal
        with pytest.raises(ConfigError, match="for these block sizes"):
            atp_rates(s, sizes, max(legal) + 2e-4)


def test_uniform_rates():
    assert list(UniformAllocator().allocate(0.3, 5).rates) == [0.3] * 5
    assert list(UniformAllocator().allocate(0.0, 3).rates) == [0.0] * 3
    assert UniformAllocator().describe() == {"name": "uniform"}


# ---------------------------------------------------------------- registry

def test_get_allocator_known_names():
    assert isinstance(get_allocator("uniform"), UniformAllocator)
    a = get_allocator("atp", beta=0.02)
    assert isinstance(a, ATPAllocator) and a.beta == 0.02
    # atp without a beta is an error, not a silent uniform
    with pytest.raises(ConfigError, match="needs --beta"):
        get_allocator("atp", beta=None)
    assert list(get_allocator("atp", beta=0.0).allocate(0.4, 4).rates) == [0.4] * 4


@pytest.mark.parametrize("name", ["bogus", "ATP", "", "OWL"])
def test_get_allocator_unknown_name_lists_known(name):
    with pytest.raises(ConfigError) as exc:
        get_allocator(name)
    msg = str(exc.value)
    assert set(ALLOCATORS) == {"uniform", "atp", "owl", "alphapruning", "dlp"}
    for known in ALLOCATORS:
        assert known in msg


def test_get_allocator_unknown_option_is_config_error():
    with pytest.raises(ConfigError):
        get_allocator("uniform", beta=0.1)
    with pytest.raises(ConfigError):
        get_allocator("atp", gamma=0.1)


def test_prune_accepts_every_atp_beta_that_is_legal_for_the_model_block_sizes():
    """A model whose first block is wider: ``prune()`` takes ATP's size-aware legal range (the one the search uses),
    not the equal-block one, and keeps the parameter-weighted mean at S."""
    import copy

    from transformers.models.llama.modeling_llama import LlamaMLP

    import atprune
    from atprune.allocation import block_sizes
    from atprune.models.adapter import Adapter
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=3)
    wide = copy.deepcopy(model.config)
    wide.intermediate_size = 4 * model.config.intermediate_size
    model.model.layers[0].mlp = LlamaMLP(wide)
    sizes = block_sizes(Adapter.for_model(model))
    assert sizes[0] > sizes[1] == sizes[2]
    beta = 0.95 * beta_max(0.3, sizes)
    assert beta > beta_max(0.3, 3)  # illegal for three equal blocks
    result = atprune.prune(model, method="magnitude", sparsity=0.3, allocation="atp", beta=beta, progress=False)
    assert result.spec["rates"] == pytest.approx(atp_rates(0.3, sizes, beta))
    assert result.overall_sparsity == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(ConfigError, match="for these block sizes"):
        atprune.prune(model, method="magnitude", sparsity=0.3, allocation="atp", beta=1.05 * beta_max(0.3, sizes),
                      progress=False)
