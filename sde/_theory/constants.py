"""Small-score expansion constants of a row-normalised attention activation (docs/sde.md §4,
docs/general_activation_sde.md).

For shaped attention ``A = I + w(s) - 1 1^T / m`` with a row-normalised activation
``w_j(s) = f(s_j) / sum_k f(s_k)`` and scores ``s = Y / tau = O(n^{-1/2})``, the covariance SDE
depends on ``f`` only through

    a1 = f'(0) / f(0),    a2 = f''(0) / f(0)          (f(0) != 0).

Softmax (``f = exp``) has ``a1 = a2 = 1`` (:data:`SOFTMAX_EXPANSION`). For any other
activation the constants are computed from the activation function itself, a function of a
whole row of scores, with JAX derivatives at ``s = 0`` -- never from a hand-written table:

- ``r(s) = log w_0(s) - log w_1(s) = log f(s_0) - log f(s_1)`` for the normalised form, so
  ``a1 = dr/ds_0`` and ``a2 - a1^2 = d^2 r / ds_0^2`` (both at 0).
- The whole Jacobian and Hessian of ``w`` at 0 are then checked against the normalised form
  with those constants (``dw_j/ds_l = (a1/m)(delta_jl - 1/m)``, and the Hessian of
  :func:`predicted_hessian`), so an activation that is not ``f(s_j) / sum f`` to second order
  is rejected.
- At a point ``s* != 0`` the ratio ``w_0 / w_1`` must not depend on the other scores (true
  for every ``f(s_j) / sum f``). This rejects pre-normalised activations, whose
  standardisation ``(s - mean) / sqrt(var + eps)`` maps O(n^{-1/2}) scores to O(1) scores:
  they have no small-score expansion.

Activations with ``w(0) != 1/m`` are rejected with a message saying why: ``f(0) = 0`` (the
row sum vanishes at zero scores), not row-normalised, or already shaped.

This module takes activations as callables ``fn(scores, mask=None) -> weights``; the
registered names of :mod:`shaped_attn.activations` are resolved one layer up
(:func:`sde.expansion`), so the theory never imports the module family.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


M_CHECK = 4
"""Row length (number of keys) at which the expansion is computed and checked."""

_PROBE = (0.11, -0.23, 0.17, 0.05)
"""The point ``s*`` of the ratio test (small, generic, away from the poles of the periodic f)."""


@dataclasses.dataclass(frozen=True)
class AttentionConstants:
    """Weights of the terms of the attention coefficients (softmax: 1, 1, 1 and shift 0).

    The attention drift bracket is
    ``trace_weight * V tr(V F) / m^2 + outer_weight * (diag(V) (V g)^T + (V g) diag(V)^T) / (2m)
    + shift_weight * (diag(V) (V u)^T + (V u) diag(V)^T) / m`` with ``u = P V 1 / m``,
    and the ``Acal`` term of the diffusion is multiplied by ``acal_weight``. For a
    row-normalised activation with ``a1 = f'(0)/f(0)``, ``a2 = f''(0)/f(0)``
    (:meth:`from_expansion`, docs/general_activation_sde.md): ``trace_weight = acal_weight =
    a1^2``, ``outer_weight = a2``, ``shift_weight = a2 - a1^2``. Softmax (``a1 = a2 = 1``,
    Noci et al., Appendix C.2) gives :data:`SOFTMAX`.
    """

    trace_weight: float = 1.0
    outer_weight: float = 1.0
    acal_weight: float = 1.0
    shift_weight: float = 0.0

    @classmethod
    def from_expansion(cls, a1: float, a2: float) -> "AttentionConstants":
        """The weights of an activation with ``f(s) = f(0) (1 + a1 s + a2 s^2 / 2 + ...)``."""
        a1, a2 = float(a1), float(a2)
        return cls(trace_weight=a1 * a1, outer_weight=a2, acal_weight=a1 * a1,
                   shift_weight=a2 - a1 * a1)


SOFTMAX = AttentionConstants()
"""Attention constants of the shaped softmax (Noci et al., Appendix C.2)."""


class ActivationExpansion(NamedTuple):
    """``a1 = f'(0)/f(0)``, ``a2 = f''(0)/f(0)`` of a row-normalised activation ``name``."""

    name: str
    a1: float
    a2: float

    @property
    def constants(self) -> AttentionConstants:
        """The :class:`AttentionConstants` of this expansion."""
        return AttentionConstants.from_expansion(self.a1, self.a2)


SOFTMAX_EXPANSION = ActivationExpansion("softmax", 1.0, 1.0)
"""Softmax: ``f = exp``, ``a1 = a2 = 1`` (the paper)."""


def _row_function(fn: Callable, m: int) -> Callable:
    """``s (m,) -> w (m,)``: row 0 of the activation of the ``m x m`` scores with every row
    equal to ``s`` (square, so that activations that need ``Lq == Lk`` run), no mask."""
    return lambda s: fn(jnp.broadcast_to(s[None, :], (m, m)))[0]


def predicted_jacobian(a1: float, m: int) -> np.ndarray:
    """``dw_j/ds_l`` at 0 of ``w_j = f(s_j) / sum f``: ``(a1 / m) (delta_jl - 1/m)``."""
    P = np.eye(m) - 1.0 / m
    return (a1 / m) * P


def predicted_hessian(a1: float, a2: float, m: int) -> np.ndarray:
    """``d^2 w_j / ds_k ds_l`` at 0, shape ``(m, m, m)`` (j, k, l), of the normalised form.

    From ``w_j = (1/m) [1 + a1 c_j + (a2/2)(c_j^2 - mean_i c_i^2) + (a2 - a1^2) sbar c_j]``,
    ``c = P s``, ``sbar = mean(s)``:
    ``(1/m) [a2 P_jk P_jl - (a2/m) P_kl + ((a2 - a1^2)/m) (P_jk + P_jl)]``.
    """
    P = np.eye(m) - 1.0 / m
    return (1.0 / m) * (
        a2 * P[:, :, None] * P[:, None, :]
        - (a2 / m) * P[None, :, :]
        + ((a2 - a1 * a1) / m) * (P[:, :, None] + P[:, None, :])
    )


def _reject(name: str, why: str) -> ValueError:
    return ValueError(
        f"activation {name!r} has no small-score expansion of the row-normalised form "
        f"w_j = f(s_j) / sum_k f(s_k) with f(0) != 0 ({why}); its covariance SDE is not the "
        "general shaped-attention SDE (docs/general_activation_sde.md)"
    )


def compute_expansion(fn: Callable, name: str = "", *, m: int = M_CHECK) -> ActivationExpansion:
    """``a1``, ``a2`` of an activation ``fn(scores, mask=None) -> weights`` (in float64,
    concrete even when called while a caller's function is traced, e.g. inside ``jax.jit``).

    Arguments:
      fn: the activation, applied to scores ``[..., Lq, Lk]`` row by row.
      name: its label in messages and in the result (default: ``fn.__name__``).
      m: row length used for the derivatives and the consistency checks (>= 3).

    Raises:
      ValueError: naming the activation and why it has no such expansion (see the module
        docstring): ``f(0) = 0``, not row-normalised, not of the form ``f(s_j) / sum f``
        (e.g. pre-normalised scores), or non-finite derivatives.
    """
    if not callable(fn):
        raise ValueError(f"activation={fn!r} must be a callable fn(scores, mask=None)")
    name = name or getattr(fn, "__name__", repr(fn))
    if m < 3:
        raise ValueError(f"m={m} must be >= 3 for the consistency checks")
    with jax.enable_x64(True), jax.ensure_compile_time_eval():
        return _compute(name, fn, m)


def _compute(name: str, fn: Callable, m: int) -> ActivationExpansion:
    dtype = jnp.float64
    tol = 1e3 * float(jnp.finfo(dtype).eps)
    w = _row_function(fn, m)
    zero = jnp.zeros((m,), dtype)
    probe = jnp.asarray((_PROBE * (m // len(_PROBE) + 1))[:m], dtype)

    def log_ratio(s):
        ws = w(s)
        return jnp.log(ws[0]) - jnp.log(ws[1])

    @jax.jit
    def derivatives(zero, probe):  # one compiled call (eager Hessians are slow)
        return (jax.grad(log_ratio)(zero), jax.hessian(log_ratio)(zero),
                jax.jacfwd(w)(zero), jax.hessian(w)(zero),
                jax.grad(lambda s: w(s)[0] / w(s)[1])(probe))

    w0 = np.asarray(w(zero), np.float64)
    if w0.shape != (m,) or not np.all(np.isfinite(w0)):
        raise _reject(name, f"w(0) = {w0} is not a finite row of {m} weights")
    if not np.allclose(w0, 1.0 / m, rtol=tol, atol=tol / m):
        if np.allclose(w0, 0.0, atol=tol):
            why = "w(0) = 0: f(0) = 0 (or not row-normalised), so 1/sum f is singular at s = 0"
        elif np.allclose(w0.sum(), 1.0, rtol=tol):
            why = (f"w(0) = {w0} is not uniform (an already shaped activation such as "
                   "shaped_softmax = I + softmax - 11^T/m? the SDE adds the shaping itself)")
        else:
            why = f"w(0) = {w0} does not sum to 1: not row-normalised"
        raise _reject(name, why)

    d_lr, h_lr, J, H, grad_ratio = (np.asarray(x, np.float64) for x in derivatives(zero, probe))
    a1 = float(d_lr[0])
    a2 = float(h_lr[0, 0]) + a1 * a1
    if not (math.isfinite(a1) and math.isfinite(a2)):
        raise _reject(name, f"non-finite derivatives at 0: a1 = {a1}, a2 = {a2}")

    scale = max(1.0, abs(a1), a1 * a1, abs(a2))
    err_J = np.max(np.abs(J - predicted_jacobian(a1, m))) * m
    err_H = np.max(np.abs(H - predicted_hessian(a1, a2, m))) * m
    if err_J > tol * scale or err_H > tol * scale:
        raise _reject(
            name,
            f"its derivatives at 0 are not those of f(s_j) / sum f for any f "
            f"(Jacobian mismatch {err_J:.3g}, Hessian mismatch {err_H:.3g})",
        )

    # Ratio test at s* != 0: w_0 / w_1 = f(s_0) / f(s_1) must not depend on s_2, ..., s_{m-1}.
    if not np.all(np.isfinite(grad_ratio)):
        raise _reject(name, "non-finite weights near s = 0")
    own = max(abs(grad_ratio[0]), abs(grad_ratio[1]), 1.0)
    if np.max(np.abs(grad_ratio[2:])) > tol * own:
        raise _reject(
            name,
            "the ratio w_0 / w_1 depends on the other scores of the row (e.g. pre-normalised "
            "scores (s - mean) / sqrt(var + eps), which are O(1) whatever the size of s)",
        )
    return ActivationExpansion(name=name, a1=a1, a2=a2)


@functools.lru_cache(maxsize=256)
def expansion_of(fn: Callable, name: str = "") -> ActivationExpansion:
    """:func:`compute_expansion`, cached per function (a registered activation is one object)."""
    return compute_expansion(fn, name)
