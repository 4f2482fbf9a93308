"""The covariance SDE's structure as diffrax parts (docs/noise.md §1-3).

- :class:`GridBrownianPath`: a Brownian motion on a fixed grid, indexed by the integer cell so
  that each path's stream comes from its own key and solves at several step sizes can share
  one path (common random numbers).
- :class:`StructuredDiffusionTerm`: the diffusion ``N(V; dW)`` with the O(m^3) structured
  noise; its control has dimension ``noise_dim(m, params)``.
- :func:`generic_vector_field`: ``Sigma(V)^{1/2}`` for the stock ``diffrax.ControlTerm`` (the
  O(m^6) reference route).
"""

from __future__ import annotations

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._helpers.linalg import eigh_factor, psd_sqrt
from .._helpers.symmetric import sym_index
from .coefficients import diffusion_matrix
from .noise import noise_from_normals
from .params import SDEParams

Array = jax.Array


class GridBrownianPath(diffrax.AbstractBrownianPath):
    """Brownian motion sampled on a fixed grid ``s_j = j h`` (like ``diffrax.UnsafeBrownianPath``).

    The increment over a grid cell ``[s_j, s_{j+1}]`` is ``sqrt(h) * normal(fold_in(key, j))``;
    with ``substeps=True`` an increment over ``[t0, t1]`` spanning several cells is the sum of
    the cell increments (``r = round((t1 - t0) / h)`` draws), so that solves with different step
    sizes but the same ``key`` and ``h`` see the same Brownian path (common random numbers).
    Valid only for intervals whose ends lie on the grid (the only way it is used here). Unlike
    ``UnsafeBrownianPath`` (which derives the stream from the bits of ``t0, t1`` cast to
    float32) the stream is indexed by the integer cell, so float32 times never collide.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    key: Array
    h: Array
    substeps: bool = eqx.field(static=True, default=False)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def _cell(self, j):
        return jax.random.normal(jax.random.fold_in(self.key, j), self.shape, self.dtype)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        if t1 is None:
            raise ValueError("GridBrownianPath only provides increments over grid steps")
        j0 = jnp.round(t0 / self.h).astype(jnp.int32)
        dt = jnp.asarray(t1 - t0, self.dtype)
        if self.substeps:
            r = jnp.round((t1 - t0) / self.h).astype(jnp.int32)
            total = jax.lax.fori_loop(
                j0, j0 + r, lambda j, acc: acc + self._cell(j), jnp.zeros(self.shape, self.dtype)
            )
            w = total * jnp.sqrt(jnp.asarray(self.h, self.dtype))
        else:
            w = self._cell(j0) * jnp.sqrt(dt)
        if use_levy:
            return diffrax.BrownianIncrement(dt=dt, W=w)
        return w


class StructuredDiffusionTerm(diffrax.AbstractTerm):
    """Diffusion term ``N(V; dW)`` of the covariance SDE with the structured O(m^3) noise.

    The control is a Brownian motion of dimension ``noise_dim(m, params)``
    (``m (m + 1) / 2`` entries for the symmetric Gaussian ``S = (Z1 + Z1^T) / sqrt(2)``, then the
    ``m^2`` entries of ``Z2`` when the ``Acal`` term is present); the vector field at ``V`` is
    the pair ``(V, L)`` with ``L L^T = V``, and ``prod`` is :func:`noise_from_normals`,
    linear in ``dW``: the upper triangle of ``prod(vf(V), dW)`` has covariance
    ``dt * diffusion_matrix(V, params)`` (docs/noise.md §1).

    ``args`` may carry a precomputed factor ``L`` of ``y`` (:func:`solve` passes the Cholesky
    factor it computed for the stopping test of the same state, so each step factors ``V``
    once); with ``args=None`` the factor is computed here (clipped ``eigh``).
    """

    params: SDEParams = eqx.field(static=True)
    control: diffrax.AbstractPath

    def vf(self, t, y, args):
        L = eigh_factor(y) if args is None else args
        return y, L

    def contr(self, t0, t1, **kwargs):
        return self.control.evaluate(t0, t1, **kwargs)

    def prod(self, vf, control):
        V, L = vf
        return noise_from_normals(V, L, control, self.params)


def generic_vector_field(params: SDEParams):
    """``(m, m, D)`` tensor ``Sigma(V)^{1/2}`` mapped to symmetric matrices, for ControlTerm."""

    def vector_field(t, V, args):
        R = psd_sqrt(diffusion_matrix(V, params))  # (D, D)
        return R[sym_index(V.shape[-1])]  # (m, m, D): N_ab = sum_k R[p(a,b), k] dW_k

    return vector_field
