"""Samplers and img2img of core.decoder.decode against diffusers' Kandinsky 2.2 pipelines (tiny decoder, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lambda_eclipse.core.decoder import (
    RECOMMENDED_STEPS,
    SAMPLERS,
    decode,
    load_decoder,
    make_scheduler,
)
from lambda_eclipse.core.errors import InputError
from lambda_eclipse.core.tiny import TINY_EMBED, write_tiny_decoder

diffusers = pytest.importorskip("diffusers")
from diffusers import KandinskyV22Img2ImgPipeline, KandinskyV22Pipeline, VQModel  # noqa: E402

PIPELINE_EQUAL = ("ddpm", "ddim", "dpmpp_2m")  # the pipeline passes `generator` and never scales the input
OTHERS = ("dpmpp_2m_karras", "unipc", "euler_a")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("models") / "kandinsky-2-2-decoder", seed=0)


@pytest.fixture(scope="module")
def decoder(tiny_dir):
    return load_decoder(tiny_dir)


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(3, TINY_EMBED, generator=g), torch.randn(3, TINY_EMBED, generator=g)


@pytest.fixture(scope="module")
def pictures():
    """Three smooth 64×64 RGB pictures [3,64,64,3] in 0..1 (ComfyUI IMAGE layout)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([
        torch.stack([x, y, 1 - x], dim=-1),
        torch.stack([y, 0.5 * (x + y), x * y], dim=-1),
        torch.stack([0.5 + 0.5 * torch.sin(6 * x), 1 - y, 0.3 + 0 * x], dim=-1),
    ]).clamp(0, 1)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _images(out) -> torch.Tensor:
    return torch.from_numpy(out.images)


def _elementwise_unet(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
    """A stand-in UNet that treats each image on its own with no matrix product (batch-invariant)."""
    embeds = added_cond_kwargs["image_embeds"]
    eps = 0.3 * sample + embeds.mean(dim=1)[:, None, None, None]
    return (torch.cat([eps, torch.zeros_like(sample)], dim=1),)


# -- the schedulers ---------------------------------------------------------------------------------

def test_sampler_table():
    assert SAMPLERS == ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "euler_a")
    assert RECOMMENDED_STEPS == {"ddpm": 50, "ddim": 50, "dpmpp_2m": 20, "dpmpp_2m_karras": 20, "unipc": 20, "euler_a": 30}


def test_schedulers_built_from_the_decoder_config(decoder):
    expected = {
        "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
        "dpmpp_2m_karras": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
    }
    for name in SAMPLERS:
        scheduler = decoder.new_scheduler(name)
        assert type(scheduler).__name__ == expected[name]
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                    "steps_offset", "timestep_spacing"):
            assert scheduler.config[key] == decoder.scheduler_config[key], (name, key)
    for name in ("dpmpp_2m", "dpmpp_2m_karras"):
        config = decoder.new_scheduler(name).config
        assert config.algorithm_type == "dpmsolver++" and config.solver_order == 2
        assert config.use_karras_sigmas == (name == "dpmpp_2m_karras")
    assert type(make_scheduler(decoder.scheduler_config)).__name__ == "DDPMScheduler"


def test_unknown_sampler_lists_the_choices(decoder, embeds):
    with pytest.raises(InputError) as info:
        decode(decoder, *embeds, width=64, height=64, steps=2, sampler="k_lms")
    for name in SAMPLERS:
        assert name in str(info.value)
    with pytest.raises(InputError, match="euler_a"):
        make_scheduler(decoder.scheduler_config, "euler")


# -- equal to KandinskyV22Pipeline ------------------------------------------------------------------

@pytest.mark.parametrize("sampler", PIPELINE_EQUAL)
@pytest.mark.parametrize("width,height,guidance,batch", [(64, 64, 4.0, 3), (128, 64, 1.0, 2)])
def test_equals_kandinsky_pipeline(decoder, embeds, sampler, width, height, guidance, batch):
    image_embeds, negative = embeds[0][:batch], embeds[1][:batch]
    seeds = [21 + i for i in range(batch)]
    pipe = KandinskyV22Pipeline(unet=decoder.unet, scheduler=decoder.new_scheduler(sampler), movq=decoder.movq)
    pipe.set_progress_bar_config(disable=True)
    expected = _images(pipe(
        image_embeds=image_embeds, negative_image_embeds=negative, width=width, height=height,
        num_inference_steps=5, guidance_scale=guidance, generator=_generators(seeds), output_type="np",
    ))
    ours = decode(decoder, image_embeds, negative, width=width, height=height, steps=5, guidance=guidance,
                  seeds=seeds, sampler=sampler)
    assert ours.shape == (batch, height, width, 3)
    assert torch.equal(ours, expected), (sampler, (ours - expected).abs().max())


@pytest.mark.parametrize("sampler", OTHERS)
def test_other_samplers_run_and_are_deterministic(decoder, embeds, sampler):
    a = decode(decoder, *embeds, width=64, height=64, steps=6, seeds=[1, 2, 3], sampler=sampler)
    b = decode(decoder, *embeds, width=64, height=64, steps=6, seeds=[1, 2, 3], sampler=sampler)
    c = decode(decoder, *embeds, width=64, height=64, steps=6, seeds=[4, 5, 6], sampler=sampler)
    assert a.shape == (3, 64, 64, 3) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.05


def test_samplers_give_different_pictures(decoder, embeds):
    outs = {s: decode(decoder, *embeds, width=64, height=64, steps=6, seeds=7, sampler=s) for s in SAMPLERS}
    for i, a in enumerate(SAMPLERS):
        for b in SAMPLERS[i + 1:]:
            assert not torch.equal(outs[a], outs[b]), (a, b)


def test_euler_input_is_scaled_each_step(decoder, embeds, monkeypatch):
    from diffusers import EulerAncestralDiscreteScheduler

    calls = []
    real = EulerAncestralDiscreteScheduler.scale_model_input

    def spy(self, sample, timestep):
        calls.append(sample.shape[0])
        return real(self, sample, timestep)

    monkeypatch.setattr(EulerAncestralDiscreteScheduler, "scale_model_input", spy)
    decode(decoder, *embeds, width=64, height=64, steps=4, guidance=4.0, sampler="euler_a")
    assert calls == [6, 6, 6, 6]  # CFG doubles the batch of 3


# -- seeds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batch_item_equals_single_seed_exactly(decoder, embeds, sampler, monkeypatch):
    """Starting noise and every step's noise (DDPM, Euler ancestral) of image i come from seed i alone."""
    captured = []
    real_decode = VQModel.decode

    def spy_decode(self, z, *args, **kwargs):
        captured.append(z.clone())
        return real_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(decoder.unet, "forward", _elementwise_unet)
    monkeypatch.setattr(VQModel, "decode", spy_decode)
    decode(decoder, *embeds, width=64, height=64, steps=5, seeds=[5, 6, 7], sampler=sampler)
    decode(decoder, embeds[0][1:2], embeds[1][1:2], width=64, height=64, steps=5, seeds=[6], sampler=sampler)
    batch_latents, single_latents = captured
    assert torch.equal(batch_latents[1], single_latents[0]), sampler
    assert not torch.equal(batch_latents[0], batch_latents[1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batch_item_equals_single_seed_real_unet(decoder, embeds, sampler):
    """With the real UNet, image i depends on its own embedding and seed only. Compared in batches of the same size
    (the other slots hold other embeddings and seeds): CPU BLAS rounding depends on the batch *size* (an image decoded
    alone differs by ~1e-3, more on some CPUs), never on the other rows' values, so this is exact on every machine.
    The noise of an image alone equals its noise in a batch exactly (test above)."""
    image_embeds, negative = embeds
    batch = decode(decoder, image_embeds, negative, width=64, height=64, steps=4, seeds=[5, 6, 7], sampler=sampler)
    order = [2, 1, 0]
    other = decode(decoder, image_embeds[order], negative[order], width=64, height=64, steps=4, seeds=[9, 6, 8],
                   sampler=sampler)
    assert torch.equal(batch[1], other[1]), sampler
    assert (batch[0] - other[0]).abs().max() > 0.05


# -- learned variance, preview, callback ----------------------------------------------------------------

def test_learned_variance_only_where_the_scheduler_reads_it(tiny_dir, tmp_path, decoder, embeds):
    """With a learned_range config the variance channels go to DDPM only; the other samplers drop them."""
    folder = tmp_path / "learned"
    shutil.copytree(tiny_dir, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["variance_type"] = "learned_range"
    cfg_path.write_text(json.dumps(cfg))
    learned = load_decoder(folder)
    for sampler in SAMPLERS:
        a = decode(learned, *embeds, width=64, height=64, steps=4, seeds=3, sampler=sampler)
        b = decode(decoder, *embeds, width=64, height=64, steps=4, seeds=3, sampler=sampler)
        assert torch.isfinite(a).all()
        assert torch.equal(a, b) == (sampler != "ddpm"), sampler


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "euler_a"])
def test_preview_every_step(decoder, embeds, sampler, monkeypatch):
    seen, progress = [], []
    final = []
    real_decode = VQModel.decode

    def spy_decode(self, z, *args, **kwargs):
        final.append(z.clone())
        return real_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(VQModel, "decode", spy_decode)
    decode(decoder, *embeds, width=64, height=128, steps=4, sampler=sampler,
           preview=lambda i, n, x: seen.append((i, n, x.clone())), callback=lambda i, n: progress.append((i, n)))
    assert [(i, n) for i, n, _ in seen] == progress == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert all(x.shape == (3, 4, 16, 8) for _, _, x in seen)
    if sampler == "dpmpp_2m":  # no x0 prediction in its output: the preview shows the current latents
        assert torch.equal(seen[-1][2], final[0])
    else:  # DDPM and Euler return pred_original_sample, a cleaner preview than the noisy latents
        assert not torch.equal(seen[0][2], final[0])


# -- img2img ----------------------------------------------------------------------------------------

def _img2img_pipe(decoder, sampler="ddpm"):
    pipe = KandinskyV22Img2ImgPipeline(unet=decoder.unet, scheduler=decoder.new_scheduler(sampler), movq=decoder.movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("strength,guidance", [(0.5, 4.0), (1.0, 4.0), (0.3, 1.0)])
def test_img2img_equals_pipeline_tensor(decoder, embeds, pictures, strength, guidance):
    seeds = [8, 9]
    expected = _images(_img2img_pipe(decoder)(
        image_embeds=embeds[0][:2], image=pictures[:2].permute(0, 3, 1, 2), negative_image_embeds=embeds[1][:2],
        width=64, height=64, num_inference_steps=10, guidance_scale=guidance, strength=strength,
        generator=_generators(seeds), output_type="np",
    ))
    ours = decode(decoder, embeds[0][:2], embeds[1][:2], width=64, height=64, steps=10, guidance=guidance,
                  seeds=seeds, init_image=pictures[:2], strength=strength)
    assert torch.equal(ours, expected), (strength, guidance, (ours - expected).abs().max())


def test_img2img_equals_pipeline_pil_resized(decoder, embeds, pictures):
    """PIL images of another size are resized exactly as the pipeline does (PIL bicubic, reducing_gap=1).

    Square output only: diffusers 0.42.1's img2img pipeline calls `preprocess(i, width, height)` against the
    signature (image, height, width), so for a non-square size it encodes the image transposed.
    """
    from PIL import Image

    pils = [Image.fromarray((p.numpy() * 255).round().astype("uint8")).resize((80, 40)) for p in pictures[:2]]
    expected = _images(_img2img_pipe(decoder)(
        image_embeds=embeds[0][:2], image=pils, negative_image_embeds=embeds[1][:2], width=64, height=64,
        num_inference_steps=6, guidance_scale=4.0, strength=0.7, generator=_generators([1, 2]), output_type="np",
    ))
    ours = decode(decoder, embeds[0][:2], embeds[1][:2], width=64, height=64, steps=6, guidance=4.0,
                  seeds=[1, 2], init_image=pils, strength=0.7)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_runs_the_last_steps(decoder, embeds, pictures, sampler, monkeypatch):
    unet_calls, progress = [], []
    real_forward = decoder.unet.forward

    def counting_forward(*args, **kwargs):
        unet_calls.append(kwargs["timestep"])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(decoder.unet, "forward", counting_forward)
    out = decode(decoder, *embeds, width=64, height=64, steps=10, seeds=1, init_image=pictures, strength=0.45,
                 sampler=sampler, callback=lambda i, n: progress.append((i, n)))
    monkeypatch.undo()
    scheduler = decoder.new_scheduler(sampler)
    scheduler.set_timesteps(10)
    assert len(unet_calls) == 4 and progress[-1] == (3, 4)
    assert [float(t) for t in unet_calls] == [float(t) for t in scheduler.timesteps[-4:]]
    again = decode(decoder, *embeds, width=64, height=64, steps=10, seeds=1, init_image=pictures, strength=0.45,
                   sampler=sampler)
    assert torch.isfinite(out).all() and torch.equal(out, again)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "dpmpp_2m"])
def test_low_strength_stays_near_the_image(decoder, embeds, pictures, sampler):
    with torch.no_grad():
        latents = decoder.movq.encode(pictures.permute(0, 3, 1, 2) * 2 - 1).latents
        recon = (decoder.movq.decode(latents, force_not_quantize=True).sample * 0.5 + 0.5).clamp(0, 1)
    recon = recon.permute(0, 2, 3, 1)
    near = decode(decoder, *embeds, width=64, height=64, steps=20, seeds=0, init_image=pictures, strength=0.05,
                  sampler=sampler)
    far = decode(decoder, *embeds, width=64, height=64, steps=20, seeds=0, init_image=pictures, strength=1.0,
                 sampler=sampler)
    assert (near - recon).abs().mean() < 0.5 * (far - recon).abs().mean(), sampler


def test_one_init_image_for_the_whole_batch(decoder, embeds, pictures):
    one = decode(decoder, *embeds, width=64, height=64, steps=4, seeds=[1, 2, 3], init_image=pictures[:1], strength=0.6)
    each = decode(decoder, *embeds, width=64, height=64, steps=4, seeds=[1, 2, 3],
                  init_image=pictures[:1].expand(3, -1, -1, -1), strength=0.6)
    assert (one - each).abs().max() < 1e-4  # the same up to batch-size-dependent BLAS rounding in the MoVQ encoder


def test_img2img_tensor_resize(decoder, embeds, pictures):
    big = torch.nn.functional.interpolate(pictures.permute(0, 3, 1, 2), size=(96, 160), mode="bilinear").permute(0, 2, 3, 1)
    out = decode(decoder, *embeds, width=128, height=64, steps=3, seeds=0, init_image=big, strength=0.5)
    assert out.shape == (3, 64, 128, 3) and torch.isfinite(out).all()


def test_bad_strength_and_init_image(decoder, embeds, pictures):
    for strength in (0, -0.5, 1.5, float("nan"), "0.5", True):
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            decode(decoder, *embeds, width=64, height=64, steps=4, init_image=pictures, strength=strength)
    with pytest.raises(InputError, match=r"\(0, 1\]"):  # checked without an image too
        decode(decoder, *embeds, width=64, height=64, steps=4, strength=2.0)
    with pytest.raises(InputError, match="no denoising step"):
        decode(decoder, *embeds, width=64, height=64, steps=3, init_image=pictures, strength=0.2)
    with pytest.raises(InputError, match="1 .* or 3"):
        decode(decoder, *embeds, width=64, height=64, steps=4, init_image=pictures[:2], strength=0.5)
    with pytest.raises(InputError, match="0..1"):
        decode(decoder, *embeds, width=64, height=64, steps=4, init_image=pictures * 255, strength=0.5)
    with pytest.raises(InputError, match=r"\[batch, height, width, 3\]"):
        decode(decoder, *embeds, width=64, height=64, steps=4, init_image=pictures.permute(0, 3, 1, 2), strength=0.5)
    with pytest.raises(InputError, match="PIL image"):
        decode(decoder, *embeds, width=64, height=64, steps=4, init_image="cat.png", strength=0.5)
