"""NaN and infinity never become a saved picture: damaged weights are refused at load (naming the file and the
tensor), non-finite latents or pixels stop the decode with a message, in the library, the CLI and the node."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lambda_eclipse.core.cli import main
from lambda_eclipse.core.decoder import decode
from lambda_eclipse.core.decoder_files import load_decoder_parts
from lambda_eclipse.core.errors import NonFiniteError

UNET = "diffusion_models/kandinsky-2-2-decoder-unet.safetensors"
MOVQ = "vae/kandinsky-2-2-movq.safetensors"


@pytest.fixture()
def models(tiny_models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_models["root"], root)
    return root


def _poison(path, value=float("nan")):
    """Write one non-finite value into the file's first floating tensor (metadata kept); return its key."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path), metadata=metadata)
    return key


@pytest.mark.parametrize("part", [UNET, MOVQ])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(models, part, value):
    key = _poison(models / part, value)
    with pytest.raises(NonFiniteError, match=f"tensor '{key}'.*(NaN|infinite).*download it again"):
        load_decoder_parts(models / UNET, models / MOVQ)


def test_non_finite_latents_stop_the_decode(models, monkeypatch):
    decoder = load_decoder_parts(models / UNET, models / MOVQ)
    embeds = torch.randn(1, decoder.embed_dim if hasattr(decoder, "embed_dim") else 32)
    real = decoder.unet.forward

    def nan_forward(*args, **kwargs):
        out = real(*args, **kwargs)
        return (out[0] * float("nan"),) + tuple(out[1:])

    monkeypatch.setattr(decoder.unet, "forward", nan_forward)
    with pytest.raises(NonFiniteError, match="NaN/inf latents.*nothing was saved"):
        decode(decoder, embeds, torch.zeros_like(embeds), width=64, height=64, steps=2, seeds=1)


def test_non_finite_pixels_stop_the_decode(models, monkeypatch):
    decoder = load_decoder_parts(models / UNET, models / MOVQ)
    embeds = torch.randn(1, decoder.embed_dim if hasattr(decoder, "embed_dim") else 32)
    real = decoder.movq.decode

    def nan_decode(z, *args, **kwargs):
        out = real(z, *args, **kwargs)
        out.sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(decoder.movq, "decode", nan_decode)
    with pytest.raises(NonFiniteError, match="MoVQ turned finite latents into NaN/inf pixels"):
        decode(decoder, embeds, torch.zeros_like(embeds), width=64, height=64, steps=1, seeds=1)


def test_cli_generate_with_a_nan_movq_writes_nothing(models, tmp_path, capsys):
    _poison(models / MOVQ)
    out = tmp_path / "pic.png"
    code = main(["generate", "--models", str(models), "--prompt", "a dog", "--steps", "1", "--width", "64",
                 "--height", "64", "--quiet", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "kandinsky-2-2-movq.safetensors" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.glob("*.png")) == []


def test_decoder_node_refuses_nan_weights_with_an_error_not_a_black_image(models, monkeypatch):
    from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, comfy

    _poison(models / UNET)
    comfy.set_models_dir(models)
    try:
        from lambda_eclipse.nodes.loaders import clear_cache

        clear_cache()
        with pytest.raises(NonFiniteError, match="NaN"):
            NODE_CLASS_MAPPINGS["LambdaEclipseLoadDecoder"]().load("kandinsky-2-2-decoder-unet.safetensors", "auto",
                                                                    "kandinsky-2-2-movq.safetensors")
    finally:
        comfy.set_models_dir(None)


PRIOR = "lambda_eclipse/lambda-eclipse-prior-v1.0.safetensors"


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_prior_stored_as_int8_or_bool_is_refused_from_the_header(models, dtype):
    from lambda_eclipse.core.prior import load_prior, sniff_prior
    from lambda_eclipse.core.errors import ModelFileError
    from safetensors import safe_open

    path = models / PRIOR
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = {k: (v.to(dtype) if k == "proj_in.weight" else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)
    for call in (sniff_prior, load_prior):
        with pytest.raises(ModelFileError, match=r"prior tensor 'proj_in.weight' is stored as (I8|BOOL|int8|bool), not as floating point"):
            call(path)


def test_prior_holding_nan_is_refused(models):
    from lambda_eclipse.core.prior import load_prior

    key = _poison(models / PRIOR)
    with pytest.raises(NonFiniteError, match=f"prior tensor '{key}' holds 1 NaN"):
        load_prior(models / PRIOR)
