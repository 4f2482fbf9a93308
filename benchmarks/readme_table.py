"""Render the README performance table (markdown) from a results JSON of ``benchmarks/run.py``.

    python benchmarks/readme_table.py benchmarks/results/<machine-tag>.json          # print
    python benchmarks/readme_table.py RESULTS.json --update README.md                # in place

``--update`` replaces the text between ``<!-- bench-table:begin -->`` and
``<!-- bench-table:end -->`` in the given file (the markers must already be there).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

RATIO_ROWS = (
    ("sde_structured_vs_generic_m8", "SDE path-steps/s, structured vs generic noise (m = 8, 1000 paths)"),
    ("sde_structured_vs_numpy_m8", "SDE path-steps/s, structured (JAX) vs NumPy Euler (m = 8, 1000 paths)"),
    ("finite_gram_vs_weights", "finite samples x layers/s, gram vs real-weights vmap (n = 1024, m = 8, d = 64)"),
    ("finite_weights_vs_loop", "finite samples x layers/s, real-weights vmap vs per-sample loop (same; bounded by the RNG)"),
    ("compile_d512_over_d8", "compile time of the scanned Stack forward, depth 512 / depth 8"),
    ("finite_reduced_vs_gram", "finite samples x layers/s, reduced vs gram sampler (n = 1024, m = 8, d = 64)"),
    ("finite_reduced_vs_gram_fig1", "finite samples x layers/s, reduced vs gram sampler (fig1: n = 200, m = 3, d = 150)"),
    ("main_job_numpy_over_jax", "main job wall time at the fig1 settings, NumPy / JAX (sizes in the figures table)"),
    ("main_job_numpy_over_jax_4x", "main job wall time at 4x the fig1 samples and paths, NumPy / JAX"),
    ("sde_rng_floor_fraction_m3", "SDE at m = 3 (16384 paths, fig1 grid): RNG floor / solve time"),
    ("sde_rng_floor_fraction_m8", "SDE at m = 8 (same): RNG floor / solve time"),
    ("finite_rng_floor_fraction", "reduced finite sampler at fig1 size (4096 samples, 1024 quick): RNG floor / time"),
)


def _g(x, fmt=".3g", unit=""):
    if x is None:
        return "n/a"
    return f"{x:{fmt}}{unit}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def machine_line(r: dict, source: str) -> str:
    m = r["machine"]
    if m["platform"] == "cpu":
        hw = f"{m['cpu_model']}, {m['cpu_count']} CPU cores"
    else:
        hw = f"{m['device_count']} x {m['device_kind']} ({m['platform']}), host {m['cpu_model']}"
    mode = "smoke" if r.get("smoke") else "quick" if r.get("quick") else "full"
    return (f"Measured on {hw}; jax {m['jax']}; {mode} run of `benchmarks/run.py` on "
            f"{r['created'][:10]} (`{source}`){_load(m)}. Ratios are measured within that one run.")


def _load(m: dict) -> str:
    loads = [f"{m[k]:.1f} at {w}" for k, w in (("load_average_1m_at_start", "start"),
                                               ("load_average_1m_at_end", "end")) if k in m]
    return f", 1-min load average {' and '.join(loads)}" if loads else ""


def _headline(r: dict) -> str:
    g = _get(r, "suites", "finite", "gram")
    if not g:
        return "n = 1024, m = 8, d = 64"
    return f"n = {g['width']}, m = {g['m']}, d = {g['depth']}"


def ratio_table(r: dict) -> list[str]:
    lines = ["| measure | ratio | target | |", "|---|---:|---:|---|"]
    targets = r.get("targets", {})
    for key, label in RATIO_ROWS:
        label = label.replace("n = 1024, m = 8, d = 64", _headline(r))
        t = targets.get(key, {})
        value = r.get("ratios", {}).get(key)
        met = t.get("met")
        mark = "" if not t else ("n/a" if met is None else ("met" if met else "**missed**"))
        lines.append(f"| {label} | {_g(value, '.3g', 'x')} | {t.get('target', '')} | {mark} |")
    return lines


def figures_table(r: dict) -> list[str]:
    s = r.get("suites", {})
    rows = []
    fin = s.get("finite")
    if fin:
        rates = " / ".join(_g(_get(fin, k, "samples_layers_per_s"), ".3g") for k in ("gram", "weights", "loop"))
        rows.append((f"finite samples x layers/s, gram / weights / loop ({_headline(r)})", rates))
        gf = fin.get("gram_gflops", {})
        rows.append((f"gram sampler GFLOP/s at {_headline(r)} (matmul peak in the same run)",
                     f"{_g(gf.get('gflops'))} ({_g(gf.get('fraction_of_peak'), '.1%')} of {_g(gf.get('matmul_peak_gflops'))})"))
        ws = fin.get("width_sweep", {})
        if ws.get("rows"):
            widths = [x["width"] for x in ws["rows"]]
            rows.append((f"gram cost vs width {widths[0]}..{widths[-1]} (m = 8): exponent p in n^p",
                         f"{_g(_get(ws, 'fit_all', 'exponent'), '.2f')} (n >= 512: "
                         f"{_g(_get(ws, 'fit_width_ge_512', 'exponent'), '.2f')})"))
    sde = s.get("sde")
    if sde and sde.get("cost_vs_m"):
        parts = []
        for route, c in sde["cost_vs_m"].items():
            if c.get("m"):
                parts.append(f"{route} {_g(_get(c, 'fit', 'exponent'), '.2f')}")
        rows.append(("SDE cost per path-step vs m (2..64): exponent p in m^p", ", ".join(parts)))
    comp = s.get("compile")
    if comp and comp.get("stack_forward"):
        rows.append(("compile time, scanned Stack forward (lower + XLA), by depth",
                     ", ".join(f"d = {x['depth']}: {x['total_s']:.2f} s" for x in comp["stack_forward"])))
    mj = s.get("main_job")
    if mj:
        note = " (reduced sizes)" if mj.get("reduced") else ""
        for size in ("fig1", "x4"):
            c = mj.get(size)
            if c:
                st = c["settings"]
                rows.append((f"main job, {st['samples']} samples + {st['sde_paths']} SDE paths{note}: JAX / NumPy wall time",
                             f"{_g(_get(c, 'jax', 'wall_s'), '.1f', ' s')} / {_g(_get(c, 'numpy', 'wall_s'), '.1f', ' s')}"))
        c = mj.get("fig1", {})
        rows.append(("main job KS(rho), JAX / NumPy",
                     f"{_g(_get(c, 'jax', 'ks_rho'), '.4f')} / {_g(_get(c, 'numpy', 'ks_rho'), '.4f')}"))
        rows.append(("main job start-up (`scripts/sde_vs_finite.py --help`, fresh process)",
                     _g(_get(mj, "startup", "wall_s"), ".2f", " s")))
    mc = _get(comp, "main_job") if comp else None
    if mc:
        rows.append(("main job programs compiled from scratch (finite / SDE, trace + lower + XLA)",
                     " / ".join(_g(mc[k]["lower_s"] + mc[k]["compile_s"], ".1f", " s") for k in ("finite", "sde"))))
    floors = _get(sde, "rng_floor") if sde else None
    for key, f in (floors or {}).items():
        rows.append((f"SDE {key.replace('m', 'm = ')}, {f['paths']} paths x {f['steps']} steps: solve / RNG floor "
                     "(its normals, its keys) / one bulk draw",
                     f"{f['solve']['median_s']:.2f} s / {f['floor']['median_s']:.2f} s / "
                     f"{f['floor']['normals'] / f['floor']['bulk_normals_per_s']:.2f} s"))
    ff = _get(fin, "fig1_floor") if fin else None
    if ff:
        rows.append((f"reduced sampler at fig1 size, {ff['reduced']['samples']} samples: time / RNG floor "
                     "(normals; with chi-squares)",
                     f"{ff['reduced']['median_s']:.2f} s / {ff['floor']['median_s']:.2f} s; "
                     f"{ff['floor']['with_chi_square_median_s']:.2f} s"))
    mem = s.get("memory")
    if mem:
        for mode in ("streaming", "simulate_finite"):
            if mode in mem:
                rss = ", ".join(f"{x['samples']}: {x['max_rss_mb']:.0f} MB" for x in mem[mode]["rows"])
                if mode == "streaming":
                    tail = "flat" if mem[mode]["flat"] else "**grows**"
                    label = "peak RSS of a chunked Monte Carlo (last layer kept"
                else:
                    tail = f"result grows {mem[mode]['result_growth_mb']:.0f} MB"
                    label = "peak RSS of `simulate_finite` (all layers returned"
                rows.append((f"{label}, chunk {mem['settings']['chunk']}) by samples", f"{rss} ({tail})"))
    dev = s.get("devices")
    if dev and dev.get("rows"):
        rows.append(("gram sampler samples/s by (virtual CPU) device count",
                     ", ".join(f"N = {x['devices']}: {x['samples_per_s']:.3g}" for x in dev["rows"])))
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return lines


def render(r: dict, source: str = "results.json") -> str:
    out = [machine_line(r, source), "", *ratio_table(r), "", *figures_table(r)]
    if r.get("errors"):
        out += ["", "Not measured: " + "; ".join(f"{k} ({v.split(':')[0]})" for k, v in r["errors"].items())]
    return "\n".join(out) + "\n"


def update(path: Path, table: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--update", type=Path, default=None, help="markdown file with bench-table markers")
    args = p.parse_args(argv)
    r = json.loads(args.results.read_text())
    try:
        source = args.results.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        source = args.results.name
    table = render(r, source)
    if args.update:
        update(args.update, table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
