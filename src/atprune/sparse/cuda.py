"""The GPU layout of a sparse weight ("tiles") and the CUDA decode kernel (``csrc/sparse_cuda.cu``).

The CPU layout (:mod:`atprune.sparse.format`) interleaves four rows so that one CPU thread streams them; a GPU
wants one warp per row and 128-bit coalesced loads, so on CUDA a weight is repacked, from the same checkpoint, into

* ``bitmap``: int32 ``[rows * tiles * 32]``, ``tiles = ceil(cols / 1024)``: word ``(r, t, l)`` has bit ``j`` set iff
  ``W[r, 1024 t + 32 j + l]`` is stored (lane ``l`` of a warp owns the interleaved columns ``32 j + l``, so the
  lanes' reads of ``x`` in shared memory fall in 32 different banks);
* ``values``: the weight's dtype, the stored entries tile by tile (row-major over ``(r, t)``), within a tile lane by
  lane and within a lane in ``j`` order, each tile padded with zeros to a multiple of 8 entries (16 bytes);
* ``tile_off``: int32 ``[rows * tiles + 1]``: the first 16-byte chunk of each tile (the last entry: all chunks).

Size: ``2 nnz + 7 * rows * tiles (average padding) + 128 rows tiles + 4 rows tiles`` bytes for 16-bit values, about
``2(1 - s) + 0.136`` bytes per weight (0.736 at 70 %: 2.72x less than dense bf16).

:func:`pack_tiles` and :func:`unpack_tiles` are plain torch (any device: the layout is tested on the CPU);
:func:`sparse_mm` and :func:`dense_from_tiles` run the CUDA kernels, compiled with ``torch.utils.cpp_extension`` at
first use into ``$ATPRUNE_CACHE_DIR/sparse-cuda/<hash>`` (nvcc and ninja must be on the GPU machine).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from atprune.errors import ConfigError
from atprune.sparse.kernels import KernelUnavailable, _ninja_on_path, cache_dir

SOURCE = Path(__file__).with_name("csrc") / "sparse_cuda.cu"
TILE = 1024
DTYPES = (torch.bfloat16, torch.float16)
MAX_TOKENS = 16  # the kernel's largest batch (rows of x per call)
# Shared memory a block gives to x (float32 [columns][batch]); the tiles of a long row beyond it go to other blocks.
X_SMEM_BYTES = 16384
_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]

_lock = threading.Lock()
_module = None
_failure: str | None = None


@dataclass
class TiledWeight:
    """One ``[rows, cols]`` weight in the GPU tile layout (see the module doc)."""

    bitmap: torch.Tensor
    values: torch.Tensor
    tile_off: torch.Tensor
    rows: int
    cols: int

    @property
    def tiles(self) -> int:
        return (self.cols + TILE - 1) // TILE

    @property
    def nbytes(self) -> int:
        """Bytes of the three tensors (what a decode step reads)."""
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.tile_off))

    @property
    def nnz(self) -> int:
        """Stored entries (a device-to-host copy of the bitmap's popcount: not for the decode path)."""
        words = self.bitmap.to(torch.int64) & 0xFFFFFFFF
        return int(sum(((words >> b) & 1).sum() for b in range(32)))

    def to(self, device) -> "TiledWeight":
        return TiledWeight(self.bitmap.to(device), self.values.to(device), self.tile_off.to(device), self.rows,
                           self.cols)


def pack_tiles(weight: torch.Tensor) -> TiledWeight:
    """Pack a 2-D bf16/fp16 ``weight`` ``[rows, cols]`` into the tile layout on its own device (an entry is stored
    when its bit pattern is not zero, so ``-0.0`` survives and :func:`unpack_tiles` gives ``weight`` back bit for bit).
    Peak extra memory: about 20 bytes per weight entry (int64 positions), transient.

    Raises:
        ConfigError: not 2-D, or not bfloat16/float16.
    """
    if weight.dim() != 2:
        raise ConfigError(f"a packed weight is 2-D [rows, cols], got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise ConfigError(f"the CUDA sparse kernel takes bfloat16 or float16 weights, got "
                          f"{str(weight.dtype).removeprefix('torch.')}")
    w = weight.detach()
    rows, cols = w.shape
    tiles = (cols + TILE - 1) // TILE
    padded = torch.zeros(rows, tiles * TILE, dtype=w.dtype, device=w.device)
    padded[:, :cols] = w
    # [rows, tiles, j, lane] -> [rows, tiles, lane, j]: the storage order (lane-major within a tile)
    lanes = padded.view(rows, tiles, 32, 32).transpose(2, 3).contiguous()
    keep = lanes.view(torch.int16) != 0
    shifts = torch.arange(32, device=w.device, dtype=torch.int64)
    words = (keep.to(torch.int64) << shifts).sum(dim=-1)  # [rows, tiles, 32] in [0, 2^32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).reshape(-1)
    flat = keep.view(rows * tiles, TILE)
    chunks = (flat.sum(dim=1) + 7) // 8
    tile_off = torch.zeros(rows * tiles + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(chunks, 0, out=tile_off[1:])
    total = int(tile_off[-1])
    if total >= 2 ** 31:
        raise ConfigError(f"weight [{rows}, {cols}] is too large for the CUDA tile layout (int32 chunk offsets)")
    positions = tile_off[:-1].unsqueeze(1) * 8 + flat.cumsum(dim=1) - 1
    values = torch.zeros((total + 1) * 8, dtype=w.dtype, device=w.device)  # never empty: a valid 16-byte pointer
    values[positions[flat]] = lanes.view(rows * tiles, TILE)[flat]
    return TiledWeight(words, values, tile_off.to(torch.int32), rows, cols)


def unpack_tiles(tiled: TiledWeight) -> torch.Tensor:
    """The dense ``[rows, cols]`` weight from the tile layout (plain torch, the reference for the CUDA unpack)."""
    rows, tiles = tiled.rows, tiled.tiles
    words = tiled.bitmap.to(torch.int64).view(rows * tiles, 32, 1) & 0xFFFFFFFF
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    keep = ((words >> shifts) & 1).bool().view(rows * tiles, TILE)  # lane-major
    off = tiled.tile_off.to(torch.int64)
    positions = off[:-1].unsqueeze(1) * 8 + keep.cumsum(dim=1) - 1
    lanes = torch.zeros(rows * tiles, TILE, dtype=tiled.values.dtype, device=words.device)
    lanes[keep] = tiled.values[positions[keep]]
    dense = lanes.view(rows, tiles, 32, 32).transpose(2, 3).reshape(rows, tiles * TILE)
    return dense[:, :tiled.cols].contiguous()


def check_tiles(tiled: TiledWeight) -> None:
    """Check what the kernel relies on: dtypes, sizes, offsets equal to the bitmap's counts, 16-byte alignment.

    Raises:
        ConfigError: one line naming the first broken invariant.
    """
    rows, tiles = tiled.rows, tiled.tiles
    if tiled.bitmap.dtype != torch.int32 or tiled.bitmap.numel() != rows * tiles * 32:
        raise ConfigError(f"tile bitmap must be int32 [{rows * tiles * 32}], got {tiled.bitmap.dtype} "
                          f"{tuple(tiled.bitmap.shape)}")
    if tiled.tile_off.dtype != torch.int32 or tiled.tile_off.numel() != rows * tiles + 1:
        raise ConfigError(f"tile offsets must be int32 [{rows * tiles + 1}], got {tuple(tiled.tile_off.shape)}")
    if tiled.values.dtype not in DTYPES or tiled.values.data_ptr() % 16:
        raise ConfigError("tile values must be bf16/fp16 and 16-byte aligned")
    words = tiled.bitmap.to(torch.int64).view(rows * tiles, 32, 1) & 0xFFFFFFFF
    counts = ((words >> torch.arange(32, device=words.device)) & 1).sum(dim=(1, 2))
    off = tiled.tile_off.to(torch.int64)
    if int(off[0]) != 0 or not torch.equal(off[1:] - off[:-1], (counts + 7) // 8):
        raise ConfigError("tile offsets do not match the bitmap's per-tile counts")
    if tiled.values.numel() < int(off[-1]) * 8:
        raise ConfigError(f"tile values hold {tiled.values.numel()} entries, the offsets need {int(off[-1]) * 8}")


def source_hash() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(_FLAGS + [torch.__version__, str(torch.version.cuda), sys.version]).encode())
    return h.hexdigest()[:16]


def _build():
    if not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device")
    _ninja_on_path()
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise KernelUnavailable("nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
    digest = source_hash()
    build = cache_dir() / "sparse-cuda" / digest
    build.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=f"atprune_sparse_cuda_{digest}", sources=[str(SOURCE)],
                                  extra_cuda_cflags=_FLAGS, build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure becomes a one-line reason
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        raise KernelUnavailable(f"compiling {SOURCE.name} failed: {(errs or lines or ['?'])[0]}") from None


def extension():
    """The compiled CUDA extension (built on first call, cached on disk).

    Raises:
        KernelUnavailable: no CUDA device, no nvcc, or the build failed (remembered: later calls fail at once).
    """
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except KernelUnavailable as err:
                _failure = str(err)
        if _module is None:
            raise KernelUnavailable(_failure)
        return _module


def sparse_mm(x: torch.Tensor, tiled: TiledWeight, bias: torch.Tensor | None = None,
              tiles_per_split: int = 0) -> torch.Tensor:
    """``x W^T (+ bias)`` with the CUDA kernel: ``x`` ``[..., cols]`` on the GPU, in the weight's dtype, with at most
    :data:`MAX_TOKENS` rows (``x.numel() // cols``); returns ``[..., rows]`` in that dtype (float32 accumulation).
    ``tiles_per_split`` (0: chosen from :data:`X_SMEM_BYTES`) sets how many tiles of a row one block takes.
    Captured by CUDA graphs like any torch op (current stream, no host synchronisation)."""
    if x.shape[-1] != tiled.cols:
        raise ValueError(f"sparse_mm: x has {x.shape[-1]} columns, the weight {tiled.cols}")
    return extension().sparse_mm(x.contiguous(), tiled.bitmap, tiled.values, tiled.tile_off, tiled.rows, bias,
                                 tiles_per_split, X_SMEM_BYTES)


def max_tokens(device) -> int:
    """Tokens per call the decode kernel can take on ``device``: :data:`MAX_TOKENS` (16), fewer on GPUs whose
    opt-in shared memory per block cannot hold the 64 KB staging buffers plus one tile of x (``1024 * B * 4`` bytes
    for the kernel's batch size ``B`` in {1, 2, 4, 8, 16})."""
    smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    fits = [b for b in (1, 2, 4, 8, 16) if 16 * 2 * 128 * 16 + TILE * b * 4 <= smem]
    return min(MAX_TOKENS, fits[-1]) if fits else 0


def dense_from_tiles(tiled: TiledWeight) -> torch.Tensor:
    """The dense ``[rows, cols]`` weight on the GPU (the CUDA unpack kernel; for prefill, where cuBLAS wins)."""
    return extension().unpack(tiled.bitmap, tiled.values, tiled.tile_off, tiled.rows, tiled.cols)
