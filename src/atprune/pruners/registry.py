"""The pruner registry: ``@register_pruner("name")`` on a class makes it available as ``--method name``.

A new pruner is one new module in this package: :mod:`atprune.pruners` imports every module in it, so the
decorator runs without any list to keep by hand.
"""

from __future__ import annotations

from atprune.registry import Registry

PRUNERS = Registry("pruner", "pruning method")  # name -> class, in registration order
register_pruner = PRUNERS.register  # class decorator; see Registry.register


def get_pruner(name: str, **options):
    """Instantiate the pruner registered as ``name`` with its options (e.g. ``column_loop`` for sparsegpt).

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    return PRUNERS.lookup(name)(**options)
