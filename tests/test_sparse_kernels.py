"""Every kernel path this CPU can run against a float64 reference matmul; kernel choice and its errors.

Paths the CPU cannot run are skipped with the reason (never passed silently). No timing here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from atprune.errors import ConfigError
from atprune.sparse import SparseLinear, kernels, pack
from atprune.sparse.kernels import KERNEL_IDS
from tests.conftest import IN_CI

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SHAPES = [(1, 1), (5, 31), (7, 33), (13, 64), (4, 100), (37, 257), (64, 512)]


def need(kernel):
    """Skip a path this CPU lacks the instructions for; a kernel that failed to build is a failure in CI (CI=true),
    so a broken extension cannot pass as 'skipped'."""
    reason = kernels.skip_reason(kernel)
    if reason:
        if IN_CI and "does not have" not in reason:
            pytest.fail(f"the sparse kernels must build in CI: {reason}")
        pytest.skip(reason)


def case(rows, cols, dtype, tokens, sparsity=0.7, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed + 7 * rows + cols + tokens)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    x = torch.randn(tokens, cols, generator=g).to(dtype)
    b = torch.randn(rows, generator=g).to(dtype) if bias else None
    return w.to(dtype), x, b


def reference(w, x, b):
    """float64 ``x W^T + b`` and the bound on fp32-accumulation plus output-rounding error."""
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    mag = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    return ref, EPS[w.dtype] * ref.abs() + 4 * (w.shape[1] + 2) * 2.0 ** -24 * mag + 1e-30


def assert_close(y, w, x, b):
    ref, tol = reference(w, x, b)
    assert y.dtype == w.dtype and tuple(y.shape) == tuple(ref.shape)
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("kernel", ["avx512", "avx512-expand", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_sparse_kernel_matches_float64(kernel, dtype, tokens):
    """avx512 decodes with the popcount permutation by default; avx512-expand is its vpexpand variant."""
    kernel, _, decode = kernel.partition("-")
    need(kernel)
    ext = kernels.extension()
    ext.set_decode(decode or "permute")
    try:
        for rows, cols in SHAPES:
            for sparsity in (0.0, 0.7, 1.0):
                w, x, b = case(rows, cols, dtype, tokens, sparsity)
                p = pack(w)
                y = ext.sparse_mm(x, p.bitmap, p.values, p.group_offsets, rows, b, KERNEL_IDS[kernel])
                assert_close(y, w, x, b)
    finally:
        ext.set_decode("permute")


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_dense_kernel_matches_float64(kernel, dtype, tokens):
    """The hand-written dense kernel (the benchmark's own baseline) is right too."""
    need(kernel)
    ext = kernels.extension()
    for rows, cols in SHAPES:
        w, x, b = case(rows, cols, dtype, tokens, 0.0)
        assert_close(ext.dense_mm(x, w, b, KERNEL_IDS[kernel]), w, x, b)


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "scalar", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_forward_all_paths(kernel, dtype):
    """Decode-sized calls use the kernel, longer ones the dense fallback; shapes [..., in] are kept."""
    need(kernel)
    w, _, b = case(45, 130, dtype, 1)
    layer = SparseLinear(pack(w), b, kernel=kernel, max_sparse_tokens=8)
    assert layer.kernel == kernel
    for lead in [(1,), (2, 3), (1, 8), (3, 7)]:  # 1, 6, 8 tokens: kernel; 21 tokens: dense fallback
        x = torch.randn(*lead, 130).to(dtype)
        y = layer(x)
        assert tuple(y.shape) == (*lead, 45)
        assert_close(y.reshape(-1, 45), w, x.reshape(-1, 130), b)


@pytest.mark.parametrize("kernel", ["avx512", "scalar"])
def test_unpack_kernel_is_bit_exact(kernel):
    need(kernel)
    for dtype in DTYPES:
        for rows, cols in [(37, 257), (4, 32), (5, 1), (9, 64)]:
            w, _, _ = case(rows, cols, dtype, 1)
            w[0, 0] = -0.0
            p = pack(w)
            into = torch.full((rows * cols,), 7, dtype=dtype)  # a reused buffer holding garbage
            for out in (None, into):
                got = kernels.extension().unpack(p.bitmap, p.values, p.group_offsets, rows, cols, KERNEL_IDS[kernel], out)
                assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   w.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_available_kernels_follow_cpu_flags():
    """The extension's run-time answer agrees with the flags the kernel reads, as /proc/cpuinfo lists them."""
    need("scalar")
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags line")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2", "avx512_bf16", "avx512_bitalg",
              "avx512_vpopcntdq"} <= flags
    avx2 = {"avx2", "fma", "popcnt"} <= flags
    got = kernels.cpu_kernels()
    assert ("avx512" in got) == avx512 and ("avx2" in got) == avx2 and "scalar" in got and got[-1] == "torch"


def test_unknown_or_unrunnable_kernel_is_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown kernel"):
        kernels.resolve_kernel("avx1024")

    class OnlyScalar:
        @staticmethod
        def cpu_kernels():
            return ["scalar"]

    monkeypatch.setattr(kernels, "extension", lambda: OnlyScalar)
    with pytest.raises(ConfigError, match="needs AVX-512") as err:
        kernels.resolve_kernel("avx512")
    assert "\n" not in str(err.value)
    assert kernels.resolve_kernel("auto") == "scalar"


def test_failed_build_falls_back_to_torch_with_a_warning(monkeypatch):
    def fail():
        raise kernels.KernelUnavailable("compiling sparse_cpu.cpp with c++ failed: error: boom")

    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "_build", fail)
    monkeypatch.setattr(kernels, "_warned", set())
    with pytest.warns(RuntimeWarning, match="boom"):
        assert kernels.resolve_kernel("auto") == "torch"
    with pytest.raises(ConfigError, match="boom"):
        kernels.resolve_kernel("avx2")
    w, x, b = case(9, 40, torch.float32, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = SparseLinear(pack(w), b)
    assert layer.kernel == "torch"
    assert_close(layer(x), w, x, b)


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-cxx-compiler")
    with pytest.raises(kernels.KernelUnavailable, match="no-such-cxx-compiler"):
        kernels._build()


def test_cache_key_follows_the_source(monkeypatch, tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int a;")
    monkeypatch.setattr(kernels, "SOURCE", src)
    first = kernels.source_hash()
    src.write_text("int b;")
    assert kernels.source_hash() != first
    monkeypatch.setenv("ATPRUNE_CACHE_DIR", str(tmp_path / "c"))
    assert kernels.cache_dir() == tmp_path / "c"


def test_sparse_linear_refuses_a_packed_weight_the_kernels_would_overread():
    from atprune.sparse.format import PackedWeight

    w = torch.randn(8, 40)
    w[torch.rand(8, 40) < 0.7] = 0
    good = pack(w)
    truncated = PackedWeight(good.bitmap, good.values[:-70].clone(), good.group_offsets, good.rows, good.cols)
    with pytest.raises(ConfigError, match="values must be 1-D"):
        SparseLinear(truncated)
    shifted = PackedWeight(good.bitmap, good.values, good.group_offsets + 10**9, good.rows, good.cols)
    with pytest.raises(ConfigError, match="offsets"):
        SparseLinear(shifted)
