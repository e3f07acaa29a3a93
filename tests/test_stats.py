"""InputStats: running sums of a Linear layer's calibration inputs."""

from __future__ import annotations

import pytest
import torch

from atprune.engine.stats import InputStats


def _x(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, width, dtype=torch.float64)


def test_sq_norm_and_col_norm_match_direct_computation():
    x = _x(37, 11, 0)
    st = InputStats(11)
    st.add(x.float())
    expected = (x**2).sum(0)
    assert st.sq_norm.dtype == torch.float32
    torch.testing.assert_close(st.sq_norm.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.col_norm().double(), expected.sqrt(), rtol=1e-5, atol=1e-6)
    assert st.ntokens == 37
    assert st.xtx is None  # not requested


def test_hessian_is_xtx_over_ntokens():
    x = _x(50, 9, 1)
    st = InputStats(9, hessian=True)
    st.add(x.float())
    expected = x.T @ x / 50
    h = st.hessian()
    assert h.shape == (9, 9) and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)
    # unnormalised sum is kept too
    torch.testing.assert_close(st.xtx.double(), x.T @ x, rtol=1e-5, atol=1e-4)


def test_ntokens_counts_rows_over_leading_dims():
    st = InputStats(6, hessian=True)
    st.add(torch.randn(3, 5, 6))  # 15 tokens
    st.add(torch.randn(4, 6))  # 4 tokens
    st.add(torch.randn(2, 1, 2, 6))  # 4 tokens
    assert st.ntokens == 23


def test_batched_accumulation_equals_one_big_batch():
    x = _x(120, 16, 2).float()
    one = InputStats(16, hessian=True)
    one.add(x)
    many = InputStats(16, hessian=True)
    for chunk in (x[:7], x[7:50].reshape(43, 1, 16), x[50:51], x[51:].reshape(23, 3, 16)):
        many.add(chunk)
    assert many.ntokens == one.ntokens == 120
    torch.testing.assert_close(many.sq_norm, one.sq_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.hessian(), one.hessian(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.col_norm(), one.col_norm(), rtol=1e-5, atol=1e-5)


def test_low_precision_input_is_accumulated_in_float32():
    x = _x(64, 8, 3).to(torch.bfloat16)
    st = InputStats(8, hessian=True)
    st.add(x)
    xf = x.double()
    assert st.sq_norm.dtype == torch.float32 and st.xtx.dtype == torch.float32
    torch.testing.assert_close(st.sq_norm.double(), (xf**2).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.hessian().double(), xf.T @ xf / 64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norms_without_hessian_match_float64(dtype):
    # the 16-bit path without a Hessian reduces the input directly with float32 accumulation (no float32 copy)
    x = (_x(4096, 16, 4) * 3).to(dtype)
    st = InputStats(16)
    st.add(x[:1000])
    st.add(x[1000:])
    ref = (x.double() ** 2).sum(0)
    assert st.sq_norm.dtype == torch.float32 and st.ntokens == 4096
    assert ((st.sq_norm.double() - ref) / ref).abs().max().item() < 2e-5


def test_input_is_not_modified():
    x = torch.randn(10, 4)
    before = x.clone()
    st = InputStats(4, hessian=True)
    st.add(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(10, 5), (10, 7), (2, 3, 5), (6, 1)])
def test_wrong_width_raises_value_error(shape):
    st = InputStats(6)
    with pytest.raises(ValueError, match="6"):
        st.add(torch.randn(*shape))
    assert st.ntokens == 0 and st.sq_norm is None


def test_accessors_without_data_raise():
    st = InputStats(4)
    with pytest.raises(RuntimeError):
        st.col_norm()
    with pytest.raises(RuntimeError):
        st.hessian()
    st.add(torch.randn(3, 4))
    with pytest.raises(RuntimeError):  # Hessian not requested
        st.hessian()


def test_hessian_release_hands_over_the_accumulator():
    x = torch.randn(50, 6, dtype=torch.float64).float()
    st = InputStats(6, hessian=True)
    st.add(x)
    copy = st.hessian()
    released = st.hessian(release=True)
    torch.testing.assert_close(released, copy)
    torch.testing.assert_close(copy, x.T @ x / 50, rtol=1e-5, atol=1e-6)
    assert st.xtx is None
    with pytest.raises(RuntimeError, match="already released"):
        st.hessian()
