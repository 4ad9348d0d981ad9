"""core.decoder_files: single-file UNet/MoVQ loading, shipped configs, sniffing and wrong-file messages (CPU, offline)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lambda_eclipse.core import decoder_files
from lambda_eclipse.core.decoder import (
    DECODER_URL,
    decode,
    load_decoder,
    load_decoder_files,
    save_decoder_files,
    sniff_decoder_file,
)
from lambda_eclipse.core.decoder_files import CONFIG_DIR, shipped_config
from lambda_eclipse.core.errors import InputError, MissingModelsError, ModelFileError
from lambda_eclipse.core.tiny import (
    TINY_EMBED,
    TINY_MOVQ_CONFIG,
    TINY_UNET_CONFIG,
    write_tiny_decoder,
    write_tiny_prior,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel  # noqa: E402

UNET_PARAMS = 1_253_057_288
MOVQ_PARAMS = 67_832_495


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("models") / "kandinsky-2-2-decoder", seed=0)


@pytest.fixture(scope="module")
def decoder(tiny_dir):
    return load_decoder(tiny_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, decoder):
    """The tiny decoder as ComfyUI single files: models/diffusion_models + models/vae."""
    root = tmp_path_factory.mktemp("comfy")
    unet, movq = save_decoder_files(
        decoder, root / "diffusion_models" / "k22_unet.safetensors", root / "vae" / "k22_movq.safetensors"
    )
    return unet, movq


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2, TINY_EMBED, generator=g), torch.randn(2, TINY_EMBED, generator=g)


def _same_weights(a, b, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        x, y = sa[key], sb[key]
        if dtype is not None:
            assert x.dtype == dtype
        assert x.dtype == y.dtype and torch.equal(x, y), key


def _fake_file(path, keys, metadata=None):
    """A safetensors file with the given key → shape table (values do not matter for sniffing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path), metadata=metadata)
    return path


def _header_of(model) -> dict:
    return {k: ("F32", tuple(v.shape)) for k, v in model.state_dict().items()}


# -- shipped configs -----------------------------------------------------------------------------

def test_shipped_configs_have_the_published_sizes():
    unet_config, movq_config = shipped_config("unet"), shipped_config("movq")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        movq = VQModel.from_config(movq_config)
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMS
    assert sum(p.numel() for p in movq.parameters()) == MOVQ_PARAMS
    assert unet_config["encoder_hid_dim"] == 1280 and unet_config["block_out_channels"] == [384, 768, 1152, 1536]
    assert movq_config["num_vq_embeddings"] == 16384 and movq_config["norm_type"] == "spatial"
    # The shipped configs are what sniffing expects a real file to look like.
    assert decoder_files._classify(_header_of(unet))[0] == "unet"
    assert decoder_files._classify(_header_of(movq))[0] == "movq"


def test_shipped_scheduler_config():
    config = shipped_config("scheduler")
    scheduler = diffusers.DDPMScheduler.from_config(config)
    assert config["_class_name"] == "DDPMScheduler"
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule) == (0.00085, 0.012, "linear")
    assert scheduler.config.variance_type == "fixed_small" and scheduler.config.steps_offset == 1
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.prediction_type == "epsilon"
    assert shipped_config("scheduler") is not config  # a fresh copy each time
    assert sorted(p.name for p in CONFIG_DIR.iterdir()) == ["movq_config.json", "scheduler_config.json", "unet_config.json"]


# -- round trips -----------------------------------------------------------------------------------

def test_folder_load_equals_diffusers_from_pretrained(tiny_dir, decoder):
    for name, cls in (("unet", UNet2DConditionModel), ("movq", VQModel)):
        reference = cls.from_pretrained(str(tiny_dir / name), local_files_only=True)
        _same_weights(getattr(decoder, name), reference, torch.float32)
    half = load_decoder(tiny_dir, dtype="fp16")
    _same_weights(half.unet, UNet2DConditionModel.from_pretrained(str(tiny_dir / "unet"), torch_dtype=torch.float16), torch.float16)


def test_single_files_round_trip_fp32(files, decoder, embeds):
    unet_path, movq_path = files
    with safe_open(str(unet_path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["config"])["_class_name"] == "UNet2DConditionModel"
    assert json.loads(metadata["scheduler_config"]) == json.loads(json.dumps(decoder.scheduler_config))
    loaded = load_decoder_files(unet_path, movq_path)
    _same_weights(loaded.unet, decoder.unet, torch.float32)
    _same_weights(loaded.movq, decoder.movq, torch.float32)
    assert dict(loaded.unet.config) == dict(decoder.unet.config)
    assert loaded.scheduler_config == decoder.scheduler_config
    assert not loaded.unet.training and not loaded.movq.training
    a = decode(loaded, *embeds, width=64, height=64, steps=3, seeds=[1, 2])
    b = decode(decoder, *embeds, width=64, height=64, steps=3, seeds=[1, 2])
    assert torch.equal(a, b)
    assert not list(unet_path.parent.glob("*.tmp"))


def test_single_files_fp16(tmp_path, decoder, tiny_dir):
    unet_path, movq_path = save_decoder_files(decoder, tmp_path / "u.fp16.safetensors", tmp_path / "m.safetensors", dtype="fp16")
    with safe_open(str(unet_path), framework="pt") as handle:
        assert handle.get_tensor("conv_in.weight").dtype == torch.float16
    half = load_decoder_files(unet_path, movq_path, dtype="fp16")
    _same_weights(half.unet, load_decoder(tiny_dir, dtype="fp16").unet, torch.float16)
    assert half.movq.dtype == torch.float16
    # An fp16 file read in fp32: the fp16 values, widened.
    wide = load_decoder_files(unet_path, movq_path, dtype="fp32")
    assert wide.dtype == torch.float32
    assert torch.equal(wide.unet.conv_in.weight, decoder.unet.conv_in.weight.half().float())
    # And an fp32 file read in bf16.
    bf16 = load_decoder_files(*save_decoder_files(decoder, tmp_path / "u32.safetensors", tmp_path / "m32.safetensors"), dtype="bf16")
    assert bf16.unet.dtype == bf16.movq.dtype == torch.bfloat16


def test_loaded_weights_do_not_follow_the_file(tmp_path, decoder):
    """The model owns its tensors: rewriting the file in place (a re-download) does not change it."""
    unet_path, movq_path = save_decoder_files(decoder, tmp_path / "u.safetensors", tmp_path / "m.safetensors")
    loaded = load_decoder_files(unet_path, movq_path)
    before = loaded.unet.conv_in.weight.clone()
    size = unet_path.stat().st_size
    with open(unet_path, "r+b") as handle:
        header = 8 + int.from_bytes(handle.read(8), "little")
        handle.seek(header)
        handle.write(b"\0" * (size - header))
    assert torch.equal(loaded.unet.conv_in.weight, before)


def test_metadata_config_overrides_the_shipped_config(files, tmp_path, decoder):
    unet_path, movq_path = files
    loaded = load_decoder_files(unet_path, movq_path)
    assert loaded.unet.config.block_out_channels == tuple(TINY_UNET_CONFIG["block_out_channels"]) or \
        list(loaded.unet.config.block_out_channels) == list(TINY_UNET_CONFIG["block_out_channels"])
    assert loaded.embedding_dim == TINY_EMBED
    # Without the metadata the shipped (published-size) config is used, and the tiny tensors do not fit it.
    bare = tmp_path / "bare_unet.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.unet.state_dict().items()}, str(bare))
    with pytest.raises(ModelFileError, match="shipped kandinsky-2-2-decoder unet config") as info:
        load_decoder_files(bare, movq_path)
    assert "metadata key 'config'" in str(info.value) and "another shape" in str(info.value)
    # A metadata config that does not describe the tensors.
    wrong = json.loads(json.dumps(dict(TINY_UNET_CONFIG)))
    wrong["layers_per_block"] = 2
    lying = tmp_path / "lying_unet.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.unet.state_dict().items()}, str(lying), metadata={"config": json.dumps(wrong)})
    with pytest.raises(ModelFileError, match="re-export"):
        load_decoder_files(lying, movq_path)
    broken = tmp_path / "broken_meta.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.unet.state_dict().items()}, str(broken), metadata={"config": "{nope"})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_decoder_files(broken, movq_path)


def test_real_size_movq_file_uses_the_shipped_config(files, tmp_path):
    """A published-size MoVQ file without metadata (as downloaded) loads through the shipped config."""
    torch.manual_seed(0)
    movq = VQModel.from_config(shipped_config("movq"))
    path = tmp_path / "vae" / "kandinsky_movq.safetensors"
    path.parent.mkdir()
    save_file({k: v.half().contiguous() for k, v in movq.state_dict().items()}, str(path))
    assert sniff_decoder_file(path) == "movq"
    loaded = load_decoder_files(files[0], path)
    assert sum(p.numel() for p in loaded.movq.parameters()) == MOVQ_PARAMS
    assert torch.equal(loaded.movq.quantize.embedding.weight, movq.quantize.embedding.weight.half().float())


def test_old_attention_names_are_renamed(tmp_path, decoder, files):
    """MoVQ files saved before diffusers renamed query/key/value/proj_attn load like from_pretrained."""
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    tensors = {}
    for key, value in decoder.movq.state_dict().items():
        if ".attentions." in key:
            for new, old in old_names.items():
                key = key.replace(new, old)
        tensors[key] = value.contiguous()
    assert any(".query." in k for k in tensors)
    path = tmp_path / "old_movq.safetensors"
    save_file(tensors, str(path), metadata={"config": json.dumps(dict(TINY_MOVQ_CONFIG))})
    loaded = load_decoder_files(files[0], path)
    _same_weights(loaded.movq, decoder.movq)


def test_scheduler_config_choices(files, tmp_path, decoder):
    unet_path, movq_path = files
    ddim = dict(decoder.scheduler_config, _class_name="DDIMScheduler")
    assert isinstance(load_decoder_files(unet_path, movq_path, scheduler_config=ddim).new_scheduler(), DDIMScheduler)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(ddim))
    assert load_decoder_files(unet_path, movq_path, scheduler_config=tmp_path).scheduler_config["_class_name"] == "DDIMScheduler"
    assert load_decoder_files(
        unet_path, movq_path, scheduler_config=tmp_path / "scheduler" / "scheduler_config.json"
    ).scheduler_config["_class_name"] == "DDIMScheduler"
    # No scheduler metadata: the shipped (published) DDPM config.
    bare_meta = tmp_path / "unet_no_sched.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.unet.state_dict().items()}, str(bare_meta),
              metadata={"config": json.dumps(json.loads(decoder.unet.to_json_string()))})
    assert load_decoder_files(bare_meta, movq_path).scheduler_config == shipped_config("scheduler")
    with pytest.raises(ModelFileError, match="NoSuchScheduler"):
        load_decoder_files(unet_path, movq_path, scheduler_config={"_class_name": "NoSuchScheduler"})


# -- low memory, no warnings -----------------------------------------------------------------------

@pytest.mark.parametrize("accelerate", [True, False], ids=["accelerate", "no-accelerate"])
def test_models_are_built_with_empty_weights(accelerate, monkeypatch):
    if not accelerate:
        monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate → ImportError
    model = decoder_files._empty_model(UNet2DConditionModel, shipped_config("unet"), "UNet", "test")
    assert all(p.is_meta for p in model.parameters())


def test_loading_prints_no_warning(tiny_dir, files, tmp_path, caplog, capfd, monkeypatch):
    bin_dir = tmp_path / "bin_decoder"
    shutil.copytree(tiny_dir, bin_dir)
    for name, cls in (("unet", UNet2DConditionModel), ("movq", VQModel)):  # .bin weights: diffusers' own loader
        model = cls.from_pretrained(str(tiny_dir / name))
        (bin_dir / name / "diffusion_pytorch_model.safetensors").unlink()
        model.save_pretrained(str(bin_dir / name), safe_serialization=False)
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        load_decoder(tiny_dir)
        load_decoder(tiny_dir, dtype="fp16")
        load_decoder_files(*files)
        load_decoder_files(*files, dtype="fp16")
        from_bin = load_decoder(bin_dir)
        # Without accelerate, diffusers would warn "install accelerate" unless told low_cpu_mem_usage=False.
        import diffusers.models.modeling_utils as modeling_utils
        import diffusers.utils as diffusers_utils

        monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
        monkeypatch.setattr(diffusers_utils, "is_accelerate_available", lambda: False)
        monkeypatch.setitem(sys.modules, "accelerate", None)
        load_decoder(bin_dir)
        load_decoder_files(*files)
    out, err = capfd.readouterr()
    assert "accelerate" not in (out + err).lower() and "warn" not in (out + err).lower()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING or "accelerate" in r.getMessage().lower()]
    assert not problems, [r.getMessage() for r in problems]
    _same_weights(from_bin.unet, load_decoder(tiny_dir).unet)


# -- sniffing --------------------------------------------------------------------------------------

def test_sniff_unet_and_movq(files):
    assert sniff_decoder_file(files[0]) == "unet"
    assert sniff_decoder_file(files[1]) == "movq"


def _tiny_unet_file(path, **changes):
    config = dict(TINY_UNET_CONFIG, **changes)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": json.dumps(json.loads(model.to_json_string()))})
    return path


WRONG_FILES = {
    "sd_vae_original": ({"encoder.down.0.block.0.conv1.weight": (8, 3, 3, 3), "decoder.up.0.block.0.conv1.weight": (8, 8, 3, 3),
                         "quant_conv.weight": (8, 8, 1, 1), "encoder.conv_in.weight": (8, 3, 3, 3)}, "Stable Diffusion/SDXL-style VAE"),
    "sdxl_unet_original": ({"input_blocks.0.0.weight": (8, 4, 3, 3), "output_blocks.0.0.in_layers.0.weight": (8,),
                            "label_emb.0.0.weight": (8, 16), "time_embed.0.weight": (8, 8)}, "SDXL UNet in ComfyUI's original key format"),
    "sd15_checkpoint": ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
                         "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (8, 8)}, "full Stable Diffusion checkpoint"),
    "clip_vision": ({"vision_model.embeddings.patch_embedding.weight": (8, 3, 14, 14), "visual_projection.weight": (8, 8)}, "CLIP"),
    "unknown": ({"foo.weight": (2, 2)}, "not a Kandinsky 2.2 decoder UNet or MoVQ"),
}


@pytest.mark.parametrize("name", sorted(WRONG_FILES))
def test_sniff_names_other_files(tmp_path, name):
    keys, expected = WRONG_FILES[name]
    path = _fake_file(tmp_path / f"{name}.safetensors", keys)
    with pytest.raises(ModelFileError, match=expected) as info:
        sniff_decoder_file(path)
    assert DECODER_URL in str(info.value) or "diffusion_pytorch_model" in str(info.value)


def test_sniff_real_model_kinds(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
    vae_path = tmp_path / "sd_vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_path))
    with pytest.raises(ModelFileError, match="VAE .*diffusers format.*not a Stable Diffusion VAE"):
        sniff_decoder_file(vae_path)
    prior = write_tiny_prior(tmp_path / "prior.safetensors", single_file=True)
    with pytest.raises(ModelFileError, match="λ-ECLIPSE prior"):
        sniff_decoder_file(prior)
    with pytest.raises(ModelFileError, match="Kandinsky 2.1"):
        sniff_decoder_file(_tiny_unet_file(tmp_path / "k21.safetensors", encoder_hid_dim_type="text_image_proj",
                                           addition_embed_type="text_image", encoder_hid_dim=TINY_EMBED))
    with pytest.raises(ModelFileError, match="inpainting"):
        sniff_decoder_file(_tiny_unet_file(tmp_path / "inpaint.safetensors", in_channels=9))
    with pytest.raises(ModelFileError, match="ControlNet-depth"):
        sniff_decoder_file(_tiny_unet_file(tmp_path / "depth.safetensors", in_channels=8, addition_embed_type="image_hint"))
    sd = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    sd_path = tmp_path / "sd_unet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.state_dict().items()}, str(sd_path))
    with pytest.raises(ModelFileError, match="Stable Diffusion UNet"):
        sniff_decoder_file(sd_path)


def test_sniff_unreadable_and_wrong_type(tmp_path, files):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="could not be read"):
        sniff_decoder_file(junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        sniff_decoder_file(cut)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"\.safetensors only"):
        sniff_decoder_file(ckpt)
    with pytest.raises(MissingModelsError):
        sniff_decoder_file(tmp_path / "absent.safetensors")


def test_sniff_is_cached_by_mtime_and_size(tmp_path, files):
    path = tmp_path / "unet.safetensors"
    shutil.copy(files[0], path)
    decoder_files._header_cached.cache_clear()
    assert sniff_decoder_file(path) == "unet"
    assert sniff_decoder_file(path) == "unet"
    info = decoder_files._header_cached.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    shutil.copy(files[1], path)  # another file under the same name
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert sniff_decoder_file(path) == "movq"
    assert decoder_files._header_cached.cache_info().misses == 2


# -- wrong files in load_decoder_files -------------------------------------------------------------

def test_swapped_pair(files):
    with pytest.raises(ModelFileError, match="swapped"):
        load_decoder_files(files[1], files[0])


def test_same_kind_in_both_slots(files):
    with pytest.raises(ModelFileError, match="given as the UNet but it is the Kandinsky MoVQ"):
        load_decoder_files(files[1], files[1])
    with pytest.raises(ModelFileError, match="given as the MoVQ but it is the Kandinsky 2.2 decoder UNet"):
        load_decoder_files(files[0], files[0])


def test_sd_vae_in_the_movq_slot(tmp_path, files):
    keys, _ = WRONG_FILES["sd_vae_original"]
    vae = _fake_file(tmp_path / "vae" / "sdxl_vae.safetensors", keys)
    with pytest.raises(ModelFileError, match="Given as the MoVQ: sdxl_vae.safetensors is a Stable Diffusion/SDXL-style VAE") as info:
        load_decoder_files(files[0], vae)
    assert "movq/diffusion_pytorch_model.safetensors" in str(info.value)


def test_sdxl_unet_in_the_unet_slot(tmp_path, files):
    keys, _ = WRONG_FILES["sdxl_unet_original"]
    sdxl = _fake_file(tmp_path / "sdxl.safetensors", keys)
    with pytest.raises(ModelFileError, match="Given as the UNet: .*SDXL UNet in ComfyUI's original key format") as info:
        load_decoder_files(sdxl, files[1])
    assert "models/diffusion_models" in str(info.value)


def test_inpainting_unet_in_the_unet_slot(tmp_path, files):
    path = _tiny_unet_file(tmp_path / "k22_inpaint.safetensors", in_channels=9)
    with pytest.raises(ModelFileError, match="inpainting decoder"):
        load_decoder_files(path, files[1])


def test_missing_files_and_folders(tmp_path, files, tiny_dir):
    with pytest.raises(MissingModelsError, match="models/diffusion_models") as info:
        load_decoder_files(tmp_path / "nope.safetensors", files[1])
    assert "unet/diffusion_pytorch_model.safetensors" in str(info.value)
    with pytest.raises(MissingModelsError, match="models/vae"):
        load_decoder_files(files[0], tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="is a folder.*load_decoder"):
        load_decoder_files(tiny_dir, files[1])
    with pytest.raises(ModelFileError, match="load_decoder_files"):
        load_decoder(files[0])


def test_folder_config_that_does_not_fit_its_weights(tiny_dir, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["layers_per_block"] = 2
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="config.json does not describe its weights") as info:
        load_decoder(folder)
    assert "missing" in str(info.value) and DECODER_URL in str(info.value)


def test_save_arguments(tmp_path, decoder):
    with pytest.raises(InputError, match="two different"):
        save_decoder_files(decoder, tmp_path / "a.safetensors", tmp_path / "a.safetensors")
    with pytest.raises(InputError, match=".safetensors"):
        save_decoder_files(decoder, tmp_path / "a.ckpt", tmp_path / "b.safetensors")
