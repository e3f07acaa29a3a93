"""The allocator registry: ``@register_allocator("name")`` on a class makes it available as ``--allocation name``.

A new allocator is one new module in this package: :mod:`atprune.allocators` imports every module in it.
"""

from __future__ import annotations

from atprune.errors import ConfigError
from atprune.registry import Registry

ALLOCATORS = Registry("allocator", "allocation")  # name -> class, in registration order
register_allocator = ALLOCATORS.register  # class decorator; see Registry.register


def get_allocator(name: str, **options):
    """Instantiate the allocator registered as ``name`` with its options (e.g. ``beta`` for ``atp``); options
    given as None are left at their defaults.

    Raises:
        ConfigError: for an unknown name, an option it does not take, or an illegal option value.
    """
    cls = ALLOCATORS.lookup(name)
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**options)
    except TypeError:
        raise ConfigError(f"allocation {name!r} does not take options {sorted(options)}") from None
