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

from test_workflows import WORKFLOWS, load, ui_to_api

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
             "--disable-auto-launch"],
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
    write_tiny_models(base / "models")
    srv = Server(base)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def fast(prompt: dict) -> dict:
    """The same graph with tiny-model-friendly settings: 64 px, 2 steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "LambdaEclipseKandinskyDecode":
            node["inputs"].update(width=64, height=64, steps=2)
    return prompt


def test_pack_loaded_and_lists_models(server):
    info = _request(server.url + "/object_info/LambdaEclipseLoadPrior")
    names = info["LambdaEclipseLoadPrior"]["input"]["required"]["prior_name"][0]
    assert "Lambda-ECLIPSE-Prior-v1.0" in names
    decoders = _request(server.url + "/object_info/LambdaEclipseLoadDecoder")
    assert "kandinsky-2-2-decoder" in decoders["LambdaEclipseLoadDecoder"]["input"]["required"]["decoder_name"][0]
    log = server.tail(1_000_000)
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "lambda_eclipse" in line], log
    assert (server.base / "input" / "lambda_eclipse_cat.jpg").is_file()


def test_templates_are_listed(server):
    templates = _request(server.url + "/api/workflow_templates")
    listed = next(v for k, v in templates.items() if "lambda" in k.lower())
    assert len(listed) == len(WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(server, path):
    entry = server.run(fast(ui_to_api(load(path))))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000] + server.tail()
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    saved = [img for img in images if img["type"] == "output"]
    assert saved
    for img in saved:
        assert (server.base / "output" / img["subfolder"] / img["filename"]).is_file()
    if "grid" in path.stem:
        assert len(saved) == 9


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
