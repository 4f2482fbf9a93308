"""A small, shared, jit-compiled training loop for Flax NNX models with optax.

The loop knows nothing about classifiers: it takes a model, a loss function and a batch
iterator. A later causal LM uses the same loop with another loss.

    loss_fn(model, batch, key) -> (loss, metrics)

``metrics`` is a dict of arrays (scalars or small arrays such as per-layer attention norms)
computed inside the jitted step from what the forward pass returns, so diagnostics cost no
extra pass and no host synchronisation: metrics stay on the device and are fetched (and
averaged over the interval) only every ``log_every`` steps.

Implementation: the functional split/merge pattern of ``flax.nnx``. The model is split into
its ``nnx.Param`` state (optimised) and everything else (carried through, e.g. RNG or batch
statistics), a pure step function is ``jax.jit``-compiled once per (graph, loss, optimiser)
and cached, so runs that differ only in seed or data reuse the compiled step.

Optimiser: AdamW (weight decay on matrices only, not on biases, norms' scales or
embeddings' vectors) with linear warmup and cosine decay
(``optax.warmup_cosine_decay_schedule``) and global-norm gradient clipping.

Reproducibility: the model's initial parameters come from the caller's ``nnx.Rngs``, the
batch order from the caller's iterator (see :func:`shaped_attn.data.batches`), and the
per-step key is ``fold_in(PRNGKey(config.seed), step)``; the same inputs give bit-identical
results on the same device and software versions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import memory

Array = jax.Array
Metrics = Mapping[str, Array]
LossFn = Callable[[nnx.Module, Any, Array], tuple[Array, Metrics]]
EvalFn = Callable[[nnx.Module, Any], Metrics]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and logging of :func:`train`.

    Attributes:
        steps: number of optimisation steps.
        learning_rate: peak learning rate (after warmup).
        warmup_steps: linear warmup from ``init_lr_fraction * learning_rate``.
        init_lr_fraction, final_lr_fraction: start and end of the schedule as fractions of
            the peak (cosine decay from the peak to ``final_lr_fraction * learning_rate``).
        weight_decay: AdamW decoupled weight decay (matrices only).
        b1, b2, eps: Adam moments.
        grad_clip_norm: clip the global gradient norm to this value; ``None``: no clipping.
        log_every: fetch and average training metrics every this many steps (and at the end).
        eval_every: evaluate every this many steps; 0: only at the end.
        seed: seed of the per-step keys passed to the loss (dropout, sampling).
        max_loss: a logged training loss above this counts as diverged (exploding), like a
            non-finite one; ``None``: only non-finite losses do.
    """

    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    init_lr_fraction: float = 0.0
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: Optional[float] = 1.0
    log_every: int = 50
    eval_every: int = 0
    seed: int = 0
    max_loss: Optional[float] = None

    def __post_init__(self):
        for name in ("steps", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        for name in ("warmup_steps", "eval_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} must be an integer >= 0")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a positive number")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm={self.grad_clip_norm!r} must be > 0 or None")
        if self.max_loss is not None and not (self.max_loss > 0 and math.isfinite(self.max_loss)):
            raise ValueError(f"max_loss={self.max_loss!r} must be a positive number or None")

    def optimiser_fields(self) -> "TrainConfig":
        """This config with the fields that do not affect the compiled step reset (the peak
        learning rate is an argument of the step: a learning-rate sweep compiles once)."""
        return dataclasses.replace(self, learning_rate=1.0, log_every=1, eval_every=0, seed=0,
                                   max_loss=None)


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup then cosine decay (``optax.warmup_cosine_decay_schedule``)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=config.init_lr_fraction * config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.final_lr_fraction * config.learning_rate,
    )


def _decay_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _chain(config: TrainConfig, decay: optax.GradientTransformation) -> optax.GradientTransformation:
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    if config.weight_decay:
        parts.append(decay)
    parts.append(optax.scale_by_learning_rate(make_schedule(config)))
    return optax.chain(*parts)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup-cosine schedule, for a pytree of
    parameters: ``chain(clip_by_global_norm, scale_by_adam, add_decayed_weights(mask),
    scale_by_learning_rate)``, which is ``optax.adamw`` after clipping. Weight decay applies
    to parameters with at least two dimensions (matrices, kernels), not to biases or scales.
    """
    return _chain(config, optax.add_decayed_weights(config.weight_decay, _decay_mask))


@functools.lru_cache(maxsize=128)
def _compiled_step(graphdef, loss_fn: LossFn, opt_config: TrainConfig, ensemble: bool):
    """The jitted step and optimiser-state init, cached per (graph, loss, optimiser).

    ``opt_config`` has peak learning rate 1; the step multiplies the optimiser's updates by
    its argument ``peak_lr`` (the last transformation is linear in the learning rate, so this
    is :func:`make_optimizer` at that rate)."""
    tx = make_optimizer(opt_config)
    schedule = make_schedule(opt_config)

    def step(params, rest, opt_state, batch, base_key, step_idx, peak_lr):
        key = jax.random.fold_in(base_key, step_idx)
        model = nnx.merge(graphdef, params, rest)

        def objective(m):
            loss, metrics = loss_fn(m, batch, key)
            return loss, dict(metrics)

        (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: peak_lr * u, updates))
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
            "lr": peak_lr * schedule(step_idx),
        }
        return params, new_rest, opt_state, metrics

    if ensemble:  # independent models along a leading axis; the step index is shared
        step = jax.vmap(step, in_axes=(0, 0, 0, 0, 0, None, None))
        init = jax.jit(jax.vmap(tx.init))
    else:
        init = jax.jit(tx.init)
    return init, jax.jit(step)


@functools.lru_cache(maxsize=128)
def _compiled_eval(graphdef, eval_fn: EvalFn, ensemble: bool):
    def run(params, rest, batch):
        return dict(eval_fn(nnx.merge(graphdef, params, rest), batch))

    if ensemble:  # every model sees the same evaluation batch
        run = jax.vmap(run, in_axes=(0, 0, None))
    return jax.jit(run)


def _batch_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1


def _mean_metrics(records: list[Mapping[str, Array]], weights: Optional[list[float]] = None):
    """Average a list of metric dicts on the host (one ``device_get`` for the list).

    Returns ``{name: ndarray}``; leading axes of the metrics (e.g. an ensemble axis) are kept.
    """
    host = jax.device_get(records)
    w = np.ones(len(host)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {
        k: np.tensordot(w, np.stack([np.asarray(r[k], dtype=np.float64) for r in host]), axes=1)
        for k in host[0]
    }


def _as_python(metrics: Mapping[str, np.ndarray], index: Optional[int] = None) -> dict[str, Any]:
    """Host arrays -> floats / nested lists, optionally taking one member of an ensemble."""
    return {k: (v if index is None else v[index]).tolist() for k, v in metrics.items()}


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _unstack(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


def _evaluate_split(graphdef, params, rest, eval_fn, batches, ensemble: bool):
    fn = _compiled_eval(graphdef, eval_fn, ensemble)
    records, sizes = [], []
    for batch in batches:
        records.append(fn(params, rest, batch))
        sizes.append(_batch_size(batch))
    if not records:
        raise ValueError("evaluation needs at least one batch")
    return _mean_metrics(records, sizes)


def evaluate(model: nnx.Module, eval_fn: EvalFn, batches: Iterable[Any]) -> dict[str, Any]:
    """Batch-size-weighted mean of ``eval_fn(model, batch)`` over ``batches`` (jitted).

    ``eval_fn`` returns a dict of per-batch means (e.g. loss, accuracy).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _as_python(_evaluate_split(graphdef, params, rest, eval_fn, batches, False))


def step_programs(model: nnx.Module, loss_fn: LossFn, batch: Any, config: TrainConfig = TrainConfig(), *,
                  models: int = 1, eval_fn: Optional[EvalFn] = None, eval_batch: Any = None) -> list[tuple]:
    """``(fn, *args)`` of the compiled training step of ``models`` models shaped like ``model``
    (an ensemble when ``models > 1``) on ``batch`` and, with ``eval_fn``, of one evaluation of
    ``eval_batch``, the arguments as ``jax.ShapeDtypeStruct``s: what
    :func:`shaped_attn.memory.program_bytes` measures (docs/experiments.md §6). ``model`` may be
    ``nnx.eval_shape(lambda: Model(...))``: nothing is allocated."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ensemble = models > 1
    shapes = lambda tree, lead=(): jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + np.shape(x), x.dtype), tree)
    stacked = lambda tree: shapes(tree, (models,) if ensemble else ())
    params, rest = stacked(params), stacked(rest)
    init, step = _compiled_step(graphdef, loss_fn, config.optimiser_fields(), ensemble)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    key = stacked(jax.eval_shape(jax.random.PRNGKey, 0))
    programs = [(step, params, rest, jax.eval_shape(init, params), stacked(batch), key, scalar(jnp.int32),
                 scalar(jax.tree.leaves(params)[0].dtype))]
    if eval_fn is not None:  # every model of an ensemble sees the same evaluation batch
        programs.append((_compiled_eval(graphdef, eval_fn, ensemble), params, rest, shapes(eval_batch)))
    return programs


def memory_bytes(model: nnx.Module, loss_fn: LossFn, batch: Any, config: TrainConfig = TrainConfig(),
                 **kwargs) -> int:
    """Device memory of one training step (and evaluation) of :func:`step_programs`, the larger
    of the two: from XLA's memory analysis at these shapes, nothing allocated or run."""
    return max(memory.program_bytes(*p) for p in step_programs(model, loss_fn, batch, config, **kwargs))


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns (one per model for :func:`train_ensemble`).

    Attributes:
        model: the trained model (the same object that was passed in, updated in place).
        history: one record per logging interval: ``step`` and ``train/<metric>`` (means
            over the interval), plus ``eval/<metric>`` at evaluation steps.
        final_eval: the last evaluation (empty without ``eval_fn``).
        final_train: the last logging interval's training metrics.
        wall_time_s: seconds spent in the loop, compilation included (for an ensemble, the
            time of the whole ensemble).
        diverged: True when a logged training loss was not finite or above ``max_loss``.
    """

    model: nnx.Module
    history: list[dict[str, Any]]
    final_eval: dict[str, Any]
    final_train: dict[str, Any]
    wall_time_s: float
    diverged: bool = False


def train(
    model: nnx.Module,
    loss_fn: LossFn,
    train_batches: Iterable[Any],
    config: TrainConfig = TrainConfig(),
    *,
    eval_fn: Optional[EvalFn] = None,
    eval_batches: Optional[Callable[[], Iterable[Any]] | Iterable[Any]] = None,
    progress: bool | str = False,
    callback: Optional[Callable[[dict[str, Any]], None]] = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` steps of ``loss_fn``.

    Arguments:
        model: any ``nnx.Module``; its ``nnx.Param`` variables are optimised.
        loss_fn: ``loss_fn(model, batch, key) -> (loss, metrics)``; pure, traced under jit;
            use ``key`` for dropout or sampling (it differs at every step). Pass a function
            defined once (module level), not a fresh lambda, so the compiled step is reused.
        train_batches: iterable of batches (pytrees of arrays with fixed shapes); must yield
            at least ``config.steps`` batches.
        config: optimiser, schedule, logging.
        eval_fn: ``eval_fn(model, batch) -> metrics`` (per-batch means), optional.
        eval_batches: the evaluation batches, a list or a zero-argument callable returning
            an iterable (called at each evaluation).
        progress: show a tqdm bar (a string is used as its description).
        callback: called with each history record as it is written.

    Returns:
        a :class:`TrainResult`. Training stops early (``diverged=True``) when a logged loss
        is not finite or exceeds ``config.max_loss``.
    """
    return _train([model], loss_fn, [train_batches], [config.seed], config, eval_fn=eval_fn,
                  eval_batches=eval_batches, progress=progress, callback=callback,
                  ensemble=False)[0]


def train_ensemble(
    models: Sequence[nnx.Module],
    loss_fn: LossFn,
    train_batches: Sequence[Iterable[Any]],
    config: TrainConfig = TrainConfig(),
    *,
    seeds: Optional[Sequence[int]] = None,
    eval_fn: Optional[EvalFn] = None,
    eval_batches: Optional[Callable[[], Iterable[Any]] | Iterable[Any]] = None,
    progress: bool | str = False,
    callback: Optional[Callable[[int, dict[str, Any]], None]] = None,
) -> list[TrainResult]:
    """Train several independent models of one architecture together, one compiled step.

    The step of :func:`train` is ``jax.vmap``-ed over the models: each model has its own
    parameters, optimiser state (gradient clipping and AdamW are per model), batch stream
    (``train_batches[i]``) and step keys (from ``seeds[i]``, default ``config.seed + i``).
    It is the same computation as training each model alone; the results agree with
    :func:`train` up to floating-point reassociation in the batched kernels, and are
    bit-reproducible for the same inputs. Used to run several seeds of one configuration
    for the price of one compilation.

    Arguments are those of :func:`train`, one per model where a sequence is asked for; the
    models must share their structure (same config, any initialisation). ``callback`` is
    called with ``(model_index, record)``. Training runs all ``config.steps`` steps even
    when a model diverges (its ``diverged`` flag is set).
    """
    models = list(models)
    if not models:
        raise ValueError("train_ensemble needs at least one model")
    if len(train_batches) != len(models):
        raise ValueError(f"{len(models)} models but {len(train_batches)} batch streams")
    seeds = [config.seed + i for i in range(len(models))] if seeds is None else list(seeds)
    if len(seeds) != len(models):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds")
    return _train(models, loss_fn, list(train_batches), seeds, config, eval_fn=eval_fn,
                  eval_batches=eval_batches, progress=progress, callback=callback,
                  ensemble=True)


def _train(models, loss_fn, train_batches, seeds, config, *, eval_fn, eval_batches, progress,
           callback, ensemble):
    if (eval_fn is None) != (eval_batches is None):
        raise ValueError("pass eval_fn and eval_batches together")
    splits = [nnx.split(m, nnx.Param, ...) for m in models]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _, _ in splits[1:]):
        raise ValueError("all models of an ensemble must have the same structure")
    init, step_fn = _compiled_step(graphdef, loss_fn, config.optimiser_fields(), ensemble)
    if ensemble:
        params = _stack([p for _, p, _ in splits])
        rest = _stack([r for _, _, r in splits])
        base_key = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    else:
        _, params, rest = splits[0]
        base_key = jax.random.PRNGKey(seeds[0])
    opt_state = init(params)
    peak_lr = jnp.asarray(config.learning_rate, jax.tree.leaves(params)[0].dtype)
    n_models = len(models)

    def run_eval():
        batches = eval_batches() if callable(eval_batches) else eval_batches
        return _evaluate_split(graphdef, params, rest, eval_fn, batches, ensemble)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=progress if isinstance(progress, str) else "train",
                   leave=False, dynamic_ncols=True)
    histories: list[list[dict[str, Any]]] = [[] for _ in models]
    pending: list[Metrics] = []
    last_train: Optional[dict[str, np.ndarray]] = None
    last_eval: Optional[dict[str, np.ndarray]] = None
    diverged = np.zeros(n_models, dtype=bool)
    t0 = time.perf_counter()
    iterators = [iter(b) for b in train_batches]
    for step in range(1, config.steps + 1):
        try:
            batch = [next(it) for it in iterators]
        except StopIteration:
            raise ValueError(f"train_batches ran out after {step - 1} of {config.steps} steps") from None
        batch = jax.tree.map(lambda *xs: np.stack(xs), *batch) if ensemble else batch[0]
        params, rest, opt_state, metrics = step_fn(
            params, rest, opt_state, batch, base_key, jnp.asarray(step - 1, jnp.int32), peak_lr
        )
        pending.append(metrics)
        log_now = step % config.log_every == 0 or step == config.steps
        eval_now = eval_fn is not None and (
            step == config.steps or (config.eval_every and step % config.eval_every == 0)
        )
        if log_now or eval_now:
            if pending:
                last_train = _mean_metrics(pending)
                pending = []
            if eval_now:
                last_eval = run_eval()
            for i in range(n_models):
                idx = i if ensemble else None
                record: dict[str, Any] = {"step": step}
                if last_train is not None:
                    record.update({f"train/{k}": v for k, v in _as_python(last_train, idx).items()})
                if eval_now:
                    record.update({f"eval/{k}": v for k, v in _as_python(last_eval, idx).items()})
                histories[i].append(record)
                if callback is not None:
                    callback(*((i, record) if ensemble else (record,)))
            loss = np.atleast_1d(last_train["loss"])
            diverged |= ~np.isfinite(loss)
            if config.max_loss is not None:
                diverged |= loss > config.max_loss
            if bar is not None:
                bar.set_postfix(loss=np.array2string(loss, precision=4, separator=","))
        if bar is not None:
            bar.update(1)
        if not ensemble and diverged[0]:
            break
    if bar is not None:
        bar.close()
    if eval_fn is not None and last_eval is None:  # stopped early, before any evaluation
        last_eval = run_eval()
    wall = time.perf_counter() - t0
    results = []
    for i, m in enumerate(models):
        idx = i if ensemble else None
        nnx.update(m, *((_unstack(params, i), _unstack(rest, i)) if ensemble else (params, rest)))
        results.append(
            TrainResult(
                model=m,
                history=histories[i],
                final_eval={} if last_eval is None else _as_python(last_eval, idx),
                final_train={} if last_train is None else _as_python(last_train, idx),
                wall_time_s=wall,
                diverged=bool(diverged[i]),
            )
        )
    return results


# ------------------------------------------------------------------ classification helpers


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy of integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of argmax predictions equal to the labels."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
