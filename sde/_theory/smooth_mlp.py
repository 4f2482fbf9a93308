"""Shaped MLPs with a smooth activation (Li, Nica, Roy, "The Neural Covariance SDE",
arXiv 2206.02768): the SDE drift and the activation constants (docs/sde.md §7). The finite
layer is :func:`sde.smooth_mlp_layer`.

Finite block (width n, hidden width n, all weights iid N(0, 1), ``g ~ N(0, 1)``):

    phi_s(x) = s phi(x / s),   s = a sqrt(n),   phi(0) = 0, phi'(0) = 1
    c = 1 / E[phi_s(g)^2]                                   (so that V = 1 stays fixed)
    X' = lam X + gamma sqrt(c) phi_s(X W_pre / sqrt(n)) W_post / sqrt(n)

Limit (docs/general_activation_sde.md, section "Smooth-activation MLPs"), with
``p2 = phi''(0)``, ``p3 = phi'''(0)``:

    b_smooth(V)_ab = (p2^2 / (4 a^2)) (V_aa V_bb + V_ab (2 V_ab - 3))
                   + (p3 / (2 a^2)) V_ab (V_aa + V_bb - 2)

and, like the shaped ReLU, the residual block has drift ``gamma^2 b_smooth`` and diffusion
``2 gamma^2 Sigma_lin`` (two Gaussian matrices on the branch). ``p2, p3`` are computed with
JAX derivatives from the activation itself (:func:`mlp_constants`).

Activations (:data:`SMOOTH_ACTIVATIONS`): ``"tanh"`` (odd: p2 = 0, p3 = -2), ``"gelu"``
(``2 GELU(x) = x (1 + erf(x / sqrt 2))``, the GELU rescaled to slope 1 at 0: its odd part is
``x`` and its even part ``x erf(x / sqrt 2)`` gives p2 = 2 sqrt(2 / pi), p3 = 0), ``"sin"``
(p2 = 0, p3 = -1), or any user callable ``phi`` with ``phi(0) = 0`` and ``phi'(0) = 1``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array
PhiLike = Union[str, Callable[[Array], Array]]

SMOOTH_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "gelu": lambda x: x * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0))),
    "sin": jnp.sin,
}
"""Smooth MLP activations with ``phi(0) = 0``, ``phi'(0) = 1`` (the default set)."""

class MLPConstants(NamedTuple):
    """``p2 = phi''(0)``, ``p3 = phi'''(0)`` of a smooth MLP activation."""

    name: str
    p2: float
    p3: float


def resolve_phi(phi: PhiLike) -> Callable[[Array], Array]:
    """A name in :data:`SMOOTH_ACTIVATIONS` or a callable, as a callable."""
    if callable(phi):
        return phi
    try:
        return SMOOTH_ACTIVATIONS[phi]
    except (KeyError, TypeError):
        raise ValueError(
            f"mlp_activation={phi!r} is not 'relu', one of {tuple(SMOOTH_ACTIVATIONS)} or a "
            "callable phi"
        ) from None


def _label(phi: PhiLike) -> str:
    return phi if isinstance(phi, str) else getattr(phi, "__name__", repr(phi))


def compute_mlp_constants(phi: PhiLike) -> MLPConstants:
    """``phi''(0)``, ``phi'''(0)`` by JAX derivatives (float64), after checking ``phi(0) = 0``
    and ``phi'(0) = 1`` (ValueError naming the activation otherwise)."""
    fn = resolve_phi(phi)
    name = _label(phi)
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
        zero = jnp.zeros((), jnp.float64)
        d1 = jax.grad(fn)
        d2 = jax.grad(d1)
        d3 = jax.grad(d2)
        v0, v1, v2, v3 = (float(f(zero)) for f in (fn, d1, d2, d3))
    if not all(math.isfinite(v) for v in (v0, v1, v2, v3)):
        raise ValueError(f"mlp_activation {name!r}: non-finite derivatives at 0")
    if abs(v0) > 1e-12 or abs(v1 - 1.0) > 1e-12:
        raise ValueError(
            f"mlp_activation {name!r} must have phi(0) = 0 and phi'(0) = 1 "
            f"(got phi(0) = {v0:.6g}, phi'(0) = {v1:.6g})"
        )
    return MLPConstants(name=name, p2=v2, p3=v3)


@functools.lru_cache(maxsize=None)
def mlp_constants(phi: PhiLike) -> MLPConstants:
    """:func:`compute_mlp_constants`, cached (names and hashable callables)."""
    return compute_mlp_constants(phi)


def drift_smooth(V: Array, p2: float, p3: float, a: float) -> Array:
    """``b_smooth(V)`` (without the block's ``gamma^2``), shape ``(..., m, m)``; see the
    module docstring. ``V = 1`` (all entries) is a fixed point of the diagonal."""
    d = jnp.diagonal(V, axis1=-2, axis2=-1)
    daa, dbb = d[..., :, None], d[..., None, :]
    return (p2 * p2 / (4.0 * a * a)) * (daa * dbb + V * (2.0 * V - 3.0)) + (
        p3 / (2.0 * a * a)
    ) * V * (daa + dbb - 2.0)
