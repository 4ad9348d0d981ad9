"""bigG towers from the files users have: every format, checked against transformers' own CLIP forward.

A tiny transformers CLIPModel (random weights, gelu, 2 heads / 3 heads of 16, 2 layers, an asymmetric text
projection) is saved in each format in fp32 and fp16 and loaded through the real loaders. Files with bigG's
real shapes are written as a header plus a sparse hole (only headers are read by `sniff_clip`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from lambda_eclipse.core import clip_formats
from lambda_eclipse.core.clip import load_clip, load_clip_towers
from lambda_eclipse.core.clip_formats import SDXL_TEXT_PREFIX, open_source, sniff_clip
from lambda_eclipse.core.errors import ModelFileError

transformers = pytest.importorskip("transformers")

PROMPTS = ["a cat wearing glasses at a park", "a dog", "a very very very long prompt about a red car on a road"]
TEXT_CFG = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=49408,
                max_position_embeddings=77, hidden_act="gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=0,
                projection_dim=32)
VISION_CFG = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=96, image_size=224,
                  patch_size=32, hidden_act="gelu", projection_dim=32)
# The same architecture as an open_clip model_cfg (for OpenCLIP-key files and folders).
OPENCLIP_CFG = {"embed_dim": 32,
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
                "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 48, "head_width": 16, "layers": 2, "mlp_ratio": 2.0}}


# ---------------------------------------------------------------------------------------------------------
# The reference: transformers models with random weights
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    """{'clip': CLIPModel, 'text': CLIPTextModelWithProjection, 'vision': CLIPVisionModelWithProjection} (fp32, same weights)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    config = CLIPConfig(text_config=TEXT_CFG, vision_config=VISION_CFG, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(config).eval()
        with torch.no_grad():
            for name, param in clip.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.normal_(1.0, 0.1)  # LayerNorm scales around 1
                else:
                    param.normal_(0.0, 0.3 if param.ndim < 2 else 0.08)
    proj = clip.text_projection.weight
    assert not torch.allclose(proj, proj.T, atol=1e-3), "the square text projection must be asymmetric"
    sd = clip.state_dict()
    text = CLIPTextModelWithProjection(config.text_config).eval()
    text.load_state_dict({k: v for k, v in sd.items() if k.startswith("text_model.") or k == "text_projection.weight"})
    vision = CLIPVisionModelWithProjection(config.vision_config).eval()
    vision.load_state_dict({k: v for k, v in sd.items() if k.startswith("vision_model.") or k == "visual_projection.weight"})
    return {"clip": clip, "text": text, "vision": vision}


def rounded(model, dtype):
    """A copy of a transformers model with its weights rounded to `dtype` (computing in fp32)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


def tower_sd(model, tower):
    sd = model.state_dict()
    keep = ("text_model.", "text_projection.weight") if tower == "text" else ("vision_model.", "visual_projection.weight")
    return {k: v.contiguous() for k, v in sd.items() if k.startswith(keep) and "position_ids" not in k}


def to_openclip(sd, text_prefix="", vision_prefix="visual."):
    """transformers keys → OpenCLIP keys, written out independently of the library (models_notes.md)."""
    out, qkv = {}, {}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out[text_prefix + "text_projection"] = value.T.contiguous()
            continue
        if key == "visual_projection.weight":
            out[vision_prefix + "proj"] = value.T.contiguous()
            continue
        m = re.match(r"(text|vision)_model\.(.*)", key)
        if not m:
            continue
        prefix, rest = (text_prefix, m.group(2)) if m.group(1) == "text" else (vision_prefix, m.group(2))
        layer = re.match(r"encoder\.layers\.(\d+)\.(.*)", rest)
        if layer:
            i, name = layer.groups()
            block = f"{prefix}transformer.resblocks.{i}."
            qkv_m = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", name)
            if qkv_m:
                qkv.setdefault((block, qkv_m.group(2)), {})[qkv_m.group(1)] = value
                continue
            name = (name.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[block + name] = value
            continue
        rename = {
            "embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
            "embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
            "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
            "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
        }
        out[prefix + rename[rest]] = value
    for (block, kind), parts in qkv.items():
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def cast(sd, dtype):
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def hf_config_json(tower):
    from transformers import CLIPTextConfig, CLIPVisionConfig

    return (CLIPTextConfig(**TEXT_CFG) if tower == "text" else CLIPVisionConfig(**VISION_CFG)).to_json_string()


# ---------------------------------------------------------------------------------------------------------
# Writers: one per format; each returns (text_path, vision_path)
# ---------------------------------------------------------------------------------------------------------

def write_hf_files(hf, root, dtype):
    out = []
    for tower in ("text", "vision"):
        path = root / f"clip_{tower}.safetensors"
        save_file(cast(tower_sd(hf[tower], tower), dtype), str(path), metadata={"config": hf_config_json(tower)})
        out.append(path)
    return tuple(out)


def write_openclip_file(hf, root, dtype):
    sd = to_openclip({**tower_sd(hf["text"], "text"), **tower_sd(hf["vision"], "vision")})
    path = root / "open_clip_both.safetensors"
    save_file(cast(sd, dtype), str(path), metadata={"config": json.dumps({"model_cfg": OPENCLIP_CFG})})
    return path, path


def write_openclip_vision_only_and_text_file(hf, root, dtype):
    """Vision alone in OpenCLIP keys (one tower) + text in OpenCLIP keys in a .bin (weights-only torch file)."""
    vision = root / "open_clip_vision.safetensors"
    save_file(cast(to_openclip(tower_sd(hf["vision"], "vision")), dtype), str(vision),
              metadata={"config": json.dumps({"model_cfg": OPENCLIP_CFG})})
    text = root / "open_clip_text.bin"
    torch.save(cast(to_openclip(tower_sd(hf["text"], "text")), dtype), str(text))
    # A .bin has no metadata: its width-32 text tower needs heads from somewhere → keep it in a folder with a config.
    folder = root / "oc_text"
    folder.mkdir()
    shutil.move(str(text), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPENCLIP_CFG}))
    return folder, vision


def junk_unet_vae(dtype):
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3).to(dtype),
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3).to(dtype),
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3).to(dtype),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3).to(dtype),
    }


def sdxl_checkpoint_tensors(hf, dtype):
    text = to_openclip(tower_sd(hf["text"], "text"), text_prefix=SDXL_TEXT_PREFIX)
    return {**cast(text, dtype), **junk_unet_vae(dtype)}


def write_sdxl_checkpoint(hf, root, dtype):
    path = root / "sd_xl_fake.safetensors"
    save_file(sdxl_checkpoint_tensors(hf, dtype), str(path), metadata={"config": json.dumps({"model_cfg": OPENCLIP_CFG})})
    vision, = [p for p in write_hf_files(hf, root, dtype) if "vision" in p.name]
    return path, vision


def write_hf_folders(hf, root, dtype):
    """text_encoder/ as model(.fp16).safetensors; image_encoder/ sharded (2 safetensors shards + index)."""
    text_dir, vision_dir = root / "text_encoder", root / "image_encoder"
    hf["text"].config.save_pretrained(text_dir)
    name = "model.safetensors" if dtype == torch.float32 else "model.fp16.safetensors"
    save_file(cast(tower_sd(hf["text"], "text"), dtype), str(text_dir / name), metadata={"format": "pt"})
    hf["vision"].config.save_pretrained(vision_dir)
    write_shards(cast(tower_sd(hf["vision"], "vision"), dtype), vision_dir, "model", "safetensors")
    return text_dir, vision_dir


def write_shards(sd, folder, stem, ext):
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"{stem}-0000{i}-of-00002.{ext}"
        tensors = {k: sd[k] for k in part}
        if ext == "safetensors":
            save_file(tensors, str(folder / name))
        else:
            torch.save(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_clipmodel_bin_folder(hf, root, dtype):
    """laion's layout: a CLIPModel folder with two .bin shards (both towers from one path)."""
    folder = root / "laion_hf"
    hf["clip"].config.save_pretrained(folder)
    sd = {k: v for k, v in hf["clip"].state_dict().items() if "position_ids" not in k}
    write_shards(cast(sd, dtype), folder, "pytorch_model", "bin")
    return folder, folder


def write_openclip_folder(hf, root, dtype):
    folder = root / "openclip_folder"
    folder.mkdir()
    sd = to_openclip({**tower_sd(hf["text"], "text"), **tower_sd(hf["vision"], "vision")})
    sd["logit_scale"] = torch.tensor(4.6)
    save_file(cast(sd, dtype), str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPENCLIP_CFG, "preprocess_cfg": {}}))
    return folder, folder


def write_diffusers_folder(hf, root, dtype):
    """The Kandinsky 2.2 prior repo's layout: model_index.json + text_encoder/ + image_encoder/."""
    folder = root / "kandinsky-2-2-prior"
    folder.mkdir()
    write_hf_folders(hf, folder, dtype)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22PriorPipeline"}))
    return folder, folder


FORMATS = {
    "transformers_files": write_hf_files,
    "openclip_file_both_towers": write_openclip_file,
    "openclip_one_tower_files": write_openclip_vision_only_and_text_file,
    "sdxl_checkpoint_text": write_sdxl_checkpoint,
    "transformers_folders_sharded": write_hf_folders,
    "clipmodel_folder_bin_shards": write_clipmodel_bin_folder,
    "openclip_folder": write_openclip_folder,
    "diffusers_folder": write_diffusers_folder,
}


# ---------------------------------------------------------------------------------------------------------
# Every format, fp32 and fp16 files, against transformers
# ---------------------------------------------------------------------------------------------------------

def compare_with_transformers(encoder, hf_text, hf_vision, tol=1e-4):
    feats = encoder.encode_text(PROMPTS)
    with torch.no_grad():
        ref = hf_text(input_ids=feats.ids)
    real = feats.mask  # SOT..EOT
    assert (feats.tokens - ref.last_hidden_state)[real].abs().max() <= tol
    assert (feats.pooled - ref.text_embeds).abs().max() <= tol
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_image = hf_vision(pixel_values=pixels).image_embeds
        ref_blank = hf_vision(pixel_values=torch.zeros(1, 3, 224, 224)).image_embeds[0]
    assert (encoder.encode_pixels(pixels) - ref_image).abs().max() <= tol
    blank = encoder.blank_embedding()
    assert blank.device.type == "cpu" and blank.dtype == torch.float32
    assert (blank - ref_blank).abs().max() <= tol


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_matches_transformers(hf, tmp_path, fmt, file_dtype):
    text_path, vision_path = FORMATS[fmt](hf, tmp_path, file_dtype)
    encoder = (load_clip(text_path) if text_path == vision_path
               else load_clip_towers(text=text_path, vision=vision_path))
    assert encoder.dtype == torch.float32 and encoder.embed_dim == 32 and encoder.context_length == 77
    hf_text, hf_vision = hf["text"], hf["vision"]
    if file_dtype != torch.float32:
        hf_text, hf_vision = rounded(hf_text, file_dtype), rounded(hf_vision, file_dtype)
    compare_with_transformers(encoder, hf_text, hf_vision)
    assert encoder.sources == {"text": str(text_path), "vision": str(vision_path)}
    assert str(text_path) in encoder.describe()


def test_openclip_folder_with_a_config_beyond_plain_clip_goes_through_open_clip(hf, tmp_path):
    folder, _ = write_openclip_folder(hf, tmp_path, torch.float32)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["pad_id"] = 0  # a key the meta-device path does not handle: open_clip loads it
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    assert open_source(folder).model_cfg is not None
    compare_with_transformers(load_clip(folder), hf["text"], hf["vision"])


def test_bf16_file_and_fp16_target(hf, tmp_path):
    text, vision = write_hf_files(hf, tmp_path, torch.bfloat16)
    encoder = load_clip_towers(text=text, vision=vision)
    compare_with_transformers(encoder, rounded(hf["text"], torch.bfloat16), rounded(hf["vision"], torch.bfloat16))
    half = load_clip_towers(text=text, vision=vision, dtype="fp16")
    assert half.dtype == torch.float16 and half.model.visual.conv1.weight.dtype == torch.float16
    # The blank is computed at load (block by block in fp32 on a CPU) and kept as fp32 on the CPU.
    assert half.blank_embedding().dtype == torch.float32
    assert torch.allclose(half.blank_embedding(), encoder.blank_embedding(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(half.encode_text("a dog").pooled, encoder.encode_text("a dog").pooled, atol=3e-2, rtol=3e-2)
    for p in half.model.visual.parameters():  # the fp32 detour left every weight in fp16, unchanged
        assert p.dtype == torch.float16


def test_text_projection_is_transposed_exactly(hf, tmp_path):
    text, _ = write_hf_files(hf, tmp_path, torch.float32)
    encoder = load_clip_towers(text=text)
    proj = hf["text"].text_projection.weight
    assert torch.equal(encoder.model.text_projection, proj.T)
    assert not torch.allclose(encoder.model.text_projection, proj, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# SDXL checkpoint: only the text tower's tensors are read
# ---------------------------------------------------------------------------------------------------------

def test_sdxl_checkpoint_reads_only_the_text_tower(hf, tmp_path, monkeypatch):
    path, _ = write_sdxl_checkpoint(hf, tmp_path, torch.float16)
    read: list[str] = []
    real = clip_formats.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(clip_formats, "safe_open", Recording)
    info = sniff_clip(path)
    assert read == []  # the header alone
    assert info.towers == {"text"} and info.format == "sdxl-checkpoint" and info.dtype == "fp16"
    encoder = load_clip_towers(text=path)
    text_keys = {k for k in sdxl_checkpoint_tensors(hf, torch.float16) if k.startswith(SDXL_TEXT_PREFIX)}
    assert read and all(k.startswith(SDXL_TEXT_PREFIX) for k in read)
    assert set(read) == text_keys and len(read) == len(text_keys)  # each once, nothing else
    assert not encoder.has_vision


# ---------------------------------------------------------------------------------------------------------
# Headers with bigG's real shapes (sparse files): detection, heads, refusals
# ---------------------------------------------------------------------------------------------------------

def write_header_only(path, shapes: dict[str, tuple], dtype="F16", metadata=None):
    """A valid .safetensors header for `shapes`, the data a sparse hole (no disk used)."""
    size = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = size
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def hf_text_shapes(width, layers, mlp, vocab=49408, context=77, proj=True, prefix=""):
    b = prefix + "text_model."
    out = {b + "embeddings.token_embedding.weight": (vocab, width), b + "embeddings.position_embedding.weight": (context, width)}
    for i in range(layers):
        layer = f"{b}encoder.layers.{i}."
        for x in "qkv":
            out[f"{layer}self_attn.{x}_proj.weight"], out[f"{layer}self_attn.{x}_proj.bias"] = (width, width), (width,)
        out[f"{layer}self_attn.out_proj.weight"], out[f"{layer}self_attn.out_proj.bias"] = (width, width), (width,)
        for n in ("layer_norm1", "layer_norm2"):
            out[f"{layer}{n}.weight"], out[f"{layer}{n}.bias"] = (width,), (width,)
        out[f"{layer}mlp.fc1.weight"], out[f"{layer}mlp.fc1.bias"] = (mlp, width), (mlp,)
        out[f"{layer}mlp.fc2.weight"], out[f"{layer}mlp.fc2.bias"] = (width, mlp), (width,)
    out[b + "final_layer_norm.weight"], out[b + "final_layer_norm.bias"] = (width,), (width,)
    if proj:
        out[prefix + "text_projection.weight"] = (width, width)
    return out


def hf_vision_shapes(width, layers, mlp, embed=1280, patch=14, grid=16):
    b = "vision_model."
    text = hf_text_shapes(width, layers, mlp, vocab=1, context=1, proj=False)
    out = {k.replace("text_model.", b): v for k, v in text.items() if ".encoder.layers." in k}
    out.update({b + "embeddings.class_embedding": (width,), b + "embeddings.patch_embedding.weight": (width, 3, patch, patch),
                b + "embeddings.position_embedding.weight": (grid * grid + 1, width),
                b + "pre_layrnorm.weight": (width,), b + "pre_layrnorm.bias": (width,),
                b + "post_layernorm.weight": (width,), b + "post_layernorm.bias": (width,),
                "visual_projection.weight": (embed, width)})
    return out


def openclip_text_shapes(width, layers, mlp, prefix):
    tensors = {k: torch.empty(v, device="meta") for k, v in hf_text_shapes(width, layers, mlp).items()}
    return {k: tuple(v.shape) for k, v in to_openclip(tensors, text_prefix=prefix).items()}


def test_bigg_by_its_shapes_without_a_config(tmp_path):
    text = write_header_only(tmp_path / "clip_g.safetensors", hf_text_shapes(1280, 32, 5120))
    vision = write_header_only(tmp_path / "clip_vision_g.safetensors", hf_vision_shapes(1664, 48, 8192))
    info = sniff_clip(text)
    assert info.towers == {"text"} and info.text_width == 1280 and info.dtype == "fp16" and info.format == "transformers-file"
    assert "ViT-bigG/14 text tower" in info.description
    assert open_source(text).towers["text"].heads == 20
    info = sniff_clip(vision)
    assert info.towers == {"vision"} and info.vision_width == 1664
    tower = open_source(vision).towers["vision"]
    assert (tower.heads, tower.width // tower.heads, tower.layers, tower.image_size) == (16, 104, 48, 224)
    # SDXL: CLIP-L (embedders.0, transformers keys) and bigG (embedders.1, OpenCLIP keys) in one checkpoint.
    shapes = {**hf_text_shapes(768, 12, 3072, prefix="conditioner.embedders.0.transformer.", proj=False),
              **openclip_text_shapes(1280, 32, 5120, SDXL_TEXT_PREFIX),
              "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}
    ckpt = write_header_only(tmp_path / "sd_xl_base_1.0.safetensors", shapes)
    info = sniff_clip(ckpt)
    assert info.towers == {"text"} and info.format == "sdxl-checkpoint" and info.text_width == 1280
    assert SDXL_TEXT_PREFIX in info.description
    # Another width without config: head dim 64.
    other = write_header_only(tmp_path / "w128.safetensors", hf_text_shapes(128, 2, 512))
    assert open_source(other).towers["text"].heads == 2


@pytest.mark.parametrize("name,shapes,message", [
    ("t5xxl_fp16.safetensors", {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096), "shared.weight": (32128, 4096)}, "T5"),
    ("clip_l.safetensors", hf_text_shapes(768, 12, 3072), "ViT-L/14 text encoder"),
    ("v1-5.safetensors", {**hf_text_shapes(768, 12, 3072, prefix="cond_stage_model.transformer.", proj=False),
                          "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SD1.x checkpoint.*ViT-L/14"),
    ("v2-1.safetensors", {**openclip_text_shapes(1024, 24, 4096, "cond_stage_model.model."),
                          "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SD2.x checkpoint.*ViT-H/14"),
    ("clip_vision_h.safetensors", hf_vision_shapes(1280, 32, 5120, embed=1024), "ViT-H/14 image encoder"),
    ("unet.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "UNet"),
    ("vae.safetensors", {"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3)}, "VAE"),
    ("prior.safetensors", {"embedding_control.weight": (2048, 1280), "proj_to_clip_embeddings.weight": (1280, 2048)}, "λ-ECLIPSE prior"),
    ("text_no_proj.safetensors", hf_text_shapes(1280, 32, 5120, proj=False), "without its projection"),
])
def test_other_models_are_refused_with_what_they_are(tmp_path, name, shapes, message):
    path = write_header_only(tmp_path / name, shapes)
    with pytest.raises(ModelFileError, match=message) as info:
        sniff_clip(path)
    assert "ViT-bigG/14" in str(info.value) and "clip_vision_g" in str(info.value)  # and what is needed instead
    with pytest.raises(ModelFileError, match=message):
        load_clip_towers(text=path)


def test_unknown_width_needs_a_config_and_broken_files(hf, tmp_path):
    sd = tower_sd(hf["text"], "text")
    path = tmp_path / "no_config.safetensors"
    save_file(sd, str(path))  # width 32, no metadata: heads cannot be told
    with pytest.raises(ModelFileError, match="number of attention heads"):
        load_clip_towers(text=path)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((tmp_path / "no_config.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="partial download"):
        sniff_clip(torn)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelFileError, match="open_clip_model.safetensors"):
        sniff_clip(tmp_path / "empty_dir")
    with pytest.raises(ModelFileError, match="not found"):
        sniff_clip(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------------
# sniff_clip: header only, cached
# ---------------------------------------------------------------------------------------------------------

def test_sniff_reads_headers_once_per_file_signature(hf, tmp_path, monkeypatch):
    text, vision = write_hf_files(hf, tmp_path, torch.float16)
    calls = []
    real = clip_formats.read_safetensors_header
    monkeypatch.setattr(clip_formats, "read_safetensors_header", lambda p: calls.append(p) or real(p))
    clip_formats.clear_sniff_cache()
    first = sniff_clip(text)
    assert first.towers == {"text"} and first.text_width == 32 and first.vision_width is None and first.dtype == "fp16"
    assert sniff_clip(text) is first and len(calls) == 1
    stat = text.stat()
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: read again
    assert sniff_clip(text) == first and len(calls) == 2
    assert sniff_clip(vision).towers == {"vision"}
    t5 = write_header_only(tmp_path / "t5.safetensors", {"shared.weight": (8, 4)})
    for _ in range(2):  # refusals are cached too
        with pytest.raises(ModelFileError, match="T5"):
            sniff_clip(t5)
    assert len(calls) == 4
    folder, _ = write_hf_folders(hf, tmp_path / "f", torch.float32)
    assert sniff_clip(folder).format == "transformers-folder"
    both, _ = write_openclip_folder(hf, tmp_path, torch.float32)
    info = sniff_clip(both)
    assert info.towers == {"text", "vision"} and info.format == "openclip-folder" and (info.text_width, info.vision_width) == (32, 48)


# ---------------------------------------------------------------------------------------------------------
# load_clip_towers: towers from different files, one tower only, the same file once
# ---------------------------------------------------------------------------------------------------------

def test_towers_from_different_files_and_one_tower_only(hf, tmp_path, monkeypatch):
    text, vision = write_hf_files(hf, tmp_path, torch.float32)
    folder, _ = write_openclip_folder(hf, tmp_path, torch.float32)
    mixed = load_clip_towers(text=text, vision=folder)  # the vision tower of a both-tower folder
    compare_with_transformers(mixed, hf["text"], hf["vision"])
    assert mixed.sources == {"text": str(text), "vision": str(folder)}
    opened = []
    real = clip_formats.open_source
    import lambda_eclipse.core.clip as clip_module

    monkeypatch.setattr(clip_module, "open_source", lambda p, **k: opened.append(p) or real(p, **k))
    load_clip_towers(text=folder, vision=folder)
    assert len(opened) == 1  # the same path is resolved and read once

    text_only = load_clip_towers(text=text)
    assert text_only.encode_text("a dog").pooled.shape == (1, 32)
    for call in (lambda: text_only.encode_images([torch.zeros(8, 8, 3)]), text_only.blank_embedding,
                 lambda: text_only.encode_subject(torch.zeros(8, 8, 3))):
        with pytest.raises(ModelFileError, match="vision tower"):
            call()
    vision_only = load_clip_towers(vision=vision)
    assert vision_only.tokenize("a dog").shape == (1, 77)  # the tokenizer needs no tower
    with pytest.raises(ModelFileError, match="text tower"):
        vision_only.encode_text("a dog")
    assert vision_only.blank_embedding().shape == (32,)
    with pytest.raises(ModelFileError, match="holds only the text tower"):
        load_clip(text)
    with pytest.raises(ModelFileError, match="holds only the vision tower"):
        load_clip_towers(text=vision)


def test_tiny_tower_files_equal_the_tiny_openclip_folder(tiny_models, tiny_clip):
    towers = load_clip_towers(text=tiny_models["clip_text"], vision=tiny_models["clip_vision"])
    ours, theirs = towers.model.state_dict(), tiny_clip.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(towers.blank_embedding(), tiny_clip.blank_embedding())
    assert sniff_clip(tiny_models["clip_text"]).towers == {"text"}
    assert sniff_clip(tiny_models["clip_vision"]).towers == {"vision"}
