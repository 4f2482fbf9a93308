"""Train shaped and Pre-LN Transformers on next-byte prediction across depth and learning rate.

The shaped Transformer paper (Noci et al., arXiv 2306.17759) trains shaped attention without
LayerNorm, its shaping removed over the warmup ("recover") or learned ("learn"), against a
Pre-LN baseline whose attention entropy collapses at a high learning rate. Default data: the
Python standard library's own source (shaped_attn.text_data, no network).

    python scripts/train_stability.py --quick --out runs/stability_quick
    python scripts/train_stability.py --out runs/stability                  # depths 6, 12, 24
    python scripts/train_stability.py --activations sin_softmax polynomial3 --depths 6 12

Models: ``pre_ln`` (Pre-LN, softmax, final LayerNorm), ``shaped_recover`` (A = g1 I +
softmax(Y/tau) - g2 C, shaped ReLU, lam X + gamma f(X), no LayerNorm anywhere, the paper's
training init; g1, g2, s_minus go linearly to 0 over the warmup, ending at the plain
Transformer without LayerNorm), ``shaped_learn`` (the same with g1, g2, s_minus trained);
``--activations`` adds the Pre-LN model with each named registry activation in place of softmax.

Writes OUT/config.json, OUT/results.json (one entry per run: model, depth, lr, seed,
final_train_loss, final_val_loss, diverged, diverged_at_step, min_attention_entropy, curves,
gradient norms per layer at initialisation), OUT/table.md, OUT/timings.json and figures (PNG and
PDF): val_loss_vs_lr, attention_entropy, init_grad_norms. After each run that did not
diverge, a short sample is printed and stored (``sample``): the first validation bytes
continued by sampled bytes (temperature 0.8, KV-cached decoding with the end-of-training
knobs). Every flag is checked before any work (a bad one: one line, exit code 2). Each
finished run is kept as OUT/chunks/run-{model}-d{depth}-lr{lr}-s{seed}.json: rerunning the same command after an
interruption trains only the missing runs and writes the same results.json. An OUT holding
another config is refused unless --overwrite. A run whose logged loss is not finite or exceeds
--max-loss is stopped there and reported as diverged.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (also puts the repository root on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shaped_attn import config, data, lm, text_data, training  # noqa: E402
from shaped_attn.models import CausalLM  # noqa: E402
from shaped_attn.rundir import RunDir  # noqa: E402  (figures are saved through it)

MODELS = ("pre_ln", "shaped_recover", "shaped_learn")


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    """Every setting of the sweep (the CLI is generated from these fields)."""

    models: tuple[str, ...] = MODELS
    activations: tuple[str, ...] = ()  # extra Pre-LN models, one per registry activation
    depths: tuple[int, ...] = (6, 12, 24)
    learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 2e-3, 5e-3)
    seeds: int = 2
    dataset: str = "stdlib"
    width: int = 128
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 2000
    warmup_steps: int = 200  # also the length of the "recover" ramps
    gamma: float = 0.1  # residual branch weight of the shaped models (lam = sqrt(1 - gamma^2))
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    log_every: int = 25
    eval_batches: int = 8
    max_loss: float = 16.0  # a logged loss above this (about 3 ln 256) counts as diverged

    @property
    def all_models(self) -> tuple[str, ...]:
        return self.models + self.activations


QUICK = dict(depths=(2, 6), learning_rates=(3e-3, 3e-2, 1e-1), seeds=1, width=32, heads=2,
             seq_len=32, batch_size=16, steps=150, warmup_steps=30, log_every=10, eval_batches=2)
"""--quick: width 32, depths 2 and 6, three learning rates, 150 steps of 16 x 32 bytes, one seed."""


# ------------------------------------------------------------------------ config and CLI


def parse_args(argv=None):
    """CLI flags from :class:`StabilityConfig`; ``--quick`` presets, explicit flags override."""
    p = _common.ArgumentParser(prog="train_stability", description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/train_stability", help="output folder")
    p.add_argument("--quick", action="store_true", help=f"small fast preset: {QUICK}")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run with a different config in --out")
    _common.add_config_flags(p, StabilityConfig, element_types={"depths": int, "learning_rates": float})
    args = p.parse_args(argv)
    return args, StabilityConfig(**_common.config_values(args, StabilityConfig, QUICK if args.quick else {}))


def validate(cfg: StabilityConfig) -> None:
    """Every flag on its own (cross-field rules: :func:`prepare`)."""
    _common.check_each("models", cfg.models, _common.check_choice, MODELS)
    for name in cfg.activations:
        _common.check_activation("activations", name)
    _common.check_each("depths", cfg.depths, _common.check_int)
    _common.check_each("learning_rates", cfg.learning_rates, _common.check_number)
    for name in ("seeds", "width", "heads", "seq_len", "batch_size", "steps", "warmup_steps",
                 "log_every", "eval_batches"):
        _common.check_int(name, getattr(cfg, name))
    _common.check_number("gamma", cfg.gamma, 0, 1, hi_closed=True)
    _common.check_number("weight_decay", cfg.weight_decay, lo_closed=True)
    _common.check_number("grad_clip_norm", cfg.grad_clip_norm)
    _common.check_number("max_loss", cfg.max_loss)
    _common.check_choice("dataset", cfg.dataset, text_data.TEXT_DATASETS)


def train_config(cfg: StabilityConfig, lr: float, seed: int) -> training.TrainConfig:
    return training.TrainConfig(
        steps=cfg.steps, learning_rate=lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        grad_clip_norm=cfg.grad_clip_norm, log_every=cfg.log_every, seed=seed, max_loss=cfg.max_loss,
    )


def prepare(argv=None):
    """Parse and check every flag, load the corpus, open the output folder; no training."""
    args, cfg = parse_args(argv)
    validate(cfg)
    try:
        ds = text_data.load(cfg.dataset)
    except data.DatasetUnavailableError as err:
        raise ValueError(f"dataset={cfg.dataset!r} is unavailable: {err}") from None
    _common.check_number("seq_len", cfg.seq_len, 0, ds.validation.size - 1)
    train_config(cfg, cfg.learning_rates[0], 0)  # warmup_steps < steps
    for model in cfg.all_models:  # e.g. heads must divide width
        block_config(cfg, model)
    check_memory(cfg)
    run = _common.open_run(args.out, cfg, args.overwrite,
                           ("table.md", "val_loss_vs_lr.*", "attention_entropy.*", "init_grad_norms.*"))
    return args, cfg, ds, run


def check_memory(cfg: StabilityConfig) -> None:
    """The deepest model's training step and evaluation must fit in one device's memory (the
    models of a sweep have the same shapes up to a few scalars)."""
    depth = max(cfg.depths)
    batch = {"tokens": jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), np.int32),
             "step": jax.ShapeDtypeStruct((), np.int32)}
    _common.check_training_memory(
        f"width={cfg.width}, depth={depth}, batch_size={cfg.batch_size}, seq_len={cfg.seq_len}",
        lambda: build_model(cfg, cfg.all_models[0], depth, 0), lm.loss, batch,
        train_config(cfg, cfg.learning_rates[0], 0), eval_fn=lm.evaluate, eval_batch=batch)


# ------------------------------------------------------------------------------ the runs


def block_config(cfg: StabilityConfig, model: str) -> config.BlockConfig:
    """The layer of a named model (see the module docstring)."""
    common = dict(num_heads=cfg.heads, out_proj=True)
    if model == "shaped_recover":
        return config.shaped_config(cfg.width, cfg.gamma, init="paper",
                                    schedule=config.recover_schedule(cfg.warmup_steps), **common)
    if model == "shaped_learn":
        return config.shaped_config(cfg.width, cfg.gamma, init="paper", learn=config.RECOVER_KNOBS, **common)
    return config.pre_ln_config(cfg.width, activation="softmax" if model == "pre_ln" else model, **common)


def build_model(cfg: StabilityConfig, model: str, depth: int, seed: int) -> CausalLM:
    """A byte-level CausalLM; the shaped models have no final LayerNorm either."""
    block = block_config(cfg, model)
    lm_cfg = config.CausalLMConfig(config.StackConfig(block, depth), vocab_size=text_data.VOCAB_SIZE,
                                   max_len=cfg.seq_len, final_norm=block.layer_norm)
    return CausalLM(lm_cfg, rngs=nnx.Rngs(params=seed))


def sweep(cfg: StabilityConfig) -> list[dict]:
    """The runs in a fixed order (each saved as the chunk :func:`unit_name`)."""
    return [dict(model=m, depth=d, lr=lr, seed=s)
            for d in cfg.depths for m in cfg.all_models for lr in cfg.learning_rates
            for s in range(cfg.seeds)]


def unit_name(model: str, depth: int, lr: float, seed: int) -> str:
    """The chunk name of one training run."""
    return f"run-{model}-d{depth}-lr{lr:g}-s{seed}"


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt(x) -> str:
    return "nan" if x is None else f"{x:.3f}"


def train_run(cfg: StabilityConfig, ds: text_data.TextDataset, model: str, depth: int, lr: float,
              seed: int) -> dict:
    """Train one model; its record for results.json (no timings: records are deterministic).

    The gradient norms per layer at initialisation are measured in the run of the first
    learning rate (they do not depend on it), on the first training batch.
    """
    net = build_model(cfg, model, depth, seed)
    evals = [{**b, "step": np.int32(cfg.steps)}  # evaluated with the end-of-training schedule
             for b in text_data.eval_batches(ds.validation, cfg.batch_size, cfg.seq_len, cfg.eval_batches)]
    train_stream = lm.with_steps(text_data.batches(ds.train, cfg.batch_size, cfg.seq_len, seed=seed))
    grads = None
    if lr == cfg.learning_rates[0]:
        first = {**next(text_data.batches(ds.train, cfg.batch_size, cfg.seq_len, seed=seed)), "step": np.int32(0)}
        grads = lm.init_gradient_norms(net, first)
    res = training.train(net, lm.loss, train_stream, train_config(cfg, lr, seed),
                         eval_fn=lm.evaluate, eval_batches=evals)
    sample = None if res.diverged else lm.sample_text(
        net, sample_prompt(cfg, ds), sample_steps(cfg), jax.random.key(seed), step=cfg.steps)
    h = res.history
    entropy = np.asarray([r["train/attn_entropy"] for r in h], dtype=np.float64)  # [logs, depth]
    knobs = sorted({k[len("train/knob/"):] for r in h for k in r if k.startswith("train/knob/")})
    return {
        "model": model, "depth": depth, "lr": lr, "seed": seed,
        "final_train_loss": _finite_or_none(res.final_train.get("loss")),
        "final_val_loss": _finite_or_none(res.final_eval.get("loss")),
        "first_train_loss": _finite_or_none(h[0]["train/loss"]),
        "diverged": res.diverged,
        "diverged_at_step": h[-1]["step"] if res.diverged else None,
        "min_attention_entropy": float(np.nanmin(entropy)) if np.isfinite(entropy).any() else None,
        "curve": {
            "step": [r["step"] for r in h],
            "train_loss": [r["train/loss"] for r in h],
            "grad_norm": [r["train/grad_norm"] for r in h],
            "attn_entropy": entropy,  # per logging interval, per layer
            **{f"knob_{k}": [r.get(f"train/knob/{k}") for r in h] for k in knobs},
        },
        "init_grad_norms": grads,
        "sample": sample,
    }


SAMPLE_PROMPT_BYTES = 16
SAMPLE_BYTES = 48


def sample_prompt(cfg: StabilityConfig, ds: text_data.TextDataset) -> bytes:
    """The first bytes of the validation text (at most half a training window)."""
    return ds.validation[: min(SAMPLE_PROMPT_BYTES, max(cfg.seq_len // 2, 1))].tobytes()


def sample_steps(cfg: StabilityConfig) -> int:
    """Bytes sampled after the prompt: up to :data:`SAMPLE_BYTES`, within the model's max_len."""
    return min(SAMPLE_BYTES, cfg.seq_len - min(SAMPLE_PROMPT_BYTES, max(cfg.seq_len // 2, 1)))


# ------------------------------------------------------------------------ table, figures


def summarise(runs: list[dict]) -> str:
    """Markdown table, one row per run."""
    rows = [[r["model"], r["depth"], f"{r['lr']:g}", r["seed"], _fmt(r["first_train_loss"]),
             _fmt(r["final_train_loss"]), _fmt(r["final_val_loss"]),
             f"yes (step {r['diverged_at_step']})" if r["diverged"] else "no",
             _fmt(r["min_attention_entropy"])] for r in runs]
    header = ["model", "depth", "lr", "seed", "first train loss", "final train loss",
              "final val loss", "diverged", "min attn entropy"]
    return _common.format_table(header, rows)


def figures(cfg: StabilityConfig, runs: list[dict], run_dir: RunDir) -> list[str]:
    plt = _common.pyplot()
    models = cfg.all_models
    colors = dict(zip(models, plt.cm.tab10(np.arange(len(models)) % 10)))
    names = []

    fig, axes = plt.subplots(1, len(cfg.depths), figsize=(4.5 * len(cfg.depths), 3.8), squeeze=False)
    for ax, depth in zip(axes[0], cfg.depths):
        here = [r for r in runs if r["depth"] == depth]
        top = max([r["final_val_loss"] for r in here if r["final_val_loss"] is not None and not r["diverged"]]
                  + [1.0])
        for i, m in enumerate(models):
            sel = [r for r in here if r["model"] == m]
            ok = [_common.mean_sd(r["final_val_loss"] for r in sel if r["lr"] == lr and not r["diverged"])[0]
                  for lr in cfg.learning_rates]
            ax.plot(cfg.learning_rates, ok, "o-", color=colors[m], label=m)
            bad = sorted({r["lr"] for r in sel if r["diverged"]})  # drawn above the finished runs
            ax.plot(bad, [top * (1.03 + 0.02 * i)] * len(bad), "x", color=colors[m], ms=9, mew=2)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"depth {depth} (x: diverged)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (nats/byte)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    run_dir.save_figure(fig, "val_loss_vs_lr")
    names.append("val_loss_vs_lr")

    deep = max(cfg.depths)
    lrs = cfg.learning_rates
    fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.6), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for m in models:
            for r in runs:
                if r["model"] == m and r["depth"] == deep and r["lr"] == lr and r["seed"] == 0:
                    ent = np.asarray(r["curve"]["attn_entropy"], dtype=float)
                    ax.plot(r["curve"]["step"], ent.min(axis=1), color=colors[m], label=m)
                    ax.plot(r["curve"]["step"], ent.mean(axis=1), color=colors[m], ls=":", lw=1)
        ax.set_title(f"depth {deep}, lr {lr:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attention entropy (min over layers; dotted: mean)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    run_dir.save_figure(fig, "attention_entropy")
    names.append("attention_entropy")

    fig, axes = plt.subplots(1, len(cfg.depths), figsize=(4.5 * len(cfg.depths), 3.8), squeeze=False)
    for ax, depth in zip(axes[0], cfg.depths):
        for m in models:
            sel = [r["init_grad_norms"] for r in runs
                   if r["model"] == m and r["depth"] == depth and r["init_grad_norms"]]
            for w, ls in (("query", "-"), ("value", "--")):
                if sel:
                    g = np.mean([s[w] for s in sel], axis=0)
                    ax.plot(np.arange(1, depth + 1), g, ls, marker="o", ms=3, color=colors[m], label=f"{m} {w}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_title(f"depth {depth}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gradient norm at initialisation")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    run_dir.save_figure(fig, "init_grad_norms")
    names.append("init_grad_norms")
    plt.close("all")
    return names


# ---------------------------------------------------------------------------------- main


def execute(args, cfg: StabilityConfig, ds: text_data.TextDataset, run) -> int:
    t_start = time.perf_counter()
    units = {unit_name(**job): job for job in sweep(cfg)}
    finished, _, _ = _common.load_units(run, units)
    print(f"{ds}; models {cfg.all_models} x depths {cfg.depths} x lr {cfg.learning_rates} x "
          f"{cfg.seeds} seed(s); {len(finished)} of {len(units)} runs already in {run.path}/chunks")
    bar = tqdm(total=len(units), initial=len(finished), desc="training runs", dynamic_ncols=True)
    for name, job in units.items():
        if name in finished:
            continue
        rec, wall = _common.timed(train_run, cfg, ds, **job)
        _common.save_unit(run, name, rec, wall)
        status = f"DIVERGED at step {rec['diverged_at_step']}" if rec["diverged"] else f"val {_fmt(rec['final_val_loss'])}"
        tqdm.write(f"{job['model']:15s} depth {job['depth']:3d} lr {job['lr']:<8g} seed {job['seed']}: train "
                   f"{_fmt(rec['first_train_loss'])} -> {_fmt(rec['final_train_loss'])}, {status} ({wall:.1f} s)")
        if rec["sample"] is not None:
            tqdm.write(f"    sample: {rec['sample']!r}")
        bar.update(1)
    bar.close()
    records, seconds, non_finite = _common.load_units(run, units)
    runs = [records[name] for name in units]
    table = summarise(runs)
    fig_names = figures(cfg, runs, run)
    print(table)
    _common.finish(run, {
        "script": "train_stability", "quick": args.quick, "config": dataclasses.asdict(cfg),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint, "train_bytes": int(ds.train.size),
                    "validation_bytes": int(ds.validation.size)},
        "environment": _common.environment(), "runs": runs, "table": table,
        "diverged_runs": sum(r["diverged"] for r in runs), "figures": fig_names,
    }, non_finite, seconds, time.perf_counter() - t_start, table_md=table)
    return 0


def main(argv=None) -> int:
    return _common.cli("train_stability", prepare, execute, argv)


if __name__ == "__main__":
    raise SystemExit(main())
