"""Embeds to CLIP Vision without ComfyUI: the rows it hands on, both outputs, and its refusals."""

from __future__ import annotations

import pytest
import torch

from lambda_eclipse.core.errors import InputError
from lambda_eclipse.core.pipeline import Embeds
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from lambda_eclipse.nodes import sdxl

NODE_ID = "LambdaEclipseEmbedsToCLIPVision"


def fake_embeds(batch=3, dim=1280, seed=0) -> Embeds:
    g = torch.Generator().manual_seed(seed)
    return Embeds(torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g), list(range(batch)))


def convert(embeds, **kw):
    return NODE_CLASS_MAPPINGS[NODE_ID]().convert(embeds, **kw)


def test_declaration():
    cls = NODE_CLASS_MAPPINGS[NODE_ID]
    assert NODE_DISPLAY_NAME_MAPPINGS[NODE_ID] == "λ-ECLIPSE Embeds to CLIP Vision"
    assert cls.CATEGORY == "λ-ECLIPSE/sdxl"
    assert cls.RETURN_TYPES == ("CLIP_VISION_OUTPUT", "EMBEDS")
    spec = cls.INPUT_TYPES()
    assert spec["required"]["embeds"][0] == "LAMBDA_ECLIPSE_EMBEDS"
    assert spec["optional"]["index"][0] == "INT" and spec["optional"]["index"][1]["default"] == -1
    assert spec["optional"]["which"][0] == ["positive", "negative (blank)"]
    assert spec["optional"]["which"][1]["default"] == "positive"
    # The tooltip says which consumers work and which do not.
    tip = cls.OUTPUT_TOOLTIPS[0]
    assert "unCLIPConditioning on SDXL" in tip and "Stable Cascade" in tip and "hidden states" in tip
    assert "ip-adapter_sdxl" in cls.OUTPUT_TOOLTIPS[1]


def test_all_rows_by_default():
    embeds = fake_embeds(3)
    out, ip = convert(embeds)
    assert out.image_embeds.shape == (3, 1280)
    assert torch.equal(out.image_embeds, embeds.embeds)
    assert out["image_embeds"] is out.image_embeds  # dict-like access, as comfy.clip_vision.Output
    assert torch.equal(ip, embeds.embeds) and ip.shape == (3, 1280)
    assert out.image_embeds.dtype == torch.float32 and out.image_embeds.device.type == "cpu"


def test_outputs_are_copies():
    embeds = fake_embeds(2)
    out, ip = convert(embeds)
    out.image_embeds.add_(1.0)
    assert not torch.equal(out.image_embeds, embeds.embeds), "the selection must not alias Prior Sample's output"


def test_index_picks_one_row():
    embeds = fake_embeds(3)
    for i in range(3):
        out, ip = convert(embeds, index=i)
        assert out.image_embeds.shape == (1, 1280) and ip.shape == (1, 1280)
        assert torch.equal(out.image_embeds, embeds.embeds[i:i + 1]) and torch.equal(ip, embeds.embeds[i:i + 1])


@pytest.mark.parametrize("index", [3, 7, -2])
def test_index_outside_the_batch(index):
    with pytest.raises(InputError, match=r"outside the batch of 3 .*-1 \(all\) or 0…2"):
        convert(fake_embeds(3), index=index)


def test_which_negative():
    embeds = fake_embeds(2)
    out, ip = convert(embeds, which="negative (blank)")
    assert torch.equal(out.image_embeds, embeds.negative) and torch.equal(ip, embeds.negative)
    out, ip = convert(embeds, index=1, which="negative (blank)")
    assert torch.equal(out.image_embeds, embeds.negative[1:2])
    with pytest.raises(InputError, match="which must be one of"):
        convert(embeds, which="both")


def test_other_dtypes_become_float32():
    embeds = fake_embeds(1)
    half = Embeds(embeds.embeds.half(), embeds.negative.half(), [0])
    out, ip = convert(half)
    assert out.image_embeds.dtype == ip.dtype == torch.float32
    assert torch.equal(out.image_embeds, embeds.embeds.half().float())


@pytest.mark.parametrize("dim", [1024, 768])
def test_other_clip_spaces_are_refused(dim):
    with pytest.raises(InputError) as info:
        convert(fake_embeds(1, dim=dim))
    message = str(info.value)
    assert f"{dim}-d" in message
    assert "SD 2.1 unCLIP or Stable Cascade use 1024/768-d CLIP spaces: this bridge is for SDXL (bigG)" in message


def test_not_a_batch_is_refused():
    bad = Embeds(torch.zeros(1280), torch.zeros(1280), [0])
    with pytest.raises(InputError, match=r"shape \[batch, 1280\]"):
        convert(bad)


def test_absent_fields_are_not_faked():
    out, _ = convert(fake_embeds(1))
    for name in sdxl.ABSENT:
        assert not hasattr(out, name)
        with pytest.raises(AttributeError, match="only carries image_embeds"):
            getattr(out, name)
        with pytest.raises(AttributeError, match="CLIP Vision Encode"):
            out[name]
    # Consumers may still add fields, as WAN's node does on ComfyUI's Output.
    out["penultimate_hidden_states"] = torch.zeros(1)
    assert out.penultimate_hidden_states.shape == (1,)


def test_plain_fallback_outside_comfyui():
    assert sdxl.clip_vision_module() is None
    cls = sdxl.output_class()
    assert cls is sdxl.output_class()  # one class, not one per call
    assert issubclass(cls, sdxl._PlainOutput)


def test_uses_comfyuis_output_class_when_present(monkeypatch):
    """With ComfyUI importable the object is a comfy.clip_vision.Output (what isinstance checks expect)."""

    class Output:  # ComfyUI's, verbatim
        def __getitem__(self, key):
            return getattr(self, key)

        def __setitem__(self, key, item):
            setattr(self, key, item)

    class FakeModule:
        pass

    FakeModule.Output = Output
    monkeypatch.setattr(sdxl, "clip_vision_module", lambda: FakeModule)
    out, _ = convert(fake_embeds(2))
    assert isinstance(out, Output)
    assert out["image_embeds"].shape == (2, 1280)
    with pytest.raises(AttributeError, match="only carries image_embeds"):
        out.last_hidden_state
