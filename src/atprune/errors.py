"""Errors raised on bad user input.

Every check that can fail because of what a user asked for raises :class:`ConfigError`
(a ``ValueError``), with one line saying what was wrong and what is allowed. The CLI turns
it into that line on stderr and exit code 2, before any heavy work starts.
"""


class ConfigError(ValueError):
    """Bad user input: an illegal option value, a missing file or package, an unknown name."""
