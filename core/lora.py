"""Decoder LoRAs (paper §3.3 / App. D concept fine-tuning): read one, apply it to a decoder at a strength.

Formats read (.safetensors), each with the alpha it carries; every layer adds ``alpha/rank · B(A(x))``:

- **ours** (`python -m lambda_eclipse.trainer finetune-decoder`): ``unet.<module>.lora_A.weight`` ([rank, in]) and
  ``unet.<module>.lora_B.weight`` ([out, rank]); metadata ``rank`` and ``alpha``, and diffusers' own
  ``lora_adapter_metadata`` with the same numbers, so that ``UNet2DConditionModel.load_lora_adapter(file,
  prefix="unet")`` reads our files at our scale (`lora_metadata`).
- **diffusers / peft** keys ``<module>.lora_A/lora_B.weight`` with the ``unet.`` prefix (a pipeline's
  ``save_lora_weights``) or without it (``UNet2DConditionModel.save_lora_adapter``): alpha from the
  ``lora_adapter_metadata`` JSON (the LoraConfig: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
  ``use_rslora``; its keys prefixed ``unet.`` in pipeline files, as diffusers writes them) or from kohya-style
  ``<module>.alpha`` tensors; with neither, alpha = rank (scale 1), diffusers' convention.
- **diffusers 0.22–0.25 attention processors** (``unet.save_attn_procs`` in diffusers' Kandinsky 2.2 decoder LoRA
  example, ``LoRAAttnAddedKVProcessor``): ``<attention>.processor.to_q_lora.down.weight`` / ``.up.weight`` for to_q,
  to_k, to_v and to_out (→ ``to_out.0``), no prefix, metadata ``{"format": "pt"}``; 32 tensors on the tiny test UNet
  after training, 48 (also ``add_k_proj_lora``/``add_v_proj_lora``) when saved before any forward pass. Those
  versions stored no alpha: alpha = rank (scale 1) unless ``.alpha`` tensors say otherwise. Older diffusers names
  (``.lora.down/.lora.up``, ``.lora_linear_layer.down/up``) are read too.
- **peft-native** (``PeftModel.save_pretrained``, ``get_peft_model_state_dict`` of a PeftModel): keys under
  ``base_model.model.``; alpha from the ``adapter_config.json`` that save_pretrained writes beside
  ``adapter_model.safetensors`` (keep the two together, e.g. models/loras/dog/); a file without it gets alpha = rank
  and the log says so.

Conversion is diffusers' own where diffusers has it: `diffusers.utils.convert_unet_state_dict_to_peft` renames the
old layouts (drops ``.processor.``, ``to_out_lora`` → ``to_out.0``, ``.lora.down/up`` → ``.lora_A/B``). Before it,
``add_k_proj_lora``/``add_v_proj_lora`` and ``lora_linear_layer`` are renamed the way diffusers 0.22–0.25 read their
own files (``format_to_lora_compatible``): diffusers 0.42 no longer maps those two and drops them, with a warning,
from a 48-tensor file; we apply them as the diffusers that wrote the file did. Per-layer ``rank_pattern`` /
``alpha_pattern`` entries match module names by peft's rule (`peft.utils.other.get_pattern_key`; peft is optional
here, so the rule is repeated in `_pattern_value`). `KandinskyV22Pipeline` has no ``load_lora_weights`` (it is a plain
DiffusionPipeline in diffusers 0.42): diffusers users load our files with ``pipe.unet.load_lora_adapter``.

What a file is, and whether it loads, is decided from its header (plus its few scalar ``.alpha`` tensors), cached by
file signature: the node's menu lists exactly the files that load, and every other file gets a message saying what
it is (an SD 1.x/SDXL kohya LoRA, a full model file, "not a LoRA"). Refused, naming the file and the tensor or
metadata key: a rank in the metadata that disagrees with the tensors' rank (refused rather than guessed: alpha goes
with the rank it was written with, and a wrong guess silently rescales the LoRA), rank 0, a non-finite alpha, integer
or boolean tensors, and (when the tensors are read) NaN or infinite values, which would give a black picture.

Applying never copies or modifies the UNet: `apply_decoder_lora` returns a *new* `KandinskyDecoder` that shares the
base UNet and MoVQ, and whose ``unet`` is a thin `LoRAUNet` wrapper. Only while that wrapper is called (during
`decode`) are forward hooks on the targeted Linear layers registered, adding ``strength · alpha/rank · B(A(x))`` to
their outputs; they are removed when the call returns (or raises). So the base decoder, and everyone else holding
it (ComfyUI's cache, other branches of a graph), keeps computing exactly the base model; strength 0 registers no
hook at all and gives the base decoder's pixels bit for bit.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .decoder import KandinskyDecoder
from .errors import InputError, ModelFileError, NonFiniteError
from .loading import CheckCache

log = logging.getLogger("lambda_eclipse")

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
FORMAT_TAG = "lambda_eclipse_decoder_lora"  # metadata key "format_tag" of the files the trainer writes
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
UNET_PREFIX = "unet."  # diffusers' prefix for a pipeline's UNet (load_lora_adapter(prefix="unet"))
PEFT_PREFIX = "base_model.model."  # a PeftModel's state dict
PEFT_WEIGHTS = "adapter_model.safetensors"  # PeftModel.save_pretrained's pair
PEFT_CONFIG = "adapter_config.json"
LORA_SUFFIXES = (".safetensors", ".sft")

# The Linear layers a decoder LoRA may change: the attention projections of the Kandinsky 2.2 decoder UNet's
# SimpleCrossAttn blocks (AttnAddedKVProcessor: to_q/k/v/out on the image tokens, add_k/add_v_proj on the embedding).
_DECODER_MODULE = re.compile(
    r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_SOURCE = ("A decoder LoRA comes from `python -m lambda_eclipse.trainer finetune-decoder`, diffusers' Kandinsky 2.2 "
           "decoder LoRA script or peft, trained on the Kandinsky 2.2 decoder UNet.")
_CHECKS = CheckCache()


@dataclass(eq=False)
class DecoderLoRA:
    """A decoder LoRA read into memory: {module path: (A [rank, in], B [out, rank])}, float32 on the CPU.

    `scale` is the common alpha/rank of its layers; a layer with another scale has it folded into its B."""

    path: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    metadata: dict[str, str] = field(default_factory=dict)
    scale: float | None = None
    layout: str = ""
    _cast: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.scale is None:
            self.scale = self.alpha / self.rank

    def weights_for(self, device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The layers on `device` in `dtype` (cached: one copy per device/dtype, a few MB at rank 4)."""
        key = (str(device), dtype)
        if key not in self._cast:
            self._cast.clear()  # keep at most one copy besides the CPU float32 one
            self._cast[key] = {m: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                               for m, (a, b) in self.layers.items()}
        return self._cast[key]


@dataclass(frozen=True)
class LoRAFileInfo:
    """What a decoder LoRA file holds, from its header: enough to list it, refuse it or load it."""

    path: str
    layout: str  # which of the formats above, in words
    keys: dict[str, tuple[str, str]]  # module → (A key, B key) as named in the file
    ranks: dict[str, int]
    scales: dict[str, float]  # module → alpha/rank (alpha/√rank with use_rslora)
    rank: int  # the most common rank
    alpha: float  # the alpha of the most common scale
    scale: float  # the most common scale
    alpha_source: str  # where alpha came from, for the log
    metadata: dict[str, str]
    warning: str = ""  # logged when the file is loaded (e.g. a peft file without its adapter_config.json)


# -- what a file is --------------------------------------------------------------------------------------------

def _sample(keys, n: int = 2) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")


def _describe_foreign(keys: list[str]) -> str:
    """What a set of LoRA keys that are no decoder LoRA look like, for the error message."""
    sample = _sample(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return f"an SD 1.x/SDXL LoRA (kohya-style keys lora_unet_…/lora_te_…: {sample})"
    if any(k.startswith(("transformer.", "lora_transformer", "diffusion_model.", "double_blocks.", "single_blocks."))
           for k in keys):
        return f"a LoRA for a transformer diffusion model (Flux/SD3-like; keys such as {sample})"
    if any(k.startswith(("text_encoder", "te_")) for k in keys) and not any(k.startswith(UNET_PREFIX) for k in keys):
        return f"a text-encoder LoRA (keys such as {sample})"
    if any("transformer_blocks" in k or "attn1" in k or "attn2" in k for k in keys):
        return f"a LoRA for a Stable Diffusion style UNet (it targets attn1/attn2 transformer blocks: {sample})"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_", "time_embedding.", "add_embedding.",
                         "encoder_hid_proj.")) for k in keys):
        return ("a UNet LoRA that changes layers other than the decoder's attention projections "
                f"({', '.join(LORA_TARGETS)}), which Load Decoder LoRA does not apply ({sample})")
    return f"a LoRA for another model (keys such as {sample})"


def _not_decoder_lora(name: str, what: str) -> ModelFileError:
    return ModelFileError(f"{name} is not a LoRA of the Kandinsky 2.2 decoder UNet: it is {what}. {_SOURCE}")


def _is_lora_key(key: str) -> bool:
    return "lora" in key.lower() or key.endswith(".alpha")


def _what_model(name: str, entries: Mapping[str, tuple[str, tuple]]) -> ModelFileError:
    """A file without LoRA matrices: a known full model (core.decoder_files' table of model files) or not a LoRA."""
    from .decoder_files import _classify

    kind, what, _advice = _classify({k: (dtype, shape) for k, (dtype, shape) in entries.items()})
    if kind is None and what.startswith("not "):
        return _not_decoder_lora(
            name, f"not a LoRA at all ({len(entries)} tensors such as {_sample(entries)}, none of them LoRA matrices)")
    use = "; load it with λ-ECLIPSE Load Kandinsky Decoder instead" if kind else ""
    return _not_decoder_lora(name, f"{what}, a full model file ({len(entries)} tensors) rather than a LoRA{use}")


def _peft_names(keys: Iterable[str]) -> dict[str, str]:
    """{peft-layout name: name in the file} for prefix-free keys of any diffusers layout.

    diffusers' `convert_unet_state_dict_to_peft` does the conversion; add_k_proj_lora/add_v_proj_lora (48-tensor
    attn-procs files) and lora_linear_layer are first renamed as diffusers 0.22–0.25 did (format_to_lora_compatible),
    since its current table lacks them."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    def legacy(key: str) -> str:
        if ".processor." in key:
            key = key.replace(".add_k_proj_lora.", ".add_k_proj.lora.").replace(".add_v_proj_lora.", ".add_v_proj.lora.")
        return key.replace(".lora_linear_layer.", ".lora.")

    keys = list(keys)
    renamed = convert_unet_state_dict_to_peft({legacy(k): k for k in keys})
    if len(renamed) != len(keys):
        raise ValueError("two keys name the same LoRA matrix")
    return {new: old for new, old in renamed.items()}


def _layout(keys: list[str], name: str) -> tuple[str, str, dict[str, str]]:
    """(layout in words, prefix, {name without prefix: name in the file})."""
    if all(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft-native (PeftModel.save_pretrained, keys base_model.model.…)", PEFT_PREFIX, {
            k[len(PEFT_PREFIX):]: k for k in keys}
    if any(k.startswith(UNET_PREFIX) for k in keys):
        others = [k for k in keys if not k.startswith(UNET_PREFIX)]
        if others:
            raise ModelFileError(
                f"{name} is a LoRA for a whole pipeline: besides the UNet it changes {len(others)} tensors of other "
                f"parts ({_sample(others)}), which the Kandinsky 2.2 decoder does not have. {_SOURCE}")
        return "diffusers/peft with the unet. prefix", UNET_PREFIX, {k[len(UNET_PREFIX):]: k for k in keys}
    if any(".processor." in k for k in keys):
        return "diffusers 0.22–0.25 attention processors (unet.save_attn_procs)", "", {k: k for k in keys}
    return "diffusers/peft without prefix (save_lora_adapter)", "", {k: k for k in keys}


def _group(name: str, names: dict[str, str]) -> tuple[dict[str, list], dict[str, str]]:
    """({module: [A key, B key]}, {module: .alpha key}); leftovers refused with what they are."""
    pairs: dict[str, list] = {}
    alphas: dict[str, str] = {}
    other = []
    for new, old in names.items():
        if new.endswith(".lora_A.weight"):
            pairs.setdefault(new[: -len(".lora_A.weight")], [None, None])[0] = old
        elif new.endswith(".lora_B.weight"):
            pairs.setdefault(new[: -len(".lora_B.weight")], [None, None])[1] = old
        elif new.endswith(".alpha"):
            alphas[new[: -len(".alpha")]] = old
        else:
            other.append(old)
    dora = [k for k in other if "lora_magnitude_vector" in k]
    if dora:
        raise ModelFileError(
            f"{name} is a DoRA adapter ({len(dora)} lora_magnitude_vector tensors such as {_sample(dora)}): Load "
            "Decoder LoRA applies plain LoRAs only. Merge it into the UNet with peft (merge_and_unload) and load that "
            "UNet as the decoder, or train a plain LoRA.")
    bias = [k for k in other if ".lora_B." in k and k.endswith(".bias")]
    if bias:
        raise ModelFileError(
            f"{name} holds LoRA biases ({_sample(bias)}, peft's lora_bias=True), which Load Decoder LoRA does not "
            "apply. Train the LoRA without lora_bias.")
    if other:
        raise _not_decoder_lora(name, _describe_foreign(other))
    half = {m: ("lora_A", "lora_B")[ab.index(None)] for m, ab in pairs.items() if None in ab}
    if half:
        module, missing = next(iter(half.items()))
        raise ModelFileError(
            f"{name} is incomplete: {len(half)} of its {len(pairs)} layers miss one of their two LoRA matrices (e.g. "
            f"{module} has no {missing}). Re-export or re-download the file.")
    stray = sorted(set(alphas) - set(pairs))
    if stray:
        raise ModelFileError(f"{name}: the alpha tensor {alphas[stray[0]]} belongs to no LoRA layer of the file.")
    return pairs, alphas


# -- alpha -----------------------------------------------------------------------------------------------------

def _rank_value(value, name: str, where: str) -> int:
    try:
        rank = float(value)
    except (TypeError, ValueError):
        rank = math.nan
    if isinstance(value, bool) or not math.isfinite(rank) or rank != int(rank) or rank < 1:
        zero = " (rank 0: a LoRA without matrices, and alpha/0 is no scale)" if rank == 0 else ""
        raise ModelFileError(
            f"{name}: {where} gives the rank as {value!r}{zero}; a LoRA's rank is a whole number of 1 or more. The "
            "file is damaged or was edited: re-export it (or correct that value to the rank of its tensors).")
    return int(rank)


def _alpha_value(value, name: str, where: str) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ModelFileError(f"{name}: {where} gives alpha as {value!r}, which is not a number.") from None
    if isinstance(value, bool) or not math.isfinite(alpha):
        raise ModelFileError(
            f"{name}: {where} gives alpha as {value!r}; alpha must be a finite number (the scale alpha/rank would "
            "make every picture black). Re-export the LoRA, or set alpha to its rank (scale 1).")
    return alpha


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """peft's rule (peft.utils.other.get_pattern_key): the first pattern P with `module` matching (.*\\.)?(P)$."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return patterns[pattern]
    return default


def _diffusers_config(metadata: Mapping[str, str], prefix: str, name: str) -> dict | None:
    """The LoraConfig diffusers stored in `lora_adapter_metadata` (keys `unet.`-prefixed in pipeline files)."""
    text = metadata.get(DIFFUSERS_METADATA_KEY)
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{name}: the metadata {DIFFUSERS_METADATA_KEY!r} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{name}: the metadata {DIFFUSERS_METADATA_KEY!r} is not a JSON object.")
    prefixed = {k[len(UNET_PREFIX):]: v for k, v in data.items() if k.startswith(UNET_PREFIX)}
    return prefixed if prefixed or prefix == UNET_PREFIX else {k: v for k, v in data.items() if "." not in k} or None


def _peft_config(path: Path, name: str) -> dict | None:
    config = path.with_name(PEFT_CONFIG)
    if path.name != PEFT_WEIGHTS or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{name}: the {PEFT_CONFIG} beside it cannot be read ({exc}).") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{name}: the {PEFT_CONFIG} beside it is not a JSON object.")
    kind = str(data.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ModelFileError(f"{name} is a peft {kind} adapter (its {PEFT_CONFIG} says so), not a LoRA.")
    return data


def _scales(name: str, ranks: dict[str, int], metadata: Mapping[str, str], config: dict | None, config_where: str,
            alpha_tensors: dict[str, float]) -> tuple[dict[str, float], dict[str, float], str]:
    """({module: scale}, {module: alpha}, where alpha came from). Every source the file has must agree."""
    ours_rank = _rank_value(metadata["rank"], name, "its metadata 'rank'") if "rank" in metadata else None
    ours_alpha = _alpha_value(metadata["alpha"], name, "its metadata 'alpha'") if "alpha" in metadata else None
    rslora = False
    if config is not None:
        for flag, what in (("use_dora", "a DoRA adapter"), ("lora_bias", "a LoRA with biases (lora_bias)")):
            if config.get(flag):
                raise ModelFileError(f"{name} is {what} ({config_where} says {flag}: true), which Load Decoder LoRA "
                                     "does not apply. Train a plain LoRA.")
        rslora = bool(config.get("use_rslora"))
    sources = []
    scales, alphas = {}, {}
    for module, rank in ranks.items():
        expected = {}
        if ours_rank is not None:
            expected["its metadata 'rank'"] = ours_rank
        candidates = {}
        if ours_alpha is not None:
            candidates["its metadata 'alpha'"] = ours_alpha
        if config is not None:
            if "r" in config or config.get("rank_pattern"):
                r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
                expected[config_where] = _rank_value(r, name, f"{config_where} (r for {module})")
            a = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
            if a is not None:
                candidates[config_where] = _alpha_value(a, name, f"{config_where} (lora_alpha for {module})")
        if module in alpha_tensors:
            candidates[f"the tensor {module}.alpha"] = alpha_tensors[module]
        for where, r in expected.items():
            if r != rank:
                raise ModelFileError(
                    f"{name}: {where} says rank {r} but its LoRA tensors for {module} have rank {rank}. Refused rather "
                    "than guessed: alpha goes with the rank it was written with, and either guess could rescale the "
                    f"LoRA silently (by {r / rank:g}×). Correct the rank to {rank} in the metadata, or re-export the "
                    "LoRA.")
        if len(set(candidates.values())) > 1:
            listed = ", ".join(f"{where} = {value:g}" for where, value in candidates.items())
            raise ModelFileError(
                f"{name}: its alphas disagree for {module} ({listed}), so its strength cannot be known. Re-export the "
                "LoRA, or make them equal.")
        alpha = next(iter(candidates.values()), float(rank))
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        if not math.isfinite(scale):
            raise ModelFileError(f"{name}: alpha {alpha:g} over rank {rank} for {module} is not a finite scale.")
        scales[module], alphas[module] = scale, alpha
        sources.extend(w for w in candidates if w not in sources)
    source = " and ".join(dict.fromkeys("its .alpha tensors" if s.startswith("the tensor ") else s for s in sources))
    source = f"alpha from {source}" if source else ""
    if rslora:
        source += " (use_rslora: scale alpha/√rank)"
    return scales, alphas, source


# -- reading -----------------------------------------------------------------------------------------------------

def _signature(path: Path) -> tuple:
    st = path.stat()
    sig = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    config = path.with_name(PEFT_CONFIG)
    if path.name == PEFT_WEIGHTS and config.is_file():
        cst = config.stat()
        sig += (cst.st_mtime_ns, cst.st_size)
    return sig


def decoder_lora_signature(path: str | os.PathLike) -> tuple:
    """(path, mtime, size) of a LoRA file, plus its adapter_config.json's when it has one: a changed file reloads."""
    return _signature(Path(path).expanduser())


def _check_path(path: Path) -> None:
    from .fsio import not_regular_reason

    reason = not_regular_reason(path)
    if reason is not None:
        raise ModelFileError(f"Decoder LoRA {path} {reason}. Give the path of a .safetensors LoRA file.")
    if not path.is_file():
        raise ModelFileError(f"Decoder LoRA {path} does not exist (or is not a file).")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise ModelFileError(f"{path.name}: decoder LoRAs are read from .safetensors files only.")


def inspect_decoder_lora(path: str | os.PathLike) -> LoRAFileInfo:
    """What `path` holds, from its header (cached by file signature); ModelFileError saying what the file is when it
    is no decoder LoRA that loads. Reads no LoRA matrix, so NaN values are found only by `load_decoder_lora`."""
    path = Path(path).expanduser()
    _check_path(path)
    return _CHECKS.get(_signature(path), lambda: _inspect(path))


def _inspect(path: Path) -> LoRAFileInfo:
    from safetensors import safe_open

    name = path.name
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = {str(k): str(v) for k, v in (handle.metadata() or {}).items()}
            entries = {k: (handle.get_slice(k).get_dtype(), tuple(handle.get_slice(k).get_shape())) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, …
        raise ModelFileError(
            f"{name} is not a LoRA: it is not a readable .safetensors file ({str(exc)[:200]}). Re-download it; a "
            "partial download is the usual cause.") from exc
    if not entries:
        raise ModelFileError(f"{name} holds no tensors: it is not a LoRA.")
    keys = sorted(entries)
    if not any(_is_lora_key(k) for k in keys):
        raise _what_model(name, entries)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer", "transformer.", "diffusion_model.")) for k in keys):
        raise _not_decoder_lora(name, _describe_foreign(keys))
    layout, prefix, stripped = _layout(keys, name)
    try:
        names = {new: stripped[old] for new, old in _peft_names(stripped).items()}
    except ValueError:
        raise ModelFileError(f"{name} names some LoRA layers twice (in two key layouts); re-export it.") from None
    pairs, alpha_keys = _group(name, names)
    foreign = [m for m in pairs if not _DECODER_MODULE.fullmatch(m)]
    if foreign:
        raise _not_decoder_lora(name, _describe_foreign([prefix + m for m in foreign]))
    if prefix == "" and layout.startswith("diffusers 0.22"):
        layout += f", {len(keys)} tensors"

    ranks = {}
    for module, (a_key, b_key) in sorted(pairs.items()):
        for key in (a_key, b_key):
            dtype = entries[key][0]
            if dtype not in _FLOAT_DTYPES:
                raise ModelFileError(
                    f"{name}: the tensor {key} is stored as {dtype}; LoRA matrices are floating point (fp32, fp16, "
                    "bf16). The file is not a LoRA that can be applied; re-export it.")
        a_shape, b_shape = entries[a_key][1], entries[b_key][1]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ModelFileError(
                f"{name}: {module} has LoRA matrices of shapes {list(a_shape)} and {list(b_shape)}, which do not form a "
                "rank-r update of a Linear layer (A [r, in], B [out, r]).")
        if a_shape[0] == 0:
            raise ModelFileError(
                f"{name}: {a_key} has shape {list(a_shape)}: a rank-0 LoRA changes nothing and has no scale "
                "(alpha/0). The file is damaged; re-export it.")
        ranks[module] = int(a_shape[0])

    alpha_tensors = {}
    scalars = _read_scalars(path, [k for k in alpha_keys.values() if math.prod(entries[k][1]) == 1])
    for module, key in alpha_keys.items():
        value = scalars.get(key)
        if value is None or not value.is_floating_point() and value.dtype not in (torch.int64, torch.int32):
            raise ModelFileError(f"{name}: the alpha tensor {key} is not a single number ({list(entries[key][1])}).")
        alpha_tensors[module] = _alpha_value(float(value.reshape(())), name, f"the tensor {key}")

    config, config_where, warning = _diffusers_config(metadata, prefix, name), f"its {DIFFUSERS_METADATA_KEY}", ""
    if prefix == PEFT_PREFIX:
        config, config_where = _peft_config(path, name), f"the {PEFT_CONFIG} beside it"
        if config is None and "alpha" not in metadata and not alpha_tensors:
            warning = (f"Decoder LoRA {name} is a peft-native file without the {PEFT_CONFIG} that "
                       f"PeftModel.save_pretrained writes beside it (as {PEFT_WEIGHTS}): alpha is taken as the rank "
                       "(scale 1). If it was trained with another lora_alpha, put its adapter_config.json next to it "
                       "(both in one folder under models/loras, the file named adapter_model.safetensors).")
    scales, alphas, source = _scales(name, ranks, metadata, config, config_where, alpha_tensors)
    if not source:
        source = ("diffusers 0.22–0.25 stored no alpha: alpha = rank" if layout.startswith("diffusers 0.22")
                  else "no alpha stored: alpha = rank, as diffusers assumes")
    scale = collections.Counter(scales.values()).most_common(1)[0][0]
    common = next(m for m in sorted(scales) if scales[m] == scale)
    return LoRAFileInfo(str(path), layout, {m: tuple(pairs[m]) for m in sorted(pairs)}, ranks, scales,
                        collections.Counter(ranks.values()).most_common(1)[0][0], alphas[common], scale, source,
                        metadata, warning)


def _read_scalars(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The few one-number tensors (kohya-style .alpha) of a file that is otherwise a decoder LoRA."""
    if not keys:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in keys}
    except Exception as exc:
        raise ModelFileError(f"{path.name}: its alpha tensors cannot be read ({str(exc)[:200]}). Re-download it.") from exc


def decoder_lora_problem(path: str | os.PathLike) -> str | None:
    """None when `path` is a decoder LoRA that loads (header checks only), else the message saying what it is."""
    try:
        inspect_decoder_lora(path)
    except ModelFileError as exc:
        return str(exc)
    return None


def looks_like_decoder_lora(path: str | os.PathLike) -> bool:
    """Header-only check for menus (cached by file signature): True exactly for the files `inspect_decoder_lora`
    accepts."""
    return decoder_lora_problem(path) is None


def load_decoder_lora(path: str | os.PathLike) -> DecoderLoRA:
    """Read a decoder LoRA file in any of the formats above; ModelFileError saying what a file that is none is,
    NonFiniteError for NaN/inf values (naming the tensor)."""
    from safetensors import safe_open

    info = inspect_decoder_lora(path)
    name = Path(info.path).name
    layers = {}
    try:
        with safe_open(info.path, framework="pt") as handle:
            for module, (a_key, b_key) in info.keys.items():
                pair = []
                for key in (a_key, b_key):
                    tensor = handle.get_tensor(key).float()
                    bad = int((~torch.isfinite(tensor)).sum())
                    if bad:
                        raise NonFiniteError(
                            f"Decoder LoRA {name}: its tensor {key} holds {bad} NaN/infinite value(s) of "
                            f"{tensor.numel()}, which would make every picture black. The file is damaged (or its "
                            "training diverged): re-export it from a good checkpoint, or re-train.")
                    pair.append(tensor)
                a, b = pair
                factor = info.scales[module] / info.scale
                layers[module] = (a.contiguous(), (b * factor if factor != 1 else b).contiguous())
    except NonFiniteError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{name} could not be read ({str(exc)[:200]}). Re-download or re-export it.") from exc
    if info.warning:
        log.warning("%s", info.warning)
    log.info("Decoder LoRA %s: %s, %d layers, rank %d, alpha %g, scale %g (%s).", name, info.layout, len(layers),
             info.rank, info.alpha, info.scale, info.alpha_source)
    return DecoderLoRA(info.path, layers, info.alpha, info.rank, dict(info.metadata), info.scale, info.layout)


def check_lora_fits(lora: DecoderLoRA, unet) -> None:
    """ModelFileError unless every LoRA layer names a Linear of `unet` with matching shapes."""
    modules = dict(unet.named_modules())
    name = Path(lora.path).name
    missing = [m for m in lora.layers if m not in modules]
    if missing:
        raise ModelFileError(
            f"{name} does not fit this Kandinsky 2.2 decoder UNet: {len(missing)} of its {len(lora.layers)} layers "
            f"name modules the UNet does not have (e.g. {', '.join(missing[:3])}); it looks like "
            f"{_describe_foreign(['unet.' + m + '.lora_A.weight' for m in missing])}. Use a LoRA trained with "
            "`python -m lambda_eclipse.trainer finetune-decoder` on this decoder."
        )
    for module_name, (a, b) in lora.layers.items():
        module = modules[module_name]
        if not isinstance(module, torch.nn.Linear):
            raise ModelFileError(f"{name}: {module_name} is a {type(module).__name__} in this UNet, not a Linear layer.")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise ModelFileError(
                f"{name} was trained for a UNet of another size: {module_name} is {module.in_features}→"
                f"{module.out_features} here but {a.shape[1]}→{b.shape[0]} in the LoRA (base decoder of the LoRA: "
                f"{lora.metadata.get('base_decoder', 'not recorded')})."
            )


# -- applying -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lora_active(unet, loras: Iterable[tuple[DecoderLoRA, float]]):
    """Within the block, `unet`'s targeted Linear layers add strength·alpha/rank·B(A(x)); restored on exit."""
    modules = dict(unet.named_modules())
    handles = []
    try:
        for lora, strength in loras:
            if strength == 0:
                continue
            scale = float(strength) * lora.scale
            for module_name in lora.layers:
                module = modules[module_name]
                handles.append(module.register_forward_hook(_make_hook(lora, module_name, scale)))
        yield unet
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(lora: DecoderLoRA, module_name: str, scale: float):
    def hook(module, args, output):
        x = args[0]
        a, b = lora.weights_for(module.weight.device, x.dtype)[module_name]
        return output + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)

    return hook


class LoRAUNet:
    """The base UNet with LoRAs on while it is called; every attribute (config, dtype, device, to…) is the base's."""

    def __init__(self, base, loras: tuple[tuple[DecoderLoRA, float], ...]):
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "loras", tuple(loras))

    def __call__(self, *args, **kwargs):
        with lora_active(self.base, self.loras):
            return self.base(*args, **kwargs)

    forward = __call__

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def __repr__(self) -> str:
        parts = ", ".join(f"{Path(l.path).name}@{s:g}" for l, s in self.loras)
        return f"LoRAUNet({type(self.base).__name__}, {parts})"


def base_decoder(decoder: KandinskyDecoder) -> KandinskyDecoder:
    """The decoder without any applied LoRA (the same objects; nothing is copied)."""
    if isinstance(decoder.unet, LoRAUNet):
        return replace(decoder, unet=decoder.unet.base, source=decoder.source.split(" + LoRA ")[0])
    return decoder


remove_decoder_lora = base_decoder


def decoder_loras(decoder: KandinskyDecoder) -> tuple[tuple[DecoderLoRA, float], ...]:
    return decoder.unet.loras if isinstance(decoder.unet, LoRAUNet) else ()


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not torch.isfinite(torch.tensor(float(strength))):
        raise InputError(f"LoRA strength must be a finite number (0 = off, 1 = as trained); got {strength!r}.")
    return float(strength)


def apply_decoder_lora(decoder: KandinskyDecoder, lora: str | os.PathLike | DecoderLoRA, strength: float = 1.0
                       ) -> KandinskyDecoder:
    """A new decoder that decodes with `lora` (a file or a loaded `DecoderLoRA`) at `strength`, sharing (never
    copying, never changing) `decoder`'s UNet and MoVQ. Chainable: applying to a LoRA decoder adds another LoRA.
    `decoder` itself keeps decoding as before. `remove_decoder_lora(result)` gives the base decoder back."""
    strength = _check_strength(strength)
    if not isinstance(lora, DecoderLoRA):
        lora = load_decoder_lora(lora)
    base = base_decoder(decoder)
    check_lora_fits(lora, base.unet)
    loras = decoder_loras(decoder) + ((lora, strength),)
    label = ", ".join(f"{Path(l.path).name}@{s:g}" for l, s in loras)
    return replace(base, unet=LoRAUNet(base.unet, loras), source=f"{base.source} + LoRA {label}")


def diffusers_lora_config(rank, alpha, target_modules: Iterable[str] | None = None) -> dict:
    """The LoraConfig fields diffusers' `load_lora_adapter` builds the adapter from (in `lora_adapter_metadata`)."""
    alpha = float(alpha)
    return {"r": int(rank), "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "target_modules": sorted(target_modules or LORA_TARGETS), "rank_pattern": {}, "alpha_pattern": {},
            "use_rslora": False, "use_dora": False}


def lora_metadata(**values) -> dict[str, str]:
    """Safetensors metadata (str → str) for a decoder LoRA file; lists/dicts as JSON.

    With `rank` and `alpha` given, diffusers' `lora_adapter_metadata` is written too (keys prefixed ``unet.``, as a
    pipeline's save_lora_weights writes them), so `load_lora_adapter(file, prefix="unet")` applies our alpha/rank
    instead of assuming alpha = rank."""
    out = {"format": "pt", "format_tag": FORMAT_TAG}
    for key, value in values.items():
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    if "rank" in values and "alpha" in values:
        config = diffusers_lora_config(values["rank"], values["alpha"], values.get("target_modules"))
        out[DIFFUSERS_METADATA_KEY] = json.dumps({UNET_PREFIX + k: v for k, v in config.items()}, sort_keys=True)
    return out
