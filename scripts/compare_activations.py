"""Train the LeViT-like classifier with every attention activation, several seeds, two depths.

The periodic-softmax paper (Wang, Liu, Liu, arXiv 2108.07153) compares softmax with periodic
normalisers, with and without pre-normalisation, at depth 2 and deeper; the polynomial paper
(Saratchandran et al., arXiv 2410.18613) adds x^p / sqrt(N); the shaped Transformer (Noci et
al.) adds I + softmax - 11^T/m. Default data: the 8x8 digits shipped with scikit-learn.

    python scripts/compare_activations.py --quick --out runs/compare
    python scripts/compare_activations.py --out runs/compare_full          # more steps/seeds
    python scripts/compare_activations.py --dataset cifar10 --width 512 --heads 8 ...

Writes OUT/results.json (config, environment, one entry per run with activation, prenorm,
depth, seed, test_accuracy, final_train_loss, diagnostics and learning curve; a summary
table), OUT/table.md, and figures OUT/learning_curves_depth{D}.png, OUT/accuracy.png,
OUT/attention_norms.png. results.json is rewritten (atomically) after every configuration.

Each (activation, depth) configuration runs in one of ``--workers`` spawned processes (default
min(2, cores), one XLA thread each); its seeds share one compiled step (``--ensemble`` trains
them together with vmap instead, which pays off on accelerators, not on CPU). On CPU the cost
is dominated by compiling one training step per configuration (~5 s each).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (also puts the repository root on sys.path)

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shaped_attn import activations, data, levit, training  # noqa: E402

DEFAULT_ACTIVATIONS = (
    "softmax",
    "sin2max_shifted",
    "sin_softmax",
    "norm_cosmax",
    "norm_sirenmax",
    "sinmax",
    "norm_sinmax",
    "polynomial3",
    "polynomial2",
    "shaped_softmax",
)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Every setting of the comparison (the CLI is generated from these fields)."""

    activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
    depths: tuple[int, ...] = (2, 8)
    seeds: int = 5
    dataset: str = "digits"
    model: str = "levit"  # "levit" or "vit"
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 2
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    grad_clip_norm: float = 1.0
    log_every: int = 25
    eval_batch_size: int = 512
    ensemble: bool = False  # train the seeds together (vmap): faster on accelerators, not on CPU


QUICK = dict(seeds=3, width=32, steps=200, batch_size=32, learning_rate=4e-3, warmup_steps=20, log_every=20)
"""--quick: the digits, width 32, 200 steps of batch 32, 3 seeds, depths 2 and 8."""


def build_config(cfg: CompareConfig, activation: str, depth: int, ds: data.ImageDataset):
    common = dict(
        depth=depth, width=cfg.width, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
        num_classes=ds.num_classes, image_size=ds.image_size, channels=ds.channels,
    )
    if cfg.model == "levit":
        return levit.levit_config(activation, grid=4, **common)
    if cfg.model == "vit":
        return levit.vit_config(activation, patch_size=max(ds.image_size // 4, 1), **common)
    raise ValueError(f"model={cfg.model!r} must be 'levit' or 'vit'")


def _last(history, key):
    for rec in reversed(history):
        if key in rec:
            return rec[key]
    return None


def run_configuration(cfg: CompareConfig, activation: str, depth: int, ds, eval_batches):
    """Train ``cfg.seeds`` seeds of one (activation, depth) together; one record per seed."""
    model_cfg = build_config(cfg, activation, depth, ds)
    seeds = list(range(cfg.seeds))
    models = [levit.build(model_cfg, seed) for seed in seeds]
    streams = [data.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=seed) for seed in seeds]
    tcfg = training.TrainConfig(
        steps=cfg.steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm,
        log_every=cfg.log_every,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.ensemble:
        results = training.train_ensemble(
            models, levit.classifier_loss, streams, tcfg, seeds=seeds,
            eval_fn=levit.classifier_eval, eval_batches=eval_batches,
        )
    else:  # one compilation shared by the seeds (training caches the compiled step)
        results = [
            training.train(model, levit.classifier_loss, stream, dataclasses.replace(tcfg, seed=seed),
                           eval_fn=levit.classifier_eval, eval_batches=eval_batches)
            for model, stream, seed in zip(models, streams, seeds)
        ]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    runs = []
    for seed, res in zip(seeds, results):
        h = res.history
        diag_keys = ("attn_frobenius", "attn_frobenius_over_sqrt_n", "attn_entropy",
                     "token_correlation", "token_effective_rank")
        runs.append({
            "activation": activation,
            "prenorm": activation.startswith("norm_"),
            "depth": depth,
            "seed": seed,
            "test_accuracy": res.final_eval.get("accuracy"),
            "test_loss": res.final_eval.get("loss"),
            "final_train_loss": res.final_train.get("loss"),
            "final_train_accuracy": res.final_train.get("accuracy"),
            "diverged": res.diverged,
            "wall_time_s_per_seed": wall / len(seeds),
            "cpu_time_s_per_seed": cpu / len(seeds),
            # Means over the last logging interval; attention entries per layer, token
            # entries per layer with the stem output first.
            "diagnostics": {k: res.final_train.get(k) for k in diag_keys},
            "diagnostics_first_interval": {k: h[0].get(f"train/{k}") for k in diag_keys},
            "curve": {
                "step": [r["step"] for r in h],
                "train_loss": [r.get("train/loss") for r in h],
                "train_accuracy": [r.get("train/accuracy") for r in h],
                "grad_norm": [r.get("train/grad_norm") for r in h],
                "attn_frobenius_over_sqrt_n": [r.get("train/attn_frobenius_over_sqrt_n") for r in h],
            },
        })
    return runs


def summarise(runs, cfg: CompareConfig):
    rows, table_rows = [], []
    acts = list(dict.fromkeys(r["activation"] for r in runs))
    for act in acts:
        row = [act]
        for depth in cfg.depths:
            sel = [r for r in runs if r["activation"] == act and r["depth"] == depth]
            acc = _common.mean_sd(r["test_accuracy"] for r in sel)
            loss = _common.mean_sd(r["final_train_loss"] for r in sel)
            div = sum(r["diverged"] for r in sel)
            rows.append({
                "activation": act, "prenorm": act.startswith("norm_"), "depth": depth,
                "test_accuracy_mean": acc[0], "test_accuracy_sd": acc[1], "n": acc[2],
                "final_train_loss_mean": loss[0], "final_train_loss_sd": loss[1],
                "diverged": div,
            })
            cell = f"{acc[0]:.3f} ± {acc[1]:.3f}" if acc[2] else "n/a"
            row += [cell, f"{loss[0]:.3f} ± {loss[1]:.3f}" if loss[2] else "nan"]
            if div:
                row[-1] += f" ({div} diverged)"
        table_rows.append(row)
    header = ["activation"]
    for depth in cfg.depths:
        header += [f"test acc, depth {depth}", f"train loss, depth {depth}"]
    return rows, _common.format_table(header, table_rows)


def figures(runs, cfg: CompareConfig, out: Path):
    plt = _common.pyplot()
    acts = list(dict.fromkeys(r["activation"] for r in runs))
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(acts), 2)))
    paths = []
    for depth in cfg.depths:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for act, c in zip(acts, colors):
            sel = [r for r in runs if r["activation"] == act and r["depth"] == depth]
            if not sel:
                continue
            steps = sel[0]["curve"]["step"]
            for ax, key in zip(axes, ("train_loss", "train_accuracy")):
                vals = np.array([[np.nan if v is None else v for v in r["curve"][key]] for r in sel],
                                dtype=float)
                m = np.nanmean(vals, axis=0) if np.isfinite(vals).any() else vals[0]
                ax.plot(steps, m, color=c, label=act, lw=1.5)
                if len(sel) > 1:
                    ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=c, alpha=0.15)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("training loss (interval mean)")
        axes[1].set_ylabel("training accuracy")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{cfg.model} on {cfg.dataset}, depth {depth}: mean over {cfg.seeds} seeds (band: min-max)")
        paths.append(_common.save_figure(fig, out / f"learning_curves_depth{depth}.png"))

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(acts)), 4))
    width = 0.8 / len(cfg.depths)
    for j, depth in enumerate(cfg.depths):
        means, sds = [], []
        for act in acts:
            m, s, _ = _common.mean_sd(r["test_accuracy"] for r in runs
                                      if r["activation"] == act and r["depth"] == depth)
            means.append(m), sds.append(s)
        ax.bar(np.arange(len(acts)) + j * width, means, width, yerr=sds, label=f"depth {depth}", capsize=2)
    ax.set_xticks(np.arange(len(acts)) + width * (len(cfg.depths) - 1) / 2)
    ax.set_xticklabels(acts, rotation=45, ha="right")
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    paths.append(_common.save_figure(fig, out / "accuracy.png"))

    deep = max(cfg.depths)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for act, c in zip(acts, colors):
        sel = [r for r in runs if r["activation"] == act and r["depth"] == deep]
        vals = [r["diagnostics"]["attn_frobenius_over_sqrt_n"] for r in sel
                if r["diagnostics"]["attn_frobenius_over_sqrt_n"] is not None]
        corr = [r["diagnostics"]["token_correlation"] for r in sel
                if r["diagnostics"]["token_correlation"] is not None]
        if vals:
            axes[0].plot(np.arange(1, deep + 1), np.mean(np.asarray(vals, float), 0), "o-", color=c, label=act, ms=3)
        if corr:
            axes[1].plot(np.arange(deep + 1), np.mean(np.asarray(corr, float), 0), "o-", color=c, label=act, ms=3)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("||A||_F / sqrt(N), end of training")
    axes[1].set_xlabel("layer (0 = stem output)")
    axes[1].set_ylabel("mean token cosine similarity")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"depth {deep}: per-layer diagnostics at the end of training")
    paths.append(_common.save_figure(fig, out / "attention_norms.png"))
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/compare_activations", help="output folder")
    p.add_argument("--quick", action="store_true", help=f"small fast preset: {QUICK}")
    p.add_argument("--workers", type=int, default=_common.default_workers(),
                   help="configurations trained in parallel, one process each")
    p.add_argument("--only", action="store_true",
                   help="train only the names given with --activations (default: add them)")
    for f in dataclasses.fields(CompareConfig):
        kw = dict(default=None, help=f"default {f.default!r}")
        if f.name == "activations":
            p.add_argument("--activations", nargs="+", **kw)
        elif f.name == "depths":
            p.add_argument("--depths", nargs="+", type=int, **kw)
        elif isinstance(f.default, bool):
            p.add_argument("--" + f.name, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), **kw)
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for f in dataclasses.fields(CompareConfig):
        v = getattr(args, f.name)
        if v is None:
            continue
        if f.name == "activations":
            v = tuple(v) if args.only else tuple(dict.fromkeys(DEFAULT_ACTIVATIONS + tuple(v)))
        elif f.name == "depths":
            v = tuple(v)
        values[f.name] = v
    cfg = CompareConfig(**values)
    for name in cfg.activations:
        activations.get(name)  # fail early, listing the known names
    return args, cfg


@functools.lru_cache(maxsize=2)
def _dataset(name: str):
    ds = data.load(name)
    return ds


def _work(cfg: CompareConfig, activation: str, depth: int):
    ds = _dataset(cfg.dataset)
    eval_batches = data.eval_batches(ds.x_test, ds.y_test, cfg.eval_batch_size)
    return run_configuration(cfg, activation, depth, ds, eval_batches)


def _order(runs, cfg: CompareConfig):
    key = {(d, a): i for i, (d, a) in enumerate((d, a) for d in cfg.depths for a in cfg.activations)}
    return sorted(runs, key=lambda r: (key[(r["depth"], r["activation"])], r["seed"]))


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    out = _common.out_dir(args.out)
    t_start = time.perf_counter()
    try:
        ds = data.load(cfg.dataset)  # fail here, quickly and clearly, if it is unavailable
    except data.DatasetUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    workers = max(1, args.workers)
    print(f"{ds}; {len(cfg.activations)} activations x depths {cfg.depths} x {cfg.seeds} seeds; "
          f"{workers} worker process(es)")
    # Deepest first: the longest jobs start early, so the workers finish together.
    combos = sorted(((d, a) for d in cfg.depths for a in cfg.activations), key=lambda c: -c[0])
    runs = []
    payload = {
        "script": "compare_activations", "quick": args.quick, "workers": workers,
        "config": dataclasses.asdict(cfg), "environment": _common.environment(),
        "complete": False, "runs": runs,
    }
    bar = tqdm(total=len(combos), desc="configurations", dynamic_ncols=True)

    def on_result(job, new):
        _, act, depth = job
        runs[:] = _order(runs + new, cfg)
        accs = [r["test_accuracy"] for r in new]
        tqdm.write(f"depth {depth:2d} {act:16s} test acc {np.round(accs, 3).tolist()} "
                   f"({new[0]['wall_time_s_per_seed'] * len(new):.1f} s wall, "
                   f"{new[0]['cpu_time_s_per_seed'] * len(new):.1f} s CPU)")
        bar.update(1)
        _common.write_json(out / "results.json", payload)  # partial results survive a crash

    _common.parallel_map(_work, [(cfg, a, d) for d, a in combos], workers, on_result)
    bar.close()
    summary, table = summarise(runs, cfg)
    fig_paths = figures(runs, cfg, out)
    wall = time.perf_counter() - t_start
    payload.update(complete=True, summary=summary, table=table, wall_time_s=wall,
                   figures=[p.name for p in fig_paths])
    _common.write_json(out / "results.json", payload)
    _common.write_text(out / "table.md", table + "\n")
    print(table)
    print(f"total wall time {wall:.1f} s; results in {out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
