"""core.decoder against diffusers' own KandinskyV22Pipeline, on the tiny decoder written to disk (CPU, offline)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch

from lambda_eclipse.core.decoder import DECODER_URL, KandinskyDecoder, decode, load_decoder, round_size
from lambda_eclipse.core.errors import Cancelled, InputError, MissingModelsError, ModelFileError
from lambda_eclipse.core.tiny import TINY_EMBED, write_tiny_decoder, write_tiny_prior

diffusers = pytest.importorskip("diffusers")
from diffusers import KandinskyV22Pipeline, VQModel  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("models") / "kandinsky-2-2-decoder", seed=0)


@pytest.fixture(scope="module")
def decoder(tiny_dir) -> KandinskyDecoder:
    return load_decoder(tiny_dir)


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(3, TINY_EMBED, generator=g), torch.randn(3, TINY_EMBED, generator=g)


def _variant_dir(tiny_dir, tmp_path, **scheduler_changes):
    folder = tmp_path / "variant"
    shutil.copytree(tiny_dir, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(scheduler_changes)
    cfg_path.write_text(json.dumps(cfg))
    if "_class_name" in scheduler_changes:  # keep model_index.json consistent, as save_pretrained would
        index = json.loads((folder / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", scheduler_changes["_class_name"]]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _pipeline_images(pipe, image_embeds, negative_embeds, seeds, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image_embeds=image_embeds, negative_image_embeds=negative_embeds,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **kwargs,
    ).images
    return torch.from_numpy(out)


# -- equal to diffusers --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "width,height,guidance,batch",
    [(64, 64, 4.0, 3), (128, 64, 4.0, 2), (64, 192, 1.0, 2), (64, 64, 7.5, 1)],
)
def test_equals_kandinsky_pipeline(decoder, embeds, width, height, guidance, batch):
    image_embeds, negative_embeds = embeds[0][:batch], embeds[1][:batch]
    seeds = [11 + 7 * i for i in range(batch)]
    pipe = KandinskyV22Pipeline(unet=decoder.unet, scheduler=decoder.new_scheduler(), movq=decoder.movq)
    expected = _pipeline_images(
        pipe, image_embeds, negative_embeds, seeds,
        width=width, height=height, num_inference_steps=3, guidance_scale=guidance,
    )
    ours = decode(decoder, image_embeds, negative_embeds, width=width, height=height, steps=3, guidance=guidance, seeds=seeds)
    assert ours.shape == (batch, height, width, 3)
    assert torch.equal(ours, expected), (ours - expected).abs().max()


def test_equals_pipeline_loaded_by_diffusers(tiny_dir, decoder, embeds):
    """The pipeline loads the same folder with its own code: same pixels."""
    pipe = KandinskyV22Pipeline.from_pretrained(str(tiny_dir), local_files_only=True)
    expected = _pipeline_images(pipe, *embeds, [3, 4, 5], width=64, height=64, num_inference_steps=4, guidance_scale=4.0)
    ours = decode(decoder, *embeds, width=64, height=64, steps=4, guidance=4.0, seeds=[3, 4, 5])
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    "changes",
    [
        {"variance_type": "learned_range"},
        {"_class_name": "DDIMScheduler"},
    ],
    # ("learned" takes the raw variance channels as the variance: NaN with random weights, so not tested.)
    ids=["learned_range", "ddim"],
)
def test_scheduler_variants_equal_pipeline(tiny_dir, tmp_path, embeds, changes):
    folder = _variant_dir(tiny_dir, tmp_path, **changes)
    variant = load_decoder(folder)
    scheduler = variant.new_scheduler()
    assert type(scheduler).__name__ == changes.get("_class_name", "DDPMScheduler")
    if "variance_type" in changes:
        assert scheduler.config.variance_type == changes["variance_type"]
    pipe = KandinskyV22Pipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe.scheduler) is type(scheduler)
    for guidance in (4.0, 1.0):
        expected = _pipeline_images(pipe, *embeds, [1, 2, 3], width=64, height=64, num_inference_steps=3, guidance_scale=guidance)
        # sampler=None: the class the folder's scheduler config names (the default "ddpm" is DDPMScheduler).
        ours = decode(variant, *embeds, width=64, height=64, steps=3, guidance=guidance, seeds=[1, 2, 3], sampler=None)
        assert torch.equal(ours, expected), (changes, guidance)
        if "_class_name" not in changes:  # a DDPM config: the named sampler is the same scheduler
            named = decode(variant, *embeds, width=64, height=64, steps=3, guidance=guidance, seeds=[1, 2, 3])
            assert torch.equal(named, expected), (changes, guidance)


def test_learned_variance_changes_the_result(tiny_dir, tmp_path, decoder, embeds):
    """The variance channels really are used with learned_range (and dropped with fixed_small)."""
    learned = load_decoder(_variant_dir(tiny_dir, tmp_path, variance_type="learned_range"))
    a = decode(decoder, *embeds, width=64, height=64, steps=3, seeds=0)
    b = decode(learned, *embeds, width=64, height=64, steps=3, seeds=0)
    assert not torch.equal(a, b)


def test_batch_one_negative_equals_repeated_negative(decoder, embeds):
    image_embeds, negative = embeds[0], embeds[1][:1]
    a = decode(decoder, image_embeds, negative, width=64, height=64, steps=2, seeds=[4, 5, 6])
    b = decode(decoder, image_embeds, negative.repeat(3, 1), width=64, height=64, steps=2, seeds=[4, 5, 6])
    assert torch.equal(a, b)


# -- seeds ------------------------------------------------------------------------------------------

def _elementwise_unet(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
    """A stand-in UNet that treats each image on its own with no matrix product (batch-invariant)."""
    embeds = added_cond_kwargs["image_embeds"]
    eps = 0.3 * sample + embeds.mean(dim=1)[:, None, None, None]
    return (torch.cat([eps, torch.zeros_like(sample)], dim=1),)


def test_seed_per_image_exact_noise(decoder, embeds, monkeypatch):
    """Image i of a batch gets exactly the noise (initial latents and every DDPM variance draw) of seed i."""
    captured = []
    real_decode = VQModel.decode

    def spy_decode(self, z, *args, **kwargs):
        captured.append(z.clone())
        return real_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(decoder.unet, "forward", _elementwise_unet)
    monkeypatch.setattr(VQModel, "decode", spy_decode)
    decode(decoder, *embeds, width=64, height=64, steps=4, seeds=[5, 6, 7])
    decode(decoder, embeds[0][1:2], embeds[1][1:2], width=64, height=64, steps=4, seeds=[6])
    batch_latents, single_latents = captured
    assert torch.equal(batch_latents[1], single_latents[0])
    assert not torch.equal(batch_latents[0], batch_latents[1])


def test_seed_per_image_real_unet(decoder, embeds):
    """Image i of a batch depends on its own embedding and seed only (same batch size, other rows changed: exact).
    Against an image decoded alone it is not bitwise: CPU BLAS rounding depends on the batch size (even one
    nn.Linear differs by ~2e-7 between batch 2 and batch 6), as in the diffusers pipeline; the noise is exact."""
    image_embeds, negative = embeds
    batch = decode(decoder, image_embeds, negative, width=64, height=64, steps=4, seeds=[5, 6, 7])
    order = [2, 1, 0]
    other = decode(decoder, image_embeds[order], negative[order], width=64, height=64, steps=4, seeds=[3, 6, 4])
    assert torch.equal(batch[1], other[1])
    assert (batch[0] - other[0]).abs().max() > 0.05


def test_int_seed_counts_up(decoder, embeds):
    a = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=5)
    b = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=[5, 6, 7])
    assert torch.equal(a, b)


def test_same_seed_same_pixels_different_seed_differs(decoder, embeds):
    image_embeds, negative = embeds[0][:1], embeds[1][:1]
    a = decode(decoder, image_embeds, negative, width=64, height=64, steps=3, seeds=42)
    b = decode(decoder, image_embeds, negative, width=64, height=64, steps=3, seeds=[42])
    c = decode(decoder, image_embeds, negative, width=64, height=64, steps=3, seeds=43)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.05


def test_global_rng_is_not_used(decoder, embeds):
    torch.manual_seed(0)
    a = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=9)
    torch.manual_seed(1)
    b = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=9)
    assert torch.equal(a, b)


def test_given_latents_are_used(decoder, embeds):
    shape = (3, 4, 8, 8)
    lat = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=1, latents=lat)
    b = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=1, latents=lat)
    c = decode(decoder, *embeds, width=64, height=64, steps=2, seeds=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(InputError, match="latents"):
        decode(decoder, *embeds, width=64, height=64, steps=2, latents=torch.zeros(3, 4, 4, 4))


# -- sizes, callback, dtypes -------------------------------------------------------------------------

def test_round_size():
    assert round_size(100, 70) == (128, 128, True)
    assert round_size(512, 768) == (512, 768, False)
    assert round_size(513, 1) == (576, 64, True)
    with pytest.raises(InputError):
        round_size(0, 64)


def test_decode_rounds_size_and_warns(decoder, embeds, caplog):
    with caplog.at_level(logging.WARNING, logger="lambda_eclipse"):
        out = decode(decoder, embeds[0][:1], embeds[1][:1], width=100, height=70, steps=1)
    assert out.shape == (1, 128, 128, 3)
    assert any("100x70" in r.getMessage() and "128x128" in r.getMessage() for r in caplog.records)


def test_callback_every_step(decoder, embeds):
    calls = []
    decode(decoder, *embeds, width=64, height=64, steps=3, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 3), (1, 3), (2, 3)]


def test_cancel_stops_at_that_step(decoder, embeds, monkeypatch):
    unet_calls, calls = [], []
    real_forward = decoder.unet.forward

    def counting_forward(*args, **kwargs):
        unet_calls.append(1)
        return real_forward(*args, **kwargs)

    def cancel_at_second(i, n):
        calls.append(i)
        if i == 1:
            raise Cancelled("stopped by the user")

    monkeypatch.setattr(decoder.unet, "forward", counting_forward)
    monkeypatch.setattr(VQModel, "decode", lambda *a, **k: pytest.fail("MoVQ must not run after a cancel"))
    with pytest.raises(Cancelled):
        decode(decoder, *embeds, width=64, height=64, steps=10, callback=cancel_at_second)
    assert calls == [0, 1]
    assert len(unet_calls) == 2


def test_output_contract_fp32(decoder, embeds):
    out = decode(decoder, *embeds, width=64, height=128, steps=2)
    assert out.shape == (3, 128, 64, 3)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.is_inference(out)
    out.mul_(255)  # an ordinary tensor: the caller may change it in place


def test_fp16_nonfinite_decode_falls_back_to_fp32(tiny_dir, embeds, monkeypatch, caplog):
    half = load_decoder(tiny_dir, dtype="fp16")
    assert half.dtype == torch.float16 and half.movq.dtype == torch.float16
    real_decode = VQModel.decode
    seen = []

    def overflowing_decode(self, z, *args, **kwargs):
        seen.append(z.dtype)
        if z.dtype == torch.float16:  # what an fp16 MoVQ overflow looks like
            out = real_decode(self, z, *args, **kwargs)
            return SimpleNamespace(sample=torch.full_like(out.sample, float("inf")))
        return real_decode(self, z, *args, **kwargs)

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(VQModel, "decode", overflowing_decode)
    with caplog.at_level(logging.WARNING, logger="lambda_eclipse"):
        out = decode(half, *embeds, width=64, height=64, steps=2, latents=latents)
    assert seen == [torch.float16, torch.float32]
    assert any("fp32" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    assert half.movq.dtype == torch.float16  # the shared model was not changed


def test_fp16_fallback_matches_fp32_decode_of_same_latents(tiny_dir, embeds, monkeypatch):
    half = load_decoder(tiny_dir, dtype="fp16")
    real_decode = VQModel.decode
    captured = []

    def overflowing_decode(self, z, *args, **kwargs):
        if z.dtype == torch.float16:
            captured.append(z.clone())
            return SimpleNamespace(sample=torch.full((z.shape[0], 3, 64, 64), float("nan"), dtype=z.dtype))
        return real_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(VQModel, "decode", overflowing_decode)
    out = decode(half, *embeds, width=64, height=64, steps=2, seeds=0)
    monkeypatch.undo()
    with torch.no_grad():
        ref = copy.deepcopy(half.movq).float().decode(captured[0].float(), force_not_quantize=True).sample
    ref = (ref * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.equal(out, ref)


def test_bf16_runs_on_cpu(tiny_dir, embeds):
    bf16 = load_decoder(tiny_dir, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    out = decode(bf16, *embeds, width=64, height=64, steps=2, seeds=[1, 2, 3])
    assert out.shape == (3, 64, 64, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_to_moves_and_casts(tiny_dir):
    dec = load_decoder(tiny_dir)
    assert dec.to(dtype="bf16") is dec
    assert dec.unet.dtype == dec.movq.dtype == torch.bfloat16
    dec.to("cpu", torch.float32)
    assert dec.dtype == torch.float32 and dec.device.type == "cpu"
    assert dec.embedding_dim == TINY_EMBED


def test_new_scheduler_is_fresh(decoder):
    a, b = decoder.new_scheduler(), decoder.new_scheduler()
    assert a is not b
    a.set_timesteps(5)
    assert b.num_inference_steps is None


# -- errors ------------------------------------------------------------------------------------------

def test_missing_folder_lists_files_and_url(tmp_path):
    with pytest.raises(MissingModelsError) as info:
        load_decoder(tmp_path / "nowhere" / "kandinsky-2-2-decoder")
    message = str(info.value)
    for name in ("model_index.json", "unet", "diffusion_pytorch_model.safetensors", "movq", "scheduler_config.json"):
        assert name in message
    assert DECODER_URL in message


def test_hub_id_without_download_is_refused():
    with pytest.raises(MissingModelsError) as info:
        load_decoder("kandinsky-community/kandinsky-2-2-decoder")
    assert "downloading is off" in str(info.value)
    assert DECODER_URL in str(info.value)


def test_allow_download_is_deprecated_and_ignored(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lambda_eclipse"):
        dec = load_decoder(tiny_dir, allow_download=True)
    assert dec.embedding_dim == TINY_EMBED
    assert any("deprecated" in r.getMessage() for r in caplog.records)
    with pytest.raises(MissingModelsError, match="downloading is off"):
        load_decoder("kandinsky-community/kandinsky-2-2-decoder", allow_download=True)


def test_folder_without_movq(tiny_dir, tmp_path):
    folder = tmp_path / "no_movq"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("movq"))
    with pytest.raises(ModelFileError, match="movq/") as info:
        load_decoder(folder)
    assert DECODER_URL in str(info.value)


def test_prior_folder_given_as_decoder(tmp_path):
    prior = write_tiny_prior(tmp_path / "Lambda-ECLIPSE-Prior-v1.0")
    with pytest.raises(ModelFileError, match="prior"):
        load_decoder(prior)


def test_file_instead_of_folder(tiny_dir):
    with pytest.raises(ModelFileError, match="is a file"):
        load_decoder(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_other_pipeline_folder(tiny_dir, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="StableDiffusionPipeline"):
        load_decoder(folder)


def test_text_unet_is_refused(tiny_dir, tmp_path):
    folder = tmp_path / "k21"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["encoder_hid_dim_type"] = "text_image_proj"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="image_proj"):
        load_decoder(folder)


def test_unreadable_weights(tiny_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="could not be read"):
        load_decoder(folder)


def test_wrong_embedding_width(decoder):
    with pytest.raises(InputError, match=r"expects 32-d .*got 16-d.*do not match"):
        decode(decoder, torch.zeros(1, 16), torch.zeros(1, 16), width=64, height=64, steps=1)


def test_bad_batches_and_seeds(decoder, embeds):
    with pytest.raises(InputError, match="negative_embeds"):
        decode(decoder, embeds[0], embeds[1][:2], width=64, height=64, steps=1)
    with pytest.raises(InputError, match="seeds"):
        decode(decoder, embeds[0], embeds[1], width=64, height=64, steps=1, seeds=[1, 2])
    with pytest.raises(InputError, match="steps"):
        decode(decoder, embeds[0], embeds[1], width=64, height=64, steps=0)
