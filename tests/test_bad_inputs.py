"""Bad inputs on the command line: exit code 2, a message that says what was wrong and what to do, no
traceback, nothing written or replaced, and (where the mistake is visible up front) no model loaded."""

import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lambda_eclipse.core import clip as clip_module
from lambda_eclipse.core import pipeline
from lambda_eclipse.core.cli import main
from lambda_eclipse.core.paths import manifest

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--quiet"]


def run(args):
    return main([str(a) for a in args])


# -- helpers ---------------------------------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR that claims width×height (CRC correct), with a tiny IDAT: cheap to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _state(folder: Path) -> dict:
    """Every file under `folder`: (bytes, mtime_ns). Equal before and after = nothing written, replaced or left behind."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys, phrases, watch: Path) -> str:
    """Run argv; assert exit 2, every phrase in stderr, no traceback, and no change under `watch`. → stderr."""
    before = _state(watch)
    code = run(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in stderr:\n{err}"
    assert "Traceback" not in out + err
    assert _state(watch) == before, "an output file was written, replaced or left behind"
    return err


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the error must come before the models load."""
    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(pipeline, "load_models", refuse)
    monkeypatch.setattr(clip_module, "load_clip_towers", refuse)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_pictures")
    dog = Image.new("RGB", (180, 120), "white")
    ImageDraw.Draw(dog).ellipse((40, 20, 140, 100), fill=(150, 90, 30))
    mask = Image.new("L", (180, 120), 0)
    ImageDraw.Draw(mask).ellipse((40, 20, 140, 100), fill=255)
    dog.save(root / "dog.png")
    mask.save(root / "dog_mask.png")
    (root / "notes.txt").write_text("<html><body>404 Not Found</body></html>\n")
    (root / "empty.png").write_bytes(b"")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    big.save(root / "full.jpg", quality=95)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "huge.png").write_bytes(_png_claiming(9000, 8000))  # 72 MP: over our 64 MP cap, under Pillow's
    (root / "bomb.png").write_bytes(_png_claiming(20000, 20000))  # 400 MP: Pillow's own bomb guard fires
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def outdir(tmp_path):
    """An output folder holding a previous result that must survive every refused run."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "previous.png").write_bytes(b"previous result")
    return folder


# -- 1. bad subject images and masks: refused before any model loads ---------------------------------------

BAD_FILES = {
    "notes.txt": ["is not an image Pillow can read", "looks like a text file", "Save it as PNG or JPEG"],
    "empty.png": ["is empty (0 bytes)", "Copy it again"],
    "truncated.jpg": ["could not be decoded", "damaged or was cut short", "re-save it"],
    "huge.png": ["is 9000×8000 (72 megapixels), over the 64 megapixels limit", "Downscale it first"],
    "bomb.png": ["too large to open safely", "downscale it first"],
}


@pytest.mark.parametrize("role", ["image", "mask"])
@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_subject_file_is_refused_before_models_load(bad, role, tiny_models, pictures, outdir, capsys, no_models):
    path = pictures[bad]
    spec = f"dog={path}" if role == "image" else f"dog={pictures['dog.png']}:{path}"
    err = refused(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", spec, *FAST,
                   "--out", outdir / "previous.png", "--overwrite"],  # even when replacing is allowed
                  capsys, [f"The subject {role} for 'dog' {str(path)!r}", *BAD_FILES[bad]], outdir)
    assert err.startswith("error: ") and err.count("\n") == 1  # one message, nothing else


def test_module_entry_point_reports_a_bad_subject_without_a_traceback(pictures, tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lambda_eclipse", "generate", "--prompt", "a dog",
         "--subject", f"dog={pictures['truncated.jpg']}", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "could not be decoded" in proc.stderr and "cut short" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


# -- 2. bad --out ------------------------------------------------------------------------------------------

def _out_cases(tmp: Path):
    (tmp / "a_file.txt").write_text("I am a file")
    (tmp / "a_folder").mkdir()
    return {
        "no extension": (tmp / "result", ["has no extension, so the image format is unknown",
                                          "End it with .png, .jpg, .jpeg or .webp", "result.png"]),
        "existing folder": (tmp / "a_folder", ["is an existing folder", "Give a file name inside it"]),
        "parent is a file": (tmp / "a_file.txt" / "sub" / "x.png", ["cannot be created because",
                                                                   "is a file", "Choose another folder"]),
        "existing file": (tmp / "previous.png", ["previous.png already exists; nothing was overwritten",
                                                 "pass --overwrite to replace it"]),
    }


@pytest.mark.parametrize("case", ["no extension", "existing folder", "parent is a file", "existing file"])
def test_bad_out_is_refused_before_models_load(case, tiny_models, pictures, outdir, capsys, no_models):
    out, phrases = _out_cases(outdir)[case]
    refused(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={pictures['dog.png']}",
             *FAST, "--out", out], capsys, phrases, outdir)
    assert (outdir / "previous.png").read_bytes() == b"previous result"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_out_in_a_read_only_folder_is_refused(tiny_models, pictures, outdir, capsys, no_models):
    locked = outdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(["generate", "--models", tiny_models["root"], "--prompt", "a dog", *FAST, "--out", locked / "x.png"],
                capsys, ["is not writable", "Choose a folder you can write to"], outdir)
    finally:
        locked.chmod(0o700)


def test_overwrite_replaces_an_existing_output(tiny_models, pictures, outdir, capsys):
    out = outdir / "previous.png"
    assert run(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={pictures['dog.png']}",
                *FAST, "--out", out, "--overwrite"]) == 0
    out_text, err = capsys.readouterr()
    assert "Traceback" not in out_text + err and f"wrote {out}" in out_text
    assert out.read_bytes() != b"previous result"
    assert Image.open(out).size == (64, 64)
    assert sorted(p.name for p in outdir.iterdir()) == ["previous.png"]  # no temporary file left behind


def test_batch_refused_when_a_numbered_file_exists(tiny_models, pictures, outdir, capsys, no_models):
    (outdir / "out_2.png").write_bytes(b"second image of an earlier batch")
    refused(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={pictures['dog.png']}",
             "--batch", "2", *FAST, "--out", outdir / "out.png"],
            capsys, ["out_2.png already exists; nothing was overwritten", "pass --overwrite"], outdir)
    assert not (outdir / "out_1.png").exists()


# -- 3. 16-bit subjects are scaled by their range, not clipped to white --------------------------------------

def test_16_bit_subject_is_not_turned_white(tmp_path):
    from lambda_eclipse.core.clip import prepare_subject
    from lambda_eclipse.core.images import open_image, to_rgb8

    gradient = np.linspace(0, 65535, 64 * 256).reshape(64, 256).astype(np.uint16)
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    image.save(tmp_path / "g16.png")
    from_file = open_image(tmp_path / "g16.png")
    as_int32 = Image.fromarray(gradient.astype(np.int32))  # mode I, how some Pillow versions open 16-bit PNGs
    for source in (image, from_file, as_int32):
        rgb, alpha = to_rgb8(source)
        pixels = np.asarray(rgb, dtype=np.float32)
        assert rgb.mode == "RGB" and alpha is None
        assert 110 < pixels.mean() < 145, (source.mode, pixels.mean())
        assert pixels.min() <= 1 and pixels.max() >= 254  # the whole range is kept
        subject = np.asarray(prepare_subject(source), dtype=np.float32)
        assert 110 < subject.mean() < 145, (source.mode, subject.mean())


# -- 4. bad settings -------------------------------------------------------------------------------------

SETTINGS = {
    "cuda without a GPU": (["--device", "cuda"], ["--device cuda: no CUDA GPU is visible to torch", "--device cpu"]),
    "unknown device": (["--device", "tpu9"], ["--device 'tpu9' is not a device name", "Choose auto, cpu, cuda, cuda:N or mps"]),
    "huge width": (["--width", "100000"], ["--width 100000 is out of range", "choose 64 … 4096 pixels"]),
    "negative seed": (["--seed", "-1"], ["--seed -1 is out of range", "Use a seed ≥ 0."]),
    "seed 2**64": (["--seed", str(2**64)], [f"--seed {2**64} is out of range", "Use a smaller seed (e.g. 0"]),
    "zero steps": (["--steps", "0"], ["--steps must be between 1 and 1000; got 0"]),
    "negative guidance": (["--guidance", "-1"], ["--guidance must be 0 or more", "the paper uses 7.5", "got -1.0"]),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_setting_is_refused_before_models_load(case, tiny_models, pictures, outdir, capsys, no_models):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    extra, phrases = SETTINGS[case]
    refused(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={pictures['dog.png']}",
             *FAST, *extra, "--out", outdir / "x.png"], capsys, phrases, outdir)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_as_clip_text_is_refused_and_never_executed(tiny_models, pictures, outdir, tmp_path, capsys, no_models):
    # Refused from its header before any model loads; the pickle must never run (the marker would appear).
    marker = tmp_path / "pickle_code_ran"
    weights = tmp_path / "x.bin"
    weights.write_bytes(pickle.dumps({"a": object(), "b": _RunsCode(str(marker))}))
    refused(["generate", "--models", tiny_models["root"], "--clip-text", weights, "--prompt", "a dog",
             "--subject", f"dog={pictures['dog.png']}", *FAST, "--out", outdir / "x.png"],
            capsys, ["x.bin holds Python objects besides tensors", "convert the file to .safetensors"], outdir)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_refusal_does_not_suggest_unsafe_loading(tmp_path, capsys):
    weights = tmp_path / "x.bin"
    weights.write_bytes(pickle.dumps({"a": object()}))
    err = refused(["encode", "--clip-text", weights, "--prompt", "a dog", "--out", tmp_path / "out" / "f.safetensors"],
                  capsys, ["x.bin", "convert the file to .safetensors"], tmp_path)
    assert "will likely succeed" not in err and "Do it only if you got the file )" not in err


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


# -- 5. warnings that do not stop the run ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["long prompt", "guidance below 1"])
def test_warning_and_the_run_still_succeeds(case, tiny_models, pictures, outdir, capsys, caplog):
    caplog.set_level("WARNING", logger="lambda_eclipse")
    if case == "long prompt":
        prompt = "a dog " + " ".join(f"with a red hat number {i}" for i in range(30))
        extra, phrases = [], ["CLIP reads only the first 77", "so the text after '…", "is ignored",
                              "Shorten the prompt"]
    else:
        prompt = "a dog"
        extra, phrases = ["--guidance", "0.5"], ["--guidance 0.50 is below 1", "classifier-free guidance is off"]
    out = outdir / "x.png"
    assert run(["generate", "--models", tiny_models["root"], "--prompt", prompt, "--subject", f"dog={pictures['dog.png']}",
                *FAST, *extra, "--out", out]) == 0
    text = caplog.text + capsys.readouterr().err
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in:\n{text}"
    assert "Traceback" not in text
    assert Image.open(out).size == (64, 64)


# -- 6. check --strict names exactly the broken / missing files ---------------------------------------------

def _check_lines(capsys):
    out = capsys.readouterr().out
    return out, [line.strip() for line in out.splitlines() if line.strip().startswith(("ok ", "BROKEN", "MISSING"))]


def _place(root: Path, key: str, source: Path | None = None, data: bytes | None = None) -> Path:
    entry = manifest()[key]
    target = root / entry.folder / entry.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copyfile(source, target)
    else:
        target.write_bytes(data)
    return target


def test_check_strict_names_exactly_the_broken_files(tmp_path, capsys):
    models = tmp_path / "models"
    prior = _place(models, "prior", data=os.urandom(1000))
    text = _place(models, "clip_text", data=b"12345678")
    assert run(["check", "--models", models, "--strict"]) == 2  # missing or broken: exit 2, with or without --strict
    out, lines = _check_lines(capsys)
    assert "check FAILED" in out and "Traceback" not in out
    broken = [line for line in lines if line.startswith("BROKEN")]
    assert len(broken) == 2, lines
    assert broken[0].startswith("BROKEN  prior:") and prior.name in broken[0]
    assert broken[1].startswith("BROKEN  clip_text:") and str(text) in broken[1]
    assert "is 8 bytes but the published file is 1,389,382,176 bytes" in broken[1] and "Fetch it again" in broken[1]
    assert sum(line.startswith("MISSING") for line in lines) == 3  # the three absent files, not called broken


def test_check_strict_calls_tiny_models_not_the_published_ones(tiny_models, capsys):
    assert run(["check", "--models", tiny_models["root"], "--strict"]) == 1
    out, lines = _check_lines(capsys)
    assert "check FAILED" in out
    assert len(lines) == 5 and all(line.startswith("BROKEN") for line in lines), lines
    prior = next(line for line in lines if line.startswith("BROKEN  prior:"))
    assert "not the published one" in prior and "a tiny test model" in prior
    assert all("published" in line for line in lines)


@pytest.mark.parametrize("key", ["clip_text", "clip_vision", "decoder_unet", "decoder_movq"])
def test_verify_calls_a_tiny_model_at_the_default_name_a_tiny_test_model(key, tiny_models):
    from lambda_eclipse.core.verify import verify

    verdict = verify(key, tiny_models[key])
    assert not verdict.ok and "tiny test model" in verdict.message, verdict.message


def test_check_strict_partial_folder_has_one_missing_line(tiny_models, tmp_path, capsys):
    models = tmp_path / "models"
    for key in ("clip_text", "clip_vision", "decoder_unet", "decoder_movq"):
        _place(models, key, source=tiny_models[key])
    assert run(["check", "--models", models, "--strict"]) == 2  # the prior is missing
    out, lines = _check_lines(capsys)
    missing = [line for line in lines if line.startswith("MISSING")]
    assert len(missing) == 1 and "prior" in missing[0], lines
    assert str(models / "lambda_eclipse" / "lambda-eclipse-prior-v1.0.safetensors") in out
    assert sum(line.startswith("BROKEN") for line in lines) == 4  # the tiny files, found under the default names


# -- 7. encode -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["nothing to encode", "png out", "existing out"])
def test_encode_refusals(case, tiny_models, outdir, capsys, no_models):
    towers = ["--clip-text", tiny_models["clip_text"], "--clip-vision", tiny_models["clip_vision"]]
    existing = outdir / "features.safetensors"
    existing.write_bytes(b"earlier features")
    if case == "nothing to encode":
        argv, phrases = ["--out", outdir / "f.safetensors"], ["Nothing to encode", "--prompt TEXT and/or --image PATH"]
    elif case == "png out":
        argv, phrases = ["--prompt", "a dog", "--out", outdir / "x.png"], [
            "the features are written as .safetensors", "e.g. features.safetensors"]
    else:
        argv, phrases = ["--prompt", "a dog", "--out", existing], ["exists. Pass --overwrite to replace it"]
    refused(["encode", *towers, *argv], capsys, phrases, outdir)


def test_encode_writes_the_expected_tensors(tiny_models, pictures, tmp_path, capsys):
    from safetensors import safe_open

    both = tmp_path / "both.safetensors"
    assert run(["encode", "--clip-text", tiny_models["clip_text"], "--clip-vision", tiny_models["clip_vision"],
                "--prompt", "a dog", "--image", pictures["dog.png"], "--out", both]) == 0
    with safe_open(str(both), framework="pt") as handle:
        shapes = {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert shapes == {"text_pooled": [1, 32], "text_tokens": [1, 77, 32], "text_mask": [1, 77],
                      "image_embeds": [1, 32], "blank_embed": [1, 32]}

    text_only = tmp_path / "text.safetensors"
    assert run(["encode", "--clip-text", tiny_models["clip_text"], "--prompt", "a dog", "--out", text_only]) == 0
    with safe_open(str(text_only), framework="pt") as handle:
        assert set(handle.keys()) == {"text_pooled", "text_tokens", "text_mask"}
    assert "Traceback" not in capsys.readouterr().err


# -- 8. what --models finds, and what was given -------------------------------------------------------------

@pytest.mark.parametrize("case", ["both towers given", "text-only --clip"])
def test_models_finding_is_reported(case, tiny_models, pictures, tmp_path, capsys):
    root = tiny_models["root"]
    if case == "both towers given":
        extra = ["--clip-text", tiny_models["clip_text"], "--clip-vision", tiny_models["clip_vision"]]
        expected = [f"using clip_text: {tiny_models['clip_text']} (given)",
                    f"using clip_vision: {tiny_models['clip_vision']} (given)"]
    else:
        text_only = tmp_path / "elsewhere" / "text_only.safetensors"
        text_only.parent.mkdir()
        shutil.copyfile(tiny_models["clip_text"], text_only)
        extra = ["--clip", text_only]
        expected = [f"using clip_text: {text_only} (given)",
                    f"using clip_vision: {root / 'clip_vision' / 'clip_vision_g.safetensors'} (default name)"]
    out = tmp_path / "x.png"
    assert run(["generate", "--models", root, *extra, "--prompt", "a dog", "--subject", f"dog={pictures['dog.png']}",
                *FAST, "--out", out]) == 0
    err = capsys.readouterr().err
    for line in expected:
        assert line in err, err
    assert "using prior:" in err and "Traceback" not in err
    assert Image.open(out).size == (64, 64)
