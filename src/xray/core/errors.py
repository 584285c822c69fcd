"""The one base class of the errors that are the user's input (configuration, data, checkpoints)."""

from __future__ import annotations


class UserError(Exception):
    """Mixed into each user-facing error beside its built-in base (``ValueError``, ``FileNotFoundError``,
    ...): the entry points report any of them as one ``error:`` line and exit code 2, not a traceback."""
