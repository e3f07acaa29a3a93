"""The bitmap + packed-values weight format.

A weight ``W`` of shape ``[rows, cols]`` (float32, bfloat16 or float16) is cut into groups of ``G = 4`` rows and
chunks of ``C = 32`` columns (the last group and chunk padded with zeros, which are not stored) and kept as

* ``bitmap``: uint8 ``[groups, chunks * 16]``: for group ``g`` and chunk ``c``, 16 bytes = four little-endian
  32-bit masks, one per row of the group; bit ``b`` of row ``q``'s mask is 1 iff ``W[G*g + q, C*c + b]`` is stored.
* ``values``: 1-D, ``W``'s dtype: the stored entries group by group, within a group chunk by chunk, within a
  chunk row by row (columns in order); then ``PAD`` zeros, so vector kernels may read a little past the end.
* ``group_offsets``: int64 ``[groups + 1]``: index in ``values`` of each group's first entry (the last one is
  ``nnz``). Threads take whole groups; no popcount chain crosses a group boundary.

This interleaving makes a group one sequential stream of masks and one of values (what the hardware prefetcher
follows best on a CPU with few cores) and lets the kernel find the four rows' values of a chunk from popcount
prefix sums (no pointer chain per row). An entry is stored when its *bit pattern* is not zero, so ``-0.0`` and NaN
survive and :func:`unpack` gives ``W`` back bit for bit.

Size: ``nnz * itemsize + 4 * ceil(rows/4) * ceil(cols/32) * 4 + 8 * (groups + 1) + PAD * itemsize`` bytes, about
``2(1 - s) + 1/8`` bytes per weight for 16-bit values at sparsity ``s`` (0.725 at 70 %: 2.76x less than dense) and
``4(1 - s) + 1/8`` for float32 (1.325 at 70 %: 3.0x less than dense float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atprune.errors import ConfigError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
G = 4
C = 32
PAD = 64
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def check_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`ConfigError` unless ``dtype`` is float32, bfloat16 or float16."""
    if dtype not in DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise ConfigError(f"sparse weights are {names}; got {str(dtype).removeprefix('torch.')}")


@dataclass
class PackedWeight:
    """One packed ``[rows, cols]`` weight (see the module doc for the layout)."""

    bitmap: torch.Tensor
    values: torch.Tensor
    group_offsets: torch.Tensor
    rows: int
    cols: int

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.group_offsets[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the three tensors (values padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.group_offsets))

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense weight in the same dtype."""
        return self.rows * self.cols * self.values.element_size()

    @property
    def sparsity(self) -> float:
        """Fraction of entries not stored."""
        return 1.0 - self.nnz / max(1, self.rows * self.cols)


def grid(rows: int, cols: int) -> tuple[int, int]:
    """``(groups, chunks)`` of a ``[rows, cols]`` weight."""
    return (rows + G - 1) // G, (cols + C - 1) // C


def pack(weight: torch.Tensor, on_device: bool = False) -> PackedWeight:
    """Pack a 2-D ``weight`` ``[rows, cols]`` (float32/bfloat16/float16, any device). The work runs on the weight's
    device; the result is on the CPU, or with ``on_device`` on the weight's device (for building a GPU model fast).

    Raises:
        ConfigError: not 2-D, or an unsupported dtype.
    """
    if weight.dim() != 2:
        raise ConfigError(f"a packed weight is 2-D [rows, cols], got shape {tuple(weight.shape)}")
    check_dtype(weight.dtype)
    w = weight.detach()
    dev = w.device
    rows, cols = w.shape
    groups, chunks = grid(rows, cols)
    padded = torch.zeros(groups * G, chunks * C, dtype=w.dtype, device=dev)
    padded[:rows, :cols] = w
    tiles = padded.view(groups, G, chunks, C).transpose(1, 2)  # [groups, chunks, G, C]: the storage order
    keep = tiles.contiguous().view(_INT_VIEW[w.dtype]) != 0  # bit pattern, so -0.0 and NaN are kept
    weights = (1 << torch.arange(8, dtype=torch.int32, device=dev)).to(torch.uint8)
    bitmap = (keep.view(groups, chunks, G, 4, 8).to(torch.uint8) * weights).sum(dim=-1, dtype=torch.int32)
    bitmap = bitmap.to(torch.uint8).reshape(groups, chunks * 16).contiguous()
    offsets = torch.zeros(groups + 1, dtype=torch.int64, device=dev)
    torch.cumsum(keep.view(groups, -1).sum(dim=1), 0, out=offsets[1:])
    nnz = int(offsets[-1])
    values = torch.zeros(nnz + PAD, dtype=w.dtype, device=dev)
    values[:nnz] = tiles[keep]  # boolean indexing walks [groups, chunks, G, C] in order: the storage order
    if not on_device:
        bitmap, values, offsets = bitmap.cpu(), values.cpu(), offsets.cpu()
    return PackedWeight(bitmap, values, offsets, rows, cols)


def _keep(packed: PackedWeight) -> torch.Tensor:
    """bool ``[groups, chunks, G, C]``: which entries the bitmap says are stored."""
    groups, chunks = grid(packed.rows, packed.cols)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.bitmap.device)
    bits = (packed.bitmap.view(groups, chunks, G, 4, 1) >> shifts) & 1
    return bits.view(groups, chunks, G, C).bool()


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense ``[rows, cols]`` weight (on the packed tensors' device, the packed dtype), bit for bit the one
    packed. Pure torch (the reference); the C++ extension's ``unpack`` is the fast one on a CPU."""
    groups, chunks = grid(packed.rows, packed.cols)
    tiles = torch.zeros(groups, chunks, G, C, dtype=packed.dtype, device=packed.values.device)
    tiles[_keep(packed)] = packed.values[:packed.nnz]
    return tiles.transpose(1, 2).reshape(groups * G, chunks * C)[:packed.rows, :packed.cols].contiguous()


def check_packed(packed: PackedWeight) -> None:
    """Check the invariants the kernels rely on: shapes and dtypes, offsets equal to the bitmap's per-group counts,
    enough values, no bit set in the padding.

    Raises:
        ConfigError: one line naming the first broken invariant.
    """
    groups, chunks = grid(packed.rows, packed.cols)
    b, v, o = packed.bitmap, packed.values, packed.group_offsets
    if b.dtype != torch.uint8 or tuple(b.shape) != (groups, chunks * 16) or not b.is_contiguous():
        raise ConfigError(f"packed bitmap must be uint8 [{groups}, {chunks * 16}], got {b.dtype} {tuple(b.shape)}")
    check_dtype(v.dtype)
    if o.dtype != torch.int64 or tuple(o.shape) != (groups + 1,):
        raise ConfigError(f"group offsets must be int64 [{groups + 1}], got {o.dtype} {tuple(o.shape)}")
    keep = _keep(packed)
    if int(o[0]) != 0 or not torch.equal(o[1:] - o[:-1], keep.view(groups, -1).sum(dim=1)):
        raise ConfigError("group offsets do not match the bitmap's per-group counts")
    if v.dim() != 1 or not v.is_contiguous() or v.numel() < int(o[-1]) + PAD:
        raise ConfigError(f"values must be 1-D with nnz + {PAD} entries, got {tuple(v.shape)} for nnz {int(o[-1])}")
    dense = keep.transpose(1, 2).reshape(groups * G, chunks * C)
    if bool(dense[packed.rows:].any()) or bool(dense[:, packed.cols:].any()):
        raise ConfigError("packed bitmap has bits set in the padding past the last row or column")
