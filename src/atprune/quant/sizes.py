"""Honest storage sizes of a quantized (and possibly pruned) model, in bits per weight of the quantized matrices.

Three ways to store the same matrices, and who can run each (2026):

- ``dequantized``: ``model.safetensors`` as saved, the grid values in the checkpoint dtype (16 or 32 bits per
  weight): any transformers user loads it; no memory is saved.
- ``packed``: dense integer codes, ``bits`` per weight, plus one scale (in the checkpoint dtype: 16 or 32 bits) and,
  asymmetric, one zero point (``bits`` bits) per group: compressed-tensors ``pack-quantized`` (``--format pack-quantized``), which vLLM's
  W4A16 / W8A16 kernels run on GPUs. Zeros from pruning save nothing here.
- ``sparse_packed``: the bitmap of :mod:`atprune.sparse.format` (1 bit per weight, plus its group offsets, ignored
  here) and ``bits`` per kept weight, plus the same scales: what a sparse + quantized kernel would read. No runtime
  reads it yet (atprune's sparse kernels store 16/32-bit values); the number says what the combination could save.
"""

from __future__ import annotations



def matrix_bits(numel: int, nonzeros: int, rows: int, cols: int, bits: int, group_size: int | None,
                symmetric: bool, scale_bits: int = 16) -> dict[str, float]:
    """Storage bits of one ``[rows, cols]`` matrix with ``nonzeros`` non-zero weights and ``scale_bits``-bit scales:
    ``{"packed": ., "sparse_packed": .}`` (totals in bits)."""
    groups = rows * (-(-cols // group_size) if group_size else 1)
    meta = groups * (scale_bits + (0 if symmetric else bits))
    return {"packed": numel * bits + meta, "sparse_packed": numel + nonzeros * bits + meta}


def size_report(matrices: list[dict], dtype_bits: int) -> dict:
    """Bits per weight of the quantized matrices, stored three ways (see the module doc).

    Args:
        matrices: one dict per quantized matrix with ``rows``, ``cols``, ``nonzeros``, ``bits``, ``group_size``,
            ``symmetric``.
        dtype_bits: bits of one weight in the dequantized checkpoint (16 or 32), also the bits of a stored scale
            (the pack-quantized export keeps scales in the checkpoint dtype).

    Returns:
        ``{"weights": N, "bits_per_weight": {"dequantized": ., "packed": ., "sparse_packed": .}, "runtimes": {...}}``.
    """
    total = sum(m["rows"] * m["cols"] for m in matrices)
    sums = {"packed": 0.0, "sparse_packed": 0.0}
    for m in matrices:
        got = matrix_bits(m["rows"] * m["cols"], m["nonzeros"], m["rows"], m["cols"], m["bits"], m["group_size"],
                          m["symmetric"], dtype_bits)
        for k in sums:
            sums[k] += got[k]
    per = {"dequantized": float(dtype_bits)} | {k: v / max(total, 1) for k, v in sums.items()}
    return {"weights": total, "bits_per_weight": per, "runtimes": {
        "dequantized": "model.safetensors: transformers (any device), grid values in the checkpoint dtype",
        "packed": "compressed-tensors pack-quantized (--format pack-quantized): vLLM W4A16/W8A16 kernels on GPUs; "
                  "pruned zeros are stored as codes and save nothing",
        "sparse_packed": "bitmap + codes: no runtime yet (atprune's sparse kernels keep 16/32-bit values); what "
                         "sparsity could add on top of quantization"}}
