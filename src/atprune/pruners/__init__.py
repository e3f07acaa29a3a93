"""Pruners, registered by name. Each is a pure tensor function over one Linear weight."""

from __future__ import annotations

from atprune.errors import ConfigError
from atprune.pruners.base import Pattern, Pruner, check_sparsity, prune_mask
from atprune.pruners.magnitude import MagnitudePruner
from atprune.pruners.sparsegpt import SparseGPTPruner
from atprune.pruners.wanda import WandaPruner

PRUNERS: dict[str, type] = {cls.name: cls for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner)}


def get_pruner(name: str, **options) -> Pruner:
    """Instantiate the pruner registered as ``name`` (``magnitude``, ``wanda``, ``sparsegpt``).

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    try:
        cls = PRUNERS[name]
    except KeyError:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of: {', '.join(PRUNERS)}") from None
    return cls(**options)


__all__ = ["PRUNERS", "Pattern", "Pruner", "check_sparsity", "get_pruner", "prune_mask"]
