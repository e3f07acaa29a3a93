"""Errors raised on bad user input.

Every check that can fail because of what a user asked for raises :class:`ConfigError`
(a ``ValueError``), with one line saying what was wrong and what is allowed. The CLI turns
it into that line on stderr and exit code 2, before any heavy work starts.
"""

import math


class ConfigError(ValueError):
    """Bad user input: an illegal option value, a missing file or package, an unknown name."""


def check_positive_int(name: str, value, allowed: str = "a positive integer", optional: bool = False) -> None:
    """Raise :class:`ConfigError` ``"<name> must be <allowed>, got <value>"`` unless ``value`` is an int >= 1 (bool
    is not accepted), or None with ``optional`` (an option left unset)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float, checked: raise :class:`ConfigError` unless it is a finite number (not a bool) with
    ``0 <= sparsity < 1``."""
    if not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and math.isfinite(sparsity)
            and 0.0 <= sparsity < 1.0):
        raise ConfigError(f"sparsity ratio must be in [0, 1), got {sparsity!r}")
    return float(sparsity)
