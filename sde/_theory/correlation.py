"""The correlation SDE of the residual shaped-ReLU MLP block (``m = 2``; docs/sde.md §8):
its coefficients and its Euler-Maruyama solve, on the same grid, keys and stopping as
:func:`solve`."""

from __future__ import annotations

import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .._helpers.ensemble import Ensemble
from .._helpers.validation import check_int
from .coefficients import relu_nu
from .diffrax_terms import GridBrownianPath
from .integrate import brownian_grid, default_tol, float_dtype, integrate, run_paths, time_grid
from .params import SDEParams
from .solve import paths_per_chunk

Array = jax.Array


def _check_mlp(params: SDEParams) -> None:
    if params.block != "mlp":
        raise ValueError(
            f"block={params.block!r}: the autonomous correlation SDE exists for block='mlp' only"
        )
    if params.smooth_mlp:
        raise ValueError(
            f"mlp_activation={params.mlp_activation!r}: the correlation SDE here is the shaped "
            "ReLU's (the smooth MLP's drift depends on V_aa, V_bb, not on rho alone)"
        )


def correlation_drift(rho: Array, params: SDEParams) -> Array:
    """Drift of ``rho = V12 / sqrt(V11 V22)`` under the residual shaped-ReLU MLP block.

    By Ito's formula on the ``m = 2`` SDE ``dV = gamma^2 b_relu dt + sqrt(k_lin) Sigma_lin^{1/2} dB``:
    ``relu_drift_coeff * nu(rho) - (k_lin / 2) rho (1 - rho^2)``, i.e.
    ``gamma^2 [nu(rho) - rho (1 - rho^2)]`` (docs/sde.md §8).
    """
    _check_mlp(params)
    return params.relu_drift_coeff * relu_nu(
        rho, params.c_plus, params.c_minus
    ) - 0.5 * params.k_lin * rho * (1.0 - rho * rho)


def correlation_diffusion(rho: Array, params: SDEParams) -> Array:
    """Diffusion of ``rho``: ``sqrt(k_lin) (1 - rho^2) = sqrt(2) gamma (1 - rho^2)``."""
    _check_mlp(params)
    return math.sqrt(params.k_lin) * (1.0 - rho * rho)


@functools.partial(jax.jit, static_argnames=("params", "num_saves", "substeps"))
def _solve_correlation_chunk(keys, rho0s, h, hb, save_every, psd_tol, *, params, num_saves, substeps):
    dtype = rho0s.dtype
    solver = diffrax.Euler()

    def path_step(key, r, t0, t1):
        bm = GridBrownianPath((), dtype, key, hb, substeps)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, r, args: correlation_drift(r, params)),
            diffrax.ControlTerm(lambda t, r, args: correlation_diffusion(r, params), bm),
        )
        return solver.step(terms, t0, t1, r, None, None, made_jump=False)[0]

    def step(t0, t1, r, aux):
        r1 = jax.vmap(path_step, in_axes=(0, 0, None, None))(keys, r, t0, t1)
        return r1, None

    def check(r1, stopped):
        return ~jnp.isfinite(r1) | (jnp.abs(r1) > 1.0 + psd_tol), None

    return integrate(step, check, rho0s, (None, None), h, num_saves, save_every)


def solve_correlation(
    rho0,
    params: SDEParams,
    *,
    T: float,
    dt: float,
    num_paths: int = 1,
    key=None,
    save_every: int = 1,
    psd_tol: float | None = None,
    chunk_size: int | str | None = "auto",
    brownian_dt: float | None = None,
) -> Ensemble:
    """Euler-Maruyama for the correlation SDE of the residual shaped-ReLU MLP (``block="mlp"``).

    ``d rho = gamma^2 [nu(rho) - rho (1 - rho^2)] dt + sqrt(2) gamma (1 - rho^2) dW``
    (docs/sde.md §8; :func:`correlation_drift`), the law of
    ``V12 / sqrt(V11 V22)`` under the ``m = 2`` matrix SDE. Same grid, keys, chunking and
    freezing as :func:`solve`; a path stops when ``rho`` is non-finite or
    ``|rho| > 1 + psd_tol`` (the 2x2 correlation matrix leaves the PSD cone; Euler can
    overshoot ``|rho| = 1``). ``psd_tol`` defaults to ``sqrt(eps)`` of the dtype.

    Arguments:
      rho0: initial correlation in ``[-1, 1]``, a scalar or one per path ``(num_paths,)``;
        its dtype (float32 or float64) is the computation's.
      Other arguments: as for :func:`solve`.

    Returns:
      :class:`Ensemble` with ``t (K,)``, ``V = rho (num_paths, K)``, ``stopped``,
      ``stop_time``.
    """
    if not isinstance(params, SDEParams):
        raise ValueError(f"params={params!r} must be an SDEParams")
    if params.block != "mlp":
        raise ValueError(f"params.block={params.block!r}: solve_correlation needs block='mlp'")
    if key is None:
        raise ValueError("key=None: a JAX PRNG key is required for a stochastic solve")
    n_steps, h = time_grid(T, dt, save_every)
    num_paths = check_int("num_paths", num_paths)
    hb, substeps = brownian_grid(h, n_steps, brownian_dt)
    dtype = float_dtype(rho0, "rho0")
    tol = default_tol(dtype, psd_tol)
    r = np.asarray(rho0, dtype=dtype)
    if r.ndim not in (0, 1) or (r.ndim == 1 and r.shape[0] != num_paths):
        raise ValueError(f"rho0 has shape {r.shape}; expected () or (num_paths={num_paths},)")
    if not np.all(np.isfinite(r)) or np.any(np.abs(r) > 1.0):
        raise ValueError(f"rho0={rho0!r} is outside [-1, 1]")
    rho0s = jnp.asarray(np.broadcast_to(r, (num_paths,)), dtype)
    dynamic = dict(h=jnp.asarray(h, dtype), hb=jnp.asarray(hb, dtype),
                   save_every=jnp.asarray(save_every, jnp.int32), psd_tol=jnp.asarray(tol, dtype))
    static = dict(params=params, num_saves=n_steps // save_every, substeps=substeps)
    rho, stopped, stop_time = run_paths(_solve_correlation_chunk, static, dynamic, key, rho0s,
                                        paths_per_chunk(chunk_size, rho0s))
    ts = jnp.arange(n_steps // save_every + 1, dtype=dtype) * jnp.asarray(save_every * h, dtype)
    return Ensemble(t=ts, V=rho, stopped=stopped, stop_time=stop_time)
