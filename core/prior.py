"""The λ-ECLIPSE prior: one transformer pass from interleaved CLIP features to a CLIP image embedding.

The module mirrors the official `PriorTransformer` (diffusers' unCLIP prior without the timestep path,
plus a control token) parameter for parameter, so the published checkpoint loads unchanged.
Sequence: [text tokens 0..76 | control | pooled text | noise | prd], learned positional table,
additive padding mask plus causal mask, pre-LN blocks, read-out of the prd token.
`clip_mean`/`clip_std` are kept for checkpoint compatibility but never used, as in the official code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import ModelFileError, NonFiniteError
from .loading import (
    CheckCache,
    first_existing,
    load_state_dict,
    read_json,
    read_safetensors_metadata,
    resolve_dtype,
    save_file_atomic,
    write_json_atomic,
)

log = logging.getLogger("lambda_eclipse")

# The official code uses a finite bias rather than -inf, so a row with every key masked stays finite.
MASK_BIAS = -10000.0
CONFIG_METADATA_KEY = "lambda_eclipse_prior_config"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass
class PriorConfig:
    """Architecture of the prior; field names and defaults match the published config.json."""

    num_attention_heads: int = 16
    attention_head_dim: int = 32
    num_layers: int = 10
    embedding_dim: int = 1280
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def proj_dim(self) -> int:
        return self.embedding_proj_dim or self.embedding_dim

    @property
    def out_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    @property
    def sequence_length(self) -> int:
        return self.num_embeddings + self.additional_embeddings

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PriorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in data if k not in known and not k.startswith("_"))
        if ignored:
            log.debug("prior config keys not used by the λ-ECLIPSE prior: %s", ignored)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # Same class name as the official checkpoint, so diffusers-based code reads our exports too.
        out["_class_name"] = "PriorTransformer"
        return out

    def validate(self):
        if self.additional_embeddings != 4:
            raise ModelFileError(
                f"additional_embeddings={self.additional_embeddings}: the λ-ECLIPSE prior needs 4 "
                "(control, pooled text, noise, prd). Fix config.json."
            )
        if self.added_emb_type not in ("prd", None):
            raise ModelFileError(f"added_emb_type={self.added_emb_type!r} is not supported (use 'prd').")
        if self.added_emb_type is None:
            raise ModelFileError("added_emb_type=None has no read-out token; the published prior uses 'prd'.")
        if self.encoder_hid_proj_type not in ("linear", None):
            raise ModelFileError(f"encoder_hid_proj_type={self.encoder_hid_proj_type!r} is not supported.")
        for name in ("norm_in_type", "embedding_proj_norm_type"):
            if getattr(self, name) not in ("layer", None):
                raise ModelFileError(f"{name}={getattr(self, name)!r} is not supported (use 'layer' or null).")


@dataclass
class PriorOutput:
    """Same attribute name as the official output, so official calling code works unchanged."""

    predicted_image_embedding: torch.Tensor


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=True)
        self.to_k = nn.Linear(dim, inner, bias=True)
        self.to_v = nn.Linear(dim, inner, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[1](self.to_out[0](rearrange(out, "b h n d -> b n (h d)")))


class _GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x))  # exact (erf) GELU, as diffusers' "gelu"


class _FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        # Index layout of diffusers' FeedForward: net.0 = GELU(proj), net.1 = dropout, net.2 = out.
        self.net = nn.ModuleList([_GELUProj(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class _Block(nn.Module):
    """diffusers BasicTransformerBlock, self-attention only (norm1, attn1, norm3, ff)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = _FeedForward(dim, dropout)

    def forward(self, x, bias):
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class LambdaEclipsePrior(nn.Module):
    """The λ-ECLIPSE prior transformer. `forward` takes the official keyword arguments; `predict` is ours."""

    def __init__(self, config: PriorConfig | None = None):
        super().__init__()
        config = config or PriorConfig()
        config.validate()
        self.config = config
        D, E, P = config.inner_dim, config.embedding_dim, config.proj_dim

        self.proj_in = nn.Linear(E, D)
        self.embedding_proj_norm = nn.LayerNorm(P) if config.embedding_proj_norm_type == "layer" else None
        self.embedding_proj = nn.Linear(P, D)
        self.embedding_control = nn.Linear(P, D)
        self.encoder_hidden_states_proj = nn.Linear(E, D) if config.encoder_hid_proj_type == "linear" else None
        self.positional_embedding = nn.Parameter(torch.zeros(1, config.sequence_length, D))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, D))
        self.transformer_blocks = nn.ModuleList(
            [_Block(D, config.num_attention_heads, config.attention_head_dim, config.dropout) for _ in range(config.num_layers)]
        )
        self.norm_in = nn.LayerNorm(D) if config.norm_in_type == "layer" else None
        self.norm_out = nn.LayerNorm(D)
        self.proj_to_clip_embeddings = nn.Linear(D, config.out_dim)
        L = config.sequence_length
        causal = torch.full((L, L), MASK_BIAS).triu_(1)[None]
        self.register_buffer("causal_attention_mask", causal, persistent=False)
        # Stored in checkpoints, unused by forward (the official pipeline never post-processes).
        self.clip_mean = nn.Parameter(torch.zeros(1, config.out_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, config.out_dim))

    # -- official signature -------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        control_embedding: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        if control_embedding is None:
            raise ValueError(
                "control_embedding is required. For 'no edge map' pass the CLIP embedding of the blank "
                "image (ClipEncoder.blank_embedding()), as the official pipeline does."
            )
        batch = hidden_states.shape[0]
        dtype = self.proj_in.weight.dtype
        p = proj_embedding.to(dtype)
        if self.embedding_proj_norm is not None:
            p = self.embedding_proj_norm(p)
        tokens = [
            self.embedding_control(control_embedding.to(dtype))[:, None],
            self.embedding_proj(p)[:, None],
            self.proj_in(hidden_states.to(dtype))[:, None],
            self.prd_embedding.to(dtype).expand(batch, -1, -1),
        ]
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.to(dtype)
            if self.encoder_hidden_states_proj is not None:
                text = self.encoder_hidden_states_proj(text)
            tokens.insert(0, text)
        seq = torch.cat(tokens, dim=1)
        seq = seq + self._positional(seq.shape[1]).to(dtype)

        bias = None
        if attention_mask is not None:
            # Only with a mask does the official code add the causal term (it is fully bidirectional otherwise).
            m = attention_mask.to(dtype)
            pad = (1 - m) * MASK_BIAS
            pad = F.pad(pad, (0, self.config.additional_embeddings), value=0.0)
            bias = (pad[:, None, :] + self.causal_attention_mask.to(dtype))[:, None]  # [B,1,L,L], broadcast over heads

        if self.norm_in is not None:
            seq = self.norm_in(seq)
        for block in self.transformer_blocks:
            seq = block(seq, bias)
        seq = self.norm_out(seq)
        out = self.proj_to_clip_embeddings(seq[:, -1])
        return PriorOutput(out) if return_dict else (out,)

    def _positional(self, length: int) -> torch.Tensor:
        table = self.positional_embedding
        if table.shape[1] != length:
            raise ValueError(
                f"The prior's positional table has {table.shape[1]} rows but the input makes a sequence of "
                f"{length}; text features must have {self.config.num_embeddings} tokens."
            )
        return table

    # -- our clearer entry point ----------------------------------------------------------------
    def predict(
        self,
        noise: torch.Tensor,
        text_embedding: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        control_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """[B,E] noise, [B,E'] pooled text, [B,77,E] interleaved tokens, [B,77] mask, [B,E'] control → [B,E]."""
        return self.forward(
            noise, proj_embedding=text_embedding, encoder_hidden_states=text_tokens,
            attention_mask=text_mask, control_embedding=control_embedding,
        ).predicted_image_embedding

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- loading ---------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    path: str
    config_source: str  # "config.json", "file metadata" or "inferred from tensors"
    inferred: dict[str, Any]
    dtype: str
    parameters: int

    def describe(self) -> str:
        extra = f" (inferred: {self.inferred})" if self.inferred else ""
        return f"λ-ECLIPSE prior from {self.path}: config from {self.config_source}{extra}, {self.parameters:,} parameters, {self.dtype}"


def check_is_lambda_prior(state_dict: dict[str, torch.Tensor], name: str):
    """Tell a wrong file apart from a λ-ECLIPSE prior with a message that says what it is."""
    keys = state_dict.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("time_embedding.") or has("time_proj."):
        raise ModelFileError(
            f"{name} is a diffusion prior (it has time_embedding.* and no embedding_control.*), e.g. the "
            "Kandinsky 2.2 prior, not the λ-ECLIPSE prior. Use ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0."
        )
    if not has("embedding_control.") or not has("proj_to_clip_embeddings."):
        hint = ""
        if has("conv_in.") or has("down_blocks."):
            hint = " It looks like a UNet/VAE."
        elif has("visual.") or has("text_projection") or has("vision_model."):
            hint = " It looks like a CLIP model (use it in the CLIP loader)."
        raise ModelFileError(
            f"{name} is not a λ-ECLIPSE prior: it lacks embedding_control.* and/or proj_to_clip_embeddings.*.{hint} "
            "Load Lambda-ECLIPSE-Prior-v1.0 (diffusion_pytorch_model.safetensors + config.json)."
        )


def infer_config(state_dict: dict[str, torch.Tensor]) -> tuple[PriorConfig, dict[str, Any]]:
    """Architecture from tensor shapes alone (heads are not in the shapes: 16×32 when the width is 512)."""
    proj_in = state_dict["proj_in.weight"]
    inner, embedding_dim = proj_in.shape
    layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks."))
    seq_len = state_dict["positional_embedding"].shape[1]
    additional = 4
    if inner == 512:
        heads, head_dim = 16, 32
    else:
        head_dim = 64 if inner % 64 == 0 else (32 if inner % 32 == 0 else inner)
        heads = inner // head_dim
        log.warning(
            "prior width %d is not the published 512: assuming %d heads × %d. Ship a config.json to be sure.",
            inner, heads, head_dim,
        )
    proj_dim = state_dict["embedding_proj.weight"].shape[1]
    out_dim = state_dict["proj_to_clip_embeddings.weight"].shape[0]
    config = PriorConfig(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        embedding_dim=embedding_dim,
        num_embeddings=seq_len - additional,
        additional_embeddings=additional,
        norm_in_type="layer" if "norm_in.weight" in state_dict else None,
        embedding_proj_norm_type="layer" if "embedding_proj_norm.weight" in state_dict else None,
        encoder_hid_proj_type="linear" if "encoder_hidden_states_proj.weight" in state_dict else None,
        added_emb_type="prd" if "prd_embedding" in state_dict else None,
        embedding_proj_dim=None if proj_dim == embedding_dim else proj_dim,
        clip_embed_dim=None if out_dim == embedding_dim else out_dim,
    )
    inferred = {
        "num_layers": layers, "inner_dim": inner, "heads": f"{heads}x{head_dim}",
        "embedding_dim": embedding_dim, "num_embeddings": seq_len - additional,
    }
    return config, inferred


def resolve_prior_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a diffusers-style folder or a single file."""
    path = Path(path)
    if path.is_dir():
        weights = first_existing(path, WEIGHT_NAMES)
        if weights is None:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise ModelFileError(
                f"No prior weights in folder {path}: expected one of {', '.join(WEIGHT_NAMES)}; found {found}. "
                "Download diffusion_pytorch_model.safetensors and config.json from "
                "https://huggingface.co/ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0 into it."
            )
        config = path / "config.json"
        return weights, config if config.is_file() else None
    if not path.exists():
        raise ModelFileError(f"Prior not found: {path}. Give a .safetensors file or a folder with config.json.")
    from .fsio import require_regular_file

    require_regular_file(path, "prior file", ModelFileError)
    sibling = path.parent / "config.json"
    # A config.json next to a single file is used only when the file is the folder's own weights.
    if path.name in WEIGHT_NAMES and sibling.is_file():
        return path, sibling
    return path, None


def load_prior(path: str | os.PathLike, device: str | torch.device = "cpu", dtype="fp32") -> LambdaEclipsePrior:
    """Load the published λ-ECLIPSE prior (folder or single file) unchanged; `.load_report` says how."""
    dtype = resolve_dtype(dtype)
    weights, config_path = resolve_prior_files(path)
    state_dict = load_state_dict(weights)
    check_is_lambda_prior(state_dict, weights.name)
    check_prior_values(state_dict, weights.name)

    inferred: dict[str, Any] = {}
    if config_path is not None:
        config = PriorConfig.from_dict(read_json(config_path))
        source = "config.json"
    elif CONFIG_METADATA_KEY in (meta := read_safetensors_metadata(weights)):
        config = PriorConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
        source = "file metadata"
    else:
        config, inferred = infer_config(state_dict)
        source = "inferred from tensors"

    model = LambdaEclipsePrior(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ModelFileError(
            f"{weights.name} does not match the prior architecture ({source}). "
            f"Missing: {missing[:5]}{'…' if len(missing) > 5 else ''}; unexpected: {unexpected[:5]}"
            f"{'…' if len(unexpected) > 5 else ''}; shape mismatches: {wrong_shape[:3]}. "
            "If config.json belongs to another model, remove it so the architecture is read from the tensors."
        )
    model.load_state_dict(state_dict, strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.load_report = LoadReport(str(path), source, inferred, str(dtype).replace("torch.", ""), model.num_parameters)
    log.info(model.load_report.describe())
    return model


def save_prior(model: LambdaEclipsePrior, path: str | os.PathLike, single_file: bool = False, dtype="fp32") -> Path:
    """Export in what `load_prior` reads: a diffusers-style folder, or one .safetensors with the config inside."""
    dtype = resolve_dtype(dtype)
    tensors = {k: v.to(dtype) for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    path = Path(path)
    if single_file:
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        save_file_atomic(tensors, path, metadata={CONFIG_METADATA_KEY: json.dumps(config)})
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file_atomic(tensors, path / "diffusion_pytorch_model.safetensors")
    write_json_atomic(config, path / "config.json")
    return path


@dataclass
class PriorFileInfo:
    """What a prior file's header says, read without loading its tensors."""

    path: str
    layers: int
    width: int
    embedding_dim: int
    parameters: int


_SNIFF_CACHE = CheckCache()


FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _not_float_message(name: str, key: str, dtype: str) -> str:
    return (f"{name}: the prior tensor '{key}' is stored as {dtype}, not as floating point (fp32/fp16/bf16). A "
            "quantised or converted prior cannot be used as it is: use the published fp32 file, or re-export the "
            "prior with `python -m lambda_eclipse.trainer export`.")


def check_prior_values(state_dict, name: str):
    """Every prior tensor floating point and finite: an int8/bool prior or one holding NaN (a diverged run) would
    make pictures from garbage without a word."""
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise ModelFileError(_not_float_message(name, key, str(tensor.dtype).replace("torch.", "")))
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{name}: the prior tensor '{key}' holds {int(tensor.isnan().sum())} NaN and {int(tensor.isinf().sum())} "
                "infinite values, so its embeddings would be NaN. The file is damaged or was saved from a diverged "
                "training run: use another checkpoint, or download the published prior again."
            )


def sniff_prior(path: str | os.PathLike) -> PriorFileInfo:
    """Check from the header only (keys and shapes) that a file or folder is a λ-ECLIPSE prior.

    Raises ModelFileError saying what the file is otherwise. Cached by (path, mtime, size): menus call it often.
    """
    weights, _config = resolve_prior_files(path)
    st = weights.stat()
    key = (str(weights.resolve()), st.st_mtime_ns, st.st_size)
    return _SNIFF_CACHE.get(key, lambda: _sniff_prior_uncached(weights))


def _sniff_prior_uncached(weights: Path) -> PriorFileInfo:
    if weights.suffix.lower() != ".safetensors":
        # Pickle-container files cannot be inspected without reading them whole; load_prior checks them.
        raise ModelFileError(f"{weights.name}: only .safetensors priors can be checked without loading them.")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            slices = {k: handle.get_slice(k) for k in handle.keys()}
            shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
            dtypes = {k: str(v.get_dtype()) for k, v in slices.items()}
    except Exception as exc:
        raise ModelFileError(f"{weights.name} is not a readable .safetensors file ({exc}). Re-download it.") from exc
    check_is_lambda_prior(shapes, weights.name)
    for key, dtype in dtypes.items():
        if dtype.upper() not in FLOAT_DTYPES:
            raise ModelFileError(_not_float_message(weights.name, key, dtype))
    try:
        width, embedding_dim = shapes["proj_in.weight"]
        layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{weights.name} lacks the prior's proj_in / transformer_blocks tensors ({exc}).") from exc
    parameters = sum(math.prod(s) for s in shapes.values())
    return PriorFileInfo(str(weights), layers, int(width), int(embedding_dim), int(parameters))
