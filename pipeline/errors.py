"""User errors: input the user can fix (a path, a value, a file), reported as one line.

Raise :class:`UserError` (or a subclass) with a message that names the file or value and the
reason. ``simplebits`` prints ``simplebits: error: <message>`` and exits with status 2; the
traceback appears only with ``--debug``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """A mistake in the user's input; the message alone must tell them what to fix."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (or a step's output they pointed to) does not exist.

    Still a :class:`FileNotFoundError`, so code that handles a missing file keeps working.
    """
