"""The main job over two processes joined by jax.distributed on 127.0.0.1 (gloo collectives on
CPU): the same metrics.json and results.npz as one process, only process 0 writes, and a run
whose processes were killed mid-run resumes to the same result (docs/experiments.md §4); a
library call with a typed key gives one process's samples too."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sde_vs_finite as job  # noqa: E402

SMALL = ["--m", "3", "--width", "8", "--depth", "4", "--samples", "192", "--sde-paths", "96",
         "--chunk", "16", "--dt", "0.1", "--dtype", "float64"]
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out0: Path, out1: Path) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run; process 1 is given another --out, which it must not touch."""
    port, env = _free_port(), dict(os.environ, JAX_PLATFORMS="cpu")
    return [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "sde_vs_finite.py"), *SMALL,
                              "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, out in enumerate((out0, out1))]


def _finish(procs: list[subprocess.Popen]) -> None:
    for i, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {i} did not finish within {TIMEOUT_S} s")
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{err[-3000:]}"


def _same_outputs(a: Path, b: Path) -> None:
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    with np.load(a / "results.npz", allow_pickle=False) as fa, np.load(b / "results.npz", allow_pickle=False) as fb:
        assert sorted(fa.files) == sorted(fb.files)
        for name in fa.files:
            np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert job.main([*SMALL, "--out", str(out)]) == 0
    return out


def test_two_processes_give_the_single_process_outputs(single, tmp_path):
    procs = _launch(tmp_path / "run", tmp_path / "not_written")
    _finish(procs)
    _same_outputs(single, tmp_path / "run")
    assert not (tmp_path / "not_written").exists(), "only process 0 writes"
    chunks = sorted(p.name for p in (tmp_path / "run" / "chunks").iterdir())
    assert chunks == sorted(p.name for p in (single / "chunks").iterdir())


def test_killed_processes_resume_to_the_same_result(single, tmp_path):
    out = tmp_path / "run"
    procs = _launch(out, tmp_path / "other")
    deadline = time.monotonic() + TIMEOUT_S
    while not any((out / "chunks").glob("*.npz")):  # kill once the run is under way
        assert time.monotonic() < deadline and procs[0].poll() is None, "no chunk was written"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:  # process 0 waits in a collective for the dead one (or is stopped by jax's heartbeat)
        procs[0].wait(timeout=2)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait()
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert not (out / "metrics.json").exists(), "the run finished before the kill: nothing to resume"
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.npz")}
    assert kept, "no chunk survived the kill"

    _finish(_launch(out, tmp_path / "other"))
    _same_outputs(single, out)
    assert {name: (out / "chunks" / name).stat().st_mtime_ns for name in kept} == kept, "stored chunks are reused"


TYPED_KEYS = """
import sys
import jax
import numpy as np
import sde
from sde._helpers.devices import sample_mesh
from shaped_attn import config

sde.join_processes(sys.argv[1], 2, int(sys.argv[2]))
jax.config.update("jax_enable_x64", True)
assert sample_mesh().is_multi_process
sampler = sde.FiniteSampler(0.8 * np.eye(3) + 0.2, config.shaped_config(16, 0.5), width=16, depth=4)
V = sampler.chunk(jax.random.key(1234), 0, 10, chunk_size=3)
if jax.process_index() == 0:
    np.save(sys.argv[3], V)
"""


def test_typed_keys_cross_processes_as_their_data(tmp_path):
    """A library call with a typed key (``jax.random.key``) over two processes: the keys
    travel as their data and the samples equal one process's."""
    import jax

    import sde
    from shaped_attn import config

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TYPED_KEYS, f"127.0.0.1:{port}", str(i), str(tmp_path / "V.npy")],
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    _finish(procs)
    local = sde.FiniteSampler(0.8 * np.eye(3) + 0.2, config.shaped_config(16, 0.5), width=16, depth=4)
    np.testing.assert_array_equal(np.load(tmp_path / "V.npy"), local.chunk(jax.random.key(1234), 0, 10, chunk_size=3))
