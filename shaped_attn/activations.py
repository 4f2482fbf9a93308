"""Attention activations: pure maps from scores ``[..., Lq, Lk]`` to weights of the same shape.

Every activation has the signature ``fn(scores, mask=None) -> weights``. ``mask`` is a boolean
array broadcastable to ``scores`` (True = the query may attend to that key, Flax's convention).

Masking rule, the same for every activation (spec/activations.md, "Masking"):
the activation is applied to the scores with masked entries replaced by a harmless finite value,
masked weights are then set to exactly 0, and any normalisation runs over the valid keys only.
A fully masked row returns zeros. Because masked scores never enter a transcendental function,
a ``-inf`` fill in masked positions cannot produce NaN in values or gradients.

Denominators that can vanish (sinmax, cosmax, sin2max: the row sum of f(s); sirenmax: the pole
of f at s = pi/2 + 2 pi k) are guarded by ``DENOMINATOR_EPS`` with the sign of the quantity
they replace, so weights can become large (that is the method's behaviour, visible in the
diagnostics) but never NaN or inf.

References: Wang, Liu, Liu (arXiv 2108.07153) for the periodic family; Saratchandran et al.
(arXiv 2410.18613) for ``polynomial``; Noci et al. (arXiv 2306.17759, Eq. 4) for
``shaped_softmax``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
Activation = Callable[..., Array]

DENOMINATOR_EPS = 1e-6
"""Smallest magnitude allowed for a row sum or for sirenmax's pole ``2 - 2 sin s``."""

PRENORM_EPS = 1e-5
"""Variance epsilon of the ``norm_`` pre-normalisation (Wang et al.'s code)."""


# --------------------------------------------------------------------------- masking helpers


def valid_keys(scores: Array, mask: Optional[Array]) -> Array:
    """Boolean array of ``scores``' shape: True where a key is visible to the query."""
    if mask is None:
        return jnp.ones(scores.shape, dtype=bool)
    return jnp.broadcast_to(jnp.asarray(mask, dtype=bool), scores.shape)


def valid_count(valid: Array) -> Array:
    """Number of valid keys per row, ``[..., Lq, 1]``, in the float dtype of the caller."""
    return jnp.sum(valid, axis=-1, keepdims=True)


def _float(x: Array) -> Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _guard(x: Array) -> Array:
    """Replace ``|x| < DENOMINATOR_EPS`` by ``+-DENOMINATOR_EPS`` keeping the sign (0 -> +)."""
    return jnp.where(x >= 0, jnp.maximum(x, DENOMINATOR_EPS), jnp.minimum(x, -DENOMINATOR_EPS))


def _normalise_rows(values: Array, valid: Array) -> Array:
    """``values / sum_valid(values)`` with masked entries 0 and a sign-preserving guard."""
    values = jnp.where(valid, values, 0)
    return values / _guard(jnp.sum(values, axis=-1, keepdims=True))


def standardise_rows(scores: Array, mask: Optional[Array] = None) -> Array:
    """Pre-normalisation of Wang et al.: ``(s - mean) / sqrt(var + 1e-5)`` over valid keys.

    The variance is unbiased (divides by ``N - 1``, with ``N - 1`` floored at 1 so a row with
    one valid key maps to 0). Masked entries are returned as 0.
    """
    s = _float(scores)
    valid = valid_keys(s, mask)
    n = valid_count(valid).astype(s.dtype)
    s = jnp.where(valid, s, 0)
    mean = jnp.sum(s, axis=-1, keepdims=True) / jnp.maximum(n, 1)
    centred = jnp.where(valid, s - mean, 0)
    var = jnp.sum(centred**2, axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
    return centred / jnp.sqrt(var + PRENORM_EPS)


# ------------------------------------------------------------------------- the activations


def softmax(scores: Array, mask: Optional[Array] = None) -> Array:
    """``exp(s_j) / sum_valid exp(s)``, max-subtracted; a fully masked row gives zeros."""
    s = _float(scores)
    valid = valid_keys(s, mask)
    row_max = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    e = jnp.where(valid, jnp.exp(jnp.where(valid, s, row_max) - row_max), 0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(den > 0, den, 1)


def _sirenmax_f(s: Array) -> Array:
    """``(sin s + 1) / (2 - 2 sin s)`` with the pole guarded by ``DENOMINATOR_EPS``."""
    sin = jnp.sin(s)
    return (sin + 1) / jnp.maximum(2 - 2 * sin, DENOMINATOR_EPS)


ELEMENTWISE: dict[str, Callable[[Array], Array]] = {
    "sinmax": jnp.sin,
    "cosmax": jnp.cos,
    "sin2max": lambda s: jnp.sin(s) ** 2,
    "sin2max_shifted": lambda s: jnp.sin(s + math.pi / 4) ** 2,
    "sirenmax": _sirenmax_f,
}
"""The ``f`` of the row-normalised periodic activations ``w_j = f(s_j) / sum_valid f(s)``."""


def row_normalised(f: Callable[[Array], Array]) -> Activation:
    """Activation ``w_j = f(s_j) / sum_valid f(s)`` for an elementwise ``f``."""

    def activation(scores: Array, mask: Optional[Array] = None) -> Array:
        s = _float(scores)
        valid = valid_keys(s, mask)
        return _normalise_rows(f(jnp.where(valid, s, 0)), valid)

    return activation


def sin_softmax(scores: Array, mask: Optional[Array] = None) -> Array:
    """``softmax(sin(s))`` over valid keys (Wang et al.)."""
    s = _float(scores)
    return softmax(jnp.sin(jnp.where(valid_keys(s, mask), s, 0)), mask)


def prenormalised(activation: Activation) -> Activation:
    """``activation(standardise_rows(s))``: the ``norm_`` variants of Wang et al."""

    def normed(scores: Array, mask: Optional[Array] = None) -> Array:
        return activation(standardise_rows(scores, mask), mask)

    return normed


def polynomial(p: int) -> Activation:
    """``s^p / sqrt(N)`` with N the valid keys of the row, no row normalisation.

    Saratchandran et al. (arXiv 2410.18613), Sec. 4. Powers are taken in at least float32
    and cast back; the result overflows once ``|s|^p`` exceeds the dtype's range.
    """
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"p={p!r} must be an integer >= 1")

    def activation(scores: Array, mask: Optional[Array] = None) -> Array:
        s = _float(scores)
        wide = s.astype(jnp.promote_types(s.dtype, jnp.float32))
        valid = valid_keys(wide, mask)
        n = jnp.maximum(valid_count(valid), 1).astype(wide.dtype)
        w = jnp.where(valid, jnp.where(valid, wide, 0) ** p, 0) / jnp.sqrt(n)
        return w.astype(s.dtype)

    activation.__name__ = f"polynomial{p}"
    return activation


def sigmoid(scores: Array, mask: Optional[Array] = None) -> Array:
    """``sigmoid(s - log N)`` per key, N the valid keys of the row (sigmoid attention)."""
    s = _float(scores)
    valid = valid_keys(s, mask)
    n = jnp.maximum(valid_count(valid), 1).astype(s.dtype)
    return jnp.where(valid, jax.nn.sigmoid(jnp.where(valid, s, 0) - jnp.log(n)), 0)


def relu(scores: Array, mask: Optional[Array] = None) -> Array:
    """``relu(s) / N`` per key, N the valid keys of the row."""
    s = _float(scores)
    valid = valid_keys(s, mask)
    n = jnp.maximum(valid_count(valid), 1).astype(s.dtype)
    return jnp.where(valid, jax.nn.relu(jnp.where(valid, s, 0)), 0) / n


def linear(scores: Array, mask: Optional[Array] = None) -> Array:
    """``s / N`` per key: the scores themselves, averaged over the N valid keys."""
    s = _float(scores)
    valid = valid_keys(s, mask)
    n = jnp.maximum(valid_count(valid), 1).astype(s.dtype)
    return jnp.where(valid, s, 0) / n


def centring_matrix(valid: Array, dtype=None) -> Array:
    """``C_ij = 1/m_i`` on the valid keys of row i, 0 elsewhere (``11^T/m`` without a mask)."""
    n = valid_count(valid)
    c = valid / jnp.maximum(n, 1)
    return c if dtype is None else c.astype(dtype)


def shape(
    weights: Array,
    mask: Optional[Array] = None,
    *,
    identity: float | Array = 1.0,
    centre: float | Array = 1.0,
) -> Array:
    """Shaped attention ``identity * I + weights - centre * C`` (Noci et al., Eq. 4).

    ``C`` centres row i over its ``m_i`` valid keys (``11^T/m`` without a mask, ``1/i`` on
    a causal mask). ``identity`` and ``centre`` are gains, 1 in the paper; 0 removes a term
    (the ablations of Fig. 4). Queries and keys must index the same tokens (``Lq == Lk``).
    Masked entries are 0.
    """
    lq, lk = weights.shape[-2:]
    if lq != lk:
        raise ValueError(f"shaped attention needs square scores, got Lq={lq}, Lk={lk}")
    valid = valid_keys(weights, mask)
    eye = jnp.broadcast_to(jnp.eye(lq, dtype=weights.dtype), weights.shape)
    # Grouped so that weights == C (zero scores, uniform softmax) gives exactly identity * I.
    a = identity * eye + (weights - centre * centring_matrix(valid, weights.dtype))
    return jnp.where(valid, a, 0)


def shaped_softmax(scores: Array, mask: Optional[Array] = None) -> Array:
    """``I + softmax(s) - C``: the shaped attention matrix at a given temperature."""
    return shape(softmax(scores, mask), mask)


# -------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Activation] = {}


def register(name: str, fn: Activation, *, overwrite: bool = False) -> Activation:
    """Register ``fn(scores, mask=None) -> weights`` under ``name`` and return it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"activation name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"activation {name!r} must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"activation {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = fn
    return fn


def names() -> tuple[str, ...]:
    """All registered activation names, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Activation:
    """The activation registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; known activations: {', '.join(names())}"
        ) from None


def resolve(activation: str | Activation) -> Activation:
    """A registered name or a callable ``fn(scores, mask=None)``, as a callable."""
    return activation if callable(activation) else get(activation)


register("softmax", softmax)
for _name, _f in ELEMENTWISE.items():
    register(_name, row_normalised(_f))
register("sin_softmax", sin_softmax)
for _name in (*ELEMENTWISE, "sin_softmax"):
    register(f"norm_{_name}", prenormalised(_REGISTRY[_name]))
register("polynomial2", polynomial(2))
register("polynomial3", polynomial(3))
register("shaped_softmax", shaped_softmax)
register("sigmoid", sigmoid)
register("relu", relu)
register("linear", linear)
