"""The quantizers: grid values by hand, grid membership, masks kept, GPTQ against a direct least-squares reference
and against round-to-nearest, SparseGPT's joint mode, the ATP bit schedule, and the option checks."""

from __future__ import annotations

import pytest
import torch

from atprune.errors import ConfigError
from atprune.pruners import Pattern
from atprune.pruners.sparsegpt import inverse_hessian_cholesky
from atprune.quant import atp_bits, check_group_widths, make_spec, mean_bits
from atprune.quant.gptq import gptq_quantize
from atprune.quant.grid import find_params, quantize
from atprune.quant.rtn import rtn_quantize


def _layer(rows=16, cols=64, n=512, seed=0):
    """A random layer and correlated inputs (as real activations are): ``W [rows, cols]``, ``X [n, cols]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    return w, x


def _factor(x, percdamp=0.01):
    h = x.t() @ x / x.shape[0]
    upper, _ = inverse_hessian_cholesky(h, percdamp)
    return h, upper, torch.zeros(h.shape[0], dtype=torch.bool)


def _output_error(x, target, q):
    return float(((x @ (target - q).t()) ** 2).sum())


def test_grid_by_hand():
    x = torch.tensor([[-1.0, 0.5, 0.2, 3.0]])
    # asymmetric 2 bits: range [-1, 3], scale 4/3, zero round(0.75) = 1; codes 0, 1, 1, 3
    scale, zero = find_params(x, 2, symmetric=False)
    assert scale.item() == pytest.approx(4 / 3) and zero.item() == 1
    assert torch.allclose(quantize(x, scale[:, None], zero[:, None], 2), torch.tensor([[-4 / 3, 0, 0, 8 / 3]]))
    # symmetric 2 bits: range [-3, 3], scale 2, zero 2; -0.5 rounds to 0, 1.5 to 2 -> code 4 clamped to 3
    scale, zero = find_params(x, 2, symmetric=True)
    assert scale.item() == 2.0 and zero.item() == 2
    assert torch.equal(quantize(x, scale[:, None], zero[:, None], 2), torch.tensor([[0.0, 0, 0, 2]]))
    # an all-zero group gets the range [-1, 1] (scale 2/15; 1 / float32(2/15) = 7.4999996 rounds to 7) and stays 0
    scale, zero = find_params(torch.zeros(1, 4), 4, symmetric=False)
    assert scale.item() == pytest.approx(2 / 15, rel=1e-6) and zero.item() == 7
    assert torch.equal(quantize(torch.zeros(1, 4), scale[:, None], zero[:, None], 4), torch.zeros(1, 4))


def _assert_on_grid(q, grid, cols):
    """Every value is ``(k - zero) * scale`` for an integer code k in [0, 2^bits - 1] of its row and group."""
    width = grid.group_size or cols
    for c in range(0, cols, width):
        g = c // width
        scale, zero = grid.scale[:, g:g + 1], grid.zero[:, g:g + 1]
        k = q[:, c:c + width].double() / scale.double() + zero.double()
        assert torch.allclose(k, k.round(), atol=1e-4), "value off its group's grid"
        assert k.round().min() >= 0 and k.round().max() <= 2 ** grid.bits - 1
        assert len(torch.unique(q[:, c:c + width][0])) <= 2 ** grid.bits


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("bits,group,sym", [(4, 16, True), (3, 32, False), (8, None, True), (2, None, False)])
def test_quantized_weights_lie_on_their_group_grid_and_keep_the_mask(method, bits, group, sym):
    w, x = _layer()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    w = w.masked_fill(mask, 0.0)
    if method == "gptq":
        _, upper, dead = _factor(x)
        q, grid = gptq_quantize(w, upper, dead, bits, group, sym)
    else:
        q, grid = rtn_quantize(w, bits, group, sym)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.all(q[mask] == 0)  # pruned weights stay exactly 0
    assert grid.scale.shape == (w.shape[0], w.shape[1] // (group or w.shape[1]))
    _assert_on_grid(q, grid, w.shape[1])
    if method == "rtn":  # RTN: the grid of each group is the min-max grid of the weights themselves
        width = group or w.shape[1]
        for c in range(0, w.shape[1], width):
            xmin = w[:, c:c + width].min(1).values.clamp(max=0)
            xmax = w[:, c:c + width].max(1).values.clamp(min=0)
            if sym:
                xmax = torch.maximum(xmax, -xmin)
                xmin = -xmax
            assert torch.allclose(grid.scale[:, c // width], (xmax - xmin) / (2 ** bits - 1))


def _reference_gptq(w, h, upper, bits, sym, mask):
    """GPTQ as a sequence of exact least-squares problems: column j is rounded after the columns < j were fixed and
    every later column took its optimal value ``W_R + (W_F - Q_F) H_FR H_RR^-1`` (H damped as GPTQ damps it).
    Per-channel grid from the weights before the walk. Float64, no Cholesky trick."""
    w, h = w.double(), h.double()
    cols = w.shape[1]
    damp = 0.01 * torch.diag(h).mean()
    h = h + damp * torch.eye(cols, dtype=h.dtype)
    scale, zero = find_params(w.float(), bits, sym)
    scale, zero = scale.double()[:, None], zero.double()[:, None]
    q = torch.zeros_like(w)
    for j in range(cols):
        f, r = slice(0, j), slice(j, cols)
        cur = w[:, r] + (w[:, f] - q[:, f]) @ h[f, r] @ torch.linalg.inv(h[r, r]) if j else w.clone()
        col = cur[:, 0:1]
        qj = (torch.clamp(torch.round(col / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        q[:, j] = torch.where(mask[:, j], 0.0, qj[:, 0])
    return q


@pytest.mark.parametrize("masked", [False, True])
def test_gptq_matches_the_least_squares_definition(masked):
    w, x = _layer(rows=6, cols=24, n=256, seed=3)
    mask = (torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.4) if masked else (w != w)
    w = w.masked_fill(mask, 0.0)
    h, upper, dead = _factor(x)
    got, _ = gptq_quantize(w, upper, dead, 3, None, False, blocksize=8)  # several lazy blocks
    ref = _reference_gptq(w, h, upper, 3, False, mask)
    assert torch.allclose(got.double(), ref, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(4, 16), (3, None), (2, 32)])
def test_gptq_reconstructs_the_layer_better_than_round_to_nearest(bits, group):
    w, x = _layer()
    _, upper, dead = _factor(x)
    # dense, and after a magnitude mask (the pruned weights cannot absorb any error: a smaller gain); the exact
    # value of the walk is checked by test_gptq_matches_the_least_squares_definition
    for w_in in (w, w.masked_fill(w.abs() < w.abs().median(), 0.0)):
        g, _ = gptq_quantize(w_in, upper, dead, bits, group, True)
        r, _ = rtn_quantize(w_in, bits, group, True)
        assert _output_error(x, w_in, g) < _output_error(x, w_in, r)


def test_joint_sparsegpt_quantization_prunes_per_block_like_sparsegpt():
    from atprune.engine.stats import InputStats
    from atprune.pruners.sparsegpt import SparseGPTPruner

    w, x = _layer(rows=16, cols=64)
    _, upper, dead = _factor(x)
    stats = InputStats(64, hessian=True)
    stats.add(x)
    pruned = SparseGPTPruner(blocksize=32).prune(w, stats, 0.5, Pattern())
    for bits in (4, 8):
        q, grid = gptq_quantize(w, upper, dead, bits, 16, True, blocksize=32, sparsity=0.5)
        for c in (0, 32):  # SparseGPT's unstructured mask: half of each block's weights (a kept one may round to 0)
            assert int((q[:, c:c + 32] == 0).sum()) >= 16 * 32 // 2
        _assert_on_grid(q, grid, 64)
    # at 8 bits the quantization barely moves anything: the joint walk is SparseGPT's (same mask, same error)
    assert float(((q == 0) == (pruned == 0)).float().mean()) > 0.95
    assert _output_error(x, w, q) == pytest.approx(_output_error(x, w, pruned), rel=0.01)
    nm, _ = gptq_quantize(w, upper, dead, 4, 16, True, pattern=Pattern(2, 4))
    assert torch.all((nm.reshape(16, 16, 4) != 0).sum(-1) <= 2)  # 2:4 jointly


def test_atp_bits_by_hand_and_mean():
    # 4 equal blocks, mean 3, step 1: targets 4.5 3.5 2.5 1.5 -> floors 4 3 2 2 (sum 11); budget 1 -> block 1 up
    assert atp_bits(3.0, 1.0, [1, 1, 1, 1]) == [4, 4, 2, 2]
    sizes = [7] * 30
    for mean in (3.0, 4.0):
        for step in (0.0, 0.05, 0.15):
            b = atp_bits(mean, step, sizes)
            assert sum(b) == mean * 30  # the requested mean, exactly
            assert all(x >= y for x, y in zip(b, b[1:]))  # more bits on the input side
    assert atp_bits(4.0, 0.0, sizes) == [4] * 30
    b = atp_bits(3.5, 0.2, [3, 1, 2, 5, 4])  # unequal blocks: never above the budget
    assert mean_bits(b, [3, 1, 2, 5, 4]) <= 3.5 and set(b) <= {2, 3, 4, 8}


def test_bad_options_are_one_line_errors():
    for kwargs, text in [({"quantize": "w9"}, "wN"), ({"quantize": "int4"}, "wN"), ({"quantize": "w1"}, "wN"),
                         ({"quantize": "w4", "group_size": -5}, "group-size"),
                         ({"quantize": "w4", "method": "awq"}, "gptq"),
                         ({"quantize": "w4", "bits_allocation": "atp", "bits_mean": 9}, "outside"),
                         ({"quantize": "w4", "bits_mean": 3.0}, "atp only"),
                         ({"quantize": None, "bits_allocation": "atp"}, "need --quantize")]:
        with pytest.raises(ConfigError, match=text) as err:
            make_spec(**kwargs)
        assert "\n" not in str(err.value)
    spec = make_spec("w4", group_size=128)
    with pytest.raises(ConfigError, match="does not divide the input width 576"):
        check_group_widths({"block 0 q_proj": 576}, spec)
    check_group_widths({"a": 576}, make_spec("w4", group_size=64))
    assert make_spec("w8", group_size=0).group_size is None


def test_size_report_by_hand():
    from atprune.quant.sizes import size_report

    # 2 x 64, half non-zero, 4 bits, groups of 32 (4 scales of 16 bits): packed (512 + 64) / 128 = 4.5 bits per
    # weight; bitmap + codes (128 + 64 * 4 + 64) / 128 = 3.5; asymmetric adds a 4-bit zero point per group
    m = {"rows": 2, "cols": 64, "nonzeros": 64, "bits": 4, "group_size": 32, "symmetric": True}
    per = size_report([m], 16)["bits_per_weight"]
    assert per == {"dequantized": 16.0, "packed": 4.5, "sparse_packed": 3.5}
    per = size_report([m | {"symmetric": False}], 32)["bits_per_weight"]
    assert per["packed"] == (512 + 4 * 36) / 128


def test_joint_sparsegpt_quantization_keeps_each_blocks_n_m():
    """Mixed N:M with SparseGPT + GPTQ in one pass: every block reaches its own N (not the run's 4:8)."""
    import atprune
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=4)
    calib = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = make_spec("w8", group_size=0)
    result = atprune.prune(model, None, method="sparsegpt", sparsity=None, pattern="4:8", allocation="atp", beta=0.1,
                           calib=calib, progress=False, quantize=spec)
    assert result.spec["block_n"] == [5, 4, 4, 3]
    for n, block in zip(result.spec["block_n"], model.model.layers):
        groups = (block.mlp.up_proj.weight != 0).reshape(block.mlp.up_proj.weight.shape[0], -1, 8).sum(-1)
        assert bool((groups <= n).all()) and float(groups.float().mean()) > n - 0.5, n
