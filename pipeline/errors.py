"""The one exception type for expected errors: bad config, bad input, a missing or wrong file.

Every `filip` command prints such an error as one line, `error: <message>`, and exits 2; anything
else is a bug and prints its traceback (exit 1). The message names the file, key, row or column.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix from the message alone (no traceback is printed)."""
