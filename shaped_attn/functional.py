"""The forward equations of attention, MLP and residual blocks, as pure functions.

This file is the single source of truth for the block formulas (docs/model.md §1):
the temperature, the shaped ReLU, the residual gains, the LayerNorm and the order in which
they are combined. The NNX modules (:mod:`shaped_attn.attention`, :mod:`shaped_attn.blocks`)
only hold parameters and call these functions.

**Map protocol.** The linear maps are passed in as callables

    map(x) -> y,   x: [..., m, n_in],  y: [..., m, n_out]

acting on the last axis and treating the others as batch (an ``nnx.Linear`` is one). A map
is called at most once per application of :func:`attention_apply`, :func:`mlp_apply` or
:func:`block_apply`, always on the full token matrix, so a map that *samples* ``X W`` for a
fresh Gaussian ``W`` (the Gram sampler of docs/samplers.md §1) can replace a weight matrix. The
``(n_in, n_out)`` each map must have is listed in :class:`BlockMaps`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from . import activations
from .config import AttentionConfig, BlockConfig

Array = jax.Array
Map = Callable[[Array], Array]
Scalar = Union[float, Array]


class BlockMaps(NamedTuple):
    """The linear maps (and norms) of one block; ``n`` = width, ``H`` heads, ``n_k`` head_dim.

    Attributes:
        query, key: ``n -> H * n_k`` (head h is columns ``h*n_k:(h+1)*n_k``).
        value: ``n -> H * d_v``, ``d_v = n / H`` with ``out_proj``, ``d_v = n`` without.
        output: ``H * d_v -> n`` with ``out_proj``; must be ``None`` without.
        mlp_in: ``n -> hidden``.  mlp_out: ``hidden -> n``.
        norm_attn, norm_mlp: LayerNorms ``[..., n] -> [..., n]`` of the pre_ln / post_ln
            kinds (``None``: the parameter-free :func:`layer_norm`); must be ``None`` for the
            shaped and unshaped kinds.
        scores: optional ``x -> [..., H, m, m]``, the per-head products ``(x W_Q,h)(x W_K,h)^T``
            before the temperature, in place of ``query`` and ``key`` (which must then be
            ``None``). A sampler can draw this m x m product directly (docs/samplers.md §3).
    Maps of a sub-block that the config leaves out (``sublayers``) may be ``None``.
    """

    query: Optional[Map] = None
    key: Optional[Map] = None
    value: Optional[Map] = None
    output: Optional[Map] = None
    mlp_in: Optional[Map] = None
    mlp_out: Optional[Map] = None
    norm_attn: Optional[Map] = None
    norm_mlp: Optional[Map] = None
    scores: Optional[Map] = None


class Knobs(NamedTuple):
    """The block scalars of :data:`shaped_attn.config.KNOBS`: Python floats when fixed, 0-d
    arrays when learned or scheduled (then jit traces them, so their values never recompile).

    ``A = g1 I + act(Y / tau) - g2 C``; MLP slopes ``(s_plus, s_minus)``; residual
    ``lam X + gamma f(X)`` (``X + gamma f(LN(X))`` etc. with LN, where ``lam`` is unused).
    """

    g1: Scalar
    g2: Scalar
    s_minus: Scalar
    lam: Scalar
    gamma: Scalar


# ------------------------------------------------------------------------ scalar formulas


def temperature(cfg: AttentionConfig) -> float:
    """``tau0 sqrt(n n_k)`` ("shaped") or ``tau0 sqrt(n_k)`` ("standard")."""
    if cfg.temperature == "shaped":
        return cfg.tau0 * math.sqrt(cfg.width * cfg.head_dim)
    return cfg.tau0 * math.sqrt(cfg.head_dim)


def relu_slopes(width: int, c_plus: float, c_minus: float) -> tuple[float, float]:
    """Shaped ReLU slopes ``s_pm = 1 + c_pm / sqrt(n)``."""
    return 1.0 + c_plus / math.sqrt(width), 1.0 + c_minus / math.sqrt(width)


def block_relu_slopes(cfg: BlockConfig) -> tuple[float, float]:
    """``(s_plus, s_minus)`` of the block's MLP: shaped, or ``(1, 0)`` for the plain ReLU."""
    return relu_slopes(cfg.width, cfg.c_plus, cfg.c_minus) if cfg.shaped_relu else (1.0, 0.0)


def residual_gains(cfg: BlockConfig) -> tuple[float, float]:
    """``(lam, gamma)``: ``(sqrt(1 - gamma^2), gamma)`` without LN (``lam`` when the config
    sets it), ``(1, gamma)`` with LN."""
    if cfg.layer_norm:
        return 1.0, cfg.gamma
    lam = math.sqrt(1.0 - cfg.gamma**2) if cfg.lam is None else cfg.lam
    return lam, cfg.gamma


def configured_knobs(cfg: BlockConfig) -> Knobs:
    """The configured values of the knobs: fixed values, learned knobs' initial values and the
    ramps' starting values."""
    lam, gamma = residual_gains(cfg)
    att = cfg.attention
    return Knobs(att.identity_gain, att.centre_gain, block_relu_slopes(cfg)[1], lam, gamma)


def scheduled_values(cfg: BlockConfig, step) -> dict[str, Array]:
    """Values of the scheduled knobs at training ``step`` (a traced integer is fine).

    Each :class:`~shaped_attn.config.Ramp` gives ``(1 - t) start + t end`` with
    ``t = clip(step / steps, 0, 1)``: exactly ``start`` at step 0 and exactly ``end`` from
    step ``steps`` on.
    """
    start = configured_knobs(cfg)._asdict()
    out = {}
    for ramp in cfg.schedule:
        t = jnp.clip(jnp.asarray(step, jnp.result_type(float)) / ramp.steps, 0.0, 1.0)
        out[ramp.knob] = (1 - t) * start[ramp.knob] + t * ramp.end
    return out


def _sqrt(x: Scalar) -> Scalar:
    """``math.sqrt`` for Python numbers (fixed knobs keep their float arithmetic), else jnp."""
    return math.sqrt(x) if isinstance(x, (int, float)) else jnp.sqrt(x)


def _is_zero(x: Scalar) -> bool:
    """True only for a Python number equal to 0 (an array gain always counts as present)."""
    return isinstance(x, (int, float)) and x == 0


# ------------------------------------------------------------------- elementwise formulas


def shaped_relu(x: Array, s_plus: Scalar = 1.0, s_minus: Scalar = 0.0) -> Array:
    """``sqrt(c) * (s_plus max(x, 0) + s_minus min(x, 0))``, ``c = 2 / (s_plus^2 + s_minus^2)``.

    ``E[out^2] = 1`` for ``x ~ N(0, 1)``. The defaults are the standard ReLU times sqrt(2).
    The slopes may be 0-d arrays (learned or scheduled).
    """
    c = 2.0 / (s_plus**2 + s_minus**2)
    return _sqrt(c) * (s_plus * jnp.maximum(x, 0) + s_minus * jnp.minimum(x, 0))


def layer_norm(x: Array, eps: float) -> Array:
    """Parameter-free LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps)``.

    Same arithmetic as ``nnx.LayerNorm(epsilon=eps, use_fast_variance=False)`` (statistics
    in at least float32), so with scale 1 and bias 0 the two agree exactly.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = jnp.asarray(x, dtype)
    mean = xf.mean(axis=-1, keepdims=True)
    var = jnp.square(jnp.abs(xf - mean)).mean(axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# -------------------------------------------------------------------------------- masks


def causal_mask(length: int, query_positions: Optional[Array] = None) -> Array:
    """Boolean causal mask, True where query i may see key j.

    ``query_positions=None``: ``[length, length]``, True on and below the diagonal (``j <= i``).
    Otherwise ``[..., Lq, length]`` with ``j <= query_positions[..., i]``: queries at absolute
    positions (e.g. ``index + arange(Lq)`` against a KV cache of ``length`` slots).
    """
    if query_positions is None:
        return jnp.tril(jnp.ones((length, length), dtype=bool))
    pos = jnp.asarray(query_positions)
    keys = jnp.arange(length).reshape((1,) * pos.ndim + (length,))
    return keys <= pos[..., None]


def attention_mask(
    cfg: AttentionConfig,
    shape: tuple,
    mask: Optional[Array] = None,
    query_positions: Optional[Array] = None,
):
    """The boolean mask of ``scores`` of ``shape`` ``[..., H, Lq, Lk]``, or ``None``.

    Combines the user ``mask`` (broadcastable to ``shape``, True = attend) with the causal
    mask when ``cfg.causal`` (``query_positions``: the queries' absolute positions, see
    :func:`causal_mask`; ``None`` needs ``Lq == Lk``).
    """
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), shape)
    if cfg.causal:
        causal = jnp.broadcast_to(causal_mask(shape[-1], query_positions), shape)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    return mask


class KVCache(NamedTuple):
    """Keys and values of the positions decoded so far, for causal attention.

    Attributes:
        key: ``[..., max_len, H, n_k]``, the keys ``x W_K`` of positions ``0 .. index - 1``
            (zeros after them).
        value: ``[..., max_len, H, d_v]``, the values, likewise.
        index: int32, the number of positions written: the absolute position of the next query.
            (A :class:`~shaped_attn.models.Stack` cache stacks all three over its layers.)
    """

    key: Array
    value: Array
    index: Array


def init_kv_cache(cfg: AttentionConfig, batch_shape: tuple, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty :class:`KVCache` of ``max_len`` positions for inputs ``[*batch_shape, L, n]``."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be an integer >= 1")
    h = cfg.num_heads
    return KVCache(
        key=jnp.zeros((*batch_shape, max_len, h, cfg.head_dim), dtype),
        value=jnp.zeros((*batch_shape, max_len, h, cfg.value_dim), dtype),
        index=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------- sub-blocks


def attention_weights(
    cfg: AttentionConfig,
    qk: Array,
    *,
    mask: Optional[Array] = None,
    score_bias: Optional[Array] = None,
    gains: Optional[tuple[Scalar, Scalar]] = None,
    query_positions: Optional[Array] = None,
    return_activation: bool = False,
):
    """``A = g1 I + act(q k^T / tau + score_bias) - g2 C`` (Noci et al., Eq. 4 with gains).

    Arguments:
        qk: ``[..., H, Lq, Lk]``, the per-head products ``q_h k_h^T`` (``Lq == Lk`` for
            self-attention; fewer queries against a KV cache).
        mask: boolean, broadcastable to ``[..., H, Lq, Lk]`` (True = attend).
        score_bias: additive bias broadcastable to ``[..., H, Lq, Lk]`` (e.g. a learned
            relative position bias), added after the temperature.
        gains: ``(g1, g2)``, floats or 0-d arrays; ``None``: the config's
            ``(identity_gain, centre_gain)``.
        query_positions: absolute positions ``[..., Lq]`` of the queries among the keys (for
            the causal mask and ``I``); ``None``: the diagonal when ``Lq == Lk`` (see
            :func:`activations.shape` otherwise).
        return_activation: also return ``act(...)`` before the shaping step.

    With ``cfg.prenorm_order == "before_scaling"`` a ``norm_`` activation standardises ``qk``
    itself and the base activation sees ``standardise(qk) / tau + score_bias`` (the authors'
    training script, ``docs/activations.md``); by default it standardises the scores it sees.

    Returns ``A: [..., H, Lq, Lk]`` (and the activation's weights); the shaping step is skipped
    when both gains are the number 0. ``C`` is :func:`activations.centring_matrix` (``1/i``
    on row i under a causal mask).
    """
    g1, g2 = (cfg.identity_gain, cfg.centre_gain) if gains is None else gains
    act, standardise_first = activations.split_prenorm(cfg.activation, cfg.prenorm_order)
    mask = attention_mask(cfg, qk.shape, mask, query_positions)
    if standardise_first:
        qk = activations.standardise_rows(qk, mask)
    scores = qk / temperature(cfg)
    if score_bias is not None:
        scores = scores + jnp.broadcast_to(score_bias, scores.shape)
    probs = act(scores, mask)
    weights = probs
    if not (_is_zero(g1) and _is_zero(g2)):
        weights = activations.shape(probs, mask, identity=g1, centre=g2,
                                    query_positions=query_positions)
    return (weights, probs) if return_activation else weights


def attention_apply(
    cfg: AttentionConfig,
    x: Array,
    *,
    query: Optional[Map],
    key: Optional[Map],
    value: Map,
    output: Optional[Map] = None,
    scores: Optional[Map] = None,
    mask: Optional[Array] = None,
    score_bias: Optional[Array] = None,
    gains: Optional[tuple[Scalar, Scalar]] = None,
    return_weights: bool | str = False,
    cache: Optional[KVCache] = None,
):
    """Multi-head self-attention of ``x: [..., m, n]`` (see :class:`BlockMaps` for the maps).

    Per head h: ``O_h = A_h (X W_V,h)``. With ``cfg.out_proj`` the heads are concatenated and
    passed through ``output``; without it they are summed with weight ``1/sqrt(H)``.
    ``gains`` are the shaping gains ``(g1, g2)`` of :func:`attention_weights`.

    The per-head widths are read from the maps' outputs (``H`` equal blocks), so samplers may
    hand over arrays stored on fewer columns than ``cfg`` describes.

    With a :class:`KVCache`, ``x`` holds the ``m`` tokens at absolute positions
    ``cache.index .. cache.index + m - 1``: their keys and values are written into the cache,
    the queries attend causally to every cached position up to their own (whatever
    ``cfg.causal`` says), and ``I`` and ``C`` use those absolute positions, so the rows equal
    the matching rows of the full causal pass. ``mask`` and ``score_bias`` must then
    broadcast to ``[..., H, m, max_len]``; writing past ``max_len`` is not detected under jit.

    Returns ``out: [..., m, n]``, and with ``return_weights`` the weights ``[..., H, m, m]``
    (``[..., H, m, max_len]`` with a cache): ``A`` (True) or the activation's output before
    the shaping step (``"activation"``). With a cache: ``(that, new_cache)``.
    """
    if return_weights not in (False, True, "activation"):
        raise ValueError(f"return_weights={return_weights!r} must be a bool or 'activation'")
    heads = cfg.num_heads
    batch_m = x.shape[:-1]
    if scores is None:
        q = query(x).reshape(*batch_m, heads, -1)
        k = key(x).reshape(*batch_m, heads, -1)
    elif cache is not None:
        raise ValueError("scores= (a map to the products q k^T) cannot be used with cache=: "
                         "a KV cache needs the query and key maps")
    elif query is None and key is None:
        qk = scores(x)
    else:
        raise ValueError("give either a scores map or query and key maps, not both")
    v = value(x).reshape(*batch_m, heads, -1)
    positions = None
    if cache is not None:
        positions = cache.index + jnp.arange(x.shape[-2])
        axis = cache.key.ndim - 3
        k = jax.lax.dynamic_update_slice_in_dim(cache.key, k.astype(cache.key.dtype), cache.index, axis)
        v = jax.lax.dynamic_update_slice_in_dim(cache.value, v.astype(cache.value.dtype), cache.index, axis)
        cache = KVCache(k, v, cache.index + x.shape[-2])
        causal = causal_mask(k.shape[-3], positions)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if scores is None:
        qk = jnp.einsum("...qhd,...khd->...hqk", q, k)
    weights, probs = attention_weights(
        cfg, qk, mask=mask, score_bias=score_bias, gains=gains, query_positions=positions,
        return_activation=True,
    )
    o = jnp.einsum("...hqk,...khd->...qhd", weights, v)
    if cfg.out_proj:
        if output is None:
            raise ValueError("out_proj=True needs an output map")
        out = output(o.reshape(*batch_m, -1))
    else:
        if output is not None:
            raise ValueError("out_proj=False takes no output map (got one)")
        out = o.sum(axis=-2) / math.sqrt(heads)
    result = out if not return_weights else (out, probs if return_weights == "activation" else weights)
    return result if cache is None else (result, cache)


def mlp_apply(
    cfg: BlockConfig, x: Array, *, mlp_in: Map, mlp_out: Map, s_minus: Optional[Scalar] = None
) -> Array:
    """``mlp_out(sqrt(c) sigma_s(mlp_in(x)))`` with the block's ReLU slopes (``s_minus``
    replaces the configured negative slope when given)."""
    s_plus, configured = block_relu_slopes(cfg)
    return mlp_out(shaped_relu(mlp_in(x), s_plus, configured if s_minus is None else s_minus))


def block_apply(
    cfg: BlockConfig,
    x: Array,
    *,
    maps: BlockMaps,
    mask: Optional[Array] = None,
    score_bias: Optional[Array] = None,
    knobs: Optional[Knobs] = None,
    return_attention: bool | str = False,
    cache: Optional[KVCache] = None,
):
    """One layer (docs/model.md §1 and its baselines, §2) on ``x: [..., m, n]``.

    shaped / unshaped: ``Z = lam X + gamma Att(X)``, ``X' = lam Z + gamma MLP(Z)``;
    pre_ln: ``Z = X + gamma Att(LN(X))``, ``X' = Z + gamma MLP(LN(Z))``;
    post_ln: ``Z = LN(X + gamma Att(X))``, ``X' = LN(Z + gamma MLP(Z))``;
    with ``lam = sqrt(1 - gamma^2)``. A sub-block left out by ``cfg.sublayers`` is the identity.
    ``knobs`` (default :func:`configured_knobs`) gives g1, g2, s_minus, lam, gamma.

    Returns ``x'``, and the attention matrix ``[..., H, m, m]`` (``None`` without an
    attention sub-block) if ``return_attention`` (``"activation"``: before the shaping step).
    ``cache``: the attention's :class:`KVCache` (``x`` holds the tokens at positions
    ``cache.index ..``, see :func:`attention_apply`); the result is then ``(that, new_cache)``.
    """
    knobs = configured_knobs(cfg) if knobs is None else knobs
    lam, gamma = knobs.lam, knobs.gamma
    if not cfg.layer_norm and (maps.norm_attn is not None or maps.norm_mlp is not None):
        raise ValueError(f"kind={cfg.kind!r} has no LayerNorm, but norm maps were given")
    norm_attn = maps.norm_attn or (lambda h: layer_norm(h, cfg.ln_eps))
    norm_mlp = maps.norm_mlp or (lambda h: layer_norm(h, cfg.ln_eps))

    def residual(h, branch, norm):
        if cfg.kind == "pre_ln":
            return h + gamma * branch(norm(h))
        if cfg.kind == "post_ln":
            return norm(h + gamma * branch(h))
        return lam * h + gamma * branch(h)

    weights = None
    if cfg.has_attention:

        def attn(h):
            nonlocal weights, cache
            res = attention_apply(
                cfg.attention, h, query=maps.query, key=maps.key, value=maps.value,
                output=maps.output, scores=maps.scores, mask=mask, score_bias=score_bias,
                gains=(knobs.g1, knobs.g2), return_weights=return_attention or True, cache=cache,
            )
            (out, weights), cache = res if cache is not None else (res, None)
            return out

        x = residual(x, attn, norm_attn)
    if cfg.has_mlp:
        mlp = lambda h: mlp_apply(cfg, h, mlp_in=maps.mlp_in, mlp_out=maps.mlp_out, s_minus=knobs.s_minus)
        x = residual(x, mlp, norm_mlp)
    result = (x, weights) if return_attention else x
    return result if cache is None else (result, cache)
