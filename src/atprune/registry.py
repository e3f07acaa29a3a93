"""A registry of named plug-in classes, filled by a class decorator (pruners and allocators use one each)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from atprune.errors import ConfigError


class Registry(Mapping[str, type]):
    """Name -> class, read-only for callers, in registration order.

    Args:
        kind: what is registered, for programming errors (``"pruner"``).
        option: what users call it, for their errors (``"pruning method"``).
    """

    def __init__(self, kind: str, option: str):
        self.kind, self.option = kind, option
        self._classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: register the class under ``name`` and set ``cls.name``.

        Raises:
            ValueError: if ``name`` is already taken by another class (a programming error, not user input).
        """

        def decorate(cls: type) -> type:
            if self._classes.get(name, cls) is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered by "
                                 f"{self._classes[name].__qualname__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def lookup(self, name: str) -> type:
        """The class registered as ``name``.

        Raises:
            ConfigError: for an unknown name (the message lists the known ones).
        """
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(f"unknown {self.option} {name!r}; choose one of: {', '.join(self._classes)}") from None

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)
