"""The synthetic corpus: determinism, layout, validity, gold answers against the scene graphs, Korean particles."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from xllava_jax.data import synth_phrases as ph
from xllava_jax.data.cli import add_synth_parser, run_synth
from xllava_jax.data.korean import PARTICLES, final_consonant, josa, native_number, particle
from xllava_jax.data.synth_scenes import RGB, Obj, Question, Scene
from xllava_jax.data.synthetic import (
    KINDS,
    SHORT_ANSWER_EN,
    SHORT_ANSWER_KO,
    TASKS,
    SynthError,
    synthesize,
)
from xllava_jax.data.vif import Problem, read_corpus, resolve_image

SMALL = {"num_images": 40, "num_heldout": 10, "text_lines": 60}
CONVERSATION_FILES = ["vif_en.json", "vif_ko.json", "vif_zh.json", "vif_mixed.json", "captions_en.json",
                      "captions_ko.json", "vif_short_en.json", "vif_short_ko.json"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synthesize(out, seed=0, **SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _graphs(corpus: Path) -> dict[str, dict]:
    return {g["image"]: g for g in _jsonl(corpus / "scene_graphs.jsonl")}


# ---------------------------------------------------------------- Korean particles


@pytest.mark.parametrize("word, pair, expected", [
    ("사과", "을/를", "사과를"), ("책", "을/를", "책을"), ("물", "이/가", "물이"), ("나무", "이/가", "나무가"),
    ("연필", "으로/로", "연필로"), ("집", "으로/로", "집으로"), ("학교", "으로/로", "학교로"), ("3", "이/가", "3이"),
    ("2", "이/가", "2가"), ("1", "으로/로", "1로"), ("6", "으로/로", "6으로"), ("10", "은/는", "10은"),
    ("100", "이/가", "100이"), ("1000", "을/를", "1000을"), ("20000", "은/는", "20000은"), ("0", "이/가", "0이"),
    ("A", "이/가", "A가"), ("'L'", "이/가", "'L'이"), ("'R'", "으로/로", "'R'로"), ("M", "은/는", "M은"),
    ("하트", "와/과", "하트와"), ("빨간색", "와/과", "빨간색과"), ("별", "으로/로", "별로"), ("원", "과/와", "원과"),
    ("민수", "은/는", "민수는"), ("지은", "이/가", "지은이"), ("마름모", "을/를", "마름모를"), ("꽃", "이/가", "꽃이"),
    ("book", "을/를", "book을"), ("apple", "이/가", "apple가"), ("(3)", "이/가", "(3)이")])
def test_josa(word, pair, expected):
    assert josa(word, pair) == expected


def test_josa_rejects_what_it_cannot_read():
    assert final_consonant("정사각형") == 21 and final_consonant("책!") == 1
    with pytest.raises(ValueError, match="unknown particle pair"):
        particle("책", "이/를")
    with pytest.raises(ValueError, match="cannot tell"):
        josa("圆形", "이/가")
    with pytest.raises(ValueError):
        native_number(11)
    assert [native_number(n) for n in (1, 2, 3, 4, 10)] == ["한", "두", "세", "네", "열"]


_PARTICLE = "(이|가|은|는|을|를|과|와|으로|로)(?![가-힣])"


def _korean_words() -> set[str]:
    words = {w for key, w in ph.WORDS["ko"].items() if key not in ph.SIZES} | {"도형", "물체"}
    return words | {name for _, name in ph.NAMES} | {item for _, item in ph.ITEMS} | {t for _, t, _ in ph.THINGS}


def _check_particles(text: str, seen: Counter) -> None:
    """Every known word, label or number followed by a particle carries the one josa() picks."""
    for word in _korean_words():
        for m in re.finditer(rf"(?<![가-힣]){re.escape(word)}{_PARTICLE}", text):
            assert m.group(1) == particle(word, _pair(m.group(1))), (word, m.group(0), text)
            seen[word] += 1
    for m in re.finditer(rf"('[A-Z0-9]'|(?<![\w'])\d+){_PARTICLE}", text):
        assert m.group(2) == particle(m.group(1), _pair(m.group(2))), (m.group(0), text)
        seen["label/number"] += 1


def _pair(form: str) -> str:
    return next(f"{a}/{b}" for a, b in PARTICLES if form in (a, b))


def test_korean_particles_for_every_colour_and_shape_word():
    seen = Counter()
    for colour in RGB:
        for shape in ph.SHAPES:
            obj = Obj(shape, colour, "large", 4, (32.0, 32.0), 9.0, "R")
            other = Obj(next(s for s in ph.SHAPES if s != shape), next(c for c in RGB if c != colour), "small", 1,
                        (32.0, 10.0), 5.0, None)
            scene = Scene("x", (other, obj), "white", "noise")
            texts = [ph.caption(scene, "ko"), ph.scene_graph_text(scene, "ko"), ph.atmosphere(scene, "ko"),
                     ph.colours_used(scene, "ko"), ph.atmosphere(Scene("y", (obj,), "beige", "plain"), "ko")]
            questions = [Question(k, obj, colour, shape) for k in KINDS] + [Question("yes_no", None, colour, shape)]
            for q in questions:
                texts += [ph.ask(q, scene, "ko"), ph.full_answer(q, scene, "ko"), ph.short_answer(q, scene, "ko")]
            texts += [ph.say("ko", "q.describe", **ph.object_fields("ko", obj)),
                      ph.say("ko", "a.describe", **ph.object_fields("ko", obj))]
            for text in texts:
                _check_particles(text, seen)
    for word in [ph.WORDS["ko"][k] for k in (*RGB, *ph.SHAPES)]:
        assert seen[word] > 0, f"{word} never carries a particle"


# ---------------------------------------------------------------- the corpus


def test_deterministic(corpus, tmp_path):
    """Same seed, same bytes, also in another process with another string-hash seed."""
    again = str(tmp_path / "again")
    code = f"from xllava_jax.data.synthetic import synthesize; synthesize({again!r}, seed=0, **{SMALL})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert _files(tmp_path / "again") == _files(corpus)
    synthesize(tmp_path / "other", seed=1, **SMALL)
    other = _files(tmp_path / "other")
    assert other["vif_en.json"] != _files(corpus)["vif_en.json"]
    assert other["images/train_000000.png"] != (corpus / "images/train_000000.png").read_bytes()


def test_layout_and_counts(corpus):
    summary = json.loads((corpus / "summary.json").read_text())
    files = summary["files"]
    assert files["images"] == len(list((corpus / "images").glob("*.png"))) == 50
    for name in CONVERSATION_FILES:
        assert files[name] == len(json.loads((corpus / name).read_text())), name
    for name in ("scene_graphs.jsonl", "vqa_heldout_en.jsonl", "vqa_heldout_ko.jsonl"):
        assert files[name] == len(_jsonl(corpus / name)), name
    assert files["vif_en.json"] == files["vif_ko.json"] == files["vif_zh.json"] == 40 * len(TASKS)
    assert files["vif_mixed.json"] == 3 * files["vif_en.json"] and files["captions_ko.json"] == 40
    for lang in ("en", "ko"):
        lines = (corpus / f"text_{lang}.txt").read_text(encoding="utf-8").split("\n")
        assert len(lines) == 61 and lines[-1] == "" and all(lines[:-1])
    records = json.loads((corpus / "vif_en.json").read_text())
    assert Counter(r["task"] for r in records) == {task: 40 for task in TASKS}
    assert set(summary["vif_per_language"]["short_answer_turns"]) == set(KINDS)
    assert summary["objects_per_image"]["train"]["1"] > 0
    heldout = _jsonl(corpus / "vqa_heldout_en.jsonl")
    for kind, stats in summary["heldout"]["en"].items():
        answers = Counter(line["answer"] for line in heldout if line["kind"] == kind)
        assert stats["majority_baseline"] == round(answers.most_common(1)[0][1] / answers.total(), 4)


def test_every_record_valid_and_every_image_there(corpus):
    for name in CONVERSATION_FILES:
        items = list(read_corpus(corpus / name))
        assert not [p for p in items if isinstance(p, Problem)], name
        for record in items:
            assert record.turns[0][1].startswith("<image>\n") and resolve_image(corpus, record.image).is_file()
    for lang in ("en", "ko"):
        for line in _jsonl(corpus / f"vqa_heldout_{lang}.jsonl"):
            assert resolve_image(corpus, line["image"]).is_file() and line["kind"] in KINDS
            assert line["text"].endswith("\n" + (SHORT_ANSWER_EN if lang == "en" else SHORT_ANSWER_KO))


_LOCATIVE = {loc: short for short, loc, _, _ in ph.POSITIONS}


def _gold(question: str, graph: dict) -> str:
    """The answer to an English question, worked out from the scene graph alone."""
    objects = graph["objects"]

    def one(**want) -> dict:
        (found,) = [o for o in objects if all(o[k] == v for k, v in want.items())]
        return found

    patterns = [
        (r"What color is the (\w+)\?", lambda s: one(shape=s)["colour"]),
        (r"What shape is the (\w+) object\?", lambda c: one(colour=c)["shape"]),
        (r"What shape is (.+)\?", lambda loc: one(position=_LOCATIVE[loc])["shape"]),
        (r"How many shapes are in the image\?", lambda: str(len(objects))),
        (r"Where is the (\w+) (\w+)\?", lambda c, s: one(colour=c, shape=s)["position"]),
        (r"Where is the (\w+)\?", lambda s: one(shape=s)["position"]),
        (r"Is there an? (\w+) (\w+) in the image\?",
         lambda c, s: "yes" if any(o["colour"] == c and o["shape"] == s for o in objects) else "no"),
        (r"What is written on the (\w+)\?", lambda s: one(shape=s)["label"])]
    for pattern, answer in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            return answer(*m.groups())
    raise AssertionError(f"unknown question {question!r}")


def test_gold_answers_follow_the_scene_graph(corpus):
    graphs = _graphs(corpus)
    for graph in graphs.values():
        objects = graph["objects"]
        for key in ("grid", "colour", "shape"):
            assert len({str(o[key]) for o in objects}) == len(objects)
        for a in objects:
            assert 0 <= a["bbox"][0] < a["bbox"][2] <= 64 and 0 <= a["bbox"][1] < a["bbox"][3] <= 64
            for b in objects:
                if a is not b:
                    apart = a["bbox"][2] <= b["bbox"][0] or b["bbox"][2] <= a["bbox"][0]
                    assert apart or a["bbox"][3] <= b["bbox"][1] or b["bbox"][3] <= a["bbox"][1]
    checked = Counter()
    ko = {line["question_id"][:-3]: line for line in _jsonl(corpus / "vqa_heldout_ko.jsonl")}
    for line in _jsonl(corpus / "vqa_heldout_en.jsonl"):
        graph = graphs[line["image"]]
        question = line["text"].removesuffix("\n" + SHORT_ANSWER_EN)
        assert _gold(question, graph) == line["answer"], line
        present = {"colour": [o["colour"] for o in graph["objects"]], "shape": [o["shape"] for o in graph["objects"]],
                   "position": [o["position"] for o in graph["objects"]]}
        key = {"binding_shape": "shape", "binding_position": "position"}.get(line["kind"], line["kind"])
        if key in present:
            assert sorted(line["answers_present"]) == sorted(present[key]), line
            assert line["answer"] in line["answers_present"]
        else:
            assert "answers_present" not in line
        other = ko[line["question_id"][:-3]]
        assert other["kind"] == line["kind"] and other["image"] == line["image"]
        assert other["answer"] == _translate(line["answer"], "ko"), (line, other)
        checked[line["kind"]] += 1
    assert set(checked) == set(KINDS)
    for record in json.loads((corpus / "vif_en.json").read_text()):
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            if question.endswith("\n" + SHORT_ANSWER_EN):
                assert _gold(question.removesuffix("\n" + SHORT_ANSWER_EN), graphs[record["image"]]) == gpt["value"]


def test_short_records_are_the_vif_short_questions_alone(corpus):
    """vif_short_{lang}.json: every short-answer question of the vif records, once, alone with its image, the
    same answer and its kind; nothing else."""
    summary = json.loads((corpus / "summary.json").read_text())
    graphs = _graphs(corpus)
    by_lang = {}
    for lang, suffix in (("en", SHORT_ANSWER_EN), ("ko", SHORT_ANSWER_KO)):
        vif = {(r["image"], r["task"]): r for r in json.loads((corpus / f"vif_{lang}.json").read_text())}
        records = json.loads((corpus / f"vif_short_{lang}.json").read_text())
        assert len(records) == summary["files"][f"vif_short_{lang}.json"]
        assert Counter(r["kind"] for r in records) == summary["vif_per_language"]["short_answer_turns"]
        pairs = Counter()
        for r in records:
            (human, gpt) = r["conversations"]
            assert r["lang"] == lang and r["id"].endswith(f"_{lang}") and human["value"].startswith("<image>\n")
            assert human["value"].endswith("\n" + suffix)
            turns = vif[r["image"], r["task"]]["conversations"]
            asked = [(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(turns[::2], turns[1::2])]
            assert (human["value"].removeprefix("<image>\n"), gpt["value"]) in asked, r["id"]
            pairs[r["image"], r["task"], human["value"]] += 1
            if lang == "en":
                question = human["value"].removeprefix("<image>\n").removesuffix("\n" + suffix)
                assert _gold(question, graphs[r["image"]]) == gpt["value"]
                assert _kind(question) == r["kind"], (question, r["kind"])
        assert max(pairs.values()) == 1
        by_lang[lang] = records
    assert [(r["id"][:-3], r["kind"]) for r in by_lang["en"]] == [(r["id"][:-3], r["kind"]) for r in by_lang["ko"]]
    assert [_translate(r["conversations"][1]["value"], "ko") for r in by_lang["en"]] == [
        r["conversations"][1]["value"] for r in by_lang["ko"]]


def _kind(question: str) -> str:
    """The kind of an English short question, read from its wording."""
    for pattern, kind in ((r"What color is the \w+\?", "colour"), (r"What shape is the \w+ object\?", "binding_shape"),
                          (r"What shape is .+\?", "shape"), (r"How many shapes .+", "count"),
                          (r"Where is the \w+ \w+\?", "position"), (r"Where is the \w+\?", "binding_position"),
                          (r"Is there .+", "yes_no"), (r"What is written .+", "label")):
        if re.fullmatch(pattern, question):
            return kind
    raise AssertionError(question)


def test_short_questions_come_first_and_cannot_be_copied(corpus):
    """In every training record the short-answer turns open the conversation, and a colour or shape answer
    never appears in an earlier turn (question or answer): it has to be read from the image."""
    words = {ph.WORDS["en"][name] for name in (*ph.SHAPES, *RGB)}
    suffix = "\n" + SHORT_ANSWER_EN
    checked = 0
    for record in json.loads((corpus / "vif_en.json").read_text()):
        turns = record["conversations"]
        short = [human["value"].endswith(suffix) for human in turns[::2]]
        assert short == sorted(short, reverse=True), record["id"]
        for i in range(2, len(turns), 2):
            if short[i // 2] and turns[i + 1]["value"] in words:
                earlier = " ".join(t["value"] for t in turns[:i]).replace(suffix, "").lower()
                assert turns[i + 1]["value"] not in earlier.replace("?", " ").replace(".", " ").split(), record
                checked += 1
    assert checked > 20


def _translate(answer: str, lang: str) -> str:
    if answer in ph.WORDS["en"]:
        return ph.WORDS[lang][answer]
    if answer in ("yes", "no"):
        return ph.YES_NO[lang][answer == "no"]
    positions = [p[0] for p in ph.POSITIONS]
    return ph.position(lang, positions.index(answer)) if answer in positions else answer


def test_heldout_images_are_new(corpus):
    graphs = list(_graphs(corpus).values())
    train = [g for g in graphs if g["split"] == "train"]
    heldout = [g for g in graphs if g["split"] == "heldout"]
    assert len(train) == 40 and len(heldout) == 10

    def composition(g: dict) -> tuple:
        return tuple((o["shape"], o["colour"], o["size"], tuple(o["grid"])) for o in g["objects"])

    assert not {composition(g) for g in heldout} & {composition(g) for g in train}
    trained = {r["image"] for name in CONVERSATION_FILES for r in json.loads((corpus / name).read_text())}
    asked = {line["image"] for line in _jsonl(corpus / "vqa_heldout_en.jsonl")}
    assert trained == {g["image"] for g in train} and asked == {g["image"] for g in heldout}
    pixels = {(corpus / g["image"]).read_bytes() for g in train}
    assert not any((corpus / g["image"]).read_bytes() in pixels for g in heldout)


def test_languages_are_parallel(corpus):
    by_lang = {lang: json.loads((corpus / f"vif_{lang}.json").read_text()) for lang in ("en", "ko", "zh")}
    suffixes = {"en": ph.SHORT_ANSWER_EN, "ko": ph.SHORT_ANSWER_KO, "zh": ph.SHORT_ANSWER_ZH}
    for en, ko, zh in zip(by_lang["en"], by_lang["ko"], by_lang["zh"]):
        group = {"en": en, "ko": ko, "zh": zh}
        assert {r["id"][:-3] for r in group.values()} == {en["id"][:-3]}
        for lang, record in group.items():
            assert record["id"].endswith(f"_{lang}") and record["lang"] == lang
            assert (record["image"], record["task"], len(record["conversations"])) == (
                en["image"], en["task"], len(en["conversations"]))
        shorts = {lang: [t["value"].endswith(suffixes[lang]) for t in r["conversations"][::2]]
                  for lang, r in group.items()}
        assert shorts["en"] == shorts["ko"] == shorts["zh"]
    mixed = json.loads((corpus / "vif_mixed.json").read_text())
    assert sorted(r["id"] for r in mixed) == sorted(r["id"] for rs in by_lang.values() for r in rs)


def test_korean_text_in_the_corpus_uses_the_right_particles(corpus):
    seen = Counter()
    texts = [t["value"] for r in json.loads((corpus / "vif_ko.json").read_text()) for t in r["conversations"]]
    texts += [t["value"] for r in json.loads((corpus / "captions_ko.json").read_text()) for t in r["conversations"]]
    texts += [line["text"] for line in _jsonl(corpus / "vqa_heldout_ko.jsonl")]
    texts += (corpus / "text_ko.txt").read_text(encoding="utf-8").splitlines()
    for text in texts:
        _check_particles(text, seen)
    assert seen["label/number"] > 0 and sum(seen.values()) > 1000


def test_english_articles_and_plurals(corpus):
    text = (corpus / "vif_en.json").read_text() + (corpus / "text_en.txt").read_text()
    assert not re.search(r"(?<!letter )\b[Aa] [aeiou]", text) and not re.search(r"\b[Aa]n [b-df-hj-np-tv-z]", text)
    assert not re.search(r"\bone \w+s\b", text) and not re.search(r"\b(two|three|four) (shape|apple|book)\b", text)
    assert "an orange" in text or "An orange" in text


def test_settings_and_output_directory_are_checked(tmp_path):
    with pytest.raises(SynthError, match="max objects"):
        synthesize(tmp_path / "a", max_objects=7, **SMALL)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(SynthError, match="not empty"):
        synthesize(tmp_path / "b", **SMALL)
    summary = synthesize(tmp_path / "b", overwrite=True, num_images=3, num_heldout=2, text_lines=2)
    assert summary["files"]["images"] == 5 and (tmp_path / "b" / "keep.txt").exists()


def test_single_object_share(tmp_path):
    only_single = synthesize(tmp_path / "one", single_share=1.0, num_images=20, num_heldout=8, text_lines=1)
    never_single = synthesize(tmp_path / "many", single_share=0.0, num_images=20, num_heldout=8, text_lines=1)
    assert only_single["objects_per_image"]["train"] == {"1": 20}
    assert "1" not in never_single["objects_per_image"]["train"]
    assert set(never_single["objects_per_image"]["heldout"]) <= {"1", "2", "3", "4"}


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="xllava data")
    add_synth_parser(parser.add_subparsers(dest="data_command"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["synth", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--num-images" in help_text and "xllava data synth --out" in help_text
    args = parser.parse_args(["synth", "--out", str(tmp_path / "c"), "--num-images", "4", "--num-heldout", "2",
                              "--text-lines", "3", "--image-size", "32"])
    assert run_synth(args) == 0 and "wrote" in capsys.readouterr().out
    assert run_synth(args) == 2 and "not empty" in capsys.readouterr().err
