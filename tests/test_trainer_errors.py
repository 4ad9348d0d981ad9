"""Trainer user errors: one `error: <message>` line, exit 2, no traceback, nothing written; safe resume; eval caveats; file modes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lambda_eclipse.core.tiny import write_tiny_clip
from lambda_eclipse.trainer.__main__ import main as cli_main
from lambda_eclipse.trainer.batches import is_val
from lambda_eclipse.trainer.extract import ExtractConfig, run_extract
from lambda_eclipse.trainer.fsio import current_umask
from test_trainer import make_shapes  # noqa: E402  (tests/ is on sys.path under pytest)

N = 64  # examples: 4 shards of 16, enough for batches of 8 with a held-out split


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_errors")
    manifest = make_shapes(root / "ds", N, seed=1)
    clip = write_tiny_clip(root / "clip")
    feats = root / "feats"
    run_extract(ExtractConfig(clip=str(clip), out=str(feats), manifest=str(manifest), shard_size=16, batch_size=32,
                              device="cpu", progress=False))
    return {"root": root, "clip": clip, "feats": feats, "manifest": manifest}


def train_args(feats, out, **kw) -> list[str]:
    opts = {"data": feats, "out": out, "model": "tiny", "max-steps": 4, "batch-size": 8, "lr": 1e-3, "warmup-steps": 0,
            "schedule": "constant", "lam": 0.05, "val-fraction": 0.2, "eval-every": 1000, "save-every": 2, "log-every": 1,
            "eval-batch-size": 16, "cpu": "true", "deterministic": "true", "tensorboard": "false", "prefetch": 0, "seed": 3}
    opts.update(kw)
    args = ["train"]
    for k, v in opts.items():
        if v is not None:
            args += [f"--{k}", str(v)]
    return args


def run_cli(argv) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr). argparse errors exit through SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def run_subprocess(argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lambda_eclipse.trainer", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in err, (f, err)


def snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file, to prove that nothing was written or replaced."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# -- one message, exit 2, no traceback, nothing written ---------------------------------------------------

def test_missing_index_is_one_line_exit_2_in_a_real_process(tmp_path):
    """The real entry point: `error: …` on stderr, status 2, no traceback, and --out not even created."""
    (tmp_path / "feats").mkdir()
    p = run_subprocess(train_args(tmp_path / "feats", tmp_path / "run"))
    assert_user_error(p.returncode, p.stderr, "index.json not found", "extract")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,allowed", [
    ("lr", "-1", "a number > 0"),
    ("max-steps", "0", "an integer >= 1"),
    ("max-steps", "-5", "an integer >= 1"),
    ("warmup-steps", "-1", "an integer >= 0"),
    ("batch-size", "0", "an integer >= 1"),
    ("val-fraction", "1", "a number in [0, 1)"),
    ("edge-drop", "nan", "a number in [0, 1]"),
    ("temperature", "0", "a number > 0"),
])
def test_out_of_range_numbers_are_refused_up_front(small, tmp_path, flag, value, allowed):
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run", **{flag: value}))
    assert_user_error(code, err, f"--{flag}", allowed, repr(value))
    assert not (tmp_path / "run").exists()


def test_out_of_range_numbers_in_a_real_process_and_in_a_config_file(small, tmp_path):
    p = run_subprocess(train_args(small["feats"], tmp_path / "run", lr="-1"))
    assert_user_error(p.returncode, p.stderr, "error: argument --lr: must be a number > 0, got '-1'")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-steps: -3\n")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run") + ["--config", cfg])
    assert_user_error(code, err, "max_steps", "an integer >= 1", "-3")
    cfg.write_text("lr: [1\n")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run") + ["--config", cfg])
    assert_user_error(code, err, "not valid YAML")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run") + ["--config", tmp_path / "none.yaml"])
    assert_user_error(code, err, "none.yaml", "cannot be read")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(["extract", "--clip", small["clip"], "--out", tmp_path / "f", "--manifest", small["manifest"],
                            "--min-box-area", "0.8", "--max-box-area", "0.7"])
    assert_user_error(code, err, "--min-box-area (0.8) must not exceed --max-box-area (0.7)")
    assert not (tmp_path / "f").exists()


def test_corrupt_and_torn_shards(small, tmp_path):
    feats = tmp_path / "feats"
    shutil.copytree(small["feats"], feats)
    shards = sorted((feats / "shards").glob("*.safetensors"))
    # torn (size differs from the index): refused before anything is written, whichever shard it is
    last = shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(train_args(feats, tmp_path / "run"))
    assert_user_error(code, err, last.name, "torn", "Delete", "extract")
    assert not (tmp_path / "run").exists()
    last.write_bytes(data)
    # corrupt (same size, a flipped byte): found by the sha256 when the first batch loads its shards, still before
    # anything is written
    for path in shards:
        raw = bytearray(path.read_bytes())
        raw[-10] ^= 0xFF
        path.write_bytes(bytes(raw))
    code, _, err = run_cli(train_args(feats, tmp_path / "run"))
    assert_user_error(code, err, "corrupt", "sha256", "Delete", "extract")
    assert not (tmp_path / "run").exists()


def test_missing_files_and_inputs(small, tmp_path):
    code, _, err = run_cli(["extract", "--clip", small["clip"], "--out", tmp_path / "f", "--manifest", tmp_path / "no.jsonl"])
    assert_user_error(code, err, "--manifest", "no.jsonl", "not found")
    assert not (tmp_path / "f").exists()
    code, _, err = run_cli(["extract", "--clip", small["clip"], "--out", tmp_path / "f"])
    assert_user_error(code, err, "--manifest", "--coco-captions")
    code, _, err = run_cli(["export", "--checkpoint", tmp_path / "no-run", "--out", tmp_path / "prior"])
    assert_user_error(code, err, "no-run", "does not exist")
    code, _, err = run_cli(["eval", "--checkpoint", tmp_path / "no-run", "--data", small["feats"]])
    assert_user_error(code, err, "no-run", "does not exist")
    (tmp_path / "empty-run").mkdir()
    code, _, err = run_cli(["export", "--checkpoint", tmp_path / "empty-run", "--out", tmp_path / "prior"])
    assert_user_error(code, err, "No checkpoint in", "step-N")
    code, _, err = run_cli(["eval", "--checkpoint", tmp_path / "empty-run", "--data", small["feats"]])
    assert_user_error(code, err, "neither a training checkpoint", "nor an exported prior")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run", resume=tmp_path / "no-ckpt"))
    assert_user_error(code, err, "--resume", "no-ckpt", "does not exist")
    code, _, err = run_cli(["train", "--data", small["feats"]])
    assert_user_error(code, err, "train: missing --out")
    assert not (tmp_path / "prior").exists() and not (tmp_path / "run").exists()


def test_batch_larger_than_the_data(small, tmp_path):
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run", **{"batch-size": 1000}))
    assert_user_error(code, err, "--batch-size 1000 is larger than the training split", "Use --batch-size")
    assert not (tmp_path / "run").exists()


# -- resume: omitted options inherit, changes refused unless --force, the run's identity never changes ---------

def test_resume_inherits_refuses_forces_and_locks(small, tmp_path, caplog):
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(small["feats"], out, **{"max-steps": 2, "lr": "1e-3", "keep-last": 5}))
    assert code == 0, err
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-00000002"]
    before = snapshot(out)

    # a different hyperparameter: refused, listing each difference; nothing written or replaced
    code, _, err = run_cli(train_args(small["feats"], out, **{"max-steps": 4, "lr": "1e-4", "seed": 4}))
    assert_user_error(code, err, "--lr: checkpoint 0.001, given 0.0001", "--max-steps: checkpoint 2, given 4",
                      "--seed: checkpoint 3, given 4", "--force")
    assert snapshot(out) == before

    # settings that define the run: refused even with --force
    code, _, err = run_cli(train_args(small["feats"], out, **{"val-fraction": 0.3, "model": "paper", "force": "true"}))
    assert_user_error(code, err, "--val-fraction: checkpoint 0.2, given 0.3", "--model: checkpoint tiny, given paper",
                      "even with --force")
    other = tmp_path / "other-feats"
    shutil.copytree(small["feats"], other)
    index = json.loads((other / "index.json").read_text())
    index["fingerprint"] = "0" * 64  # other features
    (other / "index.json").write_text(json.dumps(index))
    code, _, err = run_cli(train_args(other, out, force="true"))
    assert_user_error(code, err, "--data: checkpoint", "even with --force")
    assert snapshot(out) == before

    # omitted options take the checkpoint's values (one log line says which); nothing to do at max-steps 2
    caplog.set_level("INFO", logger="lambda_eclipse.trainer")
    code, stdout, err = run_cli(["train", "--out", out])
    assert code == 0, err
    assert json.loads(stdout)["step"] == 2
    lines = [r.getMessage() for r in caplog.records if "take the checkpoint's values" in r.getMessage()]
    assert len(lines) == 1 and "--lr 0.001" in lines[0] and "--model tiny" in lines[0] and "--keep-last 5" in lines[0], lines
    config = json.loads((out / "train_config.json").read_text())
    assert config["lr"] == 1e-3 and config["max_steps"] == 2 and config["data"] == str(small["feats"])

    # --force: goes on with the new values (the new lr is really used), logged and recorded in the history
    caplog.clear()
    code, _, err = run_cli(train_args(small["feats"], out, **{"max-steps": 4, "lr": "1e-4", "force": None}) + ["--force"])
    assert code == 0, err
    assert any("--force" in r.getMessage() and "--lr: checkpoint 0.001, given 0.0001" in r.getMessage()
               for r in caplog.records)
    rows = [r for r in __import__("csv").DictReader(open(out / "metrics.csv")) if r["split"] == "train"]
    assert [(int(r["step"]), float(r["lr"])) for r in rows] == [(1, 1e-3), (2, 1e-3), (3, 1e-4), (4, 1e-4)]
    config = json.loads((out / "train_config.json").read_text())
    assert config["lr"] == 1e-4 and config["max_steps"] == 4
    events = [h["event"] for h in config["history"]]
    assert events == ["start", "resume", "resume"]
    assert config["history"][0]["config"]["lr"] == 1e-3  # the original is kept
    assert config["history"][-1]["forced"]["lr"] == {"checkpoint": 1e-3, "given": 1e-4}
    state = json.loads((ckpts / "step-00000004" / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 1e-4


# -- eval: few held-out examples ------------------------------------------------------------------------------

def test_eval_of_one_held_out_example_warns_and_gives_the_count(small, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_cli(train_args(small["feats"], out, **{"max-steps": 1, "save-every": 1}))[0] == 0
    # a --val-fraction that holds out exactly one example (the split is a fixed hash of the index)
    fraction = next(f for f in (k / 10_000 for k in range(1, 10_000)) if sum(is_val(i, f) for i in range(N)) >= 1)
    assert sum(is_val(i, fraction) for i in range(N)) == 1
    caplog.set_level("WARNING", logger="lambda_eclipse.trainer")
    code, stdout, err = run_cli(["eval", "--checkpoint", out, "--data", small["feats"], "--val-fraction", fraction])
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["top1"] == 1.0 and metrics["examples"] == 1 and metrics["retrieval_among"] == 1
    assert "top-1 1.000" in err and "(n=1 example, retrieval among 1)" in err
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "has 1 example" in warning and "always 1.0" in warning and "at least 32" in warning
    # a few more: warned with the chance level
    caplog.clear()
    code, stdout, err = run_cli(["eval", "--checkpoint", out, "--data", small["feats"], "--val-fraction", "0.2"])
    assert code == 0, err
    n = json.loads(stdout)["examples"]
    assert 1 < n < 32 and f"(n={n} examples, retrieval among {n})" in err
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"has {n} examples" in warning and f"chance 1/{n}" in warning
    # none at all: an error, not an empty result
    code, _, err = run_cli(["eval", "--checkpoint", out, "--data", small["feats"], "--val-fraction", "0"])
    assert_user_error(code, err, "No held-out examples", "--all true")


# -- file modes -------------------------------------------------------------------------------------------------

def _mkstemp_writers(monkeypatch):
    """core's atomic writers as a tempfile.mkstemp version would be (0600 temp files): export must still end 0644."""
    import tempfile

    from lambda_eclipse.core import prior

    def via_mkstemp(path, write):
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)

    def save_file_atomic(tensors, path, metadata=None):
        from safetensors.torch import save_file

        via_mkstemp(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))

    def write_json_atomic(obj, path):
        via_mkstemp(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))

    monkeypatch.setattr(prior, "save_file_atomic", save_file_atomic, raising=False)
    monkeypatch.setattr(prior, "write_json_atomic", write_json_atomic, raising=False)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_get_the_mode_open_would_give(small, tmp_path, umask, monkeypatch):
    _mkstemp_writers(monkeypatch)
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        feats = tmp_path / "feats"
        run_extract(ExtractConfig(clip=str(small["clip"]), out=str(feats), manifest=str(small["manifest"]), shard_size=32,
                                  batch_size=32, device="cpu", progress=False, limit=32 if umask == 0o027 else None))
        run = tmp_path / "run"
        code, _, err = run_cli(train_args(feats, run, **{"max-steps": 2, "eval-every": 2, "tensorboard": "true",
                                                        "val-fraction": 0.3}))
        assert code == 0, err
        assert run_cli(["export", "--checkpoint", run, "--out", tmp_path / "prior"])[0] == 0
        assert run_cli(["export", "--checkpoint", run, "--out", tmp_path / "p1.safetensors", "--single-file", "true"])[0] == 0
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [p for d in (feats, run, tmp_path / "prior") for p in d.rglob("*") if p.is_file()] + [tmp_path / "p1.safetensors"]
    assert any(p.suffix == ".safetensors" and p.parent.name == "shards" for p in files)
    assert any(p.name == "optimizer.safetensors" for p in files) and any(p.name == "curves.png" for p in files)
    bad = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
           if stat.S_IMODE(p.stat().st_mode) != want}
    assert not bad, (oct(want), bad)
    assert not [p for p in files if p.name.endswith(".tmp")]
