"""The base of every error edgeattn raises for bad input, so the CLI can report it in one line.

Kept free of heavy imports: the runtime-only install uses it too.
"""


class EdgeattnError(Exception):
    """Bad input or an impossible request; the message says what and why."""


class InvalidOptionError(EdgeattnError, ValueError):
    """An option or argument outside its allowed range."""
