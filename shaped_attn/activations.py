"""Attention activations: pure maps from scores ``[..., Lq, Lk]`` to weights of the same shape.

Every activation has the signature ``fn(scores, mask=None) -> weights``. ``mask`` is a boolean
array broadcastable to ``scores`` (True = the query may attend to that key, Flax's convention).
Formulas, the two versions of Wang et al.'s code and the guards are in ``docs/activations.md``.

Masking rule, the same for every activation (``docs/activations.md``, "Masking"):
the activation is applied to the scores with masked entries replaced by a harmless finite value,
masked weights are then set to exactly 0, and any normalisation runs over the valid keys only.
A fully masked row returns zeros. Because masked scores never enter a transcendental function,
a ``-inf`` fill in masked positions cannot produce NaN in values or gradients.

Row normalisation ``w_j = f(s_j) / sum_valid f(s)`` (``docs/activations.md``, "Guards"):
for the non-negative maps (:data:`NONNEGATIVE`: sin2max, sin2max_shifted, sirenmax, sin10max)
the division is exact, so every row with a non-zero ``f`` sums to 1 at any score scale; a row
whose ``f`` is zero on every valid key (sin2max at zero scores) has weights 0, like a fully
masked row. The signed maps (sinmax, cosmax) keep the sign of the row sum and floor its
magnitude at :data:`SIGNED_DENOMINATOR_RTOL` times ``sum_valid |f|``, so ``|w_j| <= 1e4``:
weights can become large (the method's behaviour, visible in the diagnostics) but never NaN or
inf. sirenmax's pole ``2 - 2 sin s = 0`` is floored at :data:`DENOMINATOR_EPS`.

Pre-normalisation (the ``norm_`` names) standardises each row over its valid keys before the
activation. It runs on the scores the activation sees, i.e. after the ``1/sqrt(d_h)`` scaling
(``prenorm_order="after_scaling"``, the authors' module file); the attention layers can move
it before the scaling (``"before_scaling"``, the authors' training script), see
:func:`split_prenorm`.

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
"""Smallest value allowed for sirenmax's pole ``2 - 2 sin s`` (so ``f <= 2e6``)."""

SIGNED_DENOMINATOR_RTOL = 1e-4
"""Signed maps (sinmax, cosmax): ``|sum_valid f|`` is floored at this fraction of
``sum_valid |f|`` with its sign kept, so every weight satisfies ``|w_j| <= 1 / 1e-4``."""

PRENORM_EPS = 1e-5
"""Variance epsilon of the ``norm_`` pre-normalisation (Wang et al.'s code)."""

PRENORM_ORDERS = ("after_scaling", "before_scaling")
"""Where the ``norm_`` standardisation sits: on ``q.k / sqrt(d_h)`` (the authors' module file,
the default) or on ``q.k`` before the scaling (the authors' training script, ``demo.py``)."""


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


def normalise_rows(values: Array, valid: Array, *, nonnegative: bool = False) -> Array:
    """``values_j / sum_valid(values)`` per row, masked entries 0 (``docs/activations.md``, "Guards").

    ``nonnegative=True`` (every valid value >= 0): exact division. ``False``: the row sum keeps
    its sign and its magnitude is floored at ``SIGNED_DENOMINATOR_RTOL * sum_valid |values|``
    (a floor relative to the row's own scale: the result does not depend on it). Either way a
    row whose valid values are all 0 (or that has no valid key) returns zeros, and values and
    gradients stay finite.
    """
    values = jnp.where(valid, values, 0)
    total = jnp.sum(values, axis=-1, keepdims=True)
    if nonnegative:
        scale, den = total, total
    else:
        scale = jnp.sum(jnp.abs(values), axis=-1, keepdims=True)
        floor = SIGNED_DENOMINATOR_RTOL * scale
        den = jnp.where(total >= 0, jnp.maximum(total, floor), jnp.minimum(total, -floor))
    empty = scale <= 0
    return jnp.where(empty, 0, values / jnp.where(empty, 1, den))


def standardise_rows(scores: Array, mask: Optional[Array] = None) -> Array:
    """Pre-normalisation of Wang et al.: ``(s - mean) / sqrt(var + 1e-5)`` over valid keys.

    The variance is unbiased (divides by ``N - 1``, with ``N - 1`` floored at 1 so a row with
    one valid key maps to 0), as ``torch.var`` in the authors' code. Masked entries are
    returned as 0.
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
    # The training script's sinmax (demo.py), not the module file's: 1 + sin(10 s) >= 0.
    "sin10max": lambda s: 1 + jnp.sin(10 * s),
}
"""The ``f`` of the row-normalised periodic activations ``w_j = f(s_j) / sum_valid f(s)``."""

NONNEGATIVE = frozenset({"sin2max", "sin2max_shifted", "sirenmax", "sin10max"})
"""The maps of :data:`ELEMENTWISE` with ``f >= 0``: normalised exactly (no floor)."""


def row_normalised(f: Callable[[Array], Array], *, nonnegative: bool = False) -> Activation:
    """Activation ``w_j = f(s_j) / sum_valid f(s)`` for an elementwise ``f``.

    ``nonnegative=True`` promises ``f >= 0`` and normalises exactly; otherwise the row sum has
    the sign-preserving relative floor of :func:`normalise_rows` (which is never active when
    ``f >= 0`` anyway).
    """

    def activation(scores: Array, mask: Optional[Array] = None) -> Array:
        s = _float(scores)
        valid = valid_keys(s, mask)
        return normalise_rows(f(jnp.where(valid, s, 0)), valid, nonnegative=nonnegative)

    return activation


def sin_softmax(scores: Array, mask: Optional[Array] = None) -> Array:
    """``softmax(sin(s))`` over valid keys (Wang et al., the module file's ``SinSoftmax``)."""
    s = _float(scores)
    return softmax(jnp.sin(jnp.where(valid_keys(s, mask), s, 0)), mask)


def prenormalised(activation: Activation) -> Activation:
    """``activation(standardise_rows(s))``: the ``norm_`` variants of Wang et al.

    The returned function carries ``prenorm_base = activation``, which lets the attention
    layers move the standardisation before the ``1/sqrt(d_h)`` scaling (:func:`split_prenorm`).
    """

    def normed(scores: Array, mask: Optional[Array] = None) -> Array:
        return activation(standardise_rows(scores, mask), mask)

    normed.prenorm_base = activation
    return normed


def split_prenorm(activation: str | Activation, order: str = "after_scaling"):
    """``(fn, standardise_first)`` for a pre-normalisation ``order`` (:data:`PRENORM_ORDERS`).

    ``"after_scaling"``: ``(activation, False)``, the activation is applied as registered.
    ``"before_scaling"``: the activation must be pre-normalised (a ``norm_`` name or a
    :func:`prenormalised` function); returns its base activation and ``True``: the caller
    standardises ``q.k`` (:func:`standardise_rows`) before dividing by the temperature, as the
    authors' training script does (``docs/activations.md``, "Two versions of the authors' code").
    """
    if order not in PRENORM_ORDERS:
        raise ValueError(f"prenorm_order={order!r} is not one of {PRENORM_ORDERS}")
    fn = resolve(activation)
    if order == "after_scaling":
        return fn, False
    base = getattr(fn, "prenorm_base", None)
    if base is None:
        raise ValueError(
            f"prenorm_order='before_scaling' needs a pre-normalised activation (a norm_ name), "
            f"got activation={activation!r}"
        )
    return base, True


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


# ------------------------------------------------------------------------------- shaping


def centring_matrix(valid: Array, dtype=None) -> Array:
    """``C_ij = 1/m_i`` on the valid keys of row i, 0 elsewhere (``11^T/m`` without a mask)."""
    n = valid_count(valid)
    c = valid / jnp.maximum(n, 1)
    return c if dtype is None else c.astype(dtype)


def query_positions_from(valid: Array) -> Array:
    """Absolute key index of each query, ``[..., Lq]``, when ``Lq != Lk``: the last valid key
    of its row (a causal or KV-cache mask lets a query see itself last); -1 for a row with no
    valid key. (``Lq == Lk``: use ``arange(Lq)``, the diagonal.)"""
    lk = valid.shape[-1]
    last = lk - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
    return jnp.where(jnp.any(valid, axis=-1), last, -1)


def identity_matrix(shape: tuple, query_positions: Array, dtype) -> Array:
    """``I_ij = 1`` where key ``j`` is query ``i``'s own position, broadcast to ``shape``."""
    pos = jnp.asarray(query_positions)
    keys = jnp.arange(shape[-1]).reshape((1,) * pos.ndim + (shape[-1],))
    return jnp.broadcast_to((pos[..., None] == keys).astype(dtype), shape)


def shape(
    weights: Array,
    mask: Optional[Array] = None,
    *,
    identity: float | Array = 1.0,
    centre: float | Array = 1.0,
    query_positions: Optional[Array] = None,
) -> Array:
    """Shaped attention ``identity * I + weights - centre * C`` (Noci et al., Eq. 4).

    ``C`` centres row i over its ``m_i`` valid keys (``11^T/m`` without a mask, ``1/i`` on
    a causal mask). ``identity`` and ``centre`` are gains, 1 in the paper; 0 removes a term
    (the ablations of Fig. 4). Masked entries are 0.

    ``I`` puts the 1 of query i on its own key: ``query_positions`` (``[..., Lq]`` key
    indices, e.g. ``index + arange(Lq)`` for queries decoded against a KV cache). When it is
    ``None``: the diagonal if ``Lq == Lk``; otherwise each query's last valid key
    (:func:`query_positions_from`) with a mask, or the last ``Lq`` keys without one. With a
    causal (cache) mask, query i at absolute position p then has ``I_ip = 1`` and ``C_ij =
    1/(p + 1)``, the same row as in the full square matrix (``docs/activations.md``, "Shaped
    attention with a KV cache").
    """
    lq, lk = weights.shape[-2:]
    valid = valid_keys(weights, mask)
    if query_positions is None:
        if lq == lk:
            query_positions = jnp.arange(lq)
        elif mask is None:
            query_positions = lk - lq + jnp.arange(lq)
        else:
            query_positions = query_positions_from(valid)
    eye = identity_matrix(weights.shape, query_positions, weights.dtype)
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
    register(_name, row_normalised(_f, nonnegative=_name in NONNEGATIVE))
register("sin_softmax", sin_softmax)
for _name in ("softmax", *ELEMENTWISE, "sin_softmax"):
    register(f"norm_{_name}", prenormalised(_REGISTRY[_name]))
register("polynomial2", polynomial(2))
register("polynomial3", polynomial(3))
register("shaped_softmax", shaped_softmax)
register("sigmoid", sigmoid)
register("relu", relu)
register("linear", linear)
