"""``sparsify_for_inference``: swap a pruned model's linear layers for :class:`SparseLinear` in place."""

from __future__ import annotations

import torch
from torch import nn

from atprune.errors import ConfigError
from atprune.sparse import kernels
from atprune.sparse.format import DTYPES, pack
from atprune.sparse.linear import MAX_SPARSE_TOKENS, SparseLinear

# Below this fraction of zeros a layer is left dense: the bitmap costs 1/8 byte per weight and the kernel's
# per-value work does not pay off (the measured break-even on the 2-core EPYC is around 30 %).
MIN_SPARSITY = 0.3


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose stored weight is ``[in, out]``;
    the transpose is returned), else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    conv = _conv1d_class()
    if conv is not None and isinstance(module, conv):
        return module.weight.t(), module.bias
    return None


def sparsify_for_inference(model: nn.Module, min_sparsity: float = MIN_SPARSITY, kernel: str = "auto",
                           max_sparse_tokens: int = MAX_SPARSE_TOKENS) -> dict:
    """Replace every ``nn.Linear`` and ``Conv1D`` of ``model`` (on CPU or a CUDA GPU) whose weight has at least ``min_sparsity``
    exact zeros with a :class:`SparseLinear` holding the same weight in the bitmap format, in place; the rest
    (embeddings, a dense ``lm_head``, layers too dense to gain) stays as it is. The model keeps working with
    ``forward`` and transformers' ``generate()``; outputs equal the dense model's up to the kernel's fp32
    summation order.

    Args:
        model: a module on CPU or CUDA whose weights are float32, bfloat16 or float16 (on CUDA, bf16/fp16 layers
            run the CUDA kernel; see :class:`SparseLinear`).
        min_sparsity: fraction of zeros from which a layer is swapped, in [0, 1].
        kernel: ``auto`` or a kernel name (:data:`atprune.sparse.kernels.KERNELS`).
        max_sparse_tokens: tokens per call up to which the sparse kernel runs (dense matmul above).

    Returns:
        ``{"swapped": [{"name", "shape" [out, in], "sparsity", "dense_bytes", "sparse_bytes"}], "skipped":
        [{"name", "shape", "sparsity", "reason"}], "dense_bytes", "sparse_bytes", "bytes_saved", "kernel",
        "min_sparsity"}``; bytes are those of the swapped weights (dense in their dtype vs packed).

    Raises:
        ConfigError: ``min_sparsity`` outside [0, 1], a ``kernel`` this CPU cannot run, a model on another device, or no
            layer to swap (the model is not pruned), before any layer is changed.
    """
    if not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    kernels.resolve_kernel(kernel)  # a kernel this CPU cannot run fails here, before any change
    found = []
    skipped = []
    for name, module in model.named_modules():
        wb = linear_weight(module)
        if wb is None:
            continue
        weight, bias = wb
        shape = [int(weight.shape[0]), int(weight.shape[1])]
        if weight.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"sparsify_for_inference runs on CPU or CUDA; layer {name} is on {weight.device}")
        sparsity = float((weight == 0).sum()) / max(1, weight.numel())
        if weight.dtype not in DTYPES:
            skipped.append({"name": name, "shape": shape, "sparsity": sparsity, "reason": f"dtype {weight.dtype}"})
        elif sparsity < min_sparsity:
            skipped.append({"name": name, "shape": shape, "sparsity": sparsity,
                            "reason": f"too dense to gain (sparsity {sparsity:.3f} < {min_sparsity})"})
        else:
            found.append((name, sparsity))
    if not found:
        raise ConfigError(f"no pruned layer to swap: no Linear/Conv1D has sparsity >= {min_sparsity} "
                          f"({len(skipped)} dense ones)")
    modules = dict(model.named_modules())
    swapped = []
    chosen = None
    for name, sparsity in found:
        module = modules[name]
        weight, bias = linear_weight(module)
        on_gpu = weight.device.type == "cuda"
        layer = SparseLinear(pack(weight, on_device=on_gpu), bias, kernel=kernel, max_sparse_tokens=max_sparse_tokens)
        if on_gpu:  # repacks into the GPU tile layout there (the CPU layout moves to the CPU)
            layer = layer.to(weight.device)
        chosen = layer.kernel
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
        swapped.append({"name": name, "shape": [layer.out_features, layer.in_features], "sparsity": sparsity,
                        "dense_bytes": layer.packed.dense_nbytes, "sparse_bytes": layer.packed.nbytes})
    dense = sum(s["dense_bytes"] for s in swapped)
    sparse = sum(s["sparse_bytes"] for s in swapped)
    return {"swapped": swapped, "skipped": skipped, "dense_bytes": dense, "sparse_bytes": sparse,
            "bytes_saved": dense - sparse, "kernel": chosen, "min_sparsity": min_sparsity}
