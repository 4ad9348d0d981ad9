"""Writing results: two runs on one --out never replace each other's picture; write failures in encode and check
(a parent that is a file, a read-only folder, a full disk, an unusable temporary folder) give one message and
exit 2 with nothing half-written; Ctrl-C in generate gives exit 130 and one line of its own."""

from __future__ import annotations

import errno
import tempfile

import pytest
from PIL import Image

from lambda_eclipse.core import cli, outputs, pipeline
from lambda_eclipse.core.cli import main

FAST = ["--steps", "1", "--width", "64", "--height", "64", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def dog(tmp_path_factory):
    path = tmp_path_factory.mktemp("writes") / "dog.png"
    Image.new("RGB", (240, 240), (150, 90, 40)).save(path)
    return path


def run(argv):
    return main([str(a) for a in argv])


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _one_error(capsys, *phrases):
    out, err = capsys.readouterr()
    lines = err.splitlines()  # the "using <file>" lines of the model search may come first
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert "Traceback" not in out + err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    return err


# -- two generate runs with the same --out -------------------------------------------------------------------

def test_a_picture_written_meanwhile_by_another_run_is_not_replaced(tiny_models, dog, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pic.png"
    real = pipeline.generate

    def other_run_finishes_first(*args, **kwargs):
        result = real(*args, **kwargs)
        out.write_bytes(b"the other run's picture")  # after our --out check, before our save
        return result

    monkeypatch.setattr(pipeline, "generate", other_run_finishes_first)
    argv = ["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={dog}", *FAST,
            "--out", out]
    assert run(argv) == 2
    _one_error(capsys, f"{out} already exists; nothing was changed", "--overwrite")
    assert out.read_bytes() == b"the other run's picture"
    assert _files(tmp_path) == ["pic.png"]  # no temporary file left
    out.unlink()
    monkeypatch.setattr(pipeline, "generate", other_run_finishes_first)
    assert run(argv + ["--overwrite"]) == 0  # asked for: replaced
    assert Image.open(out).size == (64, 64)


def test_save_image_without_overwrite_never_replaces(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"mine")
    from lambda_eclipse.core.errors import OutputPathError

    with pytest.raises(OutputPathError, match="already exists; nothing was changed"):
        outputs.save_image_atomic(Image.new("RGB", (4, 4)), target, overwrite=False)
    assert target.read_bytes() == b"mine" and _files(tmp_path) == ["a.png"]
    outputs.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "b.png", overwrite=False)
    assert Image.open(tmp_path / "b.png").size == (4, 4)


def test_save_image_goes_through_the_one_writer(tmp_path, monkeypatch):
    from lambda_eclipse.core import fsio

    calls = []
    real = fsio.atomic_write
    monkeypatch.setattr(fsio, "atomic_write", lambda *a, **k: calls.append(k) or real(*a, **k))
    outputs.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.png", overwrite=False)
    assert calls == [{"overwrite": False}]


# -- Ctrl-C ------------------------------------------------------------------------------------------------

def test_ctrl_c_during_generate_is_one_line_and_exit_130(tiny_models, dog, tmp_path, monkeypatch, capsys):
    real_call = cli._Progress.__call__

    def interrupted(self, step, total):
        real_call(self, step, total)  # the progress bar is on screen …
        raise KeyboardInterrupt  # … when the user presses Ctrl-C

    monkeypatch.setattr(cli._Progress, "__call__", interrupted)
    out = tmp_path / "pic.png"
    code = run(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={dog}",
                "--steps", "3", "--width", "64", "--height", "64", "--device", "cpu", "--out", out])
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "stopped by Ctrl-C; no output file was left half-written"  # a line of its own
    assert err.count("stopped by Ctrl-C") == 1
    assert not out.exists() and _files(tmp_path) == []


# -- encode --------------------------------------------------------------------------------------------------

def _encode(tiny_models, out, *extra):
    return ["encode", "--clip-text", tiny_models["clip_text"], "--prompt", "a dog", "--out", out, *extra]


def test_encode_out_under_a_file_is_refused_before_loading(tiny_models, tmp_path, monkeypatch, capsys):
    from lambda_eclipse.core import clip

    monkeypatch.setattr(clip, "load_clip_towers", lambda *a, **k: pytest.fail("the CLIP was loaded"))
    (tmp_path / "notes.txt").write_text("mine")
    assert run(_encode(tiny_models, tmp_path / "notes.txt" / "f.safetensors")) == 2
    _one_error(capsys, "notes.txt' is a file", "Choose another folder")
    monkeypatch.setattr(outputs, "_cannot_write", lambda folder: "Read-only file system")  # what a read-only disk says
    assert run(_encode(tiny_models, tmp_path / "f.safetensors")) == 2
    _one_error(capsys, "is not writable", "Read-only file system", "Choose a folder you can write to")
    assert _files(tmp_path) == ["notes.txt"]


def test_encode_disk_full_leaves_nothing_and_keeps_the_old_file(tiny_models, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "f.safetensors"
    out.write_bytes(b"earlier features")

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert run(_encode(tiny_models, out, "--overwrite")) == 2
    _one_error(capsys, f"Could not write {out} (No space left on device); nothing was changed there")
    assert out.read_bytes() == b"earlier features" and _files(tmp_path) == ["f.safetensors"]


# -- check ---------------------------------------------------------------------------------------------------

def test_check_out_under_a_file_is_refused_at_once(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_tiny_run", lambda tmp: pytest.fail("check ran before refusing its --out"))
    (tmp_path / "notes.txt").write_text("mine")
    assert run(["check", "--models", tiny_models["root"], "--out", tmp_path / "notes.txt" / "noise.png"]) == 2
    _one_error(capsys, "is a file", "Choose another folder")
    assert run(["check", "--models", tiny_models["root"], "--out", tmp_path]) == 2
    _one_error(capsys, "is an existing folder")


def test_check_disk_full_writing_out(tiny_models, tmp_path, monkeypatch, capsys):
    def full(self, fp, format=None, **params):
        fp.write(b"half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "noise.png"
    assert run(["check", "--models", tiny_models["root"], "--out", out]) == 2
    _one_error(capsys, f"Could not write {out} (No space left on device)")
    assert _files(tmp_path) == []


def test_check_with_an_unusable_temporary_folder(tiny_models, tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "tmpfile"
    not_a_folder.write_text("a file where TMPDIR points")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    assert run(["check", "--models", tiny_models["root"]]) == 2
    _one_error(capsys, "check could not use a temporary folder", "set TMPDIR to a folder you can write to")


def test_check_disk_full_writing_its_tiny_models(tiny_models, tmp_path, monkeypatch, capsys):
    from lambda_eclipse.core import tiny

    def full(root, seed=0):
        (tmp_path / "partial").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiny, "write_tiny_models", full)
    assert run(["check", "--models", tiny_models["root"]]) == 2
    _one_error(capsys, "check could not write its tiny test models", "No space left on device", "TMPDIR")
