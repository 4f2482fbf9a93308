"""The byte corpus (shaped_attn.text_data) and scripts/train_stability.py: outputs, resumption,
flag validation, divergence."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from shaped_attn import data, text_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import _common  # noqa: E402
import train_stability as ts  # noqa: E402

TINY = ["--models", "pre_ln", "shaped_recover", "--depths", "2", "--learning-rates", "0.01",
        "--seeds", "1", "--width", "16", "--heads", "2", "--seq-len", "16", "--batch-size", "8",
        "--steps", "12", "--warmup-steps", "3", "--log-every", "4", "--eval-batches", "1"]
FIGURES = ("val_loss_vs_lr", "attention_entropy", "init_grad_norms")


@pytest.fixture(scope="module")
def corpus():
    return text_data.load()


# ------------------------------------------------------------------------------ corpus


def test_stdlib_corpus_is_deterministic_and_split_by_file_name(corpus):
    again = text_data.load("stdlib")
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.validation, corpus.validation)
    assert again.fingerprint == corpus.fingerprint and len(corpus.fingerprint) == 16
    names = [n for n, _ in corpus.files]
    assert names == sorted(names) and len(names) > 50
    for name, split in corpus.files:
        assert (split == "validation") == (zlib.crc32(name.encode()) % 10 == 0)
    n_val = sum(s == "validation" for _, s in corpus.files)
    assert 0.03 < n_val / len(names) < 0.25
    first_train = next(n for n, s in corpus.files if s == "train")
    head = (text_data.stdlib_files()[names.index(first_train)]).read_bytes()
    assert corpus.train[: len(head)].tobytes() == head
    assert corpus.train.dtype == np.uint8 and corpus.validation.size > 10_000


def test_split_of_a_synthetic_directory(tmp_path):
    names = [f"m{i:02d}.py" for i in range(40)]
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(f"# {i}".encode())
    (tmp_path / "notes.txt").write_text("not python")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "inner.py").write_text("# sub-packages are excluded")
    ds = text_data.load_stdlib(tmp_path)
    val = [n for n in names if text_data.is_validation(n)]
    assert [n for n, s in ds.files if s == "validation"] == val and len(ds.files) == 40
    expected = b"\n".join(f"# {names.index(n)}".encode() for n in val)
    assert ds.validation.tobytes() == expected


def test_batches_are_seeded_windows_and_eval_batches_fixed(corpus):
    a, b, c = (next(text_data.batches(corpus.train, 4, 16, seed=s)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert a["tokens"].shape == (4, 17) and a["tokens"].dtype == np.int32
    assert not np.array_equal(a["tokens"], c["tokens"])
    stream = corpus.train.tobytes()
    for row in a["tokens"]:
        assert bytes(row.astype(np.uint8)) in stream
    ev = text_data.eval_batches(corpus.validation, 4, 16, 3)
    assert len(ev) == 3 and ev[0]["tokens"][0].tobytes() == corpus.validation[:17].astype(np.int32).tobytes()
    assert ev[-1]["tokens"][-1].astype(np.uint8).tobytes() == corpus.validation[-17:].tobytes()


def test_hugging_face_offline_names_the_embedded_default(monkeypatch):
    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(text_data.importlib, "import_module", missing)
    with pytest.raises(data.DatasetUnavailableError, match="load\\('stdlib'\\)"):
        text_data.load("wikitext2")

    class OfflineHF:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("offline")

    monkeypatch.setattr(text_data.importlib, "import_module", lambda name: OfflineHF)
    monkeypatch.setattr(text_data, "network_available", lambda host: False)
    with pytest.raises(data.DatasetUnavailableError, match="unreachable.*stdlib"):
        text_data.load("wikitext103")
    with pytest.raises(ValueError, match="unknown text dataset"):
        text_data.load("shakespeare")


# ------------------------------------------------------------------------------ script


def _script(out):
    # a persistent compilation cache lets the resumed run reuse the first run's executables
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_stability.py"), *TINY, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=240)


def test_end_to_end_outputs_and_resume(tmp_path):
    out = tmp_path / "run"
    first = _script(out)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["model"], r["depth"], r["lr"], r["seed"]) for r in runs] == [
        ("pre_ln", 2, 0.01, 0), ("shaped_recover", 2, 0.01, 0)]
    for r in runs:
        for key in ("final_train_loss", "final_val_loss", "min_attention_entropy"):
            assert isinstance(r[key], float), key
        assert r["diverged"] is False and r["final_train_loss"] < r["first_train_loss"]
        assert len(r["init_grad_norms"]["query"]) == 2  # one norm per layer
        assert np.asarray(r["curve"]["attn_entropy"]).shape == (3, 2)  # 12 / 4 logs x 2 layers
        # a sample from the trained model: 8 validation bytes continued by 8 sampled ones
        assert isinstance(r["sample"], str) and len(r["sample"].encode()) >= 16
        assert f"    sample: {r['sample']!r}" in first.stdout
    for stem in FIGURES:
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.pdf").exists()
    chunks = sorted((out / "chunks").glob("run-*.json"))
    assert len(chunks) == 2
    # an interruption that lost one run: the rerun trains only that run and ends identical
    before = (out / "results.json").read_bytes()
    (out / "results.json").unlink()
    chunks[1].unlink()
    kept = {chunks[0]: chunks[0].stat().st_mtime_ns}
    second = _script(out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "1 of 2 runs already" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (out / "results.json").read_bytes() == before


def _main(args, capsys):
    try:
        code = ts.main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--gamma", "1.5"], "gamma=1.5 is outside (0, 1]"),
    (["--learning-rates", "0.01", "0"], "learning_rates=0.0 is outside (0, inf)"),
    (["--models", "pre_ln", "post_ln"], "models='post_ln' is not one of"),
    (["--activations", "nope"], "activations='nope' is not a registered activation"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--warmup-steps", "30"], "warmup_steps=30 must be < steps=12"),
    (["--heads", "3"], "num_heads=3 must divide width=16"),
    (["--dataset", "imdb"], "dataset='imdb' is not one of"),
])
def test_bad_flags_give_one_line_and_exit_2(args, message, capsys, tmp_path):
    code, err = _main([*TINY, *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train_stability: error: "), err
    assert message in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_an_out_holding_another_config_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    ts.prepare([*TINY, "--out", str(out)])  # opens the folder, trains nothing
    code, err = _main([*TINY, "--steps", "20", "--out", str(out)], capsys)
    assert code == 2 and "different config" in err and "steps" in err and "--overwrite" in err
    assert err.count("\n") == 1


def test_registry_activations_are_pre_ln_models():
    args, cfg = ts.parse_args([*TINY, "--activations", "sin_softmax"])
    ts.validate(cfg)
    assert cfg.all_models == ("pre_ln", "shaped_recover", "sin_softmax")
    block = ts.block_config(cfg, "sin_softmax")
    assert block.kind == "pre_ln" and block.attention.activation == "sin_softmax"
    recover = ts.block_config(cfg, "shaped_recover")
    assert recover.kind == "shaped" and recover.init == "paper" and recover.scheduled == ("g1", "g2", "s_minus")
    assert ts.block_config(cfg, "shaped_learn").learn == ("g1", "g2", "s_minus")


def test_a_huge_learning_rate_is_flagged_as_diverged(corpus):
    args, cfg = ts.parse_args([*TINY])
    rec = ts.train_run(cfg, corpus, "shaped_recover", 2, 30.0, 0)
    assert rec["diverged"] is True
    assert rec["diverged_at_step"] < cfg.steps  # stopped early
    loss = rec["curve"]["train_loss"][-1]
    assert not (np.isfinite(loss) and loss <= cfg.max_loss)
    clean, _ = _common.nan_to_null(rec)
    json.dumps(clean, allow_nan=False)  # reportable in results.json
