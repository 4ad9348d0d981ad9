"""Concept fine-tuning of the decoder (finetune-decoder) and decoder LoRAs (core.lora, Load Decoder LoRA node)."""


from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lambda_eclipse.core.decoder import KandinskyDecoder, decode
from lambda_eclipse.core.errors import ModelFileError
from lambda_eclipse.core.lora import apply_decoder_lora, load_decoder_lora, remove_decoder_lora
from lambda_eclipse.core.tiny import make_tiny_decoder_components
from lambda_eclipse.trainer.__main__ import main

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    rgba = rng.integers(0, 255, (70, 70, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[20:50, 20:50, 3] = 255  # a cut-out subject: composited on white, CLIP gets its box
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    return folder


def _args(tiny_models, images, out, *extra):
    return ["finetune-decoder", "--decoder-unet", str(tiny_models["decoder_unet"]), "--decoder-movq",
            str(tiny_models["decoder_movq"]), "--clip-vision", str(tiny_models["clip_vision"]), "--images", str(images),
            "--out", str(out), "--resolution", "64", "--cpu", *extra]  # CPU: bit-exact, and fp16 is a no-op there


@pytest.fixture(scope="module")
def trained(tiny_models, photos, tmp_path_factory):
    """A 4-step LoRA run, with its LoRA B matrices made large so that it visibly changes pictures."""
    out = tmp_path_factory.mktemp("run")
    assert main(_args(tiny_models, photos, out, "--steps", "4", "--save-every", "2", "--lr", "1e-3")) == 0
    return out


def _decoder():
    unet, movq, scheduler = make_tiny_decoder_components()
    return KandinskyDecoder(unet, movq, dict(scheduler.config), "tiny")


def _strong_copy(path, dest):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    gen = torch.Generator().manual_seed(1)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.2 if k.endswith("lora_B.weight") else v) for k, v in tensors.items()}
    save_file(tensors, str(dest), metadata)
    return dest


def _pixels(decoder):
    emb = torch.linspace(-1, 1, 32)[None]
    return decode(decoder, emb, torch.zeros(1, 32), width=64, height=64, steps=3, guidance=4.0, seeds=7)


def test_run_writes_a_loadable_lora_with_metadata(trained):
    path = trained / "concept_lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(".add_k_proj." in k for k in keys) and any(".to_out.0." in k for k in keys)
    assert meta["rank"] == "4" and meta["alpha"] == "4.0" and meta["steps"] == "4"
    assert "cutout.png" in meta["images"] and "kandinsky-2-2-decoder-unet" in meta["base_decoder"]
    rows = (trained / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5
    lora = load_decoder_lora(path)
    assert lora.rank == 4 and len(lora.layers) == len(keys) // 2


def test_loss_falls_when_overfitting_one_image_with_fixed_noise():
    from diffusers import DDPMScheduler

    from lambda_eclipse.trainer.finetune_decoder import add_lora, diffusion_loss

    decoder = _decoder()
    unet = decoder.unet
    add_lora(unet, rank=4, alpha=4.0, seed=0)
    unet.train()
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    embeds, t = torch.randn(1, 32, generator=gen), torch.tensor([500])
    sched = DDPMScheduler.from_config(decoder.scheduler_config)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(25):
        loss = diffusion_loss(unet, latents, embeds, t, noise, sched)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and all(b < a for a, b in zip(losses[:10], losses[1:10])), losses


def test_strength_zero_is_the_base_decoder_bit_for_bit_and_one_changes_it(trained, tmp_path):
    lora_file = _strong_copy(trained / "concept_lora.safetensors", tmp_path / "strong.safetensors")
    decoder = _decoder()
    base = _pixels(decoder)
    off = apply_decoder_lora(decoder, lora_file, 0.0)
    assert torch.equal(_pixels(off), base)
    on = apply_decoder_lora(decoder, lora_file, 1.0)
    with_lora = _pixels(on)
    assert (with_lora - base).abs().max() > 1e-3
    # The input decoder is untouched (no module swapped, no hook left), and the wrapper is reversible.
    assert torch.equal(_pixels(decoder), base)
    assert not any(m._forward_hooks for m in decoder.unet.modules())
    assert remove_decoder_lora(on).unet is decoder.unet
    # Chained: two LoRAs at 0.5 each = one at 1.0 (the updates add).
    half = apply_decoder_lora(apply_decoder_lora(decoder, lora_file, 0.5), lora_file, 0.5)
    assert torch.allclose(_pixels(half), with_lora, atol=1e-4)


def test_diffusers_own_loader_reads_the_file_and_agrees(trained, tmp_path):
    lora_file = _strong_copy(trained / "concept_lora.safetensors", tmp_path / "strong.safetensors")
    mine, theirs = _decoder(), _decoder()
    theirs.unet.load_lora_adapter(str(lora_file), prefix="unet", adapter_name="concept")
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 32)
    wrapped = apply_decoder_lora(mine, lora_file, 1.0)
    with torch.no_grad():
        a = wrapped.unet(x, 10, None, added_cond_kwargs={"image_embeds": e}).sample
        b = theirs.unet(x, 10, None, added_cond_kwargs={"image_embeds": e}).sample
    assert torch.allclose(a, b, atol=1e-5)


def test_resume_gives_bit_identical_lora(tiny_models, photos, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_args(tiny_models, photos, straight, "--steps", "4", "--save-every", "2", "--lr", "1e-3")) == 0
    assert main(_args(tiny_models, photos, split, "--steps", "2", "--save-every", "2", "--lr", "1e-3")) == 0
    assert main(_args(tiny_models, photos, split, "--steps", "4", "--save-every", "2", "--lr", "1e-3", "--resume")) == 0
    a, b = load_file(str(straight / "concept_lora.safetensors")), load_file(str(split / "concept_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (split / "metrics.csv").read_text().splitlines()[1:] and len((split / "metrics.csv").read_text().splitlines()) == 5


def test_full_finetune_writes_a_decoder_unet_file(tiny_models, photos, tmp_path):
    from lambda_eclipse.core.decoder_files import load_decoder_files

    out = tmp_path / "full"
    assert main(_args(tiny_models, photos, out, "--steps", "1", "--full")) == 0
    decoder = load_decoder_files(out / "concept_unet.safetensors", tiny_models["decoder_movq"])
    assert decoder.embedding_dim == 32


def test_bad_inputs_say_what_is_wrong(tiny_models, photos, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(tiny_models, empty, tmp_path / "o1", "--steps", "1")) == 2
    assert "holds no image" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    assert main(_args(tiny_models, bad, tmp_path / "o2", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "broken.png" in err
    assert main(_args(tiny_models, photos, tmp_path / "o3", "--steps", "1", "--resolution", "100")) == 2
    assert "multiple of 64" in capsys.readouterr().err
    # An existing run is never overwritten silently; a resume with other settings is refused.
    run = tmp_path / "o4"
    assert main(_args(tiny_models, photos, run, "--steps", "1")) == 0
    assert main(_args(tiny_models, photos, run, "--steps", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_args(tiny_models, photos, run, "--steps", "2", "--rank", "8", "--resume")) == 2
    assert "rank: 4 → 8" in capsys.readouterr().err
    assert main(_args(tiny_models, photos, run, "--steps", "2", "--mixed-precision", "bf16", "--resume")) == 2
    assert "mixed_precision: 'no' → 'bf16'" in capsys.readouterr().err


def test_a_lora_of_another_model_is_refused_clearly(tmp_path):
    decoder = _decoder()
    kohya = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(kohya))
    with pytest.raises(ModelFileError, match="kohya-style"):
        apply_decoder_lora(decoder, kohya, 1.0)
    sd = tmp_path / "sd15.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 320), f"{key}.lora_B.weight": torch.zeros(320, 4)}, str(sd))
    with pytest.raises(ModelFileError, match="Stable Diffusion style UNet"):
        apply_decoder_lora(decoder, sd, 1.0)
    wrong_size = tmp_path / "big.safetensors"
    key = "unet.down_blocks.1.attentions.0.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 640), f"{key}.lora_B.weight": torch.zeros(640, 4)}, str(wrong_size))
    with pytest.raises(ModelFileError, match="another size"):
        apply_decoder_lora(decoder, wrong_size, 1.0)


def test_node_applies_without_touching_the_shared_decoder(trained, tmp_path):
    from lambda_eclipse.nodes import comfy
    from lambda_eclipse.nodes.loaders import Loaded
    from lambda_eclipse.nodes.lora import NODES, LambdaEclipseLoadDecoderLoRA

    (tmp_path / "loras").mkdir()
    _strong_copy(trained / "concept_lora.safetensors", tmp_path / "loras" / "concept.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(tmp_path / "loras" / "sdxl.safetensors"))
    comfy.set_models_dir(tmp_path)
    try:
        menu = LambdaEclipseLoadDecoderLoRA.INPUT_TYPES()["required"]["lora_name"][0]
        assert menu == ["concept.safetensors"]
        shared = Loaded("decoder", _decoder(), None, "tiny")
        base = _pixels(shared.model)
        (out,) = LambdaEclipseLoadDecoderLoRA().apply(shared, "concept.safetensors", 1.0)
        assert out is not shared and out.model.unet.base is shared.model.unet and out.patcher is shared.patcher
        assert not torch.equal(_pixels(out.ready()), base)
        assert torch.equal(_pixels(shared.ready()), base)
        (chained,) = LambdaEclipseLoadDecoderLoRA().apply(out, "concept.safetensors", -1.0)
        assert torch.allclose(_pixels(chained.model), base, atol=1e-4)
        with pytest.raises(Exception, match="finetune-decoder"):
            LambdaEclipseLoadDecoderLoRA().apply(shared, "gone.safetensors", 1.0)
        # Before anything runs, ComfyUI asks VALIDATE_INPUTS: our words, not "Value not in list".
        assert LambdaEclipseLoadDecoderLoRA.VALIDATE_INPUTS("concept.safetensors") is True
        gone = LambdaEclipseLoadDecoderLoRA.VALIDATE_INPUTS("gone.safetensors")
        assert "models/loras" in gone and "finetune-decoder" in gone
        assert "not a LoRA of the Kandinsky 2.2 decoder" in LambdaEclipseLoadDecoderLoRA.VALIDATE_INPUTS("sdxl.safetensors")
        assert "not a name from the list" in LambdaEclipseLoadDecoderLoRA.VALIDATE_INPUTS("../x.safetensors")
    finally:
        comfy.set_models_dir(None)
    assert "LambdaEclipseLoadDecoderLoRA" in NODES


def test_generate_with_decoder_lora(trained, tiny_models, photos, tmp_path, capsys):
    from lambda_eclipse.core.cli import main as cli

    photo = sorted(p for p in Path(photos).iterdir() if p.is_file())[0]
    lora = trained / "concept_lora.safetensors"
    base = ["generate", "--models", str(tiny_models["root"]), "--prompt", "a dog", "--subject", f"dog={photo}",
            "--steps", "2", "--width", "64", "--height", "64", "--quiet", "--device", "cpu"]
    assert cli(base + ["--out", str(tmp_path / "a.png")]) == 0
    assert cli(base + ["--decoder-lora", f"{lora}:0", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # strength 0: the base decoder
    capsys.readouterr()
    assert cli(base + ["--decoder-lora", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "c.png")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


# -- progress: samples and loss plot; precision and memory options ---------------------------------------------------

@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a test that changes --mixed-precision must start and end clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _lora(out):
    return load_file(str(out / "concept_lora.safetensors"))


def test_samples_and_loss_plot_do_not_change_the_training(tiny_models, photos, tmp_path):
    from lambda_eclipse.core.decoder_files import load_decoder_files
    from lambda_eclipse.trainer.finetune_decoder import sample_concepts

    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    common = ("--steps", "4", "--save-every", "2", "--lr", "1e-3")
    assert main(_args(tiny_models, photos, plain, *common)) == 0
    assert main(_args(tiny_models, photos, sampled, *common, "--sample-every", "3", "--sample-steps", "2")) == 0
    a, b = _lora(plain), _lora(sampled)
    assert all(torch.equal(a[k], b[k]) for k in a), "sampling must not move the training's RNG or weights"
    names = sorted(p.name for p in (sampled / "samples").iterdir())
    assert names == ["step_000000.png", "step_000003.png", "step_000004.png"]
    first = np.asarray(Image.open(sampled / "samples" / "step_000000.png"))
    assert first.shape == (64, 64 * 3, 3)  # one 64-px picture per concept photo, side by side
    last = np.asarray(Image.open(sampled / "samples" / "step_000004.png"))
    assert np.abs(first.astype(int) - last.astype(int)).max() > 0, "the LoRA should change the samples"
    # Step 0 is the base decoder's rendering of the concept embeddings: redo it by hand.
    from lambda_eclipse.core.clip import load_clip_towers
    from lambda_eclipse.trainer.finetune_decoder import collect_images, encode_concept

    decoder = load_decoder_files(tiny_models["decoder_unet"], tiny_models["decoder_movq"])
    clip = load_clip_towers(vision=tiny_models["clip_vision"])
    _, embeds, blank = encode_concept(collect_images([photos]), decoder, clip, 64)
    again = sample_concepts(decoder, embeds, blank, 64, 2, 0, tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(again)), first)
    plot = Image.open(sampled / "loss.png")
    assert plot.size == (900, 420) and len(np.unique(np.asarray(plot.convert("RGB")).reshape(-1, 3), axis=0)) > 3


def test_gradient_checkpointing_gives_the_same_lora(tiny_models, photos, tmp_path):
    common = ("--steps", "3", "--save-every", "3", "--lr", "1e-3")
    assert main(_args(tiny_models, photos, tmp_path / "a", *common)) == 0
    assert main(_args(tiny_models, photos, tmp_path / "b", *common, "--gradient-checkpointing")) == 0
    a, b = _lora(tmp_path / "a"), _lora(tmp_path / "b")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # … and it is really on: the UNet recomputes its blocks' activations in the backward pass.
    from lambda_eclipse.trainer.finetune_decoder import FinetuneConfig, prepare_unet

    unet = _decoder().unet
    prepare_unet(unet, FinetuneConfig(out=str(tmp_path), images=["x"], decoder="d", clip="c",
                                      gradient_checkpointing=True).check())
    assert unet.is_gradient_checkpointing


def test_bf16_trains_the_lora_in_fp32_over_a_bf16_base(tiny_models, photos, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from lambda_eclipse.trainer.finetune_decoder import FinetuneConfig, half_dtype, prepare_unet

    assert main(_args(tiny_models, photos, tmp_path / "fp32", "--steps", "3", "--lr", "1e-3")) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(_args(tiny_models, photos, tmp_path / "bf16", "--steps", "3", "--lr", "1e-3",
                      "--mixed-precision", "bf16", "--gradient-checkpointing")) == 0
    a, b = _lora(tmp_path / "fp32"), _lora(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in b.values())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < diff < 5e-3, diff  # bf16 matmuls: close to the fp32 run, not equal
    # What the trainer sets up under bf16: frozen base weights in bf16, the LoRA in fp32.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    unet = _decoder().unet
    cfg = FinetuneConfig(out=str(tmp_path), images=["x"], decoder="d", clip="c").check()
    _, params, names = prepare_unet(unet, cfg, half_dtype(accelerator))
    assert names and all("lora_" in n for n in names) and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_fp16_on_the_cpu_says_it_does_nothing_and_trains_in_fp32(tiny_models, photos, tmp_path, caplog,
                                                                 fresh_accelerate_state):
    import logging

    assert main(_args(tiny_models, photos, tmp_path / "fp32", "--steps", "2", "--lr", "1e-3")) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level(logging.WARNING, logger="lambda_eclipse.trainer"):
        assert main(_args(tiny_models, photos, tmp_path / "fp16", "--steps", "2", "--lr", "1e-3",
                          "--mixed-precision", "fp16")) == 0
    assert "has no effect on cpu" in caplog.text and "bf16" in caplog.text
    a, b = _lora(tmp_path / "fp32"), _lora(tmp_path / "fp16")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_make_the_same_step_as_one_with_twice_the_batch(tiny_models, photos, tmp_path, capsys):
    """torchrun, 2 CPU processes (gloo DDP) × --batch-size 1 = 1 process × --batch-size 2; resuming with another
    number of processes is refused."""
    import os
    import subprocess
    import sys

    common = ("--steps", "3", "--save-every", "3", "--lr", "1e-3", "--progress", "false")
    assert main(_args(tiny_models, photos, tmp_path / "one", *common, "--batch-size", "2")) == 0
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29600 + os.getpid() % 1000), "-m", "lambda_eclipse.trainer",
                        *_args(tiny_models, photos, tmp_path / "two", *common, "--batch-size", "1")],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    a, b = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert a.keys() == b.keys()
    # Float sums in another order: AdamW's normalisation turns 1e-7 gradient differences into ~1e-6 (lr 1e-3).
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4, rows  # written once, by the main process
    losses = [[r.split(",")[1] for r in (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]] for run in ("one", "two")]
    assert losses[0] == losses[1]  # the loss of the whole step, averaged over the processes
    assert main(_args(tiny_models, photos, tmp_path / "two", *common, "--batch-size", "1", "--steps", "4",
                      "--resume")) == 2
    assert "trained with 2 process(es) and this run has 1" in capsys.readouterr().err


def test_hard_kill_after_a_checkpoint_resumes_to_the_same_lora(tiny_models, photos, tmp_path):
    """The process dies (os._exit, as kill -9) right after the step-2 checkpoint is written and before its LoRA file
    is: --resume finishes the run with exactly the uninterrupted run's LoRA; and a kill after the final checkpoint
    is healed by a resume that has no step left to train."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from lambda_eclipse.trainer import finetune_decoder as F\n"
            "orig = F.save_state\n"
            "def hook(obj, path, **kw):\n"
            "    orig(obj, path, **kw)\n"
            "    if obj['step'] == int(os.environ['KILL_AT']): os._exit(137)\n"
            "F.save_state = hook\n"
            "from lambda_eclipse.trainer.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    common = ("--steps", "4", "--save-every", "2", "--lr", "1e-3", "--progress", "false", "--sample-every", "2",
              "--sample-steps", "1")
    assert main(_args(tiny_models, photos, tmp_path / "straight", *common)) == 0
    for kill_at, run in ((2, "killed_mid"), (4, "killed_end")):
        env = dict(os.environ, PYTHONWARNINGS="ignore", KILL_AT=str(kill_at))
        p = subprocess.run([sys.executable, "-c", code, *_args(tiny_models, photos, tmp_path / run, *common)],
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 137, p.stderr[-2000:]
        assert not (tmp_path / run / "concept_lora.safetensors").exists() or kill_at == 4
        assert main(_args(tiny_models, photos, tmp_path / run, *common, "--resume")) == 0
        a, b = _lora(tmp_path / "straight"), _lora(tmp_path / run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
        with safe_open(str(tmp_path / run / "concept_lora.safetensors"), "pt") as f:
            assert f.metadata()["steps"] == "4"
        # The samples a kill skipped (it came between a checkpoint and its sample) are made on resume.
        names = sorted(p.name for p in (tmp_path / run / "samples").iterdir())
        assert names == sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()), run
        assert (tmp_path / run / "loss.png").is_file()


def test_masks_put_the_subject_on_white_like_an_alpha_cutout(tiny_models, tmp_path, capsys):
    from lambda_eclipse.core.clip import load_clip_towers
    from lambda_eclipse.core.decoder_files import load_decoder_files
    from lambda_eclipse.trainer.finetune_decoder import encode_concept, find_masks

    rng = np.random.default_rng(3)
    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "cutouts").mkdir()
    rgb = rng.integers(0, 255, (72, 88, 3), dtype=np.uint8)
    mask = np.zeros((72, 88), np.uint8)
    mask[10:60, 20:70] = 255
    Image.fromarray(rgb).save(tmp_path / "photos" / "dog.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "dog.png")
    Image.fromarray(np.dstack([rgb, mask]), "RGBA").save(tmp_path / "cutouts" / "dog.png")
    decoder = load_decoder_files(tiny_models["decoder_unet"], tiny_models["decoder_movq"])
    clip = load_clip_towers(vision=tiny_models["clip_vision"])
    photo = tmp_path / "photos" / "dog.png"
    masked = encode_concept([photo], decoder, clip, 64, find_masks([photo], tmp_path / "masks"))
    cutout = encode_concept([tmp_path / "cutouts" / "dog.png"], decoder, clip, 64)
    whole = encode_concept([photo], decoder, clip, 64)
    assert torch.allclose(masked[0], cutout[0], atol=1e-5) and torch.allclose(masked[1], cutout[1], atol=1e-5)
    assert not torch.allclose(masked[0], whole[0], atol=1e-3)
    # No mask named after any photo: said before any model loads.
    (tmp_path / "other").mkdir()
    Image.fromarray(mask).save(tmp_path / "other" / "cat.png")
    assert main(_args(tiny_models, tmp_path / "photos", tmp_path / "o", "--steps", "1", "--masks",
                      str(tmp_path / "other"))) == 2
    assert "no mask named after any photo" in capsys.readouterr().err
    # The trainer's own run uses the masks: the same LoRA as from the cut-out, another one than from the whole photo.
    common = ("--steps", "2", "--lr", "1e-2", "--progress", "false")
    assert main(_args(tiny_models, tmp_path / "photos", tmp_path / "m", *common, "--masks", str(tmp_path / "masks"))) == 0
    assert main(_args(tiny_models, tmp_path / "cutouts", tmp_path / "c", *common)) == 0
    assert main(_args(tiny_models, tmp_path / "photos", tmp_path / "w", *common)) == 0
    m, c, w = _lora(tmp_path / "m"), _lora(tmp_path / "c"), _lora(tmp_path / "w")
    assert max((m[k] - c[k]).abs().max().item() for k in m) < 1e-5
    assert max((m[k] - w[k]).abs().max().item() for k in m) > 1e-4
