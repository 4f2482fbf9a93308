"""Attention Frobenius norms: softmax's bounds and scaled polynomial attention.

Saratchandran et al. (arXiv 2410.18613) argue that softmax works because it keeps the
attention matrix's Frobenius norm O(sqrt(N)): for every N x N matrix A,
``||softmax(A)||_F <= sqrt(N)`` and ``||d softmax(A)/dA||_F <= 2 sqrt(N)``; and that
``phi(s) = s^p / sqrt(N)`` does the same in expectation at initialisation (Gaussian scores).

Part 1 (bounds): the two ratios ``||softmax(A)||_F / sqrt(N)`` and
``||d softmax(A)/dA||_F / (2 sqrt(N))`` over random A (Gaussian at several scales, Student t,
rank one) and adversarial A (gradient ascent on each ratio from many starts), N in a sweep.

Part 2 (expectation at init): ``||s^p / N^a||_F / sqrt(N)`` for Gaussian scores, against
the closed form ``sqrt((2p-1)!!) N^(1/2 - a)`` (a = 1/2 is the paper's scale).

Part 3 (training): the LeViT-like model on the digits resized to 16x16, with N = 4, 16, 64
tokens (conv stems of 3, 2, 1 stride-2 convolutions), softmax against polynomial3 at three
scales (``s^3 / N^a``, a = 0, 1/2, 1) and polynomial2; the Frobenius norm of every layer's
attention recorded inside the training step (mean over batch and heads).

    python scripts/frobenius_norm.py --quick --out runs/frobenius

Writes OUT/results.json (``non_finite_values``: how many NaN/inf were written as null;
diverged runs are flagged and counted), OUT/timings.json, OUT/bounds.png,
OUT/frobenius_training.png. Every flag is checked before any work (a bad one: one line,
exit code 2). Each finished unit (a part of the bounds, or one training run) is kept as
OUT/chunks/{unit}.json, its random key derived from the seed and the unit's name; rerunning
the same command after an interruption computes only the missing units and writes the same
results.json as an uninterrupted run. An OUT holding another config is refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shaped_attn import activations, data, diagnostics, levit, memory, training  # noqa: E402


@dataclasses.dataclass(frozen=True)
class FrobeniusConfig:
    # part 1
    bound_ns: tuple[int, ...] = (2, 4, 16, 64, 256)
    bound_scales: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    bound_samples: int = 64
    adversarial_starts: int = 32
    adversarial_steps: int = 300
    # part 2
    init_ns: tuple[int, ...] = (4, 16, 64, 256, 1024)
    init_samples: int = 64
    # part 3
    tokens: tuple[int, ...] = (4, 16, 64)
    train_activations: tuple[str, ...] = ("softmax", "poly3_a0.5", "poly3_a0", "poly3_a1", "poly2_a0.5")
    depth: int = 4
    width: int = 32
    heads: int = 4
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    log_every: int = 10
    seeds: int = 2
    seed: int = 0


QUICK = dict(bound_ns=(2, 4, 16, 64), bound_samples=32, adversarial_starts=16, adversarial_steps=150,
             init_ns=(4, 16, 64, 256), init_samples=32, depth=2, steps=200, seeds=1)


# ------------------------------------------------------------------------ activations


@functools.lru_cache(maxsize=None)
def scaled_polynomial(p: int, a: float):
    """``s^p / N^a`` with N the valid keys of the row (masked entries 0). ``a = 1/2`` is
    the registered ``polynomial{p}``; the other scales are for this study only."""
    base = activations.polynomial(p)

    def activation(scores, mask=None):
        w = base(scores, mask)  # s^p / sqrt(N)
        if a == 0.5:
            return w
        n = jnp.maximum(activations.valid_count(activations.valid_keys(w, mask)), 1).astype(w.dtype)
        return w * n ** (0.5 - a)

    activation.__name__ = f"poly{p}_a{a:g}"
    return activation


def resolve(name: str):
    """``poly{p}_a{a}`` -> :func:`scaled_polynomial`; anything else from the registry."""
    match = re.fullmatch(r"poly(\d+)_a(.+)", name)
    if match is None:
        return activations.get(name)
    p, a = int(match[1]), float(match[2])
    if p < 1 or not math.isfinite(a):
        raise ValueError(f"{name!r}: p={p} must be >= 1 and a={a} finite")
    return scaled_polynomial(p, a)


def check_train_activation(name: str, value: str) -> None:
    """``value`` is a registered activation or ``poly{p}_a{a}`` (integer p >= 1, finite a)."""
    try:
        resolve(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is neither poly{{p}}_a{{a}} (integer p >= 1, finite a) "
                         f"nor a registered activation: {', '.join(activations.names())}") from None


# ------------------------------------------------------------------------ part 1


def _double_factorial(k: int) -> int:
    return math.prod(range(k, 0, -2)) if k > 0 else 1


def _random_kinds(cfg: FrobeniusConfig):
    kinds = [f"normal_{s:g}" for s in cfg.bound_scales] + ["cauchy_10", "rank_one_10"]

    @functools.partial(jax.jit, static_argnums=1)
    def sample(key, n):
        k1, k2, k3 = jax.random.split(key, 3)
        shape = (cfg.bound_samples, n, n)
        z = jax.random.normal(k1, shape)
        out = [s * z for s in cfg.bound_scales]
        out.append(10 * jax.random.cauchy(k2, shape))
        u = jax.random.normal(k3, (2, cfg.bound_samples, n))
        out.append(10 * u[0][:, :, None] * u[1][:, None, :])
        a = jnp.stack(out)  # [kinds, samples, n, n]
        return (diagnostics.softmax_frobenius_bound_ratio(a),
                diagnostics.softmax_gradient_bound_ratio(a))

    return kinds, sample


def random_bounds(cfg: FrobeniusConfig, key):
    """Both ratios for random A: Gaussian at each scale, Cauchy (scale 10), rank one."""
    kinds, sample = _random_kinds(cfg)
    rows = []
    for n in cfg.bound_ns:
        f, g = sample(jax.random.fold_in(key, n), n)
        for i, kind in enumerate(kinds):
            rows.append({"n": n, "kind": kind,
                         "value_ratio_max": float(f[i].max()), "value_ratio_mean": float(f[i].mean()),
                         "grad_ratio_max": float(g[i].max()), "grad_ratio_mean": float(g[i].mean())})
    return rows


def _adversarial_program(cfg: FrobeniusConfig):
    """``run(a2)``: both ratios at the starts ``a2`` ``[2, starts, n, n]`` and after
    ``adversarial_steps`` of Adam (lr 0.05) pushing them up."""
    import optax

    fns = (diagnostics.softmax_frobenius_bound_ratio, diagnostics.softmax_gradient_bound_ratio)
    tx = optax.adam(0.05)

    def objective(a2):
        return -(jnp.sum(fns[0](a2[0])) + jnp.sum(fns[1](a2[1])))

    @jax.jit
    def run(a2):
        def body(carry, _):
            a, s = carry
            u, s = tx.update(jax.grad(objective)(a), s, a)
            return (optax.apply_updates(a, u), s), None

        (a, _), _ = jax.lax.scan(body, (a2, tx.init(a2)), None, length=cfg.adversarial_steps)
        return fns[0](a2[0]), fns[1](a2[1]), fns[0](a[0]), fns[1](a[1])

    return run


def adversarial_bounds(cfg: FrobeniusConfig, key):
    """Gradient ascent (Adam, lr 0.05) on each ratio from ``adversarial_starts`` random
    starts at scales 0.1 to 10; reports the largest ratio found. Both ratios are pushed up
    in one program (two independent sets of matrices)."""
    run = _adversarial_program(cfg)
    rows = []
    for n in cfg.bound_ns:
        scales = jnp.logspace(-1, 1, cfg.adversarial_starts)[None, :, None, None]
        a2 = scales * jax.random.normal(jax.random.fold_in(key, n), (2, cfg.adversarial_starts, n, n))
        v0, g0, v1, g1 = run(a2)
        rows.append({"n": n, "value_ratio_max": float(v1.max()), "value_ratio_start_max": float(v0.max()),
                     "grad_ratio_max": float(g1.max()), "grad_ratio_start_max": float(g0.max())})
    return rows


INIT_NAMES = ("softmax", "poly3_a0.5", "poly3_a0", "poly3_a1", "poly2_a0.5")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_ratios(key, n: int, samples: int):
    """``||phi(A)||_F / sqrt(N)`` of ``samples`` matrices A ~ N(0,1)^{N x N}, per name of :data:`INIT_NAMES`."""
    a = jax.random.normal(key, (samples, n, n))
    return [diagnostics.frobenius_norm(resolve(name)(a)) / math.sqrt(n) for name in INIT_NAMES]


def init_expectation(cfg: FrobeniusConfig, key):
    """``||phi(A)||_F / sqrt(N)`` for A ~ N(0,1)^{N x N}, against the closed form."""
    rows = []
    for n in cfg.init_ns:
        for name, r in zip(INIT_NAMES, _init_ratios(jax.random.fold_in(key, n), n, cfg.init_samples)):
            if name == "softmax":
                theory = None
            else:
                p, aa = int(name[4]), float(name.split("_a")[1])
                # E||A||_F^2 = N^2 E[s^(2p)] / N^(2a)  ->  ratio = sqrt((2p-1)!!) N^(1/2 - a)
                theory = math.sqrt(_double_factorial(2 * p - 1)) * n ** (0.5 - aa)
            rows.append({"n": n, "activation": name, "ratio_mean": float(r.mean()),
                         "ratio_sd": float(r.std()), "theory": theory})
    return rows


# ------------------------------------------------------------------------ part 3

IMAGE_SIZE = 16
"""The digits are resized to 16x16 so that conv stems give 2x2, 4x4 or 8x8 token grids."""

EVAL_BATCH = 512
"""Batch size of the test-split evaluation."""

TOKENS = (4, 16, 64)
"""Token counts of the 16x16 digits' conv stems (grids 2x2, 4x4, 8x8)."""


def _attention_norms(model, batch):
    _, out = levit.forward(model, batch["x"], return_attention=True)
    return {"attn_frobenius": diagnostics.attention_summary(out.attention)["attn_frobenius"]}


def model_config(cfg: FrobeniusConfig, act_name: str, tokens: int, ds):
    return levit.levit_config(resolve(act_name), depth=cfg.depth, width=cfg.width, num_heads=cfg.heads,
                              num_classes=ds.num_classes, image_size=ds.image_size,
                              channels=ds.channels, grid=int(round(math.sqrt(tokens))))


def train_config(cfg: FrobeniusConfig, seed: int = 0) -> training.TrainConfig:
    return training.TrainConfig(steps=cfg.steps, learning_rate=cfg.learning_rate,
                                warmup_steps=cfg.warmup_steps, log_every=cfg.log_every, seed=seed)


def train_run(cfg: FrobeniusConfig, act_name: str, tokens: int, seed: int) -> dict:
    """One training run's record (no timings: records are deterministic)."""
    ds = data.load_digits(image_size=IMAGE_SIZE)
    model = levit.build(model_config(cfg, act_name, tokens, ds), seed)
    # At initialisation, on the first training batch, before any update.
    first = next(data.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=seed))
    init_frob = training.evaluate(model, _attention_norms, [first])["attn_frobenius"]
    res = training.train(model, levit.classifier_loss, data.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=seed),
                         train_config(cfg, seed), eval_fn=levit.classifier_eval,
                         eval_batches=data.eval_batches(ds.x_test, ds.y_test, EVAL_BATCH))
    h = res.history
    return {
        "activation": act_name, "tokens": tokens, "seed": seed, "depth": cfg.depth,
        "test_accuracy": res.final_eval.get("accuracy"), "final_train_loss": res.final_train.get("loss"),
        "diverged": res.diverged, "attn_frobenius_init": init_frob,
        "step": [r["step"] for r in h],
        "attn_frobenius": [r.get("train/attn_frobenius") for r in h],
        "train_loss": [r.get("train/loss") for r in h],
    }


BOUND_PARTS = {"random_bounds": random_bounds, "adversarial_bounds": adversarial_bounds,
               "init_expectation": init_expectation}
"""Parts 1-2: one work unit each."""


def bound_part(cfg: FrobeniusConfig, name: str) -> list:
    """The rows of one part, from the key ``unit_key(cfg.seed, name)``."""
    return BOUND_PARTS[name](cfg, _common.unit_key(cfg.seed, name))


def units(cfg: FrobeniusConfig) -> dict[str, tuple]:
    """``{chunk name: (function, *arguments)}`` of every work unit: the longest training run
    (largest N) first, then the bounds, then the other runs."""
    train = {f"train-{a}-N{n}-s{s}": (train_run, cfg, a, n, s)
             for n in sorted(cfg.tokens, reverse=True) for a in cfg.train_activations for s in range(cfg.seeds)}
    first = next(iter(train))
    return {first: train[first], **{name: (bound_part, cfg, name) for name in BOUND_PARTS}, **train}


def _unit(run, name: str, fn, *args):
    """Compute one unit in a worker and save it as its own chunk."""
    record, seconds = _common.timed(fn, *args)
    _common.save_unit(run, name, record, seconds)
    return record


# ------------------------------------------------------------------------ figures


def figures(rand, adv, init_rows, runs, cfg, out: Path):
    plt = _common.pyplot()
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind in sorted({r["kind"] for r in rand}):
        sel = sorted((r for r in rand if r["kind"] == kind), key=lambda r: r["n"])
        axes[0].plot([r["n"] for r in sel], [r["value_ratio_max"] for r in sel], "o-", ms=3, label=kind)
        axes[1].plot([r["n"] for r in sel], [r["grad_ratio_max"] for r in sel], "o-", ms=3, label=kind)
    axes[0].plot([r["n"] for r in adv], [r["value_ratio_max"] for r in adv], "k*--", label="adversarial")
    axes[1].plot([r["n"] for r in adv], [r["grad_ratio_max"] for r in adv], "k*--", label="adversarial")
    for ax, t in zip(axes[:2], ("||softmax(A)||_F / sqrt(N)", "||d softmax/dA||_F / (2 sqrt(N))")):
        ax.axhline(1, color="r", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel(t + " (max over samples)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    for name in sorted({r["activation"] for r in init_rows}):
        sel = [r for r in init_rows if r["activation"] == name]
        l, = axes[2].plot([r["n"] for r in sel], [r["ratio_mean"] for r in sel], "o-", ms=3, label=name)
        if sel[0]["theory"] is not None:
            axes[2].plot([r["n"] for r in sel], [r["theory"] for r in sel], ":", color=l.get_color())
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("N")
    axes[2].set_ylabel("||phi(A)||_F / sqrt(N), A ~ N(0,1) (dotted: theory)")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle("Part 1-2: softmax's Frobenius bounds (red line = bound) and polynomial scale at init")
    fig.tight_layout()
    paths.append(_common.save_figure(fig, out / "bounds.png"))

    acts = list(cfg.train_activations)
    fig, axes = plt.subplots(len(cfg.tokens), len(acts), figsize=(3.2 * len(acts), 2.6 * len(cfg.tokens)),
                             squeeze=False, sharex=True)
    for i, n in enumerate(cfg.tokens):
        for j, act in enumerate(acts):
            ax = axes[i][j]
            for r in (r for r in runs if r["tokens"] == n and r["activation"] == act):
                f = np.asarray([[np.nan if v is None else v for v in layer] for layer in r["attn_frobenius"]],
                               float) / math.sqrt(n)
                for layer in range(f.shape[1]):
                    ax.plot(r["step"], f[:, layer], color=plt.cm.viridis(layer / max(f.shape[1] - 1, 1)),
                            lw=1, alpha=0.8 if r["seed"] == 0 else 0.4)
            ax.axhline(1, color="r", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(act, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"N={n}: ||A||_F/sqrt(N)")
            if i == len(cfg.tokens) - 1:
                ax.set_xlabel("step")
    fig.suptitle("Part 3: attention Frobenius norm per layer during training (colour: layer, dark = first; "
                 "dotted: softmax's bound)")
    fig.tight_layout()
    paths.append(_common.save_figure(fig, out / "frobenius_training.png"))
    return paths


def summarise(rand, adv, runs, cfg: FrobeniusConfig) -> dict:
    """Worst ratios, and per (activation, N) the per-layer norms over training (finite
    values only; diverged runs counted)."""
    summary = {
        "softmax_value_ratio_max_random": max(r["value_ratio_max"] for r in rand),
        "softmax_grad_ratio_max_random": max(r["grad_ratio_max"] for r in rand),
        "softmax_value_ratio_max_adversarial": max(r["value_ratio_max"] for r in adv),
        "softmax_grad_ratio_max_adversarial": max(r["grad_ratio_max"] for r in adv),
        "training": [],
    }
    for n in cfg.tokens:
        for act in cfg.train_activations:
            sel = [r for r in runs if r["tokens"] == n and r["activation"] == act]
            fro = [np.asarray(r["attn_frobenius"], float) / math.sqrt(n) for r in sel]
            summary["training"].append({
                "activation": act, "tokens": n,
                "ratio_init_mean": _common.mean_sd(
                    np.mean(np.asarray(r["attn_frobenius_init"], float)) / math.sqrt(n) for r in sel)[0],
                "ratio_final_mean": _common.mean_sd(np.mean(f[-1]) for f in fro)[0],
                "ratio_max_over_training": max((float(v) for f in fro for v in f[np.isfinite(f)]),
                                               default=math.nan),
                "test_accuracy": _common.mean_sd(r["test_accuracy"] for r in sel)[:2],
                "diverged": sum(r["diverged"] for r in sel),
            })
    return summary


def table(summary: dict, cfg: FrobeniusConfig) -> str:
    rows = [[t["activation"], t["tokens"], f"{t['ratio_init_mean']:.3g}", f"{t['ratio_final_mean']:.3g}",
             f"{t['ratio_max_over_training']:.3g}",
             f"{t['test_accuracy'][0]:.3f}" + (f" ± {t['test_accuracy'][1]:.3f}" if cfg.seeds > 1 else " (1 seed)")
             + (f" ({t['diverged']} diverged)" if t["diverged"] else "")]
            for t in summary["training"]]
    return _common.format_table(
        ["activation", "N", "||A||_F/sqrt(N) init", "final", "max in training", "test acc"], rows)


def parse_args(argv=None):
    p = _common.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/frobenius_norm")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run with a different config in --out")
    p.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    p.add_argument("--workers", type=int, default=_common.default_workers())
    _common.add_config_flags(p, FrobeniusConfig)
    args = p.parse_args(argv)
    return args, FrobeniusConfig(**_common.config_values(args, FrobeniusConfig, QUICK if args.quick else {}))


def validate(cfg: FrobeniusConfig, workers: int) -> None:
    """Every flag on its own (cross-field rules: :func:`prepare`)."""
    for name in ("bound_ns", "init_ns"):
        _common.check_each(name, getattr(cfg, name), _common.check_int)
    _common.check_each("bound_scales", cfg.bound_scales, _common.check_number)
    for name in ("bound_samples", "adversarial_starts", "adversarial_steps", "init_samples", "depth",
                 "width", "heads", "steps", "batch_size", "log_every", "seeds"):
        _common.check_int(name, getattr(cfg, name))
    for name in ("warmup_steps", "seed"):
        _common.check_int(name, getattr(cfg, name), lo=0)
    _common.check_number("learning_rate", cfg.learning_rate)
    _common.check_each("tokens", cfg.tokens, _common.check_choice, TOKENS)
    _common.check_each("train_activations", cfg.train_activations, check_train_activation)
    _common.check_int("workers", workers)


def prepare(argv=None):
    """Parse and check every flag and open the output folder; no work."""
    args, cfg = parse_args(argv)
    validate(cfg, args.workers)
    ds = data.load_digits(image_size=IMAGE_SIZE)
    _common.check_number("batch_size", cfg.batch_size, 0, len(ds.x_train), hi_closed=True)
    train_config(cfg)  # warmup_steps < steps
    for act in cfg.train_activations:
        for n in cfg.tokens:  # e.g. heads must divide width
            model_config(cfg, act, n, ds)
    check_memory(cfg, ds, args.workers)
    run = _common.open_run(args.out, cfg, args.overwrite, ("bounds.png", "frobenius_training.png"))
    return args, cfg, run


def check_memory(cfg: FrobeniusConfig, ds, workers: int) -> None:
    """The largest program of each part must fit in one device's memory, ``workers`` at a time:
    the bounds at the largest N, and the training step at the most tokens (the activations
    change no shape)."""
    key = jax.eval_shape(lambda: _common.unit_key(cfg.seed, "bounds"))
    n = max(cfg.bound_ns)
    sample = _random_kinds(cfg)[1]
    memory.require_program(f"bound_ns={n}, bound_samples={cfg.bound_samples}: the random-bounds program",
                           lambda k: sample(k, n), key, copies=workers)
    starts = jax.ShapeDtypeStruct((2, cfg.adversarial_starts, n, n), jnp.float32)
    memory.require_program(f"bound_ns={n}, adversarial_starts={cfg.adversarial_starts}: the adversarial-bounds "
                           "program", _adversarial_program(cfg), starts, copies=workers)
    n = max(cfg.init_ns)
    memory.require_program(f"init_ns={n}, init_samples={cfg.init_samples}: the initial-norm program",
                           lambda k: _init_ratios(k, n, cfg.init_samples), key, copies=workers)
    tokens = max(cfg.tokens)
    _common.check_training_memory(
        f"width={cfg.width}, depth={cfg.depth}, batch_size={cfg.batch_size}, tokens={tokens}",
        lambda: levit.build(model_config(cfg, cfg.train_activations[0], tokens, ds)), levit.classifier_loss,
        _common.batch_like(cfg.batch_size, x=ds.x_train, y=ds.y_train), train_config(cfg),
        eval_fn=levit.classifier_eval,
        eval_batch=_common.batch_like(min(EVAL_BATCH, len(ds.x_test)), x=ds.x_test, y=ds.y_test),
        workers=workers)


def execute(args, cfg: FrobeniusConfig, run) -> int:
    t0 = time.perf_counter()
    todo = units(cfg)
    finished, _, _ = _common.load_units(run, todo)
    jobs = [(run, name, *job) for name, job in todo.items() if name not in finished]
    print(f"{len(finished)} of {len(todo)} units already in {run.path}/chunks")
    bar = tqdm(total=len(todo), initial=len(finished), desc="frobenius_norm", dynamic_ncols=True)

    def on_result(job, r):
        bar.update(1)
        if job[2] is bound_part:
            tqdm.write(f"{job[1]} done")
            return
        last = np.asarray(r["attn_frobenius"][-1], float) / math.sqrt(r["tokens"])
        tqdm.write(f"N={r['tokens']:3d} {r['activation']:11s} seed {r['seed']}: test acc "
                   f"{r['test_accuracy']}, final ||A||_F/sqrt(N) per layer {np.round(last, 2).tolist()}")

    _common.parallel_map(_unit, jobs, args.workers, on_result)
    bar.close()
    records, seconds, non_finite = _common.load_units(run, todo)
    rand, adv, init_rows = (records[name] for name in BOUND_PARTS)
    runs = [records[name] for name in todo if name not in BOUND_PARTS]
    fig_paths = figures(rand, adv, init_rows, runs, cfg, run.path)
    summary = summarise(rand, adv, runs, cfg)
    text = table(summary, cfg)
    print("softmax bounds (ratio <= 1 required): value max random "
          f"{summary['softmax_value_ratio_max_random']:.4f}, adversarial {summary['softmax_value_ratio_max_adversarial']:.4f}; "
          f"gradient max random {summary['softmax_grad_ratio_max_random']:.4f}, "
          f"adversarial {summary['softmax_grad_ratio_max_adversarial']:.4f}")
    print("||phi(A)||_F/sqrt(N) at Gaussian A (mean, theory):")
    for r in init_rows:
        th = "" if r["theory"] is None else f" (theory {r['theory']:.3g})"
        print(f"  N={r['n']:5d} {r['activation']:11s} {r['ratio_mean']:.3g}{th}")
    print(text)
    _common.finish(run, {
        "script": "frobenius_norm", "config": dataclasses.asdict(cfg), "environment": _common.environment(),
        "bounds_random": rand, "bounds_adversarial": adv, "init_expectation": init_rows,
        "runs": runs, "summary": summary, "table": text, "diverged_runs": sum(r["diverged"] for r in runs),
        "figures": [p.name for p in fig_paths],
    }, non_finite, seconds, time.perf_counter() - t0)
    return 0


def main(argv=None) -> int:
    return _common.cli("frobenius_norm", prepare, execute, argv)


if __name__ == "__main__":
    raise SystemExit(main())
