"""Child processes of the test harness die with the test process.

``die_with_parent`` is a ``preexec_fn`` that asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill
the child when the process that started it exits, so a test run killed by a timeout leaves no registry or
daemon behind. Fixtures still stop their children by PID; this is the backstop.
"""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Run in the child between fork and exec: SIGKILL it when the parent thread exits."""
    _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
