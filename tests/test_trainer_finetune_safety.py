"""finetune-decoder under hostile or broken input (issue 19): no pickle runs, one run per --out, checks before any
model loads, Ctrl-C is exit 130 and resumes bit-identically, metrics.csv always has its header."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lambda_eclipse.trainer import finetune_decoder as F
from lambda_eclipse.trainer.state_io import load_state
from test_trainer_errors import assert_user_error, run_cli, snapshot
from test_trainer_safety import LOCK, Planted, dead_pid, write_lock

pytest.importorskip("peft")

COMMON = ("--steps", "4", "--save-every", "2", "--lr", "1e-3", "--no-progress")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def args(tiny_models, photos, out, *extra, unet=None, movq=None):
    return ["finetune-decoder", "--decoder-unet", str(unet or tiny_models["decoder_unet"]), "--decoder-movq",
            str(movq or tiny_models["decoder_movq"]), "--clip-vision", str(tiny_models["clip_vision"]), "--images",
            str(photos), "--out", str(out), "--resolution", "64", "--cpu", *COMMON, *extra]


@pytest.fixture(scope="module")
def straight(tiny_models, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "straight"
    code, _, err = run_cli(args(tiny_models, photos, out))
    assert code == 0, err
    return out


def lora(out):
    return load_file(str(out / "concept_lora.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_at_step(n: int, exc=KeyboardInterrupt):
    orig, calls = F.training_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return orig(*a, **k)

    return step


def half_run(tiny_models, photos, out):
    """The straight run stopped by Ctrl-C in step 3 (its step-2 checkpoint is the last)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "training_step", interrupt_at_step(3))
        code, _, err = run_cli(args(tiny_models, photos, out))
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return out / "checkpoint" / "state.safetensors"


def refuse_to_load(*a, **k):
    raise AssertionError("a model was loaded before the check")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model is loaded: every check here must come before."""
    monkeypatch.setattr(F, "_load_clip", refuse_to_load)
    monkeypatch.setattr(F, "_load_decoder", refuse_to_load)


# -- 19.1 / 19.8 ----------------------------------------------------------------------------------------------

def test_ctrl_c_is_130_and_the_resume_equals_the_straight_run(tiny_models, photos, straight, tmp_path):
    out = tmp_path / "run"
    state = half_run(tiny_models, photos, out)
    assert load_state(state)["step"] == 2 and not (out / LOCK).exists()
    code, _, err = run_cli(args(tiny_models, photos, out, "--resume"))
    assert code == 0, err
    assert same(lora(out), lora(straight))
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0] == F.METRICS_HEADER and [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_an_older_state_pt_resumes_safely_and_bit_identically(tiny_models, photos, straight, tmp_path):
    out = tmp_path / "run"
    state = half_run(tiny_models, photos, out)
    torch.save(load_state(state), out / "checkpoint" / "state.pt")  # what earlier versions wrote
    state.unlink()
    code, _, err = run_cli(args(tiny_models, photos, out, "--resume"))
    assert code == 0, err
    assert same(lora(out), lora(straight))
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["state.safetensors"]  # the pickle is gone


def test_a_planted_pickle_never_runs_even_for_the_refusal_message(tiny_models, photos, tmp_path, no_model_loads):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    (out / "checkpoint").mkdir(parents=True)
    torch.save({"step": Planted(marker)}, out / "checkpoint" / "state.pt")
    code, _, err = run_cli(args(tiny_models, photos, out))
    assert_user_error(code, err, "already holds a fine-tuning run", "unreadable", "--resume")
    code, _, err = run_cli(args(tiny_models, photos, out, "--resume"))
    assert_user_error(code, err, "state.pt", "could run code")
    assert not marker.exists()


def test_a_damaged_state_file_is_one_message(tiny_models, photos, tmp_path, no_model_loads):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"bad")
    code, _, err = run_cli(args(tiny_models, photos, out))
    assert_user_error(code, err, "already holds a fine-tuning run", "unreadable")
    code, _, err = run_cli(args(tiny_models, photos, out, "--resume"))
    assert_user_error(code, err, "state.safetensors", "damaged", "Delete")


def test_a_full_disk_at_a_checkpoint_is_one_message_and_the_last_one_stays(tiny_models, photos, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    out = tmp_path / "run"
    state = half_run(tiny_models, photos, out)
    before = state.read_bytes()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run_cli(args(tiny_models, photos, out, "--resume"))
    assert_user_error(code, err, "No space left", "state.safetensors")
    assert state.read_bytes() == before


# -- 19.3 / 19.5: a second run, and what the headers say, before any model loads -----------------------------

def test_a_live_lock_refuses_at_once_and_a_stale_one_is_taken_over(tiny_models, photos, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_lock(out, os.getppid())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "_load_clip", refuse_to_load)
        code, _, err = run_cli(args(tiny_models, photos, out, "--steps", "1"))
    assert_user_error(code, err, f"PID {os.getppid()}")
    write_lock(out, dead_pid())
    code, _, err = run_cli(args(tiny_models, photos, out, "--steps", "1"))
    assert code == 0, err
    assert not (out / LOCK).exists()


def test_decoder_files_and_out_are_checked_before_any_model_loads(tiny_models, photos, tmp_path, no_model_loads,
                                                                  monkeypatch):
    unet, movq = tiny_models["decoder_unet"], tiny_models["decoder_movq"]
    cases = [
        (dict(unet=tmp_path / "no-unet.safetensors"), ["no-unet.safetensors", "not found"]),
        (dict(unet=movq), [movq.name, "given as the UNet", "MoVQ"]),
        (dict(unet=movq, movq=unet), ["swapped"]),
    ]
    for files, fragments in cases:
        code, _, err = run_cli(args(tiny_models, photos, tmp_path / "run", **files))
        assert_user_error(code, err, *fragments)
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run"):
        code, _, err = run_cli(args(tiny_models, photos, out))
        assert_user_error(code, err, "--out", "is a file")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(read_only) else real_access(p, mode, **k))
    for out in (read_only, read_only / "run"):
        code, _, err = run_cli(args(tiny_models, photos, out))
        assert_user_error(code, err, "--out", "not writable")
        code, _, err = run_cli(["extract", "--clip", tiny_models["clip"], "--out", out, "--manifest", tmp_path / "m"])
        assert_user_error(code, err, "--out", "not writable")
    assert not (tmp_path / "run").exists() and list(read_only.iterdir()) == []


# -- 19.11: metrics.csv always starts with its header ---------------------------------------------------------

def test_sigterm_before_the_first_step_leaves_the_header_and_the_next_run_keeps_it(tiny_models, photos, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent("""
        import os, signal, sys
        from lambda_eclipse.trainer import finetune_decoder as F
        F.training_step = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)
        from lambda_eclipse.trainer.__main__ import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", script, *args(tiny_models, photos, out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGTERM, p.stderr[-2000:]
    assert (out / "metrics.csv").read_text().splitlines() == [",".join(F.METRICS_HEADER)]
    code, _, err = run_cli(args(tiny_models, photos, out, "--steps", "2"))
    assert code == 0, err
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0] == F.METRICS_HEADER and [r[0] for r in rows[1:]] == ["1", "2"]


def test_an_empty_headerless_or_garbled_metrics_csv(tiny_models, photos, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("")  # what a kill before the first flush left (before the fix)
    assert run_cli(args(tiny_models, photos, out, "--steps", "1"))[0] == 0
    assert list(csv.reader(open(out / "metrics.csv")))[0] == F.METRICS_HEADER
    # headerless rows on resume: the header is put back in front, the rows kept
    out = tmp_path / "run2"
    half_run(tiny_models, photos, out)
    metrics = out / "metrics.csv"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[1:]))
    garbled = "".join(lines) + "not,a,row\n"
    assert run_cli(args(tiny_models, photos, out, "--resume"))[0] == 0
    rows = list(csv.reader(open(metrics)))
    assert rows[0] == F.METRICS_HEADER and [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    # a garbled file: refused before anything is written
    metrics.write_text(garbled)
    before = snapshot(out)
    code, _, err = run_cli(args(tiny_models, photos, out, "--resume", "--steps", "6"))
    assert_user_error(code, err, f"metrics.csv line {len(lines) + 1}", "not a metrics row")
    assert snapshot(out) == before
