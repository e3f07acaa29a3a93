"""Layer-wise sparsity allocators, registered by name.

An allocator turns a target sparsity ratio S and a number of blocks L into one rate per block
(input side first), with parameter-weighted mean S. ``check`` validates its options before any model is
loaded. Allocators with ``needs_model`` (OWL, DLP, AlphaPruning) also get an
:class:`~atprune.allocators.base.AllocationContext` (the model, and calibration data for OWL / DLP).
"""

from __future__ import annotations

from atprune.allocators.alphapruning import AlphaPruningAllocator
from atprune.allocators.atp import ATPAllocator, atp_rates, beta_max
from atprune.allocators.base import AllocationContext
from atprune.allocators.dlp import DLPAllocator
from atprune.allocators.owl import OWLAllocator
from atprune.allocators.uniform import UniformAllocator
from atprune.errors import ConfigError

ALLOCATORS: dict[str, type] = {
    cls.name: cls for cls in (UniformAllocator, ATPAllocator, OWLAllocator, AlphaPruningAllocator, DLPAllocator)
}


def get_allocator(name: str, **options):
    """Instantiate the allocator registered as ``name`` with its options (e.g. ``beta`` for ``atp``).

    Raises:
        ConfigError: for an unknown name or an option it does not take.
    """
    try:
        cls = ALLOCATORS[name]
    except KeyError:
        raise ConfigError(f"unknown allocation {name!r}; choose one of: {', '.join(ALLOCATORS)}") from None
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**options)
    except TypeError:
        raise ConfigError(f"allocation {name!r} does not take options {sorted(options)}") from None


__all__ = ["ALLOCATORS", "ATPAllocator", "AllocationContext", "AlphaPruningAllocator", "DLPAllocator", "OWLAllocator",
           "UniformAllocator", "atp_rates", "beta_max", "get_allocator"]
