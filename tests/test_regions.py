"""Regional subjects (core/regions.py through core.decoder.decode): exact by construction where each branch has its
own UNet call (the CPU default), close to it when the branches are batched, and usable with every sampler."""

from __future__ import annotations

import pytest
import torch

from lambda_eclipse.core.decoder import SAMPLERS, decode, load_decoder
from lambda_eclipse.core.errors import InputError
from lambda_eclipse.core.regions import Region, latent_weight
from lambda_eclipse.core.tiny import TINY_EMBED, write_tiny_decoder

W = H = 64


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return load_decoder(write_tiny_decoder(tmp_path_factory.mktemp("regions") / "decoder", seed=0))


@pytest.fixture(scope="module")
def emb():
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(1, TINY_EMBED, generator=g) for name in ("base", "neg", "a", "b", "c")}


def run(decoder, emb, regions=None, base="base", **kw):
    kw = {"width": W, "height": H, "steps": 3, "guidance": 4.0, "seeds": 11, **kw}
    return decode(decoder, emb[base], emb["neg"], regions=regions, **kw)


def full(value=1.0):
    return torch.full((H, W), value)


def left(width=W // 2):
    m = torch.zeros(H, W)
    m[:, :width] = 1
    return m


def test_full_mask_at_strength_one_gives_the_regions_own_picture(decoder, emb):
    own = run(decoder, emb, base="a")
    assert torch.equal(run(decoder, emb, [Region(emb["a"], None, full(), 1.0)]), own)
    # a mask of another size (ComfyUI's MASK at image size or anything else) is resized to the latent grid
    assert torch.equal(run(decoder, emb, [Region(emb["a"], None, torch.ones(1, 17, 23), 1.0)]), own)


def test_empty_mask_zero_strength_or_the_base_embedding_give_the_base_picture(decoder, emb):
    base = run(decoder, emb)
    assert torch.equal(run(decoder, emb, [Region(emb["a"], None, torch.zeros(H, W), 1.0)]), base)
    assert torch.equal(run(decoder, emb, [Region(emb["a"], None, full(), 0.0)]), base)
    assert torch.equal(run(decoder, emb, [Region(emb["base"], None, left(), 0.3)]), base)
    assert torch.equal(run(decoder, emb, [Region(emb["base"], emb["neg"], full(0.7), 1.0)]), base)


def test_regions_covering_the_picture_replace_the_base(decoder, emb):
    right = 1 - left()
    regions = [Region(emb["a"], None, left(), 1.0), Region(emb["b"], None, right, 1.0)]
    x = run(decoder, emb, regions, base="base")
    y = run(decoder, emb, regions, base="c")
    assert torch.equal(x, y)
    assert not torch.equal(x, run(decoder, emb, base="a")) and not torch.equal(x, run(decoder, emb, base="b"))


def test_order_of_regions_does_not_matter(decoder, emb):
    overlap = torch.zeros(H, W)
    overlap[8:56, 16:48] = 1
    regions = [Region(emb["a"], None, left(40), 0.8), Region(emb["b"], None, overlap, 0.6),
               Region(emb["c"], None, 1 - left(24), 1.0)]
    first = run(decoder, emb, regions)
    assert torch.equal(first, run(decoder, emb, regions[::-1]))
    assert torch.equal(first, run(decoder, emb, [regions[1], regions[2], regions[0]]))
    assert (first - run(decoder, emb)).abs().max() > 0.02


def test_blend_weights_are_the_documented_ones(decoder, emb, monkeypatch):
    """Per latent pixel: w_r = strength·mask, base max(0, 1 − S), normalised by max(1, S)."""
    import lambda_eclipse.core.regions as regions

    seen = {}
    real = regions.blend

    def spy(predictions, coefficients):
        seen["coef"] = [c.clone() for c in coefficients]
        return real(predictions, coefficients)

    monkeypatch.setattr(regions, "blend", spy)
    overlap = torch.zeros(H, W)
    overlap[:, 16:48] = 1
    run(decoder, emb, [Region(emb["a"], None, left(), 0.8), Region(emb["b"], None, overlap, 0.6)], steps=1)
    coef = seen["coef"]
    assert len(coef) == 3
    total = sum(coef)
    torch.testing.assert_close(total, torch.ones_like(total))
    base = coef[0][0, 0]
    # latent columns 0-1: only a (0.8) → base 0.2; 2-3: a+b = 1.4 → base 0, a 0.8/1.4; 4-5: only b → base 0.4;
    # 6-7: no region → the base alone
    assert base[:, 0].allclose(torch.tensor(0.2)) and base[:, 3].eq(0).all() and base[:, 5].allclose(torch.tensor(0.4))
    assert base[:, 7].eq(1).all()
    a_then_b = {round(float(c[0, 0, 0, 3]), 4) for c in coef[1:]}
    assert a_then_b == {round(0.8 / 1.4, 4), round(0.6 / 1.4, 4)}


def test_batched_branches_match_one_call_each(decoder, emb):
    regions = [Region(emb["a"], None, left(), 1.0), Region(emb["b"], emb["c"], 1 - left(), 0.5)]
    each = run(decoder, emb, regions, batch_regions=False)
    together = run(decoder, emb, regions, batch_regions=True)
    assert (each - together).abs().max() < 1e-3  # BLAS rounding of another batch size only


def test_out_of_memory_falls_back_to_one_call_per_branch(decoder, emb, monkeypatch):
    regions = [Region(emb["a"], None, left(), 1.0)]
    expected = run(decoder, emb, regions, batch_regions=False)
    real = decoder.unet.forward
    calls = []

    def forward(*args, **kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        calls.append(sample.shape[0])
        if sample.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder.unet, "forward", forward)
    assert torch.equal(run(decoder, emb, regions, batch_regions=True), expected)
    assert calls[0] == 4 and set(calls[1:]) == {2}  # tried once batched, then one call per branch


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_and_img2img_work_with_regions(decoder, emb, sampler):
    regions = [Region(emb["a"], None, left(), 1.0)]
    out = run(decoder, emb, regions, sampler=sampler)
    assert torch.isfinite(out).all() and not torch.equal(out, run(decoder, emb, sampler=sampler))
    init = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(3))
    out2 = run(decoder, emb, regions, sampler=sampler, init_image=init, strength=0.7, steps=4)
    assert torch.isfinite(out2).all() and out2.shape == (1, H, W, 3)


def test_progress_cancel_and_preview_with_regions(decoder, emb):
    from lambda_eclipse.core.errors import Cancelled

    progress, previews = [], []
    run(decoder, emb, [Region(emb["a"], None, left(), 1.0)], steps=3,
        callback=lambda i, n: progress.append(i), preview=lambda i, n, x: previews.append(x.shape))
    assert progress == [0, 1, 2] and len(previews) == 3

    def cancel(i, n):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run(decoder, emb, [Region(emb["a"], None, left(), 1.0)], callback=cancel)


def test_batch_of_images_with_one_region_embedding(decoder, emb):
    base = torch.cat([emb["base"], emb["c"]])
    out = decode(decoder, base, emb["neg"], width=W, height=H, steps=2, seeds=[1, 2],
                 regions=[Region(emb["a"], None, full(), 1.0)])
    alone = decode(decoder, torch.cat([emb["a"], emb["a"]]), emb["neg"], width=W, height=H, steps=2, seeds=[1, 2])
    assert torch.equal(out, alone)


def test_feather_softens_the_edge():
    region = Region(torch.zeros(1, 4), None, left(), 1.0, feather=16)
    hard = latent_weight(Region(torch.zeros(1, 4), None, left(), 1.0), 0, 1, (8, 8), 8)[0, 0, 0]
    soft = latent_weight(region, 0, 1, (8, 8), 8)[0, 0, 0]
    assert hard.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert soft[0] > soft[3] > soft[4] > soft[7] and 0 < soft[4] < 1 and 0 < soft[3] < 1


@pytest.mark.parametrize("bad, message", [
    (lambda e: Region(e["a"], None, full(), 1.5), "strength must be a number from 0 to 1"),
    (lambda e: Region(e["a"], None, torch.ones(2, 3, H, W), 1.0), "mask has shape"),
    (lambda e: Region(torch.ones(1, 7), None, full(), 1.0), "expected \\[1 or 1, 32\\]|decoder's embedding size"),
    (lambda e: Region(e["a"], None, full(float("nan")), 1.0), "NaN"),
    (lambda e: Region(e["a"], None, full(), 1.0, feather=-2), "feather"),
    (lambda e: "not a region", "A region must be"),
])
def test_bad_regions_are_refused_before_any_step(decoder, emb, bad, message, monkeypatch):
    monkeypatch.setattr(decoder.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    with pytest.raises(InputError, match=message):
        run(decoder, emb, [bad(emb)])


# -- layouts ------------------------------------------------------------------------------------------------

def test_built_in_areas_and_boxes():
    from lambda_eclipse.core.regions import area_mask

    left_half = area_mask("left", 8, 4)
    assert left_half[:, :4].eq(1).all() and left_half[:, 4:].eq(0).all()
    assert (area_mask("left", 8, 4) + area_mask("right", 8, 4)).eq(1).all()
    quads = sum(area_mask(n, 8, 8) for n in ("top-left", "top-right", "bottom-left", "bottom-right"))
    assert quads.eq(1).all()
    box = area_mask("0,0,0.25,1", 8, 4)
    assert box.sum() == 8 and box[:, :2].eq(1).all()
    for bad in ("middle", "0,0,2,1", "0.5,0,0.2,1"):
        with pytest.raises(InputError, match="is not an area"):
            area_mask(bad, 8, 4)


def test_layout_file_format(tmp_path):
    from lambda_eclipse.core.regions import parse_layout, spec_mask

    from PIL import Image

    Image.new("L", (16, 8), 0).save(tmp_path / "m.png")
    specs = parse_layout({"layout": "left / right", "feather": 8, "regions": [
        {"prompt": "a dog on a beach", "subjects": {"dog": "dog.jpg"}},
        {"prompt": "a cat", "subjects": {"cat": "cat.png::cat_mask.png"}, "strength": 0.5, "where": "m.png"},
    ]}, base_dir=tmp_path)
    assert specs[0].where == "left" and specs[0].subjects == [("dog", tmp_path / "dog.jpg", None)]
    assert specs[0].feather == 8 and specs[1].strength == 0.5
    assert specs[1].subjects == [("cat", tmp_path / "cat.png", tmp_path / "cat_mask.png")]
    assert specs[1].where == str(tmp_path / "m.png")
    assert spec_mask(specs[0], 16, 8)[:, :8].eq(1).all()
    assert spec_mask(specs[1], 16, 8).eq(0).all()


@pytest.mark.parametrize("data, message", [
    ({}, 'needs a "regions" list'),
    ({"regions": [{"prompt": "a dog"}]}, "has no 'where'"),
    ({"layout": "diagonal", "regions": [{"prompt": "a"}]}, "Unknown layout 'diagonal'"),
    ({"layout": "left-right", "regions": [{"prompt": "a"}] * 3}, "has 2 areas but 3 regions"),
    ({"layout": "left-right", "regions": [{"text": "a"}]}, "unknown key"),
    ({"layout": "left-right", "regions": [{"prompt": ""}]}, "has no prompt"),
    ({"layout": "left-right", "regions": [{"prompt": "a", "strength": 3}]}, "strength must be"),
    ({"layout": "left-right", "regions": [{"prompt": "a", "subjects": ["dog.jpg"]}]}, "subjects must be an object"),
    ({"layout": "left-right", "colour": 1, "regions": [{"prompt": "a"}]}, "Unknown layout key"),
])
def test_bad_layouts_say_what_to_write(data, message):
    from lambda_eclipse.core.regions import parse_layout

    with pytest.raises(InputError, match=message):
        parse_layout(data)


# -- nodes -------------------------------------------------------------------------------------------------

def test_region_node_chains_and_decode_node_uses_the_regions(decoder, emb):
    import types

    from lambda_eclipse.core.pipeline import Embeds
    from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS

    region_node = NODE_CLASS_MAPPINGS["LambdaEclipseRegion"]()
    decode_node = NODE_CLASS_MAPPINGS["LambdaEclipseKandinskyDecode"]()
    spec = NODE_CLASS_MAPPINGS["LambdaEclipseKandinskyDecode"].INPUT_TYPES()
    assert list(spec["optional"])[-1] == "regions"  # appended: saved workflows keep their inputs
    holder = types.SimpleNamespace(ready=lambda: decoder)
    a = Embeds(emb["a"], emb["neg"], [0])
    b = Embeds(emb["b"], emb["neg"], [0])
    base = Embeds(emb["base"], emb["neg"], [0])
    comfy_mask = torch.zeros(1, H, W)  # ComfyUI MASK [B,H,W]
    comfy_mask[:, :, : W // 2] = 1
    regions, = region_node.region(a, comfy_mask, 1.0)
    regions, = region_node.region(b, 1 - comfy_mask, 1.0, regions=regions, feather=0)
    assert len(regions) == 2
    with_regions, = decode_node.decode(holder, base, W, H, 3, 4.0, 11, regions=regions)
    core = decode(decoder, emb["base"], emb["neg"], width=W, height=H, steps=3, guidance=4.0, seeds=[11],
                  regions=list(regions))
    assert torch.equal(with_regions, core)
    plain, = decode_node.decode(holder, base, W, H, 3, 4.0, 11)
    assert not torch.equal(with_regions, plain)
    with pytest.raises(InputError, match="must come from Prior Sample"):
        region_node.region(torch.zeros(1, 4), comfy_mask, 1.0)
