"""The CLI's one error boundary: which exceptions are the user's to fix (one line, no traceback)
and the exit code each gets.

Each layer has its own root class (embsum.errors.EmbsumError for the model, embsum.index.errors.
StorageError for storage, UserError here for jobs), because embsum/ and index/ never import
each other; this module is the one place that knows all three.

Exit codes (documented in the README):
    0    success
    1    a user error: the message says what to fix
    2    a usage error (bad flag or value; click's own code)
    75   the catalog stayed busy with another job longer than --wait (EX_TEMPFAIL)
    130  interrupted (Ctrl-C or SIGTERM); finished work is committed, the re-run resumes
    70   an internal error (a bug): one line, and the traceback with -v
"""

from __future__ import annotations

from embsum.index.errors import CatalogBusy, StorageError

from embsum.errors import EmbsumError

EXIT_USER = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_BUSY = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A job-level condition the user must fix (one line, exit code 1)."""


class Interrupted(Exception):
    """A job stopped on Ctrl-C/SIGTERM after committing what it had finished (exit code 130)."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, EmbsumError, StorageError)


def exit_code(err: BaseException) -> int:
    if isinstance(err, (Interrupted, KeyboardInterrupt)):
        return EXIT_INTERRUPTED
    if isinstance(err, CatalogBusy):
        return EXIT_BUSY
    if isinstance(err, USER_ERRORS):
        return EXIT_USER
    return EXIT_INTERNAL
