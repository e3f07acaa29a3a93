"""``SparseLinear``: a linear layer whose weight is kept in the bitmap format and multiplied by the CPU kernels."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from atprune.errors import ConfigError
from atprune.sparse import cuda, kernels
from atprune.sparse.format import PackedWeight, check_dtype, check_packed, pack, unpack

# Tokens per call up to which the sparse kernel runs; above it the layer unpacks its weight into a reused buffer
# and runs a dense matmul (prefill is compute bound, where the dense GEMM wins). Measured with `atprune bench` on
# the 2-core EPYC (docs/performance.md, "Sparse inference"): bf16 4096x11008 at 70 %, the kernel is 2.3x faster
# than dense at 1 token, 1.24x at 8, even at 16 and 0.78x at 32 tokens; without a dense copy kept, the alternative
# also pays the unpacking, so 16 is where the kernel stops being the better choice.
MAX_SPARSE_TOKENS = 16


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused buffer of ``numel`` elements of ``dtype`` (grown when too small)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` ``[out_features, in_features]`` stored as bitmap + packed values
    (:mod:`atprune.sparse.format`), for decoding on a CPU.

    ``forward`` takes ``x`` ``[..., in_features]`` in the weight's dtype (float32, bfloat16 or float16) and returns
    ``[..., out_features]`` in that dtype (fp32 accumulation). On a CPU with ``tokens = x.numel() // in_features``
    at most ``max_sparse_tokens`` it runs the sparse kernel chosen by ``kernel`` (``auto``: the fastest the CPU
    runs; see :mod:`atprune.sparse.kernels`); otherwise (prefill, another device, another input dtype) it unpacks
    the weight and calls ``F.linear`` (the dense copy lives only during that call).

    Moved to a GPU (``.to("cuda")``, ``.cuda()``) with bfloat16/float16 values, the layer repacks its weight into the
    GPU tile layout (:mod:`atprune.sparse.cuda`; the CPU-layout buffers stay on the CPU, so the GPU holds one copy)
    and runs the CUDA decode kernel for up to ``max_cuda_tokens`` tokens per call (at most 16), else it unpacks the
    tiles on the GPU and calls cuBLAS through ``F.linear``. Both paths can be captured in CUDA graphs.

    Build one with :meth:`from_dense` (from an ``nn.Linear`` or a weight) or from a :class:`PackedWeight`.

    Raises:
        ConfigError: an unsupported dtype, or a ``kernel`` this CPU cannot run (at construction).
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 max_sparse_tokens: int = MAX_SPARSE_TOKENS):
        super().__init__()
        check_dtype(packed.dtype)
        check_packed(packed)  # the C++ kernels read by these offsets: refuse a truncated or inconsistent weight
        self.in_features, self.out_features = packed.cols, packed.rows
        self.kernel = kernels.resolve_kernel(kernel)
        self._kernel_id = kernels.KERNEL_IDS.get(self.kernel)
        self.__dict__["_max_numel"] = 0
        self.max_sparse_tokens = max_sparse_tokens
        self.register_buffer("bitmap", packed.bitmap)
        self.register_buffer("values", packed.values)
        self.register_buffer("group_offsets", packed.group_offsets)
        if bias is not None and tuple(bias.shape) != (packed.rows,):
            raise ConfigError(f"bias must have shape ({packed.rows},), got {tuple(bias.shape)}")
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().to("cpu", packed.dtype), requires_grad=False))
        # Plain attributes for the decode path (no nn.Module attribute lookup per call).
        self.__dict__["_op"] = kernels.extension().sparse_mm if self._kernel_id is not None else None
        self.__dict__["_dtype"] = packed.dtype
        self.__dict__["_tiles"] = None  # the GPU layout while the layer lives on a GPU
        self.max_cuda_tokens = cuda.MAX_TOKENS  # lowered when moved to a GPU with less shared memory

    @classmethod
    def from_dense(cls, layer: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None, **kwargs) -> "SparseLinear":
        """From an ``nn.Linear`` (its weight and bias) or a ``[out, in]`` weight tensor (and optional ``bias``)."""
        if isinstance(layer, nn.Linear):
            return cls(pack(layer.weight), layer.bias, **kwargs)
        return cls(pack(layer), bias, **kwargs)

    @property
    def packed(self) -> PackedWeight:
        """The weight as a :class:`PackedWeight` (sharing this module's tensors)."""
        return PackedWeight(self.bitmap, self.values, self.group_offsets, self.out_features, self.in_features)

    @property
    def max_sparse_tokens(self) -> int:
        """Tokens per call up to which the sparse kernel runs (the dense fallback above)."""
        return self.__dict__["_max_tokens"]

    @max_sparse_tokens.setter
    def max_sparse_tokens(self, value: int) -> None:
        self.__dict__["_max_tokens"] = int(value)
        self.__dict__["_max_numel"] = int(value) * self.in_features

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.values.dtype

    def dense_weight(self, scratch: bool = False) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight: a new tensor, or with ``scratch`` a view of this
        thread's reused buffer (valid until the next ``dense_weight(scratch=True)`` call in the thread; it saves the
        page faults of a fresh allocation per call, which cost more than the unpacking for large layers)."""
        if self._kernel_id is not None and self.values.device.type == "cpu":
            into = _scratch(self.out_features * self.in_features, self.values.dtype) if scratch else None
            return kernels.extension().unpack(self.bitmap, self.values, self.group_offsets, self.out_features,
                                              self.in_features, self._kernel_id, into)
        return unpack(self.packed) if self.values.device.type == "cpu" else unpack(_to_cpu(self.packed)).to(
            self.values.device)

    @property
    def tiles(self) -> "cuda.TiledWeight | None":
        """The GPU tile layout while the layer is on a GPU (else None)."""
        return self.__dict__["_tiles"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept short: at decode sizes the Python around the kernel call is a good part of a small layer's time.
        tiles = self.__dict__["_tiles"]
        if tiles is not None and x.is_cuda:
            return self._forward_cuda(x, tiles)
        op = self.__dict__["_op"]
        if (op is not None and x.dtype == self.__dict__["_dtype"] and x.device.type == "cpu"
                and 0 < x.numel() <= self.__dict__["_max_numel"] and x.shape[-1] == self.in_features):
            buffers = self._buffers
            return op(x, buffers["bitmap"], buffers["values"], buffers["group_offsets"], self.out_features,
                      self._parameters["bias"], self._kernel_id)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects [..., {self.in_features}], got {tuple(x.shape)}")
        w = self.dense_weight(scratch=x.device.type == "cpu" and x.dtype == self.values.dtype).to(x.device, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.device, x.dtype))

    def _forward_cuda(self, x: torch.Tensor, tiles: "cuda.TiledWeight") -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects [..., {self.in_features}], got {tuple(x.shape)}")
        bias = self._parameters["bias"]
        if x.dtype == tiles.values.dtype and 0 < x.numel() <= self.max_cuda_tokens * self.in_features:
            return cuda.sparse_mm(x, tiles, bias)
        w = cuda.dense_from_tiles(tiles).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    def _apply(self, fn, *args, **kwargs):
        # The CPU-layout values follow every dtype change, so the two layouts always hold the same weight. To a
        # GPU: repack into the tile layout there and leave the CPU-layout buffers on the CPU (one GPU copy).
        tiles = self.__dict__["_tiles"]
        values = self._buffers["values"]
        probe = fn(torch.zeros(1, dtype=values.dtype, device=tiles.values.device if tiles is not None else
                               values.device))
        if probe.dtype != values.dtype:
            self._buffers["values"] = values.to(probe.dtype)
        if probe.device.type == "cuda" and probe.dtype in cuda.DTYPES:
            self.__dict__["_tiles"] = cuda.pack_tiles(unpack(_to_device(self.packed, probe.device)))
            self.max_cuda_tokens = min(self.max_cuda_tokens, cuda.max_tokens(probe.device))
            for name in ("bitmap", "values", "group_offsets"):
                self._buffers[name] = self._buffers[name].cpu()
            if self._parameters["bias"] is not None:
                self._parameters["bias"] = nn.Parameter(fn(self._parameters["bias"].data), requires_grad=False)
            self.__dict__["_dtype"] = probe.dtype
            return self
        self.__dict__["_tiles"] = None
        out = super()._apply(fn, *args, **kwargs)
        self.__dict__["_dtype"] = self._buffers["values"].dtype  # the CPU fast path's cached dtype
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        # new CPU-layout buffers: on a GPU, the tiles must be rebuilt from them (else the old weight would stay)
        super()._load_from_state_dict(*args, **kwargs)
        tiles = self.__dict__["_tiles"]
        if tiles is not None:
            self.__dict__["_tiles"] = cuda.pack_tiles(unpack(_to_device(self.packed, tiles.values.device)))

    def extra_repr(self) -> str:
        nnz = int(self.group_offsets[-1])
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={str(self.values.dtype).removeprefix('torch.')}, "
                f"sparsity={1 - nnz / max(1, self.in_features * self.out_features):.3f}, kernel={self.kernel}")


def _to_cpu(packed: PackedWeight) -> PackedWeight:
    """The same packed weight with its tensors on the CPU (where the unpacking runs)."""
    return _to_device(packed, "cpu")


def _to_device(packed: PackedWeight, device) -> PackedWeight:
    """The same packed weight with its tensors on ``device``."""
    return PackedWeight(packed.bitmap.to(device), packed.values.to(device), packed.group_offsets.to(device),
                        packed.rows, packed.cols)
