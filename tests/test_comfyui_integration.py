"""End to end in a real ComfyUI (set COMFYUI_PATH to a checkout; COMFYUI_PYTHON to its interpreter if not this one).

A headless server on a free loopback port with an isolated base directory: the pack symlinked into
custom_nodes/, tiny random models written at the default names, every bundled workflow converted
to API format and queued; outputs and our error messages are checked.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_workflows import SDXL_BASE, USER_FILES, WORKFLOWS, is_sdxl, load, ui_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH")
START_TIMEOUT = 180
RUN_TIMEOUT = 300

if not COMFYUI:
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the end-to-end test", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: dict | None = None, timeout: float = 30):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Server:
    def __init__(self, base: Path):
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
             "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],  # never the user's database
            cwd=COMFYUI, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )

    def wait_ready(self):
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                _request(self.url + "/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{self.tail()}")

    def tail(self, n=4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def run(self, prompt: dict) -> dict:
        try:
            queued = _request(self.url + "/prompt", {"prompt": prompt, "client_id": "lambda-eclipse-test"})
        except urllib.error.HTTPError as exc:
            pytest.fail(f"/prompt refused the workflow: {exc.read().decode(errors='replace')[:3000]}")
        prompt_id = queued["prompt_id"]
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            history = _request(f"{self.url}/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        pytest.fail(f"workflow did not finish within {RUN_TIMEOUT} s:\n{self.tail()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lambda_eclipse.core.tiny import write_tiny_models

    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "lambda_eclipse").symlink_to(REPO, target_is_directory=True)
    models = write_tiny_models(base / "models")
    _train_the_workflows_lora(models, base, tmp_path_factory.mktemp("lora"))
    srv = Server(base)
    try:
        srv.wait_ready()
        srv.rss_ready = _rss_mb(srv.proc.pid)
        yield srv
    finally:
        srv.stop()


def _train_the_workflows_lora(models: dict, base: Path, work: Path):
    """Workflow 7's LoRA, made as a user makes one: the trainer's command on photos, the file copied to models/loras."""
    import shutil

    from PIL import Image, ImageOps

    from lambda_eclipse.trainer.__main__ import main as trainer

    photos = work / "photos"
    photos.mkdir()
    dog = Image.open(REPO / "assets" / "dog.jpg").convert("RGB")
    for i, im in enumerate((dog, ImageOps.mirror(dog), dog.crop((0, 0, 300, 300)))):
        im.save(photos / f"dog_{i}.jpg")
    assert trainer(["finetune-decoder", "--decoder-unet", str(models["decoder_unet"]), "--decoder-movq",
                    str(models["decoder_movq"]), "--clip-vision", str(models["clip_vision"]), "--images", str(photos),
                    "--out", str(work / "run"), "--steps", "4", "--lr", "1e-2", "--resolution", "64",
                    "--progress", "false"]) == 0
    (base / "models" / "loras").mkdir(exist_ok=True)
    shutil.copy(work / "run" / "concept_lora.safetensors", base / "models" / "loras" / USER_FILES[
        "LambdaEclipseLoadDecoderLoRA"]["lora_name"])


def fast(prompt: dict) -> dict:
    """The same graph with tiny-model-friendly settings: 64 px, 2 steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "LambdaEclipseKandinskyDecode":
            node["inputs"].update(width=64, height=64, steps=2)
    return prompt


def _menu(server, node_type, name):
    spec = _request(f"{server.url}/object_info/{node_type}")[node_type]["input"]
    return (spec["required"].get(name) or spec["optional"][name])[0]


def test_pack_loaded_and_lists_models(server):
    from lambda_eclipse.core.paths import manifest

    files = manifest()
    assert {files["prior"].name, "Lambda-ECLIPSE-Prior-v1.0"} <= set(_menu(server, "LambdaEclipseLoadPrior", "prior_name"))
    assert files["clip_text"].name in _menu(server, "LambdaEclipseLoadCLIP", "clip_name")
    assert files["clip_vision"].name in _menu(server, "LambdaEclipseLoadCLIP", "vision_name")
    assert {files["decoder_unet"].name, "kandinsky-2-2-decoder"} <= set(_menu(server, "LambdaEclipseLoadDecoder", "decoder_name"))
    assert files["decoder_movq"].name in _menu(server, "LambdaEclipseLoadDecoder", "movq_name")
    log = server.tail(1_000_000)
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "lambda_eclipse" in line], log
    assert (server.base / "input" / "lambda_eclipse_cat.jpg").is_file()


def test_templates_are_listed(server):
    templates = _request(server.url + "/api/workflow_templates")
    listed = next(v for k, v in templates.items() if "lambda" in k.lower())
    assert len(listed) == len(WORKFLOWS)


def _validates_up_to_the_checkpoint(server, prompt: dict):
    """No SDXL weights here (6.9 GB): ComfyUI validates the whole graph, and its only complaint is the absent checkpoint."""
    try:
        _request(server.url + "/prompt", {"prompt": prompt, "client_id": "lambda-eclipse-test"})
        pytest.fail("the SDXL workflow was accepted without an SDXL checkpoint")
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    errors = {node_id: entry["errors"] for node_id, entry in body["node_errors"].items() if entry["errors"]}
    (node_id, node_errors), = errors.items()
    assert prompt[node_id]["class_type"] == "CheckpointLoaderSimple", body
    assert [(e["type"], e["extra_info"]["input_name"]) for e in node_errors] == [("value_not_in_list", "ckpt_name")], body
    assert SDXL_BASE["name"] in node_errors[0]["details"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(server, path):
    if is_sdxl(load(path)):
        _validates_up_to_the_checkpoint(server, fast(ui_to_api(load(path))))
        return
    entry = server.run(fast(ui_to_api(load(path))))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000] + server.tail()
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    saved = [img for img in images if img["type"] == "output"]
    assert saved
    for img in saved:
        assert (server.base / "output" / img["subfolder"] / img["filename"]).is_file()
    if "grid" in path.stem.lower():
        assert len(saved) == 9 + 1  # the cells, and the grid as one picture
    if "LoRA" in path.stem:  # the LoRA's picture and the base decoder's, same embedding and seed: they differ
        import numpy as np
        from PIL import Image

        tuned, plain = (np.asarray(Image.open(server.base / "output" / img["subfolder"] / img["filename"]), dtype=int)
                        for img in sorted(saved, key=lambda img: "base" in img["filename"]))
        assert tuned.shape == plain.shape and np.abs(tuned - plain).max() > 0


def test_absent_file_stops_with_the_loaders_message(server):
    """Validation, before any node runs: file, folder and link, not only ComfyUI's 'Value not in list'."""
    prompt = fast(ui_to_api(load(WORKFLOWS[0])))
    loader = next(n for n in prompt.values() if n["class_type"] == "LambdaEclipseLoadPrior")
    loader["inputs"]["prior_name"] = "absent-prior.safetensors"
    try:
        _request(server.url + "/prompt", {"prompt": prompt, "client_id": "lambda-eclipse-test"})
        pytest.fail("an absent model file was accepted")
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    errors = [e for node in body["node_errors"].values() for e in node["errors"]]
    assert errors and errors[0]["type"] == "custom_validation_failed"
    assert "'absent-prior.safetensors' is not in models/lambda_eclipse" in errors[0]["details"]
    assert "https://huggingface.co/" in errors[0]["details"] and "python -m lambda_eclipse download" in errors[0]["details"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_free_memory_releases_our_models(server):
    """After ComfyUI's "free memory" nothing of ours keeps a model: the next run reads the files again."""
    prompt = fast(ui_to_api(load(WORKFLOWS[0])))
    assert server.run(prompt)["status"]["status_str"] == "success"
    loaded = _rss_mb(server.proc.pid)
    reads = server.tail(10_000_000).count("λ-ECLIPSE prior from")
    _request(server.url + "/free", {"unload_models": True, "free_memory": True})
    # The prompt worker drops its caches at once (set_flag wakes it) and runs gc.collect() within its
    # 10 s collection interval: only then are objects in reference cycles gone.
    time.sleep(13)
    freed = _rss_mb(server.proc.pid)
    for node in prompt.values():  # a new seed, so the run is not served from the output cache
        if node["class_type"] == "LambdaEclipseKandinskyDecode":
            node["inputs"]["seed"] += 100
    assert server.run(prompt)["status"]["status_str"] == "success"
    after = _rss_mb(server.proc.pid)
    assert server.tail(10_000_000).count("λ-ECLIPSE prior from") == reads + 1, "the prior was not loaded again"
    print(f"\nserver RSS: {server.rss_ready:.0f} MB ready, {loaded:.0f} MB after a run, {freed:.0f} MB after /free, "
          f"{after:.0f} MB after a rerun")


def test_bad_word_reports_our_message(server):
    prompt = fast(ui_to_api(load(WORKFLOWS[0])))
    subject = next(n for n in prompt.values() if n["class_type"] == "LambdaEclipseEncodeSubject")
    subject["inputs"]["word"] = "dogs"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "is not in the prompt" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "LambdaEclipseInterleavePrompt"


def test_interrupt_stops_decoding(server):
    prompt = fast(ui_to_api(load(WORKFLOWS[0])))
    for node in prompt.values():
        if node["class_type"] == "LambdaEclipseKandinskyDecode":
            node["inputs"].update(steps=200, width=512, height=512, seed=node["inputs"]["seed"] + 1)  # new seed: not cached
        if node["class_type"] == "LambdaEclipsePriorSample":
            node["inputs"]["batch_size"] = 4
    queued = _request(server.url + "/prompt", {"prompt": prompt, "client_id": "lambda-eclipse-test"})
    deadline = time.time() + 60
    while not _request(server.url + "/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # models are cached from the earlier runs: by now it is denoising
    started = time.time()
    _request(server.url + "/interrupt", {})
    while time.time() - started < 30:
        history = _request(f"{server.url}/history/{queued['prompt_id']}")
        if queued["prompt_id"] in history:
            status = history[queued["prompt_id"]]["status"]
            assert any(m[0] == "execution_interrupted" for m in status["messages"]), status
            assert time.time() - started < 10
            return
        time.sleep(0.2)
    pytest.fail("Cancel did not stop the decode within 30 s")


# Runs in ComfyUI's own interpreter (the server's): our node's output through core unCLIPConditioning and SDXL's
# pooled path (model_base.SDXL.encode_adm → sdxl_pooled → unclip_adm with the SDXL noise augmentor), side by side
# with the same embedding in ComfyUI's own clip_vision.Output, as CLIP Vision Encode makes it.
SDXL_CHECK = r"""
import torch
import nodes
import comfy.clip_vision, comfy.model_base, comfy.sampler_helpers, comfy.samplers, comfy.supported_models
import comfy.model_management as mm
from lambda_eclipse.core.pipeline import Embeds
from lambda_eclipse.nodes.sdxl import LambdaEclipseEmbedsToCLIPVision

report = {}
cpu = torch.device("cpu")
# The config a real SDXL base checkpoint is detected as (in_channels 4: not an inpaint model), minus the UNet itself.
config = comfy.supported_models.SDXL(dict(comfy.supported_models.SDXL.unet_config, in_channels=4,
                                          disable_unet_model_creation=True))
model = config.get_model({})  # the real SDXL model_base (noise augmentor, embedder), without the 2.6B UNet
assert type(model) is comfy.model_base.SDXL, type(model)

g = torch.Generator().manual_seed(0)
emb, neg = torch.randn(2, 1280, generator=g), torch.randn(2, 1280, generator=g)
text = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def clip_vision_encode_like(rows):
    out = comfy.clip_vision.Output()  # what CLIPVisionEncode returns, image_embeds only
    out["image_embeds"] = rows.to(mm.intermediate_device())
    return out


def adm(clip_vision_output, strength, noise_augmentation, seed=42):
    cond, = nodes.unCLIPConditioning().apply_adm(text, clip_vision_output, strength, noise_augmentation)
    conds = comfy.sampler_helpers.convert_cond(cond)
    noise = torch.zeros(1, 4, 128, 128)  # 1024 x 1024
    torch.manual_seed(seed)  # several rows are merged with unseeded noise
    conds = comfy.samplers.encode_model_conds(model.extra_conds, conds, noise, cpu, "positive",
                                              latent_image=noise, denoise_mask=None, seed=seed)
    direct = comfy.model_base.sdxl_pooled(dict(cond[0][1], device=cpu, seed=seed), model.noise_augmentor)
    return conds[0]["model_conds"]["y"].cond, cond, direct


ours, ip = LambdaEclipseEmbedsToCLIPVision().convert(Embeds(emb, neg, [0, 1]), index=1)
report["output_class"] = [c.__module__ + "." + c.__name__ for c in type(ours).__mro__]
report["is_comfy_output"] = isinstance(ours, comfy.clip_vision.Output)
report["image_embeds_equal"] = torch.equal(ours["image_embeds"], emb[1:2]) and torch.equal(ours.image_embeds, emb[1:2])
report["embeds_output"] = [type(ip).__name__, list(ip.shape), str(ip.dtype), torch.equal(ip, emb[1:2])]
report["absent"] = [name for name in ("last_hidden_state", "penultimate_hidden_states", "mm_projected", "image_sizes")
                    if not hasattr(ours, name)]

y_ours, cond, direct = adm(ours, 0.9, 0.1)
y_ref, _, _ = adm(clip_vision_encode_like(emb[1:2]), 0.9, 0.1)
y_text = model.encode_adm(**dict(text[0][1], device=cpu, width=1024, height=1024, seed=42))
report["unclip_entry"] = sorted(cond[0][1]["unclip_conditioning"][0])
report["y_shape"] = list(y_ours.shape)
report["equal_to_clip_vision_encode"] = torch.equal(y_ours, y_ref)
report["pooled_is_sdxl_pooled"] = torch.equal(y_ours[:, :1280], direct)
report["size_part_unchanged"] = torch.equal(y_ours[:, 1280:], y_text[:, 1280:])
report["text_pooled_replaced"] = not torch.allclose(y_ours[:, :1280], text[0][1]["pooled_output"])
plain, _, _ = adm(ours, 1.0, 0.0)
report["strength1_noise0_rel_err"] = float((plain[:, :1280] - emb[1:2]).norm() / emb[1:2].norm())
unclip = comfy.model_base.unclip_adm(cond[0][1]["unclip_conditioning"], cpu, model.noise_augmentor, seed=32)
report["unclip_adm_shape"] = list(unclip.shape)

both, _ = LambdaEclipseEmbedsToCLIPVision().convert(Embeds(emb, neg, [0, 1]))  # index -1: the whole batch
report["batch_equal_to_clip_vision_encode"] = torch.equal(adm(both, 0.8, 0.05)[0], adm(clip_vision_encode_like(emb), 0.8, 0.05)[0])
blank, _ = LambdaEclipseEmbedsToCLIPVision().convert(Embeds(emb, neg, [0, 1]), index=0, which="negative (blank)")
report["negative_row"] = torch.equal(blank.image_embeds, neg[0:1])
print("SDXL-BRIDGE " + json.dumps(report))
"""


# What every script run in ComfyUI's interpreter starts with: ComfyUI importable on the CPU, its folders in a
# scratch directory (our pack registers models/lambda_eclipse and copies its example images when it sees ComfyUI:
# keep them out of the checkout), and the pack importable as `lambda_eclipse`.
COMFYUI_PREAMBLE = r"""
import json, os, sys
comfy_path, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_path)
from comfy.cli_args import args
args.cpu = True
import folder_paths
folder_paths.models_dir = os.path.join(work, "models")
folder_paths.set_input_directory(os.path.join(work, "input"))
folder_paths.set_output_directory(os.path.join(work, "output"))
sys.path.insert(0, os.path.join(work, "packages"))  # packages/lambda_eclipse -> the repository
"""


def run_in_comfyui(script: str, tag: str, tmp_path: Path) -> dict:
    """Run COMFYUI_PREAMBLE + `script` in ComfyUI's own interpreter and return the JSON it prints after `tag`."""
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "lambda_eclipse").symlink_to(REPO, target_is_directory=True)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="2")
    done = subprocess.run([python, "-c", COMFYUI_PREAMBLE + script, str(Path(COMFYUI).resolve()), str(tmp_path)], cwd=COMFYUI,
                          capture_output=True, text=True, timeout=START_TIMEOUT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(tag + " ")]
    assert done.returncode == 0 and lines, f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1][len(tag) + 1:])


def test_sdxl_bridge_matches_clip_vision_encode(tmp_path):
    """Embeds to CLIP Vision → core unCLIPConditioning → SDXL's pooled conditioning equals CLIP Vision Encode's path."""
    report = run_in_comfyui(SDXL_CHECK, "SDXL-BRIDGE", tmp_path)
    print("\n" + json.dumps(report, indent=1))
    assert report["is_comfy_output"] and "comfy.clip_vision.Output" in report["output_class"]
    assert report["image_embeds_equal"]
    assert report["embeds_output"] == ["Tensor", [1, 1280], "torch.float32", True]
    assert report["absent"] == ["last_hidden_state", "penultimate_hidden_states", "mm_projected", "image_sizes"]
    assert report["unclip_entry"] == ["clip_vision_output", "noise_augmentation", "strength"]
    assert report["y_shape"] == [1, 2816]  # SDXL's adm_in_channels: 1280 pooled + 6 × 256 size embeddings
    assert report["equal_to_clip_vision_encode"] and report["batch_equal_to_clip_vision_encode"]
    assert report["pooled_is_sdxl_pooled"] and report["size_part_unchanged"] and report["text_pooled_replaced"]
    assert report["strength1_noise0_rel_err"] < 0.02  # the embedding itself, barely noised at level 0 (~0.6 %)
    assert report["unclip_adm_shape"] == [1, 2560]
    assert report["negative_row"]
