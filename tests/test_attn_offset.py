"""ATP's attention/MLP offset (``attn_offset``): layer classification per family, hand-computed layer rates, the block's
rate kept (zeros counted per layer), D = 0 bit for bit plain ATP, and the legal range's edges."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import atprune
from atprune.allocation import sublayer_sizes
from atprune.allocators.offset import offset_interval, split_rates
from atprune.errors import ConfigError
from atprune.models.adapter import Adapter, sublayer
from tests.conftest import ARCHS, tiny_model

# attention layers of one block, by hand from each family's modeling code; every other prunable layer is MLP
LLAMA_ATTN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
ATTENTION = {"llama": LLAMA_ATTN, "mistral": LLAMA_ATTN, "mixtral": LLAMA_ATTN, "qwen2": LLAMA_ATTN,
             "qwen3": LLAMA_ATTN, "gemma2": LLAMA_ATTN, "gemma3": LLAMA_ATTN,
             "phi3": {"self_attn.qkv_proj", "self_attn.o_proj"},
             "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
             "gpt2": {"attn.c_attn", "attn.c_proj"},
             "gpt_neox": {"attention.query_key_value", "attention.dense"},
             "falcon": {"self_attention.query_key_value", "self_attention.dense"}}

# the tiny llama of tests/conftest.py: hidden 64, intermediate 96, 4 heads of 16, 2 KV heads
HIDDEN, INTER, KV = 64, 96, 2 * 16
A = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN  # q, o: 64 x 64; k, v: 32 x 64 -> 12288
M = 3 * HIDDEN * INTER  # gate, up: 96 x 64; down: 64 x 96 -> 18432


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_of_every_tiny_family_is_attention_or_mlp(arch):
    adapter = Adapter.for_model(tiny_model(arch, layers=2))
    for block in adapter.blocks:
        names = set(adapter.linears(block))
        assert {n for n in names if sublayer(n) == "attention"} == ATTENTION[arch]
        assert {n for n in names if sublayer(n) == "mlp"} == names - ATTENTION[arch]


def test_sublayer_names_of_other_layouts():
    assert sublayer("attn.Wqkv") == "attention" and sublayer("ffn.up_proj") == "mlp"  # MPT
    assert sublayer("mlp.experts.3.down_proj") == "mlp" and sublayer("fc2") == "mlp"
    assert sublayer("encoder_attn.k_proj") == "attention" and sublayer("mlp.fc_in") == "mlp"  # cross-attn, GPT-J
    assert sublayer("mixer.in_proj") is None and sublayer("altup.correct") is None


def test_sizes_of_the_tiny_llama_and_an_unclassified_layer_is_refused():
    model = tiny_model("llama", layers=3)
    assert sublayer_sizes(Adapter.for_model(model)) == [(A, M)] * 3
    model.model.layers[1].mixer = nn.Linear(HIDDEN, HIDDEN, bias=False)  # neither attention nor MLP
    plain = atprune.prune(copy.deepcopy(model), method="magnitude", sparsity=0.6, allocation="atp", beta=0.1,
                          progress=False)
    assert plain.blocks[1]["layers"]["mixer"] > 0  # plain ATP prunes it at the block's rate, as any layer
    with pytest.raises(ConfigError, match="block 1 layer 'mixer' is neither"):
        atprune.prune(model, method="magnitude", sparsity=0.6, allocation="atp", beta=0.1, progress=False,
                      allocation_options={"attn_offset": 0.1})


def test_hand_computed_layer_rates_and_zeros_counted_per_layer():
    """S = 0.6, beta = 0.1, L = 3: block rates 0.5, 0.6, 0.7. a / (a + m) = 12288 / 30720 = 0.4, so with D = 0.2
    attention gets s + 0.2 * 0.6 = s + 0.12 and MLP s - 0.2 * 0.4 = s - 0.08. Magnitude prunes floor(numel * rate)
    weights of each matrix, so the zeros of every layer are known exactly."""
    model = tiny_model("llama", layers=3, seed=3)
    result = atprune.prune(model, method="magnitude", sparsity=0.6, allocation="atp", beta=0.1, progress=False,
                           allocation_options={"attn_offset": 0.2})
    want = {0: (0.62, 0.42), 1: (0.72, 0.52), 2: (0.82, 0.62)}
    adapter = Adapter.for_model(model)
    for i, block in enumerate(adapter.blocks):
        record = result.blocks[i]
        attn, mlp = want[i]
        assert record["target"] == pytest.approx(0.5 + 0.1 * i, abs=1e-12)
        zeros = 0
        for name, lin in adapter.linears(block).items():
            rate = attn if name in LLAMA_ATTN else mlp
            assert record["layer_targets"][name] == pytest.approx(rate, abs=1e-12)
            z = int((lin.weight == 0).sum())
            assert z == math.floor(lin.weight.numel() * rate), name
            zeros += z
        assert record["zeros"] == zeros and record["params"] == A + M
        # parameter-weighted: the block's achieved sparsity is its rate, up to one weight per matrix of rounding
        assert abs(zeros / (A + M) - record["target"]) < 7 / (A + M)
        assert (A * attn + M * mlp) / (A + M) == pytest.approx(record["target"], abs=1e-12)
    assert result.spec["allocator_attn_offset"] == 0.2
    assert result.spec["allocator_attn_rates"] == pytest.approx([0.62, 0.72, 0.82], abs=1e-12)
    assert result.spec["allocator_mlp_params"] == [M] * 3


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offset_zero_is_plain_atp_bit_for_bit(method):
    base = tiny_model("llama", layers=3, seed=4)
    calib = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for options in (None, {"attn_offset": 0.0}):
        model = copy.deepcopy(base)
        runs.append((model, atprune.prune(model, method=method, sparsity=0.6, allocation="atp", beta=0.1, calib=calib,
                                          progress=False, allocation_options=options)))
    (a, ra), (b, rb) = runs
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    assert ra.spec == rb.spec and "layer_targets" not in rb.blocks[0]
    assert [r["layers"] for r in ra.blocks] == [r["layers"] for r in rb.blocks]


def test_legal_range_edges():
    rates, sizes = [0.5, 0.6, 0.7], [(A, M)] * 3
    # open ends: D < (1 - 0.7) / 0.6 = 0.5 (attention would reach 1), D > -(1 - 0.7) / 0.4 = -0.75 (MLP would)
    lo, hi, text = offset_interval(rates, sizes)
    assert (lo, hi) == pytest.approx((-0.75, 0.5)) and text == "(-0.75, 0.5)"
    for bad in (0.5, -0.75, 0.9):
        with pytest.raises(ConfigError, match=r"must be 0 or in \(-0\.75, 0\.5\)"):
            split_rates(rates, sizes, bad)
    for good in (0.5 - 1e-9, -0.75 + 1e-9, 0.0):
        assert all(0 <= r < 1 for pair in split_rates(rates, sizes, good) for r in pair)
    # closed ends: equal halves, block 0 at 0.2: the MLP may reach 0 at D = 0.2 / 0.5, attention 0 at D = -0.4
    rates, sizes = [0.2, 0.5], [(1, 1), (1, 1)]
    assert offset_interval(rates, sizes)[2] == "[-0.4, 0.4]"
    assert split_rates(rates, sizes, 0.4)[0] == (0.4, 0.0)
    with pytest.raises(ConfigError, match=r"\[-0\.4, 0\.4\]"):
        split_rates(rates, sizes, 0.4 + 1e-9)
    # a block rate of 0 (or 1) leaves only D = 0
    with pytest.raises(ConfigError, match="leaves only 0"):
        split_rates([0.0, 0.6], [(1, 1), (1, 1)], 0.01)


def test_bad_offsets_are_refused_before_any_data():
    with pytest.raises(ConfigError, match=r"must be in \(-1, 1\)"):
        atprune.plan("wanda", 0.6, 3, allocation="atp", beta=0.1, allocation_options={"attn_offset": 1.0})
    with pytest.raises(ConfigError, match="unstructured sparsity only"):
        atprune.plan("wanda", None, 3, allocation="atp", beta=0.0, pattern="4:8",
                     allocation_options={"attn_offset": 0.1})
    atprune.plan("wanda", None, 3, allocation="atp", beta=0.0, pattern="4:8", allocation_options={"attn_offset": 0.0})
    with pytest.raises(ConfigError, match="does not take options"):
        atprune.plan("wanda", 0.6, 3, allocation="owl", allocation_options={"attn_offset": 0.1})
    # on the model: no calibration data given, so a check after the data would fail on the data instead
    with pytest.raises(ConfigError, match=r"illegal attn_offset 0\.5 at sparsity 0\.6, beta 0\.1.*\(-0\.75, 0\.5\)"):
        atprune.prune(tiny_model("llama"), method="wanda", sparsity=0.6, allocation="atp", beta=0.1, progress=False,
                      allocation_options={"attn_offset": 0.5})


def test_cli_attn_offset_bad_value_is_one_line(tmp_path, capsys):
    from atprune.cli import main
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model", layers=3)
    capsys.readouterr()
    code = main(["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "0.6", "--allocation", "atp",
                 "--beta", "0.1", "--attn-offset", "0.5", "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "(-0.75, 0.5)" in err


def test_paths_with_one_rate_per_block_refuse_an_offset():
    from atprune.export.recipe import recipe_from_report
    from atprune.jobs.structured import plan_structured

    report = {"pruning": {"spec": {"method": "wanda", "rates": [0.5, 0.7], "allocator_attn_offset": 0.1}}}
    with pytest.raises(ConfigError, match="layer_targets"):
        recipe_from_report(report)
    with pytest.raises(ConfigError, match="unstructured pruning"):
        plan_structured("wanda-sp", "channels", 0.5, "atp", 0.0, {"attn_offset": 0.1}, 3)


def test_a_block_with_one_sublayer_adds_no_bound_to_the_offset():
    """A block with only MLP (or only attention) layers keeps s_i in every layer whatever D (module docstring of
    atprune.allocators.offset), so it must not narrow D's interval. By hand for block 0 (a = m, s = 0.4): attention
    0.4 + D/2 in [0, 1) gives D in [-0.8, 1.2), MLP 0.4 - D/2 in [0, 1) gives D in (-1.2, 0.8]: [-0.8, 0.8]."""
    for lonely in ((0, 100), (100, 0)):  # block 1: MLP only, then attention only, at s = 0.9
        rates, sizes = [0.4, 0.9], [(50, 50), lonely]
        lo, hi, text = offset_interval(rates, sizes)
        assert (lo, hi) == pytest.approx((-0.8, 0.8)) and text == "[-0.8, 0.8]", lonely
        for good in (0.8, 0.5, -0.8):  # every layer rate in [0, 1): accepted, and inside the interval given
            pairs = split_rates(rates, sizes, good)
            assert pairs[0] == pytest.approx((0.4 + good / 2, 0.4 - good / 2))
            assert lo <= good <= hi
        with pytest.raises(ConfigError, match=r"must be 0 or in \[-0\.8, 0\.8\]"):
            split_rates(rates, sizes, 0.85)
    # no block with both sublayers: no bound from the rates, only attn_offset's own (-1, 1)
    assert offset_interval([0.9], [(0, 100)]) == (-1.0, 1.0, "(-1, 1)")


def test_cli_structured_prune_refuses_an_offset_in_one_line(tmp_path, capsys):
    """``--structure`` prunes one rate per block: ``--attn-offset`` must be refused there, not dropped."""
    from atprune.cli import main
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model", layers=3)
    capsys.readouterr()
    code = main(["prune", "--model", str(model), "--structure", "channels", "--method", "wanda-sp", "--sparsity",
                 "0.25", "--allocation", "atp", "--beta", "0.01", "--attn-offset", "0.1", "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "attn_offset applies to unstructured pruning" in err, err


@pytest.mark.parametrize("method,quantize", [("sparsegpt", False), ("sparsegpt", True), ("wanda", True)])
def test_split_solves_with_an_offset_give_each_layer_its_own_rate(method, quantize):
    """block_pruner's ``share`` hook (split solves of a data-parallel run) with per-layer rates: a one-process
    stand-in for the ranks that solves a block's layers in reverse order, all before any is placed, must give the
    weights of the run without the hook bit for bit, and every layer the zeros of its own rate."""
    from atprune.engine.passes import collect_stats
    from atprune.quant import QuantSpec

    class Reversed:  # the data_parallel hooks of atprune.api.prune, one process
        def __init__(self):
            self.calls = 0

        def shard(self, windows, batch_size):
            return windows

        def collect(self, *args, **kw):
            return collect_stats(*args, **kw)

        def solve(self, index, linears, solve):
            self.calls += 1
            return {name: solve(name) for name in reversed(list(linears))}

        def finish(self, summary):
            pass

    base = tiny_model("llama", layers=3, seed=5).to(torch.float64)
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    kw = dict(method=method, sparsity=0.6, allocation="atp", beta=0.1, calib=calib, progress=False,
              allocation_options={"attn_offset": 0.2}, quantize=QuantSpec(bits=4, group_size=32) if quantize else None)
    plain, split, hooks = copy.deepcopy(base), copy.deepcopy(base), Reversed()
    want = atprune.prune(plain, **kw)
    got = atprune.prune(split, data_parallel=hooks, **kw)
    assert hooks.calls == 3  # every block's solves went through the hook
    for (name, a), (_, b) in zip(plain.named_parameters(), split.named_parameters()):
        assert torch.equal(a, b), name
    assert got.blocks == want.blocks
    attn = {0: 0.62, 1: 0.72, 2: 0.82}  # by hand as in test_hand_computed_layer_rates_and_zeros_counted_per_layer
    adapter = Adapter.for_model(split)
    for i, block in enumerate(adapter.blocks):
        for name, lin in adapter.linears(block).items():
            rate = got.blocks[i]["layer_targets"][name]
            assert rate == pytest.approx(attn[i] if name in LLAMA_ATTN else attn[i] - 0.2, abs=1e-12)
            rows, cols = lin.weight.shape
            # SparseGPT: int(numel * rate) zeros in its one column block (64 or 96 columns < 128); Wanda: per row
            pruned = int(rows * cols * rate) if method == "sparsegpt" else rows * int(cols * rate)
            zeros = int((lin.weight == 0).sum())
            assert zeros == pruned if not quantize else zeros >= pruned, (i, name)  # 4 bits may round to 0


def test_dsnot_refined_layers_keep_their_own_rate():
    """Wanda + DSnoT with an offset: DSnoT keeps every row's number of pruned weights (it swaps), so each layer
    ends with Wanda's ``rows * int(cols * rate)`` zeros at its own rate, the refined attention layers too."""
    model = tiny_model("llama", layers=3, seed=6)
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    result = atprune.prune(model, method="wanda", sparsity=0.6, allocation="atp", beta=0.1, calib=calib,
                           progress=False, refine="dsnot", allocation_options={"attn_offset": 0.2})
    attn = {0: 0.62, 1: 0.72, 2: 0.82}
    adapter = Adapter.for_model(model)
    for i, block in enumerate(adapter.blocks):
        for name, lin in adapter.linears(block).items():
            rate = result.blocks[i]["layer_targets"][name]
            assert rate == pytest.approx(attn[i] if name in LLAMA_ATTN else attn[i] - 0.2, abs=1e-12)
            rows, cols = lin.weight.shape
            assert int((lin.weight == 0).sum()) == rows * int(cols * rate), (i, name)
