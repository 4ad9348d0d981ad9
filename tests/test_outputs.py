"""core/outputs.py: the output path is checked before any work; images are written atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse.core import outputs
from lambda_eclipse.core.errors import InputError, OutputPathError
from lambda_eclipse.core.outputs import check_output_path, check_size, save_image_atomic


# -- check_output_path ----------------------------------------------------------------------------------

def test_returns_the_final_paths(tmp_path):
    assert check_output_path(tmp_path / "a.png") == [tmp_path / "a.png"]
    assert check_output_path(tmp_path / "new" / "deeper" / "b.JPG") == [tmp_path / "new" / "deeper" / "b.JPG"]
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output_path(tmp_path / "c.webp", count=3) == [tmp_path / f"c_{i}.webp" for i in (1, 2, 3)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the write test left nothing


def test_no_extension(tmp_path):
    with pytest.raises(OutputPathError, match=r"--out '.*result' has no extension.*End it with \.png, \.jpg, \.jpeg or \.webp, e\.g\. result\.png"):
        check_output_path(str(tmp_path / "result"))


def test_unknown_extension(tmp_path):
    with pytest.raises(OutputPathError, match=r"'\.gif' is not a format this can write\. End it with \.png, \.jpg, \.jpeg or \.webp"):
        check_output_path(tmp_path / "result.gif")


def test_existing_folder(tmp_path):
    (tmp_path / "shots.png").mkdir()
    with pytest.raises(OutputPathError, match=r"is an existing folder\. Give a file name inside it, e\.g\. .*shots\.png/result\.png"):
        check_output_path(tmp_path / "shots.png")
    with pytest.raises(OutputPathError, match=r"names a folder\. Give a file name inside it"):
        check_output_path(str(tmp_path / "later") + "/")


def test_parent_cannot_be_created(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"the folder '.*notes\.txt/sub' cannot be created because '.*notes\.txt' is a file\. Choose another folder"):
        check_output_path(tmp_path / "notes.txt" / "sub" / "out.png")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_parent_not_writable(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(OutputPathError, match=r"the folder '.*locked' is not writable: .*Choose a folder you can write to"):
                check_output_path(locked / "out.png")
        finally:
            locked.chmod(0o700)
    # root can write anywhere: simulate what a read-only disk answers
    monkeypatch.setattr(outputs, "_cannot_write", lambda folder: "Read-only file system")
    with pytest.raises(OutputPathError, match=r"is not writable \(needed to create '.*a/b'\): Read-only file system\. Choose a folder you can write to, or fix its permissions"):
        check_output_path(tmp_path / "a" / "b" / "out.png")


def test_existing_files_are_refused_unless_overwrite(tmp_path):
    (tmp_path / "one.png").write_bytes(b"mine")
    with pytest.raises(OutputPathError, match=r"one\.png already exists; nothing was overwritten\. Choose another --out, or pass --overwrite to replace it"):
        check_output_path(tmp_path / "one.png")
    assert check_output_path(tmp_path / "one.png", overwrite=True) == [tmp_path / "one.png"]
    (tmp_path / "b_2.png").write_bytes(b"mine")
    (tmp_path / "b_3.png").write_bytes(b"mine")
    with pytest.raises(OutputPathError, match=r"b_2\.png, .*b_3\.png already exist; nothing was overwritten\..*pass --overwrite to replace them"):
        check_output_path(tmp_path / "b.png", count=3)
    with pytest.raises(OutputPathError, match=r"set overwrite to true"):
        check_output_path(tmp_path / "one.png", what="filename", overwrite_hint="set overwrite to true")
    assert (tmp_path / "one.png").read_bytes() == b"mine"


# -- check_size ---------------------------------------------------------------------------------------------

def test_check_size_states_the_range():
    assert check_size(512, 768) == (512, 768)
    with pytest.raises(InputError, match=r"--width 5000 is out of range: choose 64 … 4096 pixels.*memory"):
        check_size(5000, 512)
    with pytest.raises(InputError, match=r"--height 0 is out of range: choose 64 … 4096"):
        check_size(512, 0)
    with pytest.raises(InputError, match=r"width must be a whole number of pixels \(64 … 4096\); got 512\.5"):
        check_size(512.5, 512, names=("width", "height"))


# -- save_image_atomic --------------------------------------------------------------------------------------

def test_save_writes_the_image_with_the_usual_mode(tmp_path):
    old = os.umask(0o027)
    try:
        image = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
        out = save_image_atomic(torch.from_numpy(image), tmp_path / "sub" / "x.png")
    finally:
        os.umask(old)
    assert out == tmp_path / "sub" / "x.png"
    expected = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)  # cli.save_images' rounding
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    assert (out.stat().st_mode & 0o777) == 0o640  # 0o666 & ~umask, not mkstemp's 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]


def test_save_format_follows_the_suffix(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 100))
    save_image_atomic(rgba, tmp_path / "x.JPG")
    with Image.open(tmp_path / "x.JPG") as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    save_image_atomic(rgba, tmp_path / "x.webp")
    with Image.open(tmp_path / "x.webp") as im:
        assert im.format == "WEBP"


def test_failed_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    target.write_bytes(b"the user's earlier result")

    def broken(self, fp, format=None, **params):
        fp.write(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OutputPathError, match=r"Could not write .*keep\.png \(No space left on device\); nothing was changed there\. Check the free space"):
        save_image_atomic(Image.new("RGB", (4, 4)), target)
    assert target.read_bytes() == b"the user's earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_temp_file_is_hidden_next_to_the_target_with_the_same_suffix(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", spy)
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "shot.png")
    assert seen[0].startswith(".shot.png.tmp-") and seen[0].endswith(".png")
