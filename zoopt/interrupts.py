"""Ctrl-C handling for long work: holding it while a block that must not be cut in half runs
(a step's commit, a checkpoint write, an in-place parameter update), and remembering it when
Python itself drops the ``KeyboardInterrupt`` it raised."""

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


class InterruptLatch:
    """Whether a Ctrl-C came during :func:`latched_interrupts`; :meth:`check` acts on it.

    Python runs a signal handler between any two bytecodes, including those of a finalizer
    (``__del__``, a ``weakref`` callback, or an abandoned generator being closed by the garbage
    collector). A ``KeyboardInterrupt`` raised there cannot propagate: Python prints
    "Exception ignored in ..." and carries on, and the user's single Ctrl-C is lost. The latch
    keeps it: a loop calls :meth:`check` at its safe points (between steps) and stops there.
    """

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a Ctrl-C came and was not acted on yet."""
        if self.requested:
            self.requested = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def latched_interrupts() -> Iterator[InterruptLatch]:
    """Ctrl-C raises ``KeyboardInterrupt`` as usual and is also latched (see
    :class:`InterruptLatch`), for the duration of the block.

    Only where Python's own Ctrl-C handler is in place (in the main thread): a handler of the
    user's, or an ignored SIGINT, is left alone and the latch never trips.
    """
    latch = InterruptLatch()
    if threading.current_thread() is not threading.main_thread():
        yield latch
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield latch
        return

    def interrupt(signum: int, frame: Any) -> None:
        latch.requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield latch
    finally:
        signal.signal(signal.SIGINT, previous)
