"""Multibench (paper Table 4, appendix F): two- and three-subject prompts from the paper's Table 8 templates, filled
with Dreambench subjects and concept folders of your own; the composition list, generation, scoring and summary.

The paper's own subject pairings and its extra concepts (parks, hats, glasses, …) are not public, so the list is
sampled here, reproducibly, and written to OUT/prompts.csv (with the settings in OUT/prompts.json). Each template
slot accepts subjects of certain kinds (live, object, wearable, place), so that "{} wearing a {}" gets an animal
and something to wear. Two subjects of one prompt always have different subject words: λ-ECLIPSE finds each
subject by its word, so two "dog"s would claim the same tokens.

Images: `IMAGES/<two|three>/<composition id>_s<seed>.png`. Each image's DINO and CLIP-I are taken per subject
against that subject's own photos and averaged over its subjects; its CLIP-T is against the prompt as written.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .common import (MULTIBENCH_FIELDS, DatasetError, generate_missing_images, matching_files, means, means_row,
                     photos_in, plot_groups, score_in_chunks, settings_lines, subject_input, write_csv, write_text)
from .common import missing_images as common_missing
from .metrics import METRICS

log = logging.getLogger("lambda_eclipse")

#: The paper's Table 8, in its order; `{}` is a subject slot.
TWO_TEMPLATES = (
    "{} in the {}", "{} wearing a {}", "{} chasing a {}", "{} looking at a {}", "{} is sitting on a {}",
    "{} standing on a {}", "{} and {} playing in the garden", "{} and {} on top of the mountain",
    "{} and {} in the jungle", "{} and {} in the snow", "{} and {} on the beach", "{} and {} on a cobblestone street",
    "{} and {} standing next to each other",
)
THREE_TEMPLATES = (
    "{} with a {} and {}", "{} is playing with {} in {}", "{} with {} in front of {}",
    "{} with a {} and a view of the {}", "{} with a {} and {} in the background",
)
TEMPLATES = {2: TWO_TEMPLATES, 3: THREE_TEMPLATES}
COUNT_NAMES = {2: "two", 3: "three"}
#: The paper's Table 4 row for λ-ECLIPSE, and how many prompts its Multibench has (appendix F).
PAPER = {2: {"dino": 0.4478, "clip_i": 0.7409, "clip_t": 0.3327},
         3: {"dino": 0.3420, "clip_i": 0.6463, "clip_t": 0.3469}}
PAPER_PROMPTS = {2: 904, 3: 1476}

LIVE, OBJECT, WEARABLE, PLACE = "live", "object", "wearable", "place"
KINDS = (LIVE, OBJECT, WEARABLE, PLACE)
#: Dreambench classes that are not plain objects; every other Dreambench class is an object.
DREAMBENCH_KINDS = {"cat": LIVE, "dog": LIVE, "glasses": WEARABLE}
#: Class nouns that are plural (no "a" before them): Dreambench's glasses, and a few common ones for concepts.
PLURAL_CLASSES = frozenset({"glasses", "sunglasses", "shoes", "boots", "sneakers", "headphones", "earrings"})

_THING = (LIVE, OBJECT)
#: The kinds each slot accepts. The first slot is the main subject; "{} and {} …" templates are symmetric.
SLOTS = {
    "{} in the {}": (_THING, (PLACE,)),
    "{} wearing a {}": ((LIVE,), (WEARABLE,)),
    "{} chasing a {}": ((LIVE,), _THING),
    "{} looking at a {}": ((LIVE,), (LIVE, OBJECT, WEARABLE, PLACE)),
    "{} is sitting on a {}": ((LIVE,), (OBJECT,)),
    "{} standing on a {}": ((LIVE,), (OBJECT,)),
    "{} and {} playing in the garden": ((LIVE,), _THING),
    **{t: (_THING, _THING) for t in TWO_TEMPLATES[7:]},
    "{} with a {} and {}": ((LIVE,), (OBJECT, WEARABLE), (OBJECT, WEARABLE)),
    "{} is playing with {} in {}": ((LIVE,), _THING, (PLACE,)),
    "{} with {} in front of {}": ((LIVE,), _THING, (PLACE, OBJECT)),
    "{} with a {} and a view of the {}": ((LIVE,), (OBJECT, WEARABLE), (PLACE,)),
    "{} with a {} and {} in the background": ((LIVE,), (OBJECT, WEARABLE), (PLACE, OBJECT)),
}
#: "{} and {} …": one order of each pair is kept (a dog and a cat / a cat and a dog is one composition).
SYMMETRIC = frozenset(t for t in TWO_TEMPLATES if t.startswith("{} and {}"))
PROMPT_FIELDS = ("id", "count", "template", "subjects", "words", "prompt")
IMAGE_NAME = re.compile(r"^(?P<id>.+)_s(?P<seed>\d+)\.(png|jpg|jpeg|webp)$", re.IGNORECASE)
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_WORD = re.compile(r"[^\W_][\w'-]*(?: [\w'-]+)*")
_CONCEPT_KEYS = ("class", "kind", "plural")


@dataclass
class MultiSubject:
    """A subject of the pool: a Dreambench subject or a concept folder."""

    name: str
    word: str  # the class noun: written in the prompt, and the word λ-ECLIPSE puts the subject on
    kind: str
    photos: list[Path]
    source: str  # "dreambench" or "concept"
    masks: dict[str, Path] = field(default_factory=dict)
    plural: bool = False  # a plural noun ("glasses"): written without "a"


@dataclass(frozen=True)
class Composition:
    id: str
    count: int
    template: str
    subjects: tuple[str, ...]
    words: tuple[str, ...]
    prompt: str

    @property
    def folder(self) -> str:
        return COUNT_NAMES[self.count]


# -- the subject pool ------------------------------------------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def _contains(words: Sequence[str], part: Sequence[str]) -> bool:
    n = len(part)
    return any(list(words[i:i + n]) == list(part) for i in range(len(words) - n + 1))


def check_word(word, where: str) -> str:
    if not isinstance(word, str) or not _WORD.fullmatch(" ".join(word.split())):
        raise DatasetError(f"{where}: the class {word!r} must be one or more words of letters, digits, ' or - "
                           "(e.g. \"hat\", \"guinea pig\").")
    return " ".join(word.split())


def load_concepts(folders: Sequence) -> list[MultiSubject]:
    """Concept folders: each `--concepts DIR` is one concept (DIR/concept.json + photos) or holds several
    (DIR/<name>/concept.json + photos). concept.json: {"class": "hat", "kind": "wearable"}; kind defaults to object.
    Optional masks: <concept>/masks/<photo stem>.png."""
    out = []
    for given in folders:
        root = Path(given).expanduser()
        if not root.is_dir():
            raise DatasetError(f"--concepts {root}: {'not a folder' if root.exists() else 'no such folder'}.")
        if (root / "concept.json").is_file():
            found = [root]
        else:
            found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not found:
                raise DatasetError(f"--concepts {root}: no concept in it. Give a folder with concept.json and photos, "
                                   f"or a folder of such folders ({root}/<name>/concept.json + photos).")
        for folder in found:
            out.append(_load_concept(folder))
    return out


def _load_concept(folder: Path) -> MultiSubject:
    spec_file = folder / "concept.json"
    example = '{"class": "hat", "kind": "wearable"}'
    if not spec_file.is_file():
        raise DatasetError(f"{folder}: no concept.json. Write one naming the class noun and its kind, e.g. {example} "
                           f"(kinds: {', '.join(KINDS)}).")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{spec_file}: not readable JSON ({exc}); expected e.g. {example}.") from None
    if not isinstance(spec, dict) or "class" not in spec:
        raise DatasetError(f"{spec_file}: expected an object with \"class\" (and \"kind\"), e.g. {example}.")
    unknown = sorted(k for k in spec if k not in _CONCEPT_KEYS and not str(k).startswith("_"))
    if unknown:
        raise DatasetError(f"{spec_file}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_CONCEPT_KEYS)}.")
    word = check_word(spec["class"], str(spec_file))
    kind = spec.get("kind", OBJECT)
    if kind not in KINDS:
        raise DatasetError(f"{spec_file}: kind {kind!r} is not one of {', '.join(KINDS)}.")
    if "+" in folder.name:
        raise DatasetError(f"{folder}: a concept folder name may not contain '+' (it joins subject names).")
    photos = photos_in(folder)
    if not photos:
        raise DatasetError(f"{folder}: no photos of the concept (expected *.jpg / *.png next to concept.json).")
    masks = {p.name: folder / "masks" / f"{p.stem}.png" for p in photos if (folder / "masks" / f"{p.stem}.png").is_file()}
    plural = spec.get("plural", word.lower() in PLURAL_CLASSES)
    if not isinstance(plural, bool):
        raise DatasetError(f"{spec_file}: \"plural\" must be true or false; got {plural!r}.")
    return MultiSubject(folder.name, word, kind, photos, "concept", masks, plural)


def subject_pool(dataset=None, subjects: Sequence[str] | None = None, masks=None, concepts: Sequence = ()) -> list[MultiSubject]:
    """Dreambench's subjects (all, or those named) and the concept folders, with their kinds; names must be unique."""
    from .dreambench import load_dataset

    pool = []
    if dataset:
        for s in load_dataset(dataset, subjects, masks):
            pool.append(MultiSubject(s.name, s.cls, DREAMBENCH_KINDS.get(s.cls, OBJECT), list(s.photos), "dreambench",
                                     dict(s.masks), s.cls.lower() in PLURAL_CLASSES))
    elif subjects:
        raise DatasetError("--subjects picks Dreambench subjects: give --dataset too.")
    pool += load_concepts(concepts)
    if not pool:
        raise DatasetError("No subjects: give --dataset (google/dreambooth's dataset/ folder) and/or --concepts DIR.")
    seen: dict[str, MultiSubject] = {}
    for s in pool:
        if s.name in seen:
            raise DatasetError(f"Two subjects are named {s.name!r} ({seen[s.name].source} and {s.source}); rename the "
                               "concept folder.")
        seen[s.name] = s
    return pool


# -- compositions ----------------------------------------------------------------------------------------------------

def _indefinite(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def fill_template(template: str, words: Sequence[str], plural: Sequence[bool] = ()) -> str:
    """Put the subject words in the slots. A slot right after the template's own "a"/"an"/"the" gets the bare word
    (that "a" becomes "an" before a vowel); any other slot gets "a"/"an" + word: "{} wearing a {}" → "a dog
    wearing a hat", "{} is playing with {} in {}" → "a dog is playing with a toy in a park". A plural word
    (`plural[i]`) takes no "a", and drops the template's: "a dog wearing glasses"."""
    parts = template.split("{}")
    if len(parts) - 1 != len(words):
        raise ValueError(f"{template!r} has {len(parts) - 1} slots, got {len(words)} words")
    plural = list(plural) or [False] * len(words)
    text = parts[0]
    for word, many, after in zip(words, plural, parts[1:]):
        own = re.search(r"(?:^|\s)(a|an|the)\s+$", text)
        if own and own.group(1) in ("a", "an"):
            text = text[:own.start(1)] + ("" if many else _indefinite(word)) + text[own.end(1):]
        text += word if (own or many) else f"{_indefinite(word)} {word}"
        text += after
    return " ".join(text.split())


def compatible(template: str, subjects: Sequence[MultiSubject]) -> bool:
    """Kinds fit the slots, subjects and words are distinct, no word is part of another (their tokens would
    overlap) or appears in the template's own text (it would be interleaved there too)."""
    if len({s.name for s in subjects}) != len(subjects):
        return False
    if any(s.kind not in kinds for s, kinds in zip(subjects, SLOTS[template])):
        return False
    fixed = _tokens(template.replace("{}", " "))
    words = [_tokens(s.word) for s in subjects]
    for i, w in enumerate(words):
        if _contains(fixed, w):
            return False
        for j in range(i + 1, len(words)):
            if _contains(w, words[j]) or _contains(words[j], w):
                return False
    return True


def candidates(pool: Sequence[MultiSubject], template: str) -> list[tuple[MultiSubject, ...]]:
    """Every subject tuple that fits `template`, in pool order."""
    per_slot = [[s for s in pool if s.kind in kinds] for kinds in SLOTS[template]]
    return [combo for combo in itertools.product(*per_slot) if compatible(template, combo)]


def sample_compositions(pool: Sequence[MultiSubject], count: int, limit: int, seed: int = 0) -> list[Composition]:
    """Up to `limit` compositions of `count` subjects. Each template's candidates are shuffled with a generator
    seeded by (seed, count, template index) — a symmetric "{} and {} …" template keeps one order of each pair —
    then the templates are taken in turn, one composition each, until `limit`. So the list only depends on the
    pool and the seed, and a shorter list is the start of a longer one."""
    queues = []
    for index, template in enumerate(TEMPLATES[count]):
        found = candidates(pool, template)
        random.Random(f"multibench:{seed}:{count}:{index}").shuffle(found)
        if template in SYMMETRIC:
            seen, kept = set(), []
            for combo in found:
                key = frozenset(s.name for s in combo)
                if key not in seen:
                    seen.add(key)
                    kept.append(combo)
            found = kept
        queues.append((template, found))
    picked: list[tuple[str, tuple[MultiSubject, ...]]] = []
    for layer in itertools.count():
        added = False
        for template, found in queues:
            if len(picked) >= limit:
                break
            if layer < len(found):
                picked.append((template, found[layer]))
                added = True
        if not added or len(picked) >= limit:
            break
    name = COUNT_NAMES[count]
    return [Composition(f"{name}-{k:04d}", count, t, tuple(s.name for s in combo), tuple(s.word for s in combo),
                        fill_template(t, [s.word for s in combo], [s.plural for s in combo]))
            for k, (t, combo) in enumerate(picked)]


def unfillable_templates(pool: Sequence[MultiSubject], counts: Sequence[int]) -> list[str]:
    """The templates no subject tuple of `pool` fits ("two: {} wearing a {}" when nothing is wearable)."""
    out = []
    for n in counts:
        for t in TEMPLATES[n]:
            per_slot = [[s for s in pool if s.kind in kinds] for kinds in SLOTS[t]]
            if not any(compatible(t, combo) for combo in itertools.product(*per_slot)):
                out.append(f"{COUNT_NAMES[n]}: {t}")
    return out


def _kinds_needed(count: int) -> str:
    return "; ".join(f"\"{t}\" needs " + " + ".join("/".join(k) for k in SLOTS[t]) for t in TEMPLATES[count])


def pool_settings(pool: Sequence[MultiSubject]) -> list[dict]:
    return [{"name": s.name, "class": s.word, "kind": s.kind, "plural": s.plural, "source": s.source} for s in pool]


def counts_label(counts: Sequence[int]) -> str:
    return "both" if sorted(counts) == [2, 3] else str(counts[0])


def settings_record(pool, counts: Sequence[int], max_prompts: int | None, seed: int) -> dict:
    return {"version": 1, "subjects_count": counts_label(counts), "max_prompts": max_prompts,
            "composition_seed": seed, "pool": pool_settings(pool)}


def settings_differences(old: dict, new: dict) -> list[str]:
    """What changed between two settings records, in words."""
    out = []
    for key, flag in (("subjects_count", "--subjects-count"), ("max_prompts", "--max-prompts"),
                      ("composition_seed", "--composition-seed")):
        if old.get(key) != new.get(key):
            out.append(f"{flag} was {old.get(key)}, now {new.get(key)}")
    before = {s.get("name"): s for s in old.get("pool", []) if isinstance(s, dict)}
    after = {s["name"]: s for s in new["pool"]}
    gone, added = [n for n in before if n not in after], [n for n in after if n not in before]
    if gone:
        out.append(f"subjects no longer given: {', '.join(gone)}")
    if added:
        out.append(f"new subjects: {', '.join(added)}")
    for name in before.keys() & after.keys():
        for key in ("class", "kind", "plural"):
            if before[name].get(key, False if key == "plural" else None) != after[name][key]:
                out.append(f"{name}: {key} was {before[name].get(key)!r}, now {after[name][key]!r}")
    return out


def write_prompts(compositions: Sequence[Composition], path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PROMPT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for c in compositions:
        writer.writerow({"id": c.id, "count": c.count, "template": c.template, "subjects": "+".join(c.subjects),
                         "words": "+".join(c.words), "prompt": c.prompt})
    return write_text(path, buf.getvalue())


def read_prompts(path, pool: Sequence[MultiSubject]) -> list[Composition]:
    """A prompts.csv (written here, or by hand in the same columns), checked against the subject pool."""
    path = Path(path)
    by_name = {s.name: s for s in pool}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in PROMPT_FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(PROMPT_FIELDS)}.")
        rows = list(reader)
    out, ids = [], set()
    for line, row in enumerate(rows, 2):
        where = f"{path}, line {line}"
        empty = [k for k in ("id", "count", "subjects", "prompt") if not (row.get(k) or "").strip()]
        if empty:  # template and words may be left empty in a hand-made list
            raise DatasetError(f"{where}: no value in column(s) {', '.join(empty)} (a short or broken row).")
        row = {k: row.get(k) or "" for k in PROMPT_FIELDS}
        cid, names, prompt = row["id"].strip(), [n.strip() for n in row["subjects"].split("+")], row["prompt"]
        if not _ID.fullmatch(cid) or cid in ids:
            raise DatasetError(f"{where}: id {cid!r} is {'used twice' if cid in ids else 'not a plain name'}.")
        ids.add(cid)
        try:
            count = int(row["count"])
        except ValueError:
            count = -1
        if count not in TEMPLATES or count != len(names):
            raise DatasetError(f"{where}: count {row['count']!r} must be 2 or 3 and match the {len(names)} subjects.")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DatasetError(f"{where}: subject(s) {', '.join(unknown)} are not among the given subjects "
                               f"(--dataset / --subjects / --concepts).")
        subjects = [by_name[n] for n in names]
        words = [s.word for s in subjects]
        if len({w.lower() for w in words}) != len(words):
            raise DatasetError(f"{where}: two subjects share the word {words!r}; each needs its own word.")
        absent = [w for w in words if not _contains(_tokens(prompt), _tokens(w))]
        if absent:
            raise DatasetError(f"{where}: the prompt {prompt!r} does not contain the subject word(s) "
                               f"{', '.join(map(repr, absent))}.")
        out.append(Composition(cid, count, row["template"], tuple(names), tuple(words), prompt))
    return out


def compositions_for_run(out_dir, pool: Sequence[MultiSubject], counts: Sequence[int], max_prompts: int | None,
                         seed: int, write: bool = True) -> tuple[list[Composition], str]:
    """The run's compositions and where they came from. OUT/prompts.csv, when there, is read back (refused if
    OUT/prompts.json says it was sampled with other settings); otherwise they are sampled and written."""
    out_dir = Path(out_dir)
    prompts, record_file = out_dir / "prompts.csv", out_dir / "prompts.json"
    record = settings_record(pool, counts, max_prompts, seed)
    if prompts.is_file():
        if record_file.is_file():
            try:
                old = json.loads(record_file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise DatasetError(f"{record_file}: not valid JSON ({exc}); delete it with prompts.csv to sample again.") from None
            changes = settings_differences(old if isinstance(old, dict) else {}, record)
            if changes:
                raise DatasetError(
                    f"{prompts} was sampled with other settings: {'; '.join(changes)}. Its images would not match "
                    f"the new list: use another --out for these settings, or run again with the old ones.")
            how = f"read back from {prompts}"
        else:
            how = f"read from {prompts} (made by hand: no prompts.json)"
        found = [c for c in read_prompts(prompts, pool) if c.count in counts]
        if not found:
            raise DatasetError(f"{prompts} has no {' or '.join(COUNT_NAMES[n] for n in counts)}-subject prompt.")
        return found, how
    found = []
    for n in counts:
        limit = PAPER_PROMPTS[n] if max_prompts is None else max_prompts
        sampled = sample_compositions(pool, n, limit, seed)
        if not sampled:
            kinds = {k: sum(s.kind == k for s in pool) for k in KINDS}
            raise DatasetError(
                f"No {COUNT_NAMES[n]}-subject prompt can be made from these {len(pool)} subjects "
                f"({', '.join(f'{v} {k}' for k, v in kinds.items())}; {len({s.word for s in pool})} distinct class "
                f"words). The templates need: {_kinds_needed(n)}; subjects of one prompt need different words. Add "
                f"subjects (--concepts DIR with concept.json kinds) or choose --subjects-count "
                f"{3 if n == 2 else 2}.")
        if len(sampled) < limit:
            log.warning("only %d %s-subject compositions can be made from these subjects (%d asked for)",
                        len(sampled), COUNT_NAMES[n], limit)
        found += sampled
    if write:  # the settings first: whoever sees prompts.csv also sees what it was sampled with
        write_text(record_file, json.dumps(record, indent=1) + "\n")
        write_prompts(found, prompts)
    return found, f"sampled (composition seed {seed}) and written to {prompts}"


# -- generation ------------------------------------------------------------------------------------------------------

def image_path(images_dir, composition: Composition, seed: int) -> Path:
    return Path(images_dir) / composition.folder / f"{composition.id}_s{seed}.png"


def missing_images(compositions: Sequence[Composition], images_dir, seeds: Sequence[int]) -> list[tuple[Composition, list[int]]]:
    """(composition, the seeds whose image does not exist yet); existing images are never redone."""
    return common_missing(compositions, seeds, lambda c, seed: image_path(images_dir, c, seed))


def generate_missing(models, pool: Sequence[MultiSubject], compositions: Sequence[Composition], images_dir,
                     seeds: Sequence[int], *, reference: int = 0, steps: int = 50, guidance: float = 7.5,
                     width: int = 512, height: int = 512, sampler: str = "ddpm", fit: str = "crop",
                     quiet: bool = False) -> int:
    """Generate every missing image; one SubjectInput per subject (its word and reference photo)."""
    by_name = {s.name: s for s in pool}
    return generate_missing_images(
        models, compositions, seeds, lambda c, seed: image_path(images_dir, c, seed), lambda c: c.prompt,
        lambda c: [subject_input(by_name[name].word, by_name[name], reference) for name in c.subjects],
        steps=steps, guidance=guidance, width=width, height=height, sampler=sampler, fit=fit, quiet=quiet)


# -- scoring ---------------------------------------------------------------------------------------------------------

def find_images(images_dir, compositions: Sequence[Composition]) -> tuple[list[tuple[Composition, int, Path]], int]:
    """(composition, seed, path) of every IMAGES/<two|three>/<id>_s<seed>.<ext> of a listed composition, and how
    many image files matched no listed composition."""
    by_key = {(c.folder, c.id): c for c in compositions}
    found, stray = [], 0
    for folder in sorted({c.folder for c in compositions}):
        for match, path in matching_files(Path(images_dir) / folder, IMAGE_NAME):
            c = by_key.get((folder, match.group("id")))
            if c is None:
                stray += 1
                continue
            found.append((c, int(match.group("seed")), path))
    order = {c.id: i for i, c in enumerate(compositions)}
    return sorted(found, key=lambda t: (t[0].count, order[t[0].id], t[1])), stray


def score_images(scorer, pool: Sequence[MultiSubject], compositions: Sequence[Composition], images_dir,
                 quiet: bool = False) -> list[dict]:
    """One row per image (MULTIBENCH_FIELDS); every subject's photos are embedded once for the whole run."""
    by_name = {s.name: s for s in pool}
    found, stray = find_images(images_dir, compositions)
    if stray:
        log.warning("%d image(s) under %s match no composition of prompts.csv and are not scored", stray, images_dir)

    def score(chunk):
        subjects = [[(name, [str(p) for p in by_name[name].photos]) for name in c.subjects] for c, _, _ in chunk]
        scores = scorer.score_multi([path for *_, path in chunk], [c.prompt for c, _, _ in chunk], subjects)
        return [{"count": c.count, "composition": c.id, "subjects": "+".join(c.subjects), "prompt": c.prompt,
                 "seed": seed, "image": path.relative_to(images_dir).as_posix(), **sc}
                for (c, seed, path), sc in zip(chunk, scores)]

    return score_in_chunks(found, score, quiet=quiet)


def write_scores(rows: Sequence[dict], path) -> Path:
    return write_csv(rows, MULTIBENCH_FIELDS, path)


def _row(label: str, values: dict, fmt: str = "{:.4f}") -> str:
    return means_row(label, values, fmt)


CAVEAT = ("The paper's subject pairings and its extra concepts (various parks, hats, glasses, …) are not public: "
          "this run's compositions were sampled here from the Table 8 templates and the subjects given (Dreambench "
          "and any --concepts folders), so its numbers are comparable with other runs of the same prompts.csv, "
          "not exactly with the paper's row.")


def summary_markdown(rows: Sequence[dict], compositions: Sequence[Composition], settings: dict | None = None,
                     unfillable: Sequence[str] = ()) -> str:
    counts = sorted({c.count for c in compositions})
    lines = ["# Multibench evaluation", "",
             f"{len(rows)} generated images of {len({(r['count'], r['composition']) for r in rows})} compositions "
             f"(of {len(compositions)} in prompts.csv).", "",
             "| | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|"]
    for n in counts:
        mine = [r for r in rows if r["count"] == n]
        m = means(mine)
        lines += [_row(f"this run, {COUNT_NAMES[n]} subjects ({len(mine)} images)", m),
                  _row(f"paper (λ-ECLIPSE, Table 4), {COUNT_NAMES[n]} subjects", PAPER[n]),
                  _row("difference", {k: m[k] - PAPER[n][k] for k in METRICS}, "{:+.4f}")]
    lines += ["", CAVEAT + f" The paper has {PAPER_PROMPTS[2]} two-subject and {PAPER_PROMPTS[3]} three-subject "
              "prompts with four images each; other metric weights or another resolution also change the numbers.",
              "", "## Per template", "", "| subjects | template | compositions | images | DINO | CLIP-I | CLIP-T |",
              "|---|---|---:|---:|---:|---:|---:|"]
    template_of = {(c.count, c.id): c.template for c in compositions}
    for n in counts:
        for t in TEMPLATES[n]:
            mine = [r for r in rows if r["count"] == n and template_of.get((n, r["composition"])) == t]
            listed = sum(c.count == n and c.template == t for c in compositions)
            if not listed:
                continue
            g = means(mine)
            values = " | ".join(f"{g[k]:.4f}" if mine else "–" for k in METRICS)
            lines.append(f"| {n} | `{t}` | {listed} | {len(mine)} | {values} |")
    if unfillable:
        lines += ["", "Templates no subject fits (add concept folders of the kinds they need, see EVALUATION.md): "
                  + "; ".join(f"`{t}`" for t in unfillable) + "."]
    return "\n".join(lines + settings_lines(settings)) + "\n"


def plot_scores(rows: Sequence[dict], compositions: Sequence[Composition], path) -> Path:
    """One row per template (dots: images, bar: mean, red dashes: the paper's value for its subject count)."""
    template_of = {(c.count, c.id): c.template for c in compositions}
    groups = []
    for n in sorted({c.count for c in compositions}):
        for t in TEMPLATES[n]:
            mine = [r for r in rows if r["count"] == n and template_of.get((n, r["composition"])) == t]
            if mine:
                groups.append((f"{n}: {t.replace('{}', '_')}", mine, PAPER[n]))
    return plot_groups(groups, path, label_width=300)
