"""Pruners (magnitude, wanda, sparsegpt), sparsity patterns and the pruner registry."""

from __future__ import annotations

import math

import pytest
import torch

from atprune.errors import ConfigError
from atprune.pruners import PRUNERS, Pattern, check_sparsity, get_pruner
from atprune.pruners.sparsegpt import SparseGPTPruner, inverse_hessian_cholesky
from atprune.engine.stats import InputStats

ALL = ["magnitude", "wanda", "sparsegpt"]
SHAPES = [(48, 96), (96, 48)]


# ---------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_weight(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed)).to(dtype)


def correlated_inputs(tokens: int, width: int, seed: int = 1) -> torch.Tensor:
    """``X = (Z @ A) * scale``: correlated features with per-feature scales spread over ~e^{+-2}."""
    g = _gen(seed)
    z = torch.randn(tokens, width, generator=g)
    a = torch.randn(width, width, generator=g) / math.sqrt(width)
    scale = torch.exp(torch.randn(width, generator=g))
    return (z @ a) * scale


def stats_from(x: torch.Tensor, hessian: bool = True, batches: int = 3) -> InputStats:
    st = InputStats(x.shape[-1], hessian=hessian)
    for chunk in torch.tensor_split(x, batches, dim=0):
        st.add(chunk)
    assert st.ntokens == x.shape[0]
    return st


def prune(name: str, w: torch.Tensor, x: torch.Tensor | None, sparsity: float, pattern: Pattern, **opts):
    st = None if x is None else stats_from(x, hessian=(name == "sparsegpt"))
    if name == "magnitude":
        st = None  # magnitude ignores stats; prove it needs none
    return get_pruner(name, **opts).prune(w, st, sparsity, pattern)


def recon_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    """``||W X^T - W' X^T||_F`` in float64."""
    return torch.linalg.norm((w.double() - w_new.double()) @ x.double().T).item()


def assert_nm(out: torch.Tensor, n: int, m: int, exact: bool = True) -> None:
    rows, cols = out.shape
    nonzero = (out != 0).reshape(rows, cols // m, m).sum(-1)
    assert int(nonzero.max()) <= n, f"some group of {m} has more than {n} non-zeros"
    if exact:
        assert torch.all(nonzero == n), f"every group of {m} should have exactly {m - n} zeros"


# ---------------------------------------------------------------- Pattern / check_sparsity

@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4), (" 2:4 ", 2, 4)])
def test_pattern_parse_nm(text, n, m):
    p = Pattern.parse(text)
    assert (p.n, p.m) == (n, m)
    assert p.structured
    assert p.sparsity == pytest.approx(1 - n / m)
    assert str(p) == f"{n}:{m}"
    assert Pattern.parse(str(p)) == p


@pytest.mark.parametrize("text", ["unstructured", "UNSTRUCTURED", "none", ""])
def test_pattern_parse_unstructured(text):
    p = Pattern.parse(text)
    assert p == Pattern()
    assert not p.structured
    assert p.sparsity is None
    assert str(p) == "unstructured"


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "abc", "2:4:8", "2:", ":4", "-1:4", "2.0:4", "2:0"])
def test_pattern_parse_rejects(text):
    with pytest.raises(ConfigError):
        Pattern.parse(text)


def test_pattern_check_width():
    Pattern(2, 4).check_width(96)
    Pattern(4, 8).check_width(48)
    Pattern().check_width(7)  # unstructured: any width
    with pytest.raises(ConfigError, match="10"):
        Pattern(2, 4).check_width(10)
    with pytest.raises(ConfigError):
        Pattern(4, 8).check_width(12)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), float("inf"), -float("inf"), "0.5", None])
def test_check_sparsity_rejects(s):
    with pytest.raises(ConfigError):
        check_sparsity(s)


@pytest.mark.parametrize("s", [0, 0.0, 0.5, 0.99])
def test_check_sparsity_accepts(s):
    value = check_sparsity(s)
    assert type(value) is float and value == s


# ---------------------------------------------------------------- registry

def test_registered_pruners_give_the_hand_computed_masks():
    """Every registered name builds the pruner it claims to. ``W = [[1, -4, 2, 3], [0.5, 6, 7, 8]]`` at 50 % (four
    zeros): magnitude drops the four smallest |w| of the matrix (0.5, 1, 2, 3: one threshold per matrix); Wanda with
    input column norms [4, 1, 1, 1] scores |w| * norm = [[4, 4, 2, 3], [2, 6, 7, 8]] and drops the two lowest of each
    row; SparseGPT with X = I (a diagonal Hessian: no weight updates, saliency w^2 / [H^-1]_jj with equal
    diagonals, compared over the whole column block) drops what magnitude drops."""
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0], [0.5, 6.0, 7.0, 8.0]])
    x = torch.diag(torch.tensor([4.0, 1.0, 1.0, 1.0]))  # 4 tokens, column norms [4, 1, 1, 1]
    expected = {"magnitude": [[0.0, -4.0, 0.0, 0.0], [0.0, 6.0, 7.0, 8.0]],
                "wanda": [[1.0, -4.0, 0.0, 0.0], [0.0, 0.0, 7.0, 8.0]],
                "sparsegpt": [[0.0, -4.0, 0.0, 0.0], [0.0, 6.0, 7.0, 8.0]]}
    assert set(PRUNERS) == set(expected)
    for name, want in expected.items():
        pruner = get_pruner(name)
        inputs = torch.eye(4) if name == "sparsegpt" else x
        got = pruner.prune(w, stats_from(inputs, hessian=pruner.needs_hessian, batches=1), 0.5, Pattern())
        assert torch.allclose(got, torch.tensor(want), atol=1e-6), (name, got)
    sg = get_pruner("sparsegpt", percdamp=0.05, blocksize=64)
    assert isinstance(sg, SparseGPTPruner) and sg.percdamp == 0.05 and sg.blocksize == 64


@pytest.mark.parametrize("name", ALL)
def test_declared_needs_match_what_each_pruner_reads(name):
    """``needs_stats`` / ``needs_hessian`` decide what the engine collects: a pruner must work with exactly that."""
    pruner = get_pruner(name)
    w = rand_weight(8, 16)
    x = correlated_inputs(64, 16)
    if pruner.needs_stats:
        with pytest.raises(RuntimeError):
            pruner.prune(w, None, 0.5, Pattern())
    else:
        assert int((pruner.prune(w, None, 0.5, Pattern()) == 0).sum()) == 64
    if pruner.needs_hessian:
        with pytest.raises(RuntimeError, match="Hessian"):
            pruner.prune(w, stats_from(x, hessian=False), 0.5, Pattern())
    else:  # the norms alone suffice
        assert int((pruner.prune(w, stats_from(x, hessian=False), 0.5, Pattern()) == 0).sum()) == 64


@pytest.mark.parametrize("name", ["bogus", "Wanda", "", "sparse-gpt"])
def test_get_pruner_unknown_name_lists_known(name):
    with pytest.raises(ConfigError) as exc:
        get_pruner(name)
    msg = str(exc.value)
    for known in ALL:
        assert known in msg


def test_stats_required():
    w = rand_weight(4, 8)
    with pytest.raises(RuntimeError):
        get_pruner("wanda").prune(w, None, 0.5, Pattern())
    with pytest.raises(RuntimeError):
        get_pruner("sparsegpt").prune(w, None, 0.5, Pattern())
    with pytest.raises(RuntimeError):  # sparsegpt needs the Hessian, not just norms
        get_pruner("sparsegpt").prune(w, stats_from(torch.randn(20, 8), hessian=False), 0.5, Pattern())


# ---------------------------------------------------------------- achieved sparsity

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.7, 0.93])
def test_unstructured_sparsity_matches_target(name, shape, s):
    rows, cols = shape
    w = rand_weight(rows, cols, seed=3)
    x = correlated_inputs(160, cols, seed=4)
    out = prune(name, w, x, s, Pattern())
    zeros = int((out == 0).sum())
    target = s * w.numel()
    # within one weight per row of the target, never above it
    assert abs(zeros - target) <= rows
    assert zeros <= target + 1e-9
    if s == 0:
        assert zeros == 0
    if name == "magnitude":  # one count over the whole matrix
        assert abs(zeros - target) < 1
    if name == "wanda":  # floor(in * s) in every single row
        per_row = (out == 0).sum(1)
        assert torch.all((per_row - cols * s).abs() < 1)
    if name == "sparsegpt":  # one mask per column block (here a single block of <= 128 columns)
        assert abs(zeros - target) < 1


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_sparsegpt_multiblock_sparsity(s):
    rows, cols = 24, 96
    w = rand_weight(rows, cols, seed=5)
    x = correlated_inputs(200, cols, seed=6)
    out = prune("sparsegpt", w, x, s, Pattern(), blocksize=32)  # 3 blocks, each floors its own count
    zeros = int((out == 0).sum())
    assert 0 <= s * w.numel() - zeros < 3
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_sparsity_exact(name, shape, n, m):
    rows, cols = shape
    w = rand_weight(rows, cols, seed=7)
    x = correlated_inputs(160, cols, seed=8)
    # the unstructured sparsity argument is ignored for N:M
    out = prune(name, w, x, 0.9, Pattern(n, m))
    assert_nm(out, n, m, exact=True)
    assert int((out == 0).sum()) == rows * cols * (m - n) // m


@pytest.mark.parametrize("blocksize", [6, 16, 30, 32])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_with_small_blocks(blocksize, n, m):
    """N:M groups must stay aligned to the input dim whatever the block size."""
    w = rand_weight(16, 96, seed=9)
    x = correlated_inputs(160, 96, seed=10)
    out = prune("sparsegpt", w, x, 0.0, Pattern(n, m), blocksize=blocksize)
    assert_nm(out, n, m, exact=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_nm_width_not_divisible_raises(name):
    w = rand_weight(8, 10)
    x = correlated_inputs(40, 10)
    with pytest.raises(ConfigError):
        prune(name, w, x, 0.5, Pattern(2, 4))


# ---------------------------------------------------------------- shape / dtype / purity

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_shape_dtype_and_input_untouched(name, dtype, pattern):
    w = rand_weight(40, 64, seed=11, dtype=dtype)
    before = w.clone()
    x = correlated_inputs(128, 64, seed=12)
    x_before = x.clone()
    out = prune(name, w, x, 0.5, pattern)
    assert out.shape == w.shape
    assert out.dtype == dtype
    assert out.device == w.device
    assert out.data_ptr() != w.data_ptr()
    assert torch.equal(w, before), "input weight was modified"
    assert torch.equal(x, x_before)
    assert torch.isfinite(out.float()).all()
    assert abs(int((out == 0).sum()) - 0.5 * w.numel()) <= w.shape[0]
    if name in ("magnitude", "wanda"):  # no weight update: kept entries are the originals, bit for bit
        kept = out != 0
        assert torch.equal(out[kept], w[kept])


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_existing_zeros_count_as_pruned(name):
    w = rand_weight(20, 40, seed=13)
    w[torch.rand(20, 40, generator=_gen(14)) < 0.2] = 0.0  # ~20% already zero
    x = correlated_inputs(80, 40, seed=15)
    out = prune(name, w, x, 0.5, Pattern())
    if name == "magnitude":
        assert int((out == 0).sum()) == int(w.numel() * 0.5)
    else:
        assert torch.all((out == 0).sum(1) == int(40 * 0.5))
    assert torch.all(out[w == 0] == 0)


# ---------------------------------------------------------------- magnitude

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("s", [0.1, 0.5, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_single_threshold(shape, s, dtype):
    w = rand_weight(*shape, seed=16, dtype=dtype)
    out = get_pruner("magnitude").prune(w, None, s, Pattern())
    pruned = out == 0
    mag = w.float().abs()
    assert mag[~pruned].min() >= mag[pruned].max()
    # the threshold is global: per-row zero counts vary (a per-row rule would make them equal)
    per_row = pruned.sum(1)
    assert per_row.max() > per_row.min()


def test_magnitude_nm_keeps_largest_in_each_group():
    w = rand_weight(12, 32, seed=17)
    out = get_pruner("magnitude").prune(w, None, 0.0, Pattern(2, 4))
    g_w = w.abs().reshape(12, 8, 4)
    g_pruned = (out == 0).reshape(12, 8, 4)
    kept_min = g_w.masked_fill(g_pruned, float("inf")).min(-1).values
    pruned_max = g_w.masked_fill(~g_pruned, -float("inf")).max(-1).values
    assert torch.all(kept_min >= pruned_max)


# ---------------------------------------------------------------- wanda brute force

def _wanda_scores_reference(w: torch.Tensor, x: torch.Tensor) -> list[list[float]]:
    xd = x.double()
    col_norm = [math.sqrt(sum(float(v) ** 2 for v in xd[:, j])) for j in range(xd.shape[1])]
    return [[abs(float(w[i, j])) * col_norm[j] for j in range(w.shape[1])] for i in range(w.shape[0])]


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75, 0.9])
def test_wanda_matches_bruteforce_unstructured(s):
    rows, cols = 7, 20
    w = rand_weight(rows, cols, seed=18)
    x = correlated_inputs(30, cols, seed=19)
    st = InputStats(cols)
    st.add(x[:11])
    st.add(x[11:19].reshape(2, 4, cols))
    st.add(x[19:])
    out = get_pruner("wanda").prune(w, st, s, Pattern())
    scores = _wanda_scores_reference(w, x)
    k = math.floor(cols * s)
    for i in range(rows):
        expect = set(sorted(range(cols), key=lambda j: scores[i][j])[:k])
        got = {j for j in range(cols) if out[i, j] == 0}
        assert got == expect, f"row {i}"
    # the input norms matter: pure per-row magnitude would pick different weights here
    mag = {(i, j) for i in range(rows) for j in sorted(range(cols), key=lambda j: abs(float(w[i, j])))[:k]}
    wanda = {(i, j) for i in range(rows) for j in range(cols) if out[i, j] == 0}
    assert mag != wanda


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_wanda_matches_bruteforce_nm(n, m):
    rows, cols = 6, 24
    w = rand_weight(rows, cols, seed=20)
    x = correlated_inputs(25, cols, seed=21)
    st = InputStats(cols)
    st.add(x[:13])
    st.add(x[13:])
    out = get_pruner("wanda").prune(w, st, 0.0, Pattern(n, m))
    scores = _wanda_scores_reference(w, x)
    for i in range(rows):
        expect = set()
        for g0 in range(0, cols, m):
            expect |= set(sorted(range(g0, g0 + m), key=lambda j: scores[i][j])[: m - n])
        got = {j for j in range(cols) if out[i, j] == 0}
        assert got == expect, f"row {i}"


# ---------------------------------------------------------------- sparsegpt

@pytest.mark.parametrize("pattern,s", [(Pattern(), 0.5), (Pattern(2, 4), 0.0), (Pattern(), 0.7), (Pattern(4, 8), 0.0)])
@pytest.mark.parametrize("blocksize", [128, 16])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern, s, blocksize):
    rows, cols = 32, 64
    w = rand_weight(rows, cols, seed=22)
    x = correlated_inputs(512, cols, seed=23)
    out_sg = prune("sparsegpt", w, x, s, pattern, blocksize=blocksize)
    out_wanda = prune("wanda", w, x, s, pattern)
    out_mag = prune("magnitude", w, x, s, pattern)
    e_sg, e_wanda, e_mag = (recon_error(w, o, x) for o in (out_sg, out_wanda, out_mag))
    assert e_sg < e_wanda, (e_sg, e_wanda)
    assert e_sg < e_mag, (e_sg, e_mag)
    # the weight update itself helps: same mask without the update reconstructs worse
    mask_only = w.masked_fill(out_sg == 0, 0.0)
    assert e_sg < recon_error(w, mask_only, x)
    # and it did update kept weights
    kept = out_sg != 0
    assert not torch.allclose(out_sg[kept], w[kept])


def test_sparsegpt_zero_sparsity_is_identity():
    w = rand_weight(32, 64, seed=24)
    before = w.clone()
    x = correlated_inputs(256, 64, seed=25)
    out = prune("sparsegpt", w, x, 0.0, Pattern())
    torch.testing.assert_close(out, w, rtol=0, atol=1e-5)
    assert torch.equal(w, before)


def test_sparsegpt_dead_input_column():
    rows, cols = 16, 32
    w = rand_weight(rows, cols, seed=26)
    x = correlated_inputs(128, cols, seed=27)
    x[:, 5] = 0.0
    x[:, 17] = 0.0
    out = prune("sparsegpt", w, x, 0.5, Pattern())
    assert torch.isfinite(out).all()
    assert out.shape == w.shape
    # weights that never see input are removed; total count still within a row's worth of target
    assert torch.all(out[:, [5, 17]] == 0)
    assert abs(int((out == 0).sum()) - 0.5 * w.numel()) <= rows
    assert recon_error(w, out, x) < recon_error(w, prune("magnitude", w, x, 0.5, Pattern()), x)
    out_nm = prune("sparsegpt", w, x, 0.0, Pattern(2, 4))
    assert torch.isfinite(out_nm).all()
    assert_nm(out_nm, 2, 4, exact=False)


@pytest.mark.parametrize("pattern,s", [(Pattern(), 0.5), (Pattern(2, 4), 0.0)])
def test_sparsegpt_fewer_tokens_than_features(pattern, s):
    rows, cols = 16, 64
    w = rand_weight(rows, cols, seed=28)
    x = correlated_inputs(10, cols, seed=29)  # Hessian of rank 10 < 64
    out = prune("sparsegpt", w, x, s, pattern)
    assert torch.isfinite(out).all()
    if pattern.structured:
        assert_nm(out, 2, 4, exact=True)
    else:
        assert abs(int((out == 0).sum()) - 0.5 * w.numel()) <= rows
    assert recon_error(w, out, x) < recon_error(w, prune("magnitude", w, x, s, pattern), x)


def test_sparsegpt_all_zero_inputs_finite():
    w = rand_weight(8, 16, seed=30)
    out = prune("sparsegpt", w, torch.zeros(20, 16), 0.5, Pattern())
    assert torch.isfinite(out).all() and out.shape == w.shape


def test_inverse_hessian_cholesky_factor():
    x = correlated_inputs(200, 24, seed=31).double()
    h = (x.T @ x / 200).float()
    u, damp = inverse_hessian_cholesky(h.clone(), 0.01)
    assert damp == 0.01
    assert torch.equal(u, torch.triu(u))
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close((u.double().T @ u.double()), torch.linalg.inv(hd), rtol=1e-3, atol=1e-4)


def test_inverse_hessian_cholesky_retries_with_more_damping():
    # indefinite: Cholesky fails until damp * mean(diag) = damp * 2/3 exceeds 0.001, i.e. damp = 1e-2
    h = torch.diag(torch.tensor([1.0, 1.0, -0.001]))
    u, damp = inverse_hessian_cholesky(h, 1e-4)
    assert damp == pytest.approx(1e-2)
    assert torch.isfinite(u).all()
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_hessian_cholesky(torch.diag(torch.tensor([1.0, 1.0, -100.0])), 1e-4, max_tries=2)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("row_chunk", [None, 5])
def test_sparsegpt_batched_solve_equals_column_loop(s, row_chunk):
    """The batched triangular solve gives the published column-by-column loop's result for the same mask
    (float64, so the comparison is not blurred by rounding), row chunks included."""
    from atprune.pruners.sparsegpt import _block_columns, _block_solve, _unstructured_mask

    rows, b = 23, 48
    w1 = rand_weight(rows, b, seed=40).double()
    x = correlated_inputs(300, b, seed=41).double()
    upper, _ = inverse_hessian_cholesky(x.T @ x / 300, 0.01)
    mask = _unstructured_mask(w1, torch.diag(upper), s)
    q_loop, e_loop, m_loop = _block_columns(w1, upper, Pattern(), mask)
    q_fast, e_fast, m_fast = _block_solve(w1, upper, s, row_chunk)
    assert torch.equal(m_fast, mask) and torch.equal(m_loop, mask)
    torch.testing.assert_close(e_fast, e_loop, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q_fast, q_loop, rtol=1e-10, atol=1e-10)
    assert torch.all(q_fast[mask] == 0) and int(mask.sum()) == int(rows * b * s)


def test_sparsegpt_layer_error_no_worse_than_column_loop():
    """Whole layer in float32 (several 128-column blocks): same masks as the loop, same reconstruction error
    within 0.1 %."""
    rows, cols = 64, 320
    w = rand_weight(rows, cols, seed=42)
    x = correlated_inputs(1024, cols, seed=43)
    fast = prune("sparsegpt", w, x, 0.6, Pattern(), column_loop=False)
    loop = prune("sparsegpt", w, x, 0.6, Pattern(), column_loop=True)
    assert torch.equal(fast == 0, loop == 0)
    e_fast, e_loop = recon_error(w, fast, x), recon_error(w, loop, x)
    assert e_fast <= e_loop * 1.001, (e_fast, e_loop)


def test_inverse_hessian_cholesky_overwrite_gives_the_same_factor():
    x = correlated_inputs(200, 24, seed=44)
    h = x.T @ x / 200
    ref, _ = inverse_hessian_cholesky(h, 0.01)
    work = h.clone()
    got, damp = inverse_hessian_cholesky(work, 0.01, overwrite=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(work, h)  # its storage was used
    # and the retry path adds damping incrementally in place
    bad = torch.diag(torch.tensor([1.0, 1.0, -0.001]))
    u, damp = inverse_hessian_cholesky(bad.clone(), 1e-4, overwrite=True)
    assert damp == pytest.approx(1e-2)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(bad + 1e-2 * (2 - 0.001) / 3 * torch.eye(3)), rtol=1e-4, atol=1e-5)


def test_sparsegpt_factors_a_shared_hessian_once():
    w = rand_weight(16, 32, seed=45)
    st = stats_from(correlated_inputs(256, 32, seed=46))
    pruner = get_pruner("sparsegpt")
    a = pruner.prune(w, st, 0.5, Pattern())
    assert len(st.cache) == 1
    upper = next(iter(st.cache.values()))[0]
    b = pruner.prune(w, st, 0.5, Pattern())
    assert next(iter(st.cache.values()))[0] is upper and torch.equal(a, b)
    fresh = get_pruner("sparsegpt").prune(w, stats_from(correlated_inputs(256, 32, seed=46)), 0.5, Pattern())
    assert torch.equal(a, fresh)
