"""Rebuild the bundled workflows (UI format 0.4) and their thumbnails: python workflows/_build.py

Widget order and socket types come from the nodes' own INPUT_TYPES, so a workflow cannot drift from
the declarations. Thumbnails are diagrams of the graph drawn with PIL.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

from lambda_eclipse.core.paths import DEFAULT_LAYOUT, SPECS  
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  
from lambda_eclipse.nodes.assets import PREFIX  

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# The few ComfyUI core nodes the workflows use: (socket inputs, widget names, outputs).
CORE_NODES = {
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "Note": ([], ["text"], []),
}
MODEL_NAMES = {key: Path(DEFAULT_LAYOUT[key]).name for key in DEFAULT_LAYOUT}
HF = {key: SPECS[key].url for key in SPECS}
# Entries name a *file inside* the model folder, so an existence check by file name is exact (ComfyUI lists
# files, never folders). Frontend 1.27 only considers entries whose name equals a widget value, which a folder
# name cannot be without a false "missing" every time; so there these entries stay quiet, and the Note says
# where each model goes.
MODELS = {
    "LambdaEclipseLoadPrior": [{
        "name": f"{MODEL_NAMES['prior']}/diffusion_pytorch_model.safetensors",
        "url": f"{HF['prior']}/resolve/main/diffusion_pytorch_model.safetensors",
        "directory": "lambda_eclipse",
    }],
    "LambdaEclipseLoadCLIP": [{
        "name": f"{MODEL_NAMES['clip']}/open_clip_model.safetensors",
        "url": f"{HF['clip']}/resolve/main/open_clip_model.safetensors",
        "directory": "lambda_eclipse",
    }],
    "LambdaEclipseLoadDecoder": [
        {"name": f"{MODEL_NAMES['decoder']}/{part}/diffusion_pytorch_model.safetensors",
         "url": f"{HF['decoder']}/resolve/main/{part}/diffusion_pytorch_model.safetensors",
         "directory": "diffusers"}
        for part in ("unet", "movq")
    ],
}
NOTE_MODELS = (
    "Models (folder names as in the loaders):\n"
    f"• models/{DEFAULT_LAYOUT['prior']}/ ← config.json + diffusion_pytorch_model.safetensors from {HF['prior']}\n"
    f"• models/{DEFAULT_LAYOUT['clip']}/ ← open_clip_config.json + open_clip_model.safetensors from {HF['clip']}\n"
    f"• models/{DEFAULT_LAYOUT['decoder']}/ ← the whole folder (model_index.json, unet/, movq/, scheduler/) from {HF['decoder']}\n"
)


def declaration(node_type: str):
    """(socket inputs [(name, type)], widget names incl. control values, outputs [(name, type)])."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            kind, options = decl[0], (decl[1] if len(decl) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append(name)
                if options.get("control_after_generate"):
                    widgets.append(f"{name}:control_after_generate")
            else:
                sockets.append((name, kind))
    return sockets, widgets, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, node_type, pos, widgets=None, title=None, size=None):
        sockets, widget_names, outputs = declaration(node_type)
        widgets = dict(widgets or {})
        values = []
        for name in widget_names:
            if name.endswith(":control_after_generate"):
                values.append("fixed")
            elif name == "upload":
                values.append("image")
            else:
                values.append(widgets.pop(name))
        assert not widgets, f"unknown widgets for {node_type}: {widgets}"
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": list(pos),
            "size": list(size or [320, 60 + 26 * (len(sockets) + len(values))]),
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": values,
        }
        if node_type in MODELS:
            node["properties"]["models"] = MODELS[node_type]
        if title or node_type in NODE_DISPLAY_NAME_MAPPINGS:
            node["title"] = title or NODE_DISPLAY_NAME_MAPPINGS[node_type]
        if node_type == "Note":
            node["properties"] = {"text": ""}
            node["color"], node["bgcolor"] = "#432", "#653"
        self.nodes.append(node)
        return node["id"]

    def link(self, src, src_output, dst, dst_input):
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, o in enumerate(s["outputs"]) if o["name"] == src_output)
        dslot = next(i for i, o in enumerate(d["inputs"]) if o["name"] == dst_input)
        kind = s["outputs"][slot]["type"]
        assert d["inputs"][dslot]["type"] == kind, (src_output, dst_input)
        link_id = len(self.links) + 1
        self.links.append([link_id, src, slot, dst, dslot, kind])
        s["outputs"][slot]["links"].append(link_id)
        d["inputs"][dslot]["link"] = link_id

    def to_json(self):
        for node in self.nodes:
            for output in node["outputs"]:
                if not output["links"]:
                    output["links"] = None
        return {
            "id": "00000000-0000-4000-8000-00000000e11a", "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
        }


def loaders(g: Graph, x=0, y=0):
    prior = g.add("LambdaEclipseLoadPrior", (x, y), {"prior_name": MODEL_NAMES["prior"], "dtype": "auto"})
    clip = g.add("LambdaEclipseLoadCLIP", (x, y + 130), {"clip_name": MODEL_NAMES["clip"], "dtype": "auto"})
    decoder = g.add("LambdaEclipseLoadDecoder", (x, y + 260), {"decoder_name": MODEL_NAMES["decoder"], "dtype": "auto"})
    return prior, clip, decoder


def image(g: Graph, asset: str, pos):
    return g.add("LoadImage", pos, {"image": PREFIX + asset}, size=[260, 320])


def subject(g, clip, img, word, pos, previous=None):
    node = g.add("LambdaEclipseEncodeSubject", pos, {"word": word, "weight": 1.0, "fit": "crop"})
    g.link(clip, "clip", node, "clip")
    g.link(img, "IMAGE", node, "image")
    if previous:
        g.link(previous, "subjects", node, "subjects")
    return node


def finish(g, prior, clip, decoder, prompt_node, pos, prefix, control=None, seed=42, batch=1):
    sample = g.add("LambdaEclipsePriorSample", pos, {"seed": seed, "batch_size": batch})
    g.link(prior, "prior", sample, "prior")
    g.link(clip, "clip", sample, "clip")
    g.link(prompt_node, "prompt", sample, "prompt")
    if control:
        g.link(control, "control", sample, "control")
    dec = g.add("LambdaEclipseKandinskyDecode", (pos[0] + 360, pos[1]), {
        "width": 512, "height": 512, "steps": 50, "guidance": 7.5, "seed": seed, "batch_seeds": "increment"})
    g.link(decoder, "decoder", dec, "decoder")
    g.link(sample, "embeds", dec, "embeds")
    save = g.add("SaveImage", (pos[0] + 720, pos[1]), {"filename_prefix": f"lambda_eclipse/{prefix}"}, size=[400, 440])
    g.link(dec, "images", save, "images")
    return sample, dec


def subjects_workflow(name, text, items, note):
    g = Graph()
    prior, clip, decoder = loaders(g)
    g.add("Note", (0, 420), {"text": note + "\n\n" + NOTE_MODELS}, size=[340, 400])
    previous = None
    for i, (asset, word) in enumerate(items):
        img = image(g, asset, (380 + 300 * i, 0))
        previous = subject(g, clip, img, word, (380 + 300 * i, 360), previous)
    prompt = g.add("LambdaEclipseInterleavePrompt", (380, 620), {"text": text}, size=[400, 160])
    g.link(clip, "clip", prompt, "clip")
    g.link(previous, "subjects", prompt, "subjects")
    finish(g, prior, clip, decoder, prompt, (820, 620), name)
    return g


EDIT = ("To change: load your own photo in each Load Image, set the subject's word (it must appear in the prompt "
        "as a whole word: 'dog' does not match 'dogs'), and edit the prompt. Seeds are fixed; set the seed widgets "
        "to 'randomize' for new pictures.")


def build():
    out = {}
    out["lambda_eclipse_1_single_subject"] = subjects_workflow(
        "single_subject", "a cat on top of the snow mountain", [("cat.jpg", "cat")],
        "λ-ECLIPSE, one subject: the cat photo is written into the prompt at the word 'cat'.\n\n" + EDIT)
    out["lambda_eclipse_2_two_subjects"] = subjects_workflow(
        "two_subjects", "a cat wearing glasses at a park", [("cat.jpg", "cat"), ("glasses.jpg", "glasses")],
        "λ-ECLIPSE, two subjects chained through Encode Subject → subjects: 'cat' and 'glasses'.\n\n" + EDIT)
    out["lambda_eclipse_3_three_subjects"] = subjects_workflow(
        "three_subjects", "a dog wearing a hat and sunglasses on a beach",
        [("dog.jpg", "dog"), ("hat.jpg", "hat"), ("sunglasses.jpg", "sunglasses")],
        "λ-ECLIPSE, three subjects: 'dog', 'hat' and 'sunglasses' (each one CLIP token of the prompt).\n\n" + EDIT)

    g = Graph()
    prior, clip, decoder = loaders(g)
    g.add("Note", (0, 420), {"text": "λ-ECLIPSE with a Canny edge layout: the dog is placed as in the layout image.\n\n"
                             "To change: load another layout (any picture; its edges are used) and tune the thresholds, or "
                             "turn on image_is_edge_map to feed an edge map from another node. " + EDIT + "\n\n" + NOTE_MODELS},
          size=[340, 420])
    dog = image(g, "dog.jpg", (380, 0))
    subj = subject(g, clip, dog, "dog", (380, 360))
    layout = image(g, "surf_layout.png", (700, 0))
    canny = g.add("LambdaEclipseCannyCondition", (700, 360), {"low_threshold": 100, "high_threshold": 200, "image_is_edge_map": False})
    g.link(clip, "clip", canny, "clip")
    g.link(layout, "IMAGE", canny, "image")
    preview = g.add("PreviewImage", (1040, 0), size=[300, 320])
    g.link(canny, "edge_map", preview, "images")
    prompt = g.add("LambdaEclipseInterleavePrompt", (380, 620), {"text": "a dog is surfing"}, size=[400, 160])
    g.link(clip, "clip", prompt, "clip")
    g.link(subj, "subjects", prompt, "subjects")
    finish(g, prior, clip, decoder, prompt, (820, 620), "canny", control=canny)
    out["lambda_eclipse_4_canny_layout"] = g

    g = Graph()
    prior, clip, decoder = loaders(g)
    g.add("Note", (0, 420), {"text": "λ-ECLIPSE interpolation grid (the paper's figure): two dogs × two hats, prompt "
                             "'a dog is wearing a hat'. Each corner is one Prior Sample with the same seed; Embedding Grid "
                             "blends them (steps 2 → 3×3, 4 → 5×5) and Kandinsky Decode uses one seed for every cell "
                             "(batch_seeds 'same'), so only the blend changes.\n\nTo change: swap the dog and hat photos, "
                             "the prompt (all four Interleave Prompt nodes) or the grid steps.\n\n" + NOTE_MODELS},
          size=[340, 480])
    dogs = [image(g, "dog.jpg", (380, 0)), image(g, "dog_spotted.jpg", (380, 340))]
    hats = [image(g, "hat.jpg", (680, 0)), image(g, "hat_straw.jpg", (680, 340))]
    dog_subjects = [subject(g, clip, d, "dog", (980, 40 + 300 * i)) for i, d in enumerate(dogs)]
    corners = []
    for r, dog_node in enumerate(dog_subjects):
        for c, hat_img in enumerate(hats):
            y = 700 + 260 * (2 * r + c)
            both = subject(g, clip, hat_img, "hat", (380, y), previous=dog_node)
            prompt = g.add("LambdaEclipseInterleavePrompt", (720, y), {"text": "a dog is wearing a hat"}, size=[360, 140])
            g.link(clip, "clip", prompt, "clip")
            g.link(both, "subjects", prompt, "subjects")
            sample = g.add("LambdaEclipsePriorSample", (1120, y), {"seed": 7, "batch_size": 1})
            g.link(prior, "prior", sample, "prior")
            g.link(clip, "clip", sample, "clip")
            g.link(prompt, "prompt", sample, "prompt")
            corners.append(sample)
    grid = g.add("LambdaEclipseEmbeddingGrid", (1480, 700), {"steps": 2, "mode": "lerp"})
    for sample, name in zip(corners, ("top_left", "top_right", "bottom_left", "bottom_right")):
        g.link(sample, "embeds", grid, name)
    dec = g.add("LambdaEclipseKandinskyDecode", (1840, 700), {
        "width": 512, "height": 512, "steps": 50, "guidance": 7.5, "seed": 7, "batch_seeds": "same"})
    g.link(decoder, "decoder", dec, "decoder")
    g.link(grid, "embeds", dec, "embeds")
    save = g.add("SaveImage", (2200, 700), {"filename_prefix": "lambda_eclipse/grid"}, size=[440, 480])
    g.link(dec, "images", save, "images")
    out["lambda_eclipse_5_interpolation_grid"] = g
    return out


def thumbnail(workflow: dict, path: Path, size=(640, 400)):
    """A diagram of the graph: a box per node (title inside), a line per link, coloured by type."""
    from PIL import Image, ImageDraw

    nodes = {n["id"]: n for n in workflow["nodes"]}
    xs = [n["pos"][0] for n in nodes.values()] + [n["pos"][0] + n["size"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()] + [n["pos"][1] + n["size"][1] for n in nodes.values()]
    pad = 16
    scale = min((size[0] - 2 * pad) / (max(xs) - min(xs)), (size[1] - 2 * pad - 24) / (max(ys) - min(ys)))
    ox, oy = min(xs), min(ys)
    tf = lambda x, y: (pad + (x - ox) * scale, 24 + pad + (y - oy) * scale)  # noqa: E731
    image = Image.new("RGB", size, (32, 34, 40))
    d = ImageDraw.Draw(image)
    d.text((pad, 8), "Lambda-ECLIPSE - " + path.stem.replace("lambda_eclipse_", "").replace("_", " "), fill=(235, 235, 235))
    palette = {"IMAGE": (100, 181, 246), "LAMBDA_ECLIPSE_CLIP": (255, 214, 79), "LAMBDA_ECLIPSE_PRIOR": (186, 104, 200),
               "LAMBDA_ECLIPSE_DECODER": (239, 83, 80), "LAMBDA_ECLIPSE_EMBEDS": (129, 199, 132)}
    for _id, src, _s, dst, _d, kind in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        p = tf(a["pos"][0] + a["size"][0], a["pos"][1] + 20)
        q = tf(b["pos"][0], b["pos"][1] + 20)
        d.line([p, q], fill=palette.get(kind, (170, 170, 170)), width=2)
    for n in nodes.values():
        x0, y0 = tf(*n["pos"])
        x1, y1 = tf(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        ours = n["type"].startswith("LambdaEclipse")
        fill = (70, 60, 40) if n["type"] == "Note" else ((58, 66, 92) if ours else (60, 60, 66))
        d.rounded_rectangle((x0, y0, x1, y1), 4, fill=fill, outline=(150, 150, 160))
        label = n.get("title", n["type"]).replace("λ-ECLIPSE ", "")
        d.text((x0 + 3, y0 + 2), label[: max(3, int((x1 - x0) / 6))], fill=(240, 240, 240))
    image.save(path, quality=85)


def render(name: str, graph: Graph) -> str:
    return json.dumps(graph.to_json(), indent=1, ensure_ascii=False) + "\n"


def main(out: Path = HERE, thumbnails: bool = True):
    for name, graph in build().items():
        text = render(name, graph)
        (out / f"{name}.json").write_text(text, encoding="utf-8")
        if thumbnails:
            thumbnail(json.loads(text), out / f"{name}.jpg")


if __name__ == "__main__":
    main()
