"""Diagnostics of attention activations and of trained or freshly initialised Transformers.

Pure functions of arrays, usable from notebooks, scripts and inside ``jax.jit``:

* **Activation Jacobians** (Wang, Liu, Liu, arXiv 2108.07153): the Jacobian ``dw/ds`` of an
  activation with respect to one row of scores, its Frobenius and spectral norms and the
  *saturation fraction* (rows whose Jacobian norm falls below a threshold), for scores drawn
  from a normal distribution of any std, a heavy-tailed Student t, or a normal with a few large
  outliers. Closed form for softmax, ``J = diag(p) - p p^T``, as an oracle.
* **Attention statistics**: the Frobenius norm of every attention matrix (Saratchandran et al.,
  arXiv 2410.18613, bound ``||softmax(A)||_F <= sqrt(N)``), attention entropy.
* **Token statistics**: mean off-diagonal correlation (cosine similarity) of the token Gram
  matrix ``X X^T`` and the effective rank of a PSD matrix (rank collapse, Noci et al.).
* **Gradient norms at initialisation** per layer for the query and value weights of any model
  of the family (Noci et al., arXiv 2306.17759, Fig. 2).

Shapes in names: ``R`` rows, ``N`` keys, ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` width.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sde._helpers.linalg import gram  # ``X X^T / D`` over tokens (one copy for the repository)

from . import activations

Array = jax.Array

# ------------------------------------------------------------------ score distributions


@functools.partial(jax.jit, static_argnames=("n_rows", "n_keys", "dtype"))
def normal_scores(key: Array, n_rows: int, n_keys: int, std: float = 1.0, dtype=None) -> Array:
    """Scores ``[n_rows, n_keys]`` i.i.d. ``N(0, std^2)``."""
    dtype = dtype or jnp.result_type(float)
    return std * jax.random.normal(key, (n_rows, n_keys), dtype=dtype)


@functools.partial(jax.jit, static_argnames=("n_rows", "n_keys", "dtype"))
def student_t_scores(
    key: Array, n_rows: int, n_keys: int, df: float, scale: float = 1.0, dtype=None
) -> Array:
    """Heavy-tailed scores ``scale * t_df`` (Student t with ``df`` degrees of freedom).

    ``df = 1`` is Cauchy; as ``df -> inf`` this tends to ``N(0, scale^2)``. The variance is
    ``scale^2 df / (df - 2)`` for ``df > 2`` and infinite otherwise.
    """
    dtype = dtype or jnp.result_type(float)
    return scale * jax.random.t(key, df, (n_rows, n_keys), dtype=dtype)


@functools.partial(jax.jit, static_argnames=("n_rows", "n_keys", "n_outliers", "dtype"))
def outlier_scores(
    key: Array,
    n_rows: int,
    n_keys: int,
    n_outliers: int = 1,
    magnitude: float = 10.0,
    std: float = 1.0,
    dtype=None,
) -> Array:
    """``N(0, std^2)`` scores with ``n_outliers`` keys per row (random positions) set to
    ``+magnitude``: a few keys that dominate the row, the case where softmax saturates."""
    if not 0 <= n_outliers <= n_keys:
        raise ValueError(f"n_outliers={n_outliers} must lie in [0, n_keys={n_keys}]")
    dtype = dtype or jnp.result_type(float)
    k_base, k_pos = jax.random.split(key)
    base = normal_scores(k_base, n_rows, n_keys, std, dtype)
    if n_outliers == 0:
        return base
    # A random subset of n_outliers positions per row: the n smallest of uniform keys.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_pos, (n_rows, n_keys)), axis=-1), axis=-1)
    return jnp.where(ranks < n_outliers, jnp.asarray(magnitude, dtype), base)


def sample_scores(key: Array, n_rows: int, n_keys: int, kind: str = "normal", **params) -> Array:
    """Dispatch on ``kind`` in ``{"normal", "student_t", "outliers"}`` with the keyword
    arguments of :func:`normal_scores`, :func:`student_t_scores`, :func:`outlier_scores`."""
    samplers = {"normal": normal_scores, "student_t": student_t_scores, "outliers": outlier_scores}
    if kind not in samplers:
        raise ValueError(f"kind={kind!r} is not one of {tuple(samplers)}")
    return samplers[kind](key, n_rows, n_keys, **params)


# -------------------------------------------------------------------- activation Jacobians


def activation_jacobian(
    activation: activations.Activation | str, scores: Array, mask: Optional[Array] = None
) -> Array:
    """Jacobian of each row's weights with respect to that row's scores.

    Arguments:
        activation: registered name or callable ``fn(scores, mask=None)``, assumed row-wise
            (the weights of row q depend on the scores of row q only), as every registered
            activation is.
        scores: ``[..., Lq, Lk]`` score matrices (``Lq == Lk`` for ``shaped_softmax``).
        mask: optional boolean, broadcastable to ``scores``.

    Returns:
        ``[..., Lq, Lk, Lk]`` with ``J[..., q, i, j] = d w[q, i] / d s[q, j]``. Computed with
        ``Lk`` forward-mode products, one per key column: perturbing column j of every row
        at once gives column j of every row's Jacobian, because rows do not interact.
    """
    s = jnp.asarray(scores)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.result_type(float))
    if s.ndim < 2:
        raise ValueError(f"scores must be [..., Lq, Lk], got shape {s.shape}")
    return _jacobian(activations.resolve(activation), s, mask)


@functools.partial(jax.jit, static_argnums=0)
def _jacobian(fn, s, mask):
    n = s.shape[-1]

    def column(j):
        tangent = jnp.broadcast_to(jnp.arange(n) == j, s.shape).astype(s.dtype)
        return jax.jvp(lambda x: fn(x, mask), (s,), (tangent,))[1]

    return jnp.moveaxis(jax.vmap(column)(jnp.arange(n)), 0, -1)


@jax.jit
def softmax_jacobian(probs: Array) -> Array:
    """Closed form ``diag(p) - p p^T`` of softmax's Jacobian, ``[..., N] -> [..., N, N]``."""
    p = jnp.asarray(probs)
    n = p.shape[-1]
    eye = jnp.eye(n, dtype=p.dtype).reshape((1,) * (p.ndim - 1) + (n, n))
    return eye * p[..., None, :] - p[..., :, None] * p[..., None, :]


@jax.jit
def frobenius_norm(mat: Array) -> Array:
    """Frobenius norm over the last two axes."""
    return jnp.sqrt(jnp.sum(jnp.square(mat), axis=(-2, -1)))


@jax.jit
def spectral_norm(mat: Array) -> Array:
    """Largest singular value over the last two axes."""
    return jnp.linalg.svd(mat, compute_uv=False)[..., 0]


def uniform_softmax_jacobian_norm(n_keys: int) -> float:
    """``||diag(1/N) - 11^T/N^2||_F = sqrt(N - 1) / N``: softmax's Jacobian at equal scores."""
    return math.sqrt(n_keys - 1) / n_keys


def default_saturation_threshold(n_keys: int) -> float:
    """5% of softmax's Jacobian norm at equal scores, ``0.05 sqrt(N - 1) / N``."""
    return 0.05 * uniform_softmax_jacobian_norm(n_keys)


def saturation_fraction(norms: Array, threshold: float) -> Array:
    """Fraction of rows whose Jacobian norm is below ``threshold`` (NaN rows count as
    saturated: no usable gradient flows through them)."""
    norms = jnp.asarray(norms)
    return jnp.mean(~(norms >= threshold))


def jacobian_summary(
    activation: activations.Activation | str,
    scores: Array,
    mask: Optional[Array] = None,
    threshold: Optional[float] = None,
) -> dict[str, Array]:
    """Norms of the activation's Jacobian over the rows of ``scores`` ``[..., Lq, N]``.

    Returns a dict of scalars: ``frobenius_mean``, ``frobenius_median``, ``frobenius_q10``,
    ``frobenius_q90``, ``spectral_median``, ``saturation`` (fraction of rows with Frobenius
    norm below ``threshold``; default :func:`default_saturation_threshold`), ``threshold``,
    ``max_abs_weight`` (largest ``|w|``: denominators near 0 show up here), ``nonfinite``
    (fraction of non-finite Jacobian entries; should be 0).
    """
    scores = jnp.asarray(scores)
    n = scores.shape[-1]
    thr = default_saturation_threshold(n) if threshold is None else float(threshold)
    return _summary(activations.resolve(activation), scores, mask, thr)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _summary(fn, scores, mask, thr):
    jac = _jacobian(fn, scores, mask)
    weights = fn(scores, mask)
    frob = frobenius_norm(jac).reshape(-1)
    spec = spectral_norm(jnp.where(jnp.isfinite(jac), jac, 0)).reshape(-1)
    return {
        "frobenius_mean": jnp.mean(frob),
        "frobenius_median": jnp.median(frob),
        "frobenius_q10": jnp.quantile(frob, 0.1),
        "frobenius_q90": jnp.quantile(frob, 0.9),
        "spectral_median": jnp.median(spec),
        "saturation": saturation_fraction(frob, thr),
        "threshold": jnp.asarray(thr),
        "max_abs_weight": jnp.max(jnp.abs(weights)),
        "nonfinite": jnp.mean(~jnp.isfinite(jac)),
    }


def jacobian_sweep(
    activation: activations.Activation | str,
    key: Array,
    settings: Sequence[Mapping[str, Any]],
    n_rows: int = 512,
    n_keys: int = 16,
    threshold: Optional[float] = None,
) -> list[dict[str, float]]:
    """:func:`jacobian_summary` for each score distribution in ``settings``.

    Each setting is a mapping with ``kind`` (see :func:`sample_scores`) and its parameters,
    e.g. ``{"kind": "normal", "std": 4.0}``. ``n_rows`` rows of ``n_keys`` scores are drawn
    (rounded up to a multiple of ``n_keys``) and grouped into square ``n_keys x n_keys``
    score matrices, so that square-only activations (``shaped_softmax``) work too; rows are
    independent either way. The same key is used for every setting (common random
    numbers). Returns host floats.
    """
    fn = activations.resolve(activation)
    n_rows = -(-n_rows // n_keys) * n_keys
    out = []
    for setting in settings:
        setting = dict(setting)
        kind = setting.pop("kind", "normal")
        scores = sample_scores(key, n_rows, n_keys, kind, **setting)
        summary = jacobian_summary(fn, scores.reshape(-1, n_keys, n_keys), threshold=threshold)
        out.append({"kind": kind, **setting, **{k: float(v) for k, v in summary.items()}})
    return out


# ------------------------------------------------------------------ attention statistics


def attention_frobenius(weights: Array) -> Array:
    """Frobenius norm of each attention matrix ``[..., Lq, Lk] -> [...]``."""
    return frobenius_norm(weights)


@jax.jit
def attention_entropy(weights: Array, mask: Optional[Array] = None, eps: float = 1e-30) -> Array:
    """Shannon entropy of each attention row ``[..., Lq, Lk] -> [..., Lq]``.

    Rows are first normalised as ``|w| / sum |w|``: the usual entropy for probability rows
    (softmax, the non-negative periodic maps); for signed weights (sinmax, polynomial3,
    shaped attention) it is the entropy of the magnitude profile. Equal weights over N valid
    keys give ``log N``; a one-hot row gives 0. A zero row gives 0.
    """
    a = jnp.abs(jnp.asarray(weights))
    if mask is not None:
        a = jnp.where(jnp.broadcast_to(jnp.asarray(mask, bool), a.shape), a, 0)
    total = jnp.sum(a, axis=-1, keepdims=True)
    p = a / jnp.where(total > 0, total, 1)
    return -jnp.sum(jnp.where(p > eps, p * jnp.log(jnp.where(p > eps, p, 1)), 0), axis=-1)


# ---------------------------------------------------------------------- token statistics


@jax.jit
def token_correlation(x: Array, eps: float = 1e-12) -> Array:
    """Mean off-diagonal cosine similarity ``<x_i, x_j> / (|x_i| |x_j|)`` of the tokens.

    ``[..., L, D] -> [...]``; 1 means rank collapse (all tokens parallel), ~0 for independent
    random tokens. The uncentred correlation of the Gram matrix, as in Noci et al.
    """
    g = gram(x)
    diag = jnp.diagonal(g, axis1=-2, axis2=-1)
    inv = 1 / jnp.sqrt(jnp.maximum(diag, eps))
    corr = g * inv[..., :, None] * inv[..., None, :]
    l = g.shape[-1]
    if l < 2:
        return jnp.ones(g.shape[:-2], g.dtype)
    off = jnp.sum(corr, axis=(-2, -1)) - jnp.sum(jnp.diagonal(corr, axis1=-2, axis2=-1), axis=-1)
    return off / (l * (l - 1))


@jax.jit
def effective_rank(matrix: Array, eps: float = 1e-12) -> Array:
    """Entropy effective rank ``exp(H(lambda / sum lambda))`` of a symmetric PSD matrix.

    ``[..., m, m] -> [...]`` (Roy & Vetterli 2007, on eigenvalues). The identity (any
    multiple of it) gives ``m``; a rank-one matrix gives 1. Small negative eigenvalues from
    round-off are clipped at 0.
    """
    m = jnp.asarray(matrix)
    m = (m + jnp.swapaxes(m, -1, -2)) / 2
    lam = jnp.clip(jnp.linalg.eigvalsh(m), 0, None)
    total = jnp.sum(lam, axis=-1, keepdims=True)
    p = lam / jnp.where(total > 0, total, 1)
    h = -jnp.sum(jnp.where(p > eps, p * jnp.log(jnp.where(p > eps, p, 1)), 0), axis=-1)
    return jnp.exp(h)


@jax.jit
def token_effective_rank(x: Array) -> Array:
    """:func:`effective_rank` of the token Gram matrix ``X X^T / D``: ``[..., L, D] -> [...]``."""
    return effective_rank(gram(x))


@jax.jit
def attention_summary(weights: Sequence[Array] | Array, mask: Optional[Array] = None) -> dict[str, Array]:
    """Per-layer scalars from attention matrices, cheap enough for a jitted training step.

    Arguments:
        weights: attention matrices of every layer: a sequence of ``[B, H, Lq, Lk]`` arrays or
            one stacked ``[layers, B, H, Lq, Lk]`` array.
        mask: optional key mask broadcastable to one layer's weights.

    Returns:
        ``attn_frobenius`` (mean over batch and heads of ``||A||_F``, per layer),
        ``attn_frobenius_over_sqrt_n`` (the same divided by ``sqrt(Lk)``: at most 1 for
        softmax), ``attn_entropy`` (mean row entropy per layer), each ``[layers]``.
    """
    w = jnp.stack(list(weights)) if not hasattr(weights, "ndim") else jnp.asarray(weights)
    frob = attention_frobenius(w)
    frob = jnp.mean(frob.reshape(frob.shape[0], -1), axis=-1)
    ent = attention_entropy(w, mask)
    ent = jnp.mean(ent.reshape(ent.shape[0], -1), axis=-1)
    return {
        "attn_frobenius": frob,
        "attn_frobenius_over_sqrt_n": frob / math.sqrt(w.shape[-1]),
        "attn_entropy": ent,
    }


@jax.jit
def token_summary(x: Array) -> dict[str, Array]:
    """``token_correlation`` and ``token_effective_rank`` of ``[..., B, L, D]`` token
    representations, averaged over the batch axis (leading axes, e.g. layers, are kept)."""
    x = jnp.asarray(x)
    return {
        "token_correlation": jnp.mean(token_correlation(x), axis=-1),
        "token_effective_rank": jnp.mean(token_effective_rank(x), axis=-1),
    }


# ------------------------------------------------------------------- Frobenius bounds


@jax.jit
def softmax_frobenius_bound_ratio(scores: Array) -> Array:
    """``||softmax(A)||_F / sqrt(N)`` for ``A`` ``[..., N, N]``: at most 1 for any ``A``
    (Saratchandran et al., Thm. 3.1)."""
    a = jnp.asarray(scores)
    return frobenius_norm(activations.softmax(a)) / math.sqrt(a.shape[-1])


@jax.jit
def softmax_jacobian_frobenius(probs: Array) -> Array:
    """``||diag(p) - p p^T||_F`` in closed form, ``[..., N] -> [...]``:
    ``sqrt(sum p^2 - 2 sum p^3 + (sum p^2)^2)`` (O(N) instead of forming the N x N matrix)."""
    p = jnp.asarray(probs)
    s2 = jnp.sum(p**2, axis=-1)
    s3 = jnp.sum(p**3, axis=-1)
    sq = jnp.maximum(s2 - 2 * s3 + s2**2, 0)
    positive = sq > 0  # sqrt's derivative is infinite at 0 (one-hot rows): keep gradients finite
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


@jax.jit
def softmax_gradient_bound_ratio(scores: Array) -> Array:
    """``||d softmax(A) / dA||_F / (2 sqrt(N))`` for ``A`` ``[..., N, N]``: at most 1.

    The derivative of the matrix map ``A -> softmax(A)`` (row-wise) is block diagonal with
    blocks ``J_i = diag(p_i) - p_i p_i^T``; its Frobenius norm is ``sqrt(sum_i ||J_i||_F^2)``
    (closed form per row, :func:`softmax_jacobian_frobenius`).
    """
    a = jnp.asarray(scores)
    per_row = softmax_jacobian_frobenius(activations.softmax(a))  # [..., N]
    return jnp.sqrt(jnp.sum(per_row**2, axis=-1)) / (2 * math.sqrt(a.shape[-1]))


# --------------------------------------------------------- gradient norms at initialisation


def _flat_params(state) -> list[tuple[tuple[str, ...], Array]]:
    """``(path, array)`` pairs of an ``nnx.State`` (or any pytree of arrays)."""
    from flax import nnx

    if isinstance(state, nnx.State):
        flat = nnx.to_flat_state(state)
        return [(tuple(str(p) for p in path), v.get_value() if hasattr(v, "get_value") else v)
                for path, v in flat]
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        out.append((names, leaf))
    return out


def layer_gradient_norms(
    grads: Any,
    names: Sequence[str] = ("query", "value"),
    layers_key: str = "layers",
    param: str = "kernel",
) -> dict[str, np.ndarray]:
    """Per-layer Frobenius norms of the gradients of chosen weight matrices.

    Arguments:
        grads: gradients as an ``nnx.State`` (e.g. from ``nnx.grad``) or any pytree.
        names: module names to report (``"query"``, ``"key"``, ``"value"``, ``"output"``,
            ``"mlp_in"``, ``"mlp_out"`` in the family's :class:`~shaped_attn.blocks.Block`).
        layers_key: the path component under which the stacked layers live (the family's
            :class:`~shaped_attn.models.Stack` stores them as ``layers`` with a leading
            layer axis).
        param: the parameter of that module (``"kernel"``).

    Returns:
        ``{name: ndarray [depth]}``; the norm of layer ``l`` is taken over all axes but the
        leading layer axis. Several stacks in one model (rare) are concatenated in path order.
    """
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for path, leaf in _flat_params(grads):
        if layers_key not in path or path[-1] != param:
            continue
        below = path[path.index(layers_key) + 1 :]
        for n in names:
            if len(below) >= 2 and below[-2] == n:
                leaf = jnp.asarray(leaf)
                norms = jnp.sqrt(jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=-1))
                out[n].append(np.asarray(norms))
    missing = [n for n, v in out.items() if not v]
    if missing:
        raise ValueError(f"no stacked '{param}' gradients found under '{layers_key}' for {missing}")
    return {n: np.concatenate(v) for n, v in out.items()}


def param_gradient(graphdef: Any, loss_fn: Callable[..., Array]) -> Callable:
    """``gradient(params, rest, *inputs)``: the gradient of ``loss_fn(model, *inputs)`` with
    respect to ``params``, the ``nnx.Param`` state of ``model = nnx.merge(graphdef, params,
    rest)`` (the program :func:`init_gradient_norms` runs)."""
    from flax import nnx

    def gradient(params, rest, *inputs):
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), *inputs))(params)

    return gradient


def init_gradient_norms(
    model: Any,
    loss_fn: Callable[..., Array],
    names: Sequence[str] = ("query", "value"),
    inputs: Sequence[Any] = (),
) -> dict[str, np.ndarray]:
    """Per-layer gradient norms of ``loss_fn(model, *inputs)`` for the query and value weights.

    The gradient is taken (jitted) with respect to every ``nnx.Param`` of ``model`` at its
    current (e.g. initial) parameters; ``loss_fn(model, *inputs) -> scalar`` must not mutate
    the model. See :func:`layer_gradient_norms` for the output. This is the
    measurement behind Noci et al. (arXiv 2306.17759, Fig. 2), which compares the shaped,
    Pre-LN and Post-LN Transformers across depth; ``scripts/gradient_vanishing.py`` runs it.
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(param_gradient(graphdef, loss_fn))(params, rest, *inputs)
    return layer_gradient_norms(grads, names)
