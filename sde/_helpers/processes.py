"""One run over several processes (hosts): joining them, the one writer, sharing host data
(docs/experiments.md §4).

JAX runs one process per host, joined by ``jax.distributed``; every process runs the same
program (SPMD), and the sample axis of each compiled call is split over the devices of all
processes (:mod:`sde._helpers.devices`). Data that only process 0 holds (chunks read back
from its run directory, an error found while opening it) is broadcast to the others with
:func:`share_bytes`, so that every process takes the same branches and holds the same results.
Only process 0 writes (:func:`is_writer`): other hosts need no shared filesystem.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, TypeVar

import jax
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

from .validation import check_int

T = TypeVar("T")


def _check_coordinator(coordinator: str) -> str:
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator={coordinator!r} must be HOST:PORT with a port in [1, 65535]")
    return str(coordinator)


def join_processes(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                   process_id: Optional[int] = None, timeout_s: int = 300) -> int:
    """Join a multi-process run with ``jax.distributed.initialize``; return the process count.

    - ``coordinator`` ("HOST:PORT" of process 0), ``num_processes`` and ``process_id`` all
      given: join those processes (``timeout_s``: how long to wait for the others).
    - none given: JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI,
      Kubernetes) joins the processes of a detected cluster; elsewhere the run stays
      single-process, as with ``num_processes=1``.

    Joining must come before any JAX computation: once this process has used JAX, detection
    is skipped (the run stays as it is) and explicit arguments are refused. On CPU the
    processes exchange data through gloo (``jax_cpu_collectives_implementation``), so a run can
    be tried on one machine over 127.0.0.1. Joining twice is a no-op.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if num_processes is not None:
        num_processes = check_int("num_processes", num_processes)
    if jax.distributed.is_initialized():
        return jax.process_count()
    if num_processes == 1 and coordinator is None and process_id in (None, 0):
        return 1
    if any(given) and not all(given):
        raise ValueError("coordinator, num_processes and process_id go together: give all three "
                         "or none (JAX then detects a cluster itself)")
    if all(given):
        coordinator = _check_coordinator(coordinator)
        check_int("process_id", process_id, lo=0, hi=num_processes - 1)
    if xla_bridge.backends_are_initialized():  # jax.distributed cannot join any more
        if all(given):
            raise ValueError("join_processes must run before any JAX computation in this process")
        return jax.process_count()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
        return jax.process_count()
    try:
        with warnings.catch_warnings():  # e.g. Kubernetes without the kubernetes package
            warnings.simplefilter("ignore")
            jax.distributed.initialize(initialization_timeout=timeout_s)
    except ValueError:  # no cluster detected: the coordinator stays undefined
        return 1
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def share_bytes(data: Optional[bytes]) -> bytes:
    """Process 0's ``data`` on every process (``data`` is ignored elsewhere)."""
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils  # noqa: PLC0415  (multi-process runs only)

    size = np.array(len(data) if is_writer() else 0, np.int32)
    size = int(multihost_utils.broadcast_one_to_all(size))
    buf = np.frombuffer(data, np.uint8) if is_writer() else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()


def agree(fn: Callable[[], T]) -> Optional[T]:
    """``fn()`` on process 0 only; a ValueError or OSError it raises is raised on every process
    (with process 0's message), so that all of them stop together. Returns ``fn()`` on process 0
    and None elsewhere."""
    result, error = None, b""
    if is_writer():
        try:
            result = fn()
        except (ValueError, OSError) as err:
            error = str(err).encode()
    error = share_bytes(error)
    if error:
        raise ValueError(error.decode())
    return result
