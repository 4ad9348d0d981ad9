"""Rebuild the bundled workflows (UI format 0.4) and their thumbnails: python workflows/_build.py

Widget order and socket types come from the nodes' own INPUT_TYPES, so a workflow cannot drift from
the declarations. Thumbnails are diagrams of the graph drawn with PIL.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

from lambda_eclipse.core.paths import manifest  # noqa: E402
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from lambda_eclipse.nodes.assets import PREFIX  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# The few ComfyUI core nodes the workflows use: (socket inputs, widget names, outputs).
CORE_NODES = {
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "Note": ([], ["text"], []),
    # SDXL (workflow 6), as ComfyUI 0.3.64 nodes.py declares them.
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "unCLIPConditioning": ([("conditioning", "CONDITIONING"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
                           ["strength", "noise_augmentation"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
                 ["seed", "seed:control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
}
FILES = manifest()
# Each loader's model combos and the manifest entry each one names. The frontends' missing-models check
# (1.27: an entry whose name equals a widget value; newest: a combo whose .safetensors value is not among its
# options) needs exactly this: one combo per weight file, properties.models[].name == the widget value.
LOADER_FILES = {
    "LambdaEclipseLoadPrior": {"prior_name": "prior"},
    "LambdaEclipseLoadCLIP": {"clip_name": "clip_text", "vision_name": "clip_vision"},
    "LambdaEclipseLoadDecoder": {"decoder_name": "decoder_unet", "movq_name": "decoder_movq"},
}
MODELS = {
    node: [{"name": FILES[key].name, "url": FILES[key].url, "directory": FILES[key].folder} for key in combos.values()]
    for node, combos in LOADER_FILES.items()
}
# Workflow 6's SDXL base checkpoint: not ours, so not in the manifest (nor fetched by `download`).
SDXL_BASE = {"name": "sd_xl_base_1.0.safetensors",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
             "directory": "checkpoints"}
MODELS["CheckpointLoaderSimple"] = [SDXL_BASE]
NOTE_MODELS = (
    "Models: five files, each in its ComfyUI folder (a browser's Download button saves to your Downloads folder: "
    "move the file there), or run once: python -m lambda_eclipse download --models ComfyUI/models\n"
    + "".join(f"• models/{e.folder}/{e.name}" + (f" ({e.size_text()})" if e.size else "") + "\n" for e in FILES.values())
    + "SDXL users already have both CLIP towers (clip_g or the SDXL checkpoint, clip_vision_g): pick them in Load CLIP."
)
NOTE_MODELS_SDXL = (
    "Models: four files, each in its ComfyUI folder (a browser's Download button saves to your Downloads folder: "
    "move the file there), or run once: python -m lambda_eclipse download --only prior,clip --models ComfyUI/models "
    "(the checkpoint is not fetched by it)\n"
    + "".join(f"• models/{e.folder}/{e.name}" + (f" ({e.size_text()})" if e.size else "") + "\n"
              for k, e in FILES.items() if k in ("prior", "clip_text", "clip_vision"))
    + f"• models/checkpoints/{SDXL_BASE['name']} (6.94 GB, SDXL base 1.0)\n"
    "No Kandinsky decoder here. Load CLIP's clip_name may also be the SDXL checkpoint itself: its bigG text tower is read "
    "from it, so clip_g_sdxl.fp16 can be skipped."
)
# What the frontends draw around nodes and over the canvas, measured in a 1600×1000 window with ComfyUI 0.3.64 and
# frontends 1.27.10 and 1.58.1 (headless Chromium). A node's title bar sits above its pos; a custom node's source
# badge ("lambda_eclipse", 20 px) sits 2 px above the title bar, so our nodes reach 52 above pos.
TITLE, BADGE = 30, 52
# Both frontends grow a Load Image to its preview's minimum whatever the file says (314 on load, 326 computed).
LOAD_IMAGE_HEIGHT = 326
GAP = 56  # between a node and one of ours below it: clear of that node's badge
WINDOW = (1600, 1000)
# 1.27.10 restores extra.ds on its canvas, which starts right of the side bar and below the menus; its minimap and
# canvas menu cover the bottom-right corner (window coordinates).
CANVAS_1_27 = (64, 78, 1600, 1000)
COVERS_1_27 = [(1306, 734, 1556, 934), (1277, 939, 1584, 984)]
# 1.58.1 ignores extra.ds for a template: it fits the graph's bounds (title bars + 10 px) to 75 % of the whole
# window (LGraphCanvas.ds.fitToBounds, zoom 0.75) and draws over the canvas: side bar, tab bar, the Graph and Run
# tool bars, minimap and canvas menu.
COVERS_1_58 = [(0, 0, 56, 1000), (0, 0, 1600, 38), (56, 44, 210, 86), (1240, 44, 1600, 86), (1339, 738, 1592, 938),
               (1340, 948, 1600, 1000)]
# Below 8 px for 14 px text (the newest frontend's default level-of-detail threshold) nodes draw without text.
MIN_SCALE = 8 / 14


def extent(node) -> tuple[float, float, float, float]:
    """What the frontends draw for a node: title bar (and badge for ours) above pos, at least their minimum height."""
    (x, y), (w, h) = node["pos"], node["size"]
    if node["type"] == "LoadImage":
        h = max(h, LOAD_IMAGE_HEIGHT)
    top = BADGE if node["type"].startswith("LambdaEclipse") else TITLE
    return x, y - top, x + w, y + h


def view_1_58(nodes) -> tuple[float, list[float]]:
    """(scale, offset) frontend 1.58.1 opens a template with: fitToBounds(createBounds(boundingRect), zoom 0.75)."""
    x0 = min(n["pos"][0] for n in nodes) - 10
    y0 = min(n["pos"][1] - TITLE for n in nodes) - 10
    w = max(n["pos"][0] + n["size"][0] for n in nodes) + 10 - x0
    h = max(n["pos"][1] + n["size"][1] for n in nodes) + 10 - y0
    scale = min(0.75 * WINDOW[0] / max(w, 300), 0.75 * WINDOW[1] / max(h, 300))
    return scale, [WINDOW[0] / 2 / scale - x0 - w / 2, WINDOW[1] / 2 / scale - y0 - h / 2]


def on_screen(node, scale, offset, origin=(0, 0)) -> tuple[float, float, float, float]:
    """A node's extent in window pixels (LiteGraph draws at (pos + offset) · scale from the canvas origin)."""
    x0, y0, x1, y1 = extent(node)
    return (origin[0] + (x0 + offset[0]) * scale, origin[1] + (y0 + offset[1]) * scale,
            origin[0] + (x1 + offset[0]) * scale, origin[1] + (y1 + offset[1]) * scale)


def intersects(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def declaration(node_type: str):
    """(socket inputs [(name, type)], widget names incl. control values, outputs [(name, type)], defaults)."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type] + ({},)
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets, defaults = [], [], {}
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            kind, options = decl[0], (decl[1] if len(decl) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append(name)
                if "default" in options:
                    defaults[name] = options["default"]
                if options.get("control_after_generate"):
                    widgets.append(f"{name}:control_after_generate")
            else:
                sockets.append((name, kind))
    return sockets, widgets, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)), defaults


def node_height(sockets: int, outputs: int, widgets: int) -> int:
    """The frontends' own minimum (computeSize: 14 + 20 per slot row + 24 per widget, both 1.27.10 and 1.58.1) + 12."""
    return 26 + 20 * max(sockets, outputs) + 24 * widgets


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, node_type, pos, widgets=None, title=None, size=None):
        sockets, widget_names, outputs, defaults = declaration(node_type)
        widgets = dict(widgets or {})
        values = []
        for name in widget_names:
            if name.endswith(":control_after_generate"):
                values.append("fixed")
            elif name == "upload":
                values.append("image")
            elif name in widgets:
                values.append(widgets.pop(name))
            else:  # an optional widget the workflow leaves at its default
                values.append(defaults[name])
        assert not widgets, f"unknown widgets for {node_type}: {widgets}"
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": list(pos),
            "size": [given if given is not None else auto for given, auto in
                     zip(size or [None, None], [320, node_height(len(sockets), len(outputs), len(values))])],
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

    def bottom(self, *ids, gap=GAP):
        """The y just below the lowest of these nodes."""
        return max(extent(self.nodes[i - 1])[3] for i in ids) + gap

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
            "extra": {"ds": self.fit_view()}, "models": self.models(), "version": 0.4,
        }

    def models(self):
        """The top-level list: every model file the graph names (the frontends use it to enrich per-node entries)."""
        seen = {}
        for node in self.nodes:
            for model in node["properties"].get("models", []):
                seen.setdefault(model["name"], model)
        return list(seen.values())

    def fit_view(self, margin=24):
        """The saved view (1.27.10 restores it): the largest scale (≤ 1) at which every node, title and badge
        included, is inside its canvas with a margin and clear of its minimap and canvas menu, the graph at the
        top left. A layout that leaves no such scale ≥ MIN_SCALE is refused."""
        boxes = [extent(n) for n in self.nodes]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        ox, oy, right, bottom = CANVAS_1_27
        width, height = right - ox - 2 * margin, bottom - oy - 2 * margin
        scale = int(min(1.0, width / (x1 - x0), height / (y1 - y0)) * 100) / 100
        while scale >= MIN_SCALE:
            offset = [round(margin / scale - x0, 1), round(margin / scale - y0, 1)]
            if not any(intersects(on_screen(n, scale, offset, (ox, oy)), cover)
                       for n in self.nodes for cover in COVERS_1_27):
                return {"scale": scale, "offset": offset}
            scale = round(scale - 0.01, 2)
        raise AssertionError("no readable saved view keeps the graph clear of 1.27.10's minimap: change the layout")


def loaders(g: Graph, x=0, y=0, decoder=True):
    """Load Prior, Load CLIP and (unless decoder=False: SDXL decodes instead) Load Kandinsky Decoder; None for absent."""
    def files(node):
        return {combo: FILES[key].name for combo, key in LOADER_FILES[node].items()}

    prior = g.add("LambdaEclipseLoadPrior", (x, y), dict(files("LambdaEclipseLoadPrior"), dtype="auto"), size=[340, None])
    clip = g.add("LambdaEclipseLoadCLIP", (x, g.bottom(prior)), dict(files("LambdaEclipseLoadCLIP"), dtype="auto"),
                 size=[340, None])
    if not decoder:
        return prior, clip, None
    decoder = g.add("LambdaEclipseLoadDecoder", (x, g.bottom(clip)), dict(files("LambdaEclipseLoadDecoder"), dtype="auto"),
                    size=[340, None])
    return prior, clip, decoder


def image(g: Graph, asset: str, pos, size=(280, LOAD_IMAGE_HEIGHT)):
    return g.add("LoadImage", pos, {"image": PREFIX + asset}, size=list(size))


def subject(g, clip, img, word, pos, previous=None, width=300):
    node = g.add("LambdaEclipseEncodeSubject", pos, {"word": word, "weight": 1.0, "fit": "crop"}, size=[width, None])
    g.link(clip, "clip", node, "clip")
    g.link(img, "IMAGE", node, "image")
    if previous:
        g.link(previous, "subjects", node, "subjects")
    return node


def finish(g, prior, clip, decoder, prompt_node, pos, prefix, control=None, seed=42, batch=1):
    x, y = pos
    sample = g.add("LambdaEclipsePriorSample", (x, y), {"seed": seed, "batch_size": batch})
    g.link(prior, "prior", sample, "prior")
    g.link(clip, "clip", sample, "clip")
    g.link(prompt_node, "prompt", sample, "prompt")
    if control:
        g.link(control, "control", sample, "control")
    dec = g.add("LambdaEclipseKandinskyDecode", (x + 370, y), {
        "width": 512, "height": 512, "steps": 50, "guidance": 7.5, "seed": seed, "batch_seeds": "increment"})
    g.link(decoder, "decoder", dec, "decoder")
    g.link(sample, "embeds", dec, "embeds")
    # At the top right: the bottom-right corner is where both frontends draw their minimap.
    save = g.add("SaveImage", (x + 740, 0), {"filename_prefix": f"lambda_eclipse/{prefix}"}, size=[420, 470])
    g.link(dec, "images", save, "images")
    return sample, dec


def note(g, text, loaders_bottom, height=430, models=NOTE_MODELS):
    return g.add("Note", (0, loaders_bottom), {"text": text + "\n\n" + models}, size=[340, height])


def subjects_workflow(name, text, items, note_text):
    g = Graph()
    prior, clip, decoder = loaders(g)
    note(g, note_text, g.bottom(decoder))
    previous, images, subjects = None, [], []
    for i, (asset, word) in enumerate(items):
        images.append(image(g, asset, (400 + 320 * i, 0)))
    for i, (asset, word) in enumerate(items):
        previous = subject(g, clip, images[i], word, (400 + 320 * i, g.bottom(*images)), previous)
        subjects.append(previous)
    y = g.bottom(*subjects)
    prompt = g.add("LambdaEclipseInterleavePrompt", (400, y), {"text": text}, size=[420, 170])
    g.link(clip, "clip", prompt, "clip")
    g.link(previous, "subjects", prompt, "subjects")
    finish(g, prior, clip, decoder, prompt, (860, y), name)
    return g


EDIT = ("To change: load your own photo in each Load Image, set the subject's word (it must appear in the prompt "
        "as a whole word: 'dog' does not match 'dogs'), and edit the prompt. Seeds are fixed; set the seed widgets "
        "to 'randomize' for new pictures.")


def canny_workflow():
    g = Graph()
    prior, clip, decoder = loaders(g)
    note(g, "λ-ECLIPSE with a Canny edge layout: the dog is placed as in the layout image.\n\n" + EDIT + " Load "
         "another layout (any picture; its edges are used) and tune the thresholds, or turn on image_is_edge_map "
         "to feed an edge map from another node.", g.bottom(decoder), height=470)
    dog = image(g, "dog.jpg", (400, 0))
    layout = image(g, "surf_layout.png", (720, 0))
    preview = g.add("PreviewImage", (1040, 0), size=[300, 330])
    y = g.bottom(dog, layout, preview)
    subj = subject(g, clip, dog, "dog", (400, y))
    canny = g.add("LambdaEclipseCannyCondition", (720, y),
                  {"low_threshold": 100, "high_threshold": 200, "image_is_edge_map": False}, size=[300, None])
    g.link(clip, "clip", canny, "clip")
    g.link(layout, "IMAGE", canny, "image")
    g.link(canny, "edge_map", preview, "images")
    y = g.bottom(subj, canny)
    prompt = g.add("LambdaEclipseInterleavePrompt", (400, y), {"text": "a dog is surfing"}, size=[420, 170])
    g.link(clip, "clip", prompt, "clip")
    g.link(subj, "subjects", prompt, "subjects")
    finish(g, prior, clip, decoder, prompt, (860, y), "canny", control=canny)
    return g


def grid_workflow():
    """Compact enough to open readable (scale ≥ MIN_SCALE) in both frontends in a 1600×1000 window: 1.58.1 fits
    the whole graph to 75 % of the window, so it must stay within about 2050 × 1250."""
    g = Graph()
    prior, clip, decoder = loaders(g)
    note(g, "λ-ECLIPSE interpolation grid (the paper's figure): two dogs × two hats, prompt 'a dog is wearing a hat'. "
         "Each corner (a column below) is one Prior Sample with the same seed; Embedding Grid blends them (steps 2 → "
         "3×3, 4 → 5×5) and Kandinsky Decode uses one seed for every cell (batch_seeds 'same'), so only the blend "
         "changes. Image Grid lays the pictures out as one picture.\n\nTo change: swap the dog and hat photos, the "
         "prompt (all four Interleave Prompt nodes) or the grid steps.", g.bottom(decoder), height=660)
    column, width = 280, 260
    photos = [image(g, name, (380 + column * i, 0), size=[width, LOAD_IMAGE_HEIGHT])
              for i, name in enumerate(("dog.jpg", "dog_spotted.jpg", "hat.jpg", "hat_straw.jpg"))]
    dogs, hats = photos[:2], photos[2:]
    y = g.bottom(*photos)
    dog_subjects = [subject(g, clip, d, "dog", (380 + column * i, y), width=width) for i, d in enumerate(dogs)]
    top = g.bottom(*dog_subjects)
    corners = []
    for i, (dog_node, hat_img) in enumerate((d, h) for d in dog_subjects for h in hats):
        x = 380 + column * i
        both = subject(g, clip, hat_img, "hat", (x, top), previous=dog_node, width=width)
        prompt = g.add("LambdaEclipseInterleavePrompt", (x, g.bottom(both)), {"text": "a dog is wearing a hat"},
                       size=[width, 110])
        g.link(clip, "clip", prompt, "clip")
        g.link(both, "subjects", prompt, "subjects")
        sample = g.add("LambdaEclipsePriorSample", (x, g.bottom(prompt)), {"seed": 7, "batch_size": 1}, size=[width, None])
        g.link(prior, "prior", sample, "prior")
        g.link(clip, "clip", sample, "clip")
        g.link(prompt, "prompt", sample, "prompt")
        corners.append(sample)
    x = 380 + column * 4
    grid = g.add("LambdaEclipseEmbeddingGrid", (x, 0), {"steps": 2, "mode": "lerp"}, size=[width, None])
    for sample, name in zip(corners, ("top_left", "top_right", "bottom_left", "bottom_right")):
        g.link(sample, "embeds", grid, name)
    dec = g.add("LambdaEclipseKandinskyDecode", (x, g.bottom(grid)), {
        "width": 512, "height": 512, "steps": 50, "guidance": 7.5, "seed": 7, "batch_seeds": "same"}, size=[width, None])
    g.link(decoder, "decoder", dec, "decoder")
    g.link(grid, "embeds", dec, "embeds")
    tile = g.add("LambdaEclipseImageGrid", (x, g.bottom(dec)), {"columns": 0, "gap": 8}, size=[width, None])
    g.link(dec, "images", tile, "images")
    # The saved pictures on the right, their bottom above the minimap's corner.
    save_grid = g.add("SaveImage", (x + column, 0), {"filename_prefix": "lambda_eclipse/grid_figure"}, size=[250, 400])
    g.link(tile, "image", save_grid, "images")
    save = g.add("SaveImage", (x + column, g.bottom(save_grid, gap=40)), {"filename_prefix": "lambda_eclipse/grid"},
                 size=[250, 400])
    g.link(dec, "images", save, "images")
    return g


def one_subject_embeds(g, prior, clip, asset, word, text):
    """A photo column at x=400 (Load Image → Encode Subject → Interleave Prompt) and Prior Sample at (770, 0)."""
    photo = image(g, asset, (400, 0), size=(320, 330))
    subj = subject(g, clip, photo, word, (400, g.bottom(photo)), width=320)
    prompt = g.add("LambdaEclipseInterleavePrompt", (400, g.bottom(subj)), {"text": text}, size=[320, 170])
    g.link(clip, "clip", prompt, "clip")
    g.link(subj, "subjects", prompt, "subjects")
    sample = g.add("LambdaEclipsePriorSample", (770, 0), {"seed": 42, "batch_size": 1}, size=[320, None])
    g.link(prior, "prior", sample, "prior")
    g.link(clip, "clip", sample, "clip")
    g.link(prompt, "prompt", sample, "prompt")
    return sample


def sdxl_workflow(name):
    """λ-ECLIPSE embedding → core unCLIPConditioning (ReVision) on SDXL base: our nodes up to the bridge, core after."""
    text = "a cat on top of the snow mountain"
    g = Graph()
    prior, clip, _ = loaders(g, decoder=False)
    ckpt = g.add("CheckpointLoaderSimple", (0, g.bottom(clip)), {"ckpt_name": SDXL_BASE["name"]}, size=[340, None])
    note(g, "λ-ECLIPSE subjects in SDXL (unCLIP / ReVision). The prior turns the cat photo and the prompt into one "
         "OpenCLIP bigG image embedding: the space CLIP Vision Encode makes with clip_vision_g. Embeds to CLIP Vision "
         "hands it to core unCLIPConditioning, which puts it in place of SDXL's pooled text embedding (ReVision); the "
         "text still steers SDXL through cross-attention. Expect the subject's look and the scene's gist rather than "
         "an exact copy: SDXL never saw λ-ECLIPSE embeddings, and we have not measured the quality.\n\n"
         "To change: strength in unCLIPConditioning (start at 0.8–1.0; lower lets the text lead), noise_augmentation "
         "(0–0.2; higher is looser and more varied), the photo, its word and both prompts (keep the SDXL prompt close "
         "to the λ-ECLIPSE one). With batch_size > 1 in Prior Sample, pick one embedding with index in Embeds to CLIP "
         "Vision: unCLIPConditioning adds up every row it gets.",
         g.bottom(ckpt), height=480, models=NOTE_MODELS_SDXL)
    sample = one_subject_embeds(g, prior, clip, "cat.jpg", "cat", text)
    x = 770
    bridge = g.add("LambdaEclipseEmbedsToCLIPVision", (x, g.bottom(sample)), {}, size=[320, None])
    g.link(sample, "embeds", bridge, "embeds")
    positive = g.add("CLIPTextEncode", (x, g.bottom(bridge)), {"text": text}, title="Positive (SDXL)", size=[320, 150])
    negative = g.add("CLIPTextEncode", (x, g.bottom(positive)), {"text": "blurry, low quality, watermark, text"},
                     title="Negative (SDXL)", size=[320, 130])
    for node in (positive, negative):
        g.link(ckpt, "CLIP", node, "clip")

    x += 370
    unclip = g.add("unCLIPConditioning", (x, 0), {"strength": 0.9, "noise_augmentation": 0.1}, size=[320, None])
    g.link(positive, "CONDITIONING", unclip, "conditioning")
    g.link(bridge, "clip_vision_output", unclip, "clip_vision_output")
    latent = g.add("EmptyLatentImage", (x, g.bottom(unclip)), {"width": 1024, "height": 1024, "batch_size": 1}, size=[320, None])
    sampler = g.add("KSampler", (x, g.bottom(latent)), {
        "seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
        size=[320, None])
    g.link(ckpt, "MODEL", sampler, "model")
    g.link(unclip, "CONDITIONING", sampler, "positive")
    g.link(negative, "CONDITIONING", sampler, "negative")
    g.link(latent, "LATENT", sampler, "latent_image")

    x += 370
    decode = g.add("VAEDecode", (x, 0), size=[300, None])
    g.link(sampler, "LATENT", decode, "samples")
    g.link(ckpt, "VAE", decode, "vae")
    save = g.add("SaveImage", (x, g.bottom(decode)), {"filename_prefix": f"lambda_eclipse/{name}"}, size=[420, 470])
    g.link(decode, "IMAGE", save, "images")
    return g


LORA_NAME = "dog_concept_lora.safetensors"


def lora_workflow():
    """A decoder LoRA (trainer finetune-decoder) between Load Kandinsky Decoder and Kandinsky Decode, with the base
    decoder's picture from the same embedding and seed beside it."""
    text = "a dog on the beach"
    g = Graph()
    prior, clip, decoder = loaders(g)
    note(g, "λ-ECLIPSE with a concept fine-tune of the decoder (paper §3.3): the dog's LoRA makes the decoder draw "
         "that dog more like its photos, while the prompt still sets the scene. The upper picture uses the LoRA, "
         "the lower one the same embedding and seed on the base decoder.\n\n"
         "Make the LoRA from 3–5 photos of your subject (TRAINING.md §9):\n"
         "python -m lambda_eclipse.trainer finetune-decoder --decoder-unet models/diffusion_models/"
         "kandinsky-2-2-decoder-unet.safetensors --decoder-movq models/vae/kandinsky-2-2-movq.safetensors "
         "--clip-vision models/clip_vision/clip_vision_g.safetensors --images my_dog_photos/ --out runs/my_dog "
         "--steps 400 --sample-every 100\n"
         f"then copy runs/my_dog/concept_lora.safetensors to models/loras/{LORA_NAME} (or keep its name and pick it "
         "in Load Decoder LoRA after pressing R). Without it, Run still makes the lower (base decoder) picture; "
         "Load Decoder LoRA is only outlined in red (the newest frontend also lists it under Issues) and ComfyUI's "
         "console says where the file goes.\n\nTo change: use one of the same photos in Load Image, set its word "
         "and the prompt; strength 1 = as trained, 0 = the base decoder, in between = partly; chain Load Decoder "
         "LoRA nodes to use several concepts' LoRAs at once.",
         g.bottom(decoder), height=620)
    sample = one_subject_embeds(g, prior, clip, "dog.jpg", "dog", text)
    x = 770
    lora = g.add("LambdaEclipseLoadDecoderLoRA", (x, g.bottom(sample)), {"lora_name": LORA_NAME, "strength": 1.0},
                 size=[320, None])
    g.link(decoder, "decoder", lora, "decoder")

    x += 370
    settings = {"width": 512, "height": 512, "steps": 50, "guidance": 7.5, "seed": 42, "batch_seeds": "increment"}
    tuned = g.add("LambdaEclipseKandinskyDecode", (x, 0), settings, title="Kandinsky Decode (with the LoRA)", size=[320, None])
    g.link(lora, "decoder", tuned, "decoder")
    g.link(sample, "embeds", tuned, "embeds")
    save_tuned = g.add("SaveImage", (x + 350, 0), {"filename_prefix": "lambda_eclipse/concept_lora"}, size=[380, 380])
    g.link(tuned, "images", save_tuned, "images")
    base = g.add("LambdaEclipseKandinskyDecode", (x, g.bottom(tuned)), settings, title="Kandinsky Decode (base decoder)",
                 size=[320, None])
    g.link(decoder, "decoder", base, "decoder")
    g.link(sample, "embeds", base, "embeds")
    # Below the LoRA's picture, its bottom above the minimap's corner.
    save_base = g.add("SaveImage", (x + 350, g.bottom(save_tuned, gap=40)), {"filename_prefix": "lambda_eclipse/concept_base"},
                      size=[380, 380])
    g.link(base, "images", save_base, "images")
    return g


# Both frontends title a pack's template card with its file name (1.27.10 repeats it as the description, '-' and
# '_' shown as spaces) and list the cards in the server's order, which is the file system's (not sorted): the names
# say what each picture is, start with the number, and fit on one line of 1.58.1's card (≤ 30 characters).
NAMES = {
    "one_subject": "1 - Cat on a snowy mountain",
    "two_subjects": "2 - Cat wearing glasses",
    "three_subjects": "3 - Dog, hat and sunglasses",
    "canny": "4 - Surfing dog (Canny layout)",
    "grid": "5 - Dogs x hats blend grid",
    "sdxl": "6 - Cat on a mountain in SDXL",
    "lora": "7 - Beach dog (decoder LoRA)",
}


def build():
    out = {}
    out[NAMES["one_subject"]] = subjects_workflow(
        "single_subject", "a cat on top of the snow mountain", [("cat.jpg", "cat")],
        "λ-ECLIPSE, one subject: the cat photo is written into the prompt at the word 'cat'.\n\n" + EDIT)
    out[NAMES["two_subjects"]] = subjects_workflow(
        "two_subjects", "a cat wearing glasses at a park", [("cat.jpg", "cat"), ("glasses.jpg", "glasses")],
        "λ-ECLIPSE, two subjects chained through Encode Subject → subjects: 'cat' and 'glasses'.\n\n" + EDIT)
    out[NAMES["three_subjects"]] = subjects_workflow(
        "three_subjects", "a dog wearing a hat and sunglasses on a beach",
        [("dog.jpg", "dog"), ("hat.jpg", "hat"), ("sunglasses.jpg", "sunglasses")],
        "λ-ECLIPSE, three subjects: 'dog', 'hat' and 'sunglasses' (each one CLIP token of the prompt).\n\n" + EDIT)
    out[NAMES["canny"]] = canny_workflow()
    out[NAMES["grid"]] = grid_workflow()
    out[NAMES["sdxl"]] = sdxl_workflow("sdxl_unclip")
    out[NAMES["lora"]] = lora_workflow()
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
    d.text((pad, 8), "Lambda-ECLIPSE " + path.stem, fill=(235, 235, 235))
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
    built = build()
    for stale in out.glob("*.json"):  # renamed templates must not linger as extra cards
        if stale.stem not in built:
            stale.unlink()
            stale.with_suffix(".jpg").unlink(missing_ok=True)
    for name, graph in built.items():
        text = render(name, graph)
        (out / f"{name}.json").write_text(text, encoding="utf-8")
        if thumbnails:
            thumbnail(json.loads(text), out / f"{name}.jpg")


if __name__ == "__main__":
    main()
