"""The prior: official keys/shapes, the forward pass as forward_notes.md describes it, loading and its errors."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lambda_eclipse.core.errors import ModelFileError
from lambda_eclipse.core.prior import (
    LambdaEclipsePrior,
    PriorConfig,
    load_prior,
    save_prior,
)
from lambda_eclipse.core.tiny import make_tiny_prior

# The published checkpoint's tensor names and shapes (a list of names and shapes, no weights).
REFERENCE = Path(__file__).resolve().parent / "data" / "official_prior_keys.json"


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


def test_paper_config_matches_official_checkpoint_tensors(reference):
    model = LambdaEclipsePrior(PriorConfig(**{k: v for k, v in reference["config"].items()}))
    sd = model.state_dict()
    assert len(sd) == reference["num_state_dict_keys"] == 176
    assert set(sd) == set(reference["state_dict"])
    for key, spec in reference["state_dict"].items():
        assert list(sd[key].shape) == spec["shape"], key
    assert model.num_parameters == reference["total_parameters"] == 34_849_536
    assert "causal_attention_mask" not in sd  # non-persistent, rebuilt from the config
    assert tuple(model.causal_attention_mask.shape) == (1, 81, 81)


@pytest.mark.parametrize("variant", ["norm_in_type=layer", "embedding_proj_norm_type=layer", "both=layer"])
def test_config_variants_have_the_official_keys(reference, variant):
    spec = reference["variants"][variant]
    model = LambdaEclipsePrior(PriorConfig(**{**reference["config"], **spec["config_overrides"]}))
    assert set(model.state_dict()) == set(reference["state_dict"]) | set(spec["extra_keys"])
    assert model.num_parameters == spec["total_parameters"]


def reference_forward(model, x, p, T, m, c):
    """An independent float64 re-implementation of forward_notes.md, step by step."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, Dh = cfg.num_attention_heads, cfg.attention_head_dim
    lin = lambda name, t: t @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731

    def ln(name, t):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    B = x.shape[0]
    seq = torch.cat([lin("encoder_hidden_states_proj", T), lin("embedding_control", c)[:, None], lin("embedding_proj", p)[:, None],
                     lin("proj_in", x)[:, None], sd["prd_embedding"].expand(B, -1, -1)], 1)
    seq = seq + sd["positional_embedding"]
    L = seq.shape[1]
    bias = (1 - m.double()) * -10000.0
    bias = torch.cat([bias, torch.zeros(B, 4, dtype=torch.float64)], 1)[:, None, :] + torch.full((L, L), -10000.0, dtype=torch.float64).triu(1)
    bias = bias.repeat_interleave(H, dim=0)  # batch-major: row b*H + h
    for i in range(cfg.num_layers):
        pre = f"transformer_blocks.{i}."
        h = ln(pre + "norm1", seq)
        q, k, v = (lin(pre + f"attn1.to_{n}", h) for n in "qkv")
        split = lambda t: t.reshape(B, L, H, Dh).permute(0, 2, 1, 3).reshape(B * H, L, Dh)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=1, alpha=1 / math.sqrt(Dh)), -1) @ v
        att = att.reshape(B, H, L, Dh).permute(0, 2, 1, 3).reshape(B, L, H * Dh)
        seq = seq + lin(pre + "attn1.to_out.0", att)
        h = ln(pre + "norm3", seq)
        seq = seq + lin(pre + "ff.net.2", torch.nn.functional.gelu(lin(pre + "ff.net.0.proj", h)))
    seq = ln("norm_out", seq)
    return lin("proj_to_clip_embeddings", seq[:, -1])


def inputs(batch=3, dim=32, seed=0, real=(9, 4, 77)):
    g = torch.Generator().manual_seed(seed)
    x, p, c = (torch.randn(batch, dim, generator=g) for _ in range(3))
    T = torch.randn(batch, 77, dim, generator=g)
    m = torch.zeros(batch, 77, dtype=torch.int64)
    for b, n in enumerate(real[:batch]):
        m[b, :n] = 1
    return x, p, T, m, c


def test_forward_matches_forward_notes_in_float64():
    model = make_tiny_prior(seed=3).double()
    x, p, T, m, c = (t.double() if t.is_floating_point() else t for t in inputs())
    ours = model(x, proj_embedding=p, encoder_hidden_states=T, attention_mask=m, control_embedding=c).predicted_image_embedding
    ref = reference_forward(model, x, p, T, m, c)
    assert ours.shape == (3, 32)
    assert (ours - ref).abs().max().item() < 1e-10


def test_forward_float32_close_to_float64():
    model = make_tiny_prior(seed=3)
    x, p, T, m, c = inputs()
    out32 = model.predict(x, p, T, m, c)
    ref = reference_forward(model, x.double(), p.double(), T.double(), m, c.double())
    assert (out32.double() - ref).abs().max().item() < 1e-5


def test_official_keyword_call_and_tuple_return():
    model = make_tiny_prior()
    x, p, T, m, c = inputs()
    out = model(hidden_states=x, proj_embedding=p, encoder_hidden_states=T, attention_mask=m, control_embedding=c)
    (tup,) = model(x, p, T, m, c, return_dict=False)
    assert torch.equal(out.predicted_image_embedding, tup)


def test_effects_named_in_the_notes():
    model = make_tiny_prior(seed=1).double()
    x, p, T, m, c = (t.double() if t.is_floating_point() else t for t in inputs())
    base = model.predict(x, p, T, m, c)
    # Padded text positions have exactly zero influence.
    T2 = T.clone()
    T2[m == 0] = 1e3
    assert torch.equal(model.predict(x, p, T2, m, c), base)
    # int64 and bool masks give identical results.
    assert torch.equal(model.predict(x, p, T, m.bool(), c), base)
    # Rows are independent of the batch.
    assert (model.predict(x[1:2], p[1:2], T[1:2], m[1:2], c[1:2]) - base[1:2]).abs().max() < 1e-12
    # Control and pooled text are different tokens: swapping them changes the output.
    assert (model.predict(x, c, T, m, p) - base).abs().max() > 1e-3
    # Without a mask there is no causal mask either (fully bidirectional), unlike an all-ones mask.
    ones = torch.ones_like(m)
    no_mask = model(x, p, T, None, c).predicted_image_embedding
    assert (no_mask - model.predict(x, p, T, ones, c)).abs().max() > 1e-3
    # Each input matters.
    for changed in (model.predict(x + 1, p, T, m, c), model.predict(x, p, T, m, c + 1), model.predict(x, p + 1, T, m, c)):
        assert (changed - base).abs().max() > 1e-4


def test_clip_mean_std_are_not_used():
    model = make_tiny_prior()
    x, p, T, m, c = inputs()
    before = model.predict(x, p, T, m, c)
    with torch.no_grad():
        model.clip_mean.fill_(5.0)
        model.clip_std.fill_(3.0)
    assert torch.equal(model.predict(x, p, T, m, c), before)


def test_control_is_required_with_a_clear_message():
    model = make_tiny_prior()
    x, p, T, m, _ = inputs()
    with pytest.raises(ValueError, match="blank"):
        model(x, proj_embedding=p, encoder_hidden_states=T, attention_mask=m)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-2), (torch.bfloat16, 1e-1)])
def test_half_precisions(tmp_path, dtype, tol):
    path = save_prior(make_tiny_prior(seed=2), tmp_path / "p")
    ref = load_prior(path)
    half = load_prior(path, dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
    assert half.proj_in.weight.dtype == dtype
    x, p, T, m, c = inputs()
    out = half.predict(x, p, T, m, c)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref.predict(x, p, T, m, c)).abs().max() < tol


def test_folder_single_file_and_inferred_load_agree(tmp_path, caplog_eclipse):
    model = make_tiny_prior(seed=5)
    folder = save_prior(model, tmp_path / "folder")
    single = save_prior(model, tmp_path / "single.safetensors", single_file=True)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    x, p, T, m, c = inputs()
    ref = model.predict(x, p, T, m, c)
    loaded = {name: load_prior(path) for name, path in (("folder", folder), ("single", single), ("bare", bare))}
    assert loaded["folder"].load_report.config_source == "config.json"
    assert loaded["single"].load_report.config_source == "file metadata"
    assert loaded["bare"].load_report.config_source == "inferred from tensors"
    # Tiny width 16 is not the published 512, so heads are a guess: the math of a 1-layer head split differs,
    # but the folder and file-metadata loads are exact.
    assert torch.equal(loaded["folder"].predict(x, p, T, m, c), ref)
    assert torch.equal(loaded["single"].predict(x, p, T, m, c), ref)
    assert "config from config.json" in caplog_eclipse.text


def test_paper_size_checkpoint_without_config_infers_16x32(tmp_path):
    model = LambdaEclipsePrior(PriorConfig())
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_prior(path)
    assert loaded.load_report.config_source == "inferred from tensors"
    assert loaded.config.num_attention_heads == 16 and loaded.config.attention_head_dim == 32
    assert loaded.config.num_layers == 10 and loaded.config.embedding_dim == 1280 and loaded.config.num_embeddings == 77
    assert "16x32" in loaded.load_report.describe()


def test_official_folder_layout_with_diffusers_config(tmp_path):
    """The published config.json carries _class_name/_diffusers_version and unused keys; they are accepted."""
    model = make_tiny_prior(seed=9)
    folder = save_prior(model, tmp_path / "Lambda-ECLIPSE-Prior-v1.0")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({"_diffusers_version": "0.26.0", "time_embed_act_fn": "silu", "num_embeddings": 77})
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_prior(folder)
    x, p, T, m, c = inputs()
    assert torch.equal(loaded.predict(x, p, T, m, c), model.predict(x, p, T, m, c))


def _write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_wrong_files_are_named(tmp_path):
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    kandinsky_prior = _write(tmp_path, "kandinsky_prior.safetensors", {"time_embedding.linear_1.weight": z(2, 2), "proj_in.weight": z(2, 2)})
    with pytest.raises(ModelFileError, match="diffusion prior.*time_embedding"):
        load_prior(kandinsky_prior)
    unet = _write(tmp_path, "unet.safetensors", {"conv_in.weight": z(2, 2), "down_blocks.0.x": z(1)})
    with pytest.raises(ModelFileError, match="not a λ-ECLIPSE prior.*UNet"):
        load_prior(unet)
    clip = _write(tmp_path, "clip.safetensors", {"visual.proj": z(2, 2), "text_projection": z(2, 2)})
    with pytest.raises(ModelFileError, match="CLIP"):
        load_prior(clip)


class Payload:
    """Stands for any non-tensor object a pickle could carry (and run code on load)."""


def test_unsafe_and_unreadable_files_are_refused(tmp_path):
    pickled = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, pickled)
    with pytest.raises(ModelFileError, match="holds Python objects besides tensors, so it was not opened"):
        load_prior(pickled)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ModelFileError, match="Re-download"):
        load_prior(torn)
    with pytest.raises(ModelFileError, match="unsupported weight file type"):
        (tmp_path / "w.onnx").write_bytes(b"0")
        load_prior(tmp_path / "w.onnx")
    with pytest.raises(ModelFileError, match="not found"):
        load_prior(tmp_path / "nowhere.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ModelFileError, match="Lambda-ECLIPSE-Prior-v1.0"):
        load_prior(tmp_path / "empty_folder")


def test_weights_only_torch_file_loads(tmp_path):
    model = make_tiny_prior(seed=4)
    folder = save_prior(model, tmp_path / "p")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"state_dict": model.state_dict()}, folder / "diffusion_pytorch_model.bin")
    loaded = load_prior(folder)
    assert loaded.load_report.config_source == "config.json"
    x, p, T, m, c = inputs()
    assert torch.equal(loaded.predict(x, p, T, m, c), model.predict(x, p, T, m, c))


def test_bad_config_is_explained(tmp_path):
    folder = save_prior(make_tiny_prior(), tmp_path / "p")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["additional_embeddings"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="additional_embeddings=3.*needs 4"):
        load_prior(folder)
    cfg["additional_embeddings"] = 4
    cfg["num_layers"] = 5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="does not match.*Missing"):
        load_prior(folder)
