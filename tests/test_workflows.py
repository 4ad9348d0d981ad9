"""Static check of the bundled workflows against the nodes' own declarations (no ComfyUI needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lambda_eclipse.core.paths import manifest
from lambda_eclipse.nodes import NODE_CLASS_MAPPINGS
from lambda_eclipse.nodes.assets import ASSETS_DIR, PREFIX

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# ComfyUI core nodes the workflows may use, with what they declare (ComfyUI 0.3.x nodes.py).
CORE_NODES = {
    "LoadImage": {"sockets": [], "widgets": [("image", "COMBO", {}), ("upload", "UPLOAD", {})],
                  "outputs": ["IMAGE", "MASK"], "output_names": ["IMAGE", "MASK"]},
    "PreviewImage": {"sockets": [("images", "IMAGE", True)], "widgets": [], "outputs": [], "output_names": []},
    "SaveImage": {"sockets": [("images", "IMAGE", True)], "widgets": [("filename_prefix", "STRING", {})],
                  "outputs": [], "output_names": []},
    "Note": {"sockets": [], "widgets": [("text", "STRING", {})], "outputs": [], "output_names": []},
    # Workflow 6 (SDXL): exactly as ComfyUI 0.3.64 nodes.py declares them (combo lists from comfy.samplers 0.3.64;
    # choices None = a model-file list, checked against properties.models instead).
    "CheckpointLoaderSimple": {"sockets": [], "widgets": [("ckpt_name", "COMBO", {"choices": None})],
                               "outputs": ["MODEL", "CLIP", "VAE"], "output_names": ["MODEL", "CLIP", "VAE"]},
    "CLIPTextEncode": {"sockets": [("clip", "CLIP", True)],
                       "widgets": [("text", "STRING", {"multiline": True, "dynamicPrompts": True})],
                       "outputs": ["CONDITIONING"], "output_names": ["CONDITIONING"]},
    "unCLIPConditioning": {"sockets": [("conditioning", "CONDITIONING", True), ("clip_vision_output", "CLIP_VISION_OUTPUT", True)],
                           "widgets": [("strength", "FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
                                       ("noise_augmentation", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01})],
                           "outputs": ["CONDITIONING"], "output_names": ["CONDITIONING"]},
    "EmptyLatentImage": {"sockets": [], "widgets": [("width", "INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                                                    ("height", "INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                                                    ("batch_size", "INT", {"default": 1, "min": 1, "max": 4096})],
                         "outputs": ["LATENT"], "output_names": ["LATENT"]},
    "KSampler": {"sockets": [("model", "MODEL", True), ("positive", "CONDITIONING", True), ("negative", "CONDITIONING", True),
                             ("latent_image", "LATENT", True)],
                 "widgets": [("seed", "INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
                             ("seed:control", "CONTROL", {}),
                             ("steps", "INT", {"default": 20, "min": 1, "max": 10000}),
                             ("cfg", "FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                             ("sampler_name", "COMBO", {"choices": [
                                 "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
                                 "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
                                 "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
                                 "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
                                 "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
                                 "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                                 "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                                 "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]}),
                             ("scheduler", "COMBO", {"choices": [
                                 "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                                 "linear_quadratic", "kl_optimal"]}),
                             ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})],
                 "outputs": ["LATENT"], "output_names": ["LATENT"]},
    "VAEDecode": {"sockets": [("samples", "LATENT", True), ("vae", "VAE", True)], "widgets": [],
                  "outputs": ["IMAGE"], "output_names": ["IMAGE"]},
}
# Core loaders of model files that are not ours: the file each workflow names and where the frontends send users.
SDXL_BASE = {"name": "sd_xl_base_1.0.safetensors",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
             "directory": "checkpoints"}
CORE_LOADERS = {"CheckpointLoaderSimple": {"ckpt_name": SDXL_BASE}}
# Each loader's model combos → the manifest entry (file, folder, link) its default value names.
LOADERS = {
    "LambdaEclipseLoadPrior": {"prior_name": "prior"},
    "LambdaEclipseLoadCLIP": {"clip_name": "clip_text", "vision_name": "clip_vision"},
    "LambdaEclipseLoadDecoder": {"decoder_name": "decoder_unet", "movq_name": "decoder_movq"},
}
FILES = manifest()


def declaration(node_type: str) -> dict:
    """Sockets [(name, type, required)], widgets [(name, type or 'COMBO', options)] incl. control values, outputs."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            kind, options = decl[0], (decl[1] if len(decl) > 1 else {})
            if isinstance(kind, list):
                widgets.append((name, "COMBO", dict(options, choices=kind)))
            elif kind in WIDGET_TYPES:
                widgets.append((name, kind, options))
                if options.get("control_after_generate"):
                    widgets.append((name + ":control", "CONTROL", {}))
            else:
                sockets.append((name, kind, section == "required"))
    return {"sockets": sockets, "widgets": widgets, "outputs": list(cls.RETURN_TYPES), "output_names": list(cls.RETURN_NAMES)}


# Files users make themselves (no download): the name each bundled workflow uses.
USER_FILES = {"LambdaEclipseLoadDecoderLoRA": {"lora_name": "dog_concept_lora.safetensors"}}


def ui_to_api(workflow: dict) -> dict:
    """UI-format workflow → API-format prompt, using the declarations for widget names (Notes dropped)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] == "Note" or node.get("mode", 0) in (2, 4):
            continue
        decl = declaration(node["type"])
        inputs = {}
        for (name, kind, options), value in zip(decl["widgets"], node.get("widgets_values", [])):
            if kind not in ("CONTROL", "UPLOAD"):
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def is_sdxl(workflow: dict) -> bool:
    """Workflow 6: λ-ECLIPSE embeddings decoded by an SDXL checkpoint, so no Kandinsky decoder."""
    return any(n["type"] == "CheckpointLoaderSimple" for n in workflow["nodes"])


def test_the_seven_workflows_ship_in_one_folder():
    assert len(WORKFLOWS) == 7
    assert not (REPO / "example_workflows").exists(), "ship workflows/ only (ComfyUI 404s one of two folders)"
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"
        assert path.with_suffix(".jpg").stat().st_size < 300_000


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.stem)
def workflow(request):
    return load(request.param)


def test_ui_format(workflow):
    for key in ("id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in workflow
    assert workflow["version"] == 0.4
    ids = [n["id"] for n in workflow["nodes"]]
    assert len(set(ids)) == len(ids) and max(ids) <= workflow["last_node_id"]
    assert max(link[0] for link in workflow["links"]) <= workflow["last_link_id"]


def test_node_types_and_widgets(workflow):
    for node in workflow["nodes"]:
        kind = node["type"]
        assert kind in NODE_CLASS_MAPPINGS or kind in CORE_NODES, f"unknown node type {kind}"
        decl = declaration(kind)
        values = node.get("widgets_values", [])
        assert len(values) == len(decl["widgets"]), f"{kind} #{node['id']}: {values} vs {[w[0] for w in decl['widgets']]}"
        for (name, wtype, options), value in zip(decl["widgets"], values):
            where = f"{kind} #{node['id']} {name}={value!r}"
            if wtype == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), where
                assert options.get("min", value) <= value <= options.get("max", value), where
                if "step" in options and kind.startswith("LambdaEclipse") and options["step"] > 1:
                    assert value % options["step"] == 0, where
            elif wtype == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), where
                assert options.get("min", value) <= value <= options.get("max", value), where
            elif wtype == "STRING":
                assert isinstance(value, str), where
            elif wtype == "BOOLEAN":
                assert isinstance(value, bool), where
            elif wtype == "CONTROL":
                assert value == "fixed", f"{where}: bundled workflows keep seeds fixed"
            elif wtype == "UPLOAD":
                assert value == "image", where
            elif wtype == "COMBO" and kind in LOADERS and name in LOADERS[kind]:
                assert value == FILES[LOADERS[kind][name]].name, f"{where}: use the manifest's default file name"
            elif wtype == "COMBO" and kind in CORE_LOADERS:
                assert value == CORE_LOADERS[kind][name]["name"], where
            elif wtype == "COMBO" and kind in USER_FILES:
                assert value == USER_FILES[kind][name], f"{where}: the name the workflow's Note tells users to save as"
            elif wtype == "COMBO" and kind != "LoadImage":
                assert value in options["choices"], where


def test_links_connect_matching_types(workflow):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        out_type = declaration(nodes[src]["type"])["outputs"][src_slot]
        socket = nodes[dst]["inputs"][dst_slot]
        in_type = dict((n, t) for n, t, _ in declaration(nodes[dst]["type"])["sockets"])[socket["name"]]
        assert out_type == kind == in_type == socket["type"], f"link {link_id}: {out_type} → {in_type} ({kind})"
        assert socket["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
    for node in workflow["nodes"]:
        decl = declaration(node["type"])
        names = [s["name"] for s in node.get("inputs", [])]
        assert names == [n for n, _, _ in decl["sockets"]], f"{node['type']}: inputs {names}"
        for name, _, required in decl["sockets"]:
            slot = next(s for s in node["inputs"] if s["name"] == name)
            if required:
                assert slot["link"] is not None, f"{node['type']} #{node['id']}: required input {name} is not connected"
        for i, output in enumerate(node.get("outputs", [])):
            assert output["type"] == decl["outputs"][i] and output["name"] == decl["output_names"][i]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_no_absolute_paths(workflow):
    for text in _strings(workflow):
        assert not re.match(r"^(/|~|[A-Za-z]:[\\/]|\\\\)", text), f"absolute path in workflow: {text!r}"
        assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text


def test_images_ship_in_assets(workflow):
    loads = [n for n in workflow["nodes"] if n["type"] == "LoadImage"]
    assert loads
    for node in loads:
        name = node["widgets_values"][0]
        assert name.startswith(PREFIX) and "/" not in name
        asset = ASSETS_DIR / name[len(PREFIX):]
        assert asset.is_file(), f"{name}: {asset} is missing"
        assert asset.stat().st_size < 300_000


def test_loaders_carry_download_info(workflow):
    """One properties.models entry per weight combo, name == the widget value (both frontends' rule)."""
    seen = set()
    for node in workflow["nodes"]:
        if node["type"] not in LOADERS:
            continue
        seen.add(node["type"])
        decl = declaration(node["type"])
        values = {name: value for (name, _k, _o), value in zip(decl["widgets"], node["widgets_values"])}
        models = node["properties"]["models"]
        assert [m["name"] for m in models] == [values[combo] for combo in LOADERS[node["type"]]]
        for model, (combo, key) in zip(models, LOADERS[node["type"]].items()):
            entry = FILES[key]
            assert set(model) == {"name", "url", "directory"}
            assert model == {"name": entry.name, "url": entry.url, "directory": entry.folder}
            assert model["name"].endswith(".safetensors") and "/" not in model["name"]
            assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/[\w.-]+/[\w./-]+\.safetensors", model["url"])
            # The combo's options never hold an absent file: the newest frontend flags a value not among them.
            assert model["name"] not in dict((n, o) for n, _k, o in decl["widgets"])[combo]["choices"]
    # The SDXL workflow decodes with SDXL: it has no Kandinsky decoder, and its checkpoint carries its own entry.
    assert seen == set(LOADERS) - ({"LambdaEclipseLoadDecoder"} if is_sdxl(workflow) else set())
    for node in workflow["nodes"]:
        if node["type"] in CORE_LOADERS:
            (combo, entry), = CORE_LOADERS[node["type"]].items()
            assert node["widgets_values"] == [entry["name"]]
            assert node["properties"]["models"] == [entry]
    top = {m["name"]: m for m in workflow["models"]}
    for node in workflow["nodes"]:
        for model in node["properties"].get("models", []):
            assert top[model["name"]] == model


def test_no_other_json_in_the_templates_folder():
    """Every .json in workflows/ becomes a template card: only workflows may live there."""
    for path in (REPO / "workflows").glob("*.json"):
        assert {"nodes", "links", "version"} <= set(load(path)), f"{path.name} is not a workflow"


# What the frontends draw, measured in a 1600×1000 window (ComfyUI 0.3.64, frontends 1.27.10 and 1.58.1, headless
# Chromium): the title bar above pos, a custom node's source badge 2 px above that (20 px high), and the minimum
# height each frontend gives a node whatever the file says (LGraphNode.computeSize(); Load Image: its preview).
TITLE, BADGE = 30, 52
MIN_HEIGHT = {
    "LambdaEclipseLoadPrior": 82, "LambdaEclipseLoadCLIP": 106, "LambdaEclipseLoadDecoder": 106,
    "LambdaEclipseLoadDecoderLoRA": 82, "LambdaEclipseEncodeSubject": 190, "LambdaEclipseInterleavePrompt": 108,
    "LambdaEclipsePriorSample": 166, "LambdaEclipseKandinskyDecode": 310, "LambdaEclipseCannyCondition": 126,
    "LambdaEclipseEmbeddingGrid": 142, "LambdaEclipseImageGrid": 82, "LambdaEclipseEmbedsToCLIPVision": 102,
    "LoadImage": 326, "PreviewImage": 26, "SaveImage": 58, "Note": 88, "CheckpointLoaderSimple": 98,
    "CLIPTextEncode": 88, "unCLIPConditioning": 102, "EmptyLatentImage": 106, "KSampler": 262, "VAEDecode": 46,
}
MIN_WIDTH = {"LambdaEclipseLoadDecoder": 280, "LambdaEclipseEmbedsToCLIPVision": 263, "LoadImage": 223}
# 1.27.10 restores extra.ds on a canvas that starts right of its side bar and below its menus, and draws its
# minimap and canvas menu over the bottom-right corner.
CANVAS_1_27 = (64, 78, 1600, 1000)
COVERS_1_27 = {"minimap": (1306, 734, 1556, 934), "canvas menu": (1277, 939, 1584, 984)}
# 1.58.1 opens a template at its own view: the bounds of every node's title bar and body, 10 px added on each side,
# fitted to 75 % of the window and centred (LGraphCanvas.ds.fitToBounds, zoom 0.75); it draws over the canvas:
COVERS_1_58 = {"side bar": (0, 0, 56, 1000), "tab bar": (0, 0, 1600, 38), "Graph tool bar": (56, 44, 210, 86),
               "Run tool bar": (1240, 44, 1600, 86), "minimap": (1339, 738, 1592, 938), "canvas menu": (1340, 948, 1600, 1000)}
MIN_SCALE = 8 / 14  # below 8 px for 14 px text (the newest frontend's default level of detail) nodes draw no text


def drawn(node) -> tuple[float, float, float, float]:
    """The box a frontend draws for a node: badge (ours) or title bar above pos, at least the frontend's minimum height."""
    (x, y), (w, h) = node["pos"], node["size"]
    top = BADGE if node["type"].startswith("LambdaEclipse") else TITLE
    return x, y - top, x + w, y + max(h, MIN_HEIGHT[node["type"]])


def _on_screen(box, scale, offset, origin=(0, 0)):
    return tuple(origin[i % 2] + (v + offset[i % 2]) * scale for i, v in enumerate(box))


def _hits(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_saved_view_shows_every_node_without_overlap(workflow):
    """At the saved scale/offset the whole graph fits a 1600×1000 window, and no node covers another."""
    scale, (ox, oy) = workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]
    # Below 8 px for 14 px text (the newest frontend's default level-of-detail threshold) nodes draw without text.
    assert scale >= 8 / 14, f"saved scale {scale}: the graph would open unreadable"
    title = 30  # the title bar sits above pos
    boxes = []
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        boxes.append((node["id"], x, y - title, x + w, y + h))
        assert 0 <= (x + ox) * scale and (x + w + ox) * scale <= 1600, f"node {node['id']} off screen horizontally"
        assert 0 <= (y - title + oy) * scale and (y + h + oy) * scale <= 1000, f"node {node['id']} off screen vertically"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = min(a[3], b[3]) - max(a[1], b[1]) > 0 and min(a[4], b[4]) - max(a[2], b[2]) > 0
            assert not overlap, f"nodes {a[0]} and {b[0]} overlap"


def test_nodes_are_drawn_without_overlap(workflow):
    """As the frontends draw them: no node (grown to the frontend's minimum, title bar and our source badge
    included) covers another. Workflow 5's Load Images grew from 290 to 314 and covered Encode Subject's title;
    the badges sat on Load Image's size caption."""
    for node in workflow["nodes"]:
        assert node["size"][1] >= MIN_HEIGHT[node["type"]], f"{node['type']} #{node['id']}: the frontends make it taller"
        assert node["size"][0] >= MIN_WIDTH.get(node["type"], 210), f"{node['type']} #{node['id']}: the frontends widen it"
    nodes = workflow["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not _hits(drawn(a), drawn(b)), f"{a['type']} #{a['id']} and {b['type']} #{b['id']} overlap as drawn"


def test_saved_view_is_clear_of_the_canvas_overlays(workflow):
    """Frontend 1.27.10 opens the saved view: every node inside its canvas, readable, none under its minimap or
    canvas menu (they covered the Save Image previews)."""
    ds = workflow["extra"]["ds"]
    assert ds["scale"] >= MIN_SCALE
    left, top, right, bottom = CANVAS_1_27
    for node in workflow["nodes"]:
        box = _on_screen(drawn(node), ds["scale"], ds["offset"], (left, top))
        where = f"{node['type']} #{node['id']} at {[round(v) for v in box]}"
        assert left <= box[0] and top <= box[1] and box[2] <= right and box[3] <= bottom, f"{where}: off the canvas"
        for name, cover in COVERS_1_27.items():
            assert not _hits(box, cover), f"{where}: under 1.27.10's {name}"


def test_template_view_of_the_newest_frontend(workflow):
    """Frontend 1.58.1 ignores the saved view for a template and fits the graph itself: it must still open readable
    (the grid opened at 0.52, with no text) and with no node under its minimap, tool bars or side bar."""
    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - 10
    y0 = min(n["pos"][1] - TITLE for n in nodes) - 10
    w = max(n["pos"][0] + n["size"][0] for n in nodes) + 10 - x0
    h = max(n["pos"][1] + n["size"][1] for n in nodes) + 10 - y0
    scale = min(0.75 * 1600 / max(w, 300), 0.75 * 1000 / max(h, 300))
    offset = (800 / scale - x0 - w / 2, 500 / scale - y0 - h / 2)
    assert scale >= MIN_SCALE, f"1.58.1 opens it at {scale:.3f}: nodes would draw without text"
    for node in nodes:
        box = _on_screen(drawn(node), scale, offset)
        for name, cover in COVERS_1_58.items():
            assert not _hits(box, cover), f"{node['type']} #{node['id']} at {[round(v) for v in box]}: under 1.58.1's {name}"


def test_template_names_fit_and_sort():
    """The card title is the file name in both frontends, in the server's (file system) order: names start with
    their number 1…N and fit one line of 1.58.1's card; no character that a file system refuses."""
    stems = [p.stem for p in WORKFLOWS]
    assert [int(s.split(" - ")[0]) for s in stems] == list(range(1, len(stems) + 1))
    for stem in stems:
        assert len(stem) <= 30, f"{stem!r}: 1.58.1 cuts card titles longer than about 30 characters"
        assert not set(stem) & set('<>:"/\\|?*'), stem


def test_a_note_explains_what_to_change(workflow):
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and "change" in notes[0]["widgets_values"][0].lower()


def test_subject_words_are_in_their_prompts(workflow):
    """Follow each Interleave Prompt's subjects chain: every word must be a whole word of the prompt."""
    api = ui_to_api(workflow)
    for node in api.values():
        if node["class_type"] != "LambdaEclipseInterleavePrompt":
            continue
        words = re.findall(r"[\w'-]+", node["inputs"]["text"].lower())
        link = node["inputs"].get("subjects")
        chain = []
        while link:
            subject = api[link[0]]
            chain.append(subject["inputs"]["word"])
            link = subject["inputs"].get("subjects")
        assert chain, "every bundled prompt uses at least one subject"
        for word in chain:
            assert word in words, f"{word!r} not in {node['inputs']['text']!r}"


def test_api_conversion_keeps_every_input(workflow):
    api = ui_to_api(workflow)
    for node in api.values():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
            assert set(spec["required"]) <= set(node["inputs"]), node


def test_expected_content():
    by_name = {p.stem: load(p) for p in WORKFLOWS}
    prompts = {
        name: [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LambdaEclipseInterleavePrompt"]
        for name, wf in by_name.items()
    }
    one, two, three, canny, grid, sdxl, lora = sorted(by_name)
    assert prompts[one] == ["a cat on top of the snow mountain"]
    assert prompts[two] == ["a cat wearing glasses at a park"]
    assert prompts[three] == ["a dog wearing a hat and sunglasses on a beach"]
    assert prompts[canny] == ["a dog is surfing"]
    assert set(prompts[grid]) == {"a dog is wearing a hat"}
    assert any(n["type"] == "LambdaEclipseCannyCondition" for n in by_name[canny]["nodes"])
    nodes = by_name[grid]["nodes"]
    assert next(n for n in nodes if n["type"] == "LambdaEclipseEmbeddingGrid")["widgets_values"][0] >= 2  # 3×3 or larger
    # The paper's figure is one picture: the grid workflow also saves the tiled grid.
    tiles = [n for n in nodes if n["type"] == "LambdaEclipseImageGrid"]
    links = {link[0]: link for link in by_name[grid]["links"]}
    assert tiles and any(links[s["link"]][1] == tiles[0]["id"] for n in nodes if n["type"] == "SaveImage" for s in n["inputs"])
    notes = [n["widgets_values"][0] for name, wf in by_name.items() if name != sdxl for n in wf["nodes"] if n["type"] == "Note"]
    for text in notes:
        assert text.count("To change:") == 1, text
        for entry in FILES.values():
            assert f"models/{entry.folder}/{entry.name}" in text
    # SDXL: the files it needs (no decoder), the checkpoint, and what to try.
    text, = [n["widgets_values"][0] for n in by_name[sdxl]["nodes"] if n["type"] == "Note"]
    assert text.count("To change:") == 1, text
    for key, entry in FILES.items():
        assert (f"models/{entry.folder}/{entry.name}" in text) == (key in ("prior", "clip_text", "clip_vision")), key
    assert f"models/checkpoints/{SDXL_BASE['name']}" in text
    assert "strength" in text and "noise_augmentation" in text and "not measured" in text


def test_lora_workflow_puts_the_lora_between_loader_and_decode():
    """Workflow 7: Load Kandinsky Decoder → Load Decoder LoRA → Kandinsky Decode, and the base decoder beside it
    with the same embedding and settings; the Note tells how to make the LoRA under the name the node asks for."""
    path, = [p for p in WORKFLOWS if any(n["type"] == "LambdaEclipseLoadDecoderLoRA" for n in load(p)["nodes"])]
    assert path.stem == "7 - Beach dog (decoder LoRA)"
    api = ui_to_api(load(path))
    by_type = {}
    for key, node in api.items():
        by_type.setdefault(node["class_type"], []).append(key)
    (loader,), (lora,) = by_type["LambdaEclipseLoadDecoder"], by_type["LambdaEclipseLoadDecoderLoRA"]
    assert api[lora]["inputs"]["decoder"][0] == loader and api[lora]["inputs"]["strength"] == 1.0
    decodes = [api[k]["inputs"] for k in by_type["LambdaEclipseKandinskyDecode"]]
    assert sorted(d["decoder"][0] for d in decodes) == sorted([lora, loader])
    assert decodes[0]["embeds"] == decodes[1]["embeds"]
    widgets = ("width", "height", "steps", "guidance", "seed", "batch_seeds")
    assert [decodes[0][w] for w in widgets] == [decodes[1][w] for w in widgets]
    assert len(by_type["SaveImage"]) == 2
    text, = [n["widgets_values"][0] for n in load(path)["nodes"] if n["type"] == "Note"]
    assert "finetune-decoder" in text and f"models/loras/{USER_FILES['LambdaEclipseLoadDecoderLoRA']['lora_name']}" in text
    # What a user without the LoRA sees (1.27.10 shows no message on Run, only a red outline): said truthfully.
    assert "Without it, Run still makes the lower (base decoder) picture" in text and "console" in text


def test_sdxl_workflow_feeds_the_embedding_to_unclip():
    """Prior Sample → Embeds to CLIP Vision → unCLIPConditioning on the SDXL positive prompt → KSampler (core only after)."""
    path, = [p for p in WORKFLOWS if is_sdxl(load(p))]
    workflow = load(path)
    assert path.stem == "6 - Cat on a mountain in SDXL"
    api = ui_to_api(workflow)
    assert {n["class_type"] for n in api.values()} - set(NODE_CLASS_MAPPINGS) == {
        "LoadImage", "CheckpointLoaderSimple", "CLIPTextEncode", "unCLIPConditioning", "EmptyLatentImage", "KSampler",
        "VAEDecode", "SaveImage"}
    assert "LambdaEclipseLoadDecoder" not in {n["class_type"] for n in api.values()}
    (sampler_id, sampler), = [(k, n) for k, n in api.items() if n["class_type"] == "KSampler"]
    unclip = api[sampler["inputs"]["positive"][0]]
    assert unclip["class_type"] == "unCLIPConditioning"
    assert 0.8 <= unclip["inputs"]["strength"] <= 1.0 and 0 <= unclip["inputs"]["noise_augmentation"] <= 0.2
    bridge = api[unclip["inputs"]["clip_vision_output"][0]]
    assert bridge["class_type"] == "LambdaEclipseEmbedsToCLIPVision" and unclip["inputs"]["clip_vision_output"][1] == 0
    assert api[bridge["inputs"]["embeds"][0]]["class_type"] == "LambdaEclipsePriorSample"
    assert bridge["inputs"]["index"] == -1 and bridge["inputs"]["which"] == "positive"
    text = api[unclip["inputs"]["conditioning"][0]]
    assert text["class_type"] == "CLIPTextEncode"
    ckpt = api[text["inputs"]["clip"][0]]
    assert ckpt["class_type"] == "CheckpointLoaderSimple" and ckpt["inputs"]["ckpt_name"] == SDXL_BASE["name"]
    assert api[sampler["inputs"]["model"][0]] is ckpt and api[sampler["inputs"]["negative"][0]]["class_type"] == "CLIPTextEncode"
    latent = api[sampler["inputs"]["latent_image"][0]]
    assert latent["class_type"] == "EmptyLatentImage" and (latent["inputs"]["width"], latent["inputs"]["height"]) == (1024, 1024)
    decode, = [n for n in api.values() if n["class_type"] == "VAEDecode"]
    assert decode["inputs"]["samples"] == [sampler_id, 0] and api[decode["inputs"]["vae"][0]] is ckpt
    save, = [n for n in api.values() if n["class_type"] == "SaveImage"]
    assert api[save["inputs"]["images"][0]] is decode


def test_workflows_match_their_builder(tmp_path):
    """workflows/_build.py makes them from the declarations: the shipped JSON must be what it makes today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lambda_eclipse_workflow_build", REPO / "workflows" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.main(tmp_path, thumbnails=False)
    for path in WORKFLOWS:
        assert (tmp_path / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{path.name} is stale: run python workflows/_build.py")
