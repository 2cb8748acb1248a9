"""Holding a Ctrl-C while a block that must not be cut in half runs (a step's commit, a
checkpoint write, an in-place parameter update)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it.

    For short blocks that must not be cut in half (committing a step, writing a checkpoint).
    Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    except ValueError:  # not allowed here (e.g. an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(*held[0])
        elif held and previous == signal.SIG_DFL:
            raise KeyboardInterrupt
