"""`nodes/offload.py` without ComfyUI: stub ops namespaces shaped like comfy.ops (plain subclasses of the torch
layers whose forward casts the weights when `comfy_cast_weights` is set)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lambda_eclipse.core.tiny import TINY_EMBED, make_tiny_clip, make_tiny_decoder_components
from lambda_eclipse.nodes import offload


class _Op:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []

    def _wb(self, x):
        w = self.weight.to(device=x.device, dtype=x.dtype) if self.weight is not None else None
        b = self.bias.to(device=x.device, dtype=x.dtype) if getattr(self, "bias", None) is not None else None
        return w, b

    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


def _ops(cast: bool):
    class ops:
        class Linear(_Op, torch.nn.Linear):
            def forward_comfy_cast_weights(self, x):
                return F.linear(x, *self._wb(x))

        class Conv2d(_Op, torch.nn.Conv2d):
            def forward_comfy_cast_weights(self, x):
                return self._conv_forward(x, *self._wb(x))

        class GroupNorm(_Op, torch.nn.GroupNorm):
            def forward_comfy_cast_weights(self, x):
                return F.group_norm(x, self.num_groups, *self._wb(x), self.eps)

        class LayerNorm(_Op, torch.nn.LayerNorm):
            def forward_comfy_cast_weights(self, x):
                return F.layer_norm(x, self.normalized_shape, *self._wb(x), self.eps)

        class Embedding(_Op, torch.nn.Embedding):
            def forward_comfy_cast_weights(self, x):
                return F.embedding(x, self.weight.to(x.device), self.padding_idx, self.max_norm, self.norm_type,
                                   self.scale_grad_by_freq, self.sparse)

    if cast:
        for cls in vars(ops).values():
            if isinstance(cls, type):
                cls.comfy_cast_weights = True
    return ops


def _eligible(model):
    types = tuple(getattr(torch.nn, n) for n in offload.SWAPPABLE)
    inside = set()
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__ == "VectorQuantizer":
            inside.update(id(c) for c in m.modules())
    return [m for m in model.modules() if type(m) in types and id(m) not in inside]


def _clip_outputs(model):
    torch.manual_seed(0)
    text = torch.randint(0, 49408, (2, 77))
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return model.encode_text(text), model.encode_image(image)


def _decoder_outputs(unet, movq):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, TINY_EMBED, generator=g)
    image = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        noise = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=None,
                     added_cond_kwargs={"image_embeds": embeds}).sample
        decoded = movq.decode(sample[:1], force_not_quantize=True).sample
        latents = movq.encode(image).latents
    return noise, decoded, latents


@pytest.mark.parametrize("cast", [False, True], ids=["disable_weight_init", "manual_cast"])
def test_clip_swapped_bit_equal(cast):
    model = make_tiny_clip()
    want = _clip_outputs(model)
    eligible = _eligible(model)
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert mha and eligible
    params_before = {n: p for n, p in model.named_parameters()}
    swapped = offload.make_offloadable(model, _ops(cast))
    assert {id(m) for m, _ in swapped} == {id(m) for m in eligible}
    assert all(offload.is_offloadable_layer(m) for m in eligible)
    # open_clip's attention reads its weights directly: left plain, out_proj included
    for m in mha:
        assert not any(offload.is_offloadable_layer(c) for c in m.modules())
    # no tensor copied, bare parameters untouched
    assert all(p is params_before[n] for n, p in model.named_parameters())
    got = _clip_outputs(model)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cast", [False, True], ids=["disable_weight_init", "manual_cast"])
def test_decoder_swapped_bit_equal(cast):
    unet, movq, _ = make_tiny_decoder_components()
    want = _decoder_outputs(unet, movq)
    ops = _ops(cast)
    swapped = []
    for part in (unet, movq):
        eligible = _eligible(part)
        got = offload.make_offloadable(part, ops, keep=[unet.conv_in])
        expect = {id(m) for m in eligible} - {id(unet.conv_in)}
        assert {id(m) for m, _ in got} == expect and expect
        swapped += got
    kinds = {type(m).__name__ for m, _ in swapped}
    assert {"Linear", "Conv2d", "GroupNorm"} <= kinds
    assert not offload.is_offloadable_layer(unet.conv_in)  # the device anchor stays plain
    assert not offload.is_offloadable_layer(movq.quantize.embedding)  # codebook read directly
    for a, b in zip(_decoder_outputs(unet, movq), want):
        assert torch.equal(a, b)
    offload.restore(swapped)
    assert not any(offload.is_offloadable_layer(m) for p in (unet, movq) for m in p.modules())
    for a, b in zip(_decoder_outputs(unet, movq), want):
        assert torch.equal(a, b)


def test_bad_ops_rejected_and_nothing_changed():
    model = make_tiny_clip()

    class bad:
        Linear = torch.nn.Linear  # not a subclass of the others
        Conv2d = GroupNorm = LayerNorm = Embedding = object

    with pytest.raises(TypeError):
        offload.make_offloadable(model, bad)
    assert not any(offload.is_offloadable_layer(m) for m in model.modules())


def test_resident_bytes_and_move():
    model = make_tiny_clip()
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert offload.resident_bytes(model) == total
    offload.make_offloadable(model, _ops(False))
    resident = offload.resident_bytes(model)
    swapped_bytes = sum(p.numel() * p.element_size() for m in model.modules() if offload.is_offloadable_layer(m)
                        for p in m.parameters(recurse=False))
    assert resident == total - swapped_bytes and 0 < resident < total
    # move_resident touches only non-ops tensors ("meta" stands in for a GPU)
    clone = copy.deepcopy(model)
    moved = offload.move_resident(clone, torch.device("meta"))
    assert moved == resident
    assert clone.positional_embedding.device.type == "meta"
    assert clone.transformer.resblocks[0].attn.in_proj_weight.device.type == "meta"
    assert clone.transformer.resblocks[0].mlp.c_fc.weight.device.type == "cpu"
    assert offload.move_resident(clone, torch.device("meta")) == 0
