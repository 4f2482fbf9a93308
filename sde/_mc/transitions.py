"""One-layer transitions for the estimator (docs/samplers.md §5): Markov kernels on Gram
matrices, the exact attention-only kernel, the finite smooth-activation MLP layer, and
:func:`one_layer`, which draws ``V_1`` given ``V_0`` for any kind of block."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from shaped_attn.config import BlockConfig
from shaped_attn.functional import attention_weights, residual_gains

from .._helpers.devices import map_chunks, num_shards, sample_keys, sample_mesh, sharded_jit
from .._helpers.linalg import gram, psd_factor
from .._helpers.wishart import bartlett_dfs, bartlett_from, chi_square
from .._theory.smooth_mlp import PhiLike, resolve_phi
from .gram_maps import gram_map
from .inputs import initial_tokens, sized_config
from .sampler import FiniteSampler

Array = jax.Array
LayerFn = Callable[[Array, Array], Array]
BlockLike = Union[BlockConfig, Callable[[int], BlockConfig], LayerFn, "GramTransition"]

QUADRATURE_NODES = 96
"""Gauss-Hermite nodes for ``E[phi_s(g)^2]`` (exact for polynomials of degree < 192)."""


class GramTransition:
    """A Markov kernel on Gram matrices: ``fn(key, V, width) -> V_1`` (both ``(m, m)``).

    Wrap a function to pass it to :func:`estimate_coefficients` as a block; subclasses
    override :meth:`__call__`. It must be jit/vmap-able in ``key`` (``V`` and ``width`` are
    fixed per compiled call; ``width`` is a static Python int).
    """

    def __init__(self, fn: Optional[Callable] = None):
        self.fn = fn

    def __call__(self, key: jax.Array, V: jax.Array, width: int) -> jax.Array:
        if self.fn is None:
            raise NotImplementedError("GramTransition needs a function or a subclass")
        return self.fn(key, V, width)


class AttentionTransition(GramTransition):
    """Exact law of ``V_1`` given ``V_0`` for an attention-only shaped block, O(H m^3) per draw.

    ``config``: a :class:`BlockConfig` template or ``width -> BlockConfig`` with
    ``sublayers="attention"`` and no LayerNorm (kinds "shaped" / "unshaped"); every attention
    option is honoured (activation, temperature, gains, heads, ``out_proj``, causal mask,
    zero queries) because the attention matrices come from the library's
    :func:`shaped_attn.functional.attention_weights`. Needs key width and value width per
    head ``>= m`` and ``n >= m + H m``.

    Why it is exact (docs/samplers.md §5; the Gram sampler's argument taken one step further): write ``X = sqrt(n) L Q``
    with ``L L^T = V_0`` and ``Q`` (m x n) orthonormal rows. A fresh Gaussian matrix ``G``
    (k x n, iid N(0, 1)) splits as ``G = C Q + K Q_perp`` with ``C = G Q^T`` (k x m, iid) and
    ``K K^T ~ Wishart(n - m, I_k)`` independent of ``C`` (``K`` a Bartlett factor): the part of
    ``G`` orthogonal to the token space enters ``V_1`` only through its Gram matrix.

    - Summed heads (``out_proj=False``): value maps ``U_h = L G_h`` (``G_h`` m x n), stacked
      ``G = [G_1; ...; G_H]``; ``Z = lam X + (gamma/sqrt(H)) sum_h A_h U_h`` gives
      ``V_1 = F1 F1^T + F2 F2^T`` with ``F1 = lam L + gamma/sqrt(H n) sum_h A_h L C_h`` and
      ``F2 = gamma/sqrt(H n) sum_h A_h L K_h`` (needs ``n >= m + H m``).
    - Concatenated heads (``out_proj=True``): ``O = [A_1 U_1, ..., A_H U_H]`` with
      ``U_h = L G_h`` (m x n/H), so ``O O^T / n = M M^T``, ``M = [A_1 L B_1, ..., A_H L B_H] /
      sqrt(n)`` with ``B_h B_h^T ~ Wishart(n/H, I_m)``; the output ``O W_O / sqrt(n)`` is
      ``M G'`` (``G'`` Hm x n) in law, so ``F1 = lam L + gamma M C' / sqrt(n)`` and
      ``F2 = gamma M K' / sqrt(n)``.

    The scores per head are ``L B_h G3_h L^T`` (the identity of docs/samplers.md §3).
    All chi-squares are drawn in one call, so the kernel compiles fast.

    ``tests/test_estimator.py`` checks it against :class:`FiniteSampler`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config

    def sized(self, width: int, dtype) -> BlockConfig:
        cfg = sized_config(self.config, width, None, dtype)
        if cfg.sublayers != "attention":
            raise ValueError(f"AttentionTransition needs sublayers='attention', got {cfg.sublayers!r}")
        if cfg.layer_norm:
            raise ValueError(f"AttentionTransition needs a block without LayerNorm, got kind={cfg.kind!r}")
        return cfg

    def __call__(self, key: jax.Array, V: jax.Array, width: int) -> jax.Array:
        cfg = self.sized(width, V.dtype)
        att = cfg.attention
        m, n, H, nk = V.shape[-1], cfg.width, att.num_heads, att.head_dim
        lam, gamma = residual_gains(cfg)
        concat = att.out_proj
        if n - m < H * m:
            raise ValueError(f"width={n} must be >= m + H m = {m + H * m} for this sampler")
        if nk < m or (concat and n // H < m):
            raise ValueError(f"key width {nk} and value width per head must be >= m = {m}")
        dtype = V.dtype
        k_chi, k_normal = jax.random.split(key)
        L = psd_factor(V, "cholesky")  # depends on V only: computed once per compiled call, not per sample
        # All chi-squares of the Bartlett factors in one draw (one gamma sampler to compile):
        # per head the scores' Wishart(n_k, I_m), the value path's Wishart(n - m, I_Hm) and,
        # with concat, per head the values' Wishart(n / H, I_m).
        dfs = [bartlett_dfs(nk, m)] * H + [bartlett_dfs(n - m, H * m)]
        if concat:
            dfs += [bartlett_dfs(n // H, m)] * H
        dfs = np.concatenate(dfs).astype(np.float64)
        chi2 = chi_square(k_chi, jnp.asarray(dfs, dtype), dfs.shape, dtype)
        sizes = [m] * H + [H * m] + ([m] * H if concat else [])
        # All standard normals in one draw too: Bartlett lower triangles, G3 (scores), C.
        z = jax.random.normal(k_normal, (len(sizes) + 2, H * m, H * m), dtype)
        factors, offset = [], 0
        for i, size in enumerate(sizes):  # lower-triangular Bartlett factors
            factors.append(bartlett_from(z[i, :size, :size], chi2[offset:offset + size]))
            offset += size
        # Scores per head: (X W_Q,h)(X W_K,h)^T = L G1 G2^T L^T = L B_h G3_h L^T in law
        # (docs/samplers.md §3).
        g3 = z[-2, :H * m, :m].reshape(H, m, m)
        qk = L @ jnp.stack(factors[:H]) @ g3 @ L.T
        if att.query_init == "zero":
            qk = jnp.zeros_like(qk)
        A = attention_weights(att, qk)  # (H, m, m): the library's activation and shaping
        AL = A @ L
        if concat:  # O O^T / n = M M^T with M = [A_h L B_h] / sqrt(n)
            P = gamma * jnp.concatenate(list(AL @ jnp.stack(factors[H + 1:])), axis=-1) / n
        else:
            P = gamma * jnp.concatenate(list(AL), axis=-1) / math.sqrt(H * n)
        C = z[-1, :, :m]
        F1 = lam * L + P @ C
        F2 = P @ factors[H]
        return F1 @ F1.T + F2 @ F2.T


def normaliser(phi: PhiLike, s: float) -> float:
    """``c = 1 / E[phi_s(g)^2]``, ``phi_s(x) = s phi(x / s)``, by Gauss-Hermite quadrature."""
    fn = resolve_phi(phi)
    x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):  # a constant, even under jit
        vals = np.asarray(s * fn(jnp.asarray(x / s, jnp.float64)), np.float64)
    return float(math.sqrt(2 * math.pi) / np.sum(w * vals * vals))


def smooth_mlp_layer(phi: PhiLike, a: float, gamma: float) -> Callable[[Array, Array], Array]:
    """The finite residual smooth-MLP block as ``layer(key, X) -> X'`` (X: m x n) for
    :func:`estimate_coefficients` (docs/sde.md §7):
    ``X' = lam X + gamma sqrt(c) phi_s(X W_pre / sqrt(n)) W_post / sqrt(n)``,
    ``phi_s(x) = s phi(x / s)``, ``s = a sqrt(n)``.

    ``X W_pre / sqrt(n)`` and ``h W_post / sqrt(n)`` are drawn exactly by the Gram sampler's
    :func:`gram_map` (``R G`` with ``R R^T = x x^T / n``), keeping the n hidden features so
    that ``phi`` acts on each of them. ``c`` is computed per width.
    """
    fn = resolve_phi(phi)
    lam = math.sqrt(1.0 - gamma * gamma)

    def layer(key, X):
        n = X.shape[-1]
        s = a * math.sqrt(n)
        c = normaliser(phi, s)
        g = jax.random.normal(key, (2, *X.shape[:-1], n), X.dtype)  # both maps' normals, one draw
        h = gram_map(g[0])(X)
        branch = gram_map(g[1])(math.sqrt(c) * s * fn(h / s))
        return lam * X + gamma * branch

    return layer


# --------------------------------------------------------------------------- one layer, any block


def is_layer(block) -> bool:
    """True for ``layer(key, X)``, False for a BlockConfig, ``width -> BlockConfig`` or a
    :class:`GramTransition`; a ValueError for anything else."""
    if isinstance(block, (BlockConfig, GramTransition)):
        return False
    if not callable(block):
        raise ValueError(
            f"block={block!r} must be a BlockConfig, a callable width -> BlockConfig, a "
            "GramTransition or a callable layer(key, X) -> X'"
        )
    try:
        sig = inspect.signature(block)
    except (TypeError, ValueError):
        raise ValueError(f"cannot inspect the signature of block={block!r}") from None
    positional = [
        p for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) in (1, 2):
        return len(positional) == 2
    raise ValueError(
        f"block={block!r} takes {len(positional)} required positional arguments: a callable "
        "block is either width -> BlockConfig (one) or layer(key, X) -> X' (two)"
    )


@functools.lru_cache(maxsize=32)
def _config_sampler(cfg: BlockConfig, width: int, sampler: str) -> FiniteSampler:
    """A compiled depth-1 :class:`FiniteSampler`, cached per sized config (tokens per call)."""
    return FiniteSampler(np.eye(1, dtype=cfg.param_dtype), cfg, width=width, depth=1, sampler=sampler,
                         key_width=cfg.attention.head_dim)


@functools.lru_cache(maxsize=32)
def _compiled_kernel(kernel: Callable, width: int, mesh):
    """``(keys, state) -> V_1`` of a user layer (state: tokens) or a Gram transition (state:
    ``V_0``), vmapped over the keys and sharded; cached per kernel and width."""
    if isinstance(kernel, GramTransition):
        one = lambda k, V0: kernel(k, V0, width)  # noqa: E731
    else:
        one = lambda k, x0: gram(kernel(k, x0))  # noqa: E731
    return sharded_jit(lambda keys, state: jax.vmap(lambda k: one(k, state))(keys), mesh)


def one_layer(block: BlockLike, V: Array, width: int, sampler: str = "gram",
              key_width: Optional[int] = None):
    """``(V_0, draw)``: the exact input Gram matrix and ``draw(key, start, stop)``, the ``V_1``
    of samples ``start..stop-1`` (sample i uses ``fold_in(key, i)``) after one layer of
    ``block`` at ``width`` from ``V`` (docs/samplers.md §5-6).

    ``block``: a :class:`GramTransition` (run on ``V`` itself), a user layer
    ``layer(key, X) -> X'`` or a config (run on the tokens :func:`initial_tokens` of ``V``)."""
    if not is_layer(block) and not isinstance(block, GramTransition):
        cfg = sized_config(block, width, key_width, V.dtype)
        runner = _config_sampler(cfg, width, sampler)
        x0 = initial_tokens(V, width)
        return np.asarray(gram(x0)), lambda key, start, stop: runner.chunk(key, start, stop, tokens=x0)[:, 1]
    mesh = sample_mesh()
    fn = _compiled_kernel(block, width, mesh)
    state = V if isinstance(block, GramTransition) else initial_tokens(V, width)
    V0 = V if isinstance(block, GramTransition) else gram(state)

    def draw(key, start, stop):
        shards = num_shards(mesh)
        return map_chunks(lambda idx: np.asarray(fn(sample_keys(key, idx), state)), start, stop,
                          -(-(stop - start) // shards), shards)

    return np.asarray(V0), draw
