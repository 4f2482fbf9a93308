"""Memory of compiled programs and of training steps (docs/experiments.md §6): exact byte
counts, XLA's analysis against closed forms, the traced bound and the overflow path, one-line
refusals."""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from shaped_attn import config, lm, memory, training
from shaped_attn.models import CausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train_stability  # noqa: E402


def test_array_bytes_is_exact_for_arrays_structs_and_keys():
    tree = {"a": jnp.zeros((3, 5), jnp.float32), "b": jax.ShapeDtypeStruct((10**12, 10**9), jnp.float64),
            "k": jax.random.split(jax.random.key(0), 7)}
    assert memory.array_bytes(tree) == 3 * 5 * 4 + 8 * 10**21 + 7 * jax.random.key(0).dtype.itemsize


def test_program_bytes_of_a_product_is_its_arguments_and_output():
    """x @ y of two n x n float32 matrices: two arguments and one output, no temporaries."""
    n = 512
    x = jax.ShapeDtypeStruct((n, n), jnp.float32)
    need = memory.program_bytes(jnp.matmul, x, x)
    assert 3 * n * n * 4 <= need <= 3 * n * n * 4 + 2**16, need


def test_program_bytes_counts_the_saved_layers_of_a_scan_gradient():
    """The gradient of an L-step tanh recurrence keeps each step's state: the need grows
    linearly in L with a slope of at least one n x n float32 state per step."""
    n = 128

    def loss(w, x, length):
        return jnp.sum(jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=length)[0])

    w = jax.ShapeDtypeStruct((n, n), jnp.float32)
    need = {L: memory.program_bytes(jax.grad(lambda w, x, L=L: loss(w, x, L)), w, w) for L in (8, 16, 32)}
    slope = (need[32] - need[16]) / 16
    assert slope >= n * n * 4 and abs((need[16] - need[8]) / 8 - slope) <= 0.05 * slope, need


def test_programs_beyond_xla_counters_are_not_compiled():
    """A 10^9 x 10^9 product is beyond 64 PiB: the traced values' sum comes back at once."""
    x = jax.ShapeDtypeStruct((10**9, 10**9), jnp.float32)
    start = time.perf_counter()
    assert memory.program_bytes(jnp.matmul, x, x) == 3 * 4 * 10**18
    assert time.perf_counter() - start < 5


def _lm(width=32, depth=2):
    block = config.pre_ln_config(width, num_heads=2, out_proj=True)
    return CausalLM(config.CausalLMConfig(config.StackConfig(block, depth), vocab_size=256, max_len=16),
                    rngs=nnx.Rngs(params=0))


def _batch(size=4, length=16):
    return {"tokens": jax.ShapeDtypeStruct((size, length + 1), jnp.int32), "step": jax.ShapeDtypeStruct((), jnp.int32)}


def test_training_step_holds_parameters_gradients_and_adam_moments():
    """Arguments and outputs alone are the parameters and both Adam moments, twice; an
    ensemble of three needs about three times one model; an abstract model gives the same
    number as a built one."""
    model = _lm()
    params = memory.array_bytes(nnx.state(model, nnx.Param))
    cfg = training.TrainConfig(steps=10, warmup_steps=1)
    one = training.memory_bytes(model, lm.loss, _batch(), cfg)
    assert one >= 6 * params, (one, params)
    assert training.memory_bytes(nnx.eval_shape(_lm), lm.loss, _batch(), cfg) == one
    three = training.memory_bytes(model, lm.loss, _batch(), cfg, models=3)
    assert 2.5 * one <= three <= 3.5 * one, (one, three)
    with_eval = training.memory_bytes(model, lm.loss, _batch(), cfg, eval_fn=lm.evaluate, eval_batch=_batch(512))
    assert with_eval > one  # an evaluation batch 128 times larger is the larger program


def test_traced_values_bound_the_compiled_need():
    """The cheap check's premise: the sum of the traced values is at least XLA's count (a
    product, a scan gradient, a training step with its evaluation)."""
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    scan = lambda w, x: jnp.sum(jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=16)[0])
    programs = [(jnp.matmul, x, x), (jax.grad(scan), x, x),
                *training.step_programs(_lm(), lm.loss, _batch(), training.TrainConfig(steps=10, warmup_steps=1),
                                        eval_fn=lm.evaluate, eval_batch=_batch(64))]
    for fn, *args in programs:
        _, bound = memory._traced(fn, *args)
        assert bound >= memory.program_bytes(fn, *args) - 2**16


def test_require_program_compiles_only_when_the_bound_does_not_fit(monkeypatch):
    n = 1024
    x = jax.ShapeDtypeStruct((n, n), jnp.float32)  # need: 12 MiB (three matrices)
    compiled = []
    need = memory._compiled_need
    monkeypatch.setattr(memory, "_compiled_need", lambda *a: compiled.append(1) or need(*a))
    monkeypatch.setattr(memory, "available_bytes", lambda: (2**30, "device"))
    memory.require_program("n=1024", jnp.matmul, x, x)
    assert not compiled  # 12 MiB of values against 1 GiB: no compile
    monkeypatch.setattr(memory, "available_bytes", lambda: (13 * 2**20, "device"))
    memory.require_program("n=1024", jnp.matmul, x, x)  # the bound is above half: XLA's 12 MiB fits
    assert compiled == [1]
    with pytest.raises(ValueError, match=r"^n=1024 needs 0.0234 GiB of device memory \(2 at a time\), 0.0127 GiB"):
        memory.require_program("n=1024", jnp.matmul, x, x, copies=2)


def test_require_names_the_program_and_both_sizes(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: (2**30, "device"))
    memory.require("width=8: one step", 2**29, copies=2)
    with pytest.raises(ValueError, match=r"^width=8: one step needs 1.5 GiB of device memory \(3 at a time\), "
                                         r"1 GiB available$"):
        memory.require("width=8: one step", 2**29, copies=3)


@pytest.mark.parametrize("args, message", [
    (["--width", "100000000"], "width=100000000, depth=24, batch_size=32, seq_len=128: one training step needs"),
    (["--depths", "6", "100000000"], "width=128, depth=100000000, batch_size=32, seq_len=128: one training step"),
])
def test_train_stability_refuses_a_step_beyond_the_memory(args, message, capsys, tmp_path):
    assert train_stability.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "GiB available" in err, err
    assert not (tmp_path / "o").exists()
