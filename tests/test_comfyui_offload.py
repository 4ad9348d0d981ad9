"""Offloadable models in a real ComfyUI (set COMFYUI_PATH to a checkout; COMFYUI_PYTHON to its interpreter).

1. In ComfyUI's own interpreter (--cpu): the CLIP and decoder patchers are `CoreModelPatcher` (0.33; plain
   `ModelPatcher` on ComfyUI older than it, e.g. 0.3.64) with comfy.ops
   layers, the prior stays a plain `ModelPatcher`; ComfyUI's legacy partial (lowvram) load path, forced on the CPU,
   casts through the real comfy.ops classes and gives bit-equal outputs; a missing comfy.ops or a failing swap
   falls back to today's plain, fully loaded patcher.
2. A server with the pack linked runs a bundled workflow to success (0.33.0: with and without
   --disable-dynamic-vram; --cpu turns dynamic VRAM off either way, so ModelPatcherDynamic itself is not run).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

COMFYUI = os.environ.get("COMFYUI_PATH")
if not COMFYUI:
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the offload test", allow_module_level=True)

from test_comfyui_integration import REPO, Server, fast, run_in_comfyui  # noqa: E402
from test_workflows import WORKFLOWS, is_sdxl, load, ui_to_api  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

CHECK = r"""
import copy
import torch
import comfy.model_patcher as mp
import comfy.ops
from lambda_eclipse.core.tiny import TINY_EMBED, make_tiny_clip, make_tiny_decoder_components, make_tiny_prior
from lambda_eclipse.nodes import comfy, offload

torch.set_num_threads(2)
report = {}
cpu = torch.device("cpu")
SWAP = tuple(getattr(torch.nn, n) for n in offload.SWAPPABLE)


def clip_out(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return [model.encode_text(torch.randint(0, 49408, (2, 77), generator=g)),
                model.encode_image(torch.randn(2, 3, 224, 224, generator=g))]


def dec_out(unet, movq):
    g = torch.Generator().manual_seed(0)
    sample, embeds = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, TINY_EMBED, generator=g)
    with torch.no_grad():
        return [unet(sample, torch.tensor([10, 500]), encoder_hidden_states=None,
                     added_cond_kwargs={"image_embeds": embeds}).sample,
                movq.decode(sample[:1], force_not_quantize=True).sample,
                movq.encode(torch.randn(1, 3, 32, 32, generator=g)).latents]


def ops_layers(model):
    return [m for m in model.modules() if type(m).__module__ == "comfy.ops"]


def plain_left(model):
    inside = {id(c) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) for c in m.modules()}
    return sorted(n for n, m in model.named_modules() if type(m) in SWAP and id(m) not in inside)


report["has_core"] = hasattr(mp, "CoreModelPatcher")
CORE = getattr(mp, "CoreModelPatcher", None) or mp.ModelPatcher
clip, (unet, movq, _), prior = make_tiny_clip(), make_tiny_decoder_components(), make_tiny_prior()
want_clip, want_dec = clip_out(clip), dec_out(unet, movq)

pc = comfy.make_patcher("clip", clip=clip)
pd = comfy.make_patcher("decoder", unet=unet, movq=movq)
pp = comfy.make_patcher("prior", prior=prior)
report["types"] = [type(p).__name__ for p in (pc, pd, pp)]
report["core"] = [type(p) is CORE for p in (pc, pd)]
report["prior_legacy"] = type(pp) is mp.ModelPatcher and not comfy.is_offloadable(pp)
report["offloadable"] = [comfy.is_offloadable(p) for p in (pc, pd, pp)]
report["ops_counts"] = [len(ops_layers(clip)), len(ops_layers(unet)), len(ops_layers(movq)), len(ops_layers(prior))]
report["ops_classes"] = sorted({type(m).__qualname__ for m in ops_layers(clip) + ops_layers(unet) + ops_layers(movq)})
report["plain_left"] = plain_left(clip) + plain_left(unet) + plain_left(movq)
report["mha_plain"] = all(type(c).__module__ != "comfy.ops" for m in clip.modules()
                          if isinstance(m, torch.nn.MultiheadAttention) for c in m.modules())
report["size_ok"] = pd.model_size() == sum(t.nbytes for t in pd.model.state_dict().values())

comfy.load_models([pc, pd, pp])  # on the CPU: a full load, without force_full_load for the offloadable ones
report["equal_after_load"] = all(torch.equal(a, b) for a, b in zip(clip_out(clip) + dec_out(unet, movq), want_clip + want_dec))

# ComfyUI's legacy lowvram path, forced: every comfy.ops layer casts its weights at run time.
for p in (pc, pd):
    p.unpatch_model(cpu)
    p.load(cpu, lowvram_model_memory=1, full_load=False)
casting = [m.comfy_cast_weights for m in ops_layers(clip) + ops_layers(unet) + ops_layers(movq)]
report["partial_casting"] = [sum(casting), len(casting)]
report["equal_partial"] = all(torch.equal(a, b) for a, b in zip(clip_out(clip) + dec_out(unet, movq), want_clip + want_dec))
report["moved_on_cpu"] = offload.move_resident(pd.model, cpu)
for p in (pc, pd):
    p.unpatch_model(cpu)

# Fallbacks: no comfy.ops, or a swap that fails -> a plain ModelPatcher, model untouched.
comfy._ABSENT.add("comfy.ops")
c2 = make_tiny_clip()
p2 = comfy.make_patcher("clip", clip=c2)
report["no_ops"] = [type(p2).__name__, comfy.is_offloadable(p2), len(ops_layers(c2))]
comfy._ABSENT.discard("comfy.ops")
real = offload.make_offloadable
calls = []
def failing(module, ops, keep=()):
    swapped = real(module, ops, keep)
    calls.append(len(swapped))
    if len(calls) == 2:
        offload.restore(swapped)
        raise RuntimeError("boom")
    return swapped
offload.make_offloadable = failing
u3, m3, _ = make_tiny_decoder_components()
p3 = comfy.make_patcher("decoder", unet=u3, movq=m3)
offload.make_offloadable = real
report["swap_failed"] = [type(p3).__name__, comfy.is_offloadable(p3), len(ops_layers(u3)) + len(ops_layers(m3)), calls[0] > 0]
comfy.load_models([p3])
report["equal_fallback"] = all(torch.equal(a, b) for a, b in zip(dec_out(u3, m3), want_dec))
print("OFFLOAD " + json.dumps(report))
"""


def test_patchers_and_ops_in_comfyui(tmp_path):
    r = run_in_comfyui(CHECK, "OFFLOAD", tmp_path)
    print("\n" + json.dumps(r, indent=1))
    assert r["core"] == [True, True] and r["prior_legacy"]
    assert r["offloadable"] == [True, True, False]
    clip_n, unet_n, movq_n, prior_n = r["ops_counts"]
    assert clip_n > 0 and unet_n > 0 and movq_n > 0 and prior_n == 0
    assert {"disable_weight_init.Linear", "disable_weight_init.Conv2d", "disable_weight_init.GroupNorm"} <= set(r["ops_classes"])
    # what stays plain: the device anchors (unet.conv_in, movq's first conv) and MoVQ's codebook
    assert set(r["plain_left"]) <= {"conv_in", "encoder.conv_in", "quantize.embedding"}, r["plain_left"]
    assert r["mha_plain"] and r["size_ok"]
    assert r["equal_after_load"]
    casting, total = r["partial_casting"]
    assert casting == total > 0 and r["equal_partial"]
    assert r["moved_on_cpu"] == 0
    assert r["no_ops"] == ["ModelPatcher", False, 0]
    assert r["swap_failed"] == ["ModelPatcher", False, 0, True] and r["equal_fallback"]


def _variants():
    out = [[]]
    if "--disable-dynamic-vram" in (Path(COMFYUI) / "comfy" / "cli_args.py").read_text():
        out.append(["--disable-dynamic-vram"])
    return out


@pytest.mark.parametrize("extra", _variants(), ids=lambda e: " ".join(e) or "default")
def test_workflow_runs_with_offloadable_models(tmp_path, extra):
    from lambda_eclipse.core.tiny import write_tiny_models

    base = tmp_path / "comfy"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "lambda_eclipse").symlink_to(REPO, target_is_directory=True)
    write_tiny_models(base / "models")
    srv = Server(base)
    if extra:  # Server starts with the standard flags: restart it with the extra ones
        srv.stop()
        srv.proc = subprocess.Popen(srv.proc.args + extra, cwd=COMFYUI, stdout=open(srv.log, "w"),
                                    stderr=subprocess.STDOUT)
    try:
        srv.wait_ready()
        workflow = next(p for p in WORKFLOWS if not is_sdxl(load(p)))
        entry = srv.run(fast(ui_to_api(load(workflow))))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + srv.tail()
        log = srv.log.read_text(errors="replace")
        assert "clip under ModelPatcher with" in log and "decoder under ModelPatcher with" in log, srv.tail()
        assert "could not make" not in log and "CoreModelPatcher failed" not in log
    finally:
        srv.stop()
