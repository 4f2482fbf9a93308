"""Drift and diffusion of the covariance SDE, as pure functions of the Gram matrix ``V``.

References: Noci et al., "The Shaped Transformer" (arXiv 2306.17759), Theorem 3.2 and Appendix
C.2 (attention); Li, Nica, Roy, "The Neural Covariance SDE" (arXiv 2206.02768) (shaped ReLU).
Every formula below is written exactly once; docs/sde.md §2-5 derives them and
docs/sde.md §10 lists the paper's typos and how each was checked.

State and conventions:

- ``V`` has shape ``(..., m, m)`` (symmetric PSD); every function is batched over the leading
  axes, pure, and ``jit``/``vmap``-able.
- The diffusion matrix is a covariance over the ``D = m (m + 1) / 2`` upper-triangular entries
  ``(a, b)``, ``a <= b``, ordered row-major: ``(0,0), (0,1), ..., (0,m-1), (1,1), ...``
  (docs/sde.md §1). Its shape is ``(..., D, D)``.

Building blocks (no block coefficients; :class:`SDEParams` owns those):

- ``Sigma_lin(V)[ab, dw] = V_ad V_bw + V_aw V_bd``
- ``Acal(V)[ab, dw] = V_ad G_bw + G_ad V_bw + V_aw G_bd + G_aw V_bd``,
  ``G = V P V P V / m^2``, ``P = I - 1 1^T / m``
- ``b_att(V) = (gamma^2 / tau0^2) [V tr(V F) / m^2 + (diag(V) (V g)^T + (V g) diag(V)^T) / (2m)]``
  with ``F = P V P`` and ``g = diag(F) - tr(F) / m``. This is Appendix C.2 / Eq. 10; the main
  text's Eq. 8 has a sign typo.
- ``b_relu(V)_ab = nu(rho_ab) sqrt(V_aa V_bb)``, ``rho_ab = V_ab / sqrt(V_aa V_bb)``,
  ``nu(rho) = (c_plus - c_minus)^2 / (2 pi) (sqrt(1 - rho^2) - rho arccos(rho))``. The paper's
  appendix has ``(c_plus + c_minus)^2`` and ``+ rho arccos(rho)``: both typos
  (``nu(1) = 0`` is required for the diagonal to be a martingale).

Block combinations (docs/sde.md §5): ``drift = [attention] b_att + relu_drift_coeff b_relu``
and ``diffusion_matrix = k_lin Sigma_lin + acal_coeff Acal``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .._helpers.symmetric import upper_indices
from .constants import SOFTMAX, AttentionConstants
from .params import SDEParams
from .smooth_mlp import drift_smooth

Array = jax.Array


# --------------------------------------------------------------------------- linear algebra


def centre(V: Array) -> Array:
    """``P V P`` with ``P = I - 1 1^T / m`` (double centring, O(m^2))."""
    row = jnp.mean(V, axis=-1, keepdims=True)
    col = jnp.mean(V, axis=-2, keepdims=True)
    tot = jnp.mean(V, axis=(-2, -1), keepdims=True)
    return V - row - col + tot


def attention_gram(V: Array) -> Array:
    """``G = V P V P V / m^2`` (= ``V (P V P) V / m^2``), the second factor of ``Acal``."""
    m = V.shape[-1]
    return V @ centre(V) @ V / m**2


def _pair_product(A: Array, B: Array) -> Array:
    """``X[ab, dw] = A_ad B_bw + A_aw B_bd`` over upper-triangular pairs, shape ``(..., D, D)``."""
    rows, cols = upper_indices(A.shape[-1])
    a, b = rows[:, None], cols[:, None]
    d, w = rows[None, :], cols[None, :]
    return A[..., a, d] * B[..., b, w] + A[..., a, w] * B[..., b, d]


def sigma_lin(V: Array) -> Array:
    """``Sigma_lin(V)[ab, dw] = V_ad V_bw + V_aw V_bd``, shape ``(..., D, D)``.

    The covariance of the upper triangle of ``L (Z + Z^T) L^T / sqrt(2)``, ``L L^T = V``.
    """
    return _pair_product(V, V)


def acal(V: Array) -> Array:
    """``Acal(V)[ab, dw] = V_ad G_bw + G_ad V_bw + V_aw G_bd + G_aw V_bd``, ``(..., D, D)``.

    ``G = V P V P V / m^2`` (:func:`attention_gram`). Zero for ``m = 1``.
    """
    G = attention_gram(V)
    return _pair_product(V, G) + _pair_product(G, V)


# --------------------------------------------------------------------------- attention drift


def attention_bracket(V: Array, constants: AttentionConstants = SOFTMAX) -> Array:
    """The bracket of ``b_att`` (without ``gamma^2 / tau0^2``), shape ``(..., m, m)``.

    Softmax: ``V tr(V F) / m^2 + (diag(V) (V g)^T + (V g) diag(V)^T) / (2m)`` with
    ``F = P V P`` and ``g = diag(F) - tr(F) / m``. O(m^2) per matrix. A general row-normalised
    activation (docs/general_activation_sde.md) weights the two terms by
    ``constants.trace_weight = a1^2`` and ``constants.outer_weight = a2`` and adds
    ``constants.shift_weight * (diag(V) (V u)^T + (V u) diag(V)^T) / m``, ``u = P V 1 / m``,
    ``shift_weight = a2 - a1^2`` (0 for softmax, whose shift invariance cancels it).
    """
    m = V.shape[-1]
    F = centre(V)
    tr_VF = jnp.sum(V * F, axis=(-2, -1))
    diag_F = jnp.diagonal(F, axis1=-2, axis2=-1)
    g = diag_F - jnp.mean(diag_F, axis=-1, keepdims=True)
    Vg = jnp.sum(V * g[..., None, :], axis=-1)
    dV = jnp.diagonal(V, axis1=-2, axis2=-1)
    outer = dV[..., :, None] * Vg[..., None, :]
    out = constants.trace_weight * V * (tr_VF / m**2)[..., None, None] + constants.outer_weight * (
        outer + jnp.swapaxes(outer, -1, -2)
    ) / (2 * m)
    if constants.shift_weight != 0.0:
        # u = P V 1 / m: centred row means of V; the shift term of a non-shift-invariant f.
        row = jnp.mean(V, axis=-1)  # V 1 / m
        u = row - jnp.mean(row, axis=-1, keepdims=True)
        Vu = jnp.sum(V * u[..., None, :], axis=-1)
        shift = dV[..., :, None] * Vu[..., None, :]
        out = out + constants.shift_weight * (shift + jnp.swapaxes(shift, -1, -2)) / m
    return out


def drift_attention(V: Array, params: SDEParams) -> Array:
    """``b_att(V) = (gamma^2 / tau0^2) * bracket``, the paper's attention drift.

    Uses ``params.gamma`` and ``params.tau0`` whatever ``params.block`` is (0 for
    ``tau0 = inf``). Homogeneous of degree 3 in ``V``; ``m = 1`` gives 0; ``m = 2`` gives
    ``gamma^2 / (4 tau0^2) q^2 V`` with ``q = (V11 + V22 - 2 V12) / 2``.
    """
    return params.attention_scale * attention_bracket(V, params.attention_constants)


# --------------------------------------------------------------------------- ReLU drift


def _asin_taylor_coefficients(n_terms: int) -> tuple[float, ...]:
    """``c_k = (2k)! / (4^k (k!)^2 (2k + 1))``: ``asin(x) = sum_k c_k x^(2k+1)``."""
    out, binom = [], 1.0  # binom = (2k choose k) / 4^k
    for k in range(n_terms):
        out.append(binom / (2 * k + 1))
        binom *= (2 * k + 1) / (2 * k + 2)
    return tuple(out)


_ASIN_C = _asin_taylor_coefficients(26)  # |x| <= 1/2: truncation error < 2e-17
_ASIN_TERMS_F32 = 12  # truncation error < 2e-9, far below float32 rounding


def _asin_small(z: Array) -> Array:
    """``asin(z)`` for ``|z| <= 1/2`` by the Taylor series (Horner in ``z^2``)."""
    coeffs = _ASIN_C if jnp.finfo(z.dtype).bits > 32 else _ASIN_C[:_ASIN_TERMS_F32]
    t = z * z
    acc = jnp.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * t + c
    return z * acc


def arccos(x: Array) -> Array:
    """``arccos`` on ``[-1, 1]`` from elementwise polynomials (vectorises on CPU).

    XLA's CPU ``acos`` calls scalar libm per element (~30 ns, 50x a multiply); this is the
    same function to ~2 ulp in float64 (tested against numpy): ``pi/2 - asin(x)`` for
    ``|x| <= 1/2`` and ``2 asin(sqrt((1 - |x|) / 2))`` (reflected for ``x < 0``) otherwise,
    with ``asin`` from its Taylor series on ``[-1/2, 1/2]``.
    """
    a = jnp.abs(x)
    small = a <= 0.5
    y = jnp.sqrt(jnp.maximum(0.5 * (1.0 - a), 0.0))
    s = _asin_small(jnp.where(small, x, y))
    large = jnp.where(x > 0, 2.0 * s, math.pi - 2.0 * s)
    return jnp.where(small, 0.5 * math.pi - s, large)


def relu_nu(rho: Array, c_plus: float, c_minus: float) -> Array:
    """``nu(rho) = (c_plus - c_minus)^2 / (2 pi) (sqrt(1 - rho^2) - rho arccos(rho))``.

    ``rho`` is clipped to ``[-1, 1]``. ``nu(1) = 0``, ``nu(0) = (c_plus - c_minus)^2 / (2 pi)``.
    Shared by :func:`drift_relu` and the correlation SDE (:func:`correlation_drift`).
    """
    rho = jnp.clip(rho, -1.0, 1.0)
    scale = (c_plus - c_minus) ** 2 / (2.0 * math.pi)
    return scale * (jnp.sqrt(jnp.maximum(1.0 - rho * rho, 0.0)) - rho * arccos(rho))


def correlation(V: Array) -> Array:
    """``rho_ab = V_ab / sqrt(V_aa V_bb)`` (1 on the diagonal; 0 where a variance is 0).

    Array-API generic: NumPy in, NumPy out (no XLA compilation for analysis code); jax in,
    jax out (jit/vmap-able).
    """
    xp = V.__array_namespace__() if hasattr(V, "__array_namespace__") else jnp
    d = xp.linalg.diagonal(V)
    pos_d = d > 0
    sd = xp.sqrt(xp.where(pos_d, d, 1.0))
    pos = pos_d[..., :, None] & pos_d[..., None, :]
    # two divisions, never the product V_aa V_bb, which underflows for variances ~ 1e-20 (float32)
    rho = xp.where(pos, V / sd[..., :, None] / sd[..., None, :], 0.0)
    eye = xp.eye(V.shape[-1], dtype=bool)
    return xp.where(eye, xp.ones_like(rho), rho)


def drift_relu(V: Array, params: SDEParams) -> Array:
    """``b_relu(V)_ab = nu(rho_ab) sqrt(V_aa V_bb)`` (without the block's ``gamma^2``).

    Zero on the diagonal (``nu(1) = 0``). Homogeneous of degree 1 in ``V``.
    """
    d = jnp.diagonal(V, axis1=-2, axis2=-1)
    s2 = jnp.maximum(d[..., :, None] * d[..., None, :], 0.0)
    return relu_nu(correlation(V), params.c_plus, params.c_minus) * jnp.sqrt(s2)


# --------------------------------------------------------------------------- block coefficients


def drift(V: Array, params: SDEParams) -> Array:
    """Drift ``b(V)`` of ``params.block``, shape ``(..., m, m)``.

    ``"attention"``: ``b_att``; ``"mlp"``: ``gamma^2 b_relu``;
    ``"transformer"``: ``b_att + gamma^2 b_relu``.
    """
    out = jnp.zeros_like(V)
    if params.attention_drift_coeff != 0.0:
        out = out + params.attention_drift_coeff * attention_bracket(V, params.attention_constants)
    if params.relu_drift_coeff != 0.0:
        out = out + params.relu_drift_coeff * drift_mlp(V, params)
    return out


def drift_mlp(V: Array, params: SDEParams) -> Array:
    """The MLP drift without ``gamma^2``: :func:`drift_relu`, or for a smooth
    ``params.mlp_activation`` :func:`drift_smooth` with its second and third
    derivatives at 0 and ``a = params.mlp_scale`` (Li, Nica, Roy 2022)."""
    if not params.smooth_mlp:
        return drift_relu(V, params)
    k = params.mlp_constants
    return drift_smooth(V, k.p2, k.p3, params.mlp_scale)


def diffusion_matrix(V: Array, params: SDEParams) -> Array:
    """Diffusion matrix ``Sigma(V) = k_lin Sigma_lin + acal_coeff Acal``, ``(..., D, D)``.

    ``k_lin`` and ``acal_coeff`` come from :class:`SDEParams` (``acal_coeff`` carries the
    activation's ``a1^2`` and the ``1/H`` of ``heads``; ``k_lin`` the head layout).
    """
    out = params.k_lin * sigma_lin(V)
    if params.acal_coeff != 0.0:
        out = out + params.acal_coeff * acal(V)
    return out
