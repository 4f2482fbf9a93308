"""Our attention activations inside Flax's attention layers: :func:`attention_fn`.

``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention`` take an
``attention_fn`` with the signature of ``flax.nnx.dot_product_attention``. Flax's own one
fills masked scores with a large negative number and calls softmax (or a fused softmax
kernel), which is wrong for every other activation (``sin`` of that fill is meaningless).
:func:`attention_fn` builds a drop-in replacement that applies any registered activation with
our masking rule (``docs/activations.md``, "Masking") and, optionally, the shaping
``g1 I + A - g2 C`` of Noci et al.::

    from flax import nnx
    import shaped_attn
    layer = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=shaped_attn.attention_fn("sin2max_shifted"))

What it reproduces (tested in ``tests/test_flax_interop.py``): with ``"softmax"``, Flax's
default attention to the last bit whenever Flax computes the weights itself (sown weights,
dropout with the same key; with and without ``mask``, ``is_causal`` and ``bias``), and to
float32 rounding (about 1e-7) when Flax takes the fused ``jax.nn.dot_product_attention``
path instead (no sowing, no dropout: it scales ``q k^T`` rather than ``q`` and runs its
softmax in float32). One deliberate difference: a row with no valid key is zero here and
the uniform average of all (masked) values in Flax. With any registered name: the weights
and output of our :class:`shaped_attn.MultiHeadAttention` on the same parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from . import activations

Array = jax.Array

IGNORED_KWARGS = frozenset(
    {"promote_dtype", "force_fp32_for_softmax", "einsum_dot_general", "qk_attn_weights_einsum",
     "attn_weights_value_einsum"}
)
"""Keyword arguments some Flax versions pass to an ``attention_fn`` and that we do not use:
dtype promotion is ``jnp.result_type`` of query, key and value (or ``dtype``), the weights
are computed in that dtype, and the einsums are ``jnp.einsum`` with ``precision``."""


def _check_options(activation, prenorm_order, identity_gain, centre_gain, temperature):
    activations.split_prenorm(activation, prenorm_order)  # unknown name / order: ValueError
    for name, gain in (("identity_gain", identity_gain), ("centre_gain", centre_gain)):
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
            raise ValueError(f"{name}={gain!r} must be a finite real number")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(f"temperature={temperature!r} must be None or a finite number > 0")
    if activation == "shaped_softmax" and (identity_gain or centre_gain):
        raise ValueError("activation='shaped_softmax' already adds I - C; use activation='softmax' "
                         "with identity_gain/centre_gain")


def _combined_mask(mask: Optional[Array], is_causal: bool, shape: tuple) -> Optional[Array]:
    """``mask`` (True = attend) and, with ``is_causal``, Flax's ``tril(ones(Lq, Lk))``."""
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), shape)
    if is_causal:
        causal = jnp.broadcast_to(jnp.tril(jnp.ones(shape[-2:], dtype=bool)), shape)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    return mask


def _sow(module, weights: Array) -> None:
    """Sow ``attention_weights`` into an NNX module's ``nnx.Intermediate`` collection or a
    Linen module's ``"intermediates"``, as Flax's own attention does."""
    import flax.linen as linen

    if isinstance(module, linen.Module):
        module.sow("intermediates", "attention_weights", weights)
    else:
        from flax import nnx

        module.sow(nnx.Intermediate, "attention_weights", weights)


def dot_product_attention_weights(
    query: Array,
    key: Array,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    broadcast_dropout: bool = True,
    dropout_rng: Optional[Array] = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    is_causal: bool = False,
    *,
    activation: str | Callable = "softmax",
    prenorm_order: str = "after_scaling",
    identity_gain: float = 0.0,
    centre_gain: float = 0.0,
    temperature: Optional[float] = None,
) -> Array:
    """Attention weights ``[batch..., H, Lq, Lk]`` with the arguments of Flax's
    ``dot_product_attention_weights`` and an activation of our registry.

    Steps, in Flax's order: ``s = (q / tau) k^T + bias`` (``tau = sqrt(depth)`` unless
    ``temperature`` is given; with ``prenorm_order="before_scaling"`` a ``norm_`` activation's
    standardisation runs on ``q k^T`` first), valid keys = ``mask`` and, with ``is_causal``,
    ``j <= i``; ``w = act(s, valid)``; with gains ``w = g1 I + w - g2 C`` (``I`` at each query's
    own key: the diagonal when ``Lq == Lk``, else its last valid key, as in a KV-cache decode,
    see :func:`shaped_attn.activations.shape`); the weights are sown into ``module``; then
    dropout exactly as Flax (same key, same mask, rescaled by ``1 / keep_prob``).

    Query heads may be a multiple of key heads (grouped-query attention, as Flax).
    """
    act, standardise_first = activations.split_prenorm(activation, prenorm_order)
    dtype = jnp.result_type(query, key) if dtype is None else jnp.dtype(dtype)
    query, key = jnp.asarray(query, dtype), jnp.asarray(key, dtype)
    if query.ndim != key.ndim or query.shape[:-3] != key.shape[:-3]:
        raise ValueError(f"query {query.shape} and key {key.shape} must have the same batch dims")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key depths must match, got {query.shape[-1]} and {key.shape[-1]}")
    q_heads, k_heads = query.shape[-2], key.shape[-2]
    if q_heads % k_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key heads ({k_heads})")
    if q_heads != k_heads:
        key = jnp.repeat(key, q_heads // k_heads, axis=-2)  # query head h uses key head h // rep
    depth = query.shape[-1]
    tau = jnp.sqrt(depth).astype(dtype) if temperature is None else jnp.asarray(temperature, dtype)
    if standardise_first:
        qk = jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)
        valid = _combined_mask(mask, is_causal, qk.shape)
        scores = activations.standardise_rows(qk, valid) / tau
    else:
        scores = jnp.einsum("...qhd,...khd->...hqk", query / tau, key, precision=precision)
    if bias is not None:
        scores = scores + bias
    valid = _combined_mask(mask, is_causal, scores.shape)
    weights = act(scores, valid)
    if identity_gain or centre_gain:
        weights = activations.shape(weights, valid, identity=identity_gain, centre=centre_gain)
    weights = weights.astype(dtype)
    if module is not None:
        _sow(module, weights)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        if broadcast_dropout:  # one mask shared over the batch and head dimensions
            dropout_shape = (1,) * (key.ndim - 2) + weights.shape[-2:]
        else:
            dropout_shape = weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
        weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
    return weights


def attention_fn(
    activation: str | Callable = "softmax",
    *,
    prenorm_order: str = "after_scaling",
    identity_gain: float = 0.0,
    centre_gain: float = 0.0,
    temperature: Optional[float] = None,
) -> Callable[..., Array]:
    """A Flax ``attention_fn`` applying ``activation`` (a registered name or a callable
    ``fn(scores, mask=None)``).

    Arguments:
        activation: the attention activation (:func:`shaped_attn.activations.names`).
        prenorm_order: ``"after_scaling"`` or ``"before_scaling"`` (``norm_`` activations
            only; ``docs/activations.md``, "Two versions of the authors' code").
        identity_gain, centre_gain: shaping gains ``g1, g2`` of ``g1 I + A - g2 C`` (Noci et
            al., Eq. 4); 0 and 0: no shaping.
        temperature: ``tau`` of ``q k^T / tau``; ``None``: ``sqrt(depth)``, Flax's scaling
            (the shaped Transformer's ``tau0 sqrt(n n_k)`` must be given explicitly).

    Returns ``fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
    dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None, precision=None,
    module=None, is_causal=False, **kwargs) -> [batch..., Lq, H, d_v]``, the signature of
    ``flax.nnx.dot_product_attention`` (Linen's layer passes a subset; the extra keywords of
    :data:`IGNORED_KWARGS` are accepted and ignored, any other raises TypeError). Its
    ``weights`` attribute is the matching :func:`dot_product_attention_weights`.
    """
    _check_options(activation, prenorm_order, identity_gain, centre_gain, temperature)
    options = dict(activation=activation, prenorm_order=prenorm_order, identity_gain=identity_gain,
                   centre_gain=centre_gain, temperature=temperature)

    def weights_fn(query, key, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                   is_causal=False):
        return dot_product_attention_weights(
            query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
            dtype, precision, module, is_causal, **options)

    def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
           dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
           is_causal=False, **kwargs):
        unknown = set(kwargs) - IGNORED_KWARGS
        if unknown:
            raise TypeError(f"attention_fn got unexpected keyword arguments {sorted(unknown)}")
        dtype = jnp.result_type(query, key, value) if dtype is None else jnp.dtype(dtype)
        query, key, value = (jnp.asarray(a, dtype) for a in (query, key, value))
        if key.shape[-3] != value.shape[-3]:
            raise ValueError(f"key and value lengths must match, got {key.shape[-3]} and {value.shape[-3]}")
        weights = weights_fn(query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
                             deterministic, dtype, precision, module, is_causal)
        if weights.shape[-3] != value.shape[-2]:
            value = jnp.repeat(value, weights.shape[-3] // value.shape[-2], axis=-2)
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)

    name = activation if isinstance(activation, str) else getattr(activation, "__name__", "custom")
    fn.__name__ = f"attention_fn_{name}"
    fn.__doc__ = f"Flax attention_fn with the {name!r} activation (shaped_attn.attention_fn)."
    fn.weights = weights_fn
    return fn
