"""Child processes of the test harness die with the test process.

``die_with_parent`` is a ``preexec_fn`` that asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill
the child when the process that started it exits, so a test run killed by a timeout leaves no registry or
daemon behind. Fixtures still stop their children by PID; this is the backstop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Run in the child between fork and exec: SIGKILL it when the parent thread exits."""
    _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Stop ``proc`` by PID: SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
