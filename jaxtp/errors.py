"""Errors that are the user's mistake, told apart from bugs.

The command line (`jaxtp.cli`) prints a `UserError` as one line on stderr and exits with status 2; any other
exception is a bug in jaxtp (or in what it calls) and keeps its traceback. A library error that is always the
caller's mistake can say so by deriving from `UserError` next to its builtin type, e.g.
`class CheckpointError(UserError, ValueError)`: `UserError` adds no state, so it combines with any exception.

jaxtp's checks raise plain `ValueError` / `OSError` too, which are user mistakes only where the value checked
came from the user. `user_input` marks such a call: the CLI wraps each check of a flag, file or mesh in it, and
nothing else, so the same exception types raised anywhere else still show their traceback.
"""

from __future__ import annotations

import contextlib


class UserError(Exception):
    """A mistake in what the user asked for (a flag, a file, a mesh the machine cannot make): the message says
    what is wrong and how to fix it, in one line."""


@contextlib.contextmanager
def user_input(*types: type[BaseException], what: str = ""):
    """Exceptions of `types` raised inside are a check of the user's input failing: re-raised as UserError
    (with the original as its cause), its message prefixed by `what: ` if given (say, the flag)."""
    try:
        yield
    except UserError:
        raise
    except types as e:
        raise UserError(f"{what}: {e}" if what else str(e)) from e
