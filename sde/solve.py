"""Euler-Maruyama integration of the covariance SDE with diffrax, vmapped over paths.

``dV = b(V) dt + Sigma(V)^{1/2} dB`` (Ito; spec/sde.md section 2) is integrated with
``diffrax.Euler`` (which converges to the Ito solution): every grid step is one
``solver.step`` of diffrax, vmapped over the paths of a chunk, inside a ``lax.fori_loop`` (a
``lax.scan`` over save blocks) so that each path can be frozen individually when it stops.
The terms are ``diffrax.MultiTerm(ODETerm(drift), diffusion)``:

- ``noise="structured"`` (default): :class:`StructuredDiffusionTerm`, a diffrax term whose
  Brownian motion has dimension ``noise_dim(m, params)`` (the symmetric ``S`` and ``Z2`` of
  :mod:`sde.noise`, scaled by ``sqrt(dt)``) and whose vector field/control product is the
  O(m^3) structured noise.
- ``noise="generic"``: the stock ``diffrax.ControlTerm`` with a ``D``-dimensional Brownian motion
  and the vector field ``Sigma(V)^{1/2}`` (``eigh`` of the ``D x D`` diffusion matrix) reshaped
  to ``(m, m, D)``; O(m^6) per step. The reference route.

Each path's Brownian motion (:class:`GridBrownianPath`) is built inside the vmapped step from
the path's own key ``fold_in(key, i)``, ``i`` the path index: results do not depend on
``num_paths``, ``chunk_size`` or the number of devices. A Python loop over chunks calls one
jitted function (the last chunk is padded), which compiles once per (configuration, number of
saves): neither the number of steps nor ``dt`` enters the compiled program. With several local
accelerator devices (GPUs, TPU cores) each chunk's paths are split over a one-axis ``Mesh``
``("paths",)`` with ``shard_map``, with no code change (CPU devices only with
:data:`SHARD_ON_CPU`, see there).

Stopping (spec section 2: convergence holds up to ``inf{t : ||V_t|| >= r}``, and the attention
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
``m (m + 1) / 2 + m^2`` normals), four batched ``m x m`` products, one LAPACK Cholesky and
O(m^2) elementwise work; ``eigh`` (5-10x a Cholesky) runs only for chunks where some path
sits on the PSD boundary.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from .coefficients import (
    correlation_diffusion,
    correlation_drift,
    diffusion_matrix,
    drift,
    sym_index,
)
from .noise import FACTORS, eigh_factor, factor_and_check, noise_dim, noise_from_normals, psd_sqrt
from .params import SDEParams
from .validation import (
    check_choice,
    check_gram_values,
    check_interval,
    check_positive_int,
    check_positive_real,
    default_psd_tol,
)

Array = jax.Array

NOISES = ("structured", "generic")


# --------------------------------------------------------------------------- results


class SDESolution(NamedTuple):
    """Result of :func:`solve` (a pytree).

    Attributes:
      ts: ``(K,)`` save times ``k * save_every * dt``, from 0 to T.
      V: ``(num_paths, K, m, m)`` states at the save times (frozen after a stop).
      stopped: ``(num_paths,)`` bool, True for paths that were stopped.
      stop_time: ``(num_paths,)`` first grid time at which the path failed the stopping test;
        ``inf`` for paths that never stopped.
    """

    ts: Array
    V: Array
    stopped: Array
    stop_time: Array

    @property
    def stopped_fraction(self) -> float:
        """Fraction of paths that were stopped."""
        return float(np.mean(np.asarray(self.stopped)))


class CorrelationSolution(NamedTuple):
    """Result of :func:`solve_correlation`: as :class:`SDESolution` with ``rho`` of shape
    ``(num_paths, K)`` in place of ``V``."""

    ts: Array
    rho: Array
    stopped: Array
    stop_time: Array

    @property
    def stopped_fraction(self) -> float:
        """Fraction of paths that were stopped."""
        return float(np.mean(np.asarray(self.stopped)))


# --------------------------------------------------------------------------- diffrax pieces


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
    the pair ``(V, L)`` with ``L L^T = V``, and ``prod`` is :func:`sde.noise.noise_from_normals`,
    linear in ``dW``: the upper triangle of ``prod(vf(V), dW)`` has covariance
    ``dt * diffusion_matrix(V, params)``.

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


def _generic_vector_field(params: SDEParams):
    """``(m, m, D)`` tensor ``Sigma(V)^{1/2}`` mapped to symmetric matrices, for ControlTerm."""

    def vector_field(t, V, args):
        R = psd_sqrt(diffusion_matrix(V, params))  # (D, D)
        return R[sym_index(V.shape[-1])]  # (m, m, D): N_ab = sum_k R[p(a,b), k] dW_k

    return vector_field


# --------------------------------------------------------------------------- stopping


def check_state(
    V: Array, stop_norm, psd_tol, factor: str = "cholesky", active=None
) -> tuple[Array, Array]:
    """Stopping test of a batch of states and the factor of each state.

    Returns ``(bad, L)``: ``bad`` is True where ``V`` has a non-finite entry,
    ``max_ab |V_ab| > stop_norm`` or ``lambda_min(V) < -psd_tol * max(1, max_ab |V_ab|)``;
    ``L L^T = V`` (``V_+``) from :func:`sde.noise.factor_and_check` (Cholesky, with the clipped
    ``eigh`` only where Cholesky fails, so the eigenvalue test is evaluated exactly there).
    ``active`` marks the states that matter (others: unspecified output, no eigh fallback).
    """
    scale = jnp.max(jnp.abs(V), axis=(-2, -1))  # NaN propagates
    bad_norm = ~(scale <= stop_norm)  # also True for NaN / inf
    act = ~bad_norm if active is None else (active & ~bad_norm)
    L, psd = factor_and_check(V, psd_tol * jnp.maximum(1.0, scale), factor, act)
    return bad_norm | ~psd, L


def stop_test(V: Array, stop_norm, psd_tol) -> Array:
    """True where the state ``V (..., m, m)`` stops a path (see :func:`check_state`)."""
    return check_state(V, stop_norm, psd_tol)[0]


def _where_batch(mask, a, b):
    """``where(mask, a, b)`` with ``mask`` over the leading (batch) axis of ``a`` and ``b``."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def _integrate(step, check, y0, aux0, h, num_saves: int, save_every):
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
        shape = (noise_dim(m, params),) if noise == "structured" else (m * (m + 1) // 2,)

        def terms_of(key):
            bm = GridBrownianPath(shape, dtype, key, hb, substeps)
            if noise == "structured":
                diffusion = StructuredDiffusionTerm(params, bm)
            else:
                diffusion = diffrax.ControlTerm(_generic_vector_field(params), bm)
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
    return _integrate(step, check, V0s, (L0, state0), h, num_saves, save_every)


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

    return _integrate(step, check, rho0s, (None, None), h, num_saves, save_every)


# --------------------------------------------------------------------------- validation


def time_grid(T, dt, save_every: int = 1) -> tuple[int, float]:
    """Validate the grid; return ``(n_steps, h)`` with ``n_steps = round(T / dt)``, ``h = T / n_steps``.

    ``T / dt`` must be an integer within relative rounding ``1e-9`` and ``save_every`` must
    divide it. The step actually used is ``h = T / n_steps`` (equal to ``dt`` up to rounding),
    so the last save time is exactly ``T``.
    """
    T = check_positive_real("T", T)
    dt = check_interval("dt", dt, 0, T, hi_name="T")
    n_steps = int(round(T / dt))
    if abs(n_steps * dt - T) > 1e-9 * T:
        raise ValueError(f"T/dt={T / dt!r} must be an integer number of steps (T={T}, dt={dt})")
    save_every = check_positive_int("save_every", save_every)
    if n_steps % save_every:
        raise ValueError(f"save_every={save_every} does not divide the number of steps {n_steps}")
    return n_steps, T / n_steps


def brownian_grid(h: float, n_steps: int, brownian_dt) -> tuple[float, bool]:
    """Validate ``brownian_dt``; return ``(h_b, substeps)`` (``h_b = h`` when it is None)."""
    if brownian_dt is None:
        return h, False
    hb = check_positive_real("brownian_dt", brownian_dt)
    r = int(round(h / hb))
    if r < 1 or abs(r * hb - h) > 1e-9 * h:
        raise ValueError(f"brownian_dt={brownian_dt!r} must divide dt={h!r} (dt/brownian_dt={h / hb!r})")
    if r * n_steps >= 2**31:
        raise ValueError(f"brownian_dt={brownian_dt!r}: T/brownian_dt must be below 2^31")
    return h / r, True


def _float_dtype(x, name: str):
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


def _default_tol(dtype, psd_tol):
    if psd_tol is None:
        return default_psd_tol(dtype)
    return check_positive_real("psd_tol", psd_tol, allow_zero=True)


def validate_gram(
    V0, num_paths: int, psd_tol: float, stop_norm: float = math.inf, dtype=None
) -> np.ndarray:
    """Check ``V0`` (``(m, m)`` or ``(num_paths, m, m)``): finite, symmetric, PSD, below stop_norm.

    Symmetry and PSD are tested with tolerance ``tol * max(1, max|V0|)``,
    ``tol = max(psd_tol, sqrt(eps))``. Returns the symmetrised host array, batched to
    ``(num_paths, m, m)``.
    """
    dtype = _float_dtype(V0, "V0") if dtype is None else np.dtype(dtype)
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


def _path_keys(key, num_paths: int):
    if key is None:
        raise ValueError("key=None: a JAX PRNG key is required for a stochastic solve")
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_paths, dtype=jnp.uint32))


def default_chunk_size(m: int) -> int:
    """Paths per chunk: ``clip(2^19 / m^2, 64, 1024)`` (128 at m = 64, 1024 for m <= 22).

    Small enough that a chunk's per-step arrays (random numbers, products) stay in cache: at
    m = 64 a chunk of 128 paths is ~1.4x faster per path-step on CPU than 1000 paths."""
    return int(min(1024, max(64, 2**19 // (m * m))))


SHARD_ON_CPU = False
"""Also split chunks over several *CPU* devices (``--xla_force_host_platform_device_count``).

Off by default: with 2 CPU devices the m = 64 solve deadlocked inside XLA's CPU runtime (jax
0.10.2) as soon as a device had more than 2 paths of a chunk (m <= 48 ran fine and gave
bit-identical results); accelerators (GPU, TPU) are always sharded."""


def path_mesh() -> Mesh | None:
    """A one-axis mesh ``("paths",)`` over all local devices; None for a single device (and
    for CPU devices unless :data:`SHARD_ON_CPU`)."""
    devices = jax.local_devices()
    if len(devices) < 2 or (devices[0].platform == "cpu" and not SHARD_ON_CPU):
        return None
    return Mesh(np.asarray(devices), ("paths",))


@functools.lru_cache(maxsize=64)
def _sharded_chunk_fn(chunk_fn, static_items: tuple, mesh: Mesh):
    """``chunk_fn`` with the path axis split over ``mesh`` (``shard_map``: every device runs the
    same per-chunk program on its own paths, LAPACK calls included); cached per configuration
    so that repeated solves reuse the compiled program."""
    static = dict(static_items)
    paths, replicated = PartitionSpec("paths"), PartitionSpec()

    def body(keys, inits, dynamic):
        return chunk_fn(keys, inits, **dynamic, **static)

    return jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(paths, paths, replicated), out_specs=paths, check_vma=False
        )
    )


def _chunk_caller(chunk_fn, dynamic: dict, static: dict):
    """``f(keys_chunk, inits_chunk)`` running ``chunk_fn`` on one device or sharded over all."""
    mesh = path_mesh()
    if mesh is None:
        return functools.partial(chunk_fn, **dynamic, **static), 1
    fn = _sharded_chunk_fn(chunk_fn, tuple(sorted(static.items())), mesh)
    return (lambda keys, inits: fn(keys, inits, dynamic)), mesh.size


def _run_chunks(fn, keys, inits, num_paths: int, chunk_size, multiple: int = 1):
    """Call ``fn(keys_chunk, inits_chunk)`` over fixed-size chunks (the last one padded).

    The chunk size is rounded up to a multiple of ``multiple`` (the number of devices)."""
    if chunk_size == "auto":
        chunk_size = default_chunk_size(inits.shape[-1]) if inits.ndim == 3 else 1024
    C = num_paths if chunk_size is None else min(check_positive_int("chunk_size", chunk_size), num_paths)
    C = -(-C // multiple) * multiple
    outs = []
    for start in range(0, num_paths, C):
        stop = min(start + C, num_paths)
        idx = np.arange(start, start + C)
        idx[idx >= stop] = start  # pad the last chunk by repeating its first path
        out = fn(keys[idx], inits[idx])
        outs.append(jax.tree_util.tree_map(lambda x: x[: stop - start], out))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


DEFAULT_CHUNK = "auto"


# --------------------------------------------------------------------------- public API


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
    chunk_size: int | str | None = DEFAULT_CHUNK,
    factor: str = "cholesky",
    brownian_dt: float | None = None,
    deterministic: bool = False,
) -> SDESolution:
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
      key: JAX PRNG key; path ``i`` uses ``fold_in(key, i)``, so paths do not depend on
        ``num_paths`` or ``chunk_size``. Not needed when ``deterministic``.
      save_every: save every this many steps; must divide the number of steps.
      noise: ``"structured"`` (O(m^3) per step) or ``"generic"`` (``D x D`` square root, O(m^6)).
      stop_norm: stop a path when ``max_ab |V_ab| > stop_norm`` (> 0).
      psd_tol: stop a path when ``lambda_min(V) < -psd_tol * max(1, max|V|)``; default
        ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4 in float32).
      chunk_size: paths per chunk (bounds memory; the last chunk is padded so that one
        program serves all chunks); ``"auto"`` (default): :func:`default_chunk_size`;
        ``None``: all paths at once. Results do not depend on it.
      factor: factor of ``V`` for the structured noise and the PSD test: ``"cholesky"``
        (default; clipped ``eigh`` where Cholesky fails, so exact on the PSD boundary) or
        ``"eigh"`` (always); see :func:`sde.noise.factor_and_check`. Same law, different speed.
      brownian_dt: if given (it must divide ``dt``), Brownian increments are drawn on the finer
        grid of spacing ``brownian_dt`` and summed over each step: solves with different
        ``dt`` but the same ``key`` and ``brownian_dt`` see the same Brownian path (common
        random numbers for convergence studies). Default: one draw per step.
      deterministic: integrate the drift-only limit ``dV = b(V) dt`` instead (one path,
        ``diffrax.Tsit5`` on the same grid, same stopping rule); ``num_paths`` must be 1.

    Returns:
      :class:`SDESolution` with ``ts (K,)``, ``V (num_paths, K, m, m)``, ``stopped``,
      ``stop_time`` (``inf`` where not stopped).

    Raises:
      ValueError: for invalid inputs, naming the parameter, its value and the allowed range.
    """
    plan = _plan_solve(
        V0, params, T=T, dt=dt, num_paths=num_paths, key=key, save_every=save_every,
        noise=noise, stop_norm=stop_norm, psd_tol=psd_tol, factor=factor,
        brownian_dt=brownian_dt, deterministic=deterministic,
    )
    fn, multiple = _chunk_caller(_solve_chunk, plan.dynamic, plan.static)
    V, stopped, stop_time = _run_chunks(fn, plan.keys, plan.V0s, plan.num_paths, chunk_size, multiple)
    return SDESolution(ts=plan.ts, V=V, stopped=stopped, stop_time=stop_time)


class _Plan(NamedTuple):
    """Validated inputs of :func:`_solve_chunk` (also used by benchmarks/bench_sde.py to
    compile the chunk program ahead of time)."""

    keys: Array
    V0s: Array
    num_paths: int
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
    num_paths = check_positive_int("num_paths", num_paths)
    stop_norm = check_positive_real("stop_norm", stop_norm)
    check_choice("noise", noise, NOISES)
    check_choice("factor", factor, FACTORS)
    hb, substeps = brownian_grid(h, n_steps, brownian_dt)
    dtype = _float_dtype(V0, "V0")
    tol = _default_tol(dtype, psd_tol)
    if deterministic and num_paths != 1:
        raise ValueError(f"num_paths={num_paths} must be 1 when deterministic=True")
    V0s = jnp.asarray(validate_gram(V0, num_paths, tol, stop_norm, dtype), dtype)
    if deterministic:
        keys = jnp.zeros((1, 2), jnp.uint32)  # unused
    else:
        keys = _path_keys(key, num_paths)
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
    return _Plan(keys, V0s, num_paths, ts, dynamic, static)


def solve_drift(V0, params: SDEParams, *, T: float, dt: float, save_every: int = 1, **kwargs):
    """The drift-only limit ``dV = b(V) dt``: ``solve(..., deterministic=True)``."""
    return solve(V0, params, T=T, dt=dt, save_every=save_every, deterministic=True, **kwargs)


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
    chunk_size: int | str | None = DEFAULT_CHUNK,
    brownian_dt: float | None = None,
) -> CorrelationSolution:
    """Euler-Maruyama for the correlation SDE of the residual shaped-ReLU MLP (``block="mlp"``).

    ``d rho = gamma^2 [nu(rho) - rho (1 - rho^2)] dt + sqrt(2) gamma (1 - rho^2) dW``
    (spec section 5; :func:`sde.coefficients.correlation_drift`), the law of
    ``V12 / sqrt(V11 V22)`` under the ``m = 2`` matrix SDE. Same grid, keys, chunking and
    freezing as :func:`solve`; a path stops when ``rho`` is non-finite or
    ``|rho| > 1 + psd_tol`` (the 2x2 correlation matrix leaves the PSD cone; Euler can
    overshoot ``|rho| = 1``). ``psd_tol`` defaults to ``sqrt(eps)`` of the dtype.

    Arguments:
      rho0: initial correlation in ``[-1, 1]``, a scalar or one per path ``(num_paths,)``;
        its dtype (float32 or float64) is the computation's.
      Other arguments: as for :func:`solve`.

    Returns:
      :class:`CorrelationSolution` with ``ts (K,)``, ``rho (num_paths, K)``, ``stopped``,
      ``stop_time``.
    """
    if not isinstance(params, SDEParams):
        raise ValueError(f"params={params!r} must be an SDEParams")
    if params.block != "mlp":
        raise ValueError(f"params.block={params.block!r}: solve_correlation needs block='mlp'")
    n_steps, h = time_grid(T, dt, save_every)
    num_paths = check_positive_int("num_paths", num_paths)
    hb, substeps = brownian_grid(h, n_steps, brownian_dt)
    dtype = _float_dtype(rho0, "rho0")
    tol = _default_tol(dtype, psd_tol)
    r = np.asarray(rho0, dtype=dtype)
    if r.ndim not in (0, 1) or (r.ndim == 1 and r.shape[0] != num_paths):
        raise ValueError(f"rho0 has shape {r.shape}; expected () or (num_paths={num_paths},)")
    if not np.all(np.isfinite(r)) or np.any(np.abs(r) > 1.0):
        raise ValueError(f"rho0={rho0!r} is outside [-1, 1]")
    r = np.broadcast_to(r, (num_paths,))
    keys = _path_keys(key, num_paths)
    dynamic = dict(
        h=jnp.asarray(h, dtype),
        hb=jnp.asarray(hb, dtype),
        save_every=jnp.asarray(save_every, jnp.int32),
        psd_tol=jnp.asarray(tol, dtype),
    )
    static = dict(params=params, num_saves=n_steps // save_every, substeps=substeps)
    fn, multiple = _chunk_caller(_solve_correlation_chunk, dynamic, static)
    rho, stopped, stop_time = _run_chunks(
        fn, keys, jnp.asarray(r, dtype), num_paths, chunk_size, multiple
    )
    ts = jnp.arange(n_steps // save_every + 1, dtype=dtype) * jnp.asarray(save_every * h, dtype)
    return CorrelationSolution(ts=ts, rho=rho, stopped=stopped, stop_time=stop_time)
