"""What the loader nodes say when a file is missing or is the wrong part: each problem names its input, the file
that is there, what it is, and where the right one comes from."""

from __future__ import annotations

import shutil

import pytest

from lambda_eclipse.core.paths import manifest
from lambda_eclipse.nodes import comfy, loaders
from lambda_eclipse.nodes.loaders import LambdaEclipseLoadCLIP, LambdaEclipseLoadDecoder, LambdaEclipseLoadPrior

TEXT = "clip_g_sdxl.fp16.safetensors"
VISION = "clip_vision_g.safetensors"
UNET = "kandinsky-2-2-decoder-unet.safetensors"
MOVQ = "kandinsky-2-2-movq.safetensors"


@pytest.fixture()
def models(tmp_path):
    from lambda_eclipse.core.tiny import write_tiny_models

    write_tiny_models(tmp_path)
    comfy.set_models_dir(tmp_path)
    yield tmp_path
    comfy.set_models_dir(None)


def test_text_tower_named_in_the_vision_menu_is_sent_to_clip_name(models):
    message = LambdaEclipseLoadCLIP.VALIDATE_INPUTS(TEXT, TEXT)
    assert message.startswith("vision_name: ")
    assert "is the OpenCLIP ViT-bigG/14 text tower" in message and "belongs in Load CLIP's clip_name" in message
    vision = manifest()["clip_vision"]
    assert f"models/clip_vision/{VISION}" in message and vision.url in message
    # not told to download the text tower again, and clip_name (which is fine) is not blamed
    assert "text_encoder_2/model.fp16.safetensors" not in message
    assert "clip_name:" not in message


def test_text_tower_copied_into_clip_vision_says_what_it_is(models):
    shutil.copy(models / "text_encoders" / TEXT, models / "clip_vision" / "copied.safetensors")
    message = LambdaEclipseLoadCLIP.VALIDATE_INPUTS(TEXT, "copied.safetensors")
    assert message.startswith("vision_name: 'copied.safetensors'") or message.startswith("vision_name: bigG vision tower 'copied.safetensors'")
    assert "is the bigG text tower, not the bigG vision tower; it belongs in Load CLIP's clip_name" in message
    assert f"models/clip_vision/{VISION}" in message
    assert "not a file this loader can use" not in message


def test_decoder_parts_swapped_are_named(models):
    shutil.copy(models / "vae" / MOVQ, models / "diffusion_models" / "movq_here.safetensors")
    message = LambdaEclipseLoadDecoder.VALIDATE_INPUTS("movq_here.safetensors", MOVQ)
    assert message.startswith("decoder_name: ")
    assert "is the Kandinsky 2.2 MoVQ, not the Kandinsky 2.2 decoder UNet; it belongs in Load Kandinsky Decoder's movq_name" in message
    assert "movq_name:" not in message


def test_garbage_file_is_not_called_a_model(models):
    (models / "clip_vision" / "junk.safetensors").write_bytes(b"\x00" * 64)
    message = LambdaEclipseLoadCLIP.VALIDATE_INPUTS(TEXT, "junk.safetensors")
    assert message.startswith("vision_name: ")
    assert "junk.safetensors" in message and f"models/clip_vision/{VISION}" in message


def test_each_missing_file_once_with_one_download_hint(tmp_path):
    (tmp_path / "lambda_eclipse").mkdir()
    comfy.set_models_dir(tmp_path)
    try:
        for message, files in (
            (LambdaEclipseLoadPrior.VALIDATE_INPUTS("lambda-eclipse-prior-v1.0.safetensors"), 1),
            (LambdaEclipseLoadCLIP.VALIDATE_INPUTS(TEXT, VISION), 2),
            (LambdaEclipseLoadDecoder.VALIDATE_INPUTS(UNET, MOVQ), 2),
        ):
            assert message.count(" is not in models/") == files, message
            assert message.count("python -m lambda_eclipse download") == 1
        prior = LambdaEclipseLoadPrior.VALIDATE_INPUTS("lambda-eclipse-prior-v1.0.safetensors")
        assert "size unknown" not in prior, prior  # the approximate size (~139 MB) at least
    finally:
        comfy.set_models_dir(None)


def test_what_file_is(models):
    assert loaders.what_file_is(models / "text_encoders" / TEXT) == "the bigG text tower"
    assert loaders.what_file_is(models / "clip_vision" / VISION) == "the bigG vision tower"
    assert loaders.what_file_is(models / "vae" / MOVQ) == "the Kandinsky 2.2 MoVQ"
    assert loaders.what_file_is(models / "diffusion_models" / UNET) == "the Kandinsky 2.2 decoder UNet"
    assert loaders.what_file_is(models / "lambda_eclipse" / "lambda-eclipse-prior-v1.0.safetensors") == "a λ-ECLIPSE prior"
