"""The allocator registry: ``@register_allocator("name")`` on a class makes it available as ``--allocation name``.

A new allocator is one new module in this package: :mod:`atprune.allocators` imports every module in it.
"""

from __future__ import annotations

from types import MappingProxyType

from atprune.errors import ConfigError

_ALLOCATORS: dict[str, type] = {}
ALLOCATORS = MappingProxyType(_ALLOCATORS)  # name -> class, read-only


def register_allocator(name: str):
    """Class decorator: register an :class:`~atprune.allocators.base.Allocator` under ``name`` (sets ``cls.name``).

    Raises:
        ValueError: if ``name`` is already taken by another class (a programming error, not user input).
    """

    def decorate(cls: type) -> type:
        if _ALLOCATORS.get(name, cls) is not cls:
            raise ValueError(f"allocator name {name!r} is already registered by {_ALLOCATORS[name].__qualname__}")
        cls.name = name
        _ALLOCATORS[name] = cls
        return cls

    return decorate


def get_allocator(name: str, **options):
    """Instantiate the allocator registered as ``name`` with its options (e.g. ``beta`` for ``atp``); options
    given as None are left at their defaults.

    Raises:
        ConfigError: for an unknown name, an option it does not take, or an illegal option value.
    """
    try:
        cls = _ALLOCATORS[name]
    except KeyError:
        raise ConfigError(f"unknown allocation {name!r}; choose one of: {', '.join(_ALLOCATORS)}") from None
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**options)
    except TypeError:
        raise ConfigError(f"allocation {name!r} does not take options {sorted(options)}") from None
