"""Multibench (lambda_eclipse.evaluate multibench): templates, composition sampling, the resumable run, prompts.csv
reuse, score-only, compare, and the messages for bad inputs."""

import csv
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from lambda_eclipse.evaluate import multibench as mb
from lambda_eclipse.evaluate.cli import main
from lambda_eclipse.evaluate.common import MULTIBENCH_FIELDS, read_scores
from lambda_eclipse.evaluate.metrics import ClipEmbedder, DinoEmbedder, cosine_matrix
from test_evaluate import _metric_args, _photo, metric_models, prompts_and_classes  # noqa: F401 (a fixture)

CLASSES = {"dog": "dog", "dog2": "dog", "cat": "cat", "backpack": "backpack"}
COLORS = {"dog": "brown", "dog2": "black", "cat": "grey", "backpack": "red", "park": "green"}
SHAPES = {"dog": "ellipse", "dog2": "rect", "cat": "rect", "backpack": "ellipse", "park": "rect"}


def make_multi_dataset(root, identical=False):
    """Dreambench layout with dog, dog2 (both class dog), cat, backpack; and concepts/park (kind place)."""
    data = root / "dataset"
    data.mkdir(parents=True)
    (data / "prompts_and_classes.txt").write_text(prompts_and_classes(CLASSES))
    for name in CLASSES:
        (data / name).mkdir()
        for i in range(2):
            shape = SHAPES[name] if identical or i == 0 else ("rect" if SHAPES[name] == "ellipse" else "ellipse")
            _photo(COLORS[name], shape).save(data / name / f"{i:02d}.png")
    park = root / "concepts" / "park"
    park.mkdir(parents=True)
    (park / "concept.json").write_text(json.dumps({"class": "park", "kind": "place"}))
    _photo(COLORS["park"], SHAPES["park"]).save(park / "a.png")
    return data, root / "concepts"


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _words(text):
    return text.lower().split()


# -- templates and sampling ------------------------------------------------------------------------------------------

def test_table_8_templates_and_filling():
    assert len(mb.TWO_TEMPLATES) == 13 and len(mb.THREE_TEMPLATES) == 5
    assert mb.TWO_TEMPLATES[0] == "{} in the {}" and mb.THREE_TEMPLATES[-1] == "{} with a {} and {} in the background"
    assert all(t.count("{}") == n for n, ts in mb.TEMPLATES.items() for t in ts)
    assert set(mb.SLOTS) == set(mb.TWO_TEMPLATES) | set(mb.THREE_TEMPLATES)
    assert mb.fill_template("{} wearing a {}", ["dog", "hat"]) == "a dog wearing a hat"
    assert mb.fill_template("{} in the {}", ["stuffed animal", "park"]) == "a stuffed animal in the park"
    assert mb.fill_template("{} is playing with {} in {}", ["cat", "toy", "desert"]) == "a cat is playing with a toy in a desert"
    assert mb.fill_template("{} with a {} and a view of the {}", ["dog", "umbrella", "ocean"]) == \
        "a dog with an umbrella and a view of the ocean"
    assert mb.fill_template("{} wearing a {}", ["dog", "glasses"], [False, True]) == "a dog wearing glasses"
    assert mb.fill_template("{} with a {} and {}", ["cat", "glasses", "vase"], [False, True, False]) == \
        "a cat with glasses and a vase"
    assert mb.fill_template("{} and {} on the beach", ["sunglasses", "dog"], [True, False]) == "sunglasses and a dog on the beach"
    assert mb.PAPER[2]["dino"] == 0.4478 and mb.PAPER[3]["clip_t"] == 0.3469


def test_sampling_is_deterministic_valid_and_a_prefix(tmp_path):
    data, concepts = make_multi_dataset(tmp_path)
    pool = mb.subject_pool(data, concepts=[concepts])
    assert [(s.name, s.kind) for s in pool] == [("dog", "live"), ("dog2", "live"), ("cat", "live"),
                                                ("backpack", "object"), ("park", "place")]
    by_name = {s.name: s for s in pool}
    two = mb.sample_compositions(pool, 2, 1000, seed=0)
    three = mb.sample_compositions(pool, 3, 1000, seed=0)
    # Worked out by hand from the slot kinds (see EVALUATION.md): 4+0+7+10+3+3+5+6×5 and 0+7+11+3+3.
    assert (len(two), len(three)) == (62, 24)
    for c in two + three:
        words = [by_name[n].word for n in c.subjects]
        assert len(set(words)) == len(words) == c.count  # dog and dog2 never share a prompt
        assert all(w in _words(c.prompt) for w in words) and c.prompt == mb.fill_template(c.template, words, [by_name[n].plural for n in c.subjects])
    symmetric = [c for c in two if c.template.startswith("{} and {}")]  # one order per pair; "chasing" keeps both
    assert len({(c.template, frozenset(c.subjects)) for c in symmetric}) == len(symmetric) == 35
    assert {("cat", "dog"), ("dog", "cat")} <= {c.words for c in two if c.template == "{} chasing a {}"}
    assert mb.sample_compositions(pool, 2, 1000, seed=0) == two
    assert mb.sample_compositions(pool, 2, 10, seed=0) == two[:10]
    assert mb.sample_compositions(pool, 2, 1000, seed=1) != two
    # Templates are taken in turn: the first compositions cover every template that has candidates.
    assert [c.template for c in two[:7]] == [t for t in mb.TWO_TEMPLATES if t != "{} wearing a {}"][:7]
    assert mb.unfillable_templates(pool, [2, 3]) == ["two: {} wearing a {}", "three: {} with a {} and {}"]


def test_a_word_in_the_template_or_inside_another_word_is_never_used(tmp_path):
    dog = mb.MultiSubject("dog", "dog", "live", [], "concept")
    garden = mb.MultiSubject("garden", "garden", "object", [], "concept")
    animal = mb.MultiSubject("animal", "animal", "object", [], "concept")
    plush = mb.MultiSubject("plush", "stuffed animal", "object", [], "concept")
    assert mb.compatible("{} and {} in the snow", [dog, garden])
    assert not mb.compatible("{} and {} playing in the garden", [dog, garden])
    assert not mb.compatible("{} and {} in the snow", [animal, plush])
    assert not mb.compatible("{} wearing a {}", [dog, garden])  # garden is not wearable


# -- runs ------------------------------------------------------------------------------------------------------------

def _run_args(tmp_path, tiny_models, metric_models, out, *extra):
    data, concepts = tmp_path / "dataset", tmp_path / "concepts"
    return ["multibench", "--dataset", str(data), "--concepts", str(concepts), "--out", str(out),
            "--models", str(tiny_models["root"]), "--max-prompts", "3", "--images-per-prompt", "2", "--seed", "5",
            "--steps", "2", "--width", "64", "--height", "64", *_metric_args(metric_models), *extra]


def test_multibench_run_resume_settings_and_compare(tmp_path, tiny_models, metric_models, capsys):
    make_multi_dataset(tmp_path)
    out = tmp_path / "run"
    args = _run_args(tmp_path, tiny_models, metric_models, out)
    assert main(args) == 0, capsys.readouterr().err
    prompts = _read(out / "prompts.csv")
    assert [p["id"] for p in prompts] == ["two-0000", "two-0001", "two-0002", "three-0000", "three-0001", "three-0002"]
    assert [p["template"] for p in prompts] == ["{} in the {}", "{} chasing a {}", "{} looking at a {}",
                                                "{} is playing with {} in {}", "{} with {} in front of {}",
                                                "{} with a {} and a view of the {}"]
    assert prompts[0]["prompt"].endswith(" in the park") and prompts[0]["subjects"].endswith("+park")
    for p in prompts:
        words = p["words"].split("+")
        assert len(set(words)) == len(words) == int(p["count"]) and all(w in _words(p["prompt"]) for w in words)
    rows = _read(out / "scores.csv")
    assert list(rows[0]) == list(MULTIBENCH_FIELDS) and len(rows) == 6 * 2
    assert {(r["composition"], r["seed"]) for r in rows} == {(p["id"], s) for p in prompts for s in ("5", "6")}
    assert {r["image"] for r in rows} >= {"two/two-0000_s5.png", "three/three-0002_s6.png"}
    for r in rows:
        assert r["prompt"] == next(p["prompt"] for p in prompts if p["id"] == r["composition"])
        for k in ("dino", "clip_i", "clip_t"):
            assert math.isfinite(float(r[k])) and -1 <= float(r[k]) <= 1
    summary = (out / "summary.md").read_text()
    assert "0.4478" in summary and "0.3469" in summary and "not public" in summary
    assert "`two: {} wearing a {}`; `three: {} with a {} and {}`." in summary  # no subject fits them
    assert Image.open(out / "scores.png").size[0] > 300
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    listing = (out / "prompts.csv").read_bytes()
    capsys.readouterr()

    assert main(args) == 0  # resumable: nothing generated, the prompt list read back
    err = capsys.readouterr().err
    assert "nothing to generate" in err and "read back from" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    assert (out / "prompts.csv").read_bytes() == listing

    for change, message in ((["--max-prompts", "4"], "--max-prompts was 3, now 4"),
                            (["--composition-seed", "1"], "--composition-seed was 0, now 1"),
                            (["--subjects-count", "2"], "--subjects-count was both, now 2")):
        changed = _run_args(tmp_path, tiny_models, metric_models, out)
        i = changed.index("--max-prompts")
        changed[i:i + 2] = ["--max-prompts", "3"] if change[0] != "--max-prompts" else change
        if change[0] != "--max-prompts":
            changed += change
        assert main(changed) == 2
        err = capsys.readouterr().err
        assert "sampled with other settings" in err and message in err and "another --out" in err
    without_park = [a for a in args if a not in ("--concepts", str(tmp_path / "concepts"))]
    assert main(without_park) == 2 and "subjects no longer given: park" in capsys.readouterr().err
    # An image folder keeps the list its images were made for: another list's run may not mix in there.
    assert (out / "images" / "prompts.csv").read_bytes() == listing
    shared = [*_run_args(tmp_path, tiny_models, metric_models, tmp_path / "seed1"), "--composition-seed", "1",
              "--images", str(out / "images")]
    assert main(shared) == 2 and "holds images made for another prompt list" in capsys.readouterr().err

    # compare: the run with itself, then with a re-scoring that uses the other DINO preprocessing
    assert main(["compare", str(out), str(out / "scores.csv")]) == 0
    table = capsys.readouterr().out
    assert "### two subjects" in table and "### three subjects" in table and table.count("paired over the 6 images") == 2
    other = tmp_path / "other"
    shutil.copytree(out, other)
    assert main([*_run_args(tmp_path, tiny_models, metric_models, other), "--score-only", "--dino-preprocess", "processor"]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), str(other)]) == 0
    table = capsys.readouterr().out
    assert table.count("paired over the 6 images") == 2 and "| CLIP-I | " in table
    dino_lines = [line for line in table.splitlines() if line.startswith("| DINO |")]
    assert len(dino_lines) == 2 and all("+0.0000 | [+0.0000, +0.0000]" not in line for line in dino_lines)
    # a Dreambench run is not compared with a Multibench run
    dream = tmp_path / "dream.csv"
    dream.write_text("subject,prompt,seed,image,dino,clip_i,clip_t\ndog,a dog,0,dog/p00_s0.png,0.5,0.5,0.2\n")
    assert main(["compare", str(dream), str(out)]) == 2
    assert "same benchmark" in capsys.readouterr().err


def test_score_only_on_copies_of_the_first_subject(tmp_path, metric_models):
    """Each image is a copy of its first subject's photo: DINO / CLIP-I must be the mean over the prompt's subjects
    of cos(that photo, each subject's photo) — 1 for the first, less for the others — and CLIP-T the cosine with
    the prompt as written."""
    data, concepts = make_multi_dataset(tmp_path, identical=True)
    out = tmp_path / "other_tool"
    base = ["multibench", "--dataset", str(data), "--concepts", str(concepts), "--out", str(out), "--max-prompts", "2",
            *_metric_args(metric_models)]
    assert main([*base, "--prompts-only"]) == 0
    assert not (out / "images").exists()
    prompts = _read(out / "prompts.csv")
    assert len(prompts) == 4
    photo = {n: data / n / "00.png" for n in CLASSES} | {"park": concepts / "park" / "a.png"}
    for p in prompts:
        folder = out / "images" / ("two" if p["count"] == "2" else "three")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo[p["subjects"].split("+")[0]], folder / f"{p['id']}_s0.png")
    (out / "images" / "two" / "unrelated_s0.png").write_bytes((out / "images" / "two" / "two-0000_s0.png").read_bytes())
    assert main([*base, "--score-only"]) == 0
    rows = read_scores(out)
    assert len(rows) == 4
    dino = DinoEmbedder(metric_models["dino"])
    clip = ClipEmbedder(metric_models["clip_file"], model_name="tiny-eval-clip")
    for row in rows:
        names = row["subjects"].split("+")
        first = Image.open(photo[names[0]])
        images = [Image.open(photo[n]) for n in names]
        d = cosine_matrix(dino([first]), dino(images))[0]
        c = cosine_matrix(clip.images([first]), clip.images(images))[0]
        assert d[0].item() == pytest.approx(1.0, abs=1e-5) and d[1:].max().item() < 1 - 1e-4
        assert row["dino"] == pytest.approx(d.mean().item(), abs=1e-5)
        assert row["clip_i"] == pytest.approx(c.mean().item(), abs=1e-5)
        t = torch.nn.functional.cosine_similarity(clip.images([first]).double(), clip.texts([row["prompt"]]).double())
        assert row["clip_t"] == pytest.approx(t.item(), abs=1e-5)


def test_hand_made_prompt_list_is_checked(tmp_path, metric_models, capsys):
    data, concepts = make_multi_dataset(tmp_path)
    out = tmp_path / "hand"
    out.mkdir()
    (out / "prompts.csv").write_text("id,count,template,subjects,words,prompt\n"
                                     "mine-1,2,,cat+backpack,cat+backpack,a cat asleep on a backpack\n")
    base = ["multibench", "--dataset", str(data), "--out", str(out), "--prompts-only"]
    assert main(base) == 0 and "made by hand" in capsys.readouterr().err
    (out / "prompts.csv").write_text("id,count,template,subjects,words,prompt\n"
                                     "mine-1,2,,cat+backpack,cat+backpack,a cat asleep on a bag\n")
    assert main(base) == 2 and "does not contain the subject word(s) 'backpack'" in capsys.readouterr().err
    (out / "prompts.csv").write_text("id,count,template,subjects,words,prompt\n"
                                     "mine-1,2,,cat+park,cat+park,a cat in the park\n")
    assert main(base) == 2 and "park are not among the given subjects" in capsys.readouterr().err
    (out / "prompts.csv").write_text("id,count,template,subjects,words,prompt\nmine-1,2\n")  # a short row
    assert main(base) == 2 and "no value in column(s) subjects, prompt" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing_concepts", "no such folder"),
    ("empty_concept", "no photos of the concept"),
    ("no_concept_json", "no concept.json"),
    ("bad_kind", "kind 'animal' is not one of live, object, wearable, place"),
    ("name_clash", "Two subjects are named 'cat'"),
    ("too_few_for_three", "No three-subject prompt can be made from these 2 subjects"),
    ("subjects_without_dataset", "--subjects picks Dreambench subjects"),
])
def test_bad_inputs_exit_2_with_a_message(tmp_path, case, message, capsys):
    data, concepts = make_multi_dataset(tmp_path)
    args = ["multibench", "--dataset", str(data), "--out", str(tmp_path / "out"), "--prompts-only"]
    if case == "missing_concepts":
        args += ["--concepts", str(tmp_path / "nope")]
    elif case == "empty_concept":
        (concepts / "hat").mkdir()
        (concepts / "hat" / "concept.json").write_text('{"class": "hat", "kind": "wearable"}')
        args += ["--concepts", str(concepts)]
    elif case == "no_concept_json":
        (concepts / "hat").mkdir()
        _photo("blue", "rect").save(concepts / "hat" / "a.png")
        args += ["--concepts", str(concepts)]
    elif case == "bad_kind":
        (concepts / "park" / "concept.json").write_text('{"class": "park", "kind": "animal"}')
        args += ["--concepts", str(concepts)]
    elif case == "name_clash":
        shutil.copytree(concepts / "park", tmp_path / "more" / "cat")
        args += ["--concepts", str(tmp_path / "more")]
    elif case == "too_few_for_three":
        args += ["--subjects", "dog", "backpack", "--subjects-count", "3"]
    elif case == "subjects_without_dataset":
        args = ["multibench", "--concepts", str(concepts), "--subjects", "dog", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "prompts.csv").exists()


def test_plural_classes_take_no_article(tmp_path):
    import json

    from PIL import Image

    def concept(name, spec):
        folder = tmp_path / name
        folder.mkdir()
        Image.new("RGB", (32, 32), "red").save(folder / "a.png")
        (folder / "concept.json").write_text(json.dumps(spec))
        return folder

    shades = concept("shades", {"class": "sunglasses", "kind": "wearable"})  # known plural
    socks = concept("socks", {"class": "socks", "kind": "wearable", "plural": True})
    hat = concept("hat", {"class": "hat", "kind": "wearable"})
    pool = mb.load_concepts([shades, socks, hat])
    assert [s.plural for s in pool] == [True, True, False]
    bad = concept("bad", {"class": "pants", "plural": "yes"})
    with pytest.raises(mb.DatasetError, match="plural"):
        mb.load_concepts([bad])
