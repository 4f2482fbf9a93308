"""The benchmark runner's pieces at tiny sizes: JSON structure only (no timing assertions)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_compile  # noqa: E402
import bench_finite  # noqa: E402
import common  # noqa: E402
import numpy_main_job  # noqa: E402
import plot  # noqa: E402
import readme_table  # noqa: E402
import rng_floor  # noqa: E402
import run as runner  # noqa: E402


def test_fit_power_recovers_exponent():
    x = np.array([2.0, 4.0, 8.0, 16.0])
    fit = common.fit_power(x, 3.0 * x**1.5)
    assert fit["exponent"] == pytest.approx(1.5)
    assert fit["prefactor"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)


def test_machine_info_and_tag():
    info = common.machine_info()
    for key in ("platform", "device_kind", "device_count", "cpu_count", "jax"):
        assert key in info
    assert common.machine_tag(info).replace("-", "").isalnum()


def test_sampler_loop_and_compile_records():
    g = bench_finite.sampler_rate("gram", width=16, depth=2, m=2, samples=2, repeats=1)
    lp = bench_finite.loop_rate(width=16, depth=2, m=2, samples=2, repeats=1)
    for r in (g, lp):
        for key in ("lower_s", "compile_s", "median_s", "times_s", "samples_layers_per_s"):
            assert key in r
        assert r["samples_layers_per_s"] > 0
    assert g["finite"]
    assert "Python loop" in lp["description"]
    c = bench_compile.stack_forward(2, width=16, m=2, repeats=1)
    assert c["total_s"] == pytest.approx(c["lower_s"] + c["compile_s"])
    assert bench_finite.gram_layer_flops(8, 1024, bartlett=False) == 22 * 64 * 1024
    assert bench_finite.gram_layer_flops(8, 1024, bartlett=True) == 16 * 64 * 1024 + 6 * 512


def test_rng_floors_at_tiny_sizes():
    """The floor programs draw what the parts draw (count, dtype) and time it."""
    f = rng_floor.sde_floor(5, paths=8, steps=3, chunk=4, repeats=1)
    assert f["normals"] == 8 * 3 * 5 and set(f["median_s_by_chunk"]) == {"4", "8"}
    assert f["median_s"] == min(f["median_s_by_chunk"].values()) and f["bulk_normals_per_s"] > 0
    cfg = bench_finite.sized_config(bench_finite.block_config(), 16, None, np.float32)
    count, dfs = rng_floor.reduced_layer_draws(cfg, 2)
    assert count > 0 and len(dfs) > 0
    r = rng_floor.reduced_floor(cfg, m=2, depth=2, samples=2, repeats=1)
    assert r["normals"] == 2 * 2 * count and r["dtype"] == "float32"
    assert r["median_s"] > 0 and r["with_chi_square_median_s"] > 0


def test_numpy_finite_gram_chain_is_consistent():
    V0 = (0.8 * np.eye(3) + 0.2).astype(np.float64)
    V, stopped = numpy_main_job.numpy_finite(V0, width=32, depth=3, gamma=0.35, tau0=1.0, c_plus=0.0,
                                             c_minus=-1.0, num_samples=64, seed=0)
    assert V.shape == (64, 4, 3, 3) and not stopped.any()
    np.testing.assert_allclose(V[:, 0], np.broadcast_to(V0, (64, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(V, np.swapaxes(V, -1, -2), atol=1e-12)
    assert np.all(np.linalg.eigvalsh(V) > 0)


SDE_LIKE = {
    "rows": [
        {"m": m, "noise": noise, "path_steps_per_s": 1e6 / m ** (3 if noise == "structured" else 6)}
        for m in (2, 4, 8) for noise in ("structured", "generic")
    ],
    "ratios": {"sde_structured_vs_generic_m8": 12.0, "sde_structured_vs_numpy_m8": 25.0,
               "sde_rng_floor_fraction_m3": 0.4, "sde_rng_floor_fraction_m8": 0.6},
    "rng_floor": {"m3": {"paths": 16384, "steps": 150, "solve": {"median_s": 5.0},
                         "floor": {"median_s": 2.0, "normals": 36864000, "bulk_normals_per_s": 1e7}}},
}


def fake_results():
    fin = {
        "gram": {"width": 16, "m": 2, "depth": 2, "samples_layers_per_s": 100.0, "s_per_sample_layer": 0.01},
        "weights": {"width": 16, "m": 2, "depth": 2, "samples_layers_per_s": 4.0, "s_per_sample_layer": 0.25},
        "loop": {"width": 16, "m": 2, "depth": 2, "samples_layers_per_s": 1.0, "s_per_sample_layer": 1.0},
        "gram_gflops": {"gflops": 1.0, "fraction_of_peak": 0.01, "matmul_peak_gflops": 100.0},
        "width_sweep": {"m": 2, "depth": 2, "rows": [{"width": w, "s_per_sample_layer": 1e-5 * w}
                                                     for w in (16, 32, 64)],
                        "fit_all": common.fit_power([16, 32, 64], [1e-5 * w for w in (16, 32, 64)]),
                        "fit_width_ge_512": common.fit_power([], [])},
        "fig1_floor": {"reduced": {"samples": 4096, "median_s": 4.0},
                       "floor": {"median_s": 3.0, "with_chi_square_median_s": 3.1}},
        "ratios": {"finite_gram_vs_weights": 25.0, "finite_weights_vs_loop": 4.0,
                   "finite_rng_floor_fraction": 0.75},
    }
    job = {"settings": {"samples": 4096, "sde_paths": 16384}, "jax": {"wall_s": 10.0, "ks_rho": 0.01},
           "numpy": {"wall_s": 40.0, "ks_rho": 0.01}}
    main_job = {"reduced": False, "startup": {"wall_s": 1.5}, "fig1": job, "x4": job,
                "ratios": {"main_job_numpy_over_jax": 4.0, "main_job_numpy_over_jax_4x": 4.0}}
    sde = dict(SDE_LIKE, cost_vs_m=runner.sde_cost_vs_m(SDE_LIKE))
    compile_ = {"ratios": {"compile_d512_over_d8": 1.1}, "stack_forward": [{"depth": 8, "total_s": 1.0}],
                "main_job": {"finite": {"lower_s": 1.0, "compile_s": 2.0}, "sde": {"lower_s": 0.5, "compile_s": 1.0}}}
    suites = {"sde": sde, "finite": fin, "compile": compile_, "main_job": main_job}
    ratios = runner.collect_ratios(suites)
    return {"schema": 1, "created": "2026-01-01T00:00:00+00:00", "quick": True, "smoke": False,
            "machine": common.machine_info(), "suites": suites, "ratios": ratios,
            "targets": runner.check_targets(ratios), "errors": {"memory": "RuntimeError: x"}}


def test_runner_ratios_targets_table_and_plot(tmp_path):
    r = fake_results()
    curves = r["suites"]["sde"]["cost_vs_m"]
    assert curves["structured"]["fit"]["exponent"] == pytest.approx(3.0)
    assert curves["generic"]["fit"]["exponent"] == pytest.approx(6.0)
    t = r["targets"]
    assert set(runner.TARGETS) <= set(t)
    assert t["finite_gram_vs_weights"]["met"] is True
    assert "finite_weights_vs_loop" not in t and r["ratios"]["finite_weights_vs_loop"] == 4.0  # a figure
    assert t["main_job_numpy_over_jax"]["met"] is True and t["main_job_numpy_over_jax_4x"]["met"] is False
    assert t["sde_rng_floor_fraction_m3"]["met"] is True and t["finite_rng_floor_fraction"]["met"] is True
    path = tmp_path / "results.json"
    runner.write(path, r | {"nan": math.nan})
    back = json.loads(path.read_text())
    assert back["nan"] is None and back["ratios"] == r["ratios"]
    table = readme_table.render(back)
    assert "| finite samples x layers/s, gram vs real-weights vmap" in table and "**missed**" in table
    for row in ("start-up", "compiled from scratch", "SDE m = 3, 16384 paths x 150 steps", "RNG floor / time",
                "4096 samples + 16384 SDE paths"):
        assert row in table, row
    md = tmp_path / "README.md"
    md.write_text(f"head\n{readme_table.BEGIN}\nold\n{readme_table.END}\ntail\n")
    readme_table.update(md, table)
    assert "old" not in md.read_text() and md.read_text().startswith("head") and "tail" in md.read_text()
    png = plot.plot(back, tmp_path / "results.png")
    assert png.stat().st_size > 1000
