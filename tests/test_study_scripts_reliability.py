"""The study scripts (compare_activations, frobenius_norm, gradient_vanishing), issue 9: every
flag checked before any work, sizes beyond the memory included (one line, exit code 2, no
traceback, no output folder), one JSON chunk per finished unit with resumption after SIGKILL,
no NaN in JSON outputs."""

import concurrent.futures
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import _common  # noqa: E402
import compare_activations  # noqa: E402

from shaped_attn.rundir import RunDir  # noqa: E402

OTHER_RUN = "<a folder holding a run with another config>"
NOT_A_DIR = "<an existing file>"


def _ints(script: str, *flags: str) -> list:
    return [(script, [f"--{flag}", "0"], f"{flag.replace('-', '_')}=0 must be an integer >= 1") for flag in flags]


# (script, arguments, message). Every case runs in-process through main(); the first case of
# each kind of rule of each script (SUBPROCESS) also runs as its own Python process.
CASES = [
    ("compare_activations", ["--activations", "bogus"], "activations='bogus' is not a registered activation"),
    ("compare_activations", ["--depths", "2", "0"], "depths=0 must be an integer >= 1"),
    *_ints("compare_activations", "seeds", "width", "heads", "mlp-ratio", "steps", "batch-size", "log-every",
           "eval-batch-size", "workers"),
    ("compare_activations", ["--warmup-steps", "-1"], "warmup_steps=-1 must be an integer >= 0"),
    ("compare_activations", ["--learning-rate", "nan"], "learning_rate=nan is outside (0, inf)"),
    ("compare_activations", ["--learning-rate", "0"], "learning_rate=0.0 is outside (0, inf)"),
    ("compare_activations", ["--learning-rate", "inf"], "learning_rate=inf is outside (0, inf)"),
    ("compare_activations", ["--weight-decay", "-0.1"], "weight_decay=-0.1 is outside [0, inf)"),
    ("compare_activations", ["--grad-clip-norm", "nan"], "grad_clip_norm=nan is outside (0, inf)"),
    ("compare_activations", ["--dataset", "mnist"], "dataset='mnist' is not one of ('digits', 'cifar10')"),
    ("compare_activations", ["--model", "cnn"], "model='cnn' is not one of ('levit', 'vit')"),
    ("compare_activations", ["--batch-size", "100000"], "batch_size=100000 is outside (0, "),
    ("compare_activations", ["--warmup-steps", "600"], "warmup_steps=600"),
    ("compare_activations", ["--heads", "3"], "num_heads=3 must divide width=64"),
    ("compare_activations", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("compare_activations", ["--width", "100000000"],
     "width=100000000, depth=8, batch_size=64, eval_batch_size=512: one training step needs"),
    ("compare_activations", [OTHER_RUN], "holds a run with a different config"),
    ("compare_activations", [NOT_A_DIR], "exists and is not a directory"),
    ("frobenius_norm", ["--bound-ns", "0"], "bound_ns=0 must be an integer >= 1"),
    ("frobenius_norm", ["--init-ns", "4", "-4"], "init_ns=-4 must be an integer >= 1"),
    ("frobenius_norm", ["--bound-scales", "nan"], "bound_scales=nan is outside (0, inf)"),
    *_ints("frobenius_norm", "bound-samples", "adversarial-starts", "adversarial-steps", "init-samples", "depth",
           "width", "heads", "steps", "batch-size", "log-every", "seeds", "workers"),
    ("frobenius_norm", ["--warmup-steps", "-1"], "warmup_steps=-1 must be an integer >= 0"),
    ("frobenius_norm", ["--seed", "-1"], "seed=-1 must be an integer >= 0"),
    ("frobenius_norm", ["--learning-rate", "inf"], "learning_rate=inf is outside (0, inf)"),
    ("frobenius_norm", ["--tokens", "8"], "tokens=8 is not one of (4, 16, 64)"),
    ("frobenius_norm", ["--train-activations", "bogus"], "train_activations='bogus' is neither poly{p}_a{a}"),
    ("frobenius_norm", ["--train-activations", "poly3_anan"], "train_activations='poly3_anan' is neither"),
    ("frobenius_norm", ["--batch-size", "100000"], "batch_size=100000 is outside (0, "),
    ("frobenius_norm", ["--warmup-steps", "400"], "warmup_steps=400"),
    ("frobenius_norm", ["--heads", "3"], "num_heads=3 must divide width=32"),
    ("frobenius_norm", ["--init-ns", "4", "1000000"], "init_ns=1000000, init_samples=64: the initial-norm program needs"),
    ("frobenius_norm", ["--bound-ns", "100000"], "bound_ns=100000, bound_samples=64: the random-bounds program needs"),
    ("frobenius_norm", ["--width", "100000000"], "width=100000000, depth=4, batch_size=32, tokens=64: one training step"),
    ("frobenius_norm", [OTHER_RUN], "holds a run with a different config"),
    ("gradient_vanishing", ["--activations", "softmax", "bogus"], "activations='bogus' is not a registered"),
    ("gradient_vanishing", ["--n-keys", "1"], "n_keys=1 must be an integer >= 2"),
    *_ints("gradient_vanishing", "n-rows", "grad-depth", "grad-width", "grad-tokens", "grad-batch", "grad-seeds"),
    ("gradient_vanishing", ["--stds", "0"], "stds=0.0 is outside (0, inf)"),
    ("gradient_vanishing", ["--dfs", "inf"], "dfs=inf is outside (0, inf)"),
    ("gradient_vanishing", ["--magnitudes", "nan"], "magnitudes=nan is outside (0, inf)"),
    ("gradient_vanishing", ["--outlier-counts", "0"], "outlier_counts=0 must be an integer in [1, 16]"),
    ("gradient_vanishing", ["--outlier-counts", "17"], "outlier_counts=17 must be an integer in [1, 16]"),
    ("gradient_vanishing", ["--seed", "-1"], "seed=-1 must be an integer >= 0"),
    ("gradient_vanishing", ["--shaped-gamma", "0"], "shaped_gamma=0.0 is outside (0, 1]"),
    ("gradient_vanishing", ["--shaped-gamma", "1.5"], "shaped_gamma=1.5 is outside (0, 1]"),
    ("gradient_vanishing", ["--shaped-tau0", "-1"], "shaped_tau0=-1.0 is outside (0, inf)"),
    ("gradient_vanishing", ["--n-keys", "100000"], "n_keys=100000, n_rows=1024: the Jacobian program needs"),
    ("gradient_vanishing", ["--grad-depth", "100000000"],
     "grad_width=64, grad_depth=100000000, grad_tokens=16, grad_batch=8: the shaped gradient program needs"),
    ("gradient_vanishing", [OTHER_RUN], "holds a run with a different config"),
]
IDS = [f"{script}:{' '.join(args)}" for script, args, _ in CASES]


KINDS = {"must be an integer": "integer", "is outside": "interval", "is not one of": "choice",
         "is not a registered": "activation", "is neither": "activation", "argument --": "argparse",
         "holds a run": "output folder", "is not a directory": "output folder", " needs ": "memory"}


def _kind(case) -> tuple:
    """A case's kind of rule: its script and the rule's phrase (else a library config's rule)."""
    script, _, message = case
    return script, next((kind for phrase, kind in KINDS.items() if phrase in message), "library config")


SUBPROCESS = [i for i, case in enumerate(CASES) if _kind(case) not in map(_kind, CASES[:i])]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args]


def _arguments(args: list, folder: Path) -> list:
    """The case's arguments with ``--out`` in a fresh ``folder`` (prepared for OTHER_RUN, NOT_A_DIR)."""
    folder.mkdir()
    out = folder / "out"
    if args == [OTHER_RUN]:
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"config": {"steps": -1}}))
    elif args == [NOT_A_DIR]:
        out.write_text("not a folder")
    return [a for a in args if a not in (OTHER_RUN, NOT_A_DIR)] + ["--out", str(out)]


def _check(index: int, code, err: str, folder: Path) -> None:
    _, args, message = CASES[index]
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    out = folder / "out"
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert files == {OTHER_RUN: ["config.json"], NOT_A_DIR: None}.get(args[0]), "no work before validation"


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_bad_flag_gives_one_line_and_exit_2_before_any_work(index, tmp_path, capsys):
    script, args, _ = CASES[index]
    try:
        code = importlib.import_module(script).main(_arguments(args, tmp_path / "case"))
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    _check(index, code, capsys.readouterr().err, tmp_path / "case")


def _subprocess(index: int, folder: Path):
    script, args, _ = CASES[index]
    proc = subprocess.run(_command(script, *_arguments(args, folder)), env=ENV, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory):
    """The SUBPROCESS cases, run concurrently (each a fresh Python process)."""
    root = tmp_path_factory.mktemp("invalid")
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        runs = {i: pool.submit(_subprocess, i, root / str(i)) for i in SUBPROCESS}
        return {i: (run.result(), root / str(i)) for i, run in runs.items()}


@pytest.mark.parametrize("index", SUBPROCESS, ids=[IDS[i] for i in SUBPROCESS])
def test_bad_flag_in_a_fresh_process(index, subprocess_runs):
    (code, err), folder = subprocess_runs[index]
    _check(index, code, err, folder)


# ------------------------------------------------------------------------ resumption

TINY = ["--activations", "softmax", "sinmax", "--n-keys", "4", "--n-rows", "8", "--stds", "1", "2", "--dfs", "1",
        "--outlier-counts", "1", "--magnitudes", "5", "--grad-depth", "1", "--grad-width", "8", "--grad-tokens", "4",
        "--grad-batch", "2", "--grad-seeds", "1"]
UNITS = 2 + 3  # one per activation at N = 4, one per architecture of part 2


def _gradient_vanishing(out: Path, cache: Path) -> subprocess.Popen:
    # A shared compilation cache makes the later runs fast; cached programs give identical numbers.
    env = dict(ENV, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen(_command("gradient_vanishing", *TINY, "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    cache, killed, reference = tmp_path / "cache", tmp_path / "killed", tmp_path / "reference"
    proc = _gradient_vanishing(killed, cache)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(killed.glob("chunks/*.json")):
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a scheduler or a closed terminal would
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill; the test interrupted nothing"
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in killed.glob("chunks/*.json")}
    assert 1 <= len(first) < UNITS and not (killed / "results.json").exists()

    for out in (reference, killed):  # an uninterrupted run, then the killed one resumed
        proc = _gradient_vanishing(out, cache)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in killed.glob("chunks/*.json")
            if p.name in first} == first, "finished units are reused, not recomputed"
    assert len(list(killed.glob("chunks/*.json"))) == UNITS
    text = (killed / "results.json").read_text()
    assert text == (reference / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["non_finite_values"] == 0


# ------------------------------------------------------------------------ outputs


def test_nan_is_written_as_null_and_counted(tmp_path):
    run = RunDir(tmp_path, {"a": 1})
    _common.save_unit(run, "unit-1", {"loss": math.nan, "curve": [1.0, math.inf]}, seconds=0.5)
    records, seconds, non_finite = _common.load_units(run, ["unit-1", "unit-2"])
    assert records == {"unit-1": {"loss": None, "curve": [1.0, None]}} and seconds == {"unit-1": 0.5}
    _common.finish(run, {"runs": list(records.values()), "mean": math.nan}, non_finite, seconds, 1.0)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["non_finite_values"] == 3 and json.loads(text)["mean"] is None
    assert "seconds" not in text and json.loads((tmp_path / "timings.json").read_text())["units_s"] == seconds


def test_diverged_runs_are_flagged_and_counted_in_the_summary():
    cfg = compare_activations.CompareConfig(activations=("softmax",), depths=(2,), seeds=2)
    ok = {"activation": "softmax", "depth": 2, "test_accuracy": 0.5, "final_train_loss": 1.0, "diverged": False}
    diverged = ok | {"test_accuracy": None, "final_train_loss": None, "diverged": True}
    rows, table = compare_activations.summarise([ok, diverged], cfg)
    assert rows[0]["diverged"] == 1 and rows[0]["n"] == 1 and rows[0]["test_accuracy_mean"] == 0.5
    assert "(1 diverged)" in table


def test_overwrite_discards_the_old_run(tmp_path):
    run = RunDir(tmp_path, {"steps": 1})
    run.save_record("unit", {"x": 1})
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "chunks" / ".unit.json.abc.tmp").write_text("half")  # left by a kill
    assert RunDir(tmp_path, {"steps": 1}).load_record("unit") == {"x": 1}
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="holds a run with a different config \\(differs in: steps\\)"):
        RunDir(tmp_path, {"steps": 2})
    run = RunDir(tmp_path, {"steps": 2}, overwrite=True, outputs=("results.json",))
    assert run.load_record("unit") is None and not (tmp_path / "results.json").exists()
