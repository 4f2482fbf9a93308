"""Compare the token covariance of finite shaped Transformers with their SDE (the main job).

    python scripts/sde_vs_finite.py                      # quick preset, under a minute on CPU
    python scripts/sde_vs_finite.py --preset fig1        # the paper's Fig. 1 at full size
    python scripts/sde_vs_finite.py --m 3 --width 200 --depth 150 --samples 4096

Writes to ``--out``: config.json (resolved config, versions, device), results.npz,
metrics.json (deterministic for a given config and seed), timings.json, and figures as PNG
and PDF. Finished chunks are kept under ``chunks/``: rerunning the same command after an
interruption resumes from them and gives the same result as an uninterrupted run.
Presets follow spec/sde.md section 6; explicit flags override a preset's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sde import compare  # noqa: E402
from sde.coefficients import correlation  # noqa: E402
from sde.finite import SAMPLERS, FiniteSampler, stop_samples  # noqa: E402
from sde.activation_constants import expansion  # noqa: E402
from sde.params import SDEParams  # noqa: E402
from sde.solve import solve  # noqa: E402
from shaped_attn import activations as shaped_activations  # noqa: E402
from shaped_attn import config as model_config  # noqa: E402
from shaped_attn.rundir import RunDir  # noqa: E402

BLOCKS = ("transformer", "attention", "mlp")
SUBLAYERS = {"transformer": "both", "attention": "attention", "mlp": "mlp"}
VARIANTS = ("shaped", "unshaped", "pre_ln", "no_centre", "no_identity", "no_sqrt_n")
EIG_BOUNDS = (1e-4, 1e4)  # paper Fig. 5: a path stops when an eigenvalue leaves this range


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. The CLI is generated from these fields."""

    preset: str = "quick"
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
    sampler: str = "auto"  # the fastest exact sampler: "reduced" without LayerNorm, else "gram"
    variants: tuple = ()
    gammas: tuple = ()
    tau0s: tuple = ()
    sweep_widths: tuple = ()
    chunk: int = 1024
    stop_norm: float = 1e4
    dtype: str = "float32"
    seed: int = 0
    out: str = "runs/sde_vs_finite"
    overwrite: bool = False

    @property
    def T(self) -> float:
        return self.depth / self.width

    @property
    def V0(self) -> np.ndarray:
        """``v0_scale * ((1 - rho0) I + rho0 11^T)``."""
        base = (1 - self.rho0) * np.eye(self.m) + self.rho0 * np.ones((self.m, self.m))
        return (self.v0_scale * base).astype(self.dtype)


PRESETS = {
    "quick": {},
    "fig1": dict(width=200, depth=150, gamma=1 / math.sqrt(8), samples=4096, sde_paths=16384,
                 dt=0.01, variants=("unshaped", "pre_ln"), sweep_widths=(25, 50, 100, 200, 400)),
    "fig3": dict(block="mlp", m=2, width=300, depth=100, gamma=0.25, samples=8192, sde_paths=16384,
                 dt=0.01 / 3, gammas=(0.1, 0.25, 0.5, 1.0)),
    "fig4": dict(width=300, depth=150, gamma=1 / math.sqrt(2), samples=8192, sde_paths=16384,
                 dt=0.01, variants=("no_centre", "no_identity", "no_sqrt_n")),
    "fig5": dict(v0_scale=100.0, width=200, depth=200, samples=100, sde_paths=1000, dt=0.005,
                 gamma=0.2, gammas=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7), tau0s=(0.5, 2.0), stop_norm=1e5),
}


# ------------------------------------------------------------------------ config and CLI


def validate(cfg: RunConfig) -> None:
    """One ValueError naming the first bad parameter, its value and the allowed range."""

    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    need(cfg.preset in PRESETS, f"preset={cfg.preset!r} is not one of {tuple(PRESETS)}")
    for name in ("m", "width", "depth", "samples", "sde_paths", "chunk"):
        v = getattr(cfg, name)
        need(isinstance(v, int) and v >= 1, f"{name}={v!r} must be an integer >= 1")
    for name in ("rho0", "v0_scale", "gamma", "tau0", "c_plus", "c_minus", "dt", "stop_norm"):
        need(math.isfinite(getattr(cfg, name)), f"{name}={getattr(cfg, name)!r} must be finite")
    need(cfg.m >= 2, f"m={cfg.m} must be >= 2 (rho is the correlation of tokens 1 and 2)")
    lo = -1 / (cfg.m - 1)
    need(lo < cfg.rho0 < 1, f"rho0={cfg.rho0} is outside ({lo:.6g}, 1) for m={cfg.m} (V0 must be PD)")
    need(cfg.v0_scale > 0, f"v0_scale={cfg.v0_scale} must be > 0")
    for g in (cfg.gamma, *cfg.gammas):
        need(0 < g <= 1, f"gamma={g} is outside (0, 1]")
    for t in (cfg.tau0, *cfg.tau0s):
        need(math.isfinite(t) and t > 0, f"tau0={t} must be > 0")
    need(not cfg.tau0s or cfg.gammas, "tau0s needs gammas: it adds a gamma x tau0 stability grid")
    need(0 < cfg.dt <= cfg.T, f"dt={cfg.dt} must lie in (0, T] with T = depth/width = {cfg.T:.6g}")
    need(cfg.block in BLOCKS, f"block={cfg.block!r} is not one of {BLOCKS}")
    need(isinstance(cfg.activation, str) and cfg.activation in shaped_activations.names(),
         f"activation={cfg.activation!r} is not a registered activation: {shaped_activations.names()}")
    if cfg.block != "mlp":  # the attention SDE needs a small-score expansion (a1, a2)
        try:
            expansion(cfg.activation)
        except ValueError as err:
            need(False, str(err))
    need(cfg.sampler in SAMPLERS, f"sampler={cfg.sampler!r} is not one of {SAMPLERS}")
    for v in cfg.variants:
        need(v in VARIANTS, f"variants: {v!r} is not one of {VARIANTS}")
    for w in (cfg.width, *cfg.sweep_widths):
        need(isinstance(w, int) and w > cfg.m, f"width={w!r} must be an integer > m = {cfg.m}")
    need(cfg.stop_norm > 0, f"stop_norm={cfg.stop_norm} must be > 0")
    need(cfg.dtype in ("float32", "float64"), f"dtype={cfg.dtype!r} is not one of ('float32', 'float64')")


def _parse_tuple(kind):
    def parse(text):
        return tuple(kind(x) for x in text.split(",") if x.strip()) if text else ()

    return parse


def build_parser() -> argparse.ArgumentParser:
    """``--flag`` for every RunConfig field; tuples are comma-separated lists."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=f"default {default}")
        elif isinstance(default, tuple):
            kind = float if f.name in ("gammas", "tau0s") else (int if f.name == "sweep_widths" else str)
            parser.add_argument(flag, type=_parse_tuple(kind), default=None, metavar="A,B,...",
                                help=f"comma-separated; default {','.join(map(str, default)) or 'none'}")
        else:
            choices = {"preset": tuple(PRESETS), "sampler": SAMPLERS, "block": BLOCKS}.get(f.name)
            hint = f"one of {', '.join(choices)}; " if choices else ""
            parser.add_argument(flag, type=type(default), default=None, help=f"{hint}default {default}")
    return parser


def resolve_config(argv=None) -> RunConfig:
    """Defaults, then the preset's values, then explicit flags."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    preset = args.get("preset", RunConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {tuple(PRESETS)}")
    values = {**PRESETS[preset], **args}
    if "out" not in args:
        values["out"] = f"runs/sde_vs_finite_{preset}"
    cfg = RunConfig(**values)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------ the work


def block_config(cfg: RunConfig, variant: str, gamma: float,
                 tau0: Optional[float] = None) -> Callable[[int], model_config.BlockConfig]:
    """``width -> BlockConfig`` of a named variant of the paper's networks (``tau0`` defaults
    to ``cfg.tau0``)."""
    common = dict(sublayers=SUBLAYERS[cfg.block], tau0=cfg.tau0 if tau0 is None else tau0)
    if variant == "pre_ln":
        return lambda n: model_config.pre_ln_config(n, out_proj=False, **common)
    if variant == "unshaped":
        return lambda n: model_config.unshaped_config(n, gamma, **common)
    ablation = None if variant == "shaped" else variant
    return lambda n: model_config.shaped_config(
        n, gamma, c_plus=cfg.c_plus, c_minus=cfg.c_minus, ablation=ablation,
        activation=cfg.activation, **common
    )


def sde_grid(cfg: RunConfig, T: float) -> tuple[float, int]:
    """``(dt, save_every)``: ``dt`` adjusted so that it divides ``T``; at most ~200 saves."""
    steps = max(1, round(T / cfg.dt))
    save_every = max(d for d in range(1, steps + 1) if steps % d == 0 and steps // d <= 200) if steps > 200 else 1
    return T / steps, save_every


class Experiment:
    """Runs the work units of a config chunk by chunk, resuming from ``run``'s chunks."""

    def __init__(self, cfg: RunConfig, run: RunDir, progress: bool = True):
        self.cfg, self.run, self.progress = cfg, run, progress
        self.key = jax.random.key(cfg.seed)
        self.timings: dict[str, float] = {}
        self._bar = None

    def _unit_key(self, name: str):
        return jax.random.fold_in(self.key, zlib.crc32(name.encode()))

    def _chunks(self, name: str, total: int, compute: Callable[[int, int, int], dict]) -> dict:
        """Concatenate the chunks of one unit, computing (and saving) only missing ones."""
        size = self.cfg.chunk
        parts = []
        start_time = time.perf_counter()
        for index, start in enumerate(range(0, total, size)):
            chunk = self.run.load_chunk(name, index)
            if chunk is None:
                chunk = compute(index, start, min(start + size, total))
                self.run.save_chunk(name, index, **chunk)
            parts.append(chunk)
            if self._bar is not None:
                self._bar.update(1)
        self.timings[name] = time.perf_counter() - start_time
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _tau_suffix(self, tau0: float) -> str:
        return "" if tau0 == self.cfg.tau0 else f"-tau{tau0:.6g}"

    def finite(self, variant: str, gamma: float, width: int, depth: int, tau0: float) -> dict:
        """Finite-network ``V`` (samples, depth + 1, m, m), stop flags and stop times ``t = l / n``."""
        name = f"finite-{variant}-g{gamma:.6g}-n{width}-d{depth}{self._tau_suffix(tau0)}"
        sampler: Optional[FiniteSampler] = None

        def compute(index, start, stop):
            nonlocal sampler
            if sampler is None:
                sampler = FiniteSampler(jnp.asarray(self.cfg.V0), block_config(self.cfg, variant, gamma, tau0),
                                        width=width, depth=depth, sampler=self.cfg.sampler)
            return {"V": sampler.chunk(self._unit_key(name), start, stop)}

        V = self._chunks(name, self.cfg.samples, compute)["V"]
        r = stop_samples(V, self.cfg.stop_norm)
        stop_t = np.where(r.stopped, r.stop_layer / width, np.inf)
        return {"V": r.V, "stopped": r.stopped, "stop_t": stop_t, "t": np.arange(depth + 1) / width}

    def sde(self, gamma: float, T: float, tau0: float) -> dict:
        """SDE paths ``V`` (paths, K, m, m) at times ``t`` with stop flags and stop times."""
        name = f"sde-{self.cfg.block}-g{gamma:.6g}-T{T:.6g}{self._tau_suffix(tau0)}"
        dt, save_every = sde_grid(self.cfg, T)
        params = SDEParams(gamma=gamma, tau0=tau0, c_plus=self.cfg.c_plus,
                           c_minus=self.cfg.c_minus, block=self.cfg.block,
                           activation=self.cfg.activation)

        def compute(index, start, stop):
            sol = solve(jnp.asarray(self.cfg.V0), params, T=T, dt=dt, num_paths=stop - start,
                        key=jax.random.fold_in(self._unit_key(name), index), save_every=save_every,
                        stop_norm=self.cfg.stop_norm)
            return {"V": np.asarray(sol.V), "stopped": np.asarray(sol.stopped),
                    "stop_t": np.asarray(sol.stop_time), "t": np.asarray(sol.ts)[None]}

        out = self._chunks(name, self.cfg.sde_paths, compute)
        return {"V": out["V"], "stopped": out["stopped"], "stop_t": out["stop_t"], "t": out["t"][0]}

    def plan(self) -> list[tuple]:
        """Work units, each a tuple ``("finite", variant, gamma, width, depth, tau0)`` or
        ``("sde", gamma, T, tau0)``, without repeats."""
        cfg, tau = self.cfg, self.cfg.tau0
        units = [("finite", "shaped", cfg.gamma, cfg.width, cfg.depth, tau), ("sde", cfg.gamma, cfg.T, tau)]
        units += [("finite", v, cfg.gamma, cfg.width, cfg.depth, tau) for v in cfg.variants]
        for t in stability_tau0s(cfg):
            for g in cfg.gammas:
                units += [("finite", "shaped", g, cfg.width, cfg.depth, t), ("sde", g, cfg.T, t)]
        for w in cfg.sweep_widths:
            units.append(("finite", "shaped", cfg.gamma, w, max(1, round(cfg.T * w)), tau))
        return list(dict.fromkeys(units))

    def execute(self) -> dict:
        from tqdm.auto import tqdm

        units = self.plan()
        per_unit = {"finite": -(-self.cfg.samples // self.cfg.chunk), "sde": -(-self.cfg.sde_paths // self.cfg.chunk)}
        total = sum(per_unit[u[0]] for u in units)
        out = {}
        with tqdm(total=total, desc="chunks", disable=not self.progress) as self._bar:
            for unit in units:
                out[unit] = self.finite(*unit[1:]) if unit[0] == "finite" else self.sde(*unit[1:])
        self._bar = None
        return out


# ------------------------------------------------------------------------------ analysis


def rho12(V: np.ndarray) -> np.ndarray:
    """Correlation of tokens 1 and 2, ``V_12 / sqrt(V_11 V_22)``, over leading axes."""
    return correlation(np.asarray(V))[..., 0, 1]


MIN_CURVE_SAMPLES = 10  # per-layer curves end where fewer samples are still alive


def alive_mask(res: dict) -> np.ndarray:
    """``(S, K)``: sample s is alive at save k if it has not stopped by then (blow-up, loss of
    PSD) and every variance is still a normal float (not collapsed to 0 or underflowed)."""
    tiny = np.finfo(res["V"].dtype).tiny
    variances = np.diagonal(res["V"], axis1=-2, axis2=-1)
    return (res["t"][None, :] < res["stop_t"][:, None]) & np.all(variances > tiny, axis=-1)


def stability_tau0s(cfg: RunConfig) -> tuple:
    """The tau0 values of the gamma x tau0 stability grid: ``cfg.tau0`` first, then ``tau0s``."""
    return tuple(dict.fromkeys((cfg.tau0, *cfg.tau0s)))


def eigen_exit_time(res: dict) -> np.ndarray:
    """Per sample, the first time an eigenvalue of ``V`` leaves ``EIG_BOUNDS`` (paper Fig. 5),
    or the time the sample was stopped (blow-up, loss of PSD, non-finite: all outside the
    bounds) if earlier; ``inf`` if neither happened by T."""
    eig = np.linalg.eigvalsh(res["V"].astype(np.float64))
    out = (eig.min(-1) < EIG_BOUNDS[0]) | (eig.max(-1) > EIG_BOUNDS[1])
    first = np.where(out.any(1), res["t"][out.argmax(1)], np.inf)
    return np.minimum(first, res["stop_t"])


def exit_summary(exit_t: np.ndarray, width: int) -> dict:
    """Fraction of samples whose eigenvalues left the bounds by T and the quartiles of the
    exit depth ``t n`` (``None`` where fewer samples than the quartile's level exited)."""
    q = np.quantile(exit_t, (0.25, 0.5, 0.75), method="inverted_cdf") * width  # no inf - inf
    return {"fraction": float(np.isfinite(exit_t).mean()),
            "depth_quartiles": [float(x) if math.isfinite(x) else None for x in q]}


def comparison_metrics(fin: dict, sde: dict) -> dict:
    """Agreement of rho_12 at the last layer over the samples that did not stop.

    When every sample of one side stopped there is nothing to compare: the statistics are
    ``None`` (JSON null), never NaN, and the stopped counts say why.
    """
    keep_f, keep_s = ~fin["stopped"], ~sde["stopped"]
    out = {
        "stopped_fraction": {"finite": compare.stopped_fraction(fin["stopped"]),
                             "sde": compare.stopped_fraction(sde["stopped"])},
        "stopped_count": {"finite": int(fin["stopped"].sum()), "sde": int(sde["stopped"].sum())},
        "quantile_levels": list(compare.QUANTILE_LEVELS),
    }
    if not (keep_f.any() and keep_s.any()):
        return out | dict.fromkeys(("ks_rho", "ks_pvalue_rho", "w1_rho", "quantiles_rho",
                                    "quantile_se_rho", "quantile_z_rho"))
    c = compare.compare_samples(rho12(fin["V"][keep_f, -1]), rho12(sde["V"][keep_s, -1]))
    return out | {
        "ks_rho": c.ks, "ks_pvalue_rho": c.ks_pvalue, "w1_rho": c.w1,
        "quantiles_rho": {"finite": c.quantiles_finite, "sde": c.quantiles_sde},
        "quantile_se_rho": {"finite": c.quantile_se_finite, "sde": c.quantile_se_sde},
        "quantile_z_rho": c.quantile_z,
    }


def analyse(cfg: RunConfig, out: dict) -> tuple[dict, dict]:
    """``(metrics, arrays)`` from the finished work units."""
    tau = cfg.tau0
    head_f = out[("finite", "shaped", cfg.gamma, cfg.width, cfg.depth, tau)]
    head_s = out[("sde", cfg.gamma, cfg.T, tau)]
    metrics = {"width": cfg.width, "depth": cfg.depth, "T": cfg.T, "num_samples": cfg.samples,
               "sde_paths": cfg.sde_paths, "dt": sde_grid(cfg, cfg.T)[0], "m": cfg.m,
               **comparison_metrics(head_f, head_s)}
    arrays = {"rho_finite": rho12(head_f["V"][:, -1]), "rho_sde": rho12(head_s["V"][:, -1]),
              "stopped_finite": head_f["stopped"], "stopped_sde": head_s["stopped"]}
    curves = {}
    for unit, res in out.items():
        if unit[0] == "finite" and unit[2:] == (cfg.gamma, cfg.width, cfg.depth, tau):
            curves[unit[1]] = res
    curves["sde"] = head_s
    metrics["curves"] = {}
    for name, res in curves.items():
        alive = alive_mask(res)
        counts = alive.sum(axis=0)
        short = np.flatnonzero(counts < min(MIN_CURVE_SAMPLES, alive.shape[0]))
        end = int(short[0]) if short.size else counts.size
        info = {"stopped_fraction": compare.stopped_fraction(~alive[:, -1]), "curve_end_t": None}
        metrics["curves"][name] = info
        if end < 2:
            continue
        rho = compare.band(rho12(res["V"][:, :end]), alive[:, :end])
        absv = compare.band(np.abs(res["V"][:, :end]).mean(axis=(-2, -1)), alive[:, :end])
        info["curve_end_t"] = float(res["t"][end - 1])
        if end == alive.shape[1]:
            info |= {"final_mean_rho": rho.mean[-1], "final_median_abs_V": absv.median[-1]}
        arrays |= {f"curve_{name}_t": res["t"][:end], f"curve_{name}_rho_mean": rho.mean,
                   f"curve_{name}_rho_se": rho.se, f"curve_{name}_rho_lo": rho.lo,
                   f"curve_{name}_rho_hi": rho.hi, f"curve_{name}_absV_median": absv.median,
                   f"curve_{name}_absV_lo": absv.lo, f"curve_{name}_absV_hi": absv.hi}
    if cfg.gammas:
        sweep = []
        for g in cfg.gammas:
            f, s = out[("finite", "shaped", g, cfg.width, cfg.depth, tau)], out[("sde", g, cfg.T, tau)]
            row = {"gamma": g, **comparison_metrics(f, s)}
            keep_f, keep_s = ~f["stopped"], ~s["stopped"]
            if row["ks_rho"] is not None:
                row["p95_abs_rho"] = {"finite": float(np.quantile(np.abs(rho12(f["V"][keep_f, -1])), 0.95)),
                                      "sde": float(np.quantile(np.abs(rho12(s["V"][keep_s, -1])), 0.95))}
                arrays[f"rho_finite_g{g:.6g}"] = rho12(f["V"][keep_f, -1])
                arrays[f"rho_sde_g{g:.6g}"] = rho12(s["V"][keep_s, -1])
            sweep.append(row)
        metrics["gamma_sweep"] = sweep
        metrics["stability"] = [
            {"gamma": g, "tau0": t,
             "input_score_std": float(np.diag(cfg.V0).max()) / (t * math.sqrt(cfg.width)),
             **{src: exit_summary(eigen_exit_time(out[unit]), cfg.width) for src, unit in
                (("finite", ("finite", "shaped", g, cfg.width, cfg.depth, t)), ("sde", ("sde", g, cfg.T, t)))}}
            for t in stability_tau0s(cfg) for g in cfg.gammas
        ]
    if cfg.sweep_widths:
        rows = []
        for w in cfg.sweep_widths:
            d = max(1, round(cfg.T * w))
            f = out[("finite", "shaped", cfg.gamma, w, d, tau)]
            c = comparison_metrics(f, head_s)
            if c["ks_rho"] is None:
                continue
            rows.append({"width": w, "depth": d, "T": d / w, "ks_rho": c["ks_rho"], "w1_rho": c["w1_rho"],
                         "stopped_fraction": c["stopped_fraction"]["finite"]})
        floor = _ks_floor(cfg.samples, cfg.sde_paths)
        resolved = [r for r in rows if r["ks_rho"] > RESOLVED_OVER_FLOOR * floor]
        sweep = {"rows": rows, "ks_noise_floor": floor, "resolved_widths": [r["width"] for r in resolved],
                 "ks_rate": None, "w1_rate": None}
        if len(resolved) >= 2:  # a rate fitted to sampling noise would mean nothing
            widths = np.array([r["width"] for r in resolved], float)
            sweep["ks_rate"], _ = compare.fit_power_law(widths, np.array([r["ks_rho"] for r in resolved]))
            sweep["w1_rate"], _ = compare.fit_power_law(widths, np.array([r["w1_rho"] for r in resolved]))
        metrics["width_sweep"] = sweep
    return metrics, arrays


RESOLVED_OVER_FLOOR = 2.0  # a width's KS counts as a measured bias above this multiple of the floor


def _ks_floor(n1: int, n2: int) -> float:
    """Mean KS statistic of two samples of one law (asymptotically 0.8687 sqrt(1/n1 + 1/n2))."""
    return 0.8687 * math.sqrt(1 / n1 + 1 / n2)


# ------------------------------------------------------------------------------- figures


def figures(cfg: RunConfig, metrics: dict, arrays: dict, run: RunDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stopped = metrics["stopped_count"]
    note = f"stopped: finite {stopped['finite']}/{cfg.samples}, SDE {stopped['sde']}/{cfg.sde_paths}"

    fig, ax = plt.subplots(figsize=(5, 3.6))
    bins = np.linspace(-1, 1, 61)
    rho_f, rho_s = arrays["rho_finite"][~arrays["stopped_finite"]], arrays["rho_sde"][~arrays["stopped_sde"]]
    if rho_f.size:
        ax.hist(rho_f, bins, density=True, alpha=0.5, label=f"finite n={cfg.width}, d={cfg.depth}")
    if rho_s.size:
        ax.hist(rho_s, bins, density=True, histtype="step", lw=2, label=f"SDE T={cfg.T:.3g}")
    title = ("every sample of one side stopped: no comparison" if metrics["ks_rho"] is None
             else f"KS {metrics['ks_rho']:.3f}, W1 {metrics['w1_rho']:.3f}")
    ax.set(xlabel=r"$\rho_{12}$ at the last layer", ylabel="density", title=title)
    ax.legend(fontsize=8)
    fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8)
    run.save_figure(fig, "density_rho")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fig.subplots_adjust(wspace=0.3)
    for name, info in metrics["curves"].items():
        if f"curve_{name}_t" not in arrays:
            continue
        t = arrays[f"curve_{name}_t"]
        label = f"{name} (stopped or collapsed by T: {info['stopped_fraction']:.1%})"
        line, = axes[0].plot(t, arrays[f"curve_{name}_rho_mean"], label=label, ls="--" if name == "sde" else "-")
        axes[0].fill_between(t, arrays[f"curve_{name}_rho_lo"], arrays[f"curve_{name}_rho_hi"],
                             color=line.get_color(), alpha=0.12)
        axes[1].plot(t, arrays[f"curve_{name}_absV_median"], label=name, ls="--" if name == "sde" else "-",
                     color=line.get_color())
        axes[1].fill_between(t, arrays[f"curve_{name}_absV_lo"], arrays[f"curve_{name}_absV_hi"],
                             color=line.get_color(), alpha=0.12)
    axes[0].set(xlabel="t = layer / width", ylabel=r"mean $\rho_{12}$ (band: 5-95 %)")
    axes[1].set(xlabel="t = layer / width", ylabel=r"median of mean$_{ab}|V_{ab}|$ (band: 5-95 %)", yscale="log")
    axes[0].legend(fontsize=7)
    fig.text(0.5, -0.02, f"per layer over the samples still alive there (curves end below {MIN_CURVE_SAMPLES}); "
             f"{note}", ha="center", va="top", fontsize=8)
    run.save_figure(fig, "mean_rho")
    plt.close(fig)

    rows = [r for r in metrics.get("gamma_sweep", []) if "p95_abs_rho" in r]
    if rows:  # paper Fig. 3: densities over gamma and the 95th percentile of |rho|
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for r in rows:
            g = r["gamma"]
            bars = axes[0].hist(arrays[f"rho_finite_g{g:.6g}"], bins, density=True, alpha=0.35,
                                label=f"γ={g:.3g}")[2]
            axes[0].hist(arrays[f"rho_sde_g{g:.6g}"], bins, density=True, histtype="step", lw=1.5,
                         color=bars[0].get_facecolor()[:3])
        axes[0].set(xlabel=r"$\rho_{12}$ at the last layer (fill: finite, line: SDE)", ylabel="density")
        axes[0].legend(fontsize=7)
        for src, ls in (("finite", "-o"), ("sde", "--s")):
            axes[1].plot([r["gamma"] for r in rows], [r["p95_abs_rho"][src] for r in rows], ls, label=src)
        axes[1].set(xlabel="γ", ylabel=r"95th percentile of $|\rho_{12}|$")
        axes[1].legend(fontsize=8)
        run.save_figure(fig, "gamma_sweep")
        plt.close(fig)

    if any(r[src]["fraction"] > 0 for r in metrics.get("stability", []) for src in ("finite", "sde")):
        stability_figure(cfg, metrics["stability"], run, plt)

    if metrics.get("width_sweep", {}).get("rows"):
        ws = metrics["width_sweep"]
        widths = [r["width"] for r in ws["rows"]]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        rate = {k: "not resolved" if ws[k] is None else f"rate {ws[k]:.2f}" for k in ("ks_rate", "w1_rate")}
        ax.loglog(widths, [r["ks_rho"] for r in ws["rows"]], "-o", label=f"KS ({rate['ks_rate']})")
        ax.loglog(widths, [r["w1_rho"] for r in ws["rows"]], "-s", label=f"W1 ({rate['w1_rate']})")
        ax.axhline(ws["ks_noise_floor"], color="gray", ls=":", label="KS sampling floor")
        ax.axhline(RESOLVED_OVER_FLOOR * ws["ks_noise_floor"], color="gray", ls="--", lw=0.8,
                   label=f"{RESOLVED_OVER_FLOOR:g} x floor: rates fitted above")
        ax.set(xlabel="width n (depth = T n)", ylabel=r"distance to the SDE ($\rho_{12}$ at T)")
        ax.legend(fontsize=8)
        run.save_figure(fig, "width_sweep")
        plt.close(fig)


def stability_figure(cfg: RunConfig, rows: list, run: RunDir, plt) -> None:
    """Paper Fig. 5: depth at which an eigenvalue of V leaves EIG_BOUNDS against gamma, per
    tau0 (median, bars: quartiles; samples still inside at the last layer count as beyond it),
    and the fraction of samples that left by the last layer."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bounds = f"[{EIG_BOUNDS[0]:g}, {EIG_BOUNDS[1]:g}]"
    for k, tau in enumerate(sorted(stability_tau0s(cfg))):
        sel = [r for r in rows if r["tau0"] == tau]
        for src, ls, marker in (("finite", "-", "o"), ("sde", "--", "s")):
            gs = np.array([r["gamma"] for r in sel])
            q = np.array([[np.nan if x is None else x for x in r[src]["depth_quartiles"]] for r in sel])
            label = f"{src}, τ0={tau:g}"
            axes[0].errorbar(gs, q[:, 1], yerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], ls=ls, marker=marker,
                             color=f"C{k}", capsize=2, label=label)
            axes[1].plot(gs, [r[src]["fraction"] for r in sel], ls=ls, marker=marker, color=f"C{k}", label=label)
    axes[0].axhline(cfg.depth, color="gray", ls=":", lw=1)
    axes[0].set(xlabel="γ", ylabel=f"layer where an eigenvalue leaves {bounds}", yscale="log")
    axes[0].set_title("median, bars: quartiles (none: beyond the last layer)", fontsize=9)
    axes[1].set(xlabel="γ", ylabel=f"fraction outside {bounds} by layer {cfg.depth}", ylim=(-0.03, 1.03))
    axes[1].legend(fontsize=7)
    score = max(r["input_score_std"] for r in rows)
    fig.text(0.5, -0.02, f"n = {cfg.width}, {cfg.samples} networks, {cfg.sde_paths} SDE paths; input score "
             f"std |Y/τ| up to {score:.2g} (the SDE assumes it is small: O(1/sqrt(n)))",
             ha="center", va="top", fontsize=8)
    run.save_figure(fig, "stability")
    plt.close(fig)


# ---------------------------------------------------------------------------------- main


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Execute (or resume) ``cfg`` and write every output; returns the metrics."""
    if cfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)  # float32 runs compute in V0's dtype either way
    # Reruns and resumed runs reuse compiled kernels (override with JAX_COMPILATION_CACHE_DIR).
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "shaped_attn" / "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    config = dataclasses.asdict(cfg)
    for transient in ("out", "overwrite"):
        config.pop(transient)
    rundir = RunDir(cfg.out, config, overwrite=cfg.overwrite)
    start = time.perf_counter()
    exp = Experiment(cfg, rundir, progress=progress)
    out = exp.execute()
    metrics, arrays = analyse(cfg, out)
    rundir.write_npz("results.npz", **arrays)
    rundir.write_json("metrics.json", metrics)
    figures(cfg, metrics, arrays, rundir)
    rundir.write_json("timings.json", {"units": exp.timings, "total_s": time.perf_counter() - start})
    return metrics


def main(argv=None) -> int:
    try:
        cfg = resolve_config(argv)
        metrics = run(cfg)
    except ValueError as err:
        print(f"sde_vs_finite: error: {err}", file=sys.stderr)
        return 2
    stopped = metrics["stopped_fraction"]
    if metrics["ks_rho"] is None:
        print(f"no comparison: every sample of one side stopped (finite {stopped['finite']:.0%}, "
              f"SDE {stopped['sde']:.0%}); outputs in {cfg.out}")
        return 0
    q = metrics["quantiles_rho"]
    print(f"KS(rho) = {metrics['ks_rho']:.4f} (p = {metrics['ks_pvalue_rho']:.3g}), "
          f"W1 = {metrics['w1_rho']:.4f}, stopped finite {metrics['stopped_fraction']['finite']:.2%}, "
          f"SDE {metrics['stopped_fraction']['sde']:.2%}")
    print("quantiles 5/25/50/75/95 %: finite " + " ".join(f"{x:+.3f}" for x in q["finite"])
          + " | SDE " + " ".join(f"{x:+.3f}" for x in q["sde"]))
    ws = metrics.get("width_sweep")
    if ws and ws["ks_rate"] is not None:
        print(f"width sweep: KS ~ n^{ws['ks_rate']:.2f}, W1 ~ n^{ws['w1_rate']:.2f} (fitted on widths "
              f"{ws['resolved_widths']}, KS above {RESOLVED_OVER_FLOOR:g}x its sampling floor)")
    elif ws:
        print(f"width sweep: every KS within {RESOLVED_OVER_FLOOR:g}x its sampling floor "
              f"{ws['ks_noise_floor']:.3g}: the finite-width bias is below what these sample sizes resolve")
    print(f"outputs in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
