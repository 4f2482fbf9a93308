"""Monte Carlo of finite networks at initialisation: ``V_l = X_l X_l^T / n``, l = 0..depth.

Two samplers run the same block equations (:func:`shaped_attn.functional.block_apply`, the
one source of the formulas) and differ only in how each fresh weight matrix is realised:

* ``"weights"``: the real :class:`shaped_attn.blocks.Block` modules, ``theory`` init,
  created from a key inside ``jax.vmap`` (one layer's weights in memory at a time, made in
  the scan over layers).
* ``"gram"``: the exact sampler of spec/sde.md section 4. At initialisation each weight
  matrix is fresh and used once, so given ``x`` (m x n_in) the product ``x W`` with
  ``W ~ N(0, 1/n_in)`` has iid columns ``N(0, x x^T / n_in)`` and is drawn as
  ``R G`` with ``R R^T = x x^T / n_in`` and ``G`` iid N(0, 1) of shape m x n_out: O(m^2 n)
  work and m n random numbers instead of O(m n^2) and n^2. The m x n features are kept,
  so LayerNorm and the per-feature ReLU stay exact.

Randomness: sample i uses ``fold_in(key, i)``, so results do not depend on the chunk size
or on the number of devices. The sample axis of each chunk is sharded over all local
devices (a one-axis ``Mesh``), so a TPU host or several GPUs are used with no code change.

Input: ``X0 = sqrt(n) chol(V0) Q`` with ``Q`` (m x n) the DCT-II rows ``k = 1..m``
(orthonormal, each orthogonal to the all-ones vector), so ``X0 X0^T / n = V0`` exactly and
every token has zero feature mean (LayerNorm's centring leaves it unchanged).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from shaped_attn.blocks import Block
from shaped_attn.config import BlockConfig
from shaped_attn.functional import BlockMaps, block_apply

from .noise import psd_factor
from .validation import check_choice, check_positive_int, check_positive_real, check_psd_matrix

SAMPLERS = ("gram", "weights")
ConfigLike = Union[BlockConfig, Callable[[int], BlockConfig]]


class FiniteResult(NamedTuple):
    """``V``: ``(S, depth + 1, m, m)``; ``stopped``: ``(S,)``; ``stop_layer``: ``(S,)``.

    A sample is stopped at the first layer where ``V`` is non-finite or ``max |V|`` exceeds
    ``stop_norm``; from that layer on ``V`` holds the last good value, and ``stop_layer`` is
    that layer (``depth + 1`` for samples that never stopped).
    """

    V: np.ndarray
    stopped: np.ndarray
    stop_layer: np.ndarray

    @property
    def stopped_fraction(self) -> float:
        return float(np.mean(self.stopped)) if self.stopped.size else 0.0


def sized_config(config: ConfigLike, width: int, key_width: Optional[int], dtype) -> BlockConfig:
    """``config`` at ``width`` (features and MLP hidden) and ``key_width`` (n_k per head).

    ``config`` is a :class:`BlockConfig` template (its width is replaced) or a callable
    ``width -> BlockConfig``. ``key_width`` defaults to ``width`` for one head and to
    ``width / H`` for H heads.
    """
    check_positive_int("width", width)
    cfg = config(width) if callable(config) else config
    if not isinstance(cfg, BlockConfig):
        raise ValueError(f"config must be a BlockConfig or width -> BlockConfig, got {cfg!r}")
    heads = cfg.attention.num_heads
    if key_width is None:
        key_width = width if heads == 1 else width // heads
    check_positive_int("key_width", key_width)
    attention = dataclasses.replace(cfg.attention, width=width, head_dim=key_width)
    return dataclasses.replace(
        cfg, attention=attention, mlp_hidden=width, param_dtype=jnp.dtype(dtype).name
    )


def initial_tokens(V0, width: int) -> jax.Array:
    """Deterministic ``X0`` (m x n) with ``X0 X0^T / n = V0`` (see the module docstring)."""
    V0 = jnp.asarray(V0)
    m = V0.shape[-1]
    if width < m + 1:
        raise ValueError(f"width={width} must be at least m + 1 = {m + 1} to hold V0 exactly")
    j = np.arange(width)
    k = np.arange(1, m + 1)[:, None]
    q = np.sqrt(2.0 / width) * np.cos(np.pi * (j + 0.5) * k / width)
    root = jnp.linalg.cholesky(V0)
    return math.sqrt(width) * root @ jnp.asarray(q, V0.dtype)


def gram(x: jax.Array) -> jax.Array:
    """``x x^T / n`` over the last axis of ``x: [..., m, n]``."""
    return jnp.einsum("...an,...bn->...ab", x, x) / x.shape[-1]


def gram_map(key: jax.Array, n_out: int) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> x W``, ``W ~ N(0, 1/n_in)`` (n_in x n_out), drawn as ``R G``."""

    def apply(x):
        g = jax.random.normal(key, (*x.shape[:-1], n_out), x.dtype)
        return psd_factor(gram(x), "cholesky") @ g

    return apply


def bartlett_factor(key: jax.Array, shape: tuple, df: int, dtype) -> jax.Array:
    """Lower-triangular ``B`` (``shape[-1]`` square) with ``B B^T ~ Wishart(df, I)``.

    Bartlett decomposition: ``B_ii^2 ~ chi^2(df - i)`` (i = 0..m-1), ``B_ij ~ N(0, 1)`` below
    the diagonal, all independent; needs ``df >= m``.
    """
    m = shape[-1]
    k_chi, k_normal = jax.random.split(key)
    chi2 = jax.random.chisquare(k_chi, jnp.arange(df, df - m, -1).astype(dtype), shape[:-1], dtype)
    below = jnp.tril(jax.random.normal(k_normal, shape, dtype), -1)
    return below + jnp.sqrt(chi2)[..., None] * jnp.broadcast_to(jnp.eye(m, dtype=dtype), shape)


def gram_scores(key: jax.Array, heads: int, key_width: int) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> (x W_Q,h)(x W_K,h)^T`` per head, drawn with O(m^2) random numbers.

    With ``R R^T = x x^T / n`` the product is ``R G1 G2^T R^T`` for iid N(0, 1) ``G1, G2``
    (m x n_k). Given G1 the columns of ``G1 G2^T`` are iid ``N(0, G1 G1^T)``, so
    ``G1 G2^T = B G3`` in law, with ``B`` the Bartlett factor of ``G1 G1^T ~ Wishart(n_k, I)``
    and ``G3`` iid m x m: exact, and ``2 m n_k`` random numbers become ``m (3m + 1) / 2``.
    """

    def apply(x):
        m = x.shape[-2]
        shape = (*x.shape[:-2], heads, m, m)
        k_b, k_g = jax.random.split(key)
        b = bartlett_factor(k_b, shape, key_width, x.dtype)
        g = jax.random.normal(k_g, shape, x.dtype)
        r = psd_factor(gram(x), "cholesky")[..., None, :, :]
        return r @ b @ g @ jnp.swapaxes(r, -1, -2)

    return apply


def gram_maps(cfg: BlockConfig, key: jax.Array, m_tokens: int) -> BlockMaps:
    """The maps of one block for the Gram sampler; sizes as listed in :class:`BlockMaps`.

    The scores come from :func:`gram_scores` (zero for ``query_init="zero"``, as the module's
    zero query kernel gives)."""
    att = cfg.attention
    ks = jax.random.split(key, 6)
    n, qk, v = cfg.width, att.num_heads * att.head_dim, att.num_heads * att.value_dim
    if att.query_init == "zero":
        scores = lambda x: jnp.zeros((*x.shape[:-2], att.num_heads, m_tokens, m_tokens), x.dtype)  # noqa: E731
    elif att.head_dim >= m_tokens:
        scores = gram_scores(ks[0], att.num_heads, att.head_dim)
    else:  # n_k < m: no Bartlett factor; draw X W_Q and X W_K themselves
        scores = None
    return BlockMaps(
        query=gram_map(ks[0], qk) if scores is None else None,
        key=gram_map(ks[1], qk) if scores is None else None,
        scores=scores,
        value=gram_map(ks[2], v),
        output=gram_map(ks[3], n) if att.out_proj else None,
        mlp_in=gram_map(ks[4], cfg.mlp_hidden),
        mlp_out=gram_map(ks[5], n),
    )


def _layer(cfg: BlockConfig, sampler: str, x: jax.Array, key: jax.Array) -> jax.Array:
    """One block applied to ``x`` with fresh weights from ``key``."""
    if sampler == "gram":
        maps = gram_maps(cfg, key, x.shape[-2])
    else:
        maps = Block(cfg, rngs=nnx.Rngs(params=key)).maps()
    return block_apply(cfg, x, maps=maps)


def _chain(cfg: BlockConfig, sampler: str, depth: int, x0: jax.Array, key: jax.Array):
    """``V_l`` for l = 0..depth of one sample: ``(depth + 1, m, m)``."""

    def step(x, layer_key):
        x = _layer(cfg, sampler, x, layer_key)
        return x, gram(x)

    _, V = jax.lax.scan(step, x0, jax.random.split(key, depth))
    return jnp.concatenate([gram(x0)[None], V], axis=0)


def sample_mesh() -> Mesh:
    """A one-axis mesh ``("samples",)`` over all local devices."""
    return Mesh(np.asarray(jax.local_devices()), ("samples",))


def _chunk_fn(cfg: BlockConfig, sampler: str, depth: int, mesh: Mesh):
    samples = NamedSharding(mesh, PartitionSpec("samples"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def run(keys, x0):
        return jax.vmap(lambda k: _chain(cfg, sampler, depth, x0, k))(keys)

    return jax.jit(run, in_shardings=(samples, replicated), out_shardings=samples)


def sample_keys(key: jax.Array, start: int, stop: int) -> jax.Array:
    """Keys of samples ``start..stop-1``: ``fold_in(key, i)``, independent of chunking."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(start, stop))


def stop_samples(V: np.ndarray, stop_norm: float) -> FiniteResult:
    """Flag and freeze samples whose ``V`` blows up or becomes non-finite (see FiniteResult)."""
    V = np.array(V, copy=True)
    depth1 = V.shape[1]
    bad = ~np.all(np.isfinite(V), axis=(-2, -1))
    bad |= np.nanmax(np.abs(np.where(np.isfinite(V), V, np.inf)), axis=(-2, -1)) > stop_norm
    if np.any(bad[:, 0]):
        raise ValueError(f"V0 has an entry above stop_norm={stop_norm:g}")
    stopped = bad.any(axis=1)
    stop_layer = np.where(stopped, bad.argmax(axis=1), depth1)
    for i in np.flatnonzero(stopped):
        V[i, stop_layer[i]:] = V[i, stop_layer[i] - 1]
    return FiniteResult(V=V, stopped=stopped, stop_layer=stop_layer)


class FiniteSampler:
    """A compiled Monte Carlo of one network: call :meth:`chunk` for samples ``[start, stop)``.

    Compiles once per chunk size; :func:`simulate_finite` and the resumable scripts share it.
    """

    def __init__(self, V0, config: ConfigLike, *, width: int, depth: int,
                 sampler: str = "gram", key_width: Optional[int] = None):
        check_choice("sampler", sampler, SAMPLERS)
        V0 = check_psd_matrix("V0", V0)
        check_positive_int("depth", depth)
        self.cfg = sized_config(config, width, key_width, V0.dtype)
        self.depth = depth
        self.x0 = initial_tokens(V0, width)
        self.mesh = sample_mesh()
        self._run = _chunk_fn(self.cfg, sampler, depth, self.mesh)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def chunk(self, key: jax.Array, start: int, stop: int) -> np.ndarray:
        """``V`` of samples ``start..stop-1``, ``(stop - start, depth + 1, m, m)``.

        The chunk is padded to a multiple of the device count; padding is dropped.
        """
        size = stop - start
        padded = -(-size // self.num_devices) * self.num_devices
        keys = sample_keys(key, start, start + padded)
        return np.asarray(self._run(keys, self.x0))[:size]


def default_chunk_size(cfg: BlockConfig, depth: int, sampler: str, budget_bytes: float = 2e9) -> int:
    """Samples per chunk so that a chunk's working set stays near ``budget_bytes``."""
    n, m_bytes = cfg.width, jnp.dtype(cfg.param_dtype).itemsize
    per_sample = (8 * n * n if sampler == "weights" else 64 * n) * m_bytes + 8 * depth * 64
    return int(max(1, min(4096, budget_bytes // per_sample)))


def simulate_finite(
    V0,
    config: ConfigLike,
    *,
    width: int,
    depth: int,
    num_samples: int,
    key: jax.Array,
    sampler: str = "gram",
    key_width: Optional[int] = None,
    chunk_size: Optional[int] = None,
    stop_norm: float = 1e4,
    progress: bool = False,
) -> FiniteResult:
    """Covariances ``V_l = X_l X_l^T / n``, l = 0..depth, of ``num_samples`` finite networks.

    Arguments:
        V0: ``(m, m)`` symmetric PSD input covariance; its dtype sets the computation dtype.
        config: a :class:`BlockConfig` template or ``width -> BlockConfig`` (e.g.
            ``functools.partial(shaped_config, gamma=0.35)``); width, key width and MLP
            hidden width are set from the arguments.
        width, depth, num_samples: n, d and the number of independent networks.
        key: the run's key; sample i uses ``fold_in(key, i)``.
        sampler: ``"gram"`` (exact, fast) or ``"weights"`` (real modules, the reference).
        key_width: n_k per head (default: width for one head, width / H for H heads).
        chunk_size: samples per compiled call (default from a 2 GB memory budget).
        stop_norm: blow-up threshold on ``max |V|`` (see :class:`FiniteResult`).
        progress: show a tqdm bar over chunks.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_real("stop_norm", stop_norm)
    runner = FiniteSampler(V0, config, width=width, depth=depth, sampler=sampler, key_width=key_width)
    if chunk_size is None:
        chunk_size = default_chunk_size(runner.cfg, depth, sampler)
    check_positive_int("chunk_size", chunk_size)
    starts = range(0, num_samples, chunk_size)
    parts = [
        runner.chunk(key, s, min(s + chunk_size, num_samples))
        for s in tqdm(starts, desc=f"finite ({sampler})", disable=not progress)
    ]
    return stop_samples(np.concatenate(parts, axis=0), stop_norm)
