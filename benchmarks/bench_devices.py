"""Scaling of the finite Monte Carlo over devices (sample axis sharded by ``sde.FiniteSampler``).

On a CPU host the devices are virtual: each N runs in a fresh subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N = 1, 2, 4), so the N devices share
the machine's cores. We report samples/s of one compiled gram-sampler chunk (median after a
warm-up, compilation timed separately), the speed-up over N = 1, and whether the sampled
``V`` is the same for every N (sample i always uses ``fold_in(key, i)``).
"""

from __future__ import annotations

import json
import os
import sys

from common import BENCH_DIR, run_process


def worker(samples: int, width: int, depth: int, m: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from bench_finite import block_config, chunk_inputs, v0
    from common import aot_compile, time_calls
    from sde import FiniteSampler
    from sde._helpers import devices

    # The library shards CPU devices only when asked (sde._helpers.devices.SHARD_ON_CPU, off by
    # default); this worker measures exactly that sharding over the forced CPU devices.
    devices.SHARD_ON_CPU = True
    runner = FiniteSampler(v0(m), block_config(), width=width, depth=depth, sampler="gram")
    keys, x0, _ = chunk_inputs(runner, samples)
    compiled, ct = aot_compile(runner._run, keys, x0)
    t = time_calls(lambda: compiled(keys, x0), repeats=repeats, warmup=1)
    V = np.asarray(compiled(keys, x0))
    return {"devices": devices.num_shards(runner.mesh), "device_kind": jax.devices()[0].device_kind,
            **ct, **t,
            "samples_per_s": samples / t["median_s"],
            "samples_layers_per_s": samples * depth / t["median_s"],
            "probe": V[:8, -1].ravel().tolist()}


def run(quick: bool = False, log=print, smoke: bool = False) -> dict:
    samples, width, depth, m = (64, 256, 16, 8) if quick else (256, 256, 64, 8)
    repeats = 2 if quick else 5
    counts = (1, 2, 4)
    if smoke:
        samples, width, depth, m, repeats, counts = 8, 16, 2, 4, 1, (1, 2)
    rows = []
    for n in counts:
        flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, str(BENCH_DIR / "bench_devices.py"), "--worker", str(samples), str(width),
               str(depth), str(m), str(repeats)]
        out, proc = run_process(cmd, env={"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, timeout=900)
        row = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        row["requested_devices"] = n
        row["process_wall_s"] = proc["wall_s"]
        rows.append(row)
    import numpy as np

    ref = np.asarray(rows[0]["probe"])
    for row in rows:
        row["max_abs_diff_vs_1_device"] = float(np.max(np.abs(np.asarray(row.pop("probe")) - ref)))
        row["speedup_vs_1_device"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    log("  devices: " + ", ".join(f"N={r['devices']}: {r['samples_per_s']:.4g} samples/s "
                                  f"(x{r['speedup_vs_1_device']:.2f}, diff {r['max_abs_diff_vs_1_device']:.1e})"
                                  for r in rows))
    return {"settings": {"samples": samples, "width": width, "depth": depth, "m": m, "sampler": "gram",
                         "platform_devices": "XLA_FLAGS=--xla_force_host_platform_device_count=N (CPU)"},
            "rows": rows,
            "note": "virtual CPU devices share the host's cores; on a multi-accelerator host the same "
                    "code shards over the real devices (not forced)"}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*map(int, sys.argv[2:7]))))
    else:
        print(json.dumps(run("--quick" in sys.argv), indent=2))
