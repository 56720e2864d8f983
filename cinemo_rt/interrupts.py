"""SIGTERM (what `kill`, systemd and container stops send) handled like Ctrl-C.

Every writer here cleans its temporaries in `except BaseException` / `finally` blocks; those run for
KeyboardInterrupt but not when the process dies of an unhandled SIGTERM. Turning SIGTERM into a
KeyboardInterrupt subclass makes one cleanup path serve both.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM: what a shell reports


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def terminate_as_interrupt():
    """While active (main thread only), SIGTERM raises `Terminated` where the program is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code_for(interrupt: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
