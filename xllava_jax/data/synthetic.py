"""A synthetic English / Korean / Chinese corpus in the X-LLaVA recipe's shapes, made offline from a seed.

`synthesize(out_dir, seed=0)` draws images of coloured shapes on a 3x3 grid with PIL, writes their scene
graphs, and renders from each graph, in parallel across languages, the four X-LLaVA task types, stage-1
captions, a held-out VQA split with gold short answers, and English + Korean pretraining text:

  images/train_NNNNNN.png, images/heldout_NNNNNN.png
  scene_graphs.jsonl          per image: objects (shape, colour, size, bbox, grid cell, label) and relations
  vif_{en,ko,zh,mixed}.json   LLaVA records with `lang`, `task` (object, location, atmosphere, conversation)
                              and `num_objects`; ids `train_NNNNNN_<task>_<lang>`
  captions_{en,ko}.json       stage-1 records: "<image>\\n" + a caption request -> the caption
  vif_short_{en,ko}.json      every short-answer question of the vif records alone with its image (the
                              LLaVA-1.5 single-word VQA form), tagged with its `kind`; ids
                              `train_NNNNNN_<task>_<k>_<lang>`: material for a curriculum's first stages
  vqa_heldout_{en,ko}.jsonl   LLaVA question lines + gold `answer` and `kind` (+ `answers_present`)
  text_{en,ko}.txt            pretraining text, one document per line; line i is parallel across languages
  summary.json                counts, and the majority-answer baseline per held-out question kind

What keeps the visual questions learnable: the objects of an image have distinct colours, distinct shapes
and distinct grid cells, so every question has exactly one answer; captions name the size, colour, shape
and position of every object in reading order; training records hold many short-answer questions of the
held-out kinds with the same prompt suffix, asked before any turn whose text could give their answers away;
and a share of training images holds one object (curriculum).
Held-out scenes are compositions that no training image shows.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from xllava_jax.data import synth_phrases as ph
from xllava_jax.data.korean import native_number

# SHORT_ANSWER_EN / _KO: the evaluation's short-answer prompt suffixes, exported here for the demo and scorers.
from xllava_jax.data.synth_phrases import LANGS, SHORT_ANSWER_EN, SHORT_ANSWER_KO, SUFFIX  # noqa: F401
from xllava_jax.data.synth_scenes import (
    KINDS,
    MAX_OBJECTS,
    Question,
    Scene,
    applicable_kinds,
    draw_scene,
    make_question,
    sample_scene,
    scene_graph,
)
from xllava_jax.errors import UserError

TASKS = ("object", "location", "atmosphere", "conversation")


class SynthError(UserError):
    """Settings or an output directory that `synthesize` cannot use."""


def _mentions(question: Question, scene: Scene) -> set[int]:
    """Grid cells of the objects a question is about or names by colour or shape (none for count)."""
    cells = {question.obj.cell} if question.obj else set()
    return cells | {o.cell for o in scene.objects if o.colour == question.colour or o.shape == question.shape}


def _unrelated(questions: list[Question], scene: Scene, most: int | None = None) -> list[Question]:
    """Up to `most` (default all) of `questions`, in order, no two naming or asking about the same object:
    one record's short questions then never give away each other's answers ("What shape is the red object?"
    before "What color is the heart?"), so they can only be answered by looking at the image."""
    kept, seen = [], set()
    for question in questions:
        if len(kept) == most:
            break
        cells = _mentions(question, scene)
        if not cells & seen:
            kept.append(question)
            seen |= cells
    return kept


def _plan(scene: Scene, rng: random.Random) -> dict[str, list[tuple]]:
    """Language-independent turns of the four task records. A turn: ("short" | "full", Question),
    ("describe", Obj), ("caption", prompt index), ("graph",), ("atmosphere",) or ("colours",).

    Short-answer turns come first and are about different objects (`_unrelated`); turns whose text names
    colours, shapes or places (full answers, descriptions, captions, scene graphs) come after them: answered
    after such text, a short question could be copied from it instead of read from the image, and the model
    would learn to read the text rather than look."""
    kinds = applicable_kinds(scene)
    about_objects = [k for k in ("colour", "binding_shape", "yes_no", "count", "label") if k in kinds]
    obj_turns = [("short", q) for q in _unrelated(
        [make_question(k, scene, rng) for k in rng.sample(about_objects, len(about_objects))], scene, 3)]
    obj_turns.append(("describe", rng.choice(scene.objects)))
    where = [("short", q) for q in _unrelated(
        [make_question(k, scene, rng) for k in rng.sample(("position", "binding_position", "shape"), 3)], scene)]
    caption = [("caption", rng.randrange(len(ph.CAPTION_PROMPTS["en"])))] if rng.random() < 0.3 else []
    pool = [make_question(k, scene, rng) for k in kinds for _ in range(1 if k == "count" else len(scene.objects))]
    picked = rng.sample(pool, min(rng.randint(4, 8) - len(caption), len(pool)))
    styles = [rng.choice(("short", "full")) for _ in picked]
    shorts = _unrelated([q for q, style in zip(picked, styles) if style == "short"], scene)
    fulls = [q for q, style in zip(picked, styles) if style == "full"]
    conversation = [("short", q) for q in shorts] + [("full", q) for q in fulls] + caption
    return {"object": obj_turns, "location": [*where, ("graph",)], "atmosphere": [("atmosphere",), ("colours",)],
            "conversation": conversation}


def _render_turn(turn: tuple, scene: Scene, lang: str) -> tuple[str, str]:
    """(question, answer) of a planned turn in `lang`."""
    what = turn[0]
    if what == "short":
        return f"{ph.ask(turn[1], scene, lang)}\n{SUFFIX[lang]}", ph.short_answer(turn[1], scene, lang)
    if what == "full":
        return ph.ask(turn[1], scene, lang), ph.full_answer(turn[1], scene, lang)
    if what == "describe":
        fields = ph.object_fields(lang, turn[1])
        return ph.say(lang, "q.describe", **fields), ph.say(lang, "a.describe", **fields)
    if what == "caption":
        return ph.CAPTION_PROMPTS[lang][turn[1]], ph.caption(scene, lang)
    render = {"graph": ph.scene_graph_text, "atmosphere": ph.atmosphere, "colours": ph.colours_used}[what]
    return ph.say(lang, f"q.{what}"), render(scene, lang)


def _record(scene: Scene, ident: str, turns: list[tuple], lang: str, **extra: object) -> dict:
    """A LLaVA conversation record, `<image>` opening the first human turn."""
    conversations = []
    for i, turn in enumerate(turns):
        human, gpt = _render_turn(turn, scene, lang)
        conversations += [{"from": "human", "value": f"<image>\n{human}" if i == 0 else human},
                          {"from": "gpt", "value": gpt}]
    return {"id": f"{ident}_{lang}", "image": scene.image, "conversations": conversations, "lang": lang, **extra,
            "num_objects": len(scene.objects)}


def _short_records(scene: Scene, plan: dict[str, list[tuple]], lang: str) -> list[dict]:
    """The plan's short-answer turns, each alone in a record with the image and tagged with its question kind:
    the same questions and answers as in the vif records, without the turns around them."""
    records = []
    for task in TASKS:
        shorts = [t for t in plan[task] if t[0] == "short"]
        records += [_record(scene, f"{scene.name}_{task}_{k}", [turn], lang, task=task, kind=turn[1].kind)
                    for k, turn in enumerate(shorts)]
    return records


PRESENT_KINDS = ("colour", "shape", "binding_shape", "position", "binding_position")


def _heldout_lines(scene: Scene, questions: list[Question], lang: str) -> list[dict]:
    """LLaVA question lines with the gold short answer. Colour, shape and position questions list in
    `answers_present` the answer each object of the image would give (what naming anything present could score)."""
    lines = []
    for q in questions:
        line = {"question_id": f"{scene.name}_{q.kind}_{lang}", "image": scene.image,
                "text": f"{ph.ask(q, scene, lang)}\n{SUFFIX[lang]}", "answer": ph.short_answer(q, scene, lang),
                "kind": q.kind, "lang": lang}
        if q.kind in PRESENT_KINDS:
            line["answers_present"] = [ph.short_answer(q._replace(obj=obj), scene, lang) for obj in scene.objects]
        lines.append(line)
    return lines


def _text_part(rng: random.Random, image_size: int) -> tuple[str, str]:
    """One parallel (English, Korean) passage of pretraining text."""
    what = rng.choice(("scene", "quiz", "quiz", "fact", "colour", "sum", "story"))
    if what in ("scene", "quiz"):
        scene = sample_scene("text", rng, image_size, rng.randint(1, 4), 0.3)
        if what == "scene":
            return ph.caption(scene, "en"), ph.caption(scene, "ko")
        q = make_question(rng.choice(applicable_kinds(scene)), scene, rng)
        return tuple(ph.say(lang, "t.quiz", caption=ph.caption(scene, lang), question=ph.ask(q, scene, lang),
                            answer=ph.short_answer(q, scene, lang)) for lang in ("en", "ko"))
    if what == "fact":
        return rng.choice(ph.SHAPE_FACTS)
    if what == "colour":
        thing_en, thing_ko, colour = rng.choice(ph.THINGS)
        return (ph.say("en", "t.colour", thing=thing_en, colour=colour),
                ph.say("ko", "t.colour", thing=thing_ko, colour=ph.WORDS["ko"][colour]))
    if what == "sum":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return tuple(ph.say(lang, "t.sum", a=a, b=b, c=a + b) for lang in ("en", "ko"))
    (name_en, name_ko), (friend_en, friend_ko) = rng.sample(ph.NAMES, 2)
    item_en, item_ko = rng.choice(ph.ITEMS)
    n = rng.randint(2, 10)
    k = rng.randint(1, n - 1)
    counts = {"n": n, "k": k, "r": n - k}
    items = {f"{key}_items": ph.count_fields("en", m, item_en)["n_shapes"] for key, m in counts.items()}
    return (ph.say("en", "t.story", name=name_en, friend=friend_en, **items),
            ph.say("ko", "t.story", name=name_ko, friend=friend_ko, item=item_ko,
                   **{key: native_number(m) for key, m in counts.items()}))


def text_corpus(seed: int, lines: int, image_size: int) -> tuple[list[str], list[str]]:
    """Parallel English and Korean documents, 2-4 passages each (scenes, quizzes, facts, sums, stories)."""
    rng = random.Random(f"{seed}:text")
    docs = [[_text_part(rng, image_size) for _ in range(rng.randint(2, 4))] for _ in range(lines)]
    return [" ".join(p[0] for p in doc) for doc in docs], [" ".join(p[1] for p in doc) for doc in docs]


def _object_count(rng: random.Random, max_objects: int, single_share: float | None) -> int:
    """1 with p = single_share, else uniform over 2..max_objects; uniform over 1..max_objects when None."""
    if single_share is None or max_objects == 1:
        return rng.randint(1, max_objects)
    return 1 if rng.random() < single_share else rng.randint(2, max_objects)


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(f"{out} is not empty; pass `overwrite`=True to write over an earlier corpus")
        for old in [*out.glob("images/train_*.png"), *out.glob("images/heldout_*.png")]:
            old.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line."""
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n", encoding="utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _baselines(lines: list[dict]) -> dict:
    """Per kind: question count, majority answer and its accuracy; for colour, shape and position kinds also
    the shortcut of naming anything present (the mean of 1 / number of distinct `answers_present`)."""
    out = {}
    for kind in KINDS:
        answers = Counter(line["answer"] for line in lines if line["kind"] == kind)
        if answers:
            top, hits = answers.most_common(1)[0]
            out[kind] = {"questions": answers.total(), "majority_answer": top,
                         "majority_baseline": round(hits / answers.total(), 4)}
            present = [line["answers_present"] for line in lines if line["kind"] == kind and "answers_present" in line]
            if present:
                out[kind]["present_shortcut"] = round(sum(1 / len(set(p)) for p in present) / len(present), 4)
    return out


def _scene(split: str, index: int, seed: int, settings: dict, seen: set) -> tuple[Scene, random.Random]:
    """The index-th scene of a split and the rng that goes on from it. Training images hold 1 object with
    p = single_share, else 2..max_objects; held-out images 1..max_objects uniformly, in a new composition."""
    rng = random.Random(f"{seed}:{split}:{index}")
    n = _object_count(rng, settings["max_objects"], settings["single_share"] if split == "train" else None)
    for _ in range(100):
        scene = sample_scene(f"{split}_{index:06d}", rng, settings["image_size"], n, settings["label_share"])
        composition = tuple((o.shape, o.colour, o.size, o.cell) for o in scene.objects)
        if split == "train" or composition not in seen:
            break
    seen.add(composition)
    return scene, rng


def synthesize(out_dir: str | Path, *, seed: int = 0, num_images: int = 3000, num_heldout: int = 300,
               image_size: int = 64, max_objects: int = 4, single_share: float = 0.4, label_share: float = 0.3,
               text_lines: int = 4000, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the synthetic corpus under `out_dir` (layout in the module docstring) and return its summary.

    Held-out scenes never repeat a training composition. The same settings give the same bytes."""
    settings = {"num_images": num_images, "num_heldout": num_heldout, "image_size": image_size,
                "max_objects": max_objects, "single_share": single_share, "label_share": label_share,
                "text_lines": text_lines}
    if not (24 <= image_size <= 1024 and 1 <= max_objects <= MAX_OBJECTS and num_images >= 1 and num_heldout >= 1
            and 0 <= single_share <= 1 and 0 <= label_share <= 1 and text_lines >= 0):
        raise SynthError(f"bad settings: need 24 <= image size <= 1024, 1 <= max objects <= {MAX_OBJECTS}, at least "
                         "one training and one held-out image, shares in [0, 1] and text lines >= 0")
    out = Path(out_dir)
    _prepare(out, overwrite)
    files = {name: [] for name in ("scene_graphs.jsonl", *(f"vif_{lang}.json" for lang in LANGS), "captions_en.json",
                                   "captions_ko.json", "vif_short_en.json", "vif_short_ko.json",
                                   "vqa_heldout_en.jsonl", "vqa_heldout_ko.jsonl")}
    seen, short_kinds, objects = set(), Counter(), {"train": Counter(), "heldout": Counter()}
    with tqdm(total=num_images + num_heldout, desc="drawing", unit="img", disable=not progress) as bar:
        for split, count in (("train", num_images), ("heldout", num_heldout)):
            for i in range(count):
                scene, rng = _scene(split, i, seed, settings, seen)
                objects[split][str(len(scene.objects))] += 1
                draw_scene(scene, image_size, rng).save(out / scene.image)
                files["scene_graphs.jsonl"].append(scene_graph(scene, split, image_size))
                if split == "train":
                    plan, prompt = _plan(scene, rng), rng.randrange(len(ph.CAPTION_PROMPTS["en"]))
                    short_kinds.update(t[1].kind for turns in plan.values() for t in turns if t[0] == "short")
                    for lang in LANGS:
                        files[f"vif_{lang}.json"] += [_record(scene, f"{scene.name}_{task}", plan[task], lang,
                                                              task=task) for task in TASKS]
                    for lang in ("en", "ko"):
                        files[f"captions_{lang}.json"].append(
                            _record(scene, f"{scene.name}_caption", [("caption", prompt)], lang))
                        files[f"vif_short_{lang}.json"] += _short_records(scene, plan, lang)
                else:
                    questions = [make_question(k, scene, rng) for k in applicable_kinds(scene)]
                    for lang in ("en", "ko"):
                        files[f"vqa_heldout_{lang}.jsonl"] += _heldout_lines(scene, questions, lang)
                bar.update()
    files["vif_mixed.json"] = [r for lang in LANGS for r in files[f"vif_{lang}.json"]]
    random.Random(f"{seed}:mixed").shuffle(files["vif_mixed.json"])
    for name, records in files.items():
        if name.endswith(".jsonl"):
            _write_lines(out / name, [json.dumps(r, ensure_ascii=False) for r in records])
        else:
            _write_json(out / name, records)
    for lang, lines in zip(("en", "ko"), text_corpus(seed, text_lines, image_size)):
        _write_lines(out / f"text_{lang}.txt", lines)
    summary = {
        "seed": seed, "settings": settings,
        "files": {"images": num_images + num_heldout} | {name: len(r) for name, r in files.items()}
                 | {"text_en.txt": text_lines, "text_ko.txt": text_lines},
        "objects_per_image": {split: dict(sorted(c.items())) for split, c in objects.items()},
        "vif_per_language": {"records": {task: num_images for task in TASKS},
                             "turns": sum(len(r["conversations"]) // 2 for r in files["vif_en.json"]),
                             "short_answer_turns": dict(sorted(short_kinds.items()))},
        "heldout": {lang: _baselines(files[f"vqa_heldout_{lang}.jsonl"]) for lang in ("en", "ko")},
    }
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return summary

