"""Inference with pruned weights: the bitmap format, ``SparseLinear``, the CPU kernels and the benchmark.

This package stands on its own: it imports nothing from atprune except :mod:`atprune.errors` and
:mod:`atprune.atomic`, and talks to torch, transformers and safetensors directly.

* :mod:`atprune.sparse.format`: bitmap + packed values (pack, unpack, checks, sizes).
* :mod:`atprune.sparse.kernels`: the C++ kernels (compiled at first use, cached), kernel choice, CPU facts.
* :mod:`atprune.sparse.linear`: :class:`SparseLinear`.
* :mod:`atprune.sparse.convert`: :func:`sparsify_for_inference` (swap the layers of a model in memory).
* :mod:`atprune.sparse.load`: :func:`load_sparse` (build from a run folder).
* :mod:`atprune.sparse.bench`: ``atprune bench`` (correctness gate, per-layer and end-to-end timing).
"""

from atprune.sparse.convert import sparsify_for_inference
from atprune.sparse.format import PackedWeight, pack, unpack
from atprune.sparse.linear import SparseLinear
from atprune.sparse.load import load_sparse

__all__ = ["PackedWeight", "SparseLinear", "load_sparse", "pack", "sparsify_for_inference", "unpack"]
