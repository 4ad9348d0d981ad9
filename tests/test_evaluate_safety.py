"""evaluate's bad inputs, faults and signals (issues 18 and 19): compare never replaces a file without --overwrite,
one run per output folder (core.fsio.FolderLock, two processes included), every check before any model loads,
one message and exit 2 for each bad input or failed write, exit 130 for Ctrl-C, the summary names the CLIP that
was loaded, --quiet is quiet, and every option's help shows its default."""

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lambda_eclipse.core import fsio
from lambda_eclipse.evaluate.cli import Processes, build_parser, main
from test_evaluate import _metric_args, make_dataset, metric_models  # noqa: F401 (a fixture)
from test_multibench import make_multi_dataset

LOCK = fsio.LOCK_NAME
SCORES = "subject,prompt,seed,image,dino,clip_i,clip_t\n"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code, err, *parts):
    """Exit 2, a single line `error: …` containing every part, no traceback."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def write_lock(folder: Path, pid: int):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "evaluate (other)"}))


def dead_pid() -> int:
    """A PID no process can have (above the kernel's pid_max), so the lock holding it is stale for sure."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except (OSError, ValueError):
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        return p.pid


@pytest.fixture
def no_models(monkeypatch):
    """Any load of the λ-ECLIPSE models or of a metric model fails the test: a refusal must come before them."""
    from lambda_eclipse.core import pipeline
    from lambda_eclipse.evaluate import metrics

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(pipeline, "load_models", loaded)
    monkeypatch.setattr(metrics.DinoEmbedder, "__init__", loaded)
    monkeypatch.setattr(metrics.ClipEmbedder, "__init__", loaded)


def scored_run(tmp_path, data, metric_models):
    """A Dreambench run folder with copies of the photos as its images, scored once (score-only)."""
    out = tmp_path / "run"
    for name in ("backpack", "dog"):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "images" / name / "p00_s0.png").write_bytes((data / name / "00.png").read_bytes())
    assert main(["dreambench", "--dataset", str(data), "--out", str(out), "--score-only",
                 *_metric_args(metric_models)]) == 0
    return out


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "dataset", identical=True)


def _dream(data, out, tiny_root, *extra):
    return ["dreambench", "--dataset", data, "--out", out, "--models", tiny_root, "--limit-prompts", "1",
            "--images-per-prompt", "1", "--steps", "2", "--width", "64", "--height", "64", *extra]


# -- 19.2: compare --out never replaces a file without --overwrite ---------------------------------------------------

def test_compare_out_refuses_to_replace_a_file_without_overwrite(tmp_path, data, metric_models, capsys):
    run_dir = scored_run(tmp_path, data, metric_models)
    capsys.readouterr()
    target = tmp_path / "compare.md"
    target.write_text("my notes")
    code, out, err = run(["compare", run_dir, run_dir, "--out", target], capsys)
    one_error(code, err, str(target), "already exists", "--overwrite")
    assert out == "" and target.read_text() == "my notes"  # refused before anything was computed
    code, out, err = run(["compare", run_dir, run_dir, "--out", target, "--overwrite"], capsys)
    assert code == 0 and target.read_text() == out and "| DINO |" in out
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    fresh = tmp_path / "new" / "c.md"
    assert run(["compare", run_dir, run_dir, "--out", fresh], capsys)[0] == 0 and fresh.read_text() == out
    assert oct(fresh.stat().st_mode & 0o777) == oct(fsio.file_mode())  # a plain file's mode, not mkstemp's 0600


def test_compare_write_failures_are_one_message(tmp_path, data, metric_models, capsys, monkeypatch):
    run_dir = scored_run(tmp_path, data, metric_models)
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    one_error(*run(["compare", run_dir, run_dir, "--out", tmp_path / "a-file" / "c.md"], capsys)[::2], "a-file",
              "is a file")
    one_error(*run(["compare", run_dir, run_dir, "--out", tmp_path], capsys)[::2], "is a folder")
    target = tmp_path / "c.md"
    target.write_text("old")

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", disk_full)
    code, _, err = run(["compare", run_dir, run_dir, "--out", target, "--overwrite"], capsys)
    one_error(code, err, "No space left", str(target))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    monkeypatch.undo()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fsio.tempfile, "mkstemp", read_only)
    one_error(*run(["compare", run_dir, run_dir, "--out", target, "--overwrite"], capsys)[::2],
              "Read-only file system", "Choose a folder you can write to")
    assert target.read_text() == "old"


# -- 19.8: compare's bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("short_row", "line 2: a short row (3 of 7 values; no image, dino, clip_i, clip_t)"),
    ("long_row", "line 2: more values than the 7 columns"),
    ("not_utf8", "is not UTF-8 text"),
    ("not_a_number", "line 3: a value that is not a finite number"),
    ("nan", "line 2: a value that is not a finite number (dino is nan)"),
    ("empty", "is empty: not a scores.csv"),
    ("missing", "does not exist"),
    ("folder_without_scores", "has no scores.csv"),
    ("fifo", "is a FIFO"),
    ("samples_0", "--samples must be a whole number from 1 to 100,000"),
    ("samples_-3", "got -3"),
    ("seed_-1", "--seed -1 is out of range"),
])
def test_compare_bad_inputs_are_one_message(tmp_path, case, message, capsys):
    good = tmp_path / "good.csv"
    good.write_text(SCORES + "dog,a dog,0,dog/p00_s0.png,0.5,0.5,0.2\n")
    bad = tmp_path / "bad.csv"
    extra = []
    if case == "short_row":
        bad.write_text(SCORES + "dog,a dog,0\n")
    elif case == "long_row":
        bad.write_text(SCORES + "dog,a dog,0,dog/p00_s0.png,0.5,0.5,0.2,9\n")
    elif case == "not_utf8":
        bad.write_bytes(SCORES.encode() + b"dog,a \xff dog,0,dog/p00_s0.png,0.5,0.5,0.2\n")
    elif case == "not_a_number":
        bad.write_text(SCORES + "dog,a dog,0,dog/p00_s0.png,0.5,0.5,0.2\ndog,a dog,1,dog/p00_s1.png,high,0.5,0.2\n")
    elif case == "nan":
        bad.write_text(SCORES + "dog,a dog,0,dog/p00_s0.png,nan,0.5,0.2\n")
    elif case == "empty":
        bad.write_text("")
    elif case == "folder_without_scores":
        bad = tmp_path / "folder"
        bad.mkdir()
    elif case == "fifo":
        os.mkfifo(bad)
    elif case.startswith(("samples", "seed")):
        flag, value = case.split("_")
        bad, extra = good, [f"--{flag}", value]
    code, out, err = run(["compare", good, bad, *extra], capsys)
    one_error(code, err, message)
    assert out == ""


def test_ctrl_c_is_exit_130_and_one_line(tmp_path, data, metric_models, capsys, monkeypatch):
    from lambda_eclipse.evaluate import compare, dreambench

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare_runs", interrupted)
    code, _, err = run(["compare", tmp_path, tmp_path], capsys)
    assert code == 130 and err.count("\n") == 1 and err.startswith("stopped") and "Traceback" not in err
    for name in ("backpack", "dog"):
        (tmp_path / "run" / "images" / name).mkdir(parents=True)
        (tmp_path / "run" / "images" / name / "p00_s0.png").write_bytes((data / name / "00.png").read_bytes())
    monkeypatch.setattr(dreambench, "score_images", interrupted)
    code, _, err = run(["dreambench", "--dataset", data, "--out", tmp_path / "run", "--score-only",
                        *_metric_args(metric_models)], capsys)
    assert code == 130 and err.count("\n") == 1 and err.startswith("stopped") and "Traceback" not in err
    assert not (tmp_path / "run" / LOCK).exists()  # the lock goes with the run


# -- 19.3: one run per output folder ---------------------------------------------------------------------------

def test_a_live_lock_refuses_at_once_and_a_stale_one_does_not_block(tmp_path, data, metric_models, tiny_models,
                                                                     capsys, caplog, no_models):
    out = tmp_path / "run"
    write_lock(out, os.getppid())  # a live process that is not this one
    for argv in (["dreambench", "--dataset", data, "--out", out, "--score-only", *_metric_args(metric_models)],
                 _dream(data, out, tiny_models["root"], *_metric_args(metric_models))):
        one_error(*run(argv, capsys)[::2], f"PID {os.getppid()}", "in use by another run")
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written, nothing loaded
    # the image folder of another run (--images) is locked too
    shared = tmp_path / "other"
    write_lock(shared / "images", os.getppid())
    one_error(*run(_dream(data, tmp_path / "third", tiny_models["root"], "--images", shared / "images",
                          *_metric_args(metric_models)), capsys)[::2], f"PID {os.getppid()}")
    # Multibench: prompts.csv is not written into a folder another run holds
    mdata, concepts = make_multi_dataset(tmp_path / "multi")
    one_error(*run(["multibench", "--dataset", mdata, "--concepts", concepts, "--out", out, "--prompts-only"],
                   capsys)[::2], f"PID {os.getppid()}")
    assert not (out / "prompts.csv").exists()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, data, metric_models, capsys, caplog):
    out = tmp_path / "run"
    write_lock(out, dead_pid())
    (out / "images" / "dog").mkdir(parents=True)
    (out / "images" / "dog" / "p00_s0.png").write_bytes((data / "dog" / "00.png").read_bytes())
    caplog.set_level("WARNING", logger="lambda_eclipse")
    code, _, err = run(["dreambench", "--dataset", data, "--out", out, "--score-only", *_metric_args(metric_models)],
                       capsys)
    assert code == 0, err
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK).exists() and (out / "scores.csv").is_file()
    mdata, concepts = make_multi_dataset(tmp_path / "multi")
    write_lock(tmp_path / "m", dead_pid())
    assert run(["multibench", "--dataset", mdata, "--concepts", concepts, "--out", tmp_path / "m",
                "--prompts-only"], capsys)[0] == 0
    assert (tmp_path / "m" / "prompts.csv").is_file() and not (tmp_path / "m" / LOCK).exists()


class _FakeState:
    device = "cpu"

    def wait_for_everyone(self):
        pass


def test_only_the_main_process_locks_and_a_failure_stops_every_process(monkeypatch, tmp_path):
    """The logic of Processes.on_main with the broadcast stubbed (the real one runs in the two-process test)."""
    import accelerate.utils

    sent, main_says = [], {}

    def broadcast(objects, from_process=0):  # what every process gets: the main process's list
        sent.append(list(objects))
        return main_says.get("list", objects)

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    calls = []
    main_says["list"] = ["main: the folder is locked"]
    other = Processes(1, 2, _FakeState())
    with pytest.raises(Exception, match="process 2/2 stopped because the main process did: main: the folder is locked"):
        other.on_main(lambda: calls.append("step"))
    assert calls == [] and sent == [[None]]  # the step (the lock) runs on the main process only
    main_says.clear()
    main_proc = Processes(0, 2, _FakeState())

    def fails():
        raise fsio.FolderLockedError("locked by PID 1")

    with pytest.raises(fsio.FolderLockedError, match="PID 1"):
        main_proc.on_main(fails)
    assert sent[-1] == ["locked by PID 1"]  # the others are told
    assert main_proc.on_main(lambda: 5) == 5 and Processes().on_main(lambda: 6) == 6


def test_two_processes_share_the_work_and_do_not_lock_each_other_out(tmp_path, data, metric_models, tiny_models):
    """torchrun, 2 CPU processes (gloo): each makes its share of the images (process 1/2 and 2/2: without cpu=True
    PartialState made no process group on a machine without a GPU, and each process believed it was alone); the
    main process holds the lock for both, scores, and releases it. (A failure of the main process's start reaching
    the other process is test_only_the_main_process_locks_and_a_failure_stops_every_process.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    argv = _dream(data, out, tiny_models["root"], "--quiet", "--dino", metric_models["dino"], "--clip-eval",
                  metric_models["clip_folder"])
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "-m", "lambda_eclipse.evaluate", *map(str, argv)],
                       env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "process 1/2: generated 1 images" in p.stderr and "process 2/2: generated 1 images" in p.stderr
    assert len((out / "scores.csv").read_text().splitlines()) == 3 and not (out / LOCK).exists()


# -- 19.5 / 19.9: every check before any model loads -----------------------------------------------------------------

def test_an_unwritable_out_is_refused_before_anything_loads(tmp_path, data, metric_models, tiny_models, capsys,
                                                            monkeypatch, no_models):
    from lambda_eclipse.core import outputs

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    mdata, concepts = make_multi_dataset(tmp_path / "multi")
    multi = ["multibench", "--dataset", mdata, "--concepts", concepts, "--max-prompts", "1"]
    for argv in (_dream(data, a_file, tiny_models["root"], *_metric_args(metric_models)),
                 ["dreambench", "--dataset", data, "--out", a_file, "--score-only", *_metric_args(metric_models)],
                 [*multi, "--out", a_file, "--prompts-only"],
                 [*multi, "--out", a_file, "--models", tiny_models["root"], *_metric_args(metric_models)]):
        one_error(*run(argv, capsys)[::2], f"--out {a_file} is a file, not a folder")
    one_error(*run(_dream(data, a_file / "run", tiny_models["root"], *_metric_args(metric_models)), capsys)[::2],
              "cannot be created because", "is a file")
    one_error(*run(_dream(data, tmp_path / "ok", tiny_models["root"], "--images", a_file,
                          *_metric_args(metric_models)), capsys)[::2], f"--images {a_file} is a file")
    assert a_file.read_text() == "mine"
    # root can write anywhere: simulate what a read-only disk answers
    monkeypatch.setattr(outputs, "_cannot_write", lambda folder: "Read-only file system")
    for argv in (_dream(data, tmp_path / "ro", tiny_models["root"], *_metric_args(metric_models)),
                 [*multi, "--out", tmp_path / "ro", "--prompts-only"]):
        one_error(*run(argv, capsys)[::2], "is not writable", "Read-only file system")
    assert not (tmp_path / "ro").exists()


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "-5"], "--guidance must be 0 or more (1 = no guidance; the paper uses 7.5); got -5.0"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--reference", "99"], "--reference 99: photo #99 (counting from 0, in name order) does not exist for every "
                            "subject; these have fewer photos: backpack (2), dog (2). Choose 0 … 1"),
    (["--reference", "-1"], "--reference must be 0 or more"),
])
def test_generation_settings_are_refused_before_anything_loads(tmp_path, data, metric_models, tiny_models, capsys,
                                                               no_models, extra, message):
    one_error(*run(_dream(data, tmp_path / "run", tiny_models["root"], *_metric_args(metric_models), *extra),
                   capsys)[::2], message)
    mdata, concepts = make_multi_dataset(tmp_path / "multi")
    one_error(*run(["multibench", "--dataset", mdata, "--concepts", concepts, "--out", tmp_path / "m",
                    "--models", tiny_models["root"], *_metric_args(metric_models), *extra], capsys)[::2],
              message.split(":")[0] if "reference 99" in message else message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "m").exists()


def test_guidance_below_one_is_a_warning_as_in_generate(tmp_path, data, metric_models, tiny_models, capsys, caplog):
    caplog.set_level("WARNING", logger="lambda_eclipse")
    assert run(_dream(data, tmp_path / "run", tiny_models["root"], "--subjects", "dog", "--guidance", "0.5",
                      *_metric_args(metric_models)), capsys)[0] == 0
    assert any("--guidance 0.50 is below 1" in r.getMessage() for r in caplog.records)


def test_score_only_without_images_is_said_before_the_metric_models_load(tmp_path, data, metric_models, capsys,
                                                                        no_models):
    one_error(*run(["dreambench", "--dataset", data, "--out", tmp_path / "empty", "--score-only",
                    *_metric_args(metric_models)], capsys)[::2], "No images to score")


def test_disk_full_while_writing_the_scores_is_one_message(tmp_path, data, metric_models, capsys, monkeypatch):
    out = scored_run(tmp_path, data, metric_models)
    old = (out / "scores.csv").read_bytes()
    capsys.readouterr()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", disk_full)
    code, _, err = run(["dreambench", "--dataset", data, "--out", out, "--score-only", *_metric_args(metric_models)],
                       capsys)
    one_error(code, err, "No space left on device", str(out / "scores.csv"))
    assert (out / "scores.csv").read_bytes() == old
    assert [p.name for p in out.iterdir() if ".tmp" in p.name or p.name == LOCK] == []


# -- issue 18: the summary, --quiet and the help ----------------------------------------------------------------------

def test_summary_names_the_clip_that_was_loaded_and_quiet_is_quiet(tmp_path, data, metric_models, capsys):
    from transformers.utils import logging as hf_logging

    out = tmp_path / "run"
    (out / "images" / "dog").mkdir(parents=True)
    (out / "images" / "dog" / "p00_s0.png").write_bytes((data / "dog" / "00.png").read_bytes())
    folder_clip = ["--dino", metric_models["dino"], "--clip-eval", metric_models["clip_folder"], "--quiet"]
    hf_logging.enable_progress_bar()
    code, _, err = run(["dreambench", "--dataset", data, "--out", out, "--score-only", *folder_clip], capsys)
    assert code == 0, err
    assert "Loading weights" not in err and err == ""
    assert hf_logging.is_progress_bar_enabled()  # restored after the call
    summary = (out / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("- clip-eval:"))
    assert str(metric_models["clip_folder"]) in line and "ViT-B-32-quickgelu" not in line
    assert "OpenCLIP folder: vision image 224, patch 32, width 32, layers 1; embedding 32; GELU" in line
    assert run(["dreambench", "--dataset", data, "--out", out, "--score-only", *_metric_args(metric_models)],
               capsys)[0] == 0
    line = next(x for x in (out / "summary.md").read_text().splitlines() if x.startswith("- clip-eval:"))
    assert line == f"- clip-eval: {metric_models['clip_file']} (weights file, OpenCLIP config tiny-eval-clip)"


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_showing_its_default_and_flags_are_plain():
    parser = build_parser()
    for name, sub in [("", parser), *_subparsers(parser).items()]:
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"{name} {flag} has no help"
            if action.option_strings and not any(action.default is v for v in (None, False)):
                assert f"(default: {action.default})" in text, f"{name} {flag}: default {action.default} not shown"
            if action.nargs == 0:
                assert action.default is False and isinstance(action, argparse._StoreTrueAction), f"{name} {flag}"
            else:
                assert action.nargs != "?" and not {"true", "false"} & set(map(str, action.choices or ())), \
                    f"{name} {flag}: a boolean must be a plain --flag"
    assert "--overwrite" in _subparsers(parser)["compare"].format_help()
