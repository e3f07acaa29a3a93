"""The bitmap + packed-values format: exact round trip, sizes and layout checked against a brute-force model."""

from __future__ import annotations

import pytest
import torch

from atprune.errors import ConfigError
from atprune.sparse import format as fm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_sparse(rows, cols, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return w.to(dtype)


def bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (9, 63), (13, 65), (4, 96), (17, 200), (64, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_round_trip_is_bit_exact(dtype, shape, sparsity):
    w = random_sparse(*shape, sparsity, dtype, seed=shape[0] * 1000 + shape[1])
    packed = fm.pack(w)
    fm.check_packed(packed)
    assert bits_equal(fm.unpack(packed), w)
    assert packed.nnz == int((w != 0).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_negative_zero_and_nan_survive(dtype):
    w = random_sparse(11, 45, 0.6, dtype)
    w[[0, 4, 10]] = 0  # empty rows, one of them the last (padded) group
    w[2, 3] = -0.0
    w[5, 44] = float("nan")
    packed = fm.pack(w)
    back = fm.unpack(packed)
    assert bits_equal(back, w)
    assert torch.signbit(back[2, 3]) and torch.isnan(back[5, 44])


def test_layout_matches_brute_force():
    """Bit and value positions, computed here element by element from the documented layout."""
    w = random_sparse(6, 70, 0.7, torch.float32, seed=3)
    packed = fm.pack(w)
    groups, chunks = (6 + 3) // 4, (70 + 31) // 32
    assert tuple(packed.bitmap.shape) == (groups, chunks * 16)
    expected_values = []
    for g in range(groups):
        assert int(packed.group_offsets[g]) == len(expected_values)
        for c in range(chunks):
            for q in range(4):
                word = int.from_bytes(bytes(packed.bitmap[g, 16 * c + 4 * q: 16 * c + 4 * q + 4].tolist()), "little")
                for b in range(32):
                    r, j = 4 * g + q, 32 * c + b
                    nonzero = r < 6 and j < 70 and float(w[r, j]) != 0
                    assert bool(word >> b & 1) == nonzero, (r, j)
                    if nonzero:
                        expected_values.append(float(w[r, j]))
    assert packed.values[:packed.nnz].tolist() == expected_values
    assert packed.values.numel() == packed.nnz + fm.PAD and not packed.values[packed.nnz:].any()


@pytest.mark.parametrize("dtype,per_weight", [(torch.bfloat16, 2 * 0.3 + 1 / 8), (torch.float32, 4 * 0.3 + 1 / 8)])
def test_size_is_about_values_plus_one_bit(dtype, per_weight):
    w = random_sparse(512, 1024, 0.7, dtype)
    packed = fm.pack(w)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    expected = packed.nnz * itemsize + 512 * 1024 / 8 + 8 * (512 // 4 + 1) + fm.PAD * itemsize
    assert packed.nbytes == expected
    assert packed.nbytes / w.numel() == pytest.approx(per_weight, rel=0.02)
    assert packed.dense_nbytes == w.numel() * itemsize


def test_all_zero_and_all_dense_layers():
    zero = torch.zeros(8, 40, dtype=torch.bfloat16)
    p = fm.pack(zero)
    assert p.nnz == 0 and p.sparsity == 1.0 and bits_equal(fm.unpack(p), zero)
    dense = torch.randn(8, 40).abs().add(0.1).to(torch.bfloat16)
    p = fm.pack(dense)
    assert p.nnz == 320 and p.sparsity == 0.0 and bits_equal(fm.unpack(p), dense)


def test_bad_input_is_one_line_config_error():
    with pytest.raises(ConfigError, match="2-D"):
        fm.pack(torch.zeros(3))
    with pytest.raises(ConfigError, match="float64"):
        fm.pack(torch.zeros(3, 3, dtype=torch.float64))


def test_check_packed_finds_corruption():
    packed = fm.pack(random_sparse(8, 64, 0.5, torch.float32))
    packed.group_offsets[1] += 1
    with pytest.raises(ConfigError, match="offsets"):
        fm.check_packed(packed)
    packed = fm.pack(random_sparse(5, 40, 0.5, torch.float32))
    packed.bitmap[1, 15] |= 0x80  # row 7 of a 5-row weight: padding
    with pytest.raises(ConfigError):
        fm.check_packed(packed)


def test_sparse_package_imports_only_errors_and_atomic_from_atprune():
    """atprune.sparse is its own room: nothing from the pruning engine (checked on the source, not at run time)."""
    import ast
    from pathlib import Path

    import atprune.sparse

    allowed = {"atprune.errors", "atprune.atomic"}
    for path in Path(atprune.sparse.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "atprune" or name.startswith("atprune."):
                    assert name in allowed or name.startswith("atprune.sparse"), f"{path.name} imports {name}"


def test_import_atprune_stays_light():
    import subprocess
    import sys

    code = ("import sys, atprune; assert 'atprune.sparse' not in sys.modules; "
            "assert callable(atprune.sparsify_for_inference) and callable(atprune.load_sparse)")
    subprocess.run([sys.executable, "-c", code], check=True)
