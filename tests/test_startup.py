"""Start-up of the main job: what work does not need is not imported (flax only where modules
are built, scipy only for statistics, matplotlib only for figures, the solvers not for --help)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported(*args: str) -> set[str]:
    """Top-level packages imported by ``python -X importtime *args``."""
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    rows = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in rows[1:]}


def test_help_loads_neither_flax_scipy_matplotlib_nor_the_solvers():
    loaded = _imported(str(ROOT / "scripts" / "sde_vs_finite.py"), "--help")
    assert "jax" in loaded, "the check itself sees imports"
    assert not loaded & {"flax", "scipy", "matplotlib", "diffrax", "optax"}, loaded


def test_the_experiment_library_loads_flax_and_scipy_only_on_use():
    loaded = _imported("-c", "import sde, shaped_attn; sde.ExperimentConfig(); sde.SDEParams(0.5); shaped_attn.BlockConfig")
    assert not loaded & {"flax", "scipy", "matplotlib"}, loaded
