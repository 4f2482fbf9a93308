"""Per-sample keys, fixed-size chunks and the one sharding policy (docs/samplers.md §6).

Every Monte Carlo in :mod:`sde` (finite networks, SDE paths, one-layer estimates) maps a
function over sample indices the same way:

- sample ``i`` uses ``fold_in(key, i)`` (:func:`sample_keys`), so results do not depend on
  the chunk size, the number of devices or the order in which chunks run;
- the indices are cut into chunks of one fixed size (:func:`map_chunks`; the last chunk is
  padded with extra indices whose results are dropped), so each configuration compiles once;
- each compiled call gives every device of the mesh one chunk (:func:`sample_mesh`,
  :func:`sharded_jit`, ``shard_map``: every device runs the same program on its share,
  LAPACK calls included), so a multi-GPU or TPU host is used with no code change, and each
  device computes exactly the batches one device would: results are identical bit for bit
  whatever the number of devices;
- in a run over several processes (:mod:`sde._helpers.processes`) the mesh spans the devices
  of every process: each process feeds its devices' shares and every process receives the
  whole result (docs/experiments.md §4).
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "samples"

SHARD_ON_CPU = False
"""Also split calls over several *CPU* devices of one process
(``--xla_force_host_platform_device_count``); one CPU device per process is always used.

Off: with 2 CPU devices in one process the m = 64 SDE solve deadlocks inside XLA's CPU
runtime (seen with jax 0.10.2, and again on 2026-12-02). Accelerators are always sharded."""


def sample_mesh() -> Optional[Mesh]:
    """A one-axis mesh ``("samples",)`` over the devices of every process; None for a single
    device. CPU devices: one per process unless :data:`SHARD_ON_CPU`."""
    devices = jax.devices()
    if devices[0].platform == "cpu" and not SHARD_ON_CPU:
        first: dict = {}
        for d in devices:
            first.setdefault(d.process_index, d)
        devices = list(first.values())
    if len(devices) < 2:
        return None
    return Mesh(np.asarray(devices), (AXIS,))


def num_shards(mesh: Optional[Mesh]) -> int:
    """Devices a chunk is split over (1 without a mesh)."""
    return 1 if mesh is None else mesh.size


def sharded_jit(fn: Callable, mesh: Optional[Mesh]) -> Callable:
    """``jax.jit`` of ``fn(batched, shared)``: ``batched`` (a pytree) is split over ``mesh``
    along its leading axis, ``shared`` (a pytree) is replicated, outputs are split like
    ``batched``. Without a mesh: plain ``jax.jit``. A mesh over several processes takes host
    arrays (every process passes the same values) and returns host arrays of the whole result
    on every process."""
    if mesh is None:
        return jax.jit(fn)
    spec = PartitionSpec(AXIS)
    compiled = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec,
                                     check_vma=False))
    if mesh.is_multi_process:
        return functools.partial(_call_across_processes, compiled, mesh)
    return compiled


def _call_across_processes(compiled: Callable, mesh: Mesh, batched, shared):
    """``compiled(batched, shared)`` over a mesh that spans processes: each process builds its
    devices' shares of the global inputs from its (identical) host copies, and every process
    gathers the whole output."""
    from jax.experimental import multihost_utils  # noqa: PLC0415  (multi-process runs only)

    def global_array(x, spec):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their data
            impl = jax.random.key_impl(x)
            data = global_array(jax.random.key_data(x), PartitionSpec(*spec, None))
            return jax.random.wrap_key_data(data, impl=impl)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    batched = jax.tree_util.tree_map(lambda x: global_array(x, PartitionSpec(AXIS)), batched)
    shared = jax.tree_util.tree_map(lambda x: global_array(x, PartitionSpec()), shared)
    return multihost_utils.process_allgather(compiled(batched, shared), tiled=True)


def unit_key(seed: int, name: str) -> jax.Array:
    """The key of one named work unit of a run: ``fold_in(PRNGKey(seed), crc32(name))``, so it
    depends on the seed and the unit's identity only (never on which units ran before)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))


def sample_keys(key: jax.Array, indices) -> jax.Array:
    """Keys ``fold_in(key, i)`` of the sample indices ``i`` (independent of chunking)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(indices, jnp.uint32))


def map_chunks(fn: Callable[[np.ndarray], object], start: int, stop: int, chunk_size: int,
               multiple: int = 1, progress: Optional[str] = None):
    """``fn(indices)`` over samples ``start..stop-1`` in calls of one fixed size, results
    concatenated along the leading axis (a pytree of arrays).

    Each call covers ``multiple`` (the number of shards) consecutive chunks of
    ``min(chunk_size, stop - start)`` indices, one chunk per shard, so a device computes the
    same batches whatever the number of shards; the last call's indices run past ``stop`` and
    those results are dropped, so ``fn`` compiles once. ``progress``: the description of a
    tqdm bar over calls.
    """
    size = min(chunk_size, stop - start) * multiple
    outs = []
    firsts = range(start, stop, size)
    if progress is not None:
        from tqdm.auto import tqdm  # noqa: PLC0415  (only for interactive runs)

        firsts = tqdm(firsts, desc=progress)
    for first in firsts:
        out = fn(np.arange(first, first + size))
        keep = min(size, stop - first)
        outs.append(jax.tree_util.tree_map(lambda x: x[:keep], out))
    if len(outs) == 1:
        return outs[0]
    def concat(*xs):
        return (np if isinstance(xs[0], np.ndarray) else jnp).concatenate(xs, axis=0)

    return jax.tree_util.tree_map(concat, *outs)
