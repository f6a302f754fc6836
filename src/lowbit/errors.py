"""Errors that lowbit reports to the user as a single line."""


class LowbitError(Exception):
    """A user-facing problem (bad path, missing package, unusable input) with its fix in the message."""
