"""What every ``soci`` subcommand shares: the exit-code table, error printing and logging set-up.

Exit codes (documented in the README):

====  ==========================================================================
0     success
1     the operation failed (bad input data, format error, conflict, anything else)
2     usage error (unknown flag, missing argument, bad flag value)
3     not found (image, index, zTOC, file, blob)
4     authentication failed (registry refused the credentials, or none were available)
5     unavailable (registry or containerd cannot be reached)
====  ==========================================================================

Errors are printed to stderr as ``soci: <message>``. This module is the only place that maps exceptions
to exit codes. Messages are built by the code that raises them and never contain secrets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from soci_fs.errors import (
    AlreadyExists,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    SociError,
    Unauthenticated,
    Unavailable,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAUTHENTICATED = 4
EXIT_UNAVAILABLE = 5

# One table: exception class -> exit code. The first matching entry wins (subclasses before bases).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidArgument, EXIT_USAGE),
    (NotFound, EXIT_NOT_FOUND),
    (Unauthenticated, EXIT_UNAUTHENTICATED),
    (Unavailable, EXIT_UNAVAILABLE),
    (FormatError, EXIT_FAILURE),
    (AlreadyExists, EXIT_FAILURE),
    (FailedPrecondition, EXIT_FAILURE),
    (SociError, EXIT_FAILURE),
)

Handler = Callable[[argparse.Namespace], int | None]


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception raised by a command handler."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_FAILURE


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Run one command handler; turn expected errors into ``soci: <message>`` and an exit code."""
    log = logging.getLogger("soci")
    try:
        rc = handler(args)
    except SociError as exc:
        print(f"soci: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("soci: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as exc:
        # Files the user named (missing layout, unwritable output): say which and why.
        log.debug("command failed", exc_info=True)
        print(f"soci: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if rc is None else rc


def setup_logging(debug: bool) -> None:
    """CLI logging: warnings (and with ``--debug`` everything) to stderr as ``level msg`` text lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("level=%(levelname)s msg=%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
