"""One-layer estimator of the covariance-SDE coefficients of any block (spec/sde.md section 5).

For a block mapping tokens ``X`` (m x n) to ``X'`` with ``V = X X^T / n``, the covariance SDE
in time ``t = l / n`` has

    b(V)     = lim_n  n E[V_1 - V_0 | V_0 = V]
    Sigma(V) = lim_n  n Cov(V_1 - V_0 | V_0 = V)      (over the upper triangle, a <= b)

:func:`estimate_coefficients` estimates both by Monte Carlo over independent initialisations
of one layer at width ``n`` (error ``O(n^{-1/2})`` in the limit, plus the sampling error it
reports), or at several widths with an extrapolation to ``n -> infinity``. This is how the
SDE of a new block is checked (docs/general_activation_sde.md uses it for general attention
activations, multi-head attention and smooth MLPs).

Blocks:

- a :class:`shaped_attn.config.BlockConfig` template, or a callable ``width -> BlockConfig``
  (one required positional argument, e.g. ``functools.partial(shaped_config, gamma=0.5,
  sublayers="attention")``): run by :class:`sde.finite.FiniteSampler` with depth 1 (sampler
  ``"gram"`` by default: exact in distribution and O(m^2 n) per sample);
- a user callable ``layer(key, X) -> X'`` (two required positional arguments), ``X`` of shape
  ``(m, n)``; it is vmapped over the sample keys exactly like the finite Monte Carlo;
- a :class:`GramTransition` ``(key, V, width) -> V_1``: a Markov kernel on Gram matrices, e.g.
  :class:`AttentionTransition`, the exact O(H m^3) sampler of an attention-only shaped block
  (cost independent of ``n``, so widths of 10^4 and 10^6 samples are cheap).

Sampling: sample ``i`` uses ``fold_in(key, i)`` (:func:`sde.finite.sample_keys`), chunks of
``chunk_size`` samples are vmapped and their sample axis is sharded over all local devices
(:func:`sde.finite.sample_mesh`), and only running sums of the increments' first four mixed
moments are kept (float64, on the host), so 10^6 samples need memory for one chunk only.
Every chunk has the same size (the last one is padded and trimmed), so each width compiles
once; compiled samplers are cached across calls with the same block and width.

Standard errors: for the drift, the SE of a mean, ``n sqrt(Var(dV_p) / N)``; for a
covariance entry, ``n sqrt(Var(w) / N)`` with ``w = (dV_p - mean_p)(dV_q - mean_q)`` the
centred products (delta method). Both are asymptotic (large ``N``), to be used as 1-sigma
errors in z-scores.

Extrapolation (``widths=(n_1, ..., n_k)``, k >= 2): each entry is fitted by weighted least
squares with weights ``1 / SE(n_i)^2`` to the model

    est(n) = c0 + c1 n^{-bias_exponent}          (bias_exponent = 1/2 by default)

and the result's ``drift`` / ``diffusion`` are ``c0`` with the WLS standard error of ``c0``.
``bias_exponent = 1/2`` is the generic finite-width error of the limit (e.g. the shaped ReLU
and the smooth-activation MLP, whose activations are expanded in ``n^{-1/2}``); for
shaped attention the leading finite-width error is ``O(1/n)`` (all odd moments of the scores
vanish), so ``bias_exponent = 1`` is the sharper model there. The fit's chi-square and degrees
of freedom are returned so that a wrong model can be seen (chi2 >> dof).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from shaped_attn.config import BlockConfig
from shaped_attn.functional import attention_weights, residual_gains

from .coefficients import diffusion_matrix, drift, num_upper, sym_to_vec, upper_indices, vec_to_sym
from .finite import (
    SAMPLERS,
    FiniteSampler,
    gram,
    initial_tokens,
    sample_keys,
    sample_mesh,
    sized_config,
)
from .noise import psd_factor
from .params import SDEParams
from .validation import check_positive_int, check_psd_matrix

LayerFn = Callable[[jax.Array, jax.Array], jax.Array]
BlockLike = Union[BlockConfig, Callable[[int], BlockConfig], LayerFn]

DEFAULT_CHUNK = 4096


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True, eq=False)
class CoefficientEstimate:
    """Estimated drift and diffusion of one block at one ``V``.

    Attributes:
      drift: ``(D,)`` estimate of ``b(V)`` over the upper triangle (row-major, the order of
        :func:`sde.coefficients.upper_indices` / ``sym_to_vec``).
      drift_se: ``(D,)`` its standard errors.
      diffusion: ``(D, D)`` estimate of ``Sigma(V)`` (same order as
        :func:`sde.coefficients.diffusion_matrix`).
      diffusion_se: ``(D, D)`` its standard errors.
      width: ``n``, or ``inf`` for a width extrapolation.
      num_samples: Monte Carlo samples (per width for an extrapolation).
      widths: the widths of an extrapolation (``()`` otherwise).
      per_width: the :class:`CoefficientEstimate` at each of ``widths``.
      drift_slope, diffusion_slope: fitted ``c1`` of ``est(n) = c0 + c1 n^{-bias_exponent}``.
      drift_chi2, diffusion_chi2: WLS chi-square of each entry's fit (``dof`` degrees of freedom).
      dof: ``len(widths) - 2`` (0 without an extrapolation).
      bias_exponent: the exponent of the extrapolation model.
    """

    drift: np.ndarray
    drift_se: np.ndarray
    diffusion: np.ndarray
    diffusion_se: np.ndarray
    width: float
    num_samples: int
    widths: tuple = ()
    per_width: tuple = ()
    drift_slope: Optional[np.ndarray] = None
    diffusion_slope: Optional[np.ndarray] = None
    drift_chi2: Optional[np.ndarray] = None
    diffusion_chi2: Optional[np.ndarray] = None
    dof: int = 0
    bias_exponent: float = 0.5

    @property
    def m(self) -> int:
        """Number of tokens."""
        return int(round((math.sqrt(8 * self.drift.shape[-1] + 1) - 1) / 2))

    @property
    def drift_matrix(self) -> np.ndarray:
        """The drift as a symmetric ``(m, m)`` matrix."""
        return np.asarray(vec_to_sym(jnp.asarray(self.drift)))

    def z_scores(self, drift_theory, diffusion_theory) -> tuple[np.ndarray, np.ndarray]:
        """``(estimate - theory) / SE`` for the drift ``(D,)`` and diffusion ``(D, D)``.

        ``drift_theory`` may be an ``(m, m)`` matrix or its ``(D,)`` upper triangle. Entries
        with zero SE and zero error give 0 (e.g. exactly deterministic entries)."""
        b = np.asarray(drift_theory, np.float64)
        if b.ndim == 2:
            b = b[upper_indices(b.shape[-1])]
        S = np.asarray(diffusion_theory, np.float64)
        return _z(self.drift, b, self.drift_se), _z(self.diffusion, S, self.diffusion_se)

    def compare(self, V, params: SDEParams) -> tuple[np.ndarray, np.ndarray]:
        """z-scores against :func:`sde.coefficients.drift` / ``diffusion_matrix`` at ``V``."""
        V = jnp.asarray(V, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(V)
        return self.z_scores(np.asarray(drift(V, params)), np.asarray(diffusion_matrix(V, params)))


def _z(est, theory, se):
    err = np.asarray(est, np.float64) - theory
    se = np.asarray(se, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = err / se
    return np.where((se == 0) & (err == 0), 0.0, z)


# --------------------------------------------------------------------------- moments


class _Moments:
    """Running sums of the first four mixed moments of ``d`` (samples x D), float64.

    Shifted by the first chunk's mean (so the sums stay well conditioned); the drift SE
    is that of a mean and the covariance SE is the delta-method SE of the sample covariance
    of centred products (see the module docstring).
    """

    def __init__(self, D: int):
        self.shift = None
        self.N = 0
        self.S1 = np.zeros(D)
        self.S2 = np.zeros((D, D))
        self.S3 = np.zeros((D, D))  # S3[p, q] = sum y_p^2 y_q
        self.S4 = np.zeros((D, D))  # S4[p, q] = sum y_p^2 y_q^2

    def add(self, d: np.ndarray) -> None:
        d = np.asarray(d, np.float64)
        if self.shift is None:
            self.shift = d.mean(axis=0)
        y = d - self.shift
        y2 = y * y
        self.N += d.shape[0]
        self.S1 += y.sum(axis=0)
        self.S2 += y.T @ y
        self.S3 += y2.T @ y
        self.S4 += y2.T @ y2

    def finish(self):
        """``(mean, se_mean, cov, se_cov)`` of the increments."""
        N = self.N
        if N < 2:
            raise ValueError(f"num_samples={N} must be >= 2 for a covariance")
        A = self.S1 / N
        AA = np.outer(A, A)
        cov = (self.S2 - N * AA) / (N - 1)
        se_mean = np.sqrt(np.maximum(np.diag(cov), 0.0) / N)
        d2 = np.diag(self.S2)
        # sum_i w_i^2, w = (y_p - A_p)(y_q - A_q), expanded in the running sums.
        sum_w2 = (
            self.S4
            + (A * A)[None, :] * d2[:, None]
            + (A * A)[:, None] * d2[None, :]
            - 3.0 * N * AA * AA
            - 2.0 * A[None, :] * self.S3
            - 2.0 * A[:, None] * self.S3.T
            + 4.0 * AA * self.S2
        )
        w_mean = (self.S2 - N * AA) / N
        var_w = np.maximum(sum_w2 - N * w_mean * w_mean, 0.0) / (N - 1)
        return self.shift + A, se_mean, cov, np.sqrt(var_w / N)


# --------------------------------------------------------------------------- Gram-level kernels


class GramTransition:
    """A Markov kernel on Gram matrices: ``fn(key, V, width) -> V_1`` (both ``(m, m)``).

    Wrap a function to pass it to :func:`estimate_coefficients` as a block; subclasses
    override :meth:`__call__`. It must be jit/vmap-able in ``key`` (``V`` and ``width`` are
    fixed per compiled call; ``width`` is a static Python int).
    """

    def __init__(self, fn: Optional[Callable] = None):
        self.fn = fn

    def __call__(self, key: jax.Array, V: jax.Array, width: int) -> jax.Array:
        if self.fn is None:
            raise NotImplementedError("GramTransition needs a function or a subclass")
        return self.fn(key, V, width)


class AttentionTransition(GramTransition):
    """Exact law of ``V_1`` given ``V_0`` for an attention-only shaped block, O(H m^3) per draw.

    ``config``: a :class:`BlockConfig` template or ``width -> BlockConfig`` with
    ``sublayers="attention"`` and no LayerNorm (kinds "shaped" / "unshaped"); every attention
    option is honoured (activation, temperature, gains, heads, ``out_proj``, causal mask,
    zero queries) because the attention matrices come from the library's
    :func:`shaped_attn.functional.attention_weights`. Needs key width and value width per
    head ``>= m`` and ``n >= m + H m``.

    Why it is exact (spec/sde.md section 4 taken one step further): write ``X = sqrt(n) L Q``
    with ``L L^T = V_0`` and ``Q`` (m x n) orthonormal rows. A fresh Gaussian matrix ``G``
    (k x n, iid N(0, 1)) splits as ``G = C Q + K Q_perp`` with ``C = G Q^T`` (k x m, iid) and
    ``K K^T ~ Wishart(n - m, I_k)`` independent of ``C`` (``K`` a Bartlett factor): the part of
    ``G`` orthogonal to the token space enters ``V_1`` only through its Gram matrix.

    - Summed heads (``out_proj=False``): value maps ``U_h = L G_h`` (``G_h`` m x n), stacked
      ``G = [G_1; ...; G_H]``; ``Z = lam X + (gamma/sqrt(H)) sum_h A_h U_h`` gives
      ``V_1 = F1 F1^T + F2 F2^T`` with ``F1 = lam L + gamma/sqrt(H n) sum_h A_h L C_h`` and
      ``F2 = gamma/sqrt(H n) sum_h A_h L K_h`` (needs ``n >= m + H m``).
    - Concatenated heads (``out_proj=True``): ``O = [A_1 U_1, ..., A_H U_H]`` with
      ``U_h = L G_h`` (m x n/H), so ``O O^T / n = M M^T``, ``M = [A_1 L B_1, ..., A_H L B_H] /
      sqrt(n)`` with ``B_h B_h^T ~ Wishart(n/H, I_m)``; the output ``O W_O / sqrt(n)`` is
      ``M G'`` (``G'`` Hm x n) in law, so ``F1 = lam L + gamma M C' / sqrt(n)`` and
      ``F2 = gamma M K' / sqrt(n)``.

    The scores per head are ``L B_h G3_h L^T`` (the identity of :func:`sde.finite.gram_scores`).
    All chi-squares are drawn in one call, so the kernel compiles fast.

    :func:`tests.test_estimator` checks it against :class:`sde.finite.FiniteSampler`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config

    def sized(self, width: int, dtype) -> BlockConfig:
        cfg = sized_config(self.config, width, None, dtype)
        if cfg.sublayers != "attention":
            raise ValueError(f"AttentionTransition needs sublayers='attention', got {cfg.sublayers!r}")
        if cfg.layer_norm:
            raise ValueError(f"AttentionTransition needs a block without LayerNorm, got kind={cfg.kind!r}")
        return cfg

    def __call__(self, key: jax.Array, V: jax.Array, width: int) -> jax.Array:
        cfg = self.sized(width, V.dtype)
        att = cfg.attention
        m, n, H, nk = V.shape[-1], cfg.width, att.num_heads, att.head_dim
        lam, gamma = residual_gains(cfg)
        concat = att.out_proj
        if n - m < H * m:
            raise ValueError(f"width={n} must be >= m + H m = {m + H * m} for this sampler")
        if nk < m or (concat and n // H < m):
            raise ValueError(f"key width {nk} and value width per head must be >= m = {m}")
        dtype = V.dtype
        k_chi, k_normal = jax.random.split(key)
        L = psd_factor(V, "cholesky")  # depends on V only: computed once per compiled call, not per sample
        # All chi-squares of the Bartlett factors in one draw (one gamma sampler to compile):
        # per head the scores' Wishart(n_k, I_m), the value path's Wishart(n - m, I_Hm) and,
        # with concat, per head the values' Wishart(n / H, I_m).
        dfs = [np.arange(nk, nk - m, -1)] * H + [np.arange(n - m, n - m - H * m, -1)]
        if concat:
            dfs += [np.arange(n // H, n // H - m, -1)] * H
        dfs = np.concatenate(dfs).astype(np.float64)
        chi = jnp.sqrt(jax.random.chisquare(k_chi, jnp.asarray(dfs, dtype), dfs.shape, dtype))
        sizes = [m] * H + [H * m] + ([m] * H if concat else [])
        # All standard normals in one draw too: Bartlett lower triangles, G3 (scores), C.
        z = jax.random.normal(k_normal, (len(sizes) + 2, H * m, H * m), dtype)
        factors, offset = [], 0
        for i, size in enumerate(sizes):  # lower-triangular Bartlett factors
            low = jnp.tril(z[i, :size, :size], -1)
            factors.append(low + jnp.diag(chi[offset:offset + size]))
            offset += size
        # Scores per head: (X W_Q,h)(X W_K,h)^T = L G1 G2^T L^T = L B_h G3_h L^T in law
        # (the Gram sampler's identity, sde.finite.gram_scores).
        g3 = z[-2, :H * m, :m].reshape(H, m, m)
        qk = L @ jnp.stack(factors[:H]) @ g3 @ L.T
        if att.query_init == "zero":
            qk = jnp.zeros_like(qk)
        A = attention_weights(att, qk)  # (H, m, m): the library's activation and shaping
        AL = A @ L
        if concat:  # O O^T / n = M M^T with M = [A_h L B_h] / sqrt(n)
            P = gamma * jnp.concatenate(list(AL @ jnp.stack(factors[H + 1:])), axis=-1) / n
        else:
            P = gamma * jnp.concatenate(list(AL), axis=-1) / math.sqrt(H * n)
        C = z[-1, :, :m]
        F1 = lam * L + P @ C
        F2 = P @ factors[H]
        return F1 @ F1.T + F2 @ F2.T


# --------------------------------------------------------------------------- samplers


def _is_layer(block) -> bool:
    """True for ``layer(key, X)``, False for a BlockConfig or ``width -> BlockConfig``."""
    if isinstance(block, (BlockConfig, GramTransition)):
        return False
    if not callable(block):
        raise ValueError(
            f"block={block!r} must be a BlockConfig, a callable width -> BlockConfig or a "
            "callable layer(key, X) -> X'"
        )
    try:
        sig = inspect.signature(block)
    except (TypeError, ValueError):
        raise ValueError(f"cannot inspect the signature of block={block!r}") from None
    positional = [
        p for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) == 1:
        return False
    if len(positional) == 2:
        return True
    raise ValueError(
        f"block={block!r} takes {len(positional)} required positional arguments: a callable "
        "block is either width -> BlockConfig (one) or layer(key, X) -> X' (two)"
    )


@functools.lru_cache(maxsize=32)
def _config_sampler(cfg: BlockConfig, width: int, sampler: str) -> FiniteSampler:
    """A compiled depth-1 :class:`FiniteSampler`, cached per sized config (x0 set per call)."""
    m0 = 1
    V0 = np.eye(m0, dtype=cfg.param_dtype)
    return FiniteSampler(V0, cfg, width=width, depth=1, sampler=sampler,
                         key_width=cfg.attention.head_dim)


@functools.lru_cache(maxsize=32)
def _layer_chunk_fn(layer: LayerFn):
    """Jitted ``(keys, x0) -> V_1`` of a user layer, vmapped and sharded like finite.py."""
    mesh = sample_mesh()
    samples = NamedSharding(mesh, PartitionSpec("samples"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def run(keys, x0):
        return jax.vmap(lambda k: gram(layer(k, x0)))(keys)

    return mesh, jax.jit(run, in_shardings=(samples, replicated), out_shardings=samples)


@functools.lru_cache(maxsize=32)
def _transition_chunk_fn(transition: GramTransition, width: int):
    """Jitted ``(keys, V0) -> V_1`` of a Gram-level kernel, vmapped and sharded."""
    mesh = sample_mesh()
    samples = NamedSharding(mesh, PartitionSpec("samples"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def run(keys, V0):
        return jax.vmap(lambda k: transition(k, V0, width))(keys)

    return mesh, jax.jit(run, in_shardings=(samples, replicated), out_shardings=samples)


def _runner(block, V: jax.Array, width: int, sampler: str, key_width):
    """``(V0, chunk(key, start, stop) -> V_1 of samples start..stop-1)``."""
    if isinstance(block, GramTransition):
        mesh, fn = _transition_chunk_fn(block, width)
        devices = mesh.devices.size

        def chunk(key, start, stop):
            padded = -(-(stop - start) // devices) * devices
            return np.asarray(fn(sample_keys(key, start, start + padded), V))[: stop - start]

        return np.asarray(V), chunk
    if _is_layer(block):
        mesh, fn = _layer_chunk_fn(block)
        x0 = initial_tokens(V, width)
        devices = mesh.devices.size

        def chunk(key, start, stop):
            padded = -(-(stop - start) // devices) * devices
            return np.asarray(fn(sample_keys(key, start, start + padded), x0))[: stop - start]

        return np.asarray(gram(x0)), chunk
    cfg = sized_config(block, width, key_width, V.dtype)
    runner = _config_sampler(cfg, width, sampler)
    x0 = initial_tokens(V, width)

    def chunk(key, start, stop):
        # FiniteSampler.chunk with this V's tokens (the compiled function takes x0 as input).
        runner.x0 = x0
        return runner.chunk(key, start, stop)[:, 1]

    return np.asarray(gram(x0)), chunk


def _estimate_one(block, V, width, num_samples, key, sampler, key_width, chunk_size, progress):
    check_positive_int("width", width)
    check_positive_int("num_samples", num_samples)
    m = V.shape[-1]
    V0, chunk = _runner(block, V, width, sampler, key_width)
    size = min(chunk_size, num_samples)
    moments = _Moments(num_upper(m))
    rows, cols = upper_indices(m)
    starts = range(0, num_samples, size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"estimate n={width}")
    for start in starts:
        V1 = chunk(key, start, start + size)[: num_samples - start]  # same size: one compile
        d = np.asarray(V1, np.float64)[:, rows, cols] - np.asarray(V0, np.float64)[rows, cols]
        if not np.all(np.isfinite(d)):
            raise FloatingPointError(
                f"non-finite V_1 at width {width} (samples {start}..{start + size - 1})"
            )
        moments.add(d)
    mean, se_mean, cov, se_cov = moments.finish()
    return CoefficientEstimate(
        drift=width * mean, drift_se=width * se_mean, diffusion=width * cov,
        diffusion_se=width * se_cov, width=width, num_samples=num_samples,
    )


def extrapolate(estimates: Sequence[CoefficientEstimate], bias_exponent: float = 0.5) -> CoefficientEstimate:
    """WLS fit of ``est(n) = c0 + c1 n^{-bias_exponent}`` per entry over the estimates' widths.

    Returns a :class:`CoefficientEstimate` with ``width = inf``, ``drift``/``diffusion`` the
    fitted ``c0`` and ``*_se`` its WLS standard error (from the per-width SEs, assumed
    independent); the slopes and the chi-square (``len - 2`` degrees of freedom) are kept.
    """
    if len(estimates) < 2:
        raise ValueError(f"extrapolation needs >= 2 widths, got {len(estimates)}")
    widths = tuple(e.width for e in estimates)
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths={widths} must be distinct")
    x = np.asarray(widths, np.float64) ** (-float(bias_exponent))

    def fit(ys, ses):
        ys, ses = np.stack(ys), np.stack(ses)
        if np.any(ses <= 0):
            raise ValueError("an estimate has a zero standard error; cannot weight the fit")
        xs = x.reshape((-1,) + (1,) * (ys.ndim - 1))
        w = 1.0 / ses**2
        S, Sx, Sxx = w.sum(0), (w * xs).sum(0), (w * xs * xs).sum(0)
        Sy, Sxy = (w * ys).sum(0), (w * xs * ys).sum(0)
        det = S * Sxx - Sx * Sx
        c0 = (Sxx * Sy - Sx * Sxy) / det
        c1 = (S * Sxy - Sx * Sy) / det
        chi2 = (w * (ys - c0 - c1 * xs) ** 2).sum(0)
        return c0, np.sqrt(Sxx / det), c1, chi2

    b0, b_se, b1, b_chi2 = fit([e.drift for e in estimates], [e.drift_se for e in estimates])
    s0, s_se, s1, s_chi2 = fit([e.diffusion for e in estimates], [e.diffusion_se for e in estimates])
    return CoefficientEstimate(
        drift=b0, drift_se=b_se, diffusion=s0, diffusion_se=s_se, width=math.inf,
        num_samples=min(e.num_samples for e in estimates), widths=widths,
        per_width=tuple(estimates), drift_slope=b1, diffusion_slope=s1, drift_chi2=b_chi2,
        diffusion_chi2=s_chi2, dof=len(widths) - 2, bias_exponent=float(bias_exponent),
    )


def estimate_coefficients(
    block: BlockLike,
    V,
    *,
    width: Optional[int] = None,
    num_samples: Union[int, Sequence[int]],
    key: jax.Array,
    widths: Optional[Sequence[int]] = None,
    chunk_size: Optional[int] = None,
    sampler: str = "gram",
    key_width: Optional[int] = None,
    bias_exponent: float = 0.5,
    progress: bool = False,
) -> CoefficientEstimate:
    """One-layer estimates ``n E[V_1 - V_0 | V]`` and ``n Cov(V_1 - V_0 | V)`` with SEs.

    Arguments:
      block: a :class:`BlockConfig` template, a callable ``width -> BlockConfig``, or a user
        layer ``layer(key, X) -> X'`` with ``X`` of shape ``(m, n)`` (see the module docstring).
      V: ``(m, m)`` symmetric PSD Gram matrix; its dtype is the computation dtype (use
        float64 for theory comparisons).
      width: ``n`` (required unless ``widths`` is given; if both, it must be one of them).
      num_samples: Monte Carlo samples per width (an int, or one per width).
      key: the run's key; sample i at width n uses ``fold_in(key, i)`` (one width) or
        ``fold_in(fold_in(key, n), i)`` (several widths, independent across widths).
      widths: several widths: estimate at each and extrapolate to ``n -> inf`` by WLS with the
        model ``est(n) = c0 + c1 n^{-bias_exponent}`` (:func:`extrapolate`).
      chunk_size: samples per compiled call (default 4096).
      sampler: ``"gram"`` (exact, fast) or ``"weights"`` (real modules) for config blocks.
      key_width: n_k per head for config blocks (default: sde.finite.sized_config's).
      bias_exponent: exponent of the extrapolation model (1/2 by default).
      progress: tqdm bar over chunks.

    Returns:
      :class:`CoefficientEstimate` (``width = inf`` for an extrapolation, with ``per_width``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    V = check_psd_matrix("V", V)
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    if widths is None:
        if width is None:
            raise ValueError("give width (or widths for an extrapolation)")
        if not isinstance(num_samples, (int, np.integer)):
            raise ValueError(f"num_samples={num_samples!r} must be an integer for one width")
        return _estimate_one(block, V, width, int(num_samples), key, sampler, key_width,
                             chunk_size, progress)
    widths = tuple(int(w) for w in widths)
    if width is not None and width not in widths:
        raise ValueError(f"width={width} is not one of widths={widths}")
    if isinstance(num_samples, (int, np.integer)):
        counts = (int(num_samples),) * len(widths)
    else:
        counts = tuple(int(c) for c in num_samples)
        if len(counts) != len(widths):
            raise ValueError(f"num_samples={num_samples!r} needs one count per width {widths}")
    estimates = [
        _estimate_one(block, V, n, c, jax.random.fold_in(key, n), sampler, key_width, chunk_size,
                      progress)
        for n, c in zip(widths, counts)
    ]
    return extrapolate(estimates, bias_exponent)


def theory_vec(V, params: SDEParams) -> tuple[np.ndarray, np.ndarray]:
    """``(drift (D,), diffusion (D, D))`` of the SDE at ``V``, in the estimator's layout."""
    V = jnp.asarray(V)
    return np.asarray(sym_to_vec(drift(V, params))), np.asarray(diffusion_matrix(V, params))
