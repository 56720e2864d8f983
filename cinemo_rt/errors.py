"""The one exception for bad user input: the CLI prints its message and exits with code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the problem and the fix."""
