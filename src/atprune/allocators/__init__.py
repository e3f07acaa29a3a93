"""Layer-wise sparsity allocators, registered by name (:mod:`.registry`).

An allocator turns a target sparsity ratio S and the block sizes into one rate per block (input side first), with
parameter-weighted mean S (:class:`~atprune.allocators.base.Allocator`). ``check`` validates its options before any
model is loaded. Allocators are pure: one that needs the model (OWL, DLP: dense Wanda statistics; AlphaPruning:
weight spectra) declares it in ``needs``, and the caller (:func:`atprune.prune`) computes its per-block statistic
with its ``block_statistic`` and passes it in. Every module of this package is imported here, so an allocator
registers itself by its decorator alone.
"""

from __future__ import annotations

import importlib
import pkgutil

from atprune.allocators.base import (NEEDS, NEEDS_DENSE_WANDA, NEEDS_NOTHING, NEEDS_WEIGHTS, Allocation, Allocator,
                                     weighted_mean)
from atprune.allocators.registry import ALLOCATORS, get_allocator, register_allocator

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from atprune.allocators.alphapruning import AlphaPruningAllocator  # noqa: E402  (registered above)
from atprune.allocators.atp import ATPAllocator, atp_rates, beta_max  # noqa: E402
from atprune.allocators.dlp import DLPAllocator  # noqa: E402
from atprune.allocators.owl import OWLAllocator  # noqa: E402
from atprune.allocators.uniform import UniformAllocator  # noqa: E402

__all__ = ["ALLOCATORS", "ATPAllocator", "Allocation", "Allocator", "AlphaPruningAllocator", "DLPAllocator", "NEEDS",
           "NEEDS_DENSE_WANDA", "NEEDS_NOTHING", "NEEDS_WEIGHTS", "OWLAllocator", "UniformAllocator", "atp_rates",
           "beta_max", "get_allocator", "register_allocator", "weighted_mean"]
