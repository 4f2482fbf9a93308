"""Run every benchmark suite and write one results JSON.

    python benchmarks/run.py              # full suite (the lead's measurement, quiet machine)
    python benchmarks/run.py --quick      # under 10 minutes on 2 CPU cores
    python benchmarks/run.py --quick --out /tmp/bench --only finite,compile

Output: ``DIR/results.json`` with ``--out DIR``, else ``benchmarks/results/<machine-tag>.json``
(``<machine-tag>-quick.json`` with ``--quick``). The file is rewritten after every suite, so
an interrupted run keeps what it finished. Keys:

* ``machine``: platform, device kind and count, CPU model and count, versions, load at start.
* ``suites``: raw results per suite (``sde``, ``finite``, ``compile``, ``memory``, ``devices``,
  ``main_job``): timings as medians of repeats after a warm-up, compile times separate.
* ``ratios``: flat ``name -> value``, all measured in this run (see ``TARGETS``).
* ``targets``: ``name -> {"value", "target", "met"}`` for the issue's targets.
* ``errors``: ``suite -> message`` for suites that failed or are missing.

Then ``python benchmarks/readme_table.py FILE`` renders the README table and
``python benchmarks/plot.py FILE`` the cost figure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, fit_power, machine_info, machine_tag  # noqa: E402

SUITES = ("sde", "finite", "compile", "memory", "devices", "main_job")

TARGETS = {
    "sde_structured_vs_generic_m8": (">=", 10.0),
    "sde_structured_vs_numpy_m8": (">=", 20.0),
    "finite_gram_vs_weights": (">=", 20.0),
    "compile_d512_over_d8": ("<=", 2.0),
    "main_job_numpy_over_jax": (">=", 3.0),
    "main_job_numpy_over_jax_4x": (">=", 5.0),
    "sde_rng_floor_fraction_m3": (">=", 0.30),
    "finite_rng_floor_fraction": (">=", 0.70),
}
"""Targets of issues 4, 8 and 17. ``finite_weights_vs_loop`` is reported without a target: both
routes draw the 5 n^2 normals of a layer's weights, so on a CPU the random numbers bound it."""


# ------------------------------------------------------------------------------ SDE suite


def _find_rows(obj, path=()):
    """Lists of dicts with an ``m`` key and a path-steps/s figure, anywhere in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _find_rows(v, path + (str(k),))
    elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        if all("m" in r for r in obj) and any(_rate_key(r) for r in obj):
            yield path, obj
        else:
            for i, v in enumerate(obj):
                yield from _find_rows(v, path + (str(i),))


def _rate_key(row: dict):
    for k in ("path_steps_per_s", "path_steps_per_sec", "steps_per_s"):
        if isinstance(row.get(k), (int, float)):
            return k
    for k, v in row.items():
        if "path_steps" in k and isinstance(v, (int, float)):
            return k
    return None


def sde_cost_vs_m(result: dict) -> dict:
    """``{route: {"m": [...], "path_steps_per_s": [...], "fit": ...}}`` from bench_sde's rows.

    The cost is seconds per path-step; the fit is ``cost ~ m^p`` by log-log least squares.
    """
    curves: dict = {}
    for path, rows in _find_rows(result):
        for r in rows:
            key = _rate_key(r)
            if key is None or not r.get(key):
                continue
            route = str(r.get("noise") or r.get("route") or r.get("method") or r.get("impl") or "/".join(path))
            c = curves.setdefault(route, {"m": [], "path_steps_per_s": []})
            c["m"].append(r["m"])
            c["path_steps_per_s"].append(float(r[key]))
    for c in curves.values():
        order = sorted(range(len(c["m"])), key=lambda i: c["m"][i])
        c["m"] = [c["m"][i] for i in order]
        c["path_steps_per_s"] = [c["path_steps_per_s"][i] for i in order]
        c["fit"] = fit_power(c["m"], [1 / r for r in c["path_steps_per_s"]])
    return curves


def run_sde(quick: bool, log=print) -> dict:
    """``benchmarks/bench_sde.py`` (written separately), imported lazily."""
    if not (BENCH_DIR / "bench_sde.py").exists():
        raise FileNotFoundError("benchmarks/bench_sde.py is missing: the SDE suite was not run")
    bench_sde = importlib.import_module("bench_sde")
    params = inspect.signature(bench_sde.run).parameters
    kwargs = {}
    if "quick" in params:
        kwargs["quick"] = quick
    if "log" in params:
        kwargs["log"] = log
    result = bench_sde.run(**kwargs) if kwargs else bench_sde.run(quick)
    result = dict(result)
    result.setdefault("cost_vs_m", sde_cost_vs_m(result))
    return result


# ------------------------------------------------------------------------------ runner


def run_suite(name: str, quick: bool, log=print, smoke: bool = False) -> dict:
    if name == "sde":
        return run_sde(quick or smoke, log)
    if name == "main_job":
        import numpy_main_job

        return numpy_main_job.compare_with_main_job(quick=quick, log=log, smoke=smoke)
    return importlib.import_module(f"bench_{name}").run(quick=quick, log=log, smoke=smoke)


def collect_ratios(suites: dict) -> dict:
    ratios = {}
    for name in SUITES:
        res = suites.get(name)
        if isinstance(res, dict):
            ratios.update({k: v for k, v in (res.get("ratios") or {}).items()
                           if isinstance(v, (int, float)) and math.isfinite(v)})
    return ratios


def check_targets(ratios: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"value": value, "target": f"{op} {bound:g}", "met": met}
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / jax scalars
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return obj


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced repeats and sizes (< 10 min on 2 cores)")
    p.add_argument("--out", type=Path, default=None, help="directory for results.json")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes that only exercise the code (numbers meaningless)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SUITES)
    if unknown:
        p.error(f"unknown suites {sorted(unknown)}; choose from {SUITES}")

    info = machine_info()
    tag = machine_tag(info)
    suffix = "-smoke" if args.smoke else "-quick" if args.quick else ""
    path = args.out / "results.json" if args.out else BENCH_DIR / "results" / f"{tag}{suffix}.json"
    results = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "smoke": args.smoke,
        "machine_tag": tag,
        "machine": info,
        "suites": {},
        "durations_s": {},
        "errors": {},
        "ratios": {},
        "targets": {},
    }
    start = time.perf_counter()
    print(f"benchmarks on {tag} ({info['device_kind']} x{info['device_count']}, "
          f"{info['cpu_count']} CPUs, jax {info['jax']}) -> {path}", flush=True)
    for name in SUITES:
        if name not in only:
            continue
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            results["suites"][name] = run_suite(name, args.quick, log=lambda s: print(s, flush=True),
                                                smoke=args.smoke)
        except Exception as err:  # record and go on with the other suites
            results["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"  FAILED: {results['errors'][name]}", flush=True)
            if not isinstance(err, FileNotFoundError):
                traceback.print_exc()
        results["durations_s"][name] = time.perf_counter() - t0
        results["ratios"] = collect_ratios(results["suites"])
        results["targets"] = check_targets(results["ratios"])
        results["durations_s"]["total"] = time.perf_counter() - start
        write(path, results)

    try:
        results["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
        write(path, results)
    except OSError:
        pass
    print(f"\nratios (measured in this run, {results['durations_s'].get('total', 0):.0f} s):")
    for key, value in results["ratios"].items():
        t = results["targets"].get(key)
        mark = "" if t is None else f"  target {t['target']}: {'met' if t['met'] else 'MISSED'}"
        print(f"  {key:45s} {value:10.3g}{mark}")
    for key, t in results["targets"].items():
        if t["value"] is None:
            print(f"  {key:45s} {'n/a':>10s}  target {t['target']}: not measured")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
