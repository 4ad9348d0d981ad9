"""CLIP wrapper on a tiny OpenCLIP built by open_clip's own factory from a folder on disk."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lambda_eclipse.core.clip import load_clip, prepare_subject, preprocess_image, Preprocess
from lambda_eclipse.core.errors import InputError, ModelFileError


def test_token_ids_match_the_reference_tokenizer(tiny_clip):
    ids = tiny_clip.tokenize("a cat wearing glasses at a park")[0]
    assert ids[:9].tolist() == [49406, 320, 2368, 3309, 6116, 536, 320, 1452, 49407]
    assert ids[9:].eq(0).all() and ids.shape == (77,)
    assert tiny_clip.word_ids("Glasses") == [6116]  # lower-cased, as CLIP does


def test_text_features_are_ln_final_states_and_pooled_projection(tiny_clip):
    feats = tiny_clip.encode_text(["a cat wearing glasses at a park", "a dog"])
    assert feats.tokens.shape == (2, 77, 32) and feats.pooled.shape == (2, 32)
    assert feats.mask.dtype == torch.bool and feats.mask.sum(1).tolist() == [9, 4]
    # Pooled equals open_clip's own encode_text (EOT state of ln_final through text_projection).
    with torch.no_grad():
        own = tiny_clip.model.encode_text(feats.ids)
    assert torch.allclose(feats.pooled, own, atol=1e-6)
    # The pooled vector is the projection of the per-token state at EOT.
    eot = feats.ids.argmax(-1)
    proj = feats.tokens[torch.arange(2), eot] @ tiny_clip.model.text_projection
    assert torch.allclose(proj, feats.pooled, atol=1e-6)


def test_preprocessing_is_shortest_side_bicubic_then_centre_crop():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (224, 448, 3), dtype=np.uint8)  # shortest side already 224: no resize
    pixels = preprocess_image(Image.fromarray(array))
    cfg = Preprocess()
    expected = (array[:, 112:336].astype(np.float32) / 255 - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    assert pixels.shape == (3, 224, 224)
    assert np.allclose(pixels.numpy().transpose(1, 2, 0), expected, atol=1e-6)
    # A resize case agrees with open_clip's own eval transform (same PIL bicubic, even offsets).
    import open_clip

    big = Image.fromarray(rng.integers(0, 255, (300, 600, 3), dtype=np.uint8))
    theirs = open_clip.image_transform(224, is_train=False)(big)
    assert (preprocess_image(big) - theirs).abs().max() < 1e-5


def test_image_embeddings_batch_and_inputs(tiny_clip):
    red = Image.new("RGB", (300, 200), (220, 20, 20))
    as_tensor = torch.tensor(np.asarray(red), dtype=torch.float32) / 255
    emb = tiny_clip.encode_images([red, as_tensor, np.asarray(red)])
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb[0], emb[1], atol=1e-6) and torch.allclose(emb[0], emb[2], atol=1e-6)
    with torch.no_grad():
        own = tiny_clip.model.encode_image(preprocess_image(red)[None])
    assert torch.allclose(emb[:1], own, atol=1e-6)
    rgba = Image.new("RGBA", (300, 200), (220, 20, 20, 10))
    assert torch.allclose(tiny_clip.encode_images([rgba])[0], emb[0], atol=1e-6)  # alpha dropped, as officially


def test_blank_embedding_is_zero_normalised_pixels_and_cached(tiny_clip):
    blank = tiny_clip.blank_embedding()
    with torch.no_grad():
        own = tiny_clip.model.encode_image(torch.zeros(1, 3, 224, 224))[0]
    assert torch.allclose(blank, own)
    assert tiny_clip.blank_embedding() is blank
    black = tiny_clip.encode_images([Image.new("RGB", (224, 224), (0, 0, 0))])[0]
    assert not torch.allclose(black, blank)  # mean grey after normalisation, not black


def test_subject_on_white_cropped_to_mask_box_and_padding():
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    mask = np.zeros((100, 200), np.float32)
    mask[20:60, 30:150] = 1.0  # a 120×40 box
    mask[20, 30] = 0.0
    out = prepare_subject(img, mask)
    assert out.size == (120, 40)
    arr = np.asarray(out)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[10, 10]) == (0, 0, 255)
    padded = prepare_subject(img, mask, fit="pad")
    assert padded.size == (120, 120)
    assert tuple(np.asarray(padded)[0, 60]) == (255, 255, 255) and tuple(np.asarray(padded)[60, 60]) == (0, 0, 255)
    assert prepare_subject(img).size == (200, 100)  # no mask: used as given
    tensor_mask = torch.from_numpy(mask)[None]  # ComfyUI MASK [1,H,W]
    assert prepare_subject(img, tensor_mask).size == (120, 40)
    small = Image.fromarray((mask * 255).astype(np.uint8)).resize((100, 50))  # another size → resized to the image
    assert prepare_subject(img, small).size[0] in (118, 120, 122)


def test_subject_errors():
    img = Image.new("RGB", (20, 20))
    with pytest.raises(InputError, match="mask is empty"):
        prepare_subject(img, np.zeros((20, 20)))
    with pytest.raises(InputError, match="fit"):
        prepare_subject(img, fit="stretch")
    with pytest.raises(InputError, match="batch of 2"):
        prepare_subject(torch.zeros(2, 8, 8, 3))


def test_loading_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_clip(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="open_clip_model.safetensors"):
        load_clip(tmp_path / "empty")
    hf = tmp_path / "clip_vision_g.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 2)}, str(hf))
    with pytest.raises(ModelFileError, match="no complete tower"):
        load_clip(hf)
    other = tmp_path / "prior.safetensors"
    save_file({"proj_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelFileError, match="not a CLIP.*ViT-bigG"):
        load_clip(other)
