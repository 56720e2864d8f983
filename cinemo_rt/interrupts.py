"""SIGTERM (what `kill`, systemd and container stops send) and SIGHUP (a closed terminal) handled like Ctrl-C.

Every writer here cleans its temporaries in `except BaseException` / `finally` blocks; those run for
KeyboardInterrupt but not when the process dies of an unhandled SIGTERM. Turning SIGTERM into a
KeyboardInterrupt subclass makes one cleanup path serve both.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_HANGUP = 130, 143, 129  # 128 + the signal: what a shell reports


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


class HungUp(Terminated):
    """The process received SIGHUP (its terminal or SSH session closed): cleaned up like SIGTERM."""


def _raise_terminated(signum, frame):
    raise HungUp() if signum == getattr(signal, "SIGHUP", None) else Terminated()


@contextmanager
def terminate_as_interrupt():
    """While active (main thread only), SIGTERM and SIGHUP raise `Terminated` where the program is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {number: signal.signal(number, _raise_terminated) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_code_for(interrupt: KeyboardInterrupt) -> int:
    if isinstance(interrupt, HungUp):
        return EXIT_HANGUP
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
