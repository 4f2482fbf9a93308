"""The configuration of a finite-vs-SDE experiment (docs/experiments.md §1): one frozen,
validated dataclass from which the CLI is generated, the finite networks are built and their
SDE is derived (:meth:`SDEParams.from_block`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import numpy as np

from shaped_attn import activations
from shaped_attn import config as model_config

from .._helpers.validation import check_choice, check_int, check_number, check_real
from .._mc.sampler import SAMPLERS
from .._theory.params import SDEParams

BLOCKS = ("transformer", "attention", "mlp")
SUBLAYERS = {"transformer": "both", "attention": "attention", "mlp": "mlp"}
VARIANTS = ("shaped", "unshaped", "pre_ln", "no_centre", "no_identity", "no_sqrt_n")
DTYPES = ("float32", "float64")
MAX_SDE_SAVES = 200
MAX_SDE_STEPS = 10**7
"""More Euler steps than this per path is refused as a mistake (days of compute on one host)."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a finite-vs-SDE run depends on (the defaults are the quick setting).

    Arguments:
      m: tokens (>= 2; rho is the correlation of tokens 1 and 2).
      rho0, v0_scale: input covariance ``V0 = v0_scale ((1 - rho0) I + rho0 11^T)``.
      width, depth: the finite network's n and d; the SDE runs to ``T = depth / width``.
      gamma, tau0, c_plus, c_minus, block, activation: the shaped block (docs/model.md §1).
      samples, sde_paths: finite networks and SDE paths.
      dt: the SDE step (adjusted to divide each ``T``).
      sampler: finite sampler (``"auto"``: the fastest exact one).
      variants: extra finite networks at the same size (per-layer curves): unshaped, Pre-LN
        and the ablations (docs/model.md §2).
      gammas, tau0s: a gamma (x tau0) sweep of finite and SDE runs: densities, 95th
        percentiles and eigenvalue exit times (docs/stopping.md §4).
      sweep_widths: finite runs at other widths (depth = T * width) against the same SDE.
      convergence_widths: the finite-width study (docs/finite_width.md): finite networks at
        these widths, depth ``T * width`` (an integer), only their last layer kept.
      convergence_samples, convergence_budget: networks per convergence width:
        ``convergence_samples``, or ``convergence_budget // width`` where that is smaller
        (equal compute per width once the budget binds; 0: no budget).
      convergence_paths: SDE paths of the study, at each of three step sizes.
      convergence_steps: Euler steps of the study's finest SDE solve (a multiple of 4); it is
        also solved with 2x and 4x the step on the same Brownian paths.
      convergence_slope_paths: SDE paths (the first of the finest solve's) re-solved at each
        width with the shaped ReLU's finite-width drift factor (docs/finite_width.md §3);
        0 skips this prediction.
      chunk: samples or paths per stored chunk (resume granularity).
      stop_norm: blow-up threshold of both sides (docs/stopping.md).
      dtype: ``"float32"`` or ``"float64"``.
      seed: the run's seed; unit ``u`` uses ``fold_in(key(seed), crc32(u))``.
    """

    m: int = 3
    rho0: float = 0.2
    v0_scale: float = 1.0
    width: int = 64
    depth: int = 48
    gamma: float = 1 / math.sqrt(8)
    tau0: float = 1.0
    c_plus: float = 0.0
    c_minus: float = -1.0
    block: str = "transformer"
    activation: str = "softmax"
    samples: int = 2048
    sde_paths: int = 4096
    dt: float = 0.01
    sampler: str = "auto"
    variants: tuple = ()
    gammas: tuple = ()
    tau0s: tuple = ()
    sweep_widths: tuple = ()
    convergence_widths: tuple = ()
    convergence_samples: int = 65536
    convergence_budget: int = 0
    convergence_paths: int = 65536
    convergence_steps: int = 96
    convergence_slope_paths: int = 16384
    chunk: int = 1024
    stop_norm: float = 1e4
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        for name in ("m", "width", "depth", "samples", "sde_paths", "chunk"):
            check_int(name, getattr(self, name))
        check_int("m", self.m, lo=2)
        check_int("seed", self.seed, lo=0)
        lo = -1 / (self.m - 1)
        check_number("rho0", self.rho0, lo, 1)
        check_number("v0_scale", self.v0_scale)
        for g in (self.gamma, *self.gammas):
            check_number("gamma", g, 0, 1, hi_closed=True)
        for t in (self.tau0, *self.tau0s):
            check_number("tau0", t)
        check_real("c_plus", self.c_plus)
        check_real("c_minus", self.c_minus)
        if self.tau0s and not self.gammas:
            raise ValueError("tau0s needs gammas: it adds a gamma x tau0 stability grid")
        check_number("dt", self.dt, 0, self.T, hi_closed=True, hi_name="T")
        if self.T / self.dt > MAX_SDE_STEPS:
            raise ValueError(f"dt={self.dt:g} with T = depth / width = {self.T:g} gives {self.T / self.dt:.3g} SDE "
                             f"steps per path, above {MAX_SDE_STEPS:.0e}: raise dt or lower depth")
        check_choice("block", self.block, BLOCKS)
        check_choice("activation", self.activation, activations.names())
        check_choice("sampler", self.sampler, SAMPLERS)
        for v in self.variants:
            check_choice("variants", v, VARIANTS)
        for w in (self.width, *self.sweep_widths):
            check_int("width", w, lo=self.m + 1)
        self._check_convergence()
        check_number("stop_norm", self.stop_norm)
        check_choice("dtype", self.dtype, DTYPES)
        self.sde_params(self.gamma, self.tau0)  # the activation's expansion: ValueError if none

    def _check_convergence(self) -> None:
        for w in self.convergence_widths:
            check_int("convergence_widths", w, lo=self.m + 1)
            if abs(self.T * w - round(self.T * w)) > 1e-9 * w:
                raise ValueError(f"convergence_widths: width {w} gives depth T * width = {self.T * w:g} "
                                 f"(T = {self.T:g}), not an integer")
        check_int("convergence_samples", self.convergence_samples)
        check_int("convergence_budget", self.convergence_budget, lo=0)
        if any(self.convergence_budget and self.convergence_budget < w for w in self.convergence_widths):
            raise ValueError(f"convergence_budget={self.convergence_budget} must be 0 or at least the largest "
                             f"convergence width ({max(self.convergence_widths)})")
        check_int("convergence_paths", self.convergence_paths)
        if check_int("convergence_steps", self.convergence_steps, lo=4) % 4:
            raise ValueError(f"convergence_steps={self.convergence_steps} must be a multiple of 4 "
                             "(the SDE is also solved with 2x and 4x the step)")
        check_int("convergence_slope_paths", self.convergence_slope_paths, lo=0, hi=self.convergence_paths)

    def convergence_plan(self) -> list[tuple[int, int, int]]:
        """``(width, depth, samples)`` of each convergence width."""
        out = []
        for w in self.convergence_widths:
            budget = self.convergence_budget // w if self.convergence_budget else self.convergence_samples
            out.append((w, round(self.T * w), min(self.convergence_samples, budget)))
        return out

    @property
    def T(self) -> float:
        """``depth / width``."""
        return self.depth / self.width

    @property
    def V0(self) -> np.ndarray:
        """``v0_scale * ((1 - rho0) I + rho0 11^T)``."""
        base = (1 - self.rho0) * np.eye(self.m) + self.rho0 * np.ones((self.m, self.m))
        return (self.v0_scale * base).astype(self.dtype)

    @property
    def stability_tau0s(self) -> tuple:
        """The tau0 values of the gamma x tau0 stability grid: ``tau0`` first, then ``tau0s``."""
        return tuple(dict.fromkeys((self.tau0, *self.tau0s)))

    def block_config(self, variant: str, gamma: float,
                     tau0: Optional[float] = None) -> Callable[[int], model_config.BlockConfig]:
        """``width -> BlockConfig`` of a named variant of the paper's networks (docs/model.md §2;
        ``tau0`` defaults to the config's)."""
        common = dict(sublayers=SUBLAYERS[self.block], tau0=self.tau0 if tau0 is None else tau0)
        if variant == "pre_ln":
            return functools.partial(model_config.pre_ln_config, out_proj=False, **common)
        if variant == "unshaped":
            return functools.partial(model_config.unshaped_config, gamma=gamma, **common)
        return functools.partial(
            model_config.shaped_config, gamma=gamma, c_plus=self.c_plus, c_minus=self.c_minus,
            ablation=None if variant == "shaped" else variant, activation=self.activation, **common)

    def sde_params(self, gamma: float, tau0: float) -> SDEParams:
        """The SDE of the shaped network at ``gamma``, ``tau0`` (:meth:`SDEParams.from_block`)."""
        return SDEParams.from_block(self.block_config("shaped", gamma, tau0)(self.width))

    def sde_steps(self, T: float) -> int:
        """Euler steps of an SDE solve up to ``T`` (``T / dt`` rounded, at least one)."""
        return max(1, round(T / self.dt))

    def sde_grid(self, T: float) -> tuple[float, int]:
        """``(dt, save_every)``: ``dt`` adjusted to divide ``T``; at most ~200 saves."""
        steps = self.sde_steps(T)
        if steps <= MAX_SDE_SAVES:
            return T / steps, 1
        save_every = max(d for d in range(1, steps + 1) if steps % d == 0 and steps // d <= MAX_SDE_SAVES)
        return T / steps, save_every
