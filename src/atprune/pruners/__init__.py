"""Pruners, registered by name (:mod:`.registry`). Each is a pure tensor function over one weight matrix.

Every module of this package is imported here, so a pruner registers itself by its decorator alone.
"""

from __future__ import annotations

import importlib
import pkgutil

from atprune.pruners.base import Pattern, Pruner, check_sparsity, prune_mask
from atprune.pruners.registry import PRUNERS, get_pruner, register_pruner

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PRUNERS", "Pattern", "Pruner", "check_sparsity", "get_pruner", "prune_mask", "register_pruner"]
