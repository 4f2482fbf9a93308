"""Cost figure from a results JSON of ``benchmarks/run.py``: SDE cost vs m, finite cost vs width.

    python benchmarks/plot.py benchmarks/results/<machine-tag>.json   # writes <machine-tag>.png

Left: seconds per SDE path-step against the number of tokens m, one line per noise route,
with its fitted power law. Right: seconds per finite-network sample x layer (gram sampler,
m = 8) against the width n, with the fitted power law. Both on log-log axes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_n) = plt.subplots(1, 2, figsize=(10, 3.8))
    sde = results.get("suites", {}).get("sde") or {}
    curves = sde.get("cost_vs_m") or {}
    for route, c in curves.items():
        if not c.get("m"):
            continue
        m = np.asarray(c["m"], float)
        cost = 1 / np.asarray(c["path_steps_per_s"], float)
        p = (c.get("fit") or {}).get("exponent")
        line, = ax_m.loglog(m, cost, "o-", label=f"{route}" + (f" (m^{p:.2f})" if p is not None else ""))
        if p is not None:
            ax_m.loglog(m, c["fit"]["prefactor"] * m**p, ":", color=line.get_color(), lw=1)
    if not curves:
        ax_m.text(0.5, 0.5, "no SDE suite in this file", ha="center", va="center", transform=ax_m.transAxes)
    ax_m.set(xlabel="tokens m", ylabel="seconds per path-step", title="covariance SDE (Euler)")
    if curves:
        ax_m.legend(fontsize=8)

    ws = (results.get("suites", {}).get("finite") or {}).get("width_sweep") or {}
    rows = ws.get("rows") or []
    if rows:
        n = np.asarray([r["width"] for r in rows], float)
        cost = np.asarray([r["s_per_sample_layer"] for r in rows], float)
        fit = ws.get("fit_all") or {}
        label = "gram sampler" + (f" (n^{fit['exponent']:.2f})" if fit.get("exponent") is not None else "")
        line, = ax_n.loglog(n, cost, "o-", label=label)
        if fit.get("exponent") is not None:
            ax_n.loglog(n, fit["prefactor"] * n ** fit["exponent"], ":", color=line.get_color(), lw=1)
        fin = results["suites"]["finite"]
        for k, mk in (("weights", "s"), ("loop", "^")):
            r = fin.get(k)
            if r:
                ax_n.loglog([r["width"]], [r["s_per_sample_layer"]], mk, label=f"{k} (n = {r['width']}, depth {r['depth']})")
        ax_n.legend(fontsize=8)
    else:
        ax_n.text(0.5, 0.5, "no width sweep in this file", ha="center", va="center", transform=ax_n.transAxes)
    depth = ws.get("depth", "?")
    ax_n.set(xlabel="width n", ylabel="seconds per sample x layer",
             title=f"finite shaped Transformer, m = {ws.get('m', 8)}, depth {depth}")
    mach = results.get("machine", {})
    hw = (f"{mach.get('cpu_model', '?')}, {mach.get('cpu_count', '?')} cores" if mach.get("platform") == "cpu"
          else f"{mach.get('device_count', '?')} x {mach.get('device_kind', '?')}")
    fig.suptitle(f"{hw}; jax {mach.get('jax', '?')}" + (" (quick run)" if results.get("quick") else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the JSON)")
    args = p.parse_args(argv)
    out = args.out or args.results.with_suffix(".png")
    print(plot(json.loads(args.results.read_text()), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
