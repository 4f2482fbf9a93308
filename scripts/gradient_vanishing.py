"""How each attention activation's gradient behaves as score statistics leave the normal.

Part 1 (Wang, Liu, Liu, arXiv 2108.07153): softmax's Jacobian ``diag(p) - p p^T`` vanishes
when a row's scores are spread out, heavy-tailed or dominated by a few large values; the
periodic maps are claimed to keep a non-vanishing gradient. For every registered activation
we sample rows of N scores from

* a normal with std in a sweep (0.25 ... 32),
* a Student t (scale 1) with df in {1 (Cauchy), 1.5, 2, 3, 5, 10, 30},
* a standard normal with 1 or 3 keys per row set to +magnitude (2 ... 50),

and record the Frobenius norm of the Jacobian of each row (median and 10/90% quantiles),
its spectral norm, and the *saturation fraction*: rows whose Jacobian Frobenius norm is below
5% of softmax's at equal scores (``0.05 sqrt(N-1)/N``). The Jacobian is taken with respect to
the raw scores; the ``norm_`` variants standardise each row first, which makes them invariant
to the score scale and their raw-score Jacobian decay like 1/std (the findings table also
gives ``median x std``, constant when that is the only effect).

Part 2 (Noci et al., arXiv 2306.17759, Fig. 2): per-layer gradient norms at initialisation of
the query and value weights for shaped, Pre-LN and Post-LN stacks across depth, on Gaussian
tokens with a cross-entropy loss on a fixed random readout (mean and sd over init seeds).

    python scripts/gradient_vanishing.py --quick --out runs/gradvanish

Writes OUT/results.json (``non_finite_values``: how many NaN/inf were written as null),
OUT/timings.json, OUT/jacobian_norms.png, OUT/saturation.png, OUT/init_gradients.png. Every
flag is checked before any work (a bad one: one line, exit code 2). Each finished unit (one
activation at one N; one architecture's gradients) is kept as OUT/chunks/{unit}.json;
rerunning the same command after an interruption computes only the missing units and writes
the same results.json as an uninterrupted run. Keys come from ``--seed`` and the unit's
setting: every activation sees the same scores at a given N, every architecture the same
tokens (common random numbers). An OUT holding another config is refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shaped_attn import activations, diagnostics, memory, training  # noqa: E402
from shaped_attn.config import post_ln_config, pre_ln_config, shaped_config  # noqa: E402
from shaped_attn.models import Stack  # noqa: E402


@dataclasses.dataclass(frozen=True)
class VanishConfig:
    activations: tuple[str, ...] = ()  # every registered one (resolved by parse_args)
    n_keys: tuple[int, ...] = (16, 64)
    n_rows: int = 1024
    stds: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    dfs: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
    outlier_counts: tuple[int, ...] = (1, 3)
    magnitudes: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 50.0)
    seed: int = 0
    # Part 2: gradient norms at initialisation
    grad_depth: int = 24
    grad_width: int = 64
    grad_tokens: int = 16
    grad_batch: int = 8
    grad_seeds: int = 5
    shaped_gamma: float = 1 / math.sqrt(8)
    shaped_tau0: float = 1.0


QUICK = dict(n_keys=(16,), n_rows=256, grad_depth=12, grad_width=32, grad_seeds=3)


def settings(cfg: VanishConfig):
    """The score distributions, grouped by sweep."""
    return {
        "normal_std": [{"kind": "normal", "std": s} for s in cfg.stds],
        "student_t_df": [{"kind": "student_t", "df": d} for d in cfg.dfs],
        **{
            f"outliers_{k}": [{"kind": "outliers", "n_outliers": k, "magnitude": m} for m in cfg.magnitudes]
            for k in cfg.outlier_counts
        },
    }


def jacobian_unit(cfg: VanishConfig, name: str, n: int) -> dict:
    """Every sweep of one activation at ``n`` keys (the key depends on ``n`` only)."""
    key = _common.unit_key(cfg.seed, f"jacobian-N{n}")
    fn = activations.get(name)
    return {sweep: diagnostics.jacobian_sweep(fn, key, sets, n_rows=cfg.n_rows, n_keys=n)
            for sweep, sets in settings(cfg).items()}


# ------------------------------------------------------------------- part 2: Fig. 2

KINDS = ("shaped", "pre_ln", "post_ln")


def _block(kind: str, cfg: VanishConfig):
    if kind == "shaped":
        return shaped_config(cfg.grad_width, cfg.shaped_gamma, tau0=cfg.shaped_tau0,
                             param_dtype="float32")
    if kind == "pre_ln":
        return pre_ln_config(cfg.grad_width, num_heads=1)
    return post_ln_config(cfg.grad_width, num_heads=1)


def _loss(model, x, head, y):
    """Cross-entropy of a fixed random linear head on the mean output token."""
    return training.cross_entropy(model(x).mean(axis=-2) @ head, y)


def init_gradient_unit(cfg: VanishConfig, kind: str) -> dict:
    """Per-layer gradient norms at initialisation of one architecture over ``grad_seeds``
    seeds (seed i: ``fold_in(unit_key(seed, "init_gradients"), i)`` for every architecture)."""
    key = _common.unit_key(cfg.seed, "init_gradients")
    norms = {"query": [], "value": []}
    for seed in range(cfg.grad_seeds):
        k_model, k_x, k_head, k_y = jax.random.split(jax.random.fold_in(key, seed), 4)
        stack = Stack(_block(kind, cfg), cfg.grad_depth, rngs=nnx.Rngs(params=k_model))
        x = jax.random.normal(k_x, (cfg.grad_batch, cfg.grad_tokens, cfg.grad_width))
        head = jax.random.normal(k_head, (cfg.grad_width, 10)) / math.sqrt(cfg.grad_width)
        y = jax.random.randint(k_y, (cfg.grad_batch,), 0, 10)
        g = diagnostics.init_gradient_norms(stack, _loss, ("query", "value"), inputs=(x, head, y))
        for k in norms:
            norms[k].append(g[k])
    return {
        k: {"mean": np.mean(v, 0).tolist(),
            "sd": np.std(v, 0, ddof=1).tolist() if len(v) > 1 else [0.0] * len(v[0]),
            "min": np.min(v, 0).tolist(), "max": np.max(v, 0).tolist(),
            "per_seed": np.asarray(v).tolist()}
        for k, v in norms.items()
    }


def units(cfg: VanishConfig) -> dict[str, tuple]:
    """``{chunk name: (function, *arguments)}`` of every work unit."""
    jac = {f"jacobian-{a}-N{n}": (jacobian_unit, cfg, a, n) for n in cfg.n_keys for a in cfg.activations}
    return {**jac, **{f"init_gradients-{kind}": (init_gradient_unit, cfg, kind) for kind in KINDS}}


# ------------------------------------------------------------------------ findings


def findings(jac, cfg: VanishConfig):
    """Short, computed statements per activation (largest N)."""
    n = max(cfg.n_keys)
    rows = []
    for name, sweeps in jac[n].items():
        std = {r["std"]: r for r in sweeps["normal_std"]}
        df = {r["df"]: r for r in sweeps["student_t_df"]}
        k1 = min(cfg.outlier_counts)
        out1 = {r["magnitude"]: r for r in sweeps[f"outliers_{k1}"]}
        base = std.get(1.0, sweeps["normal_std"][0])["frobenius_median"]
        hi_std = std[max(std)]
        row = {
            "activation": name,
            "median_frob_std1": base,
            f"median_frob_std{max(std):g}": hi_std["frobenius_median"],
            # x std: constant when the decay is only the 1/std of the row standardisation
            f"median_frob_x_std_std{max(std):g}": _float(hi_std["frobenius_median"]) * max(std),
            f"saturation_std{max(std):g}": hi_std["saturation"],
            f"median_frob_t_df{min(df):g}": df[min(df)]["frobenius_median"],
            f"saturation_t_df{min(df):g}": df[min(df)]["saturation"],
            f"median_frob_outlier{max(out1):g}": out1[max(out1)]["frobenius_median"],
            f"saturation_outlier{max(out1):g}": out1[max(out1)]["saturation"],
            "max_abs_weight_any": max((r["max_abs_weight"] for s in sweeps.values() for r in s
                                       if r["max_abs_weight"] is not None), default=math.nan),
        }
        rows.append(row)
    return rows


def figures(jac, grads, cfg: VanishConfig, out: Path):
    plt = _common.pyplot()
    n = max(cfg.n_keys)
    names = list(jac[n])
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
    styles = {nm: ("--" if nm.startswith("norm_") else "-") for nm in names}
    sweeps = list(settings(cfg))
    xkeys = {"normal_std": "std", "student_t_df": "df"}
    paths = []
    for metric, fname, ylabel in (
        ("frobenius_median", "jacobian_norms.png", "median ||dw/ds||_F per row"),
        ("saturation", "saturation.png", "saturation fraction"),
    ):
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 4.2), sharey=True)
        for ax, sweep in zip(axes, sweeps):
            xk = xkeys.get(sweep, "magnitude")
            for nm, c in zip(names, colors):
                recs = jac[n][nm][sweep]
                x = [r[xk] for r in recs]
                y = [_float(r[metric]) for r in recs]
                ax.plot(x, y, styles[nm], color=c, label=nm, marker="o", ms=3, lw=1.2)
                if metric == "frobenius_median":
                    ax.fill_between(x, [_float(r["frobenius_q10"]) for r in recs],
                                    [_float(r["frobenius_q90"]) for r in recs], color=c, alpha=0.06)
            ax.set_xscale("log")
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel({"std": "normal std", "df": "Student t df (scale 1)"}.get(xk, f"outlier magnitude ({sweep.split('_')[1]} per row)"))
            if metric == "frobenius_median":
                ax.set_yscale("log")
                ax.axhline(diagnostics.default_saturation_threshold(n), color="k", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[-1].legend(fontsize=6, ncol=2)
        fig.suptitle(f"Activation Jacobian vs score distribution, N = {n} keys (dotted: saturation threshold)")
        paths.append(_common.save_figure(fig, out / fname))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, which in zip(axes, ("query", "value")):
        for kind, c in zip(grads, ("C0", "C1", "C2")):
            m = np.asarray(grads[kind][which]["mean"], float)
            layers = np.arange(1, len(m) + 1)
            ax.plot(layers, m, "o-", color=c, label=kind, ms=3)
            ax.fill_between(layers, np.asarray(grads[kind][which]["min"], float),
                            np.asarray(grads[kind][which]["max"], float), color=c, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"||dL/dW_{which[0].upper()}||_F at init")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Gradient norms at initialisation, depth {cfg.grad_depth}, width {cfg.grad_width} "
                 f"(mean over {cfg.grad_seeds} seeds, band min-max)")
    fig.tight_layout()
    paths.append(_common.save_figure(fig, out / "init_gradients.png"))
    return paths


def parse_args(argv=None):
    p = _common.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/gradient_vanishing")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run with a different config in --out")
    p.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    p.add_argument("--activations", nargs="+", default=None,
                   help="activations to sweep (default: every registered one)")
    _common.add_config_flags(p, VanishConfig, skip=("activations",))
    args = p.parse_args(argv)
    values = _common.config_values(args, VanishConfig, QUICK if args.quick else {})
    values.setdefault("activations", tuple(activations.names()))
    return args, VanishConfig(**values)


def validate(cfg: VanishConfig) -> None:
    """Every flag on its own, then the block configs of part 2."""
    _common.check_each("activations", cfg.activations, _common.check_activation)
    _common.check_each("n_keys", cfg.n_keys, _common.check_int, lo=2)
    for name in ("stds", "dfs", "magnitudes"):
        _common.check_each(name, getattr(cfg, name), _common.check_number)
    _common.check_each("outlier_counts", cfg.outlier_counts, _common.check_int, hi=min(cfg.n_keys))
    for name in ("n_rows", "grad_depth", "grad_width", "grad_tokens", "grad_batch", "grad_seeds"):
        _common.check_int(name, getattr(cfg, name))
    _common.check_int("seed", cfg.seed, lo=0)
    _common.check_number("shaped_gamma", cfg.shaped_gamma, 0, 1, hi_closed=True)
    _common.check_number("shaped_tau0", cfg.shaped_tau0)
    for kind in KINDS:
        _block(kind, cfg)


def check_memory(cfg: VanishConfig) -> None:
    """One activation's Jacobian sweep at the most keys and each architecture's gradient must
    fit in one device's memory (the activations change no shape)."""
    n = max(cfg.n_keys)
    scores = jax.ShapeDtypeStruct((-(-cfg.n_rows // n), n, n), jnp.float32)  # as jacobian_sweep groups them
    memory.require_program(f"n_keys={n}, n_rows={cfg.n_rows}: the Jacobian program",
                           lambda s: diagnostics.jacobian_summary(cfg.activations[0], s), scores)
    inputs = (jax.ShapeDtypeStruct((cfg.grad_batch, cfg.grad_tokens, cfg.grad_width), jnp.float32),
              jax.ShapeDtypeStruct((cfg.grad_width, 10), jnp.float32),
              jax.ShapeDtypeStruct((cfg.grad_batch,), jnp.int32))
    sizes = (f"grad_width={cfg.grad_width}, grad_depth={cfg.grad_depth}, grad_tokens={cfg.grad_tokens}, "
             f"grad_batch={cfg.grad_batch}")
    for kind in KINDS:
        stack = nnx.eval_shape(lambda: Stack(_block(kind, cfg), cfg.grad_depth, rngs=nnx.Rngs(params=0)))
        graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
        memory.require_program(f"{sizes}: the {kind} gradient program",
                               diagnostics.param_gradient(graphdef, _loss), params, rest, *inputs)


def prepare(argv=None):
    """Parse and check every flag and open the output folder; no work."""
    args, cfg = parse_args(argv)
    validate(cfg)
    check_memory(cfg)
    run = _common.open_run(args.out, cfg, args.overwrite,
                           ("jacobian_norms.png", "saturation.png", "init_gradients.png"))
    return cfg, run


def execute(cfg: VanishConfig, run) -> int:
    t0 = time.perf_counter()
    todo = units(cfg)
    finished, _, _ = _common.load_units(run, todo)
    with tqdm(total=len(todo), initial=len(finished), desc="gradient_vanishing", dynamic_ncols=True) as bar:
        for name, (fn, *fn_args) in todo.items():
            if name not in finished:
                record, seconds = _common.timed(fn, *fn_args)
                _common.save_unit(run, name, record, seconds)
                bar.update(1)
    records, seconds, non_finite = _common.load_units(run, todo)
    jac = {n: {a: records[f"jacobian-{a}-N{n}"] for a in cfg.activations} for n in cfg.n_keys}
    grads = {kind: records[f"init_gradients-{kind}"] for kind in KINDS}
    rows = findings(jac, cfg)
    fig_paths = figures(jac, grads, cfg, run.path)
    cols = list(rows[0])
    table = _common.format_table(
        cols, [[r[c] if isinstance(r[c], str) else _fmt(r[c]) for c in cols] for r in rows]
    )
    print(table)
    print("\nGradient norms at init (mean over seeds), first / middle / last layer:")
    for kind, g in grads.items():
        for w in ("query", "value"):
            m = g[w]["mean"]
            print(f"  {kind:8s} {w:5s}: {_fmt(m[0])} / {_fmt(m[len(m) // 2])} / {_fmt(m[-1])}")
    _common.finish(run, {
        "script": "gradient_vanishing", "config": dataclasses.asdict(cfg),
        "environment": _common.environment(),
        "saturation_threshold": {n: diagnostics.default_saturation_threshold(n) for n in cfg.n_keys},
        "jacobian": {str(n): v for n, v in jac.items()},
        "findings": rows, "table": table, "init_gradients": grads,
        "figures": [p.name for p in fig_paths],
    }, non_finite, seconds, time.perf_counter() - t0)
    return 0


def _float(x) -> float:
    """A record's number; NaN for a null (a non-finite value in the unit's JSON)."""
    return math.nan if x is None else float(x)


def _fmt(x) -> str:
    """``x`` with 3 significant digits; ``n/a`` for a null (non-finite) value."""
    return "n/a" if x is None else f"{x:.3g}"


def main(argv=None) -> int:
    return _common.cli("gradient_vanishing", prepare, execute, argv)


if __name__ == "__main__":
    raise SystemExit(main())
