"""DSnoT mask refinement: zeros per row kept, the swap rule by hand, lower reconstruction error than the mask it
starts from, and `--refine dsnot` with every allocator (tiny random layers and models, fast)."""

from __future__ import annotations

import pytest
import torch

import atprune
from atprune.engine.stats import InputStats
from atprune.errors import ConfigError
from atprune.pruners import Pattern, get_pruner
from atprune.pruners.dsnot import dsnot_refine
from tests.conftest import tiny_model


def _layer(rows=32, cols=2048, tokens=2048, seed=0):
    """A random layer and inputs with per-feature means and scales (as LLM activations have), as 8 windows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mean = torch.randn(cols, generator=g) * 0.8
    scale = torch.rand(cols, generator=g) + 0.2
    x = mean + scale * torch.randn(tokens, cols, generator=g)
    st = InputStats(cols, hessian=True)
    for part in x.reshape(8, -1, cols):
        st.add(part.unsqueeze(0))
    return w, x, st


def _error(w, keep, x):
    return float(((x @ w.t()) - (x @ (w * keep).t())).square().sum())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_zeros_per_row_unchanged_and_error_lower(method, sparsity):
    w, x, st = _layer(seed=int(sparsity * 10))
    start = get_pruner(method).prune(w, st, sparsity, Pattern()) == 0
    refined = dsnot_refine(w, start, st, update_threshold=0.0)
    assert torch.equal(refined.sum(1), start.sum(1))  # never changes the zeros of any row
    assert not torch.equal(refined, start)  # it did change the mask
    assert _error(w, ~refined, x) < _error(w, ~start, x)  # and lowered the reconstruction error of the mask


def test_official_defaults_also_lower_the_error():
    w, x, st = _layer(seed=3)
    start = get_pruner("wanda").prune(w, st, 0.6, Pattern()) == 0
    refined = dsnot_refine(w, start, st)  # max_cycle_time 50, update_threshold 0.1, pow 1, no same-sign check
    assert torch.equal(refined.sum(1), start.sum(1))
    assert _error(w, ~refined, x) < _error(w, ~start, x)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_swap_by_hand(sign):
    # one row, 4 inputs seen in 2 windows of 1 token, x = 0 then 2: xbar = sum / windows = 1, variance 1 for all.
    # sign +1: W = (3, -1, 2, 0.5), pruned {0, 3}: r = D_0 + D_3 = 3.5 > 0 -> regrow the pruned weight of largest
    # D / var (index 0) and, r >= 0, prune the first of the kept list (D < 0 first: index 1).
    # sign -1: W negated, r = -3.5 < 0 -> regrow the smallest D / var (index 0) and prune the last of the kept list
    # (negative D {2} first, then positive D {1} by descending Wanda score: the last is index 1). Both: pruned {1, 3}.
    w = sign * torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    st = InputStats(4)
    st.add(torch.zeros(1, 1, 4))
    st.add(torch.full((1, 1, 4), 2.0))
    start = torch.tensor([[True, False, False, True]])
    one = dsnot_refine(w, start, st, max_cycle_time=1, pow_of_var_regrowing=1.0)
    assert one.tolist() == [[False, True, False, True]]


def test_refine_errors_are_one_line():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ConfigError, match="unstructured masks only.*2:4"):
        atprune.prune(model, None, method="magnitude", sparsity=None, pattern="2:4", refine="dsnot", progress=False)
    with pytest.raises(ConfigError, match="unknown refinement 'owl'"):
        atprune.prune(model, None, method="magnitude", sparsity=0.5, refine="owl", progress=False)


@pytest.mark.parametrize("allocation,opts", [("uniform", {}), ("atp", {"beta": 0.1}), ("owl", {}),
                                             ("alphapruning", {}), ("dlp", {})])
def test_refine_with_every_allocator(allocation, opts):
    calib = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for refine in (None, "dsnot"):
        model = tiny_model("llama", layers=3)
        result = atprune.prune(model, None, method="wanda", sparsity=0.6, allocation=allocation, calib=calib,
                               progress=False, refine=refine, **opts)
        runs[refine] = (model, result)
    (m0, r0), (m1, r1) = runs[None], runs["dsnot"]
    assert r1.spec["refine"] == "dsnot" and r0.spec["rates"] == r1.spec["rates"]
    assert [b["zeros"] for b in r0.blocks] == [b["zeros"] for b in r1.blocks]  # same rates, same zeros per block
    # official default: the MLP keeps Wanda's mask (block 0: statistics from the same inputs in both runs)
    assert torch.equal(m0.model.layers[0].mlp.down_proj.weight, m1.model.layers[0].mlp.down_proj.weight)
    changed = False
    for b0, b1 in zip(m0.model.layers, m1.model.layers):
        q0, q1 = b0.self_attn.q_proj.weight, b1.self_attn.q_proj.weight
        assert torch.equal((q0 == 0).sum(1), (q1 == 0).sum(1))
        changed |= not torch.equal(q0 == 0, q1 == 0)
    assert changed
