"""Child processes that cannot outlive their parent (Linux ``PR_SET_PDEATHSIG``).

Used for the embedded dev servers (``service/dev/devstack.py``) and for the worker
processes of ``WORKERS=N`` (``service/workers/``): Ctrl-C, an exception or ``kill -9``
of the parent all reach the children.

Hazards: the kernel's "parent" is the *thread* that spawned the child, so children are
spawned from the event loop's thread, never from a worker thread that may exit. And when
a parent with several threads dies, the child is handed from thread to thread as each
exits and gets the signal each time: it may arrive more than once.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from typing import Final

__all__ = ["death_pact"]

_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>


def death_pact(parent_pid: int, death_signal: signal.Signals) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``death_signal`` when the parent dies.

    libc is loaded here, in the parent, because loading libraries after fork is unsafe.
    It runs after Popen's setuid, which matters: changing credentials clears the setting.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def pact() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent_pid:  # parent died before prctl: nobody would signal us
            os._exit(1)

    return pact
