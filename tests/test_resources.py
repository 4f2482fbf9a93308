"""Resource guards before any work (docs/experiments.md §5), the chunk grouping that makes
results independent of the number of devices (§4), and joining processes: bad sizes are
refused in one line naming the parameter, nothing is left on disk."""

import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import sde
from sde._experiment import resources
from sde._experiment.convergence import slope_width
from sde._experiment.runner import _groups
from shaped_attn.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sde_vs_finite as job  # noqa: E402


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "100000000"], "1.56e+08 SDE steps per path, above 1e+07: raise dt or lower depth"),
        (["--samples", "100000000000", "--chunk", "100000000000"], "samples=100000000000 (depth=48, m=3): the results need"),
        (["--sde-paths", "10000000000"], "sde_paths=10000000000 (depth=48, m=3): the results need"),
        (["--num-processes", "2"], "coordinator, num_processes and process_id go together"),
        (["--coordinator", "host", "--num-processes", "2", "--process-id", "0"], "coordinator='host' must be HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "process_id=2 must be an integer"),
        (["--num-processes", "0"], "num_processes=0 must be an integer >= 1"),
    ],
)
def test_absurd_sizes_are_refused_in_one_line_before_any_output(args, message, capsys, tmp_path):
    start = time.perf_counter()
    assert job.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()
    assert time.perf_counter() - start < 60


def test_an_unwritable_out_is_refused_in_one_line(capsys, tmp_path):
    assert job.main(["--out", "/proc/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out='/proc/no/such/dir' cannot be created or written" in err, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created or written"):
        RunDir(blocker / "run", {"a": 1})


def test_results_memory_names_the_larger_side_and_the_numbers(monkeypatch):
    monkeypatch.setattr(resources, "host_memory", lambda: 2**24)
    cfg = sde.ExperimentConfig(samples=10_000, sde_paths=100, depth=48)
    # three host copies of the m x m float32 states: 49 layers, 76 SDE saves (dt = 0.01, T = 0.75)
    need = 3 * (10_000 * 49 + 100 * 76) * 9 * 4 / 2**30
    with pytest.raises(ValueError, match=f"samples=10000 .*need {need:.3g} GiB of host memory, 0.0156 GiB available"):
        sde.check_resources(cfg)
    with pytest.raises(ValueError, match="sde_paths=100000 "):
        sde.check_resources(sde.ExperimentConfig(samples=100, sde_paths=100_000))
    plan = sde.check_resources(sde.ExperimentConfig(samples=1000, sde_paths=100))
    assert plan.results_bytes == 3 * (1000 * 49 + 100 * 76) * 9 * 4


def test_results_memory_counts_every_unit_of_the_plan():
    cfg = sde.ExperimentConfig(samples=100, sde_paths=50, variants=("unshaped",), gammas=(0.5,), sweep_widths=(32,),
                               convergence_widths=(4, 8), convergence_samples=70, convergence_paths=30,
                               convergence_slope_paths=20)
    assert slope_width(cfg) == 4
    states = (3 * 100 * 49  # shaped and unshaped at gamma, shaped at 0.5: 49 layers each
              + 2 * 50 * 76  # SDE at gamma and at 0.5: 76 saves each
              + 100 * 25  # the sweep width 32 to T = 0.75: 25 layers
              + 3 * 30 + 20  # last states of the SDE at 96, 48, 24 steps and of the ReLU-scaled one
              + 2 * 70)  # last layers of widths 4 and 8
    assert sde.check_resources(cfg).results_bytes == 3 * states * 9 * 4


def test_batches_are_lowered_to_fit_a_device_and_refused_below_one(monkeypatch):
    cfg = sde.ExperimentConfig(width=64, depth=48, chunk=1024)
    full = sde.check_resources(cfg)
    assert (full.finite_batch, full.sde_batch) == (1024, 1024)
    per_sample = (64 * 64 + 49 * 9) * 4  # features of one sample and its 49 Gram matrices
    monkeypatch.setattr(resources, "device_memory", lambda host: 2 * 100 * per_sample)
    plan = sde.check_resources(cfg)
    per_path = (76 + 10) * 9 * 4  # 76 saved states and ten m x m temporaries
    assert plan.finite_batch == 100 and plan.sde_batch == 100 * per_sample // per_path
    monkeypatch.setattr(resources, "device_memory", lambda host: per_sample)
    with pytest.raises(ValueError, match="width=64: one network needs"):
        sde.check_resources(cfg)


def test_chunk_groups_are_consecutive_runs_and_the_short_chunk_runs_alone():
    assert list(_groups([0, 1, 2, 3, 4], 2, -1)) == [[0, 1], [2, 3], [4]]
    assert list(_groups([0, 1, 2, 3, 4], 4, 4)) == [[0, 1, 2, 3], [4]]
    assert list(_groups([1, 2, 4, 5, 6], 2, 6)) == [[1, 2], [4, 5], [6]]
    assert list(_groups([0, 1, 2], 1, 2)) == [[0], [1], [2]]


def test_paths_computed_in_parts_equal_the_whole():
    params, V0 = sde.SDEParams(0.5), 0.8 * np.eye(3) + 0.2
    kw = dict(T=0.2, dt=0.02, key=jax.random.key(7), chunk_size=4)
    whole = sde.solve(V0, params, num_paths=10, **kw)
    parts = [sde.solve(V0, params, num_paths=b - a, first_path=a, **kw) for a, b in ((0, 3), (3, 10))]
    np.testing.assert_array_equal(np.concatenate([p.V for p in parts]), whole.V)
    with pytest.raises(ValueError, match="first_path=-1"):
        sde.solve(V0, params, num_paths=2, first_path=-1, **kw)


def test_joining_after_jax_has_run_stays_single_process_or_is_refused():
    jax.numpy.zeros(1).block_until_ready()  # the backend is up
    assert sde.join_processes() == 1 and sde.join_processes(num_processes=1) == 1
    with pytest.raises(ValueError, match="before any JAX computation"):
        sde.join_processes("127.0.0.1:1234", 2, 0)
