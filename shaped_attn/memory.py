"""Memory a run needs and what the machine has, for guards that refuse a run before any work
(docs/experiments.md §5 and §6).

:func:`program_bytes` asks XLA how much memory one call of a jitted function takes at given
shapes, without allocating anything; :func:`require` turns a comparison with the available
memory into one ValueError line.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.extend

GIB = 2.0**30

TRUSTED_BYTES = 2**56
"""Programs whose traced arrays add up to more than this (64 PiB) are not compiled: their
size is already beyond any machine and XLA's 64-bit byte counts could overflow."""


def host_memory() -> int:
    """Bytes of host memory available now (``MemAvailable`` on Linux, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(host: int) -> int:
    """Bytes of memory of one local accelerator (``host`` for CPU devices or when unknown)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return host
    stats = device.memory_stats() or {}
    return int(stats.get("bytes_limit", host))


def array_bytes(tree: Any) -> int:
    """Exact bytes of the arrays (or ``ShapeDtypeStruct``s, avals) of a pytree, as a Python int."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _jaxpr_bytes(jaxpr) -> int:
    """Bytes of every value a jaxpr and its sub-jaxprs define (inputs and each equation's
    outputs, no reuse): an upper bound of what the program touches, in Python ints."""
    total = array_bytes([v.aval for v in jaxpr.invars if hasattr(v.aval, "shape")])
    for eqn in jaxpr.eqns:
        total += array_bytes([v.aval for v in eqn.outvars if hasattr(v.aval, "shape")])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _jaxpr_bytes(sub)
    return total


def _traced(fn: Callable, *args: Any):
    """``jax.jit(fn)`` traced at ``args`` and the bytes of every value it defines."""
    traced = jax.jit(fn).trace(*args)
    return traced, _jaxpr_bytes(traced.jaxpr.jaxpr)


def _compiled_need(traced, bound: int) -> int:
    if bound > TRUSTED_BYTES:
        return bound
    stats = traced.lower().compile().memory_analysis()
    if stats is None:  # a backend without memory analysis: the values themselves
        return bound
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def program_bytes(fn: Callable, *args: Any) -> int:
    """Bytes one call of ``jax.jit(fn)(*args)`` needs on its device: XLA's arguments, outputs
    and temporaries, less the outputs that reuse argument buffers. ``args`` may be
    ``jax.ShapeDtypeStruct``s; nothing is allocated or run. A program whose traced values add up
    to more than :data:`TRUSTED_BYTES` is not compiled and that sum is returned instead."""
    return _compiled_need(*_traced(fn, *args))


def available_bytes() -> tuple[int, str]:
    """Memory one device has and its kind (``"host"`` on CPU, ``"device"`` otherwise)."""
    kind = "host" if jax.local_devices()[0].platform == "cpu" else "device"
    return device_memory(host_memory()), kind


def require(what: str, need: int, copies: int = 1) -> None:
    """ValueError when ``copies`` programs of ``need`` bytes each do not fit in one device's
    memory: one line, ``"{what} needs X GiB of device memory, Y GiB available"``."""
    available, kind = available_bytes()
    total = copies * need
    if total > available:
        times = f" ({copies} at a time)" if copies > 1 else ""
        raise ValueError(f"{what} needs {total / GIB:.3g} GiB of {kind} memory{times}, "
                         f"{available / GIB:.3g} GiB available")


def require_program(what: str, fn: Callable, *args: Any, copies: int = 1) -> None:
    """:func:`require` for ``copies`` calls of ``jax.jit(fn)(*args)`` at once. The sum of the
    traced values (every value the program defines, no reuse) bounds XLA's need from above;
    when it takes at most half the memory the program fits and is not compiled, otherwise
    :func:`program_bytes`'s count decides."""
    traced, bound = _traced(fn, *args)
    if copies * bound <= available_bytes()[0] // 2:
        return
    require(what, _compiled_need(traced, bound), copies)
