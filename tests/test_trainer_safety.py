"""The trainer under hostile or broken input (issues 18, 19): no pickle runs, nothing replaced without --overwrite,
one run per output folder, no NaN trained or saved, no hang on a FIFO or /dev/zero, one message (exit 2, 130 on
Ctrl-C) instead of a traceback, metrics.csv always with its header, missing extras named, eval on the run's split."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lambda_eclipse.trainer import train as T
from lambda_eclipse.trainer.batches import is_val
from lambda_eclipse.trainer.state_io import load_state
from test_trainer_errors import N, assert_user_error, run_cli, snapshot, small, train_args  # noqa: F401  (fixture)

LOCK = ".lambda_eclipse.lock"


class Planted:
    """A pickle payload: unpickling it creates the marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path):
    torch.save({"optimizer": Planted(marker), "step": 2}, path)


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(folder: Path, pid: int):
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "trainer train (other)"}))


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(small, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4): what every resume below must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    code, _, err = run_cli(train_args(small["feats"], out, **{"keep-last": 0}))
    assert code == 0, err
    return out


def stop_at_call(n: int, exc=KeyboardInterrupt):
    """A prior_loss that raises `exc` at its n-th call (= step n here: one micro-batch per step)."""
    orig, calls = T.prior_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return orig(*a, **k)

    return loss


def half_run(small, out: Path) -> Path:
    """The straight run's arguments, stopped by Ctrl-C in step 3: its step-2 checkpoint is the last one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T, "prior_loss", stop_at_call(3))
        code, _, err = run_cli(train_args(small["feats"], out))
    assert code == 130, err
    return out / "checkpoints" / "step-00000002"


# -- 19.1: no pickle is ever run ------------------------------------------------------------------------------

def test_checkpoint_state_is_safetensors_and_old_pickle_checkpoints_resume_bit_identically(small, straight, tmp_path):
    ckpt = half_run(small, tmp_path / "run")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                                        "rng-0.safetensors", "trainer_state.json"]
    # an earlier version's checkpoint: the same state as torch.save pickles (numpy RNG state included)
    for name in ("optimizer", "rng-0"):
        torch.save(load_state(ckpt / f"{name}.safetensors"), ckpt / f"{name}.pt")
        (ckpt / f"{name}.safetensors").unlink()
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run"))
    assert code == 0, err
    assert same(weights(tmp_path / "run", 4), weights(straight, 4))


@pytest.mark.parametrize("name", ["optimizer", "rng-0"])
def test_a_planted_pickle_in_a_train_checkpoint_never_runs(small, tmp_path, name):
    ckpt = half_run(small, tmp_path / "run")
    marker = tmp_path / "PWNED"
    (ckpt / f"{name}.safetensors").unlink()
    plant_pickle(ckpt / f"{name}.pt", marker)
    before = snapshot(tmp_path / "run")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run"))
    assert_user_error(code, err, f"{name}.pt", "could run code", "Delete this checkpoint")
    assert not marker.exists()
    assert snapshot(tmp_path / "run") == before


def test_damaged_optimizer_and_rng_files_are_one_message(small, tmp_path):
    ckpt = half_run(small, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    for name in ("optimizer.safetensors", "rng-0.safetensors"):
        good = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(good[: len(good) // 2])
        code, _, err = run_cli(train_args(small["feats"], tmp_path / "run"))
        assert_user_error(code, err, name, "damaged", "Delete this checkpoint")
        (ckpt / name).write_bytes(b"\x00" * 64)
        code, _, err = run_cli(train_args(small["feats"], tmp_path / "run"))
        assert_user_error(code, err, name, "Delete this checkpoint")
        (ckpt / name).write_bytes(good)
    assert {k: v[0] for k, v in snapshot(tmp_path / "run").items()} == {k: v[0] for k, v in before.items()}


# -- 19.2: export never replaces without --overwrite ----------------------------------------------------------

def test_export_refuses_to_replace_without_overwrite(small, straight, tmp_path):
    folder, single = tmp_path / "prior", tmp_path / "prior.safetensors"
    for out, extra in ((folder, []), (single, ["--single-file"])):
        assert run_cli(["export", "--checkpoint", straight, "--out", out, *extra])[0] == 0
        before = snapshot(tmp_path)
        code, _, err = run_cli(["export", "--checkpoint", straight, "--out", out, *extra])
        assert_user_error(code, err, "already exists", "--overwrite")
        assert snapshot(tmp_path) == before
        code, _, err = run_cli(["export", "--checkpoint", straight / "checkpoints" / "step-00000002", "--out", out,
                                *extra, "--overwrite"])
        assert code == 0, err
        assert snapshot(tmp_path) != before  # replaced, by the step-2 weights
    # a folder export with only its config.json there: refused too (nothing is half-written)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    code, _, err = run_cli(["export", "--checkpoint", straight, "--out", tmp_path / "half"])
    assert_user_error(code, err, "config.json already exists")
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["config.json"]


def test_export_write_failures_are_one_message_and_keep_the_old_file(straight, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    (tmp_path / "a-file").write_text("x")
    code, _, err = run_cli(["export", "--checkpoint", straight, "--out", tmp_path / "a-file" / "prior"])
    assert_user_error(code, err, "a-file", "is a file")
    code, _, err = run_cli(["export", "--checkpoint", straight, "--out", tmp_path / "a-file" / "p.safetensors",
                            "--single-file"])
    assert_user_error(code, err, "a-file", "is a file")
    target = tmp_path / "p.safetensors"
    assert run_cli(["export", "--checkpoint", straight, "--out", target, "--single-file"])[0] == 0
    old = target.read_bytes()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run_cli(["export", "--checkpoint", straight / "checkpoints" / "step-00000002", "--out", target,
                            "--single-file", "--overwrite"])
    assert_user_error(code, err, "No space left", str(target))
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# -- 19.3: one run per output folder --------------------------------------------------------------------------

def test_a_live_lock_refuses_at_once_and_a_stale_one_does_not_block(small, tmp_path, caplog):
    out = tmp_path / "run"
    write_lock(out, os.getppid())  # a live process that is not this one
    before = snapshot(out)
    code, _, err = run_cli(train_args(small["feats"], out))
    assert_user_error(code, err, f"PID {os.getppid()}", "in use by another run")
    assert snapshot(out) == before
    code, _, err = run_cli(["extract", "--clip", small["clip"], "--out", out, "--manifest", small["manifest"]])
    assert_user_error(code, err, f"PID {os.getppid()}")
    assert snapshot(out) == before
    write_lock(out, dead_pid())
    caplog.set_level("WARNING")
    code, _, err = run_cli(train_args(small["feats"], out, **{"max-steps": 2}))
    assert code == 0, err
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK).exists()  # released at the end


def test_a_second_real_process_on_the_same_out_is_refused(small, tmp_path):
    """A real first run holds the lock while it trains; the second one refuses at once, naming its PID."""
    out = tmp_path / "run"
    hold = tmp_path / "holding"
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from lambda_eclipse.trainer import train as T
        orig = T.save_checkpoint
        def hook(*a, **k):
            r = orig(*a, **k)
            Path({str(hold)!r}).write_text(str(os.getpid()))
            while not Path({str(hold)!r} + ".done").exists():
                time.sleep(0.05)
            return r
        T.save_checkpoint = hook
        from lambda_eclipse.trainer.__main__ import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", script, *map(str, train_args(small["feats"], out, **{"max-steps": 2}))],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if hold.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert hold.exists(), first.communicate()[1][-2000:]
        code, _, err = run_cli(train_args(small["feats"], out, **{"max-steps": 2}))
        assert_user_error(code, err, f"PID {first.pid}")
    finally:
        Path(str(hold) + ".done").write_text("")
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err[-2000:]
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == ["1", "2"]  # one row per step: only the first run wrote


# -- 19.6: no NaN trained or saved; non-finite settings refused -----------------------------------------------

def test_init_from_a_nan_prior_is_refused_before_step_one(small, tmp_path):
    from lambda_eclipse.core.tiny import write_tiny_prior

    path = write_tiny_prior(tmp_path / "p.safetensors", single_file=True)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if k.endswith(".weight"))[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path), meta)
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run", **{"init-from": path}))
    assert_user_error(code, err, name)
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_stops_the_run_and_no_nan_checkpoint_is_saved(small, tmp_path, monkeypatch):
    orig, calls = T.prior_loss, {"n": 0}

    def poisoned(*a, **k):
        losses = orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # step 3's micro-batch
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(T, "prior_loss", poisoned)
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(small["feats"], out, **{"max-steps": 6}))
    assert_user_error(code, err, "The loss became nan at step 3", "step-00000002", "Lower --lr")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert all(torch.isfinite(v).all() for v in weights(out, 2).values())


def test_nan_weights_are_never_saved(tmp_path):
    from accelerate import Accelerator

    from lambda_eclipse.trainer.errors import TrainingDivergedError

    model = T.init_model(T.TrainConfig(model="tiny"))
    with torch.no_grad():
        model.proj_in.weight[0, 0] = float("inf")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(TrainingDivergedError, match="proj_in.weight"):
        T.save_checkpoint(Accelerator(cpu=True), tmp_path, 5, model, optimizer, scheduler, T.TrainConfig(model="tiny"), {})
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("command,flag,value", [
    ("train", "weight-decay", "inf"), ("train", "lr", "nan"), ("train", "adam-eps", "inf"),
    ("finetune-decoder", "weight-decay", "inf"), ("finetune-decoder", "lr", "nan"), ("finetune-decoder", "alpha", "inf"),
    ("finetune-decoder", "uncond-prob", "nan"), ("finetune-decoder", "max-grad-norm", "nan"),
])
def test_non_finite_settings_are_refused_up_front(small, tmp_path, command, flag, value):
    argv = train_args(small["feats"], tmp_path / "run") if command == "train" else \
        ["finetune-decoder", "--out", tmp_path / "run", "--images", tmp_path, "--decoder", tmp_path]
    code, _, err = run_cli([*argv, f"--{flag}", value])
    assert_user_error(code, err, f"--{flag}", repr(value))
    assert not (tmp_path / "run").exists()


def test_non_finite_settings_from_the_python_api_are_refused():
    from lambda_eclipse.trainer.errors import ConfigError
    from lambda_eclipse.trainer.finetune_decoder import FinetuneConfig

    for bad in ({"weight_decay": float("inf")}, {"lr": float("nan")}, {"uncond_prob": float("nan")}):
        cfg = FinetuneConfig(out="o", images=["x"], decoder="d", clip="c", **bad)
        with pytest.raises(ConfigError, match=next(iter(bad)).replace("_", "-")):
            cfg.check()


# -- 19.7: no hang, no runaway ------------------------------------------------------------------------------

def test_fifo_and_dev_zero_are_refused_without_blocking(small, tmp_path):
    """In a subprocess with a timeout: if a check regressed, the test fails instead of hanging the suite."""
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    feats = tmp_path / "feats"
    shutil.copytree(small["feats"], feats)
    shard = sorted((feats / "shards").glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    manifest = tmp_path / "m.jsonl"
    os.mkfifo(manifest)
    cases = [
        ["train", "--config", str(fifo)],
        ["train", "--config", "/dev/zero"],
        train_args(feats, tmp_path / "run"),
        ["extract", "--clip", str(small["clip"]), "--out", str(tmp_path / "f"), "--manifest", str(manifest)],
    ]
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from lambda_eclipse.trainer.__main__ import main
        results = []
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
            results.append([code, err.getvalue()])
        print(json.dumps(results))
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", script, json.dumps([[str(a) for a in c] for c in cases])], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads(p.stdout.splitlines()[-1])
    want = [["c.yaml", "FIFO"], ["/dev/zero", "device"], [shard.name, "FIFO"], ["m.jsonl", "FIFO"]]
    for (code, err), fragments in zip(results, want):
        assert_user_error(code, err, *fragments)


def test_an_oversized_config_file_is_refused(small, tmp_path):
    big = tmp_path / "big.json"
    big.write_text('{"lr": 0.001, "pad": "' + "x" * (1 << 20) + '"}')
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run") + ["--config", big])
    assert_user_error(code, err, "big.json", "bytes", "not read")


def _index(feats: Path) -> dict:
    return json.loads((feats / "index.json").read_text())


@pytest.mark.parametrize("case", ["huge", "escape", "absolute", "no_file", "negative"])
def test_a_lying_index_is_refused_before_anything_is_allocated(small, straight, tmp_path, monkeypatch, case):
    from lambda_eclipse.trainer import batches

    feats = tmp_path / "feats"
    shutil.copytree(small["feats"], feats)
    index = _index(feats)
    entry = index["shards"][1]
    if case == "huge":
        entry["examples"] = 10 ** 9
    elif case == "escape":
        entry["file"] = "../../" + entry["file"]
    elif case == "absolute":
        entry["file"] = str((feats / "shards" / entry["file"]).resolve())
    elif case == "no_file":
        del entry["file"]
    else:
        entry["examples"] = -3
    (feats / "index.json").write_text(json.dumps(index))

    def no_allocation(*a, **k):
        raise AssertionError("Split.make ran before the index was checked")

    monkeypatch.setattr(batches.Split, "make", classmethod(no_allocation))
    want = {"huge": ["1,000,000,000 examples", "does not belong"], "escape": ["../../", "not a file name inside"],
            "absolute": ["not a file name inside"], "no_file": ['no "file"'], "negative": ["-3"]}[case]
    for argv in (train_args(feats, tmp_path / "run"), ["eval", "--checkpoint", straight, "--data", feats]):
        code, _, err = run_cli(argv)
        assert_user_error(code, err, *want)
    assert not (tmp_path / "run").exists()


# -- 19.8: one message instead of a traceback; Ctrl-C is 130; nothing lost ------------------------------------

def test_out_that_is_a_file_or_under_a_file_is_one_message(small, tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        code, _, err = run_cli(train_args(small["feats"], out))
        assert_user_error(code, err, "--out", "is a file")
        code, _, err = run_cli(["extract", "--clip", small["clip"], "--out", out, "--manifest", small["manifest"]])
        assert_user_error(code, err, "--out", "is a file")
    assert (tmp_path / "f").read_text() == "x"


def test_a_full_disk_during_training_is_one_message_and_the_checkpoint_stays(small, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    ckpt = half_run(small, tmp_path / "run")
    before = snapshot(ckpt)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # every .safetensors write fails as on a full disk
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run"))
    assert_user_error(code, err, "No space left", "rng-0.safetensors")
    assert snapshot(ckpt) == before
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004").exists()


def test_a_full_disk_during_extraction_is_one_message_and_a_rerun_finishes(small, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_after_two_shards(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    argv = ["extract", "--clip", small["clip"], "--out", tmp_path / "f", "--manifest", small["manifest"],
            "--shard-size", "16", "--batch-size", "32", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(safetensors.torch, "save_file", full_after_two_shards)
    code, _, err = run_cli(argv)
    assert_user_error(code, err, "No space left", "shard-00002.safetensors")
    assert sorted(p.name for p in (tmp_path / "f" / "shards").iterdir()) == [
        "shard-00000.json", "shard-00000.safetensors", "shard-00001.json", "shard-00001.safetensors"]
    monkeypatch.undo()
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert json.loads(out)["examples"] == json.loads((small["feats"] / "index.json").read_text())["examples"]


def test_ctrl_c_in_train_is_exit_130_one_line_and_resumes_bit_identically(small, straight, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "prior_loss", stop_at_call(3))
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(small["feats"], out))
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (out / LOCK).exists()
    monkeypatch.undo()
    assert run_cli(train_args(small["feats"], out))[0] == 0
    assert same(weights(out, 4), weights(straight, 4))


def test_garbled_and_headerless_metrics_csv(small, straight, tmp_path):
    ckpt = half_run(small, tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.csv"
    good = metrics.read_text()
    metrics.write_text(good + "this,is,not\n")
    before = snapshot(tmp_path / "run")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run"))
    assert_user_error(code, err, f"metrics.csv line {len(good.splitlines()) + 1}", "not a metrics row",
                      "checkpoints are intact")
    assert snapshot(tmp_path / "run") == before
    # without its header (cut off): read as rows, and the header is put back in front
    metrics.write_text("".join(good.splitlines(keepends=True)[1:]))
    assert run_cli(train_args(small["feats"], tmp_path / "run"))[0] == 0
    rows = list(csv.reader(open(metrics)))
    assert rows[0] == T.CSV_FIELDS
    assert [(r[0], r[1]) for r in rows[1:]] == [("1", "train"), ("2", "train"), ("3", "train"), ("4", "train"),
                                                ("4", "val")]
    assert rows[1:3] == list(csv.reader(good.splitlines()))[1:3]  # the old rows kept as they were
    assert ckpt.exists()


# -- 18: eval scores the run's own split, warns once ----------------------------------------------------------

def test_eval_uses_the_runs_val_fraction_and_warns_once(small, tmp_path):
    out = tmp_path / "run"
    assert run_cli(train_args(small["feats"], out, **{"max-steps": 1, "save-every": 1, "val-fraction": 0.3}))[0] == 0
    held = sum(is_val(i, 0.3) for i in range(N))
    assert held != sum(is_val(i, 0.05) for i in range(N))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "lambda_eclipse.trainer", "eval", "--checkpoint", str(out), "--data",
                        str(small["feats"])], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["examples"] == held
    assert p.stderr.count(f"has {held} examples") == 1, p.stderr
    assert "--val-fraction 0.3" in p.stderr  # says where the split came from


def test_eval_refuses_a_nan_or_integer_checkpoint(small, tmp_path):
    ckpt = half_run(small, tmp_path / "run")
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = sorted(tensors)[0]
    for bad in (tensors[name] * float("nan"), tensors[name].to(torch.int8)):
        save_file({**tensors, name: bad}, str(ckpt / "model.safetensors"))
        code, _, err = run_cli(["eval", "--checkpoint", ckpt, "--data", small["feats"]])
        assert_user_error(code, err, name)
        code, _, err = run_cli(["export", "--checkpoint", ckpt, "--out", tmp_path / "prior"])
        assert_user_error(code, err, name)
    assert not (tmp_path / "prior").exists()


# -- 18: missing extras are named -------------------------------------------------------------------------------

@pytest.mark.parametrize("module,command", [("accelerate", "train"), ("accelerate", "extract"),
                                            ("peft", "finetune-decoder"), ("accelerate", "finetune-decoder")])
def test_a_missing_extra_says_what_to_install(small, tmp_path, monkeypatch, module, command):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    argv = {"train": train_args(small["feats"], tmp_path / "run"),
            "extract": ["extract", "--clip", small["clip"], "--out", tmp_path / "run", "--manifest", small["manifest"]],
            "finetune-decoder": ["finetune-decoder", "--out", tmp_path / "run", "--images", tmp_path, "--decoder", tmp_path,
                                 "--clip", tmp_path]}[command]
    code, _, err = run_cli(argv)
    assert_user_error(code, err, module, 'pip install -e ".[train]"', "pip install accelerate peft tensorboard pyyaml")
    assert not (tmp_path / "run").exists()


def test_a_missing_pyyaml_is_named_for_a_yaml_config(small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.001\n")
    code, _, err = run_cli(train_args(small["feats"], tmp_path / "run") + ["--config", cfg])
    assert_user_error(code, err, "pyyaml", 'pip install -e ".[train]"')


# -- 18: command help -------------------------------------------------------------------------------------------

def test_every_option_has_help_and_its_default_and_booleans_are_plain_flags(capsys):
    from lambda_eclipse.trainer.__main__ import Flag, _subparser, build_parser, parse

    parser = build_parser()
    for command in ("extract", "train", "eval", "export", "finetune-decoder"):
        sub = _subparser(parser, command)
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, (command, action.dest)
        text = sub.format_help()
        flat = " ".join(text.split())
        for action in sub._actions:
            if action.dest != "help":
                assert action.option_strings[0] in text, (command, action.dest)
        assert flat.count("(default:") == len([a for a in sub._actions if a.dest != "help"]), (command, text)
        for action in (a for a in sub._actions if isinstance(a, Flag)):
            name = action.option_strings[0]
            assert f"{name}, --no-{name[2:]}" in text and f"{name} {action.dest.upper()}" not in text
            assert f"[{action.dest.upper()}]" not in text
    # every spelling of a boolean: --cpu, --no-cpu, and the older --cpu true/false and --force
    assert parse(["train", "--cpu"]).cpu is True
    assert parse(["train", "--cpu", "--no-cpu"]).cpu is False
    assert parse(["train", "--cpu", "true"]).cpu is True and parse(["train", "--cpu", "false"]).cpu is False
    assert parse(["train", "--force"]).force is True and parse(["train", "--force", "true"]).force is True
    assert parse(["eval", "--all", "true"]).all is True and parse(["export", "--single-file"]).single_file is True
    assert parse(["finetune-decoder", "--no-progress"]).progress is False
    assert parse(["finetune-decoder", "--resume", "--cpu"]).resume is True
    with pytest.raises(SystemExit):
        parse(["train", "--no-cpu", "true"])
    assert "takes no value" in capsys.readouterr().err
