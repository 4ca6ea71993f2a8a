"""The one base class of user-facing errors: bad input (a file, a key, a value, a server) rather than a bug.

Every command's handler (``cli_errors.UserErrorGroup``) prints a ``UserError`` as one ``error: …`` line and exits 1;
any other exception is a bug and keeps its traceback. Subclass it (with ``ValueError``/``OSError`` as a second base
where callers already catch those) and write the message as one sentence naming the input and what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix; its message is one sentence naming the file, key, value or server."""
