"""The command line end to end on tiny models in a ComfyUI-like models/ tree."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lambda_eclipse.core.cli import main, parse_subject
from lambda_eclipse.core.errors import InputError, MissingModelsError
from lambda_eclipse.core.paths import resolve_models
from lambda_eclipse.core.pipeline import prior_noise, sample_prior, seeds_for
from lambda_eclipse.core.interleave import interleave_prompt


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    dog = Image.new("RGB", (180, 120), "white")
    ImageDraw.Draw(dog).ellipse((40, 20, 140, 100), fill=(150, 90, 30))
    mask = Image.new("L", (180, 120), 0)
    ImageDraw.Draw(mask).ellipse((40, 20, 140, 100), fill=255)
    hat = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(hat).rectangle((20, 30, 80, 70), fill=(20, 20, 160))
    paths = {}
    for name, img in (("dog.png", dog), ("dog_mask.png", mask), ("hat.png", hat), ("hat2.png", hat.rotate(45))):
        img.save(root / name)
        paths[name] = root / name
    return paths


def run(args):
    return main([str(a) for a in args])


def test_generate_writes_the_requested_size_and_is_reproducible(tiny_models, pictures, tmp_path, capsys):
    base = ["generate", "--models", tiny_models["root"], "--prompt", "a dog is wearing a hat",
            "--subject", f"dog={pictures['dog.png']}:{pictures['dog_mask.png']}", "--subject", f"hat={pictures['hat.png']}",
            "--canny", pictures["hat2.png"], "--steps", 2, "--width", 128, "--height", 64, "--seed", 3, "--quiet"]
    assert run(base + ["--out", tmp_path / "a.png"]) == 0
    assert run(base + ["--out", tmp_path / "b.png"]) == 0
    assert run(base[:-3] + ["--seed", 4, "--quiet", "--out", tmp_path / "c.png"]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (64, 128, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    out = capsys.readouterr().out
    assert "'dog' → token 2; 'hat' → token 6" in out


def test_generate_batch_writes_numbered_files_and_rounds_size(tiny_models, pictures, tmp_path):
    assert run(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={pictures['dog.png']}",
                "--batch", 2, "--steps", 1, "--width", 100, "--height", 64, "--quiet", "--out", tmp_path / "x.png"]) == 0
    one, two = (Image.open(tmp_path / f"x_{i}.png") for i in (1, 2))
    assert one.size == (128, 64) and two.size == (128, 64)


def test_missing_weights_are_listed_with_folders_and_links(tmp_path, capsys):
    code = run(["generate", "--models", tmp_path, "--prompt", "a dog"])
    err = capsys.readouterr().err
    assert code == 2
    from lambda_eclipse.core.paths import manifest

    for entry in manifest().values():  # every file, its folder, and a direct link
        assert str(tmp_path / entry.folder / entry.name) in err and entry.url in err
    assert "Traceback" not in err


def test_explicit_paths_override_and_missing_explicit_path(tiny_models, tmp_path):
    found = resolve_models(tmp_path, prior=tiny_models["prior"], clip=tiny_models["clip"], decoder=tiny_models["decoder"])
    assert found["prior"] == tiny_models["prior"]
    with pytest.raises(MissingModelsError, match="does not exist"):
        resolve_models(tiny_models["root"], prior=tmp_path / "nope")


def test_word_not_in_prompt_is_a_clean_error(tiny_models, pictures, capsys):
    code = run(["generate", "--models", tiny_models["root"], "--prompt", "a cat", "--subject", f"dog={pictures['dog.png']}", "--quiet"])
    assert code == 2 and "'dog' is not in the prompt" in capsys.readouterr().err


def test_subject_argument_parsing(pictures):
    assert parse_subject(f"dog={pictures['dog.png']}") == ("dog", str(pictures["dog.png"]), None)
    assert parse_subject(f"teddy bear={pictures['dog.png']}:{pictures['dog_mask.png']}")[2] == str(pictures["dog_mask.png"])
    with pytest.raises(InputError, match="WORD=IMAGE"):
        parse_subject("dog.png")
    with pytest.raises(InputError, match="does not exist"):
        parse_subject("dog=nowhere.png")
    with pytest.raises(InputError, match="mask file"):
        parse_subject(f"dog={pictures['dog.png']}:nowhere.png")


def test_interpolate_writes_the_grid(tiny_models, pictures, tmp_path):
    d, h, h2 = pictures["dog.png"], pictures["hat.png"], pictures["hat2.png"]
    out = tmp_path / "grid.png"
    assert run(["interpolate", "--models", tiny_models["root"], "--prompt", "a dog is wearing a hat",
                "--top-left", f"dog={d}", f"hat={h}", "--top-right", f"dog={d}", f"hat={h2}",
                "--bottom-left", f"dog={h2}", f"hat={h}", "--bottom-right", f"dog={h2}", f"hat={h2}",
                "--grid", 2, "--steps", 1, "--width", 64, "--height", 64, "--quiet", "--out", out]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (192, 192, 3)
    # Same decoder seed in every cell: the top-left cell equals a 1-corner decode of the same embedding,
    # and the corners differ from each other because their subjects do.
    assert not np.array_equal(grid[:64, :64], grid[:64, 128:])


def test_check_passes(tiny_models, tmp_path, capsys):
    # Every file in place (tiny test models): the pipeline runs, check passes with a warning; --strict fails.
    assert run(["check", "--models", tiny_models["root"], "--out", tmp_path / "noise.png"]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and "noise" in out and "warning prior:" in out and "tiny test model" in out
    assert Image.open(tmp_path / "noise.png").size == (128, 64)
    assert run(["check", "--models", tiny_models["root"], "--strict"]) == 1
    assert "check FAILED" in capsys.readouterr().out


def test_check_fails_when_files_are_missing(tmp_path, capsys):
    # An empty models folder used to print "check passed" and exit 0: every file is missing, so check fails (exit 2),
    # names each file with its link, and says to run the download command once. The tiny run still proves the code.
    assert run(["check", "--models", tmp_path, "--out", tmp_path / "noise.png"]) == 2
    out, err = capsys.readouterr()
    assert "check passed" not in out and "check FAILED" in out and "Lambda-ECLIPSE-Prior-v1.0" in out
    assert out.count("MISSING") == 5 and "noise" in out
    assert err.startswith("error: check: model files the pipeline needs are 5 missing") and err.count("\n") == 1
    assert err.count("python -m lambda_eclipse download") == 1 and f"--models {tmp_path}" in err
    assert Image.open(tmp_path / "noise.png").size == (128, 64)
    assert run(["check", "--models", tmp_path, "--strict"]) == 2


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "lambda_eclipse", "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "WORD=IMAGE[:MASK]" in proc.stdout


def test_prior_noise_and_seeds_are_per_image(tiny_clip, tiny_prior):
    assert seeds_for(5, 3) == [5, 6, 7]
    with pytest.raises(InputError, match="one seed per image"):
        seeds_for([1, 2], 3)
    assert torch.equal(prior_noise([7, 8], 32)[1], prior_noise([8], 32)[0])
    prompt = interleave_prompt(tiny_clip, "a dog", [])
    blank = tiny_clip.blank_embedding()
    batch = sample_prior(tiny_prior, prompt, blank, None, [1, 2, 3])
    alone = sample_prior(tiny_prior, prompt, blank, None, [2])
    assert batch.embeds.shape == (3, 32) and batch.negative.shape == (3, 32)
    assert torch.allclose(batch.embeds[1], alone.embeds[0], atol=1e-6)
    assert torch.equal(batch.negative[0], blank)
    control = sample_prior(tiny_prior, prompt, blank, torch.ones(32), [2])
    assert not torch.allclose(control.embeds, alone.embeds)


def test_grid_encodes_each_subject_photo_once(tiny_clip, pictures):
    from lambda_eclipse.core.pipeline import SubjectInput, encode_subjects

    calls = []
    original = tiny_clip.encode_subject
    tiny_clip.encode_subject = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        cache = {}
        d, h, h2 = pictures["dog.png"], pictures["hat.png"], pictures["hat2.png"]
        for hat in (h, h2, h, h2):
            subjects = encode_subjects(tiny_clip, [SubjectInput("dog", d), SubjectInput("hat", hat)], cache=cache)
        assert len(calls) == 3  # dog, hat, hat2: each photo once across the four corners
        assert torch.equal(subjects[1].embedding, encode_subjects(tiny_clip, [SubjectInput("hat", h2)])[0].embedding)
        assert len(calls) == 4  # without a cache nothing is shared
    finally:
        tiny_clip.encode_subject = original


def test_sampler_and_img2img_from_the_command_line(tiny_models, pictures, tmp_path, capsys):
    base = ["generate", "--models", tiny_models["root"], "--prompt", "a dog on a beach", "--subject", f"dog={pictures['dog.png']}",
            "--steps", "4", "--width", "64", "--height", "64", "--quiet"]
    assert run(base + ["--sampler", "dpmpp_2m", "--out", tmp_path / "a.png"]) == 0
    assert run(base + ["--sampler", "euler_a", "--init-image", pictures["dog.png"], "--strength", "0.5",
                       "--out", tmp_path / "b.png"]) == 0
    capsys.readouterr()
    assert run(base + ["--sampler", "k_lms", "--out", tmp_path / "c.png"]) == 2
    err = capsys.readouterr().err
    assert "Unknown sampler 'k_lms'" in err and "dpmpp_2m" in err and not (tmp_path / "c.png").exists()
    assert run(base + ["--init-image", pictures["dog.png"], "--strength", "0", "--out", tmp_path / "d.png"]) == 2
    assert "--strength must be in (0, 1]" in capsys.readouterr().err
