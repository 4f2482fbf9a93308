"""Monte Carlo of finite networks at initialisation: ``V_l = X_l X_l^T / n``, l = 0..depth.

The samplers run the same block equations (:func:`shaped_attn.functional.block_apply`, the
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
* ``"reduced"``: blocks without LayerNorm are rotation-invariant in the residual features
  (only the MLP's hidden units are not), so the residual stream is kept on the ~3m features it
  occupies, the rest of each fresh map's output replaced by a Bartlett factor (see the
  "reduced sampler" section below): exact in law, about 2-3x faster than ``"gram"``.
* ``"auto"``: ``"reduced"`` where it applies, else ``"gram"``.

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

SAMPLERS = ("gram", "weights", "reduced", "auto")
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


def chi_square(key: jax.Array, df, shape: tuple, dtype=jnp.float32, proposals: int = 4) -> jax.Array:
    """Exact ``chi^2(df)`` draws of ``shape`` (``df`` broadcasts), ``2 Gamma(df / 2)``: the
    rejection sampler of Marsaglia and Tsang (2000) with ``proposals`` candidates per element
    drawn at once and the first accepted one kept; rounds of fresh candidates are repeated
    (``lax.while_loop``) only while some element has none accepted (rare: each candidate is
    accepted with probability > 0.95). Shape < 1 via ``Gamma(a) = Gamma(a + 1) U^(1/a)``.

    Same law as :func:`jax.random.chisquare`, several times faster under ``vmap`` (that one
    runs a nested while loop with a key split per element and candidate).
    """
    alpha = jnp.broadcast_to(jnp.asarray(df, dtype) / 2, shape)
    boost = alpha < 1
    d = (jnp.where(boost, alpha + 1, alpha) - 1.0 / 3.0)[None]  # broadcasts over candidates
    c = jax.lax.rsqrt(9.0 * d)

    def candidates(k):
        kx, ku = jax.random.split(k)
        x = jax.random.normal(kx, (proposals, *shape), dtype)
        u = jax.random.uniform(ku, (proposals, *shape), dtype)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (jnp.log(u) < 0.5 * x * x + d - d * v + d * jnp.log(jnp.where(v > 0, v, 1)))
        first = jnp.argmax(ok, axis=0)
        return jnp.take_along_axis(d * v, first[None], axis=0)[0], jnp.any(ok, axis=0)

    k_first, k_more, k_boost = jax.random.split(key, 3)
    value, done = candidates(k_first)

    def more(state):
        value, done, i = state
        new, ok = candidates(jax.random.fold_in(k_more, i))
        return jnp.where(done, value, new), done | ok, i + 1

    value, _, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[1]), more, (value, done, 0))
    u = jax.random.uniform(k_boost, shape, dtype)
    return 2 * jnp.where(boost, value * u ** (1 / jnp.where(boost, alpha, 1)), value)


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


# ------------------------------------------------------------------------ reduced sampler
#
# Without LayerNorm every step of the block except the MLP's per-feature ReLU commutes with a
# rotation of the residual features: the block with input X O and weights (O^T W_Q, O^T W_K,
# O^T W_V, W_O O, O^T W_1, W_2 O) outputs X' O, and those weights have the law of the
# originals. So the law of everything after X depends on X only through X X^T, and X may be
# replaced by any matrix of the same Gram: ``reduced_tokens`` puts the tokens on the first m
# features. A fresh map ``x -> x W`` into the residual stream, where only the first k features
# are in use, has output ``R G`` (``R R^T = x x^T / n_in``, G iid m x n_out); its columns
# ``k..n_out`` only ever enter through ``G_rest G_rest^T ~ Wishart(n_out - k, I)`` (the same
# rotation argument on the unused features), so they are replaced by the Bartlett factor of
# that Wishart on m new features. The same holds per head in the value space of an output
# projection. The hidden MLP features are drawn in full (m x hidden), so the ReLU is exact.
#
# The residual stream (and the value space) is then stored on K = (features in use) columns
# instead of n, scaled by sqrt(K / n) so that ``gram`` (which divides by the array width) gives
# the true ``X X^T / n``. ``block_apply`` runs the true block's config on these arrays: it takes
# the width-dependent scalars (temperature, shaped-ReLU slopes) from the config and the
# per-head widths from the maps' outputs.


def reduced_root(x: jax.Array, used: int) -> jax.Array:
    """``R`` (m x p, ``p = min(m, used)``) with ``R R^T = gram(x)`` for ``x`` whose features
    beyond the first ``used`` are zero.

    ``used <= m``: those features over ``sqrt(width)``; else the triangular factor of a QR
    decomposition of them (exact for a singular Gram too, with no Cholesky fallback)."""
    m, width = x.shape[-2:]
    xu = x[..., :used]
    if used > m:
        xu = jnp.swapaxes(jnp.linalg.qr(jnp.swapaxes(xu, -1, -2), mode="r"), -1, -2)
    return xu / math.sqrt(width)


class _LayerNoise:
    """The random numbers of one reduced-sampler layer, drawn in one call of
    ``jax.random.normal`` and one of :func:`chi_square` (many small draws cost far more than
    their size under ``vmap``). Built twice: without ``key`` it only records the requests of
    the maps (returning ``None``); with ``key`` and that record it draws them and hands out
    disjoint parts in the same order."""

    def __init__(self, dtype, key: Optional[jax.Array] = None, record: Optional["_LayerNoise"] = None):
        self.dtype, self.count, self.dfs = dtype, 0, []
        self.normals = self.chi2 = None
        if key is not None:
            k_normal, k_chi = jax.random.split(key)
            self.normals = jax.random.normal(k_normal, (record.count,), dtype)
            if record.dfs:
                dfs = np.asarray(record.dfs, np.float64)
                self.chi2 = chi_square(k_chi, dfs.astype(dtype), dfs.shape, dtype)

    def normal(self, shape: tuple) -> Optional[jax.Array]:
        """iid N(0, 1) of ``shape``."""
        start, self.count = self.count, self.count + math.prod(shape)
        return None if self.normals is None else self.normals[start:self.count].reshape(shape)

    def free(self, lead: tuple, rows: int, df: int) -> Optional[jax.Array]:
        """``T`` of shape ``(*lead, rows, min(rows, df))`` with ``T T^T`` distributed as ``G G^T``,
        ``G`` iid N(0, 1) of shape rows x df: the Bartlett factor (:func:`bartlett_factor`) if
        ``df >= rows``, else G itself."""
        if df < rows:
            return self.normal((*lead, rows, max(df, 0)))
        below = self.normal((*lead, rows, rows))
        start = len(self.dfs)
        self.dfs += list(np.tile(np.arange(df, df - rows, -1), math.prod(lead)))
        if self.normals is None:
            return None
        chi2 = self.chi2[start:len(self.dfs)].reshape(*lead, rows)
        eye = jnp.broadcast_to(jnp.eye(rows, dtype=self.dtype), below.shape)
        return jnp.tril(below, -1) + jnp.sqrt(chi2)[..., None] * eye


def _one_sample(x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"the reduced sampler's maps act on one sample (m x width), got shape "
                         f"{x.shape}; vmap over samples")


def coordinate_map(noise: _LayerNoise, n_out: int, occupied: int, used_in: int, p: int, *,
                   width: int, scale: float = 1.0, heads: int = 1,
                   shared: bool = True) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> x W`` (``W ~ N(0, 1/n_in)``, ``heads`` blocks of ``n_out`` columns), in
    law for everything that depends on each block only through its first ``occupied``
    features and rotation-invariant functions of the others.

    ``x`` (m x width_in, one sample) is zero beyond its first ``used_in`` features, and
    ``gram(x) = x x^T / n_in``. With ``R = reduced_root(x, used_in)`` (m x p) block h is
    ``scale * R [G_h, T_h, 0]`` on ``width`` columns: ``G_h`` iid N(0, 1) (p x ``occupied``)
    on the features whose values matter and ``T_h`` on the next ones in place of the other
    ``n_out - occupied`` columns (:meth:`_LayerNoise.free`). ``shared=True``: the blocks lie in
    one space (the heads' values summed into the residual stream), so their free parts share
    directions and come from one factor of ``heads * p`` rows (block h: rows ``h p .. (h + 1)
    p``); ``shared=False``: separate spaces (the heads' value blocks before an output
    projection). ``occupied = n_out = width``: every feature drawn (the MLP's hidden units).
    """
    used = noise.normal((heads, p, occupied))
    free = noise.free(() if shared else (heads,), heads * p if shared else p, n_out - occupied)

    def apply(x):
        _one_sample(x)
        r = reduced_root(x, used_in)
        g = jnp.concatenate([used, free.reshape(heads, p, free.shape[-1])], axis=-1).astype(x.dtype)
        y = r[None] @ g  # (heads, m, features in use)
        if scale != 1.0:
            y = scale * y
        y = jnp.pad(y, [(0, 0), (0, 0), (0, width - y.shape[-1])])
        return jnp.swapaxes(y, 0, 1).reshape(x.shape[-2], heads * width)

    return apply


def reduced_scores(noise: _LayerNoise, heads: int, key_width: int, used_in: int,
                   m: int) -> Callable[[jax.Array], jax.Array]:
    """:func:`gram_scores` (``R B G3 R^T`` per head) with ``R = reduced_root(x, used_in)`` and
    the numbers from ``noise``."""
    b = noise.free((heads,), m, key_width)
    g = noise.normal((heads, m, m))

    def apply(x):
        _one_sample(x)
        r = reduced_root(x, used_in)
        return (r[None] @ b @ g @ r.T[None]).astype(x.dtype)

    return apply


def reduced_occupancy(n_out: int, occupied: int, rows: int) -> int:
    """Features in use after adding a :func:`coordinate_map` output with ``rows`` free rows
    to a space of ``n_out`` features whose first ``occupied`` are in use."""
    return occupied + min(rows, max(n_out - occupied, 0))


def reduced_tokens(x: jax.Array, used: int, width: int) -> jax.Array:
    """``[sqrt(width) R, 0]`` (m x width), ``R = reduced_root(x, used)``: same ``gram``, the
    tokens on the first ``min(m, used)`` features."""
    root = math.sqrt(width) * reduced_root(x, used)
    return jnp.pad(root, [(0, 0)] * (x.ndim - 1) + [(0, width - root.shape[-1])])


def reduced_unsupported(cfg: BlockConfig) -> Optional[str]:
    """Why the reduced sampler cannot run ``cfg`` exactly, or ``None`` if it can."""
    if cfg.layer_norm:
        return (f"kind={cfg.kind!r} has LayerNorm, which is not invariant under rotations of the "
                "features (it singles out the all-ones direction)")
    return None


class ReducedLayout(NamedTuple):
    """Static layout of the reduced sampler for one block on m tokens.

    ``block_in``, ``value``, ``attention_out``, ``block_out``: features in use by the block
    input (after :func:`reduced_tokens`), by one head's values, after the attention sub-block
    and at the block output. ``width`` (K): stored features of the residual stream (and of the
    value space with an output projection), ``scale = sqrt(K / n)`` their scale.
    """

    block_in: int
    value: int
    attention_out: int
    block_out: int
    width: int
    scale: float


def reduced_layout(cfg: BlockConfig, m_tokens: int) -> ReducedLayout:
    """The :class:`ReducedLayout` of ``cfg`` on ``m_tokens`` tokens; a ValueError naming the
    reason for a block the reduced sampler cannot run."""
    reason = reduced_unsupported(cfg)
    if reason is not None:
        raise ValueError(f"sampler='reduced' does not support this block: {reason}; "
                         "use sampler='gram', 'weights' or 'auto'")
    att, n, heads = cfg.attention, cfg.width, cfg.attention.num_heads
    k_in = value = k = min(m_tokens, n)
    if cfg.has_attention and att.out_proj:
        value = min(k_in, att.value_dim)
        k = reduced_occupancy(n, k, min(m_tokens, value if heads == 1 else heads * value))
    elif cfg.has_attention:
        k = reduced_occupancy(n, k, heads * k_in)
    k_att = k
    if cfg.has_mlp:
        k = reduced_occupancy(n, k, min(m_tokens, cfg.mlp_hidden))
    width = k
    if att.out_proj:  # the value space is stored on K columns too: heads * value of them per head
        width = min(n, -(-max(k, heads * value) // heads) * heads)
    return ReducedLayout(k_in, value, k_att, k, width, math.sqrt(width / n))


def reduced_maps(cfg: BlockConfig, key: jax.Array, m_tokens: int) -> BlockMaps:
    """The maps of one block for the reduced sampler, on one sample's tokens from
    :func:`reduced_tokens` stored as in :func:`reduced_layout` (apply them with
    ``block_apply(cfg, ...)``).

    Same roles as :func:`gram_maps`: the scores are :func:`reduced_scores` (the query and key
    maps of :func:`gram_maps` when ``n_k < m``, zero scores for a zero query), all other maps
    are :func:`coordinate_map` s; their random numbers come from one :class:`_LayerNoise`.
    """
    lay = reduced_layout(cfg, m_tokens)
    ks = jax.random.split(key, 6)  # the roles of gram_maps' keys: query, key from there
    dtype = jnp.dtype(cfg.param_dtype)
    record = _LayerNoise(dtype)
    _reduced_maps(cfg, lay, m_tokens, record, ks)
    return _reduced_maps(cfg, lay, m_tokens, _LayerNoise(dtype, ks[2], record), ks)


def _reduced_maps(cfg: BlockConfig, lay: ReducedLayout, m: int, noise: _LayerNoise, ks) -> BlockMaps:
    att, n, heads, hidden = cfg.attention, cfg.width, cfg.attention.num_heads, cfg.mlp_hidden
    maps = BlockMaps()
    if cfg.has_attention:
        if att.query_init == "zero":
            maps = maps._replace(scores=lambda x: jnp.zeros((heads, m, m), x.dtype))
        elif att.head_dim >= m:
            maps = maps._replace(scores=reduced_scores(noise, heads, att.head_dim, lay.block_in, m))
        else:  # n_k < m: X W_Q and X W_K themselves, as the Gram sampler
            maps = maps._replace(query=gram_map(ks[0], heads * att.head_dim),
                                 key=gram_map(ks[1], heads * att.head_dim))
        stream = dict(width=lay.width, scale=lay.scale)
        if att.out_proj:
            value = coordinate_map(noise, att.value_dim, 0, lay.block_in, lay.block_in,
                                   width=lay.width // heads, scale=lay.scale, heads=heads, shared=False)
            used = lay.value if heads == 1 else lay.width
            output = coordinate_map(noise, n, lay.block_in, used, min(m, used), **stream)
        else:
            value = coordinate_map(noise, n, lay.block_in, lay.block_in, lay.block_in, heads=heads, **stream)
            output = None
        maps = maps._replace(value=value, output=output)
    if cfg.has_mlp:
        p = min(m, lay.attention_out)
        maps = maps._replace(
            mlp_in=coordinate_map(noise, hidden, hidden, lay.attention_out, p, width=hidden),
            mlp_out=coordinate_map(noise, n, lay.attention_out, hidden, min(m, hidden),
                                   width=lay.width, scale=lay.scale),
        )
    return maps


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


def _layer(cfg: BlockConfig, sampler: str, x: jax.Array, key: jax.Array) -> jax.Array:
    """One block applied to ``x`` with fresh weights from ``key`` (for ``"reduced"``: ``x``
    stored as in :func:`reduced_layout`)."""
    if sampler == "reduced":
        lay = reduced_layout(cfg, x.shape[-2])
        x = reduced_tokens(x, lay.block_out, lay.width)
        maps = reduced_maps(cfg, key, x.shape[-2])
    elif sampler == "gram":
        maps = gram_maps(cfg, key, x.shape[-2])
    else:
        maps = Block(cfg, rngs=nnx.Rngs(params=key)).maps()
    return block_apply(cfg, x, maps=maps)


def _chain(cfg: BlockConfig, sampler: str, depth: int, x0: jax.Array, key: jax.Array):
    """``V_l`` for l = 0..depth of one sample: ``(depth + 1, m, m)``."""

    def step(x, layer_key):
        x = _layer(cfg, sampler, x, layer_key)
        return x, gram(x)

    start = x0
    if sampler == "reduced":
        start = reduced_tokens(x0, x0.shape[-1], reduced_layout(cfg, x0.shape[-2]).width)
    _, V = jax.lax.scan(step, start, jax.random.split(key, depth))
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
        self.sampler = resolve_sampler(self.cfg, sampler)  # "auto" resolved
        self.depth = depth
        self.x0 = initial_tokens(V0, width)
        self.mesh = sample_mesh()
        self._run = _chunk_fn(self.cfg, self.sampler, depth, self.mesh)

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
        sampler: ``"gram"`` (exact, fast), ``"reduced"`` (exact, faster; blocks without
            LayerNorm), ``"auto"`` (``"reduced"`` where it applies, else ``"gram"``) or
            ``"weights"`` (real modules, the reference).
        key_width: n_k per head (default: width for one head, width / H for H heads).
        chunk_size: samples per compiled call (default from a 2 GB memory budget).
        stop_norm: blow-up threshold on ``max |V|`` (see :class:`FiniteResult`).
        progress: show a tqdm bar over chunks.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_real("stop_norm", stop_norm)
    runner = FiniteSampler(V0, config, width=width, depth=depth, sampler=sampler, key_width=key_width)
    if chunk_size is None:
        chunk_size = default_chunk_size(runner.cfg, depth, runner.sampler)
    check_positive_int("chunk_size", chunk_size)
    starts = range(0, num_samples, chunk_size)
    parts = [
        runner.chunk(key, s, min(s + chunk_size, num_samples))
        for s in tqdm(starts, desc=f"finite ({runner.sampler})", disable=not progress)
    ]
    return stop_samples(np.concatenate(parts, axis=0), stop_norm)
