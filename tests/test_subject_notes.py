"""What Encode Subject and Interleave Prompt tell the user: a fully transparent picture is an error, a cut-out whose
MASK is not wired and a tiny photo are said on the node (and in the report), the 77-token cut-off too."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse.core.errors import InputError
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, comfy


@pytest.fixture()
def clip(tiny_clip):
    return types.SimpleNamespace(ready=lambda: tiny_clip)


@pytest.fixture()
def inputs(tmp_path):
    comfy.set_input_dir(tmp_path)
    yield tmp_path
    comfy.set_input_dir(None)


def _graph(image_name: str, with_mask: bool = False) -> dict:
    """A PROMPT as ComfyUI hands it to a node: Load Image (id 3) → Encode Subject (id 7)."""
    inputs = {"image": ["3", 0], "word": "dog"}
    if with_mask:
        inputs["mask"] = ["3", 1]
    return {"3": {"class_type": "LoadImage", "inputs": {"image": image_name}},
            "7": {"class_type": "LambdaEclipseEncodeSubject", "inputs": inputs}}


def _png(path, alpha):
    rgb = np.full((*np.asarray(alpha).shape, 3), 120, np.uint8)
    Image.fromarray(np.dstack([rgb, np.asarray(alpha, np.uint8)]), "RGBA").save(path)


def _encode(clip, image, **kw):
    return NODE_CLASS_MAPPINGS["LambdaEclipseEncodeSubject"]().encode(clip, image, "dog", **kw)[0]


def photo(h=240, w=320):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_fully_transparent_picture_from_load_image_is_an_error(clip, inputs):
    _png(inputs / "empty.png", np.zeros((160, 200)))
    with pytest.raises(InputError, match="fully transparent"):
        _encode(clip, photo(160, 200), prompt=_graph("empty.png"), unique_id="7")
    # wired: Load Image's MASK is 1 everywhere
    with pytest.raises(InputError, match="1 everywhere.*fully transparent"):
        _encode(clip, photo(160, 200), mask=torch.ones(1, 160, 200), prompt=_graph("empty.png", True), unique_id="7")


def test_unwired_cutout_mask_is_said(clip, inputs, monkeypatch):
    alpha = np.zeros((160, 200))
    alpha[20:150, 30:190] = 255
    _png(inputs / "cut.png", alpha)
    told = []
    monkeypatch.setattr(comfy, "tell_node", lambda uid, text: told.append((uid, text)))
    subjects = _encode(clip, photo(160, 200), prompt=_graph("cut.png"), unique_id="7")
    assert told and told[0][0] == "7" and "MASK is not connected" in told[0][1]
    assert any("MASK is not connected" in n for n in subjects[0].notes)
    # opaque PNGs, photos not from Load Image, and a wired mask say nothing
    told.clear()
    _png(inputs / "opaque.png", np.full((160, 200), 255))
    _encode(clip, photo(160, 200), prompt=_graph("opaque.png"), unique_id="7")
    _encode(clip, photo(160, 200))
    mask = torch.zeros(1, 160, 200)
    mask[:, 20:150, 30:190] = 1
    _encode(clip, photo(160, 200), mask=1 - mask, prompt=_graph("cut.png", True), unique_id="7")
    assert told == []


def test_tiny_photo_warns(clip, monkeypatch, caplog):
    told = []
    monkeypatch.setattr(comfy, "tell_node", lambda uid, text: told.append(text))
    with caplog.at_level(logging.WARNING, logger="lambda_eclipse"):
        subjects = _encode(clip, photo(1, 1), unique_id="7")
    assert "only 1×1 pixels" in told[0] and "224" in told[0]
    assert "only 1×1 pixels" in caplog.text
    assert subjects[0].notes
    told.clear()
    _encode(clip, photo(240, 320), unique_id="7")
    assert told == []


def test_interleave_report_carries_warnings(clip, monkeypatch):
    told = []
    monkeypatch.setattr(comfy, "tell_node", lambda uid, text: told.append(text))
    subjects = _encode(clip, photo(8, 8))
    node = NODE_CLASS_MAPPINGS["LambdaEclipseInterleavePrompt"]()
    long_text = "a dog " + "very " * 90 + "happy"
    _, report = node.interleave(clip, long_text, subjects, unique_id="9")
    assert "warning: the prompt is" in report and "CLIP reads only the first 77" in report
    assert "warning: subject 'dog': The subject is only 8×8 pixels" in report
    assert any("CLIP reads only the first 77" in t for t in told)
    told.clear()
    _, report = node.interleave(clip, "a dog", _encode(clip, photo()), unique_id="9")
    assert "warning" not in report and told == []


def test_tell_node_uses_comfyui_progress_text(monkeypatch):
    sent = []
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=types.SimpleNamespace(send_progress_text=lambda text, node: sent.append((node, text)))))
    monkeypatch.setattr(comfy, "in_comfyui", lambda: True)
    monkeypatch.setattr(comfy, "_import", lambda name: server if name == "server" else None)
    comfy.tell_node(12, "hello")
    assert sent == [("12", "hello")]
    comfy.tell_node(None, "no node")  # nothing to draw on: log only
    assert sent == [("12", "hello")]
