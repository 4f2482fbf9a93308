"""Per-sample keys, fixed-size chunks and the one sharding policy (docs/samplers.md §6).

Every Monte Carlo in :mod:`sde` (finite networks, SDE paths, one-layer estimates) maps a
function over sample indices the same way:

- sample ``i`` uses ``fold_in(key, i)`` (:func:`sample_keys`), so results do not depend on
  the chunk size, the number of devices or the order in which chunks run;
- the indices are cut into chunks of one fixed size (:func:`map_chunks`; the last chunk is
  padded with extra indices whose results are dropped), so each configuration compiles once;
- each chunk's sample axis is split over all local devices (:func:`sample_mesh`,
  :func:`sharded_jit`, ``shard_map``: every device runs the same program on its share,
  LAPACK calls included), so a multi-GPU or TPU host is used with no code change.
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

AXIS = "samples"

SHARD_ON_CPU = False
"""Also split chunks over several *CPU* devices (``--xla_force_host_platform_device_count``).

Off: with 2 CPU devices the m = 64 SDE solve deadlocked inside XLA's CPU runtime (jax 0.10.2)
as soon as a device had more than 2 paths of a chunk. Accelerators are always sharded."""


def sample_mesh() -> Optional[Mesh]:
    """A one-axis mesh ``("samples",)`` over all local devices; None for a single device and
    for CPU devices unless :data:`SHARD_ON_CPU`."""
    devices = jax.local_devices()
    if len(devices) < 2 or (devices[0].platform == "cpu" and not SHARD_ON_CPU):
        return None
    return Mesh(np.asarray(devices), (AXIS,))


def num_shards(mesh: Optional[Mesh]) -> int:
    """Devices a chunk is split over (1 without a mesh)."""
    return 1 if mesh is None else mesh.size


def sharded_jit(fn: Callable, mesh: Optional[Mesh]) -> Callable:
    """``jax.jit`` of ``fn(batched, shared)``: ``batched`` (a pytree) is split over ``mesh``
    along its leading axis, ``shared`` (a pytree) is replicated, outputs are split like
    ``batched``. Without a mesh: plain ``jax.jit``."""
    if mesh is None:
        return jax.jit(fn)
    spec = PartitionSpec(AXIS)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec,
                                 check_vma=False))


def unit_key(seed: int, name: str) -> jax.Array:
    """The key of one named work unit of a run: ``fold_in(PRNGKey(seed), crc32(name))``, so it
    depends on the seed and the unit's identity only (never on which units ran before)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))


def sample_keys(key: jax.Array, indices) -> jax.Array:
    """Keys ``fold_in(key, i)`` of the sample indices ``i`` (independent of chunking)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(indices, jnp.uint32))


def map_chunks(fn: Callable[[np.ndarray], object], start: int, stop: int, chunk_size: int,
               multiple: int = 1, progress: Optional[str] = None):
    """``fn(indices)`` over samples ``start..stop-1`` in chunks of one fixed size, results
    concatenated along the leading axis (a pytree of arrays).

    The size is ``min(chunk_size, stop - start)`` rounded up to a multiple of ``multiple``
    (the number of shards); the last chunk's indices run past ``stop`` and those results are
    dropped, so ``fn`` compiles once. ``progress``: the description of a tqdm bar over chunks.
    """
    size = -(-min(chunk_size, stop - start) // multiple) * multiple
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
