"""The first-run path: model files found under ComfyUI's folders, loader menus, missing-file messages."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from lambda_eclipse.core.errors import MissingModelsError, ModelFileError
from lambda_eclipse.core.paths import PARTS, find_models, manifest, resolve_models
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, comfy, loaders

FILES = manifest()
SAME_CLIP, SAME_DECODER = loaders.SAME_AS_CLIP, loaders.SAME_AS_DECODER


def node(name):
    return NODE_CLASS_MAPPINGS[name]()


def menu(node_type, name):
    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    return (spec["required"].get(name) or spec["optional"][name])[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A models/ tree with the five single files at the manifest's names, the legacy folders, and distractors."""
    from lambda_eclipse.core.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    (root / "text_encoders" / "t5xxl_fake.safetensors").write_bytes(b"not a model")
    from safetensors.torch import save_file

    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4), "shared.weight": torch.zeros(8, 4)},
              str(root / "text_encoders" / "t5_like.safetensors"))
    return root


@pytest.fixture()
def models(root):
    comfy.set_models_dir(root)
    loaders.clear_cache()
    yield root
    comfy.set_models_dir(None)
    loaders.clear_cache()


def test_find_models_prefers_the_workflows_file_names(root):
    found = find_models(root)
    for key in PARTS:
        entry = FILES[key]
        assert found[key].name == entry.name and found[key].parent.name == entry.folder, key
        assert any(line.startswith(f"{key}: ") and "default name" in line for line in found.notes)


def test_find_models_falls_back_to_the_first_release_folders(tmp_path, root):
    for folder in ("lambda_eclipse", "diffusers"):
        shutil.copytree(root / folder, tmp_path / folder)
    (tmp_path / "lambda_eclipse" / FILES["prior"].name).unlink()
    found = find_models(tmp_path)
    assert found["prior"].name == "Lambda-ECLIPSE-Prior-v1.0"
    assert found["clip_text"] == found["clip_vision"] == tmp_path / "lambda_eclipse" / "CLIP-ViT-bigG-14-laion2B-39B-b160k"
    assert found["decoder_unet"] == found["decoder_movq"] == tmp_path / "diffusers" / "kandinsky-2-2-decoder"


def test_find_models_recognises_files_under_other_names(tmp_path, root):
    for key, new_name in (("clip_text", "my_clip_g.safetensors"), ("clip_vision", "CLIP-ViT-bigG.safetensors"),
                          ("decoder_unet", "k22_unet.safetensors"), ("decoder_movq", "k22_movq.safetensors")):
        folder = tmp_path / FILES[key].folder
        folder.mkdir(exist_ok=True)
        shutil.copy(root / FILES[key].folder / FILES[key].name, folder / new_name)
    # A file of the wrong kind in each folder is passed over.
    shutil.copy(root / "diffusion_models" / FILES["decoder_unet"].name, tmp_path / "vae" / "a_unet_in_vae.safetensors")
    (tmp_path / "text_encoders" / "broken.safetensors").write_bytes(b"\0" * 10)
    found = find_models(tmp_path, needed=["clip_text", "clip_vision", "decoder_unet", "decoder_movq"])
    assert found["clip_text"].name == "my_clip_g.safetensors"
    assert found["clip_vision"].name == "CLIP-ViT-bigG.safetensors"
    assert found["decoder_unet"].name == "k22_unet.safetensors"
    assert found["decoder_movq"].name == "k22_movq.safetensors"
    assert all("found by its tensors" in line for line in found.notes)


def test_missing_files_are_named_one_by_one(tmp_path, root):
    shutil.copytree(root / "lambda_eclipse", tmp_path / "lambda_eclipse")
    shutil.rmtree(tmp_path / "lambda_eclipse" / "CLIP-ViT-bigG-14-laion2B-39B-b160k")
    (tmp_path / "clip_vision").mkdir()
    shutil.copy(root / "clip_vision" / FILES["clip_vision"].name, tmp_path / "clip_vision")
    with pytest.raises(MissingModelsError) as info:
        resolve_models(tmp_path)
    text = str(info.value)
    for key in ("clip_text", "decoder_unet", "decoder_movq"):
        assert str(tmp_path / FILES[key].folder / FILES[key].name) in text and FILES[key].url in text
    assert FILES["prior"].name not in text and FILES["clip_vision"].name not in text  # present: not listed
    assert "python -m lambda_eclipse download" in text


def test_a_text_only_clip_argument_takes_the_vision_tower_from_models(root):
    text = root / FILES["clip_text"].folder / FILES["clip_text"].name
    found = resolve_models(root, clip=text)
    assert found["clip_text"] == text
    assert found["clip_vision"].name == FILES["clip_vision"].name


def test_menus_list_only_what_each_loader_can_load(models):
    priors = menu("LambdaEclipseLoadPrior", "prior_name")
    texts = menu("LambdaEclipseLoadCLIP", "clip_name")
    visions = menu("LambdaEclipseLoadCLIP", "vision_name")
    unets = menu("LambdaEclipseLoadDecoder", "decoder_name")
    movqs = menu("LambdaEclipseLoadDecoder", "movq_name")
    assert FILES["prior"].name in priors and "Lambda-ECLIPSE-Prior-v1.0" in priors
    assert FILES["clip_text"].name in texts and "CLIP-ViT-bigG-14-laion2B-39B-b160k" in texts
    assert not any("t5" in n for n in texts), "a T5 or broken file must never be offered as bigG"
    assert FILES["clip_vision"].name not in texts and FILES["prior"].name not in texts
    assert visions == [SAME_CLIP, FILES["clip_vision"].name]
    assert FILES["decoder_unet"].name in unets and "kandinsky-2-2-decoder" in unets
    assert FILES["decoder_movq"].name not in unets
    assert movqs == [SAME_DECODER, FILES["decoder_movq"].name]
    assert not any("/" in n for n in priors + texts + unets), "no file from inside a model folder"


def test_absent_file_is_reported_by_the_loader_before_anything_runs(tmp_path):
    comfy.set_models_dir(tmp_path)
    try:
        for node_type, kwargs, key in (
            ("LambdaEclipseLoadPrior", {"prior_name": FILES["prior"].name}, "prior"),
            ("LambdaEclipseLoadCLIP", {"clip_name": FILES["clip_text"].name, "vision_name": FILES["clip_vision"].name}, "clip_text"),
            ("LambdaEclipseLoadDecoder", {"decoder_name": FILES["decoder_unet"].name, "movq_name": FILES["decoder_movq"].name}, "decoder_unet"),
        ):
            message = NODE_CLASS_MAPPINGS[node_type].VALIDATE_INPUTS(**kwargs)
            entry = FILES[key]
            assert isinstance(message, str), node_type
            assert f"'{entry.name}' is not in" in message and f"models/{entry.folder}/{entry.name}" in message
            assert entry.url in message and "python -m lambda_eclipse download" in message
            second = FILES["clip_vision" if key == "clip_text" else "decoder_movq" if key == "decoder_unet" else key]
            assert second.name in message  # both files of a loader are named in one message
            with pytest.raises(MissingModelsError, match="is not in"):
                getattr(node(node_type), "load")(**kwargs)
    finally:
        comfy.set_models_dir(None)


def test_validation_passes_when_present_and_explains_a_missing_second_file(models):
    assert NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].VALIDATE_INPUTS(FILES["prior"].name) is True
    assert NODE_CLASS_MAPPINGS["LambdaEclipseLoadCLIP"].VALIDATE_INPUTS(FILES["clip_text"].name, FILES["clip_vision"].name) is True
    assert NODE_CLASS_MAPPINGS["LambdaEclipseLoadCLIP"].VALIDATE_INPUTS("CLIP-ViT-bigG-14-laion2B-39B-b160k") is True
    message = NODE_CLASS_MAPPINGS["LambdaEclipseLoadCLIP"].VALIDATE_INPUTS(FILES["clip_text"].name, SAME_CLIP)
    assert "holds only the bigG text tower" in message and FILES["clip_vision"].name in message
    message = NODE_CLASS_MAPPINGS["LambdaEclipseLoadDecoder"].VALIDATE_INPUTS(FILES["decoder_unet"].name, SAME_DECODER)
    assert "single UNet file" in message and FILES["decoder_movq"].name in message
    assert NODE_CLASS_MAPPINGS["LambdaEclipseLoadDecoder"].VALIDATE_INPUTS("kandinsky-2-2-decoder") is True
    assert "not a name from the list" in NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].VALIDATE_INPUTS("../x.safetensors")


def test_single_files_make_an_image_through_the_nodes(models):
    from PIL import Image

    prior, = node("LambdaEclipseLoadPrior").load(FILES["prior"].name, "auto")
    clip, = node("LambdaEclipseLoadCLIP").load(FILES["clip_text"].name, "auto", FILES["clip_vision"].name)
    decoder, = node("LambdaEclipseLoadDecoder").load(FILES["decoder_unet"].name, "auto", FILES["decoder_movq"].name)
    image = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(0))
    subjects, = node("LambdaEclipseEncodeSubject").encode(clip, image, "dog")
    prompt, _report = node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog on a beach", subjects)
    embeds, = node("LambdaEclipsePriorSample").sample(prior, clip, prompt, seed=3, batch_size=1)
    images, = node("LambdaEclipseKandinskyDecode").decode(decoder, embeds, 64, 64, 2, 4.0, 5)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()
    assert Image  # the tiny models make noise: only shapes and plumbing are checked here


def test_the_loaders_own_cache_never_outlives_comfyui(models, monkeypatch):
    from lambda_eclipse.core import prior as prior_module

    calls = []
    real = prior_module.load_prior
    monkeypatch.setattr(prior_module, "load_prior", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, = node("LambdaEclipseLoadPrior").load(FILES["prior"].name, "fp32")
    again, = node("LambdaEclipseLoadPrior").load(FILES["prior"].name, "fp32")
    assert first is again and len(calls) == 1  # shared while someone holds it
    del first, again
    gc.collect()
    node("LambdaEclipseLoadPrior").load(FILES["prior"].name, "fp32")
    assert len(calls) == 2  # once ComfyUI let go, nothing of ours kept it alive


def test_old_workflow_values_still_load(models):
    clip, = node("LambdaEclipseLoadCLIP").load("CLIP-ViT-bigG-14-laion2B-39B-b160k", "auto")
    decoder, = node("LambdaEclipseLoadDecoder").load("kandinsky-2-2-decoder", "auto")
    prior, = node("LambdaEclipseLoadPrior").load("Lambda-ECLIPSE-Prior-v1.0", "auto")
    assert clip.model.embed_dim == prior.model.config.embedding_dim == decoder.model.embedding_dim


def test_wrong_file_in_a_slot_is_explained(models, root):
    with pytest.raises(ModelFileError):
        node("LambdaEclipseLoadCLIP").load(FILES["clip_text"].name, "auto", "t5_like.safetensors")


def test_decode_node_samplers_img2img_and_preview(models):
    from lambda_eclipse.core.preview import preview_image

    decoder, = node("LambdaEclipseLoadDecoder").load(FILES["decoder_unet"].name, "auto", FILES["decoder_movq"].name)
    clip, = node("LambdaEclipseLoadCLIP").load(FILES["clip_text"].name, "auto", FILES["clip_vision"].name)
    prior, = node("LambdaEclipseLoadPrior").load(FILES["prior"].name, "auto")
    subjects, = node("LambdaEclipseEncodeSubject").encode(clip, torch.rand(1, 64, 64, 3), "dog")
    prompt, _ = node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog", subjects)
    embeds, = node("LambdaEclipsePriorSample").sample(prior, clip, prompt, seed=1, batch_size=1)
    decode = node("LambdaEclipseKandinskyDecode").decode
    photo = torch.rand(1, 80, 96, 3, generator=torch.Generator().manual_seed(2))
    a, = decode(decoder, embeds, 64, 64, 4, 4.0, 5, "increment", "unipc", photo, 0.5)
    b, = decode(decoder, embeds, 64, 64, 4, 4.0, 5, "increment", "unipc", photo, 0.5)
    c, = decode(decoder, embeds, 64, 64, 4, 4.0, 5, "increment", "unipc")
    assert a.shape == (1, 64, 64, 3) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(Exception, match="Unknown sampler 'k_lms'.*ddpm"):
        decode(decoder, embeds, 64, 64, 4, 4.0, 5, "increment", "k_lms")

    # The preview: a small real MoVQ decode of the latent, shown at most once a second (and always at the end).
    latents = torch.randn(2, 4, 8, 8)
    picture = preview_image(decoder.model, latents)
    assert picture.size == (64, 64)

    class Bar:
        def __init__(self):
            self.shown = []

        def update_absolute(self, value, total=None, preview=None):
            self.shown.append((value, preview[0], preview[1].size))

    bar = Bar()
    callback = comfy.preview_callback(bar, lambda lat: preview_image(decoder.model, lat), min_interval=3600)
    for step in range(5):
        callback(step, 5, latents)
    assert [s[0] for s in bar.shown] == [1, 5] and bar.shown[0][1] == "JPEG"


def test_preview_throttle_first_picture_on_a_freshly_booted_machine():
    """The throttle must not compare with the clock's absolute value: a clock that counts from boot starts near 0."""
    class Bar:
        def __init__(self):
            self.shown = []

        def update_absolute(self, value, total=None, preview=None):
            self.shown.append(value)

    for start in (0.0, 2.5, 1e6):
        ticks = iter(start + 0.01 * i for i in range(100))
        bar = Bar()
        callback = comfy.preview_callback(bar, lambda lat: object(), min_interval=3600, clock=lambda: next(ticks))
        for step in range(5):
            callback(step, 5, None)
        assert bar.shown == [1, 5], start
    # the interval counts from the last picture shown, in the clock's own units
    ticks = iter([0.0, 0.0, 0.5, 1.5, 1.5, 2.0, 2.0])
    bar = Bar()
    callback = comfy.preview_callback(bar, lambda lat: object(), min_interval=1.0, clock=lambda: next(ticks))
    for step in range(4):
        callback(step, 10, None)
    assert bar.shown == [1, 3]
