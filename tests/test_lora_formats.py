"""Decoder LoRAs from the rest of the ecosystem (issue 21): every format reads at the scale its maker meant.

Each file is made here with diffusers' or peft's own API on the tiny decoder UNet (the 0.22–0.25 attention-processor
layout, which no installable diffusers writes any more, is written out key by key), loaded through core.lora (what the
node and `generate --decoder-lora` use) and compared, on the UNet output, with diffusers' or peft's own loading of the
same file.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lambda_eclipse.core.decoder import KandinskyDecoder, decode
from lambda_eclipse.core.errors import ModelFileError, NonFiniteError
from lambda_eclipse.core.lora import (
    LORA_TARGETS,
    apply_decoder_lora,
    decoder_lora_problem,
    inspect_decoder_lora,
    load_decoder_lora,
    looks_like_decoder_lora,
)
from lambda_eclipse.core.tiny import make_tiny_decoder_components

peft = pytest.importorskip("peft")

TOL = 1e-5
# The tiny UNet's attention layers (core/tiny.py): hidden width 64 in every block, embedding (add_k/v input) 32.
ATTENTIONS = ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
              "up_blocks.0.attentions.1")
HIDDEN, CROSS, RANK = 64, 32, 4


def _unet():
    return make_tiny_decoder_components()[0]


def _decoder():
    unet, movq, scheduler = make_tiny_decoder_components()
    return KandinskyDecoder(unet, movq, dict(scheduler.config), "tiny")


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 32, generator=gen)


def _out(unet) -> torch.Tensor:
    x, e = _inputs()
    with torch.no_grad():
        return unet(x, 10, None, added_cond_kwargs={"image_embeds": e}).sample


def _ours(path, strength=1.0) -> torch.Tensor:
    """The UNet output through core.lora.apply_decoder_lora, the path of the node and of generate --decoder-lora."""
    return _out(apply_decoder_lora(_decoder(), path, strength).unet)


BASE = None


def _base() -> torch.Tensor:
    global BASE
    if BASE is None:
        BASE = _out(_unet())
    return BASE


def _assert_same(ours, theirs):
    assert (ours - _base()).abs().max() > 1e-3, "the LoRA should change the UNet output"
    assert (ours - theirs).abs().max() <= TOL, float((ours - theirs).abs().max())


def _diffusers(path, prefix, name="x"):
    """diffusers' own loading of a file. use_safetensors=True: without it (or a weight_name ending in .safetensors),
    diffusers 0.42's load_lora_adapter reads a file path through its .bin branch and ignores lora_adapter_metadata,
    so every alpha ≠ rank file, its own included, would load at scale 1."""
    unet = _unet()
    unet.load_lora_adapter(str(path), prefix=prefix, adapter_name=name, use_safetensors=True)
    return unet


def _peft_unet(rank=RANK, alpha=8, seed=0, **config):
    """A tiny UNet with a peft LoRA (as diffusers' LoRA scripts add it) whose B matrices are made non-zero."""
    from peft import LoraConfig

    unet = _unet()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS), **config))
    _randomise_b(unet, seed)
    return unet


def _randomise_b(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# -- diffusers 0.22–0.25: unet.save_attn_procs of LoRAAttnAddedKVProcessor --------------------------------------

def _attn_procs_tensors(with_add_kv: bool, add_kv_zero: bool = True, seed=0) -> dict[str, torch.Tensor]:
    """The keys and shapes `unet.save_attn_procs` wrote in diffusers 0.22–0.25 (Kandinsky 2.2 decoder LoRA script).

    Each attention processor is LoRAAttnAddedKVProcessor(hidden_size, cross_attention_dim, rank): LoRALinearLayer
    to_q_lora/to_k_lora/to_v_lora/to_out_lora (hidden → hidden) and add_k_proj_lora/add_v_proj_lora (cross → hidden),
    each `down` [rank, in] and `up` [out, rank]. After a forward pass the processor is replaced and `get_processor(
    return_deprecated_lora=True)` rebuilds it without add_k/add_v ("only save if used"): 32 tensors here; saved
    before any forward pass, 48, whose add_k/add_v `up` are still their zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    projections = {"to_q": HIDDEN, "to_k": HIDDEN, "to_v": HIDDEN, "to_out": HIDDEN}
    if with_add_kv:
        projections.update(add_k_proj=CROSS, add_v_proj=CROSS)
    tensors = {}
    for attention in ATTENTIONS:
        for projection, fan_in in projections.items():
            key = f"{attention}.processor.{projection}_lora"
            tensors[f"{key}.down.weight"] = torch.randn(RANK, fan_in, generator=gen) / RANK
            up = torch.randn(HIDDEN, RANK, generator=gen) * 0.3
            tensors[f"{key}.up.weight"] = up * 0 if projection.startswith("add_") and add_kv_zero else up
    return tensors


@pytest.mark.parametrize("with_add_kv,count", [(False, 32), (True, 48)])
def test_attn_procs_files_of_diffusers_022_to_025_load_and_match_diffusers(tmp_path, with_add_kv, count):
    tensors = _attn_procs_tensors(with_add_kv)
    assert len(tensors) == count
    assert "down_blocks.1.attentions.0.processor.to_q_lora.down.weight" in tensors
    assert tensors["mid_block.attentions.0.processor.to_out_lora.up.weight"].shape == (HIDDEN, RANK)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), {"format": "pt"})

    info = inspect_decoder_lora(path)
    assert looks_like_decoder_lora(path) and "save_attn_procs" in info.layout and f"{count} tensors" in info.layout
    assert info.scale == 1 and "diffusers 0.22–0.25 stored no alpha" in info.alpha_source
    assert "mid_block.attentions.0.to_out.0" in info.keys  # to_out_lora → to_out.0
    assert ("down_blocks.1.attentions.0.add_k_proj" in info.keys) == with_add_kv

    _assert_same(_ours(path), _out(_diffusers(path, None)))


def test_attn_procs_48_applies_add_kv_projections_as_the_diffusers_that_wrote_them(tmp_path):
    """diffusers 0.22–0.25 read add_k_proj_lora as add_k_proj.lora (format_to_lora_compatible) and applied it;
    the reference is diffusers loading the same matrices under their peft names."""
    tensors = _attn_procs_tensors(True, add_kv_zero=False)
    path = tmp_path / "trained48.safetensors"
    save_file(tensors, str(path), {"format": "pt"})
    renamed = {}
    for key, value in tensors.items():
        module, _, rest = key.partition(".processor.")
        projection, _, which = rest.partition("_lora.")
        projection = "to_out.0" if projection == "to_out" else projection
        renamed[f"{module}.{projection}.lora_{'A' if which.startswith('down') else 'B'}.weight"] = value
    theirs = _unet()
    theirs.load_lora_adapter(renamed, prefix=None, adapter_name="peft_names")
    ours = _ours(path)
    _assert_same(ours, _out(theirs))
    without_add_kv = tmp_path / "trained32.safetensors"
    save_file({k: v for k, v in tensors.items() if ".add_" not in k}, str(without_add_kv), {"format": "pt"})
    assert (ours - _ours(without_add_kv)).abs().max() > 1e-4  # the add_k/add_v matrices do act


# -- diffusers / peft: lora_A / lora_B, alpha in lora_adapter_metadata ---------------------------------------------

def test_save_lora_adapter_file_reads_alpha_from_lora_adapter_metadata(tmp_path):
    """UNet2DConditionModel.save_lora_adapter: no prefix, the LoraConfig (r=4, lora_alpha=8) as JSON metadata."""
    made = _peft_unet(alpha=8)
    made.save_lora_adapter(str(tmp_path), weight_name="adapter.safetensors")
    path = tmp_path / "adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["lora_alpha"] == 8
        assert not any(k.startswith("unet.") for k in f.keys())
    lora = load_decoder_lora(path)
    assert (lora.rank, lora.alpha, lora.scale) == (4, 8, 2.0)
    _assert_same(_ours(path), _out(_diffusers(path, None)))
    _assert_same(_ours(path), _out(made))  # and the model it was saved from


@pytest.mark.parametrize("config", [
    dict(rank=4, alpha=8),
    dict(rank=4, alpha=6, rank_pattern={"to_q": 2}, alpha_pattern={"add_k_proj": 3, "to_q": 5}),
    dict(rank=4, alpha=8, use_rslora=True),
], ids=["alpha8", "patterns", "rslora"])
def test_pipeline_save_lora_weights_file_unet_prefixed_with_its_alpha(tmp_path, config):
    """A pipeline's save_lora_weights (diffusers' DreamBooth/LoRA scripts): keys and metadata prefixed unet."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    rank, alpha = config.pop("rank"), config.pop("alpha")
    made = _peft_unet(rank=rank, alpha=alpha, **config)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(made),
        unet_lora_adapter_metadata=made.peft_config["default"].to_dict(), weight_name="lora.safetensors")
    path = tmp_path / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == alpha
    info = inspect_decoder_lora(path)
    assert "lora_adapter_metadata" in info.alpha_source
    if config.get("rank_pattern"):
        assert info.ranks["down_blocks.1.attentions.0.to_q"] == 2 and info.scales["mid_block.attentions.0.to_q"] == 2.5
        assert info.scales["mid_block.attentions.0.add_k_proj"] == 0.75 and info.scales["mid_block.attentions.0.to_k"] == 1.5
    if config.get("use_rslora"):
        assert info.scale == pytest.approx(8 / math.sqrt(4))
    _assert_same(_ours(path), _out(_diffusers(path, "unet")))
    _assert_same(_ours(path), _out(made))


def test_alpha_tensors_and_mixed_ranks_match_the_merged_weights(tmp_path):
    """kohya-style <module>.alpha tensors give each layer its alpha; without them a layer's scale is 1."""
    unet = _unet()
    gen = torch.Generator().manual_seed(5)
    tensors, merged = {}, copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    for i, attention in enumerate(ATTENTIONS):
        for j, projection in enumerate(("to_q", "to_v", "add_k_proj")):
            name = f"{attention}.{projection}"
            linear = modules[name]
            rank = 2 + (i + j) % 3
            a = torch.randn(rank, linear.in_features, generator=gen) / rank
            b = torch.randn(linear.out_features, rank, generator=gen) * 0.3
            tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = a, b
            alpha = None if j == 2 else float(1 + i + j)
            if alpha is not None:
                tensors[f"unet.{name}.alpha"] = torch.tensor(alpha)
            with torch.no_grad():
                linear.weight += (alpha / rank if alpha is not None else 1.0) * (b @ a)
    path = tmp_path / "alphas.safetensors"
    save_file(tensors, str(path))
    assert "its .alpha tensors" in inspect_decoder_lora(path).alpha_source
    _assert_same(_ours(path), _out(merged))


# -- peft-native: PeftModel.save_pretrained -----------------------------------------------------------------------

def test_peft_native_folder_reads_adapter_config_and_a_lone_file_uses_rank(tmp_path, caplog):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(_unet(), LoraConfig(r=RANK, lora_alpha=8, target_modules=list(LORA_TARGETS),
                                               init_lora_weights="gaussian", alpha_pattern={"to_v": 2}))
    _randomise_b(model, 7)
    folder = tmp_path / "dog"
    model.save_pretrained(str(folder))
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("base_model.model.") for k in f.keys())
    info = inspect_decoder_lora(path)
    assert "peft-native" in info.layout and "adapter_config.json" in info.alpha_source and info.scale == 2.0
    assert info.scales["mid_block.attentions.0.to_v"] == 0.5
    theirs = _unet()
    PeftModel.from_pretrained(theirs, str(folder))  # injects the adapter into `theirs` in place
    _assert_same(_ours(path), _out(theirs))

    # Without its adapter_config.json: alpha = rank (diffusers' convention for a file without alpha), and said.
    lone = tmp_path / "dog_lone.safetensors"
    shutil.copy(path, lone)
    caplog.set_level(logging.INFO, logger="lambda_eclipse")
    lora = load_decoder_lora(lone)
    assert lora.scale == 1 and "without the adapter_config.json" in caplog.text and "alpha is taken as the rank" in caplog.text
    stripped = {k.removeprefix("base_model.model."): v for k, v in load_file(str(lone)).items()}
    theirs = _unet()
    theirs.load_lora_adapter(stripped, prefix=None, adapter_name="lone")
    _assert_same(_ours(lone), _out(theirs))


# -- ours: what the trainer writes, read by diffusers at the same scale -----------------------------------------------

def _our_file(path: Path, rank=RANK, alpha=8.0) -> Path:
    """Exactly trainer.finetune_decoder._export's LoRA branch, on a LoRA whose B matrices are made non-zero."""
    from lambda_eclipse.core.fsio import save_file_atomic
    from lambda_eclipse.core.lora import lora_metadata
    from lambda_eclipse.trainer.finetune_decoder import add_lora, lora_state_dict

    unet = _unet()
    targets = add_lora(unet, rank=rank, alpha=alpha, seed=0)
    _randomise_b(unet, 11)
    metadata = lora_metadata(base_decoder="tiny", rank=str(rank), alpha=str(float(alpha)), steps="1",
                             images=["a.png"], target_modules=targets, lr="0.0001")
    return save_file_atomic(lora_state_dict(unet), path, metadata)


def test_our_file_with_alpha_not_rank_reads_the_same_in_diffusers(tmp_path):
    path = _our_file(tmp_path / "concept_lora.safetensors", rank=4, alpha=8.0)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format_tag"] == "lambda_eclipse_decoder_lora" and meta["alpha"] == "8.0" and meta["rank"] == "4"
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8
    lora = load_decoder_lora(path)
    assert (lora.rank, lora.alpha, lora.scale) == (4, 8.0, 2.0)
    theirs = _diffusers(path, "unet", "ours")
    assert theirs.peft_config["ours"].lora_alpha == 8 and theirs.peft_config["ours"].r == 4
    _assert_same(_ours(path), _out(theirs))
    by_folder = _unet()  # the other documented way: a folder and a .safetensors weight_name
    by_folder.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="ours")
    _assert_same(_ours(path), _out(by_folder))
    # Strength multiplies alpha/rank: alpha 8 at strength 0.5 is the same tensors with alpha 4 at strength 1.
    same_tensors = _our_file(tmp_path / "alpha4.safetensors", rank=4, alpha=4.0)
    assert all(torch.equal(v, load_file(str(path))[k]) for k, v in load_file(str(same_tensors)).items())
    assert (_ours(path, 0.5) - _ours(same_tensors, 1.0)).abs().max() <= TOL
    assert torch.equal(_ours(path, 0.0), _base())


# -- the node's menu and messages; refusals --------------------------------------------------------------------------

def _with_metadata(src: Path, dest: Path, **changes) -> Path:
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.update(changes)
    save_file(tensors, str(dest), metadata)
    return dest


def _bad_files(folder: Path, good: Path) -> dict[str, Path]:
    """name → a file that must not load, each made from a good one (or from nothing)."""
    files = {}
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(folder / "sdxl_kohya.safetensors"))
    files["sdxl_kohya"] = folder / "sdxl_kohya.safetensors"
    save_file({"weights": torch.zeros(3), "bias": torch.ones(2)}, str(folder / "garbage.safetensors"))
    files["garbage"] = folder / "garbage.safetensors"
    (folder / "junk.safetensors").write_bytes(b"\x00\x01 definitely not a safetensors file")
    files["junk"] = folder / "junk.safetensors"
    save_file({k: v.contiguous() for k, v in _unet().state_dict().items()}, str(folder / "full_unet.safetensors"))
    files["full_unet"] = folder / "full_unet.safetensors"
    files["rank_mismatch"] = _with_metadata(good, folder / "rank_mismatch.safetensors", rank="8")
    files["rank0"] = _with_metadata(good, folder / "rank0.safetensors", rank="0")
    files["alpha_inf"] = _with_metadata(good, folder / "alpha_inf.safetensors", alpha="inf")
    config = json.dumps({"unet.r": 4, "unet.lora_alpha": float("nan"), "unet.target_modules": ["to_q"]})
    files["json_alpha_nan"] = _with_metadata(good, folder / "json_alpha_nan.safetensors", alpha="4.0", rank="4",
                                             lora_adapter_metadata=config)
    tensors = load_file(str(good))
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = torch.zeros(0, tensors[key].shape[1])
    tensors[key.replace("lora_A", "lora_B")] = torch.zeros(tensors[key.replace("lora_A", "lora_B")].shape[0], 0)
    save_file(tensors, str(folder / "rank0_tensors.safetensors"))
    files["rank0_tensors"] = folder / "rank0_tensors.safetensors"
    tensors = load_file(str(good))
    module = key[: -len(".lora_A.weight")]
    variants = {
        "half": {k: v for k, v in tensors.items() if k != f"{module}.lora_B.weight"},
        "dora": {**tensors, f"{module}.lora_magnitude_vector": torch.ones(HIDDEN)},
        "pipeline": {**tensors, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
                     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)},
        "int8": {**tensors, key: tensors[key].to(torch.int8)},
    }
    for name, variant in variants.items():
        save_file(variant, str(folder / f"{name}.safetensors"))
        files[name] = folder / f"{name}.safetensors"
    return files


def test_garbage_full_models_and_sd_loras_are_said_for_what_they_are(tmp_path):
    good = _our_file(tmp_path / "good.safetensors")
    bad = _bad_files(tmp_path, good)
    problem = {name: decoder_lora_problem(path) for name, path in bad.items()}
    assert all(problem.values()), problem
    assert "an SD 1.x/SDXL LoRA (kohya-style keys lora_unet_" in problem["sdxl_kohya"]
    assert "not a LoRA at all" in problem["garbage"] and "SD" not in problem["garbage"]
    assert "is not a LoRA" in problem["junk"] and "not a readable .safetensors file" in problem["junk"]
    assert "a Kandinsky 2.2 decoder UNet, a full model file" in problem["full_unet"]
    assert "Load Kandinsky Decoder" in problem["full_unet"]
    assert "is incomplete" in problem["half"] and "has no lora_B" in problem["half"]
    assert "is a DoRA adapter" in problem["dora"] and "lora_magnitude_vector" in problem["dora"]
    assert "a LoRA for a whole pipeline" in problem["pipeline"] and "text_encoder." in problem["pipeline"]
    assert "is stored as I8; LoRA matrices are floating point" in problem["int8"]


def test_rank_mismatch_rank0_alpha_inf_and_nan_are_refused_naming_file_and_value(tmp_path):
    good = _our_file(tmp_path / "good.safetensors")
    bad = _bad_files(tmp_path, good)
    decoder = _decoder()
    # 19.9: metadata rank 8 over rank-4 tensors would halve the strength silently: refused, with both numbers.
    with pytest.raises(ModelFileError, match=r"rank_mismatch.safetensors: its metadata 'rank' says rank 8 but its "
                                             r"LoRA tensors for .* have rank 4\. Refused rather than guessed"):
        apply_decoder_lora(decoder, bad["rank_mismatch"], 1.0)
    with pytest.raises(ModelFileError, match=r"rank0.safetensors: its metadata 'rank' gives the rank as '0' \(rank 0"):
        apply_decoder_lora(decoder, bad["rank0"], 1.0)
    with pytest.raises(ModelFileError, match=r"rank0_tensors.safetensors: unet\..*lora_A.weight has shape \[0, \d+\]: a rank-0"):
        apply_decoder_lora(decoder, bad["rank0_tensors"], 1.0)
    with pytest.raises(ModelFileError, match=r"alpha_inf.safetensors: its metadata 'alpha' gives alpha as 'inf'; alpha "
                                             r"must be a finite number"):
        apply_decoder_lora(decoder, bad["alpha_inf"], 1.0)
    with pytest.raises(ModelFileError, match=r"json_alpha_nan.safetensors: its lora_adapter_metadata \(lora_alpha for .*\) "
                                             r"gives alpha as nan"):
        apply_decoder_lora(decoder, bad["json_alpha_nan"], 1.0)
    # NaN values: found when the tensors are read, before any picture; the message names the tensor.
    tensors = load_file(str(good))
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    with safe_open(str(good), "pt") as f:
        save_file(tensors, str(tmp_path / "nan.safetensors"), f.metadata())
    with pytest.raises(NonFiniteError, match=rf"nan.safetensors: its tensor {key} holds 1 NaN/infinite value"):
        apply_decoder_lora(decoder, tmp_path / "nan.safetensors", 1.0)
    # A FIFO named like a LoRA is said, never opened (reading it would wait forever).
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert "is a FIFO" in decoder_lora_problem(tmp_path / "pipe.safetensors")
    # Our own and diffusers' alpha disagreeing: the strength cannot be known.
    config = json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": list(LORA_TARGETS)})
    split = _with_metadata(good, tmp_path / "split.safetensors", lora_adapter_metadata=config)
    with pytest.raises(ModelFileError, match=r"its alphas disagree .*metadata 'alpha' = 8, its lora_adapter_metadata = 4"):
        load_decoder_lora(split)


def test_node_menu_lists_exactly_the_files_that_load_and_says_what_the_others_are(tmp_path):
    from lambda_eclipse.nodes import comfy
    from lambda_eclipse.nodes.loaders import Loaded
    from lambda_eclipse.nodes.lora import LambdaEclipseLoadDecoderLoRA as Node
    from peft import LoraConfig, get_peft_model

    loras = tmp_path / "loras"
    loras.mkdir()
    _our_file(loras / "ours.safetensors")
    save_file(_attn_procs_tensors(False), str(loras / "procs32.safetensors"), {"format": "pt"})
    save_file(_attn_procs_tensors(True), str(loras / "procs48.safetensors"), {"format": "pt"})
    _peft_unet(alpha=8).save_lora_adapter(str(loras), weight_name="adapter.safetensors")
    model = get_peft_model(_unet(), LoraConfig(r=RANK, lora_alpha=8, target_modules=list(LORA_TARGETS)))
    _randomise_b(model, 2)
    model.save_pretrained(str(loras / "dog"))
    bad = _bad_files(loras, loras / "ours.safetensors")
    good = ["adapter.safetensors", "dog/adapter_model.safetensors", "ours.safetensors", "procs32.safetensors",
            "procs48.safetensors"]
    comfy.set_models_dir(tmp_path)
    try:
        menu = Node.INPUT_TYPES()["required"]["lora_name"][0]
        assert menu == good
        for name in good:
            assert Node.VALIDATE_INPUTS(name) is True, name
        said = {name: Node.VALIDATE_INPUTS(path.name) for name, path in bad.items()}
        assert all(isinstance(s, str) for s in said.values()), said
        assert "an SD 1.x/SDXL LoRA" in said["sdxl_kohya"] and "not a LoRA at all" in said["garbage"]
        assert "full model file" in said["full_unet"] and "Refused rather than guessed" in said["rank_mismatch"]
        assert "finite" in said["alpha_inf"]
        shared = Loaded("decoder", _decoder(), None, "tiny")
        emb = torch.linspace(-1, 1, 32)[None]
        settings = dict(width=64, height=64, steps=2, guidance=4.0, seeds=7)
        base = decode(shared.model, emb, torch.zeros(1, 32), **settings)
        for name in ("procs32.safetensors", "dog/adapter_model.safetensors"):
            (out,) = Node().apply(shared, name, 1.0)
            pixels = decode(out.ready(), emb, torch.zeros(1, 32), **settings)
            core = decode(apply_decoder_lora(_decoder(), loras / name, 1.0), emb, torch.zeros(1, 32), **settings)
            assert torch.equal(pixels, core) and not torch.equal(pixels, base)
        assert torch.equal(decode(shared.ready(), emb, torch.zeros(1, 32), **settings), base)
    finally:
        comfy.set_models_dir(None)


def test_generate_with_an_attn_procs_lora_and_refusing_a_nan_one(tiny_models, tmp_path, capsys):
    """`generate --decoder-lora` with a file from diffusers' Kandinsky 2.2 decoder LoRA script; a NaN LoRA is an error,
    never a black picture."""
    from lambda_eclipse.core.cli import main as cli

    photo = tmp_path / "dog.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    procs = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(_attn_procs_tensors(False), str(procs), {"format": "pt"})
    base = ["generate", "--models", str(tiny_models["root"]), "--prompt", "a dog", "--subject", f"dog={photo}",
            "--steps", "2", "--width", "64", "--height", "64", "--quiet", "--device", "cpu"]
    assert cli(base + ["--out", str(tmp_path / "a.png")]) == 0
    assert cli(base + ["--decoder-lora", str(procs), "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    tensors = _attn_procs_tensors(False)
    tensors["mid_block.attentions.0.processor.to_v_lora.up.weight"][1, 2] = float("inf")
    save_file(tensors, str(tmp_path / "broken.safetensors"), {"format": "pt"})
    capsys.readouterr()
    assert cli(base + ["--decoder-lora", str(tmp_path / "broken.safetensors"), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "mid_block.attentions.0.processor.to_v_lora.up.weight" in err
    assert not (tmp_path / "c.png").exists()
