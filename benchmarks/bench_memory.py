"""Peak memory of a chunked Monte Carlo as the number of samples grows (it must stay flat).

Each point is a fresh subprocess (``python bench_memory.py --worker ...``) that runs
``sde.simulate_finite`` (gram sampler) with a fixed ``chunk_size``, keeps only the last-layer
``V`` of each chunk (as a streaming analysis would), and exits. Its peak resident set size is
read by the parent from ``os.wait4`` (the child's ``rusage``; what
``resource.getrusage(RUSAGE_CHILDREN)`` gives a parent with this single child).

``streaming`` decides ``flat``: peak RSS growth from the smallest to the largest sample count
below max(50 MB, 10 % of the smallest peak). We also run ``simulate_finite`` itself, which
returns every layer's ``V`` and therefore must grow with its result (``samples * (depth + 1) *
m^2 * 4`` bytes, ``result_mb``); ``growth_over_result`` is its peak growth divided by the
growth of that result (1 = nothing but the result is held; the chunk list, the concatenation
and the temporaries of ``stop_samples`` add to it).
"""

from __future__ import annotations

import json
import sys

from common import BENCH_DIR, run_process


def worker(mode: str, samples: int, chunk: int, width: int, depth: int, m: int) -> dict:
    import jax
    import numpy as np

    from bench_finite import block_config, v0
    from sde import FiniteSampler, simulate_finite

    key = jax.random.key(0)
    if mode == "streaming":
        runner = FiniteSampler(v0(m), block_config(), width=width, depth=depth, sampler="gram")
        # copy: a slice of the chunk would keep the whole chunk's buffer alive
        last = [runner.chunk(key, s, min(s + chunk, samples))[:, -1].copy() for s in range(0, samples, chunk)]
        V_last = np.concatenate(last)
        result_bytes = V_last.nbytes
    else:
        res = simulate_finite(v0(m), block_config(), width=width, depth=depth, num_samples=samples,
                              key=key, sampler="gram", chunk_size=chunk)
        V_last = res.V[:, -1]
        result_bytes = res.V.nbytes
    return {"samples": samples, "result_bytes": int(result_bytes),
            "mean_V11_last": float(np.mean(V_last[:, 0, 0]))}


def measure(mode: str, samples: int, *, chunk: int, width: int, depth: int, m: int) -> dict:
    cmd = [sys.executable, str(BENCH_DIR / "bench_memory.py"), "--worker", mode, str(samples),
           str(chunk), str(width), str(depth), str(m)]
    out, proc = run_process(cmd, timeout=900)
    info = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    return {"mode": mode, "samples": samples, "chunk": chunk, "max_rss_mb": proc["max_rss_mb"],
            "wall_s": proc["wall_s"], "result_mb": info["result_bytes"] / 2**20}


def run(quick: bool = False, log=print, smoke: bool = False) -> dict:
    chunk, width, depth, m = 1024, 128 if quick else 256, 16 if quick else 32, 8
    sizes = (1024, 4096, 16384) if quick else (1024, 4096, 16384, 65536)
    modes = ("streaming", "simulate_finite")
    if smoke:
        chunk, width, depth, m, sizes = 64, 16, 2, 4, (64, 128)
    out = {"settings": {"chunk": chunk, "width": width, "depth": depth, "m": m, "sampler": "gram",
                        "sizes": list(sizes)}}
    for mode in modes:
        rows = [measure(mode, s, chunk=chunk, width=width, depth=depth, m=m) for s in sizes]
        base = rows[0]["max_rss_mb"]
        growth = rows[-1]["max_rss_mb"] - base
        result_growth = rows[-1]["result_mb"] - rows[0]["result_mb"]
        out[mode] = {"rows": rows, "rss_growth_mb": growth, "result_growth_mb": result_growth}
        if mode == "streaming":
            out[mode]["flat"] = bool(growth < max(50.0, 0.1 * base))
            tail = f"flat: {out[mode]['flat']}"
        else:
            out[mode]["growth_over_result"] = growth / result_growth if result_growth > 0 else None
            tail = f"result grows {result_growth:.1f} MB"
        log(f"  {mode}: max RSS " + ", ".join(f"{r['samples']}: {r['max_rss_mb']:.0f} MB" for r in rows)
            + f" ({tail})")
    out["flat"] = out["streaming"]["flat"]
    out["note"] = ("flat (streaming): peak RSS growth from the smallest to the largest sample count "
                   "below max(50 MB, 10 % of the smallest peak)")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, *nums = sys.argv[2:]
        print(json.dumps(worker(mode, *map(int, nums))))
    else:
        print(json.dumps(run("--quick" in sys.argv), indent=2))
