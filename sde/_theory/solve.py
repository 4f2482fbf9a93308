"""Euler-Maruyama integration of the covariance SDE with diffrax, vmapped over paths.

``dV = b(V) dt + Sigma(V)^{1/2} dB`` (Ito; docs/sde.md §1, docs/noise.md §3) is integrated with
``diffrax.Euler`` (which converges to the Ito solution): every grid step is one
``solver.step`` of diffrax, vmapped over the paths of a chunk, inside a ``lax.fori_loop`` (a
``lax.scan`` over save blocks) so that each path can be frozen individually when it stops.
The terms are ``diffrax.MultiTerm(ODETerm(drift), diffusion)``:

- ``noise="structured"`` (default): :class:`StructuredDiffusionTerm`, a diffrax term whose
  Brownian motion has dimension ``noise_dim(m, params)`` (the symmetric ``S`` and ``Z2`` of
  docs/noise.md §1, scaled by ``sqrt(dt)``) and whose vector field/control product is the
  O(m^3) structured noise.
- ``noise="generic"``: the stock ``diffrax.ControlTerm`` with a ``D``-dimensional Brownian motion
  and the vector field ``Sigma(V)^{1/2}`` (``eigh`` of the ``D x D`` diffusion matrix) reshaped
  to ``(m, m, D)``; O(m^6) per step. The reference route.

Each path's Brownian motion (:class:`GridBrownianPath`) is built inside the vmapped step from
the path's own key ``fold_in(key, i)``, ``i`` the path index: results do not depend on
``num_paths``, ``chunk_size`` or the number of devices. A Python loop over chunks calls one
jitted function (the last chunk is padded), which compiles once per (configuration, number of
saves): neither the number of steps nor ``dt`` enters the compiled program. With several local
accelerator devices each chunk's paths are split over them (docs/samplers.md §6).

Stopping (docs/stopping.md §1-2: convergence holds up to ``inf{t : ||V_t|| >= r}``, and the attention
drift is cubic, so paths blow up): after every step the new state ``V`` is tested and the path
is *stopped* if

- any entry is non-finite, or
- ``max_ab |V_ab| > stop_norm``, or
- ``lambda_min(V) < -psd_tol * max(1, max_ab |V_ab|)``. Tested with the Cholesky factorisation
  that the next step needs anyway: success means ``V`` is positive definite; where it fails,
  the eigenvalues are computed (``eigh``, which then also gives the noise factor, exact on
  the PSD boundary). Euler-Maruyama does not preserve positive semi-definiteness; paths near
  the boundary (``rho -> 1``, large ``m dt``) can leave the cone and are stopped.

A stopped path is frozen at its last good state (the state one step before ``stop_time``) for
all later saves; ``stopped[i]`` is True and ``stop_time[i]`` is the first grid time at which the
state failed the test. Paths that never stop have ``stop_time = inf``. Nothing is NaN: saved
values are always the last good state.

Performance notes (CPU, float32): per path-step the cost is the random numbers (threefry;
``m (m + 1) / 2 + m^2`` normals, each path-step drawn from its own ``fold_in`` key), four
batched ``m x m`` products, one Cholesky (written out entry by entry for ``m <= 8``, LAPACK
above; :func:`sde._helpers.linalg.small_cholesky`) and O(m^2) elementwise work; ``eigh``
(5-10x a LAPACK Cholesky) runs only for chunks where some path sits on the PSD boundary. At
m = 3 (2 CPU cores, 1024 paths a chunk) a path-step took about 0.9 us of random numbers,
0.5 us of drift, 0.5 us of noise algebra and 0.02 us of factor: the drift and the products
run on ``(paths, 3, 3)`` arrays whose tiny minor axis XLA's CPU loops do not vectorise
(benchmarks/README.md, "RNG floor").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from .._helpers.ensemble import Ensemble
from .._helpers.linalg import FACTORS
from .._helpers.symmetric import num_upper
from .._helpers.validation import check_choice, check_int, check_number
from .coefficients import drift
from .diffrax_terms import GridBrownianPath, StructuredDiffusionTerm, generic_vector_field
from .integrate import (
    brownian_grid,
    check_state,
    default_tol,
    float_dtype,
    integrate,
    run_paths,
    time_grid,
    validate_gram,
)
from .noise import noise_dim
from .params import SDEParams

Array = jax.Array

NOISES = ("structured", "generic")


def default_chunk_size(m: int) -> int:
    """Paths per chunk: ``clip(2^19 / m^2, 64, 1024)`` (128 at m = 64, 1024 for m <= 22).

    Small enough that a chunk's per-step arrays (random numbers, products) stay in cache: at
    m = 64 a chunk of 128 paths is ~1.4x faster per path-step on CPU than 1000 paths."""
    return int(min(1024, max(64, 2**19 // (m * m))))


def paths_per_chunk(chunk_size, inits: Array) -> int:
    """Paths per chunk from a solver's ``chunk_size`` argument: ``"auto"`` (the default
    :func:`default_chunk_size` for matrices, 1024 for scalar states), ``None`` (all paths at
    once) or an int >= 1."""
    if chunk_size == "auto":
        return default_chunk_size(inits.shape[-1]) if inits.ndim == 3 else 1024
    if chunk_size is None:
        return inits.shape[0]
    return check_int("chunk_size", chunk_size)


@functools.partial(
    jax.jit,
    static_argnames=("params", "num_saves", "noise", "factor", "deterministic", "substeps"),
)
def _solve_chunk(
    keys,
    V0s,
    h,
    hb,
    save_every,
    stop_norm,
    psd_tol,
    *,
    params,
    num_saves,
    noise,
    factor,
    deterministic,
    substeps,
):
    """Solve a chunk of paths: ``keys (C,)``, ``V0s (C, m, m)``; jitted.

    The time loop runs over the batch; the diffrax step is vmapped over paths, each path
    building its own Brownian motion from its own key."""
    m = V0s.shape[-1]
    dtype = V0s.dtype
    drift_term = diffrax.ODETerm(lambda t, V, args: drift(V, params))

    if deterministic:
        solver = diffrax.Tsit5()

        def terms_of(key):
            return drift_term

    else:
        solver = diffrax.Euler()
        shape = (noise_dim(m, params),) if noise == "structured" else (num_upper(m),)

        def terms_of(key):
            bm = GridBrownianPath(shape, dtype, key, hb, substeps)
            if noise == "structured":
                diffusion = StructuredDiffusionTerm(params, bm)
            else:
                diffusion = diffrax.ControlTerm(generic_vector_field(params), bm)
            return diffrax.MultiTerm(drift_term, diffusion)

    def path_step(key, V, L, state, t0, t1):
        args = L if (noise == "structured" and not deterministic) else None
        # No re-symmetrisation: drift and noise are symmetric by construction (the noise is
        # X + X^T of a materialised X), up to 1-ulp differences where XLA contracts a*b + c
        # into an FMA differently for (i, j) and (j, i); Cholesky reads one triangle only.
        V1, _, _, state1, _ = solver.step(terms_of(key), t0, t1, V, args, state, made_jump=False)
        return V1, state1

    def step(t0, t1, V, aux):
        L, state = aux
        return jax.vmap(path_step, in_axes=(0, 0, 0, 0, None, None))(keys, V, L, state, t0, t1)

    def check(V1, stopped):
        # stopped paths are frozen: their new state is ignored (and never triggers eigh)
        return check_state(V1, stop_norm, psd_tol, factor, active=~stopped)

    _, L0 = check_state(V0s, jnp.inf, jnp.inf, factor)
    t_0 = jnp.zeros((), dtype)
    state0 = jax.vmap(lambda key, V: solver.init(terms_of(key), t_0, t_0 + h, V, None))(keys, V0s)
    return integrate(step, check, V0s, (L0, state0), h, num_saves, save_every)


def solve(
    V0,
    params: SDEParams,
    *,
    T: float,
    dt: float,
    num_paths: int = 1,
    key=None,
    save_every: int = 1,
    noise: str = "structured",
    stop_norm: float = 1e4,
    psd_tol: float | None = None,
    chunk_size: int | str | None = "auto",
    factor: str = "cholesky",
    brownian_dt: float | None = None,
    deterministic: bool = False,
    first_path: int = 0,
) -> Ensemble:
    """Simulate ``num_paths`` paths of the covariance SDE of ``params.block`` from ``V0``.

    Euler-Maruyama (``diffrax.Euler``, Ito) on the grid ``t_n = n h``, ``h = T / round(T / dt)``;
    states saved every ``save_every`` steps. See the module docstring for the stopping rule.

    Arguments:
      V0: initial Gram matrix ``(m, m)``, or one per path ``(num_paths, m, m)``; finite,
        symmetric and PSD (tolerance ``max(psd_tol, sqrt(eps)) * max(1, max|V0|)``). Its dtype
        (float32 or float64) is the dtype of the computation and of the result.
      params: :class:`SDEParams`.
      T: final time ``d / n`` (> 0).
      dt: step, in ``(0, T]``; ``T / dt`` must be an integer (within ``1e-9`` relative).
      num_paths: number of independent paths (>= 1).
      key: JAX PRNG key; path ``i`` uses ``fold_in(key, first_path + i)``, so paths do not
        depend on ``num_paths``, ``chunk_size`` or the number of devices. Not needed when
        ``deterministic``.
      save_every: save every this many steps; must divide the number of steps.
      noise: ``"structured"`` (O(m^3) per step) or ``"generic"`` (``D x D`` square root, O(m^6)).
      stop_norm: stop a path when ``max_ab |V_ab| > stop_norm`` (> 0).
      psd_tol: stop a path when ``lambda_min(V) < -psd_tol * max(1, max|V|)``; default
        ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4 in float32).
      chunk_size: paths per chunk and device (bounds memory; the last chunk is padded so that
        one program serves all chunks); ``"auto"`` (default): :func:`default_chunk_size`;
        ``None``: all paths at once. Results do not depend on it.
      factor: factor of ``V`` for the structured noise and the PSD test: ``"cholesky"``
        (default; clipped ``eigh`` where Cholesky fails, so exact on the PSD boundary) or
        ``"eigh"`` (always); docs/noise.md §4. Same law, different speed.
      brownian_dt: if given (it must divide ``dt``), Brownian increments are drawn on the finer
        grid of spacing ``brownian_dt`` and summed over each step: solves with different
        ``dt`` but the same ``key`` and ``brownian_dt`` see the same Brownian path (common
        random numbers for convergence studies). Default: one draw per step.
      deterministic: integrate the drift-only limit ``dV = b(V) dt`` instead (one path,
        ``diffrax.Tsit5`` on the same grid, same stopping rule); ``num_paths`` must be 1.
      first_path: the number of the first path (>= 0): these are paths ``first_path ..
        first_path + num_paths - 1`` of one ensemble, which can so be computed in parts.

    Returns:
      :class:`Ensemble` with ``t (K,)``, ``V (num_paths, K, m, m)``, ``stopped``,
      ``stop_time`` (``inf`` where not stopped).

    Raises:
      ValueError: for invalid inputs, naming the parameter, its value and the allowed range.
    """
    plan = _plan_solve(
        V0, params, T=T, dt=dt, num_paths=num_paths, key=key, save_every=save_every,
        noise=noise, stop_norm=stop_norm, psd_tol=psd_tol, factor=factor,
        brownian_dt=brownian_dt, deterministic=deterministic,
    )
    V, stopped, stop_time = run_paths(_solve_chunk, plan.static, plan.dynamic, plan.key, plan.V0s,
                                      paths_per_chunk(chunk_size, plan.V0s),
                                      check_int("first_path", first_path, lo=0))
    return Ensemble(t=plan.ts, V=V, stopped=stopped, stop_time=stop_time)


class _Plan(NamedTuple):
    """Validated inputs of :func:`_solve_chunk` (also used by ``benchmarks/bench_sde.py`` to
    compile the chunk program ahead of time)."""

    key: Array
    V0s: Array
    ts: Array
    dynamic: dict
    static: dict


def _plan_solve(
    V0, params, *, T, dt, num_paths, key, save_every, noise, stop_norm, psd_tol, factor,
    brownian_dt, deterministic,
) -> _Plan:
    if not isinstance(params, SDEParams):
        raise ValueError(f"params={params!r} must be an SDEParams")
    n_steps, h = time_grid(T, dt, save_every)
    num_paths = check_int("num_paths", num_paths)
    stop_norm = check_number("stop_norm", stop_norm)
    check_choice("noise", noise, NOISES)
    check_choice("factor", factor, FACTORS)
    hb, substeps = brownian_grid(h, n_steps, brownian_dt)
    dtype = float_dtype(V0, "V0")
    tol = default_tol(dtype, psd_tol)
    if deterministic and num_paths != 1:
        raise ValueError(f"num_paths={num_paths} must be 1 when deterministic=True")
    V0s = jnp.asarray(validate_gram(V0, num_paths, tol, stop_norm, dtype), dtype)
    if deterministic:
        key = jax.random.PRNGKey(0)  # unused by the drift-only solve
    elif key is None:
        raise ValueError("key=None: a JAX PRNG key is required for a stochastic solve")
    dynamic = dict(
        h=jnp.asarray(h, dtype),
        hb=jnp.asarray(hb, dtype),
        save_every=jnp.asarray(save_every, jnp.int32),
        stop_norm=jnp.asarray(stop_norm, dtype),
        psd_tol=jnp.asarray(tol, dtype),
    )
    static = dict(
        params=params,
        num_saves=n_steps // save_every,
        noise=noise,
        factor=factor,
        deterministic=bool(deterministic),
        substeps=substeps,
    )
    ts = jnp.arange(n_steps // save_every + 1, dtype=dtype) * jnp.asarray(save_every * h, dtype)
    return _Plan(key, V0s, ts, dynamic, static)
