"""Train the LeViT-like classifier with every attention activation, several seeds, two depths.

The periodic-softmax paper (Wang, Liu, Liu, arXiv 2108.07153) compares softmax with periodic
normalisers, with and without pre-normalisation, at depth 2 and deeper; the polynomial paper
(Saratchandran et al., arXiv 2410.18613) adds x^p / sqrt(N); the shaped Transformer (Noci et
al.) adds I + softmax - 11^T/m. Default data: the 8x8 digits shipped with scikit-learn.

    python scripts/compare_activations.py --quick --out runs/compare
    python scripts/compare_activations.py --out runs/compare_full          # more steps/seeds
    python scripts/compare_activations.py --dataset cifar10 --width 512 --heads 8 ...

Writes OUT/results.json (config, environment, one entry per run with activation, prenorm,
depth, seed, test_accuracy, final_train_loss, diverged, diagnostics and learning curve; a
summary table; ``non_finite_values``: how many NaN/inf were written as null), OUT/table.md,
OUT/timings.json, and figures OUT/learning_curves_depth{D}.png, OUT/accuracy.png,
OUT/attention_norms.png. Every flag is checked before any work (a bad one: one line, exit
code 2). Each finished training run is kept as OUT/chunks/run-{activation}-d{depth}-s{seed}.json;
rerunning the same command after an interruption trains only the missing runs and writes
the same results.json as an uninterrupted run. An OUT holding another config is refused
unless ``--overwrite``.

Wang et al.'s two code versions (docs/activations.md): a name is run as registered, i.e. as in
the authors' module file (pre-normalisation after the 1/sqrt(d) scaling); each name in
``--before-scaling`` (a norm_ activation) is also run with the pre-normalisation before the
scaling, as in the authors' training script, and labelled ``NAME+before_scaling``. The paper
script's sinmax is ``sin10max`` (1 + sin 10s), so its norm_sinmax is
``norm_sin10max+before_scaling``.

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
    "sin10max",
    "polynomial3",
    "polynomial2",
    "shaped_softmax",
)


DEFAULT_BEFORE_SCALING = ("norm_softmax", "norm_sin10max", "norm_cosmax")
"""The training script's (demo.py) norm_softmax, norm_sinmax and norm_cosmax."""

BEFORE = "+before_scaling"
"""Label suffix of a run with ``prenorm_order="before_scaling"``."""


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Every setting of the comparison (the CLI is generated from these fields)."""

    activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
    # norm_ names also run with the training script's order, labelled NAME+before_scaling
    before_scaling: tuple[str, ...] = DEFAULT_BEFORE_SCALING
    depths: tuple[int, ...] = (2, 8)
    seeds: int = 5
    dataset: str = "digits"
    model: str = "levit"  # one of MODELS
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


MODELS = ("levit", "vit")

QUICK = dict(seeds=3, width=32, steps=200, batch_size=32, learning_rate=4e-3, warmup_steps=20, log_every=20)
"""--quick: the digits, width 32, 200 steps of batch 32, 3 seeds, depths 2 and 8."""


def labels(cfg: CompareConfig) -> tuple[str, ...]:
    """The trained variants: every activation, then each ``before_scaling`` name + ``BEFORE``."""
    return tuple(dict.fromkeys(cfg.activations + tuple(n + BEFORE for n in cfg.before_scaling)))


def split_label(label: str) -> tuple[str, str]:
    """``(activation, prenorm_order)`` of a run label."""
    if label.endswith(BEFORE):
        return label[: -len(BEFORE)], "before_scaling"
    return label, "after_scaling"


def build_config(cfg: CompareConfig, label: str, depth: int, ds: data.ImageDataset):
    activation, order = split_label(label)
    common = dict(
        depth=depth, width=cfg.width, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
        num_classes=ds.num_classes, image_size=ds.image_size, channels=ds.channels,
    )
    if cfg.model == "levit":
        make = functools.partial(levit.levit_config, activation, grid=4, **common)
        block = make().block
    elif cfg.model == "vit":
        make = functools.partial(levit.vit_config, activation, patch_size=max(ds.image_size // 4, 1), **common)
        block = make().stack.block
    else:
        raise ValueError(f"model={cfg.model!r} is not one of {MODELS}")
    if order == "after_scaling":
        return make()
    attention = dataclasses.replace(block.attention, prenorm_order=order)
    return make(block=dataclasses.replace(block, attention=attention))


def train_config(cfg: CompareConfig) -> training.TrainConfig:
    return training.TrainConfig(
        steps=cfg.steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm, log_every=cfg.log_every,
    )


def unit_name(activation: str, depth: int, seed: int) -> str:
    """The chunk name of one training run."""
    return f"run-{activation}-d{depth}-s{seed}"


DIAGNOSTICS = ("attn_frobenius", "attn_frobenius_over_sqrt_n", "attn_entropy",
               "token_correlation", "token_effective_rank")


def run_record(activation: str, depth: int, seed: int, res: training.TrainResult) -> dict:
    """The JSON record of one training run (no timings: records are deterministic)."""
    h = res.history
    return {
        "activation": activation,
        "prenorm": activation.startswith("norm_"),
        "prenorm_order": split_label(activation)[1],
        "depth": depth,
        "seed": seed,
        "test_accuracy": res.final_eval.get("accuracy"),
        "test_loss": res.final_eval.get("loss"),
        "final_train_loss": res.final_train.get("loss"),
        "final_train_accuracy": res.final_train.get("accuracy"),
        "diverged": res.diverged,
        # Means over the last logging interval; attention entries per layer, token
        # entries per layer with the stem output first.
        "diagnostics": {k: res.final_train.get(k) for k in DIAGNOSTICS},
        "diagnostics_first_interval": {k: h[0].get(f"train/{k}") for k in DIAGNOSTICS},
        "curve": {
            "step": [r["step"] for r in h],
            "train_loss": [r.get("train/loss") for r in h],
            "train_accuracy": [r.get("train/accuracy") for r in h],
            "grad_norm": [r.get("train/grad_norm") for r in h],
            "attn_frobenius_over_sqrt_n": [r.get("train/attn_frobenius_over_sqrt_n") for r in h],
        },
    }


def train_runs(cfg: CompareConfig, run, activation: str, depth: int, seeds, ds, eval_batches) -> list:
    """Train ``seeds`` of one (activation, depth) and save each run as its own chunk.

    One at a time (sharing one compiled step), each saved as it finishes; with
    ``cfg.ensemble`` all of the configuration's seeds together (``seeds`` is then all of them,
    so that a resumed run computes exactly what an uninterrupted one does).
    """
    model_cfg = build_config(cfg, activation, depth, ds)
    tcfg = train_config(cfg)
    common = dict(eval_fn=levit.classifier_eval, eval_batches=eval_batches)

    def stream(seed):
        return data.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=seed)

    if cfg.ensemble:
        models = [levit.build(model_cfg, seed) for seed in seeds]
        results, wall = _common.timed(training.train_ensemble, models, levit.classifier_loss,
                                      [stream(s) for s in seeds], tcfg, seeds=list(seeds), **common)
        outcomes = [(res, wall / len(seeds)) for res in results]
    else:  # a generator: each run is saved before the next one starts
        outcomes = (_common.timed(training.train, levit.build(model_cfg, seed), levit.classifier_loss,
                                  stream(seed), dataclasses.replace(tcfg, seed=seed), **common)
                    for seed in seeds)
    accuracies = []
    for seed, (res, wall) in zip(seeds, outcomes):
        record = run_record(activation, depth, seed, res)
        _common.save_unit(run, unit_name(activation, depth, seed), record, wall)
        accuracies.append(record["test_accuracy"])
    return accuracies


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
            row += [cell, f"{loss[0]:.3f} ± {loss[1]:.3f}" if loss[2] else "n/a"]
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
            steps = max((r["curve"]["step"] for r in sel), key=len)  # diverged runs stop early
            diverged = sum(r["diverged"] for r in sel)
            label = f"{act} ({diverged} diverged)" if diverged else act
            for ax, key in zip(axes, ("train_loss", "train_accuracy")):
                m, lo, hi = _common.nan_band([r["curve"][key] for r in sel], len(steps))
                ax.plot(steps, m, color=c, label=label, lw=1.5)
                if len(sel) > 1:
                    ax.fill_between(steps, lo, hi, color=c, alpha=0.15)
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
    diverged = sum(r["diverged"] for r in runs)
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.set_title(f"{diverged} of {len(runs)} runs diverged (their accuracy is left out)" if diverged else "")
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
            axes[0].plot(np.arange(1, deep + 1), _common.nan_band(vals, deep)[0], "o-", color=c, label=act, ms=3)
        if corr:
            axes[1].plot(np.arange(deep + 1), _common.nan_band(corr, deep + 1)[0], "o-", color=c, label=act, ms=3)
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
    p = _common.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/compare_activations", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run with a different config in --out")
    p.add_argument("--quick", action="store_true", help=f"small fast preset: {QUICK}")
    p.add_argument("--workers", type=int, default=_common.default_workers(),
                   help="configurations trained in parallel, one process each")
    p.add_argument("--only", action="store_true",
                   help="train only the names given with --activations (default: add them)")
    _common.add_config_flags(p, CompareConfig, element_types={"depths": int})
    args = p.parse_args(argv)
    values = _common.config_values(args, CompareConfig, QUICK if args.quick else {})
    if args.activations is not None and not args.only:
        values["activations"] = tuple(dict.fromkeys(DEFAULT_ACTIVATIONS + values["activations"]))
    return args, CompareConfig(**values)


def validate(cfg: CompareConfig, workers: int) -> None:
    """Every flag on its own (cross-field rules: :func:`prepare`)."""
    _common.check_each("activations", cfg.activations, _common.check_activation)
    _common.check_each("before_scaling", cfg.before_scaling, _common.check_activation)
    for name in cfg.before_scaling:
        if not hasattr(activations.get(name), "prenorm_base"):
            raise ValueError(f"before_scaling={name!r} is not a pre-normalised (norm_) activation")
    _common.check_each("depths", cfg.depths, _common.check_int)
    for name in ("seeds", "width", "heads", "mlp_ratio", "steps", "batch_size", "log_every",
                 "eval_batch_size"):
        _common.check_int(name, getattr(cfg, name))
    _common.check_int("warmup_steps", cfg.warmup_steps, lo=0)
    _common.check_number("learning_rate", cfg.learning_rate)
    _common.check_number("weight_decay", cfg.weight_decay, lo_closed=True)
    _common.check_number("grad_clip_norm", cfg.grad_clip_norm)
    _common.check_choice("dataset", cfg.dataset, data.DATASETS)
    _common.check_choice("model", cfg.model, MODELS)
    _common.check_int("workers", workers)


def prepare(argv=None):
    """Parse and check every flag, load the dataset, open the output folder; no training."""
    args, cfg = parse_args(argv)
    validate(cfg, args.workers)
    try:
        ds = _dataset(cfg.dataset)
    except data.DatasetUnavailableError as err:
        raise ValueError(f"dataset={cfg.dataset!r} is unavailable: {err}") from None
    _common.check_number("batch_size", cfg.batch_size, 0, len(ds.x_train), hi_closed=True)
    train_config(cfg)  # warmup_steps < steps
    for depth in cfg.depths:
        for label in labels(cfg):  # e.g. heads must divide width
            build_config(cfg, label, depth, ds)
    check_memory(cfg, ds, args.workers)
    run = _common.open_run(args.out, cfg, args.overwrite,
                           ("table.md", "learning_curves_depth*.png", "accuracy.png", "attention_norms.png"))
    return args, cfg, run


def check_memory(cfg: CompareConfig, ds: data.ImageDataset, workers: int) -> None:
    """The deepest model's training step (all seeds together with ``ensemble``) and evaluation
    must fit in one device's memory, ``workers`` at a time (the activations change no shape;
    an evaluation batch is at most the test split)."""
    depth = max(cfg.depths)
    models = cfg.seeds if cfg.ensemble else 1
    _common.check_training_memory(
        f"width={cfg.width}, depth={depth}, batch_size={cfg.batch_size}, eval_batch_size={cfg.eval_batch_size}"
        + (f", seeds={cfg.seeds} (ensemble)" if cfg.ensemble else ""),
        lambda: levit.build(build_config(cfg, labels(cfg)[0], depth, ds)), levit.classifier_loss,
        _common.batch_like(cfg.batch_size, x=ds.x_train, y=ds.y_train), train_config(cfg), models=models,
        eval_fn=levit.classifier_eval,
        eval_batch=_common.batch_like(min(cfg.eval_batch_size, len(ds.x_test)), x=ds.x_test, y=ds.y_test),
        workers=workers)


@functools.lru_cache(maxsize=2)
def _dataset(name: str):
    return data.load(name)


def _work(cfg: CompareConfig, run, activation: str, depth: int, seeds: tuple):
    ds = _dataset(cfg.dataset)
    eval_batches = data.eval_batches(ds.x_test, ds.y_test, cfg.eval_batch_size)
    return train_runs(cfg, run, activation, depth, seeds, ds, eval_batches)


def execute(args, cfg: CompareConfig, run) -> int:
    t_start = time.perf_counter()
    units = {(d, a, s): unit_name(a, d, s) for d in cfg.depths for a in labels(cfg)
             for s in range(cfg.seeds)}
    finished, _, _ = _common.load_units(run, units.values())
    jobs = []
    for depth in sorted(cfg.depths, reverse=True):  # deepest first: the workers finish together
        for act in labels(cfg):
            missing = tuple(s for s in range(cfg.seeds) if units[(depth, act, s)] not in finished)
            if missing:
                jobs.append((cfg, run, act, depth, tuple(range(cfg.seeds)) if cfg.ensemble else missing))
    print(f"{_dataset(cfg.dataset)}; {len(labels(cfg))} activations x depths {cfg.depths} x "
          f"{cfg.seeds} seeds; {len(finished)} of {len(units)} runs already in {run.path}/chunks; "
          f"{args.workers} worker process(es)")
    bar = tqdm(total=len(units), initial=len(finished), desc="training runs", dynamic_ncols=True)

    def on_result(job, accs):
        _, _, act, depth, seeds = job
        tqdm.write(f"depth {depth:2d} {act:16s} seeds {list(seeds)} test acc "
                   f"{[None if a is None else round(a, 3) for a in accs]}")
        bar.update(sum(units[(depth, act, s)] not in finished for s in seeds))

    _common.parallel_map(_work, jobs, args.workers, on_result)
    bar.close()
    records, seconds, non_finite = _common.load_units(run, units.values())
    runs = [records[units[key]] for key in units]
    summary, table = summarise(runs, cfg)
    fig_paths = figures(runs, cfg, run.path)
    print(table)
    _common.finish(run, {
        "script": "compare_activations", "config": dataclasses.asdict(cfg),
        "environment": _common.environment(), "runs": runs, "summary": summary, "table": table,
        "diverged_runs": sum(r["diverged"] for r in runs),
        "figures": [p.name for p in fig_paths],
    }, non_finite, seconds, time.perf_counter() - t_start, table_md=table)
    return 0


def main(argv=None) -> int:
    return _common.cli("compare_activations", prepare, execute, argv)


if __name__ == "__main__":
    raise SystemExit(main())
