"""Mixed N:M: one N per block from an allocator's rates, the mean kept by largest-remainder rounding, every matrix
exactly N:M for its block's N, recorded in the report and rechecked by verify (tiny models, fast)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import atprune
from atprune.allocators import atp_rates
from atprune.allocators.nm import round_to_nm
from atprune.errors import ConfigError
from atprune.export import save_pruned, verify_checkpoint
from atprune.export.nm import nm_violations
from tests.conftest import char_tokenizer, tiny_model


def _brute_force(rates, sizes, n, m):
    """Every assignment of N_i in [1, m-1] with sum p_i N_i == n sum p_i, the one closest (L1) to m (1 - s_i)."""
    best = None
    for ns in itertools.product(range(1, m), repeat=len(rates)):
        if sum(p * k for p, k in zip(sizes, ns)) != n * sum(sizes):
            continue
        dist = sum(abs(k - m * (1 - r)) for k, r in zip(ns, rates))
        if best is None or dist < best[0] - 1e-12:
            best = (dist, ns)
    return best


@pytest.mark.parametrize("n,m,beta", [(4, 8, 0.05), (4, 8, 0.1), (2, 8, 0.03), (3, 8, 0.07), (2, 4, 0.1)])
def test_rounding_keeps_the_mean_exactly_and_is_nearest(n, m, beta):
    L = 5
    rates = atp_rates(1 - n / m, L, beta)
    ns = round_to_nm(rates, [1] * L, n, m)
    assert all(1 <= k <= m - 1 for k in ns)
    assert sum(ns) == n * L  # the mean is exactly n:m
    assert all(abs(k - m * (1 - r)) < 1 for k, r in zip(ns, rates))  # each N is a neighbour of its exact value
    dist, _ = _brute_force(rates, [1] * L, n, m)  # and the assignment is an L1-nearest one with that sum
    assert sum(abs(k - m * (1 - r)) for k, r in zip(ns, rates)) == pytest.approx(dist)


def test_rounding_by_hand():
    # kept 8 * (1 - s): 5.5, 4.75, 4.0, 3.25, 2.5 -> floors 5 4 4 3 2 (sum 18), remainders .5 .75 0 .25 .5: the two
    # largest (block 1, then block 0 before block 4 by index) get +1 -> 6 5 4 3 2, sum 20 = 4 * 5
    rates = [1 - 5.5 / 8, 1 - 4.75 / 8, 0.5, 1 - 3.25 / 8, 1 - 2.5 / 8]
    assert round_to_nm(rates, [1] * 5, 4, 8) == [6, 5, 4, 3, 2]


def test_rounding_clamps_to_legal_n():
    # rates 0 and 1 would mean N = 8 and N = 0: clamped to 7 and 1, still summing to 8
    assert round_to_nm([0.0, 1.0], [1, 1], 4, 8) == [7, 1]


def test_m_below_three_is_refused():
    with pytest.raises(ConfigError, match="M >= 3"):
        atprune.plan("wanda", None, 4, allocation="atp", beta=0.01, pattern="1:2")


def test_nm_violations_counts_groups():
    w = torch.tensor([[1.0, 0, 2, 0, 3, 4, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    assert nm_violations(w, "2:4") == 1  # row 1's first group holds 3 non-zeros
    assert nm_violations(w.t(), "2:4", axis=0) == 1
    assert nm_violations(w, "3:4") == 0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_mixed_every_matrix_exact_for_its_block(method):
    layers = 4
    model = tiny_model("llama", layers=layers)
    calib = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    beta = 0.1  # rates .35 .45 .55 .65: kept 5.2 4.4 3.6 2.8 -> 5 4 4 3
    result = atprune.prune(model, None, method=method, sparsity=None, pattern="4:8", allocation="atp", beta=beta,
                           calib=calib, progress=False)
    expected = round_to_nm(atp_rates(0.5, layers, beta), [1] * layers, 4, 8)
    assert result.spec["block_n"] == expected == [5, 4, 4, 3]
    assert result.overall_sparsity == pytest.approx(0.5, abs=1e-12)  # exact mean
    for i, block in enumerate(model.model.layers):
        assert result.blocks[i]["pattern"] == f"{expected[i]}:8"
        for name, lin in [("q", block.self_attn.q_proj), ("down", block.mlp.down_proj), ("up", block.mlp.up_proj)]:
            groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 8).sum(-1)
            assert bool((groups == expected[i]).all()), (i, name)  # exactly N_i of every 8 kept (dense init)


def test_mixed_report_verify_and_compressed(tmp_path):
    model = tiny_model("llama", layers=3)
    result = atprune.prune(model, None, method="magnitude", sparsity=None, pattern="4:8", allocation="atp",
                           beta=0.1, progress=False)
    report = {"pruning": result.to_dict()}
    out = save_pruned(model, char_tokenizer(), tmp_path / "out", report, formats=("compressed",))
    saved = json.loads((out / "report.json").read_text())
    pats = {n: r["pattern"] for n, r in saved["export"]["matrices"].items()}
    assert pats["model.layers.0.mlp.down_proj.weight"] == f"{result.spec['block_n'][0]}:8"
    assert pats["model.layers.2.self_attn.q_proj.weight"] == f"{result.spec['block_n'][2]}:8"
    cfg = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert cfg["sparsity_structure"] == "unstructured"  # mixed: blocks differ; the report holds each block's N
    rows = verify_checkpoint(out)
    assert rows and all(r["ok"] for r in rows)
    # a matrix that keeps one weight too many in a group is caught as "not N:M" (dense and compressed alike)
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.down_proj.weight"
    n0 = result.spec["block_n"][0]
    files = sorted(out.glob("model*.safetensors"))
    state = load_file(files[0])
    w = state[name]
    grow = int((w[0, :8] == 0).nonzero()[0])  # one zero of group 0 made non-zero, one weight of group 1 zeroed:
    drop = 8 + int((w[0, 8:16] != 0).nonzero()[0])  # the same number of zeros, but group 0 holds N + 1
    w[0, grow], w[0, drop] = 1.0, 0.0
    rec = saved["export"]["matrices"][name]
    save_file(state, str(files[0]), metadata={"format": "pt"})
    bad = [r for r in verify_checkpoint(out) if r["name"] == name and r["format"] == "dense"][0]
    assert "sparsity" not in bad["problem"] and f"not {n0}:8" in bad["problem"] and not bad["ok"]
    assert rec["pattern"] == f"{n0}:8"


def test_recipe_refuses_a_mixed_run():
    from atprune.export.recipe import recipe_from_report

    model = tiny_model("llama", layers=3)
    result = atprune.prune(model, None, method="magnitude", sparsity=None, pattern="4:8", allocation="atp",
                           beta=0.1, progress=False)
    with pytest.raises(ConfigError, match="no single llm-compressor mask_structure"):
        recipe_from_report({"pruning": result.to_dict()}, modifier="wanda")


def test_atp_with_beta_zero_on_n_m_is_not_a_mixed_run():
    """Every block gets the run's N (4:8) at beta 0: the run is plain 4:8, so the compressed export and the recipe
    take it as such."""
    model = tiny_model("llama", layers=3)
    result = atprune.prune(model, None, method="magnitude", sparsity=None, pattern="4:8", allocation="atp",
                           beta=0.0, progress=False)
    assert "mixed_nm" not in result.spec and "block_n" not in result.spec
    assert result.spec["rates"] == [0.5, 0.5, 0.5] and result.overall_sparsity == pytest.approx(0.5, abs=1e-12)
