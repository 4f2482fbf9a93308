"""Compare the token covariance of finite shaped Transformers with their SDE (the main job).

    python scripts/sde_vs_finite.py                      # quick preset, under a minute on CPU
    python scripts/sde_vs_finite.py --preset fig1        # the paper's Fig. 1 at full size
    python scripts/sde_vs_finite.py --preset widths       # finite-width rates, about 10 min on 2 cores
    python scripts/sde_vs_finite.py --m 3 --width 200 --depth 150 --samples 4096
    python scripts/sde_vs_finite.py --coordinator 10.0.0.1:4321 --num-processes 2 --process-id 0

A thin CLI over :func:`sde.run_experiment`: flags (one per field of
:class:`sde.ExperimentConfig`; lists as space-separated values), presets (docs/experiments.md
§1; explicit flags override a preset's values) and figures. Writes to ``--out``: config.json,
results.npz, metrics.json (deterministic for a given config and seed), timings.json, and
figures as PNG and PDF. Finished chunks are kept under ``chunks/``: rerunning the same command
after an interruption resumes from them and gives the same result. Several processes (hosts)
share one run through ``jax.distributed`` (docs/experiments.md §4): each computes a share of
the samples and paths, process 0 alone writes ``--out``, and the outputs equal a
single-process run's. A run too large for the memory, with too many SDE steps, or an
unwritable ``--out`` is refused before any work (docs/experiments.md §5). Exit codes: 2 for bad
input, 130 for Ctrl-C (rerun to resume).
"""

from __future__ import annotations

import math
import sys

import numpy as np

import _common
import sde
from sde._helpers.processes import agree

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
    # docs/finite_width.md §7: Fig. 1 setting; about 10 min on 2 CPU cores
    "widths": dict(convergence_widths=(4, 8, 12, 16, 24, 32, 48, 64), convergence_samples=1_000_000,
                   convergence_budget=6_000_000, convergence_paths=393_216, convergence_steps=96,
                   convergence_slope_paths=65_536, chunk=16_384),
}
LIST_TYPES = {"variants": str, "gammas": float, "tau0s": float, "sweep_widths": int, "convergence_widths": int}


def build_parser() -> _common.ArgumentParser:
    parser = _common.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick", choices=tuple(PRESETS), help="default quick")
    parser.add_argument("--out", default=None, help="default runs/sde_vs_finite_<preset>")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out holding another config")
    _common.add_config_flags(parser, sde.ExperimentConfig, element_types=LIST_TYPES)
    group = parser.add_argument_group(
        "several processes", "all three, or none: JAX then detects a Cloud TPU, SLURM or MPI cluster "
        "itself, else the run is single-process (docs/experiments.md §4)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (any free port)")
    group.add_argument("--num-processes", type=int, help="processes in the run (1: single-process)")
    group.add_argument("--process-id", type=int, help="this process, 0 .. num-processes - 1")
    return parser


def _resolved(args) -> tuple[sde.ExperimentConfig, str, bool]:
    cfg = sde.ExperimentConfig(**_common.config_values(args, sde.ExperimentConfig, PRESETS[args.preset]))
    return cfg, args.out or f"runs/sde_vs_finite_{args.preset}", args.overwrite


def resolve(argv=None) -> tuple[sde.ExperimentConfig, str, bool]:
    """``(config, out, overwrite)``: defaults, then the preset's values, then explicit flags."""
    return _resolved(build_parser().parse_args(argv))


def prepare(argv=None):
    """Join the other processes (before any JAX work), check the config and the resources,
    open ``--out`` (process 0; other processes get None)."""
    args = build_parser().parse_args(argv)
    sde.join_processes(args.coordinator, args.num_processes, args.process_id)
    cfg, out, overwrite = _resolved(args)
    if cfg.dtype == "float64":
        import jax  # noqa: PLC0415

        jax.config.update("jax_enable_x64", True)
    sde.check_resources(cfg)
    from sde._experiment.run import OUTPUTS  # noqa: PLC0415  (loads the solvers: not for --help)

    return cfg, agree(lambda: _common.open_run(out, cfg, overwrite, OUTPUTS))


def execute(cfg: sde.ExperimentConfig, run) -> int:
    _common.use_compile_cache()
    _common.import_in_background("scipy.stats", figures=run is not None)  # used after the work
    result = sde.run_experiment(cfg, run, progress=True)
    if run is not None:  # the writing process
        figures(result, run)
        report(result)
    return 0


# ------------------------------------------------------------------------------- figures


def figures(result: sde.ExperimentResult, run) -> None:
    """The density of rho_12 at T, per-layer curves, and the sweeps' figures."""
    from sde._experiment.analysis import MIN_CURVE_SAMPLES, RESOLVED_OVER_FLOOR  # noqa: PLC0415

    plt = _common.pyplot()
    cfg, metrics, arrays = result.config, result.metrics, result.arrays
    stopped = metrics["stopped_count"]
    note = f"stopped: finite {stopped['finite']}/{cfg.samples}, SDE {stopped['sde']}/{cfg.sde_paths}"
    bins = np.linspace(-1, 1, 61)

    fig, ax = plt.subplots(figsize=(5, 3.6))
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

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fig.subplots_adjust(wspace=0.3)
    for name, info in metrics["curves"].items():
        if f"curve_{name}_t" not in arrays:
            continue
        t, ls = arrays[f"curve_{name}_t"], "--" if name == "sde" else "-"
        label = f"{name} (stopped or collapsed by T: {info['stopped_fraction']:.1%})"
        line, = axes[0].plot(t, arrays[f"curve_{name}_rho_mean"], label=label, ls=ls)
        for ax, key in ((axes[0], "rho"), (axes[1], "absV")):
            ax.fill_between(t, arrays[f"curve_{name}_{key}_lo"], arrays[f"curve_{name}_{key}_hi"],
                            color=line.get_color(), alpha=0.12)
        axes[1].plot(t, arrays[f"curve_{name}_absV_median"], label=name, ls=ls, color=line.get_color())
    axes[0].set(xlabel="t = layer / width", ylabel=r"mean $\rho_{12}$ (band: 5-95 %)")
    axes[1].set(xlabel="t = layer / width", ylabel=r"median of mean$_{ab}|V_{ab}|$ (band: 5-95 %)", yscale="log")
    axes[0].legend(fontsize=7)
    fig.text(0.5, -0.02, f"per layer over the samples still alive there (curves end below "
             f"{MIN_CURVE_SAMPLES}); {note}", ha="center", va="top", fontsize=8)
    run.save_figure(fig, "mean_rho")

    rows = [r for r in metrics.get("gamma_sweep", []) if "p95_abs_rho" in r]
    if rows:  # paper Fig. 3: densities over gamma and the 95th percentile of |rho|
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for r in rows:
            g = r["gamma"]
            bars = axes[0].hist(arrays[f"rho_finite_g{g:.6g}"], bins, density=True, alpha=0.35, label=f"γ={g:.3g}")[2]
            axes[0].hist(arrays[f"rho_sde_g{g:.6g}"], bins, density=True, histtype="step", lw=1.5,
                         color=bars[0].get_facecolor()[:3])
        axes[0].set(xlabel=r"$\rho_{12}$ at the last layer (fill: finite, line: SDE)", ylabel="density")
        axes[0].legend(fontsize=7)
        for src, ls in (("finite", "-o"), ("sde", "--s")):
            axes[1].plot([r["gamma"] for r in rows], [r["p95_abs_rho"][src] for r in rows], ls, label=src)
        axes[1].set(xlabel="γ", ylabel=r"95th percentile of $|\rho_{12}|$")
        axes[1].legend(fontsize=8)
        run.save_figure(fig, "gamma_sweep")

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

    if "width_convergence" in metrics:
        convergence_figure(metrics["width_convergence"], run, plt)


def convergence_figure(wc: dict, run, plt) -> None:
    """|finite - SDE| of each moment against n, log-log (circles: positive, triangles: negative;
    filled: fitted; bars: 1 SE), the fitted C n^-p, the ReLU-factor term the theory predicts at
    order n^-1/2, the bias without it (crosses) and the SDE's remaining time-step bias
    (docs/finite_width.md §7)."""
    from sde._experiment.convergence import STATISTICS  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    fig.subplots_adjust(hspace=0.35, wspace=0.3)
    n = np.asarray(wc["widths"], float)
    for ax, (name, label) in zip(axes.flat, STATISTICS.items()):
        row = wc["statistics"][name]
        for i, (b, se) in enumerate(zip(row["bias"], row["bias_se"])):
            if b is not None:
                ax.errorbar(n[i], abs(b), yerr=[[min(se, 0.9 * abs(b))], [se]], fmt="o" if b > 0 else "v",
                            color="C0", mfc="C0" if n[i] in row["fit_widths"] else "none", capsize=2)
        ax.plot([], [], "o", color="C0", label="|finite - SDE| (filled: fitted)")
        title = f"{label}: no rate fitted" if row["rate"] is None else \
            f"{label}: p = {row['rate']:.2f} ± {row['rate_se']:.2f}"
        if row["rate"] is not None:
            span = np.asarray(row["fit_widths"], float)
            ax.plot(span, row["prefactor"] * span ** -row["rate"], "C0-", lw=1, label="C n^-p")
        if row.get("relu_slope_term"):
            ax.plot(n, np.abs(row["relu_slope_term"]), "C1--", lw=1, label="ReLU factor term (theory, n^-1/2)")
            rest = row["without_slope_term"]
            ax.plot(n, [np.nan if b is None else abs(b) for b in rest["bias"]], "x", color="gray", ms=5,
                    label="|bias - ReLU term|" + ("" if rest["rate"] is None else f": p = {rest['rate']:.2f}"))
        if row["sde_dt_bias"] is not None:
            ax.axhline(abs(row["sde_dt_bias"]), color="gray", ls=":", lw=1, label="SDE remaining dt bias")
        ax.set(xscale="log", yscale="log", xlabel="width n (depth = T n)", ylabel=f"|bias| of {label}")
        ax.set_xticks(n, [str(int(w)) for w in n])
        ax.set_xticks([], minor=True)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.text(0.5, 0.01, f"circles: bias > 0, triangles: bias < 0; networks per width {wc['samples_per_width']}; "
             f"{wc['sde_paths']} SDE paths at {wc['sde_steps']} steps", ha="center", fontsize=8)
    run.save_figure(fig, "width_convergence")


def stability_figure(cfg: sde.ExperimentConfig, rows: list, run, plt) -> None:
    """Paper Fig. 5: the layer where an eigenvalue of V leaves EIG_BOUNDS against gamma, per
    tau0 (median, bars: quartiles), and the fraction of samples that left by the last layer."""
    from sde._experiment.analysis import EIG_BOUNDS  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bounds = f"[{EIG_BOUNDS[0]:g}, {EIG_BOUNDS[1]:g}]"
    for k, tau in enumerate(sorted(cfg.stability_tau0s)):
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


# -------------------------------------------------------------------------------- report


def report(result: sde.ExperimentResult) -> None:
    """The headline numbers, one line each."""
    from sde._experiment.analysis import RESOLVED_OVER_FLOOR  # noqa: PLC0415
    from sde._experiment.convergence import STATISTICS  # noqa: PLC0415

    metrics, out = result.metrics, result.path
    stopped = metrics["stopped_fraction"]
    if metrics["ks_rho"] is None:
        print(f"no comparison: every sample of one side stopped (finite {stopped['finite']:.0%}, "
              f"SDE {stopped['sde']:.0%}); outputs in {out}")
        return
    q = metrics["quantiles_rho"]
    print(f"KS(rho) = {metrics['ks_rho']:.4f} (p = {metrics['ks_pvalue_rho']:.3g}), W1 = {metrics['w1_rho']:.4f}, "
          f"stopped finite {stopped['finite']:.2%}, SDE {stopped['sde']:.2%}")
    print("quantiles 5/25/50/75/95 %: finite " + " ".join(f"{x:+.3f}" for x in q["finite"])
          + " | SDE " + " ".join(f"{x:+.3f}" for x in q["sde"]))
    ws = metrics.get("width_sweep")
    if ws and ws["ks_rate"] is not None:
        print(f"width sweep: KS ~ n^{ws['ks_rate']:.2f}, W1 ~ n^{ws['w1_rate']:.2f} (fitted on widths "
              f"{ws['resolved_widths']}, KS above {RESOLVED_OVER_FLOOR:g}x its sampling floor)")
    elif ws:
        print(f"width sweep: every KS within {RESOLVED_OVER_FLOOR:g}x its sampling floor "
              f"{ws['ks_noise_floor']:.3g}: the finite-width bias is below what these sample sizes resolve")
    wc = metrics.get("width_convergence", {})
    for name, row in wc.get("statistics", {}).items():
        fit = row["no_rate"] if row["rate"] is None else \
            f"|bias| = {row['prefactor']:.3g} n^-({row['rate']:.2f} ± {row['rate_se']:.2f})"
        b0 = "none" if row["bias"][0] is None else f"{row['bias'][0]:+.4g} ± {row['bias_se'][0]:.2g}"
        dt = "none" if row["sde_dt_bias"] is None else f"{row['sde_dt_bias']:+.2g}"
        print(f"{STATISTICS[name]}: bias at n = {wc['widths'][0]}: {b0}; {fit}; SDE remaining dt bias {dt}")
    print(f"outputs in {out}")


def main(argv=None) -> int:
    return _common.cli("sde_vs_finite", prepare, execute, argv)


if __name__ == "__main__":
    sys.exit(main())
