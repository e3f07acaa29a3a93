"""The pruner registry: ``@register_pruner("name")`` on a class makes it available as ``--method name``.

A new pruner is one new module in this package: :mod:`atprune.pruners` imports every module in it, so the
decorator runs without any list to keep by hand.
"""

from __future__ import annotations

from types import MappingProxyType

from atprune.errors import ConfigError

_PRUNERS: dict[str, type] = {}
PRUNERS = MappingProxyType(_PRUNERS)  # name -> class, read-only, in registration order


def register_pruner(name: str):
    """Class decorator: register a :class:`~atprune.pruners.base.Pruner` under ``name`` (and set ``cls.name``).

    Raises:
        ValueError: if ``name`` is already taken by another class (a programming error, not user input).
    """

    def decorate(cls: type) -> type:
        if _PRUNERS.get(name, cls) is not cls:
            raise ValueError(f"pruner name {name!r} is already registered by {_PRUNERS[name].__qualname__}")
        cls.name = name
        _PRUNERS[name] = cls
        return cls

    return decorate


def get_pruner(name: str, **options):
    """Instantiate the pruner registered as ``name`` with its options (e.g. ``column_loop`` for sparsegpt).

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    try:
        cls = _PRUNERS[name]
    except KeyError:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of: {', '.join(_PRUNERS)}") from None
    return cls(**options)
