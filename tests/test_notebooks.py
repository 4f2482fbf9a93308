"""Execute every notebook in quick mode, check each .ipynb matches its jupytext .py source and
is stored executed, with its figures.

The py:percent files in ``notebooks/`` are the source of truth; the paired ``.ipynb`` files
are generated, executed at full size with every output and figure, by
``.venv/bin/python scripts/execute_notebooks.py [NAME ...]``. Each notebook is converted in
memory and run with nbclient on the ``python3`` kernel of the interpreter running the tests,
with ``SHAPED_ATTN_QUICK=1`` (tiny sizes, CI budget).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
sys.path.insert(0, str(ROOT / "scripts"))
from execute_notebooks import kernel_name  # noqa: E402  (one kernel rule: the script and the tests)
CELL_TIMEOUT_S = 120


def _code_cells(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


def test_notebooks_found():
    assert NOTEBOOKS == ["01_activation_zoo", "02_sde_vs_finite", "03_training_and_stability"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_matches_py(name):
    py = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    ipynb_path = NOTEBOOK_DIR / f"{name}.ipynb"
    assert ipynb_path.exists(), f"missing {ipynb_path.name}: run {REGENERATE} {name}"
    ipynb = nbformat.read(ipynb_path, as_version=4)
    assert _code_cells(ipynb) == _code_cells(py), (
        f"{name}.ipynb is out of date: regenerate it with {REGENERATE} {name}")


REGENERATE = ".venv/bin/python scripts/execute_notebooks.py"


def _images(cell) -> int:
    return sum(any(k.startswith("image/") for k in out.get("data", {})) for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_is_executed_and_shows_its_figures(name):
    """Every code cell ran (in order, without an error) and every cell that shows a figure
    (``plt.show()``) has an image output, so the figures render on GitHub and Colab."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    hint = f"store it executed with {REGENERATE} {name}"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}.ipynb is not executed in order: {hint}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}.ipynb stores an error output: {hint}"
    shows = [c for c in code if "plt.show()" in c.source]
    assert shows, f"{name} shows no figure at all"
    missing = [c.source.splitlines()[0] for c in shows if not _images(c)]
    assert not missing, f"{name}.ipynb: cells without their figure output {missing}: {hint}"


def _repository_url() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_links_use_the_project_repository(name):
    """Badge and install URL both come from pyproject's [project.urls] Repository."""
    repo = _repository_url()
    py = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    badge = f"https://colab.research.google.com/github/{repo.removeprefix('https://github.com/')}" \
            f"/blob/main/notebooks/{name}.ipynb"
    assert py.cells[0].cell_type == "markdown" and badge in py.cells[0].source
    assert f'os.environ.get("SHAPED_ATTN_REPO", "{repo}")' in py.cells[1].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_quick(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SHAPED_ATTN_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel must import the package from this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name(),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
