"""Every node with tiny random models, through the adapter's plain-PyTorch fallback (no ComfyUI)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lambda_eclipse import NODE_CLASS_MAPPINGS as ROOT_MAPPINGS
from lambda_eclipse.core.errors import (
    Cancelled,
    InputError,
    InterleaveError,
    LambdaEclipseError,
    MissingModelsError,
    ModelFileError,
)
from lambda_eclipse.core.paths import DEFAULT_LAYOUT
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy, loaders
from lambda_eclipse.nodes.assets import asset_files, input_name, install_assets
from lambda_eclipse.core.interpolate import average_embeddings

REPO = Path(__file__).resolve().parents[1]
PRIOR = Path(DEFAULT_LAYOUT["prior"]).name
CLIP = Path(DEFAULT_LAYOUT["clip"]).name
DECODER = Path(DEFAULT_LAYOUT["decoder"]).name
CUSTOM_TYPES = {
    "LAMBDA_ECLIPSE_PRIOR", "LAMBDA_ECLIPSE_CLIP", "LAMBDA_ECLIPSE_DECODER", "LAMBDA_ECLIPSE_SUBJECTS",
    "LAMBDA_ECLIPSE_PROMPT", "LAMBDA_ECLIPSE_CONTROL", "LAMBDA_ECLIPSE_EMBEDS", "LAMBDA_ECLIPSE_REGIONS",
}
CORE_TYPES = {"IMAGE", "MASK", "STRING", "INT", "FLOAT", "BOOLEAN", "CLIP_VISION_OUTPUT", "EMBEDS"}


def node(name):
    return NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    from lambda_eclipse.core.tiny import write_tiny_models, write_tiny_prior

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    write_tiny_prior(root / "lambda_eclipse" / "single_prior.safetensors", seed=1, single_file=True)
    (root / "lambda_eclipse" / "not_a_prior.safetensors").write_bytes(b"this is not a safetensors file")
    return root


@pytest.fixture()
def models(models_root):
    comfy.set_models_dir(models_root)
    comfy.clear_cancel()
    yield models_root
    comfy.set_models_dir(None)
    comfy.clear_cancel()


@pytest.fixture()
def loaded(models):
    prior, = node("LambdaEclipseLoadPrior").load(PRIOR, "auto")
    clip, = node("LambdaEclipseLoadCLIP").load(CLIP, "auto")
    decoder, = node("LambdaEclipseLoadDecoder").load(DECODER, "auto")
    return prior, clip, decoder


def photo(batch=1, h=64, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, 3, generator=g)


def encode(clip, word, image=None, **kw):
    return node("LambdaEclipseEncodeSubject").encode(clip, photo() if image is None else image, word, **kw)[0]


# -- declarations ----------------------------------------------------------------------------------------

def test_root_package_exports_the_mappings():
    assert ROOT_MAPPINGS is NODE_CLASS_MAPPINGS
    assert len(NODE_CLASS_MAPPINGS) == 14
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert all(k.startswith("LambdaEclipse") for k in NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_declarations_are_consistent(node_id, models):
    cls = NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    assert set(spec.get("hidden", {}).values()) <= {"PROMPT", "UNIQUE_ID", "EXTRA_PNGINFO"}
    assert cls.CATEGORY.startswith("λ-ECLIPSE")
    assert cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    for t in cls.RETURN_TYPES:
        assert t in CUSTOM_TYPES | CORE_TYPES
    import inspect

    params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)[1:]
    names = [n for section in ("required", "optional", "hidden") for n in spec.get(section, {})]
    assert set(names) == set(params), (names, params)
    for section in (spec[k] for k in ("required", "optional") if k in spec):
        for name, decl in section.items():
            kind, options = decl[0], decl[1]
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            assert isinstance(kind, list) or kind in CUSTOM_TYPES | CORE_TYPES
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind


def test_seed_inputs_have_control_after_generate():
    for node_id in ("LambdaEclipsePriorSample", "LambdaEclipseKandinskyDecode"):
        seed = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]["seed"]
        assert seed[0] == "INT" and seed[1]["control_after_generate"] is True


def test_pack_imports_by_path_like_comfyui():
    """ComfyUI: spec_from_file_location(<mangled absolute path>, <pack>/__init__.py) with the folder as search path."""
    name = str(REPO).replace(".", "_x_") + "_mangled"
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
        assert module.NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"] is not NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"]
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


# -- loaders ----------------------------------------------------------------------------------------------

def test_loader_lists(models):
    priors = NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].INPUT_TYPES()["required"]["prior_name"][0]
    clips = NODE_CLASS_MAPPINGS["LambdaEclipseLoadCLIP"].INPUT_TYPES()["required"]["clip_name"][0]
    decoders = NODE_CLASS_MAPPINGS["LambdaEclipseLoadDecoder"].INPUT_TYPES()["required"]["decoder_name"][0]
    assert PRIOR in priors and "single_prior.safetensors" in priors
    assert not any(CLIP in p or "/" in p for p in priors)  # no files from inside model folders
    assert CLIP in clips and not any(n.startswith(CLIP + "/") for n in clips)
    assert DECODER in decoders and not any(n.startswith(DECODER + "/") for n in decoders)


def test_loaders_cache_and_reload_on_change(models, tmp_path):
    a, = node("LambdaEclipseLoadPrior").load(PRIOR, "auto")
    b, = node("LambdaEclipseLoadPrior").load(PRIOR, "fp32")
    assert a is b and a.model.proj_in.weight.dtype == torch.float32
    c, = node("LambdaEclipseLoadPrior").load("single_prior.safetensors", "auto")
    assert c is not a
    import os

    path = models / "lambda_eclipse" / "single_prior.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d, = node("LambdaEclipseLoadPrior").load("single_prior.safetensors", "auto")
    assert d is not c
    changed = NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].IS_CHANGED("single_prior.safetensors", "auto")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].IS_CHANGED("single_prior.safetensors", "auto") != changed
    gone = NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].IS_CHANGED("gone.safetensors", "auto")
    assert gone == NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].IS_CHANGED("gone.safetensors", "auto") != changed
    bf, = node("LambdaEclipseLoadPrior").load(PRIOR, "bf16")
    assert bf.model.proj_in.weight.dtype == torch.bfloat16


def test_loader_errors(models):
    with pytest.raises(ModelFileError, match="not a readable .safetensors"):
        node("LambdaEclipseLoadPrior").load("not_a_prior.safetensors", "auto")
    with pytest.raises(MissingModelsError, match="'gone.safetensors' is not in.*https://huggingface.co/ECLIPSE-Community"):
        node("LambdaEclipseLoadPrior").load("gone.safetensors", "auto")
    with pytest.raises(ModelFileError, match="not a name from the list"):
        node("LambdaEclipseLoadPrior").load("../diffusers/kandinsky-2-2-decoder", "auto")
    with pytest.raises(ModelFileError, match="λ-ECLIPSE prior"):  # a prior given to the CLIP loader says what it is
        node("LambdaEclipseLoadCLIP").load("single_prior.safetensors", "auto")
    with pytest.raises(ModelFileError, match="Kandinsky 2.2 decoder"):
        node("LambdaEclipseLoadDecoder").load(PRIOR, "auto")
    with pytest.raises(ValueError, match="fp32, fp16 or bf16|auto"):
        node("LambdaEclipseLoadPrior").load(PRIOR, "fp64")


def test_missing_models_folder_says_where(tmp_path):
    comfy.set_models_dir(tmp_path)
    try:
        assert NODE_CLASS_MAPPINGS["LambdaEclipseLoadPrior"].INPUT_TYPES()["required"]["prior_name"][0] == []
        with pytest.raises(MissingModelsError, match="models/lambda_eclipse.*none of these folders exists"):
            node("LambdaEclipseLoadPrior").load(PRIOR, "auto")
    finally:
        comfy.set_models_dir(None)


# -- subjects and prompt ---------------------------------------------------------------------------------

def test_encode_subject_chains_in_order(loaded):
    _, clip, _ = loaded
    subjects = encode(clip, "cat")
    subjects = encode(clip, "glasses", photo(seed=1), subjects=subjects, weight=0.8, fit="pad")
    assert [s.word for s in subjects] == ["cat", "glasses"]
    assert subjects[1].weight == pytest.approx(0.8)
    assert subjects[0].embedding.shape == (clip.model.embed_dim,)
    assert subjects[0].embedding.dtype == torch.float32


def test_batch_of_photos_gives_the_normalised_mean(loaded):
    _, clip, _ = loaded
    images = torch.cat([photo(seed=1), photo(seed=2), photo(seed=3)])
    together = encode(clip, "dog", images)[0].embedding
    singles = torch.stack([encode(clip, "dog", images[i:i + 1])[0].embedding for i in range(3)])
    norms = singles.norm(dim=-1)
    direction = (singles / norms[:, None]).mean(0)
    expected = direction / direction.norm() * norms.mean()
    torch.testing.assert_close(together, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(average_embeddings(singles[:1]), singles[0])


def test_mask_inputs(loaded):
    _, clip, _ = loaded
    image = photo(batch=2)
    mask = torch.zeros(1, 64, 80)
    mask[:, 10:50, 20:60] = 1
    assert len(encode(clip, "dog", image, mask=mask)) == 1
    assert len(encode(clip, "dog", image, mask=mask.expand(2, -1, -1))) == 1
    with pytest.raises(InputError, match="mask batch has 3 masks for 2 images"):
        encode(clip, "dog", image, mask=mask.expand(3, -1, -1))
    with pytest.raises(InputError, match="mask is 40×32 but the image is 80×64"):
        encode(clip, "dog", image, mask=torch.ones(1, 32, 40))
    with pytest.raises(InputError, match="empty 64×64 placeholder"):
        encode(clip, "dog", image, mask=torch.zeros(1, 64, 64))
    with pytest.raises(InputError, match="mask is empty"):
        encode(clip, "dog", image, mask=torch.zeros(1, 64, 80))


@pytest.fixture()
def subject_clip(tiny_clip):
    """A CLIP holder like Load CLIP's (`.ready()` → the encoder), without going through the loader nodes."""
    import types

    return types.SimpleNamespace(ready=lambda: tiny_clip)


def _cutout(h=64, w=80):
    """A subject box in the middle of the frame: (subject mask 1 = subject, Load Image's MASK = 1 − alpha)."""
    subject = torch.zeros(1, h, w)
    subject[:, 16:48, 24:56] = 1
    return subject, 1.0 - subject


def test_encode_subject_inputs_are_only_appended():
    spec = NODE_CLASS_MAPPINGS["LambdaEclipseEncodeSubject"].INPUT_TYPES()
    assert list(spec["required"]) == ["clip", "image", "word", "weight", "fit"]
    assert list(spec["optional"]) == ["mask", "subjects", "mask_mode"]
    modes, options = spec["optional"]["mask_mode"]
    assert modes == ["auto", "1 = subject", "1 = background (Load Image alpha)"] and options["default"] == "auto"
    assert "border" in options["tooltip"] and "Load Image" in spec["optional"]["mask"][1]["tooltip"]
    assert "alpha" in spec["required"]["image"][1]["tooltip"]


def test_load_image_mask_is_recognised_and_inverted(subject_clip, caplog_eclipse):
    clip = subject_clip
    image = photo()
    subject, load_image_mask = _cutout()
    painted = encode(clip, "dog", image, mask=subject)[0].embedding
    assert "mask read as 1 = subject (auto: border 0.00" in caplog_eclipse.text
    caplog_eclipse.clear()
    auto = encode(clip, "dog", image, mask=load_image_mask)[0].embedding
    torch.testing.assert_close(auto, painted)  # not the background, whitened subject
    assert "mask read as 1 = background (Load Image alpha) (auto: border 1.00, centre 0.20)" in caplog_eclipse.text
    forced = encode(clip, "dog", image, mask=load_image_mask, mask_mode="1 = background (Load Image alpha)")[0].embedding
    torch.testing.assert_close(forced, painted)
    as_is = encode(clip, "dog", image, mask=load_image_mask, mask_mode="1 = subject")[0].embedding
    assert not torch.allclose(as_is, painted)
    # all 1 in auto: from Load Image that is a fully transparent picture (issue 18), so it is refused; said to be a
    # painted "whole image" mask, it is the whole image, not inverted
    with pytest.raises(InputError, match="mask is 1 everywhere.*fully transparent"):
        encode(clip, "dog", image, mask=torch.ones(1, 64, 80))
    whole = encode(clip, "dog", image, mask=torch.ones(1, 64, 80), mask_mode="1 = subject")[0].embedding
    torch.testing.assert_close(whole, encode(clip, "dog", image)[0].embedding)


def test_empty_mask_message_names_mask_mode(subject_clip):
    clip = subject_clip
    with pytest.raises(InputError, match=r"mask is empty.*set mask_mode to '1 = background \(Load Image alpha\)'.*disconnect the mask"):
        encode(clip, "dog", photo(), mask=torch.zeros(1, 64, 80))
    with pytest.raises(InputError, match=r"mask is empty.*mask_mode is '1 = background \(Load Image alpha\)': if the mask uses the other convention, switch it"):
        encode(clip, "dog", photo(), mask=torch.ones(1, 64, 80), mask_mode="1 = background (Load Image alpha)")
    with pytest.raises(InputError, match=r"mask_mode must be one of 'auto', '1 = subject'"):
        encode(clip, "dog", photo(), mask=torch.ones(1, 64, 80), mask_mode="inverted")


def test_rgba_image_uses_its_alpha_as_the_subject(subject_clip, caplog_eclipse):
    clip = subject_clip
    image = photo()
    subject, load_image_mask = _cutout()
    rgba = torch.cat([image, subject[..., None]], dim=-1)
    with_alpha = encode(clip, "dog", rgba)[0].embedding
    torch.testing.assert_close(with_alpha, encode(clip, "dog", image, mask=subject)[0].embedding)
    assert "alpha used as the subject mask" in caplog_eclipse.text
    both = encode(clip, "dog", rgba, mask=load_image_mask)[0].embedding  # the same cut-out twice: no change
    torch.testing.assert_close(both, with_alpha)
    opaque = torch.cat([image, torch.ones(1, 64, 80, 1)], dim=-1)
    torch.testing.assert_close(encode(clip, "dog", opaque)[0].embedding, encode(clip, "dog", image)[0].embedding)
    with pytest.raises(InputError, match=r"subject image is fully transparent.*Re-export it"):
        encode(clip, "dog", torch.cat([image, torch.zeros(1, 64, 80, 1)], dim=-1))


def test_subject_word_errors(loaded):
    _, clip, _ = loaded
    with pytest.raises(InputError, match="subject word is empty"):
        encode(clip, "  ")
    with pytest.raises(InputError, match="already used by subject 1"):
        encode(clip, "dog", subjects=encode(clip, "dog"))


def test_interleave_prompt_and_report(loaded):
    _, clip, _ = loaded
    subjects = encode(clip, "glasses", subjects=encode(clip, "cat"))
    prompt, report = node("LambdaEclipseInterleavePrompt").interleave(clip, "a cat wearing glasses at a park", subjects)
    assert prompt.tokens.shape == (1, 77, 32)
    assert "'cat' → token 2" in report and "'glasses' → token 4" in report
    assert prompt.tokens.device == comfy.intermediate_device()
    torch.testing.assert_close(prompt.tokens[0, 2], subjects[0].embedding)
    plain, report = node("LambdaEclipseInterleavePrompt").interleave(clip, "a cat", None)
    assert "no subject" in report


def test_word_not_in_prompt_gives_the_core_message(loaded):
    _, clip, _ = loaded
    with pytest.raises(InterleaveError, match=r"Subject word 'dogs' is not in the prompt.*Did you mean 'dog'"):
        node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog on a beach", encode(clip, "dogs"))


# -- canny, prior, interpolation --------------------------------------------------------------------------

def test_canny_condition(loaded):
    _, clip, _ = loaded
    layout = torch.zeros(1, 96, 128, 3)
    layout[:, 30:70, 40:90] = 1.0
    control, edges = node("LambdaEclipseCannyCondition").condition(clip, layout, 100, 200, False)
    assert control.shape == (1, 32) and edges.shape == (1, 96, 128, 3)
    assert edges.dtype == torch.float32 and set(edges.unique().tolist()) <= {0.0, 1.0} and edges.max() == 1.0
    again, same = node("LambdaEclipseCannyCondition").condition(clip, edges, 0, 0, True)
    torch.testing.assert_close(same, edges)
    torch.testing.assert_close(again, control)
    with pytest.raises(InputError, match="low ≤ high"):
        node("LambdaEclipseCannyCondition").condition(clip, layout, 200, 100, False)


def test_prior_sample_seeds(loaded):
    prior, clip, _ = loaded
    prompt, _ = node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog wearing a hat", encode(clip, "dog"))
    sample = node("LambdaEclipsePriorSample").sample
    batch, = sample(prior, clip, prompt, 7, 3)
    assert batch.embeds.shape == batch.negative.shape == (3, 32) and batch.seeds == [7, 8, 9]
    again, = sample(prior, clip, prompt, 7, 3)
    torch.testing.assert_close(batch.embeds, again.embeds)
    alone, = sample(prior, clip, prompt, 8, 1)
    torch.testing.assert_close(alone.embeds[0], batch.embeds[1])
    assert not torch.allclose(batch.embeds[0], batch.embeds[1])
    control, _ = node("LambdaEclipseCannyCondition").condition(clip, photo(), 100, 200, False)
    guided, = sample(prior, clip, prompt, 7, 1, control)
    assert not torch.allclose(guided.embeds[0], batch.embeds[0])
    top, = sample(prior, clip, prompt, 2**64 - 1, 2)
    assert top.seeds == [2**64 - 1, 0]


def test_prior_sample_rejects_other_clip_width(loaded):
    prior, clip, _ = loaded
    prompt, _ = node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog", None)
    with pytest.raises(InputError, match="control was encoded by a CLIP with 16-d.*same Load CLIP"):
        node("LambdaEclipsePriorSample").sample(prior, clip, prompt, 0, 1, torch.zeros(1, 16))
    from dataclasses import replace

    wide = replace(prompt, tokens=torch.zeros(1, 77, 48), pooled=torch.zeros(1, 48))
    with pytest.raises(InputError, match="48-d features but the prior expects 32-d"):
        node("LambdaEclipsePriorSample").sample(prior, clip, wide, 0, 1)


def _embeds(values, seeds=None):
    from lambda_eclipse.core.pipeline import Embeds

    values = torch.as_tensor(values, dtype=torch.float32)
    return Embeds(values, torch.zeros_like(values), seeds or [0] * values.shape[0])


def test_embedding_lerp():
    a, b = _embeds([[1.0, 0.0], [2.0, 2.0]]), _embeds([[0.0, 1.0], [4.0, 4.0]])
    mid, = node("LambdaEclipseEmbeddingLerp").lerp(a, b, 0.5, "lerp")
    torch.testing.assert_close(mid.embeds, torch.tensor([[0.5, 0.5], [3.0, 3.0]]))
    arc, = node("LambdaEclipseEmbeddingLerp").lerp(a, b, 0.5, "slerp")
    torch.testing.assert_close(arc.embeds[0].norm(), torch.tensor(1.0))
    with pytest.raises(InputError, match="same shape"):
        node("LambdaEclipseEmbeddingLerp").lerp(a, _embeds([[1.0, 0.0]]), 0.5, "lerp")
    with pytest.raises(InputError, match="Unknown blend mode"):
        node("LambdaEclipseEmbeddingLerp").lerp(a, b, 0.5, "cubic")


def test_embedding_grid_count_and_row_major_order():
    corners = [_embeds([[v, 0.0]]) for v in (0.0, 1.0, 2.0, 3.0)]  # TL, TR, BL, BR
    grid, = node("LambdaEclipseEmbeddingGrid").grid(*corners, 2, "lerp")
    assert len(grid) == 9 and grid.negative.shape == (9, 2)
    torch.testing.assert_close(grid.embeds[:, 0], torch.tensor([0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]))
    five, = node("LambdaEclipseEmbeddingGrid").grid(*corners, 4, "slerp")
    assert len(five) == 25
    with pytest.raises(InputError, match="corner 'top_right' has a batch of 2"):
        node("LambdaEclipseEmbeddingGrid").grid(corners[0], _embeds([[1.0, 0.0], [1.0, 1.0]]), *corners[2:], 2, "lerp")


# -- decode ------------------------------------------------------------------------------------------------

@pytest.fixture()
def embeds(loaded):
    prior, clip, _ = loaded
    prompt, _ = node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog", encode(clip, "dog"))
    return node("LambdaEclipsePriorSample").sample(prior, clip, prompt, 3, 2)[0]


def test_decode_shapes_and_per_image_seeds(loaded, embeds):
    decoder = loaded[2]
    run = node("LambdaEclipseKandinskyDecode").decode
    images, = run(decoder, embeds, 64, 128, 2, 4.0, 11)
    assert images.shape == (2, 128, 64, 3) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    from lambda_eclipse.core.pipeline import Embeds

    second = Embeds(embeds.embeds[1:], embeds.negative[1:], embeds.seeds[1:])
    alone, = run(decoder, second, 64, 128, 2, 4.0, 12)
    torch.testing.assert_close(alone[0], images[1], rtol=1e-4, atol=1e-4)
    same, = run(decoder, embeds, 64, 128, 2, 4.0, 11, "same")
    torch.testing.assert_close(same[0], images[0], rtol=1e-4, atol=1e-4)
    rounded, = run(decoder, second, 70, 64, 1, 4.0, 0)
    assert rounded.shape == (1, 64, 128, 3)


def test_decode_cancel_stops_within_a_step(loaded, embeds, monkeypatch):
    decoder = loaded[2]
    calls = []
    original = comfy.check_interrupt

    def check():
        calls.append(1)
        if len(calls) == 2:
            comfy.request_cancel()
        original()

    monkeypatch.setattr(comfy, "check_interrupt", check)
    with pytest.raises(Cancelled, match="Cancelled"):
        node("LambdaEclipseKandinskyDecode").decode(decoder, embeds, 64, 64, 10, 4.0, 0)
    assert len(calls) == 2


def test_decode_rejects_mismatched_embeddings(loaded):
    with pytest.raises(InputError, match="48-d but this decoder expects 32-d"):
        node("LambdaEclipseKandinskyDecode").decode(loaded[2], _embeds(torch.zeros(1, 48)), 64, 64, 1, 4.0, 0)
    with pytest.raises(InputError, match="batch_seeds"):
        node("LambdaEclipseKandinskyDecode").decode(loaded[2], _embeds(torch.zeros(1, 32)), 64, 64, 1, 4.0, 0, "random")


def test_every_error_is_a_value_or_library_error():
    for exc in (ModelFileError, MissingModelsError, InterleaveError, InputError, Cancelled):
        assert issubclass(exc, LambdaEclipseError)


def test_error_names_are_short_and_stable():
    """ComfyUI shows type(ex).__module__ + '.' + __qualname__; for a custom node the module is its install path."""
    import copy
    import pickle
    import traceback

    from lambda_eclipse.core import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, LambdaEclipseError)]
    assert {c.__name__ for c in classes} >= {"ImageFileError", "OutputPathError", "DeviceError", "InterleaveError"}
    for cls in classes:
        exc = cls(f"{cls.__name__} happened. Do this.")
        assert f"{type(exc).__module__}.{type(exc).__qualname__}" == f"lambda_eclipse.{cls.__name__}"
        assert errors.public_name(exc) == f"lambda_eclipse.{cls.__name__}"
        assert str(exc) == f"{cls.__name__} happened. Do this."
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is cls and again.args == exc.args
        assert type(copy.deepcopy(exc)) is cls
    assert issubclass(errors.OutputPathError, InputError) and issubclass(errors.ImageFileError, InputError)
    assert issubclass(errors.DeviceError, InputError)
    line = traceback.format_exception_only(InterleaveError, InterleaveError("no word"))[-1]
    assert line == "lambda_eclipse.InterleaveError: no word\n"
    from lambda_eclipse.trainer.errors import CheckpointError  # subclasses elsewhere get the short name too

    assert errors.public_name(CheckpointError) == "lambda_eclipse.CheckpointError"
    assert isinstance(pickle.loads(pickle.dumps(CheckpointError("gone"))), FileNotFoundError)


# -- ComfyUI setup (fallback parts) ----------------------------------------------------------------------

def test_assets_install_without_overwriting(tmp_path):
    assets = asset_files()
    assert assets, "assets/ holds the workflows' images"
    mine = tmp_path / input_name(assets[0])
    mine.write_bytes(b"user file")
    copied = install_assets(tmp_path)
    assert mine.read_bytes() == b"user file"
    assert len(copied) == len(assets) - 1
    assert install_assets(tmp_path) == []


def test_assets_install_fails_soft(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert install_assets(blocker / "input") == []
    assert "could not copy" in caplog.text


def test_register_model_folder_keeps_yaml_paths(monkeypatch, tmp_path):
    """A stand-in for ComfyUI's folder_paths: our entry is appended to, never replaced."""
    import types

    shared = {".safetensors", ".ckpt"}
    fake = types.SimpleNamespace(
        models_dir=str(tmp_path / "models"),
        folder_names_and_paths={"lambda_eclipse": (["/yaml/path"], {".sft"}), "checkpoints": ([], shared)},
        supported_pt_extensions=shared,
    )
    monkeypatch.setattr(comfy, "folder_paths", lambda: fake)
    default = comfy.register_model_folder()
    assert default.is_dir()
    paths, extensions = fake.folder_names_and_paths["lambda_eclipse"]
    assert paths == ["/yaml/path", str(default)] and {".sft", ".safetensors"} <= extensions
    assert shared == {".safetensors", ".ckpt"}
    del fake.folder_names_and_paths["lambda_eclipse"]
    comfy.register_model_folder()
    paths, extensions = fake.folder_names_and_paths["lambda_eclipse"]
    assert paths == [str(default)] and extensions is not shared


def test_fallback_progress_callback(monkeypatch):
    callback = comfy.step_callback(3)
    callback(0, 3)
    callback(1, 3)
    assert callback.bar.current == 2
    comfy.request_cancel()
    with pytest.raises(Cancelled):
        callback(2, 3)


def test_node_errors_are_json_safe_messages(loaded):
    """ComfyUI shows str(exception) in its dialog: it must be a plain, non-empty string."""
    _, clip, _ = loaded
    try:
        node("LambdaEclipseInterleavePrompt").interleave(clip, "a dog", encode(clip, "cat"))
    except InterleaveError as exc:
        assert json.loads(json.dumps(str(exc))) and "Change the subject word or the prompt" in str(exc)


def test_model_holder_takes_a_device_attribute(loaded):
    """ModelPatcher sets `.device` on what it wraps; diffusers models refuse it, the holder must not."""
    decoder = loaded[2].model
    holder = comfy.ModelHolder(unet=decoder.unet, movq=decoder.movq)
    holder.device = torch.device("cpu")
    assert holder.unet is decoder.unet
    assert sum(p.numel() for p in holder.parameters()) == sum(
        p.numel() for m in (decoder.unet, decoder.movq) for p in m.parameters())
    with pytest.raises(AttributeError):
        decoder.unet.device = torch.device("cpu")
    assert comfy.make_patcher("decoder", unet=decoder.unet) is None  # outside ComfyUI nothing is managed
