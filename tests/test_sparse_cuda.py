"""The GPU tile layout (CPU tests, in CI) and the CUDA decode kernel (marked gpu: run on the H200, skipped without
CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atprune.errors import ConfigError
from atprune.sparse import cuda
from atprune.sparse.cuda import TiledWeight, check_tiles, pack_tiles, unpack_tiles



def on_gpu(test):
    """Mark a test gpu and skip it without CUDA (CI has no GPU; these run on the H200)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def _weight(rows: int, cols: int, sparsity: float, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows > 2:
        w[1] = 0  # an empty row
    return w


def _brute_force_layout(w: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """The layout exactly as the module doc words it, entry by entry: (bitmap words as uint32, values as int16
    bit patterns, tile offsets in 16-byte chunks)."""
    rows, cols = w.shape
    bits = w.view(torch.int16).tolist()
    tiles = -(-cols // 1024)
    words, values, offsets = [], [], [0]
    for r in range(rows):
        for t in range(tiles):
            tile_values = []
            for lane in range(32):
                word = 0
                for j in range(32):
                    col = 1024 * t + 32 * j + lane
                    if col < cols and bits[r][col] != 0:
                        word |= 1 << j
                        tile_values.append(bits[r][col])
                words.append(word)
            tile_values += [0] * (-len(tile_values) % 8)
            values += tile_values
            offsets.append(offsets[-1] + len(tile_values) // 8)
    return words, values, offsets


@pytest.mark.parametrize("rows,cols,sparsity", [(3, 100, 0.7), (2, 1024, 0.0), (4, 2100, 0.8), (1, 1, 1.0)])
def test_tile_layout_is_the_documented_one(rows, cols, sparsity):
    w = _weight(rows, cols, sparsity, seed=rows + cols)
    if rows * cols > 4:
        w[0, 3] = -0.0  # a stored negative zero: its bit pattern is not zero
    tiled = pack_tiles(w)
    words, values, offsets = _brute_force_layout(w)
    assert [x & 0xFFFFFFFF for x in tiled.bitmap.tolist()] == words
    assert tiled.tile_off.tolist() == offsets
    got = tiled.values.view(torch.int16).tolist()
    assert got[:len(values)] == values and not any(got[len(values):])
    check_tiles(tiled)
    assert torch.equal(unpack_tiles(tiled).view(torch.int16), w.view(torch.int16))


def test_tile_size_matches_the_formula():
    w = _weight(64, 3000, 0.7)
    tiled = pack_tiles(w)
    nnz = int((w != 0).sum())
    chunks = sum(-(-int((w[r, 1024 * t:1024 * (t + 1)] != 0).sum()) // 8) for r in range(64) for t in range(3))
    assert tiled.nnz == nnz
    assert tiled.nbytes == 64 * 3 * 32 * 4 + (chunks + 1) * 8 * 2 + (64 * 3 + 1) * 4


def test_check_tiles_refuses_a_corrupt_layout():
    tiled = pack_tiles(_weight(5, 1500, 0.6))
    off = tiled.tile_off.clone()
    off[3] += 1
    with pytest.raises(ConfigError, match="offsets do not match"):
        check_tiles(TiledWeight(tiled.bitmap, tiled.values, off, tiled.rows, tiled.cols))
    with pytest.raises(ConfigError, match="hold"):
        check_tiles(TiledWeight(tiled.bitmap, tiled.values[:8], tiled.tile_off, tiled.rows, tiled.cols))


@pytest.mark.parametrize("bad,match", [(torch.zeros(4, 4), "bfloat16 or float16"),
                                       (torch.zeros(2, 2, 2, dtype=torch.bfloat16), "2-D")])
def test_pack_tiles_bad_input(bad, match):
    with pytest.raises(ConfigError, match=match):
        pack_tiles(bad)


# ---- on the GPU -------------------------------------------------------------------------------------------------

def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """fp32 summation of 16-bit products plus the output's rounding to the dtype."""
    eps = 2.0 ** -8 if w.dtype == torch.bfloat16 else 2.0 ** -11
    return 1e-3 * eps + eps * ref.abs() + 64 * 2.0 ** -24 * F.linear(x.float().abs(), w.float().abs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# widths: one tile; a partial tile; several tiles with a partial last one, on the 128-bit x path (cols % 8 == 0)
# and off it; 11008 as in LLaMA-7B. split 0: chosen; 1: one tile per block (workspace); 2: double buffer at batch 16
@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 100), (64, 1024), (130, 2500), (130, 2504), (257, 4097),
                                       (64, 11008)])
@pytest.mark.parametrize("split", [0, 1, 2])
@on_gpu
def test_kernel_matches_fp32_reference(dtype, rows, cols, split):
    w = _weight(rows, cols, 0.7, dtype, seed=rows).cuda()
    tiled = pack_tiles(w)
    bias = torch.randn(rows, dtype=dtype, device="cuda")
    for batch in (1, 2, 3, 5, 8, 13, 16):
        x = torch.randn(batch, cols, device="cuda").to(dtype)
        for b in (None, bias):
            y = cuda.sparse_mm(x, tiled, b, tiles_per_split=split)
            ref = F.linear(x.float(), w.float(), None if b is None else b.float())
            assert y.dtype == dtype and y.shape == (batch, rows)
            assert bool(((y.float() - ref).abs() <= _bound(x, w, ref)).all()), (batch, b is None)
    # a 3-D input keeps its leading shape; an input not 16-byte aligned takes the scalar x path
    x3 = torch.randn(2, 3, cols, device="cuda").to(dtype)
    assert cuda.sparse_mm(x3, tiled).shape == (2, 3, rows)
    wide = torch.randn(1, cols + 1, device="cuda").to(dtype)
    x1 = wide[:, 1:]
    ref = F.linear(x1.float(), w.float())
    assert bool(((cuda.sparse_mm(x1, tiled).float() - ref).abs() <= _bound(x1, w, ref)).all())
    with pytest.raises(ValueError, match="columns"):
        cuda.sparse_mm(torch.zeros(1, cols + 1, device="cuda", dtype=dtype), tiled)


@on_gpu
def test_sparse_linear_moves_converts_and_reloads_on_gpu():
    from atprune.sparse import SparseLinear

    w = _weight(64, 3000, 0.7)
    bias = torch.randn(64).to(torch.bfloat16)
    layer = SparseLinear.from_dense(w, bias, kernel="torch")
    g = layer.to("cuda", torch.float16)
    assert g.tiles.values.dtype == torch.float16 and g.tiles.values.is_cuda
    assert g.values.dtype == torch.float16 and g.values.device.type == "cpu" and g.bias.dtype == torch.float16
    x = torch.randn(3, 3000, device="cuda").half()
    w16 = w.half().cuda()
    ref = F.linear(x.float(), w16.float(), bias.half().float().cuda())
    assert bool(((g(x).float() - ref).abs() <= _bound(x, w16, ref)).all())
    back = g.cpu()
    assert back.tiles is None and back.values.dtype == torch.float16 and back.bias.device.type == "cpu"
    assert torch.allclose(back(x.cpu()).float(), ref.cpu(), atol=0.05, rtol=0.01)
    # a state dict with other values at the same positions, loaded on the GPU, is what the layer then computes
    again = layer.to("cuda", torch.float16)
    double = SparseLinear.from_dense(w * 2, bias * 0, kernel="torch")
    again.load_state_dict(double.state_dict())
    ref2 = F.linear(x.float(), (w16 * 2).float())
    assert bool(((again(x).float() - ref2).abs() <= _bound(x, w16 * 2, ref2)).all())


@pytest.mark.parametrize("rows,cols", [(7, 100), (130, 2500)])
@on_gpu
def test_cuda_unpack_is_bit_exact(rows, cols):
    w = _weight(rows, cols, 0.7).cuda()
    w[0, 0] = -0.0
    tiled = pack_tiles(w)
    assert torch.equal(cuda.dense_from_tiles(tiled).view(torch.int16), w.view(torch.int16))


def _pruned_tiny_llama():
    from atprune.api import prune
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=3)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    prune(model, method="wanda", sparsity=0.7, calib=windows, progress=False)
    return model.to(torch.bfloat16)


@on_gpu
def test_sparse_model_on_gpu_equals_dense_pruned_model():
    import copy

    from atprune.sparse import SparseLinear, sparsify_for_inference

    dense = _pruned_tiny_llama().cuda()
    sparse = copy.deepcopy(dense).cpu()
    sparsify_for_inference(sparse, kernel="torch")
    sparse = sparse.cuda()
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.tiles is not None and m.tiles.values.is_cuda and m.values.device.type == "cpu"
                          for m in layers)
    ids = torch.randint(0, 128, (2, 24), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        for cut in (4, 24):  # 8 tokens: the decode kernel; 48 tokens: the dense (unpacked) path
            a, b = dense(ids[:, :cut]).logits.float(), sparse(ids[:, :cut]).logits.float()
            assert (a - b).abs().max() <= 0.05 * a.abs().max(), cut


@on_gpu
def test_cuda_graph_decode_equals_eager_decode():
    from transformers import StaticCache

    from atprune.sparse import sparsify_for_inference
    from atprune.sparse.bench_cuda import _cache_kwarg, _graph, rewind

    model = _pruned_tiny_llama()
    sparsify_for_inference(model, kernel="torch")
    model = model.cuda()
    # eager attention turns the mask into floats with a host-to-device copy, which no CUDA graph can capture
    model.set_attn_implementation("sdpa")
    key = _cache_kwarg(model)
    ids = torch.randint(0, 128, (2, 16), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    token = torch.randint(0, 128, (2, 1), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    results = []
    for graphed in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            model(input_ids=ids, cache_position=torch.arange(16, device="cuda"), use_cache=True, **{key: cache})
            pos = torch.tensor([16], device="cuda")
            out = {}

            def step():
                out["logits"] = model(input_ids=token, cache_position=pos, use_cache=True, **{key: cache}).logits

            if graphed:
                replay = _graph(step)  # its warm-up steps advance the cache
                rewind(cache, 16, pos)
                replay()
            else:
                step()
            results.append(out["logits"].float().clone())
    assert torch.allclose(results[0], results[1], atol=1e-2 * float(results[0].abs().max()), rtol=0)
