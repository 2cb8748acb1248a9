"""The Dask cluster: connecting, and the few calls a parallel oracle makes on it.

Everything Dask-specific lives here (imported lazily, so ``import zoopt`` stays light):
starting a local cluster or joining one by address, the worker list, broadcasting data,
submitting a task that prefers a worker, and waiting for tasks with a timeout that names
what did not finish.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..oracle import OracleError

__all__ = ["OracleTimeout", "broadcast", "cluster", "connect", "gather", "submit", "workers_of"]


class OracleTimeout(OracleError, TimeoutError):
    """A parallel evaluation did not finish within the oracle's ``timeout``."""


def _check_workers(workers: int | None) -> None:
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1
    ):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")


def connect(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    timeout: float = 60.0,
) -> Any:
    """A Dask ``Client``: a new local cluster, or an existing cluster by address.

    Args:
        workers: local cluster: number of worker processes (default: one per CPU core), each
            with one thread (so one torch thread: the workers are the parallelism).
            With ``scheduler``: wait until at least this many workers have joined.
        scheduler: address of a running scheduler, e.g. ``"tcp://10.0.0.5:8786"``.
        timeout: seconds to wait for the scheduler / the workers.

    Returns:
        ``distributed.Client``; use it as a context manager. Closing a client made for a
        local cluster also shuts the cluster down; closing one made by address leaves the
        cluster up.
    """
    from distributed import Client

    _check_workers(workers)
    if not (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if scheduler is None:
        import dask

        n = int(workers) if workers is not None else max(1, os.cpu_count() or 1)
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which also turns off
        # glibc's adaptive mmap threshold: every large activation tensor is then mmapped and
        # page-faulted afresh. That measured ~35 % slower (wall) on the torch engine here;
        # our workers run few, long tasks, so they keep glibc's defaults instead.
        # Keyword arguments (not a LocalCluster object) make the client own the cluster,
        # so closing the client also stops the workers.
        # The active memory manager (ReduceReplicas, every 2 s) drops the broadcast copies
        # no task is waiting for between steps: the next step then fetches the oracle
        # factory (a whole model) to a worker again. Our broadcasts are meant to stay.
        with dask.config.set({
            "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            "distributed.scheduler.active-memory-manager.start": False,
        }):  # fmt: skip
            return Client(
                n_workers=n,
                threads_per_worker=1,
                dashboard_address=None,
                processes=True,
                timeout=timeout,
            )
    if not isinstance(scheduler, str) or "://" not in scheduler:
        raise ValueError(f"scheduler must be an address like 'tcp://host:8786', got {scheduler!r}")
    deadline = time.monotonic() + timeout
    if scheduler.startswith("tcp://"):
        # Dask's own connect waits forever on a peer that accepts and stays silent, and
        # reads an HTTP answer as a frame length (a 3 EiB allocation): check the peer first
        _probe_scheduler(scheduler, deadline, timeout)
    client = Client(scheduler, timeout=max(1.0, deadline - time.monotonic()))
    if workers is not None:
        try:
            client.wait_for_workers(int(workers), timeout=timeout)
        except BaseException:
            client.close()
            raise
    return client


#: a scheduler's handshake is a small dict; a first frame claiming more is not Dask
_MAX_HANDSHAKE_BYTES = 16 * 2**20


def _probe_scheduler(address: str, deadline: float, timeout: float) -> None:
    """Check that ``tcp://host:port`` answers like a Dask scheduler before ``deadline``.

    A Dask listener sends its handshake first: an 8-byte little-endian frame length, then
    that many bytes. A refused connection is retried until the deadline (the scheduler may
    be starting); a peer that accepts but sends nothing, or sends something else, is
    refused with ``TimeoutError``/``ConnectionError`` naming the address.
    """
    host, port = _host_port(address)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"no Dask scheduler answered at {address} within timeout={timeout} s"
            )
        try:
            sock = socket.create_connection((host, port), timeout=left)
            break
        except ConnectionRefusedError:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            continue
        except OSError as exc:
            raise ConnectionError(f"cannot reach the scheduler at {address}: {exc}") from exc
    with sock:
        header = b""
        while len(header) < 8:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{address} accepted the connection but sent no Dask handshake within "
                    f"timeout={timeout} s: is it a Dask scheduler?"
                )
            sock.settimeout(left)
            try:
                chunk = sock.recv(8 - len(header))
            except TimeoutError:
                continue
            except OSError as exc:
                raise ConnectionError(f"the scheduler at {address} failed: {exc}") from exc
            if not chunk:
                raise ConnectionError(
                    f"{address} closed the connection without a Dask handshake: is it a Dask "
                    "scheduler?"
                )
            header += chunk
    (size,) = struct.unpack("<Q", header)
    if not 0 < size <= _MAX_HANDSHAKE_BYTES:
        raise ConnectionError(
            f"{address} answered {header!r}, not a Dask handshake: is it a Dask scheduler?"
        )


def _host_port(address: str) -> tuple[str, int]:
    """``tcp://host:port`` (IPv6 hosts in brackets) as ``(host, port)``."""
    rest = address.split("://", 1)[1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"scheduler address {address!r} has no port (e.g. 'tcp://host:8786')")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def cluster(
    workers: int | None = None, scheduler: str | None = None, client: Any = None
) -> Iterator[Any]:
    """A client for the duration of a ``with`` block.

    ``client``: an existing ``distributed.Client``, used as is and left open; otherwise
    :func:`connect` (``workers``, ``scheduler``) makes one and closes it on exit (a local
    cluster is shut down with it).
    """
    if client is None:
        with connect(workers, scheduler) as made:
            yield made
        return
    check_client(client)
    if workers is not None or scheduler is not None:
        raise ValueError(
            f"pass either client= or workers=/scheduler=, not both (got workers={workers!r}, "
            f"scheduler={scheduler!r})"
        )
    yield client


def check_client(client: Any) -> Any:
    """``client`` if it is a ``distributed.Client``, else ``TypeError``."""
    from distributed import Client

    if not isinstance(client, Client):
        raise TypeError(f"client must be a distributed.Client (see connect()), got {client!r}")
    return client


def workers_of(client: Any, timeout: float | None) -> list[str]:
    """Addresses of the cluster's workers, sorted; waits for one if there is none yet."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        client.wait_for_workers(1, timeout=timeout)
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    return workers


def broadcast(client: Any, obj: Any, timeout: float | None, what: str) -> Any:
    """Put ``obj`` on every worker once; a future for the tasks that need it."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    try:
        return client.scatter(obj, broadcast=True, hash=False, **kwargs)
    except TimeoutError:
        raise OracleTimeout(
            f"sending {what} to the workers did not finish within timeout={timeout} s"
        ) from None


def submit(client: Any, fn: Callable[..., Any], key: str, worker: str, *args: Any) -> Any:
    """Run ``fn(*args)`` as task ``key``, preferably on ``worker``.

    The worker is a preference, not a pin: if it dies, the task runs elsewhere.
    """
    with warnings.catch_warnings():
        # arrays given with the task (chunks of coordinates or rows) trip Dask's warning
        warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
        return client.submit(
            fn, *args, key=key, workers=[worker], allow_other_workers=True, pure=False
        )


def gather(
    client: Any,
    futures: list[Any],
    timeout: float | None,
    what: str,
    queries: tuple[int, int] | None = None,
) -> list[Any]:
    """Results of the tasks, in order.

    Raises:
        OracleTimeout: not all done within ``timeout`` seconds.
        OracleError: a task failed (naming ``what`` and the query range ``queries``).

    Unfinished tasks are cancelled when the wait ends early (timeout, failure, Ctrl-C).
    """
    from distributed import wait

    try:
        try:
            wait(futures, timeout=timeout)
        except TimeoutError:
            done = sum(f.done() for f in futures)
            raise OracleTimeout(
                f"parallel {what} did not finish within timeout={timeout} s "
                f"({done} of {len(futures)} worker tasks done); "
                "raise ParallelOracle(timeout=...) or check the cluster"
            ) from None
        return client.gather(futures)
    except (OracleTimeout, KeyboardInterrupt):
        client.cancel(futures)
        raise
    except Exception as exc:
        client.cancel(futures)
        where = "" if queries is None else f" on queries {queries[0]}..{queries[1]}"
        raise OracleError(
            f"the parallel {what} failed{where} ({type(exc).__name__}: {exc})"
        ) from exc
