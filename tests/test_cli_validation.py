"""One validation pass per command, before any model is built: every mistake that the arguments and the files'
headers show stops generate / interpolate / encode with one message (exit 2), while a spy on every model loader
proves that nothing was loaded. Paths that exist but are no regular file go to the image reader unchanged."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lambda_eclipse.core import clip as clip_module
from lambda_eclipse.core import decoder_files, pipeline, prior
from lambda_eclipse.core.cli import main, parse_subject

FAST = ["--steps", "1", "--width", "64", "--height", "64", "--quiet", "--device", "cpu"]


@pytest.fixture
def loads(monkeypatch):
    """Every model loader records its call and fails the run: a refusal must come before any of them."""
    calls = []

    def spy(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"a model was loaded ({name}) before the mistake was reported")

        return refuse

    monkeypatch.setattr(pipeline, "load_models", spy("pipeline.load_models"))
    monkeypatch.setattr(pipeline, "load_prior", spy("pipeline.load_prior"))
    monkeypatch.setattr(prior, "load_prior", spy("prior.load_prior"))
    monkeypatch.setattr(clip_module, "load_clip_towers", spy("clip.load_clip_towers"))
    monkeypatch.setattr(decoder_files, "load_decoder_parts", spy("decoder_files.load_decoder_parts"))
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    Image.new("RGB", (240, 240), (150, 90, 40)).save(root / "dog.png")
    Image.new("RGB", (240, 240), (20, 20, 160)).save(root / "hat.png")
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(root / "sdxl_lora.safetensors"))
    os.mkfifo(root / "pipe")
    (root / "folder").mkdir()
    return root


def refused(argv, capsys, *phrases, loads, one_line=True):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    assert err.startswith("error: ") and "Traceback" not in out + err
    assert err.count("\n") == 1 or not one_line, err
    assert loads == [], loads
    return err


def _generate(tiny_models, files, tmp_path, *extra, prompt="a dog wearing a hat"):
    return ["generate", "--models", tiny_models["root"], "--prompt", prompt, "--subject", f"dog={files / 'dog.png'}",
            *FAST, "--out", tmp_path / "x.png", *extra]


LONG = "a photo of " + " ".join(f"thing{i}" for i in range(80)) + " and a dog"

GENERATE = {
    "word not in the prompt": (dict(prompt="a cat"), [], ["'dog' is not in the prompt"]),
    "two subjects on one token": ({}, ["--subject", "dog={hat}"], ["both claim token 2", "Each subject needs its own word"]),
    "word only inside a longer word": (dict(prompt="a dogs wearing a hat"), [], ["'dog' is not in the prompt"]),
    "word past the 77-token limit": (dict(prompt=LONG), [], ["past CLIP's 77-token limit", "Shorten the prompt"]),
    "canny low above high": ({}, ["--canny", "{dog}", "--canny-low", "300", "--canny-high", "100"],
                             ["Canny thresholds must satisfy 0 ≤ low ≤ high", "low=300"]),
    "canny threshold nan": ({}, ["--canny", "{dog}", "--canny-low", "nan"], ["--canny-low must be a finite number"]),
    "canny threshold inf": ({}, ["--canny", "{dog}", "--canny-high", "inf"], ["--canny-high must be a finite number"]),
    "guidance nan": ({}, ["--guidance", "nan"], ["--guidance must be a finite number", "the paper uses 7.5"]),
    "guidance inf": ({}, ["--guidance", "inf"], ["--guidance must be a finite number"]),
    "strength nan": ({}, ["--init-image", "{dog}", "--strength", "nan"], ["--strength must be a finite number"]),
    "lora missing": ({}, ["--decoder-lora", "{dir}/nope.safetensors"], ["nope.safetensors does not exist"]),
    "lora garbage": ({}, ["--decoder-lora", "{dir}/garbage.safetensors"], ["garbage.safetensors", "not a readable .safetensors"]),
    "lora of another model": ({}, ["--decoder-lora", "{dir}/sdxl_lora.safetensors"],
                              ["sdxl_lora.safetensors is not a", "Kandinsky 2.2 decoder", "SDXL LoRA"]),
    "lora strength nan": ({}, ["--decoder-lora", "{dir}/sdxl_lora.safetensors:nan"], ["the strength must be a finite number"]),
    "lora is a FIFO": ({}, ["--decoder-lora", "{dir}/pipe"], ["is a FIFO (named pipe)"]),
}


@pytest.mark.parametrize("case", list(GENERATE))
def test_generate_mistakes_stop_before_any_model_loads(case, tiny_models, files, tmp_path, capsys, loads):
    kwargs, extra, phrases = GENERATE[case]
    extra = [a.format(dog=files / "dog.png", hat=files / "hat.png", dir=files) for a in extra]
    refused(_generate(tiny_models, files, tmp_path, *extra, **kwargs), capsys, *phrases, loads=loads)
    assert not (tmp_path / "x.png").exists()


def test_the_spy_sees_a_valid_run_load_its_models(tiny_models, files, tmp_path, loads):
    # The refusals above are not vacuous: the same command without the mistake reaches the loaders.
    with pytest.raises(AssertionError, match="a model was loaded"):
        main([str(a) for a in _generate(tiny_models, files, tmp_path)])
    assert loads == ["pipeline.load_models"]


def test_interpolate_words_of_every_corner_are_checked_first(tiny_models, files, tmp_path, capsys, loads):
    dog, hat = files / "dog.png", files / "hat.png"
    corners = ["--top-left", f"dog={dog}", "--top-right", f"dog={hat}", "--bottom-left", f"dog={dog}",
               "--bottom-right", f"cat={hat}"]
    refused(["interpolate", "--models", tiny_models["root"], "--prompt", "a dog", *corners, *FAST,
             "--out", tmp_path / "g.png"], capsys, "'cat' is not in the prompt", loads=loads)
    refused(["interpolate", "--models", tiny_models["root"], "--prompt", "a dog", *corners[:-1], f"dog={hat}", *FAST,
             "--guidance", "inf", "--out", tmp_path / "g.png"], capsys, "--guidance must be a finite number", loads=loads)
    refused(["interpolate", "--models", tiny_models["root"], "--prompt", "a dog", *corners[:-1], f"dog={hat}", *FAST,
             "--decoder-lora", files / "garbage.safetensors", "--out", tmp_path / "g.png"], capsys,
            "not a readable .safetensors", loads=loads)


def test_encode_refuses_an_empty_prompt_and_a_folder_out_before_loading(tiny_models, files, tmp_path, capsys, loads):
    text = ["--clip-text", tiny_models["clip_text"]]
    refused(["encode", *text, "--prompt", "   ", "--out", tmp_path / "f.safetensors"], capsys, "The prompt is empty",
            loads=loads)
    folder = tmp_path / "feats.safetensors"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):  # --overwrite is no way out for a folder: it is not advised
        err = refused(["encode", *text, "--prompt", "a dog", "--out", folder, *extra], capsys,
                      "is a folder, not a file", "feats.safetensors/features.safetensors", loads=loads)
        assert "--overwrite" not in err
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("what, phrase", [("pipe", "is a FIFO (named pipe)"), ("folder", "is a folder"),
                                          ("/dev/zero", "is a device")])
def test_a_subject_that_is_no_regular_file_is_named_for_what_it_is(what, phrase, tiny_models, files, tmp_path,
                                                                    capsys, loads):
    path = what if what.startswith("/") else str(files / what)
    assert parse_subject(f"dog={path}") == ("dog", path, None)  # passed on unchanged, not "does not exist"
    err = refused(["generate", "--models", tiny_models["root"], "--prompt", "a dog", "--subject", f"dog={path}", *FAST,
                   "--out", tmp_path / "x.png"], capsys, phrase, loads=loads)
    assert "does not exist" not in err


def test_models_that_is_a_file_or_missing_says_so(tiny_models, files, tmp_path, capsys, loads):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    err = refused(["generate", "--models", notes, "--prompt", "a dog", *FAST, "--out", tmp_path / "x.png"], capsys,
                  f"--models {notes} is a file, not a folder", loads=loads)
    assert "put it at" not in err
    refused(["generate", "--models", tmp_path / "modles", "--prompt", "a dog", *FAST, "--out", tmp_path / "x.png"],
            capsys, f"The --models folder {tmp_path / 'modles'} does not exist: check the path", loads=loads, one_line=False)
    assert not (tmp_path / "modles").exists()


def test_a_long_prompt_is_warned_about_once_per_command(tiny_models, files, tmp_path, caplog):
    # The validation pass and each of the grid's four corners meet the same long prompt: one warning, not five.
    caplog.set_level("WARNING", logger="lambda_eclipse")
    prompt = "a dog " + " ".join(f"with a red hat number {i}" for i in range(30))
    dog, hat = files / "dog.png", files / "hat.png"
    assert main([str(a) for a in ["interpolate", "--models", tiny_models["root"], "--prompt", prompt,
                                  "--top-left", f"dog={dog}", "--top-right", f"dog={hat}", "--bottom-left", f"dog={hat}",
                                  "--bottom-right", f"dog={dog}", "--grid", "1", *FAST, "--out", tmp_path / "g.png"]]) == 0
    assert caplog.text.count("CLIP reads only the first 77") == 1, caplog.text
