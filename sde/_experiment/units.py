"""The work units of an experiment and their sizes (docs/experiments.md §1).

A unit is one finite ensemble ``("finite", variant, gamma, width, depth, tau0)`` or one SDE
ensemble ``("sde", gamma, T, tau0)``; the finite-width study (docs/finite_width.md §7) adds
``("conv_finite", width, depth, samples)`` and ``("conv_sde", steps, width)``, which keep only
the last state. The runner computes them and the resource guards size them from this one list.
"""

from __future__ import annotations

from .config import ExperimentConfig
from .convergence import STEP_MULTIPLES, slope_width


def plan(cfg: ExperimentConfig) -> list[tuple]:
    """The work units of ``cfg``, without repeats, the headline pair first."""
    tau = cfg.tau0
    units = [("finite", "shaped", cfg.gamma, cfg.width, cfg.depth, tau), ("sde", cfg.gamma, cfg.T, tau)]
    units += [("finite", v, cfg.gamma, cfg.width, cfg.depth, tau) for v in cfg.variants]
    for t in cfg.stability_tau0s:
        for g in cfg.gammas:
            units += [("finite", "shaped", g, cfg.width, cfg.depth, t), ("sde", g, cfg.T, t)]
    for w in cfg.sweep_widths:
        units.append(("finite", "shaped", cfg.gamma, w, max(1, round(cfg.T * w)), tau))
    if cfg.convergence_widths:
        units += [("conv_sde", cfg.convergence_steps // k, 0) for k in STEP_MULTIPLES]
        if slope_width(cfg) is not None:
            units.append(("conv_sde", cfg.convergence_steps, slope_width(cfg)))
        units += [("conv_finite", *row) for row in cfg.convergence_plan()]
    return list(dict.fromkeys(units))


def unit_name(cfg: ExperimentConfig, unit: tuple) -> str:
    """The file-name-safe identity of a unit (also the source of its key)."""
    if unit[0] == "conv_finite":
        return f"conv-finite-n{unit[1]}-d{unit[2]}"
    if unit[0] == "conv_sde":
        return f"conv-sde-s{unit[1]}" + (f"-relu-n{unit[2]}" if unit[2] else "")
    tau = "" if unit[-1] == cfg.tau0 else f"-tau{unit[-1]:.6g}"
    if unit[0] == "finite":
        _, variant, gamma, width, depth, _ = unit
        return f"finite-{variant}-g{gamma:.6g}-n{width}-d{depth}{tau}"
    _, gamma, T, _ = unit
    return f"sde-{cfg.block}-g{gamma:.6g}-T{T:.6g}{tau}"


def unit_count(cfg: ExperimentConfig, unit: tuple) -> int:
    """Samples or paths of a unit."""
    if unit[0] == "conv_finite":
        return unit[3]
    if unit[0] == "conv_sde":
        return cfg.convergence_slope_paths if unit[2] else cfg.convergence_paths
    return cfg.samples if unit[0] == "finite" else cfg.sde_paths


def unit_states(cfg: ExperimentConfig, unit: tuple) -> int:
    """The m x m states a unit keeps per sample or path (every layer, every save, or the last)."""
    if unit[0] == "finite":
        return unit[4] + 1
    if unit[0] == "sde":
        return cfg.sde_steps(unit[2]) // cfg.sde_grid(unit[2])[1] + 1
    return 1
