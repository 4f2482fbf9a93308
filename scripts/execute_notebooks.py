"""Execute the notebooks and store each ``notebooks/NN_name.ipynb`` with its outputs and figures.

The jupytext ``py:percent`` files ``notebooks/NN_name.py`` are the source of truth. This script
reads each one, runs it top to bottom with nbclient on a kernel of this interpreter (the
repository root on ``PYTHONPATH``, working directory ``notebooks/``) and writes the paired
``.ipynb`` with every output, figures included (matplotlib's inline backend, default figure
size). By default the notebooks run at their full sizes (the ``SIZES`` dict of each notebook's
third cell) on whatever jax finds, the CPU here; ``--quick`` sets ``SHAPED_ATTN_QUICK=1``.

    .venv/bin/python scripts/execute_notebooks.py                      # all notebooks, full sizes
    .venv/bin/python scripts/execute_notebooks.py 01_activation_zoo    # one of them
    .venv/bin/python scripts/execute_notebooks.py --quick --check      # CI-sized, nothing written

A notebook whose execution fails is not written (the stored one is kept) and the script exits
with status 1 after trying the others. Prints the wall time and the number of figures of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT_S = 3600


def notebook_names() -> list[str]:
    """The ``NN_name`` stems of the jupytext sources in ``notebooks/``."""
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def kernel_name() -> str:
    """``python3`` when it launches this interpreter, else a kernelspec installed into
    ``sys.prefix`` (no global registration)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
        if argv0 in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"} or \
                Path(argv0).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(prefix=sys.prefix, kernel_name="shaped-attn")
    return "shaped-attn"


def count_figures(nb) -> int:
    """Outputs of code cells that carry an image (``image/png`` or ``image/svg+xml``)."""
    return sum(
        1 for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
        if any(k.startswith("image/") for k in out.get("data", {}))
    )


def execute(name: str, *, quick: bool, timeout: int = CELL_TIMEOUT_S):
    """The executed notebook of ``notebooks/{name}.py`` (raises on the first failing cell)."""
    import jupytext
    import nbclient

    nb = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["SHAPED_ATTN_QUICK"] = "1" if quick else ""
    saved = {k: os.environ.get(k) for k in (*env, "MPLBACKEND")}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend embeds the figures
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=kernel_name(),
                                         resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"notebooks to run (default: all of {notebook_names()})")
    p.add_argument("--quick", action="store_true", help="SHAPED_ATTN_QUICK=1: the CI sizes")
    p.add_argument("--check", action="store_true", help="execute only, write nothing")
    args = p.parse_args(argv)
    names = args.names or notebook_names()
    unknown = sorted(set(names) - set(notebook_names()))
    if unknown:
        p.error(f"names={unknown} are not notebooks; known: {notebook_names()}")
    import jupytext

    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            nb = execute(name, quick=args.quick)
        except Exception as err:  # report, keep the stored notebook, go on with the others
            failed.append(name)
            print(f"{name}: FAILED after {time.perf_counter() - t0:.0f} s: "
                  f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
            continue
        wall = time.perf_counter() - t0
        figures = count_figures(nb)
        if not args.check:
            jupytext.write(nb, NOTEBOOK_DIR / f"{name}.ipynb", fmt="ipynb")
        print(f"{name}: {wall:.0f} s, {figures} figures" + ("" if args.check else f", wrote {name}.ipynb"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
