"""Processes the gateway starts stop when the process that started them dies.

A worker process or an embedded Redis left running after a `kill -9` of its supervisor would
keep the port or the data directory: the next start would be refused, or worse, share them.
On Linux the kernel signals a child when its parent dies (`PR_SET_PDEATHSIG`); elsewhere this
does nothing and a service manager's process-group kill is the remedy.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux only)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum)


def orphaned(parent_pid: int) -> bool:
    """Whether the parent already died before `die_with_parent` was in force."""
    return os.getppid() != parent_pid
