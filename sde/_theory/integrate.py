"""The fixed-step loop shared by the SDE solvers, its stopping test and the checks of a
solve's inputs (docs/noise.md §3, docs/stopping.md §2).

Each path is frozen at its last good state once it fails the stopping test, so saved values
are never NaN; the loop runs ``num_saves`` (static) blocks of ``save_every`` (traced) steps,
so the compiled program depends on the number of saves, not on the number of steps or ``dt``.
Chunks of paths run through :func:`run_paths` (one key per path, fixed chunk size, sharded
over local accelerators as every Monte Carlo in :mod:`sde`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._helpers.devices import map_chunks, num_shards, sample_keys, sample_mesh, sharded_jit
from .._helpers.linalg import factor_and_check
from .._helpers.validation import check_gram_values, check_int, check_number, default_psd_tol

Array = jax.Array


def check_state(
    V: Array, stop_norm, psd_tol, factor: str = "cholesky", active=None
) -> tuple[Array, Array]:
    """Stopping test of a batch of states and the factor of each state.

    Returns ``(bad, L)``: ``bad`` is True where ``V`` has a non-finite entry,
    ``max_ab |V_ab| > stop_norm`` or ``lambda_min(V) < -psd_tol * max(1, max_ab |V_ab|)``;
    ``L L^T = V`` (``V_+``) from :func:`factor_and_check` (Cholesky, with the clipped
    ``eigh`` only where Cholesky fails, so the eigenvalue test is evaluated exactly there).
    ``active`` marks the states that matter (others: unspecified output, no eigh fallback).
    """
    scale = jnp.max(jnp.abs(V), axis=(-2, -1))  # NaN propagates
    bad_norm = ~(scale <= stop_norm)  # also True for NaN / inf
    act = ~bad_norm if active is None else (active & ~bad_norm)
    L, psd = factor_and_check(V, psd_tol * jnp.maximum(1.0, scale), factor, act)
    return bad_norm | ~psd, L


def _where_batch(mask, a, b):
    """``where(mask, a, b)`` with ``mask`` over the leading (batch) axis of ``a`` and ``b``."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def integrate(step, check, y0, aux0, h, num_saves: int, save_every):
    """Fixed-step loop over a batch of paths with per-path freezing.

    ``step(t0, t1, y, aux) -> (y1, state1)`` advances every path (``aux = (factor, solver
    state)``); ``check(y1, stopped) -> (bad, factor1)`` tests the new states. Only ``y`` is
    frozen for stopped paths: their ``aux`` is garbage, but it only feeds steps whose results
    are discarded (a stopped path's ``y`` never changes again). ``num_saves``
    (static) blocks of ``save_every`` (traced) steps: the compiled program depends on the
    number of saves, not on the number of steps. Returns ``(ys (C, num_saves + 1, ...),
    stopped (C,), stop_time (C,))``.
    """
    dtype = y0.dtype
    C = y0.shape[0]

    def body(n, carry):
        y, aux, stopped, stop_time = carry
        t0 = n.astype(dtype) * h
        t1 = (n + 1).astype(dtype) * h
        y1, state1 = step(t0, t1, y, aux)
        bad, factor1 = check(y1, stopped)
        stop_time = jnp.where(bad & ~stopped, t1, stop_time)
        stopped = stopped | bad
        y = _where_batch(stopped, y, y1)
        return y, (factor1, state1), stopped, stop_time

    def save_block(carry, k):
        first = k * save_every
        carry = jax.lax.fori_loop(first, first + save_every, body, carry)
        return carry, carry[0]

    carry0 = (y0, aux0, jnp.zeros((C,), bool), jnp.full((C,), jnp.inf, dtype))
    (_, _, stopped, stop_time), ys = jax.lax.scan(
        save_block, carry0, jnp.arange(num_saves, dtype=jnp.int32)
    )
    ys = jnp.concatenate([y0[None], ys], axis=0)
    return jnp.moveaxis(ys, 0, 1), stopped, stop_time


def time_grid(T, dt, save_every: int = 1) -> tuple[int, float]:
    """Validate the grid; return ``(n_steps, h)`` with ``n_steps = round(T / dt)``, ``h = T / n_steps``.

    ``T / dt`` must be an integer within relative rounding ``1e-9`` and ``save_every`` must
    divide it. The step actually used is ``h = T / n_steps`` (equal to ``dt`` up to rounding),
    so the last save time is exactly ``T``.
    """
    T = check_number("T", T)
    dt = check_number("dt", dt, 0, T, hi_closed=True, hi_name="T")
    n_steps = int(round(T / dt))
    if abs(n_steps * dt - T) > 1e-9 * T:
        raise ValueError(f"T/dt={T / dt!r} must be an integer number of steps (T={T}, dt={dt})")
    save_every = check_int("save_every", save_every)
    if n_steps % save_every:
        raise ValueError(f"save_every={save_every} does not divide the number of steps {n_steps}")
    return n_steps, T / n_steps


def brownian_grid(h: float, n_steps: int, brownian_dt) -> tuple[float, bool]:
    """Validate ``brownian_dt``; return ``(h_b, substeps)`` (``h_b = h`` when it is None)."""
    if brownian_dt is None:
        return h, False
    hb = check_number("brownian_dt", brownian_dt)
    r = int(round(h / hb))
    if r < 1 or abs(r * hb - h) > 1e-9 * h:
        raise ValueError(f"brownian_dt={brownian_dt!r} must divide dt={h!r} (dt/brownian_dt={h / hb!r})")
    if r * n_steps >= 2**31:
        raise ValueError(f"brownian_dt={brownian_dt!r}: T/brownian_dt must be below 2^31")
    return h / r, True


def float_dtype(x, name: str):
    """The computation dtype: that of ``x`` (float32 / float64; integers -> default float).

    float64 needs ``jax_enable_x64``; without it the computation runs in float32 (one warning).
    """
    dtype = np.asarray(x).dtype
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return np.dtype(jnp.result_type(float))
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} has dtype {dtype}; use float32 or float64")
    canonical = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if canonical != dtype:
        warnings.warn(
            f"{name} is {dtype} but jax_enable_x64 is off: computing in {canonical}", stacklevel=3
        )
    return canonical


def default_tol(dtype, psd_tol):
    if psd_tol is None:
        return default_psd_tol(dtype)
    return check_number("psd_tol", psd_tol, lo_closed=True)


def validate_gram(
    V0, num_paths: int, psd_tol: float, stop_norm: float = math.inf, dtype=None
) -> np.ndarray:
    """Check ``V0`` (``(m, m)`` or ``(num_paths, m, m)``): finite, symmetric, PSD, below stop_norm.

    Symmetry and PSD are tested with tolerance ``tol * max(1, max|V0|)``,
    ``tol = max(psd_tol, sqrt(eps))``. Returns the symmetrised host array, batched to
    ``(num_paths, m, m)``.
    """
    dtype = float_dtype(V0, "V0") if dtype is None else np.dtype(dtype)
    V = np.asarray(V0, dtype=dtype)
    if V.ndim not in (2, 3) or V.shape[-1] != V.shape[-2] or V.shape[-1] < 1:
        raise ValueError(f"V0 has shape {V.shape}; expected (m, m) or (num_paths, m, m)")
    if V.ndim == 3 and V.shape[0] != num_paths:
        raise ValueError(f"V0 has {V.shape[0]} matrices but num_paths={num_paths}")
    check_gram_values("V0", V, max(psd_tol, default_psd_tol(dtype)))
    V = 0.5 * (V + np.swapaxes(V, -1, -2))
    if np.any(np.max(np.abs(V), axis=(-2, -1)) > stop_norm):
        raise ValueError(f"V0 has max |entry| {np.max(np.abs(V)):.3g} > stop_norm={stop_norm}")
    if V.ndim == 2:
        V = np.broadcast_to(V, (num_paths,) + V.shape)
    return V


@functools.lru_cache(maxsize=64)
def _compiled(chunk_fn: Callable, static_items: tuple, mesh):
    """``chunk_fn(keys, inits, **dynamic, **static)`` as ``f((keys, inits), dynamic)``, sharded
    over ``mesh``; cached per configuration so that repeated solves reuse the program."""
    static = dict(static_items)
    return sharded_jit(lambda batched, dynamic: chunk_fn(*batched, **dynamic, **static), mesh)


def run_paths(chunk_fn: Callable, static: dict, dynamic: dict, key, inits: Array, chunk_size: int,
              first_path: int = 0):
    """``chunk_fn`` over all paths of ``inits`` (leading axis) in chunks of ``chunk_size`` per
    device: path ``i`` gets ``fold_in(key, first_path + i)``; the results are concatenated (a
    pytree)."""
    mesh = sample_mesh()
    fn = _compiled(chunk_fn, tuple(sorted(static.items())), mesh)
    num_paths = inits.shape[0]

    def chunk(idx):
        return fn((sample_keys(key, idx), inits[np.minimum(idx - first_path, num_paths - 1)]), dynamic)

    return map_chunks(chunk, first_path, first_path + num_paths, chunk_size, num_shards(mesh))
