"""Monte Carlo of finite networks at initialisation: ``V_l = X_l X_l^T / n``, l = 0..depth.

The samplers run the same block equations (:func:`shaped_attn.functional.block_apply`, the
one source of the formulas) and differ only in how each fresh weight matrix is realised
(docs/samplers.md):

* ``"weights"``: the real :class:`shaped_attn.blocks.Block` modules, ``theory`` init,
  created from a key inside ``jax.vmap`` (one layer's weights in memory at a time, made in
  the scan over layers): the reference.
* ``"gram"``: the exact Gram sampler (docs/samplers.md §1, §3): O(m^2 n) per map.
* ``"reduced"``: blocks without LayerNorm, on ~3m stored features (docs/samplers.md §4):
  exact in law, about 2-3x faster than ``"gram"``.
* ``"auto"``: ``"reduced"`` where it applies, else ``"gram"``.

Sample i uses ``fold_in(key, i)``, so results do not depend on the chunk size or the number
of devices (docs/samplers.md §6). The input tokens are :func:`initial_tokens`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from shaped_attn.config import BlockConfig
from shaped_attn.functional import block_apply

from .._helpers.devices import map_chunks, num_shards, sample_keys, sample_mesh, sharded_jit
from .._helpers.ensemble import Ensemble
from .._helpers.linalg import gram
from .._helpers.validation import check_choice, check_int, check_number, check_psd_matrix
from .gram_maps import gram_maps
from .inputs import ConfigLike, initial_tokens, sized_config
from .reduced import reduced_layout, reduced_maps, reduced_tokens, reduced_unsupported

SAMPLERS = ("gram", "weights", "reduced", "auto")


def resolve_sampler(cfg: BlockConfig, sampler: str) -> str:
    """``sampler``, with ``"auto"`` resolved to the fastest exact one (``"reduced"`` where
    :func:`reduced_unsupported` allows, else ``"gram"``); a ValueError if ``"reduced"`` is
    asked for a block it cannot run."""
    check_choice("sampler", sampler, SAMPLERS)
    reason = reduced_unsupported(cfg)
    if sampler == "auto":
        return "gram" if reason else "reduced"
    if sampler == "reduced" and reason:
        raise ValueError(f"sampler='reduced' does not support this block: {reason}; "
                         "use sampler='gram', 'weights' or 'auto'")
    return sampler


def layer(cfg: BlockConfig, sampler: str, x: jax.Array, key: jax.Array) -> jax.Array:
    """One block applied to one sample's tokens ``x`` with fresh weights from ``key`` (for
    ``"reduced"``: ``x`` stored as in :func:`reduced_layout`)."""
    if sampler == "reduced":
        lay = reduced_layout(cfg, x.shape[-2])
        x = reduced_tokens(x, lay.block_out, lay.width)
        maps = reduced_maps(cfg, key, x.shape[-2])
    elif sampler == "gram":
        maps = gram_maps(cfg, key, x.shape[-2])
    else:
        from flax import nnx  # noqa: PLC0415  (flax only where modules are built)

        from shaped_attn.blocks import Block  # noqa: PLC0415

        maps = Block(cfg, rngs=nnx.Rngs(params=key)).maps()
    return block_apply(cfg, x, maps=maps)


def _chain(cfg: BlockConfig, sampler: str, depth: int, x0: jax.Array, key: jax.Array):
    """``V_l`` for l = 0..depth of one sample: ``(depth + 1, m, m)``."""

    def step(x, layer_key):
        x = layer(cfg, sampler, x, layer_key)
        return x, gram(x)

    start = x0
    if sampler == "reduced":
        start = reduced_tokens(x0, x0.shape[-1], reduced_layout(cfg, x0.shape[-2]).width)
    _, V = jax.lax.scan(step, start, jax.random.split(key, depth))
    return jnp.concatenate([gram(x0)[None], V], axis=0)


def stop_samples(V: np.ndarray, width: int, stop_norm: float) -> Ensemble:
    """The finite ensemble of ``V (S, depth + 1, m, m)`` at times ``l / width``, with samples
    stopped at the first layer where ``V`` is non-finite or ``max |V| > stop_norm`` and frozen
    at their last good value from there on (docs/stopping.md §3)."""
    V = np.array(V, copy=True)
    depth1 = V.shape[1]
    bad = ~np.all(np.isfinite(V), axis=(-2, -1))
    bad |= np.nanmax(np.abs(np.where(np.isfinite(V), V, np.inf)), axis=(-2, -1)) > stop_norm
    if np.any(bad[:, 0]):
        raise ValueError(f"V0 has an entry above stop_norm={stop_norm:g}")
    stopped = bad.any(axis=1)
    stop_layer = bad.argmax(axis=1)
    for i in np.flatnonzero(stopped):
        V[i, stop_layer[i]:] = V[i, stop_layer[i] - 1]
    t = np.arange(depth1) / width
    return Ensemble(t=t, V=V, stopped=stopped, stop_time=np.where(stopped, stop_layer / width, np.inf))


class FiniteSampler:
    """A compiled Monte Carlo of one network: :meth:`chunk` gives samples ``[start, stop)``.

    Compiles once per chunk size; :func:`simulate_finite`, the one-layer estimator and the
    resumable experiment share it.
    """

    def __init__(self, V0, config: ConfigLike, *, width: int, depth: int,
                 sampler: str = "gram", key_width: Optional[int] = None):
        check_choice("sampler", sampler, SAMPLERS)
        V0 = check_psd_matrix("V0", V0)
        self.depth = check_int("depth", depth)
        self.width = check_int("width", width)
        self.cfg = sized_config(config, width, key_width, V0.dtype)
        self.sampler = resolve_sampler(self.cfg, sampler)  # "auto" resolved
        self.x0 = initial_tokens(V0, width)
        self.mesh = sample_mesh()
        cfg, sampler, depth = self.cfg, self.sampler, self.depth
        self._run = sharded_jit(
            lambda keys, x0: jax.vmap(lambda k: _chain(cfg, sampler, depth, x0, k))(keys), self.mesh)

    def chunk(self, key: jax.Array, start: int, stop: int, *, tokens: Optional[jax.Array] = None,
              chunk_size: Optional[int] = None, progress: Optional[str] = None) -> np.ndarray:
        """``V`` of samples ``start..stop-1``, ``(stop - start, depth + 1, m, m)``, from the
        input tokens ``tokens`` (default: those of ``V0``), computed in compiled calls of
        ``chunk_size`` samples per device (default: all at once, split over the devices);
        ``progress``: a tqdm description."""
        x0 = self.x0 if tokens is None else tokens
        shards = num_shards(self.mesh)
        size = -(-(stop - start) // shards) if chunk_size is None else check_int("chunk_size", chunk_size)
        return map_chunks(lambda idx: np.asarray(self._run(sample_keys(key, idx), x0)),
                          start, stop, size, shards, progress)


def sample_bytes(cfg: BlockConfig, m: int, depth: int, sampler: str) -> int:
    """Working memory of one sample of ``m`` tokens on its device: a layer's weights
    (``"weights"``) or features, and its ``V_0 .. V_depth`` (an estimate)."""
    n, itemsize = cfg.width, jnp.dtype(cfg.param_dtype).itemsize
    return ((8 * n * n if sampler == "weights" else 64 * n) + (depth + 1) * m * m) * itemsize


def default_chunk_size(cfg: BlockConfig, m: int, depth: int, sampler: str, budget_bytes: float = 2e9) -> int:
    """Samples per chunk so that a chunk's working set stays near ``budget_bytes``."""
    return int(max(1, min(4096, budget_bytes // sample_bytes(cfg, m, depth, sampler))))


def simulate_finite(
    V0,
    config: ConfigLike,
    *,
    width: int,
    depth: int,
    num_samples: int,
    key: jax.Array,
    sampler: str = "auto",
    key_width: Optional[int] = None,
    chunk_size: Optional[int] = None,
    stop_norm: float = 1e4,
    progress: bool = False,
) -> Ensemble:
    """Covariances ``V_l = X_l X_l^T / n``, l = 0..depth, of ``num_samples`` finite networks.

    Arguments:
      V0: ``(m, m)`` symmetric PSD input covariance; its dtype sets the computation dtype.
      config: a :class:`BlockConfig` template or ``width -> BlockConfig`` (e.g.
        ``functools.partial(shaped_config, gamma=0.35)``); width, key width and MLP hidden
        width are set from the arguments.
      width, depth, num_samples: n, d and the number of independent networks.
      key: the run's key; sample i uses ``fold_in(key, i)``.
      sampler: ``"auto"`` (default: ``"reduced"`` where it applies, else ``"gram"``),
        ``"gram"``, ``"reduced"`` or ``"weights"`` (real modules, the reference).
      key_width: n_k per head (default: width for one head, width / H for H heads).
      chunk_size: samples per compiled call (default from a 2 GB memory budget).
      stop_norm: blow-up threshold on ``max |V|`` (docs/stopping.md §3).
      progress: show a tqdm bar over chunks.

    Returns:
      :class:`Ensemble` with ``t = l / width`` (``depth + 1`` layers) and stop times in the
      same units.
    """
    check_int("num_samples", num_samples)
    check_number("stop_norm", stop_norm)
    runner = FiniteSampler(V0, config, width=width, depth=depth, sampler=sampler, key_width=key_width)
    if chunk_size is None:
        chunk_size = default_chunk_size(runner.cfg, runner.x0.shape[0], depth, runner.sampler)
    V = runner.chunk(key, 0, num_samples, chunk_size=chunk_size,
                     progress=f"finite ({runner.sampler})" if progress else None)
    return stop_samples(V, width, stop_norm)
