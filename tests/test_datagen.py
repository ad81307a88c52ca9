"""`xllava datagen run` / `review` against a real chat-completions server on 127.0.0.1 with scripted replies,
over a small Visual Genome-layout sample made here."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from chat_server import Reply, ScriptedServer, status
from PIL import Image

from xllava_jax.cli import main
from xllava_jax.datagen.prompts import TASKS, load_tasks, task_prompt
from xllava_jax.datagen.runner import Journal
from xllava_jax.datagen.sources import (
    DatagenError,
    ImageItem,
    load_image_folder,
    load_visual_genome,
    select_images,
)
from xllava_jax.datagen.validate import proper_nouns, script_share, validate_response

REPO = Path(__file__).resolve().parents[1]
TURNS = {"object": 3, "location": 3, "atmosphere": 1, "conversation": 8}
TASK_OF = {"object-centric": "object", "location-centric": "location", "atmosphere-centric": "atmosphere",
           "a conversation of": "conversation"}
TEXT = {"en": ("What colour is the {o}?", "The {o} looks grey, and the scene around it feels calm and quiet."),
        "ko": ("이 물체는 무슨 색인가요?", "사진 속 물체는 회색으로 보이며 주변은 조용하고 평화로운 분위기입니다."),
        "zh": ("这个物体是什么颜色？", "照片中的物体看起来是灰色的，周围的气氛安静而平和。")}


def _box(name: str, side: int) -> dict:
    return {"object_id": zlib.crc32(name.encode()) % 10**6,  # stable across processes, unlike hash(str)
            "x": 0, "y": 0, "w": side, "h": side, "names": [name], "synsets": []}


def make_vg(root: Path) -> Path:
    """A Visual Genome-layout folder: 8 images, of which 1, 4, 5, 7, 8 are selectable (5 repeats 1's bytes),
    2 has too few main objects, 3 too many, 6 has no file, 9 no objects."""
    for d in ("VG_100K", "VG_100K_2"):
        (root / d).mkdir(parents=True)
    big = 300  # boxes of 190..300 px of 800 x 600: over 7% of the image; 10 x 10 is below the 2% threshold
    objects = {1: ["man", "umbrella", "street", "car"], 2: ["dog", "ball"],
               3: [f"thing{i}" for i in range(12)], 4: ["cat", "sofa", "lamp"], 5: ["tree", "bench", "path", "bird",
                                                                                    "sky"],
               6: ["boat", "water", "dock"], 7: ["plate", "cake", "fork", "cup"], 8: ["horse", "fence", "grass"]}
    images, objs, rels = [], [], []
    for i, names in objects.items():
        folder = "VG_100K_2" if i == 4 else "VG_100K"
        images.append({"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{i}.jpg",
                       "width": 800, "height": 600, "coco_id": None, "flickr_id": None})
        entries = [_box(n, big - 10 * k) for k, n in enumerate(names)] + [_box(names[0], 50), _box("speck", 10)]
        if i == 8:  # the older layout: a single "name"
            entries = [{"x": 0, "y": 0, "w": big, "h": big, "name": n} for n in names]
        objs.append({"image_id": i, "objects": entries})
        if i != 6:
            colour = (1 if i == 5 else i) * 25
            Image.new("RGB", (32, 24), (colour, 255 - colour, 90)).save(root / folder / f"{i}.jpg", quality=90)
    rels.append({"image_id": 1, "relationships": [
        {"predicate": "holding", "subject": {"name": "man"}, "object": {"names": ["umbrella"]}},
        {"predicate": "near", "subject": {"name": "man"}, "object": {"names": ["speck"]}}]})
    images.append({"image_id": 9, "url": "https://example.org/VG_100K/9.jpg", "width": 800, "height": 600})
    for name, data in (("image_data", images), ("objects", objs), ("relationships", rels)):
        (root / f"{name}.json").write_text(json.dumps(data))
    return root


class FakeModel:
    """Answers generation requests like a model would: a valid reply for the task, languages and objects of
    the request; `plan` holds variants (functions of the good reply) used for the first requests in order."""

    def __init__(self, root: Path, plan=(), delay_s: float = 0.0, bad_first: set[str] = frozenset()):
        self.by_b64 = {base64.b64encode(p.read_bytes()).decode(): p.stem for p in root.rglob("*.jpg")}
        self.plan = list(plan)
        self.delay_s = delay_s
        self.bad_first = set(bad_first)
        self.calls: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, request: dict) -> Reply:
        content = request["messages"][-1]["content"]
        image = self.by_b64[content[0]["image_url"]["url"].split(",", 1)[1]]
        text = content[-1]["text"]
        task = next(t for marker, t in TASK_OF.items() if marker in text.split("\n")[0])
        langs = re.findall(r'\("(\w\w)"\)', text.split("in parallel in:")[1].split("\n\n")[0])
        objects = re.search(r"The main objects in the image are: (.*)\.\n", text).group(1).split(", ")
        key = f"{image}::{task}"
        reply = {"scene_graph": [[objects[0], "next to", objects[1]]]} if task == "location" else {}
        for lang in langs:
            q, a = TEXT[lang]
            reply[lang] = [{"question": q.format(o=objects[i % len(objects)]), "answer": a.format(o=objects[0])}
                           for i in range(TURNS[task])]
        with self.lock:
            self.calls.append((time.monotonic(), key))
            variant = self.plan.pop(0) if self.plan else None
            if key in self.bad_first:
                self.bad_first.discard(key)
                variant = drop("ko")
        if isinstance(variant, Reply):
            return variant
        content = variant(reply) if variant else json.dumps(reply, ensure_ascii=False)
        return Reply(content=content, delay_s=self.delay_s)


def drop(lang: str):
    return lambda r: json.dumps({k: v for k, v in r.items() if k != lang}, ensure_ascii=False)


def english_in(lang: str):
    return lambda r: json.dumps({**r, lang: r["en"]}, ensure_ascii=False)


def short_answers(r: dict) -> str:
    r["en"][0]["answer"] = ""
    return json.dumps(r, ensure_ascii=False)


def one_turn_less(r: dict) -> str:
    r["en"] = r["en"][:-1]
    return json.dumps(r, ensure_ascii=False)


def with_name(r: dict) -> str:
    r["en"][0]["answer"] += " It stands near the Eiffel Tower in Paris."
    return json.dumps(r, ensure_ascii=False)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["datagen", *args])
    out, err = capsys.readouterr()
    return code, out, err


def base_args(server: ScriptedServer, vg: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--vg", str(vg), "--out", str(out), "--api-base", server.url, "--model", "m", "--timeout", "0.5",
            "--backoff", "0.01", "--concurrency", "1", *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


# ---------------------------------------------------------------- sources, selection, prompts, validation


def test_visual_genome_selection(tmp_path):
    src = load_visual_genome(make_vg(tmp_path / "vg"))
    items = {it.image_id: it for it in src.items}
    assert [str(p) for p in src.problems] == [f"{tmp_path / 'vg'}/image_data.json:[8] (id 9): no entry in objects.json"]
    assert items["1"].objects == ("man", "umbrella", "street", "car")  # distinct, the 10 x 10 speck is not main
    assert items["1"].relations == (("man", "holding", "umbrella"),)  # relations among main objects only
    assert items["8"].objects == ("fence", "grass", "horse")  # the old "name" layout; equal areas sorted by name
    chosen, problems = select_images(src, seed=0)
    ids = [it.image_id for it in chosen]
    assert len(ids) == 4 and {"4", "7", "8"} <= set(ids) and len({"1", "5"} & set(ids)) == 1
    reasons = sorted(p.reason.split(" as ")[0] for p in problems)
    assert reasons == ["image file not found", "same image file"]
    assert next(it for it in chosen if it.image_id == "4").image == "VG_100K_2/4.jpg"
    assert [it.image_id for it in select_images(src, seed=0)[0]] == ids
    orders = {tuple(it.image_id for it in select_images(src, seed=s)[0]) for s in range(6)}
    assert len(orders) > 1  # the seed decides the order
    assert [it.image_id for it in select_images(src, seed=0, max_images=2)[0]] == ids[:2]
    assert [it.image_id for it in select_images(src, min_objects=12, max_objects=12)[0]] == ["3"]
    assert [it.image_id for it in select_images(src, min_objects=2, max_objects=2)[0]] == ["2"]


def test_image_folder_source(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    listing = tmp_path / "objects.jsonl"
    listing.write_text('{"image": "a.png", "objects": ["Cat", {"name": "sofa"}, "cat"], "relations": '
                       '[["cat", "on", "sofa"], ["cat", "on", "moon"]]}\n{not json\n'
                       '{"image": "../escape.png", "objects": ["x"]}\n{"image": "b.png"}\n')
    src = load_image_folder(tmp_path / "imgs", listing)
    assert src.items == [ImageItem("a.png", "a.png", ("cat", "sofa"), (("cat", "on", "sofa"),))]
    assert [(p.where, p.reason.split(" (")[0]) for p in src.problems] == [
        ("line 2", "invalid JSON"), ("line 3", "image path '../escape.png' climbs out of the image root"),
        ("line 4", "expected an object with image and objects")]
    with pytest.raises(DatagenError, match="imgs/image_data.json: cannot read"):
        load_visual_genome(tmp_path / "imgs")


def test_validation_codes():
    objects = ["dog", "frisbee"]
    good = {"en": [{"question": "What is the dog doing?", "answer": "The dog catches the frisbee."}],
            "ko": [{"question": "개는 무엇을 하나요?", "answer": "개가 원반을 잡고 있습니다."}]}

    def codes(reply, **kw):
        text = reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)
        args = dict(langs=["en", "ko"], turns=1, objects=objects) | kw
        return validate_response(text, **args).reasons

    assert codes(good) == [] and codes("```json\n" + json.dumps(good) + "\n```") == []
    assert codes('{"en": [') == ["invalid_json"] and codes('{"en": [', finish_reason="length") == ["truncated"]
    assert codes({"en": good["en"]}) == ["missing_language:ko"]
    assert codes({**good, "ko": good["en"]}) == ["wrong_script:ko"]
    assert codes({**good, "ko": [{"question": "狗在做什么？", "answer": "狗在接飞盘。"}]}) == ["wrong_script:ko"]
    assert codes({**good, "en": "text"}) == ["bad_shape"]
    assert codes({**good, "en": good["en"] * 2}) == ["turn_count"]
    assert codes(good, min_answer_chars=30) == ["answer_length", "answer_length"]
    assert codes(good, turns=1, scene_graph=True) == ["bad_shape"]
    assert codes({**good, "scene_graph": [["dog", "under", "frisbee"]]}, scene_graph=True) == []
    named = {**good, "en": [{"question": "Where is the dog?", "answer": "The dog runs past the Eiffel Tower."}]}
    verdict = validate_response(json.dumps(named), langs=["en", "ko"], turns=1, objects=objects)
    assert verdict.ok and verdict.flags == [{"code": "proper_noun", "detail": "Eiffel Tower"}]
    assert codes(named, reject_proper_nouns=True) == ["proper_noun"]
    assert proper_nouns(["I think the Frisbee is red. Yes, it is."], objects) == []
    assert script_share("고양이 TV", "ko") == pytest.approx(3 / 5) and script_share("123", "zh") == 0.0


def test_prompts_and_templates(tmp_path, capsys):
    specs = load_tasks(None, list(TASKS), ["en", "ko"])
    item = ImageItem("1", "1.jpg", ("man", "umbrella", "street"), (("man", "holding", "umbrella"),))
    text = task_prompt(specs["location"], item, ["en", "ko"])
    assert "man, umbrella, street" in text and "man - holding - umbrella" in text and '"scene_graph"' in text
    assert '"ko"' in text and '"zh"' not in text and "Chinese" not in text and "3 questions" in text
    assert "8 turns" in task_prompt(specs["conversation"], item, ["en", "ko"])
    copy = tmp_path / "tpl"
    assert run_cli(["templates", "--out", str(copy)], capsys)[0] == 0
    (copy / "object.txt").write_text("Task: object-centric MARKER\n$objects $oops\n")
    with pytest.raises(DatagenError, match=r"object.txt: unknown placeholder \$oops"):
        task_prompt(load_tasks(copy, ["object"], ["en"])["object"], item, ["en"])
    (copy / "seeds" / "atmosphere.json").write_text("[]")
    with pytest.raises(DatagenError, match="needs exactly 2 seed examples"):
        load_tasks(copy, ["atmosphere"], ["en"])
    assert run_cli(["templates", "--out", str(copy)], capsys)[0] == 2


def test_journal_tolerates_only_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "resp')
    records, warning = Journal(path).load()
    assert [r["key"] for r in records] == ["a", "b"] and "j.jsonl:3: dropped an unterminated last line" in warning
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'
    journal = Journal(path)
    assert journal.append({"key": "d"})
    journal.close()
    assert not journal.append({"key": "e"}) and path.read_text().endswith('{"key": "d"}\n')
    path.write_text('{"key": "a"}\n{"key": \n{"key": "b"}\n')
    with pytest.raises(DatagenError, match="j.jsonl:2: not a JSON line"):
        Journal(path).load()


def test_help_has_examples(capsys):
    for sub in ("run", "review", "translate", "templates"):
        with pytest.raises(SystemExit):
            main(["datagen", sub, "--help"])
        assert "examples:" in capsys.readouterr().out


# ---------------------------------------------------------------- a full run against the scripted server


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Run 1 (3 images x 4 tasks, concurrency 1) with a 429, a 500, a hang past the timeout and five bad
    replies, then run 2 with one more attempt allowed."""
    tmp = tmp_path_factory.mktemp("gen")
    vg = make_vg(tmp / "vg")
    plan = [status(429, retry_after=0.4), status(500), Reply(content="{}", delay_s=1.2),
            lambda r: "this is not JSON {", None,  # item 1: invalid_json, then accepted
            drop("ko"), None,  # item 2: missing_language:ko, then accepted
            english_in("ko"), None,  # item 3: wrong_script:ko, then accepted
            one_turn_less, short_answers,  # item 4: turn_count, answer_length: gives up
            with_name]  # item 5: accepted with a proper-noun flag
    model = FakeModel(vg, plan)
    out = tmp / "out"
    stdout, err1 = io.StringIO(), io.StringIO()
    with ScriptedServer(model) as server:
        with redirect_stdout(stdout), redirect_stderr(err1):
            code1 = main(["datagen", *base_args(server, vg, out, "--max-images", "3", "--review", "html")])
        snapshot = {name: (out / name).read_text(encoding="utf-8") for name in ("accepted.jsonl", "rejected.jsonl")}
        calls1 = list(model.calls)
        summary1 = json.loads(stdout.getvalue().splitlines()[-1])
        with redirect_stdout(stdout), redirect_stderr(io.StringIO()):
            code2 = main(["datagen", *base_args(server, vg, out, "--max-images", "3", "--max-attempts", "3")])
        summary2 = json.loads(stdout.getvalue().splitlines()[-1])
    return dict(vg=vg, out=out, code1=code1, err1=err1.getvalue(), summary1=summary1, calls1=calls1, code2=code2,
                summary2=summary2, calls2=model.calls[len(calls1):], snapshot=snapshot)


def test_run_retries_validates_and_records_rejections(generated):
    g = generated
    assert g["code1"] == 0, g["err1"]
    calls = g["calls1"]
    assert calls[1][0] - calls[0][0] >= 0.38  # Retry-After: 0.4 honoured
    assert calls[2][0] - calls[1][0] < 0.3  # 500: exponential backoff from 0.01 s
    assert calls[3][0] - calls[2][0] >= 0.5  # the hung request was given up after the 0.5 s timeout
    assert calls[0][1] == calls[1][1] == calls[2][1] == calls[3][1] == calls[4][1]  # all retries of item 1
    s = g["summary1"]
    assert s["images_selected"] == 3 and s["work_items"] == 12 and s["accepted"] == 11 and s["gave_up"] == 1
    assert s["rejections_by_reason"] == {"invalid_json": 1, "missing_language:ko": 1, "wrong_script:ko": 1,
                                         "turn_count": 1, "answer_length": 1}
    assert s["flags"] == {"proper_noun": 1} and s["pending"] == 0
    n = len(calls) - 3  # replies: every request but the 429, the 500 and the hang
    assert n == 16 and s["replies"] == 16 and s["prompt_tokens"] == 160 and s["completion_tokens"] == 80
    assert s["cost_usd"] == pytest.approx(0.16 * 0.01 + 0.08 * 0.03)
    assert s["records_by_lang"] == {"en": 11, "ko": 11, "zh": 11} and s["source_problems"] >= 1
    rejected = [json.loads(x) for x in g["snapshot"]["rejected.jsonl"].splitlines()]
    assert [r["attempt"] for r in rejected] == [1, 1, 1, 1, 2] and all(r["text"] for r in rejected)
    assert "image_data.json:[8] (id 9): no entry in objects.json" in g["err1"]


def test_rerun_redoes_nothing_accepted_and_retries_up_to_max_attempts(generated):
    g = generated
    assert g["code2"] == 0
    gave_up = {r["key"] for r in lines(g["out"] / "rejected.jsonl")} - {
        json.loads(x)["key"] for x in g["snapshot"]["accepted.jsonl"].splitlines()}
    assert [key for _, key in g["calls2"]] == sorted(gave_up) and len(gave_up) == 1
    accepted = lines(g["out"] / "accepted.jsonl")
    keys = [r["key"] for r in accepted]
    selected = {f"{image}::{task}" for image, _ in json.loads((g["out"] / "run.json").read_text())["selection"]
                for task in TASKS}
    assert sorted(keys) == sorted(selected)  # exactly one accepted record per (image, task)
    assert (g["out"] / "rejected.jsonl").read_text().startswith(g["snapshot"]["rejected.jsonl"])
    assert g["summary2"]["accepted"] == 12 and g["summary2"]["gave_up"] == 0 and g["summary2"]["rejections"] == 5


def test_llava_export(generated):
    out = generated["out"]
    per_lang = {lang: json.loads((out / f"llava_{lang}.json").read_text()) for lang in ("en", "ko", "zh")}
    en = per_lang["en"]
    assert [r["id"] for r in en] == [f"{r['image'].split('/')[-1][:-4]}_{r['task']}_en" for r in en]
    order = [(int(r["id"].split("_")[0]), TASKS.index(r["task"])) for r in en]
    assert order == sorted(order) and len(en) == 12
    for lang, records in per_lang.items():
        for r in records:
            conv = r["conversations"]
            assert r["lang"] == lang and (generated["vg"] / r["image"]).is_file()
            assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
            assert [t["from"] for t in conv] == ["human", "gpt"] * TURNS[r["task"]]
    mixed = json.loads((out / "llava_mixed.json").read_text())
    assert sorted(r["id"] for r in mixed) == sorted(r["id"] for recs in per_lang.values() for r in recs)
    assert [r["id"] for r in mixed] != sorted(r["id"] for r in mixed)  # shuffled
    location = next(r for r in lines(out / "accepted.jsonl") if r["task"] == "location")
    assert location["response"]["scene_graph"]
    assert "<img src=\"../vg/VG_100K" in (out / "review.html").read_text()


def test_review_export_and_import(generated, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(generated["out"], out)
    assert run_cli(["review", "--out", str(out)], capsys)[0] == 0
    with open(out / "review.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0])[:3] == ["key", "label", "note"]
    flagged = [r for r in rows if "proper_noun" in r["flags"]]
    assert len(flagged) == 1 and "Eiffel Tower" in flagged[0]["flags"] and "회색" in flagged[0]["ko"]
    labels = out / "labels.csv"
    labels.write_text(f"key,label,note\n{flagged[0]['key']},error,names a landmark\n{rows[1]['key']},pass,\n"
                      f"{rows[2]['key']},,\n")
    code, stdout, _ = run_cli(["review", "--out", str(out), "--import", str(labels)], capsys)
    summary = json.loads(stdout.splitlines()[-1])
    assert code == 0 and summary["removed_by_review"] == [flagged[0]["key"]]
    assert summary["review_labels"] == {"error": 1, "pass": 1} and summary["records_by_lang"]["ko"] == 11
    image, task = flagged[0]["key"].split("::")
    assert f"{image}_{task}_en" not in {r["id"] for r in json.loads((out / "llava_en.json").read_text())}
    labels.write_text(f"key,label\n{rows[0]['key']},maybe\n")
    code, _, err = run_cli(["review", "--out", str(out), "--import", str(labels)], capsys)
    assert code == 2 and "labels.csv:2: label 'maybe': expected pass or error" in err
    labels.write_text("key,label\nnope::object,pass\n")
    assert "is not an accepted record" in run_cli(["review", "--out", str(out), "--import", str(labels)], capsys)[2]


# ---------------------------------------------------------------- budget, endpoint failures, settings


def test_budget_stops_cleanly_and_a_larger_budget_continues(tmp_path, capsys):
    vg = make_vg(tmp_path / "vg")
    out = tmp_path / "out"
    with ScriptedServer(FakeModel(vg)) as server:
        args = base_args(server, vg, out, "--max-images", "3", "--tasks", "object,location", "--price-in", "1",
                         "--price-out", "0")  # 10 prompt tokens per reply: $0.01 each
        code, stdout, err = run_cli([*args, "--budget-usd", "0.035"], capsys)
        assert code == 3 and "budget of $0.035 reached" in err and "rerun with a larger --budget-usd" in err
        summary = json.loads(stdout.splitlines()[-1])
        assert summary["stopped"] == "budget" and summary["accepted"] == 4 and summary["pending"] == 2
        assert len(json.loads((out / "llava_en.json").read_text())) == 4
        code, stdout, _ = run_cli([*args, "--budget-usd", "0.055"], capsys)
        summary = json.loads(stdout.splitlines()[-1])
        assert code == 0 and summary["accepted"] == 6 and summary["cost_usd"] == pytest.approx(0.06)
        assert len(server.requests) == 6


def test_endpoint_failures_stop_the_run_and_do_not_use_up_attempts(tmp_path, capsys):
    vg = make_vg(tmp_path / "vg")
    out = tmp_path / "out"
    with ScriptedServer(lambda request: status(401)) as server:
        code, _, err = run_cli(base_args(server, vg, out, "--max-images", "3"), capsys)
    assert code == 2 and "8 requests in a row failed" in err and "HTTP 401" in err
    rejected = lines(out / "rejected.jsonl")
    assert len(rejected) == 8 and all(r["reasons"] == ["api_error"] and not r["counts"] for r in rejected)
    with ScriptedServer(FakeModel(vg)) as server:
        code, stdout, _ = run_cli(base_args(server, vg, out, "--max-images", "3", "--max-attempts", "1"), capsys)
    assert code == 0 and json.loads(stdout.splitlines()[-1])["accepted"] == 12
    code, _, err = run_cli(base_args(server, vg, out, "--langs", "en,ko"), capsys)
    assert code == 2 and "started with langs=['en', 'ko', 'zh'], now ['en', 'ko']" in err
    code, _, err = run_cli(base_args(server, vg, tmp_path / "o2", "--langs", "en,fr"), capsys)
    assert code == 2 and "languages fr: choose from en,ko,zh" in err


def test_a_short_run_whose_requests_all_fail_is_not_a_success(tmp_path, capsys):
    vg = make_vg(tmp_path / "vg")
    with ScriptedServer(lambda request: status(401)) as server:
        code, stdout, err = run_cli(base_args(server, vg, tmp_path / "out", "--max-images", "1", "--tasks", "object"),
                                    capsys)
    assert code == 2 and json.loads(stdout.splitlines()[-1])["pending"] == 1
    assert err.strip().splitlines()[-1].startswith("xllava: error: 1 of 1 requests failed at the endpoint")


def test_image_folder_run_with_two_languages(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    listing = []
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 10, 10)).save(images / "sub" / f"p{i}.jpg")
        listing.append(json.dumps({"image": f"sub/p{i}.jpg", "id": f"p{i}", "objects": ["kite", "sky", "cloud"]}))
    (tmp_path / "objects.jsonl").write_text("\n".join([listing[0], "[1, 2]", *listing[1:]]) + "\n")
    with ScriptedServer(FakeModel(images)) as server:
        code, stdout, err = run_cli(["run", "--images", str(images), "--objects", str(tmp_path / "objects.jsonl"),
                                     "--out", str(tmp_path / "out"), "--api-base", server.url, "--model", "m",
                                     "--langs", "en,ko", "--tasks", "atmosphere", "--concurrency", "3"], capsys)
        assert all("Chinese" not in r["messages"][-1]["content"][-1]["text"] for r in server.requests)
        assert {h["Authorization"] for h in server.headers} == {"Bearer sk-test-secret"}
    assert not any("sk-test" in p.read_text() for p in (tmp_path / "out").iterdir())
    assert code == 0 and "objects.jsonl:line 2" in err
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["records_by_lang"] == {"en": 3, "ko": 3} and summary["source_problems"] == 1
    assert not (tmp_path / "out" / "llava_zh.json").exists()
    assert [r["image"] for r in json.loads((tmp_path / "out" / "llava_ko.json").read_text())] == [
        "sub/p0.jpg", "sub/p1.jpg", "sub/p2.jpg"]


# ---------------------------------------------------------------- killed and interrupted runs


def _start(server: ScriptedServer, vg: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "xllava_jax.cli", "datagen", *base_args(server, vg, out, "--max-images", "3",
                                                                          "--concurrency", "2", *extra)]
    # The child gets the default SIGINT disposition whatever the test process holds (a child started while
    # SIGINT is ignored would inherit that, and Python would then never raise KeyboardInterrupt in it).
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while len(lines(path)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_one_record_per_item(tmp_path, capsys):
    vg = make_vg(tmp_path / "vg")
    out = tmp_path / "out"
    first = {f"{i}::object" for i in (1, 4, 5, 7, 8)}  # every image's first object reply lacks Korean
    model = FakeModel(vg, delay_s=0.15, bad_first=first)
    with ScriptedServer(model) as server:
        proc = _start(server, vg, out)
        _wait_for_lines(out / "accepted.jsonl", 5, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before_accepted = [r["key"] for r in lines(out / "accepted.jsonl")]
        before_rejected = (out / "rejected.jsonl").read_text()
        assert before_rejected and len(before_accepted) < 12
        with open(out / "accepted.jsonl", "a") as f:
            f.write('{"key": "7::atmos')  # as if the kill had cut a write short
        n_calls = len(model.calls)
        model.delay_s = 0.0
        code, _, err = run_cli(base_args(server, vg, out, "--max-images", "3", "--concurrency", "2"), capsys)
    assert code == 0 and "dropped an unterminated last line" in err
    asked_again = {key for _, key in model.calls[n_calls:]}
    assert not asked_again & set(before_accepted)
    keys = [r["key"] for r in lines(out / "accepted.jsonl")]
    selected = {f"{image}::{task}" for image, _ in json.loads((out / "run.json").read_text())["selection"]
                for task in TASKS}
    assert sorted(keys) == sorted(selected)
    assert (out / "rejected.jsonl").read_text().startswith(before_rejected)
    assert all(r["reasons"] == ["missing_language:ko"] for r in lines(out / "rejected.jsonl"))


@pytest.mark.slow
def test_ctrl_c_saves_what_was_accepted_and_exits_130(tmp_path):
    vg = make_vg(tmp_path / "vg")
    out = tmp_path / "out"
    # 1 s per reply (within a 10 s timeout): after the second accepted record ~5 s of work remain, so the
    # signal lands mid-run even on a loaded machine
    with ScriptedServer(FakeModel(vg, delay_s=1.0)) as server:
        proc = _start(server, vg, out, "--timeout", "10")
        _wait_for_lines(out / "accepted.jsonl", 2, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    saved = len(lines(out / "accepted.jsonl"))
    assert proc.returncode == 130
    assert f"xllava: interrupted: {saved} accepted records saved ({saved} this run)" in err
    assert (out / "accepted.jsonl").read_text().endswith("\n") and saved < 12
    assert not (out / "summary.json").exists()
