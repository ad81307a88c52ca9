"""`xllava eval run`: prompts, answers equal to direct Generator runs, resume, rotation, sharding, errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from infer_fixtures import make_checkpoint, make_image

import xllava_jax
from xllava_jax.cli import main
from xllava_jax.data import conversation as conv
from xllava_jax.data.synth_phrases import SHORT_ANSWER_EN, SHORT_ANSWER_KO
from xllava_jax.errors import UserError
from xllava_jax.eval.questions import read_questions
from xllava_jax.eval.runner import AnswerFileError, RunOptions, local_mesh, run_eval, shard_batches
from xllava_jax.infer.engine import Engine
from xllava_jax.infer.generate import Generator

NEW = 6
LINES = [
    {"question_id": 1, "image": "a.png", "text": "What colour is the shape?", "label": "red", "kind": "colour"},
    {"question_id": "q2", "text": "how many circles are there", "label": "2"},
    {"question_id": 3, "image": "b.png", "text": "무슨 색인가요?", "lang": "ko", "label": "빨간색"},
    {"question_id": 4, "image": "c.png", "text": f"what shape is left\n{SHORT_ANSWER_EN}", "label": "circle"},
    {"question_id": 5, "text": "왼쪽 위 모양은?", "lang": "ko", "label": "원"},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(checkpoint, image root, question JSONL) for LINES."""
    root = tmp_path_factory.mktemp("evalrun")
    images = root / "images"
    for i, name in enumerate("abc"):
        make_image(images / f"{name}.png", seed=i)
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in LINES))
    return make_checkpoint(root / "ckpt"), images, questions


@pytest.fixture(scope="module")
def engine(data):
    """A one-device engine shared by the tests (its compiled programs too)."""
    return Engine.load(data[0], mesh=local_mesh(1))


def options(fixture, out: Path, **kw) -> RunOptions:
    ckpt, images, questions = fixture
    return RunOptions(**{"benchmark": "bokvqa_en", "ckpt": ckpt, "data": questions, "image_root": images, "out": out,
                         "batch_size": 4, "max_new_tokens": NEW, **kw})


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(data, engine, tmp_path_factory):
    """(summary, answer lines) of one run over LINES (two batches, the last one short)."""
    out = tmp_path_factory.mktemp("first")
    summary = run_eval(options(data, out), engine=engine)
    return summary, read_lines(out / "answers.jsonl")


def test_answers_equal_direct_generator_runs(data, engine, first_run):
    ckpt, images, _ = data
    summary, lines = first_run
    assert summary["questions"] == 5 and summary["answered_now"] == 5 and summary["skipped"] == 0
    generator = Generator(xllava_jax.load_pretrained(ckpt))
    tok, cfg = engine.tokenizer, engine.cfg
    config = engine.generation_config(max_new_tokens=NEW)
    for question, answer in zip(LINES, lines, strict=True):
        suffix = SHORT_ANSWER_KO if question.get("lang") == "ko" else SHORT_ANSWER_EN
        text = question["text"] if question["text"].endswith(suffix) else f"{question['text']}\n{suffix}"
        assert answer["prompt"] == text
        image = question.get("image")
        pieces = conv.render("llava_llama_2", [("human", f"<image>\n{text}" if image else text)], generation=True)
        ids = conv.encode(pieces, tok, num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id)
        pixels = np.zeros((1, 1, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
        if image:  # one image slot per row (zeros, never read, for a text-only row): one program per bucket
            pixels[0, 0] = engine.load_image(images / image)
        tokens = generator.generate([ids.input_ids], pixels, config).tokens[0]
        assert answer["text"] == tok.decode(tokens).strip()
        assert answer["question_id"] == question["question_id"]
        assert {k: answer[k] for k in question if k != "text"} == {k: v for k, v in question.items() if k != "text"}
        assert answer["model_id"] == "ckpt" and len(answer["answer_id"]) == 22
        assert answer["metadata"]["max_new_tokens"] == NEW
    assert len({line["answer_id"] for line in lines}) == 5


def test_rerun_skips_answered_and_redoes_a_cut_short_last_line(data, engine, first_run, tmp_path):
    path = tmp_path / "answers.jsonl"
    raw = [json.dumps(line, ensure_ascii=False) for line in first_run[1]]
    path.write_text("\n".join(raw[:3]) + "\n" + raw[4][:25])  # 4 is missing, 5 cut short by a "crash"
    summary = run_eval(options(data, tmp_path), engine=engine)
    assert summary["answered_now"] == 2 and summary["skipped"] == 3
    lines = read_lines(path)
    assert [line["question_id"] for line in lines] == [1, "q2", 3, 4, 5]
    assert [line["text"] for line in lines] == [line["text"] for line in first_run[1]]
    assert run_eval(options(data, tmp_path), engine=engine)["answered_now"] == 0
    path.write_text("\n".join([raw[0], "{oops", raw[1]]) + "\n")
    with pytest.raises(AnswerFileError, match=r"answers.jsonl:2"):
        run_eval(options(data, tmp_path), engine=engine)


def test_eight_devices_and_two_processes_match_one_device(data, first_run, tmp_path):
    """The batch split over 8 devices gives the one-device answers; so do two process shares, merged."""
    assert shard_batches(list(range(7)), 2, 0, 2) == [[0, 1], [4, 5]]
    assert shard_batches(list(range(7)), 2, 1, 2) == [[2, 3], [6]]
    want = {str(line["question_id"]): line["text"] for line in first_run[1]}
    wide = Engine.load(data[0], mesh=local_mesh(8))
    run_eval(options(data, tmp_path / "wide", batch_size=8), engine=wide)
    assert {str(line["question_id"]): line["text"] for line in read_lines(tmp_path / "wide/answers.jsonl")} == want
    ids = wide.prompt_ids([("human", f"{LINES[1]['text']}\n{SHORT_ANSWER_EN}")], with_image=False)
    assert "".join(wide.stream(ids, None, wide.generation_config(max_new_tokens=NEW))) == want["q2"]
    out = tmp_path / "procs"
    second = run_eval(options(data, out, batch_size=8), engine=wide, process=(1, 2))
    assert second["answered_now"] == 0  # one batch of 8 holds everything: process 1 has none
    part = run_eval(options(data, out, batch_size=2), engine=wide, process=(1, 2))
    assert part["answered_now"] == 2 and part["answers"].endswith("answers.part1.jsonl")
    merged = run_eval(options(data, out, batch_size=2), engine=wide, process=(0, 2))
    assert merged["answered_now"] == 3 and merged["answers"].endswith("answers.jsonl")
    lines = read_lines(out / "answers.jsonl")
    assert [line["question_id"] for line in lines] == [q["question_id"] for q in LINES]
    assert {str(line["question_id"]): line["text"] for line in lines} == want
    assert not list(out.glob("answers.part*"))


def mmbench_tsv(path: Path, image: Path) -> Path:
    encoded = base64.b64encode(image.read_bytes()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
            ["10", "Which shape?", "nan", "circle", "square", "triangle", "star", "C", "shape", encoded],
            ["11", "What colour?", "Look closely.", "red", "blue", "green", "", "A", "colour", encoded]]
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    return path


def test_multiple_choice_rotation_writes_the_gold_letter_of_each_round(data, engine, tmp_path):
    tsv = mmbench_tsv(tmp_path / "kmmb.tsv", data[1] / "a.png")
    summary = run_eval(options(data, tmp_path / "out", benchmark="kmmbench", data=tsv, image_root=None,
                               all_rounds=True), engine=engine)
    assert summary["questions"] == 7
    lines = read_lines(tmp_path / "out/answers.jsonl")
    gold = {10: "triangle", 11: "red"}
    assert [(line["question_id"], line["round_id"]) for line in lines] == [(10, r) for r in range(4)] + \
        [(11, r) for r in range(3)]
    for line in lines:
        shown = line["options"]
        assert line["options"][ord(line["answer"]) - ord("A")] == gold[line["question_id"]]
        assert line["option_char"] == list("ABCD"[:len(shown)]) and line["category"] in ("shape", "colour")
        assert line["prompt"].endswith("\n".join(f"{c}. {o}" for c, o in zip("ABCD", shown)) +
                                       "\n주어진 선택지 중 해당 옵션의 문자로 직접 답하세요.")
    assert lines[1]["options"] == ["square", "triangle", "star", "circle"] and lines[1]["answer"] == "B"
    assert lines[4]["prompt"].startswith("Look closely.\nWhat colour?\nA. red")
    single = read_questions(tsv, "mmbench")
    assert [q.fields["round_id"] for q in single] == [0, 0]
    assert single[0].prompt.endswith("Answer with the option's letter from the given choices directly.")


def test_vqav2_and_gqa_question_files(tmp_path):
    (tmp_path / "COCO_test2015_000000000042.jpg").write_bytes(b"x")
    (tmp_path / "n123.jpg").write_bytes(b"x")
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps({"data_subtype": "test-dev2015",
                               "questions": [{"question_id": 420, "image_id": 42, "question": "Is it red?"}]}))
    [q] = read_questions(vqa, "vqav2")
    assert q.image == tmp_path / "COCO_test2015_000000000042.jpg" and q.fields == {"image_id": 42}
    assert q.prompt == f"Is it red?\n{SHORT_ANSWER_EN}"
    gqa = tmp_path / "gqa.json"
    gqa.write_text(json.dumps({"201": {"imageId": "n123", "question": "Left?", "answer": "no", "types": {}}}))
    [q] = read_questions(gqa, "gqa", lang="ko")
    assert q.question_id == "201" and q.fields == {"imageId": "n123", "answer": "no"}
    assert q.prompt == f"Left?\n{SHORT_ANSWER_KO}"
    [q] = read_questions(gqa, "kvqa")
    assert q.prompt.endswith(SHORT_ANSWER_KO)
    with pytest.raises(UserError, match="duplicate question_id"):
        (tmp_path / "dup.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"question_id": "1", "text": "b"}\n')
        read_questions(tmp_path / "dup.jsonl", "pope")


@pytest.mark.parametrize("bad, problem", [
    ('{"question_id": 2, "text": "b"', "dup.jsonl:2: not valid JSON"),
    ('{"question_id": 2, "image": "../a.png", "text": "b"}', "dup.jsonl:2: image path '../a.png' climbs out"),
    ('{"question_id": 2, "image": "nope.png", "text": "b"}', "dup.jsonl:2: image 'nope.png' not found"),
    ('{"question_id": 2}', "dup.jsonl:2: missing key"),
])
def test_bad_question_lines_exit_2_naming_the_line(data, tmp_path, capsys, bad, problem):
    file = tmp_path / "dup.jsonl"
    file.write_text('{"question_id": 1, "text": "a"}\n' + bad + "\n")
    code = main(["eval", "run", "--benchmark", "pope", "--ckpt", str(data[0]), "--data", str(file),
                 "--image-root", str(data[1]), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xllava: error: ") and problem in err[0]


def test_command_line_prints_the_summary_last(data, tmp_path, capsys):
    ckpt, images, questions = data
    code = main(["eval", "run", "--benchmark", "koliv", "--ckpt", str(ckpt), "--data", str(questions),
                 "--image-root", str(images), "--out", str(tmp_path), "--limit", "2", "--max-new-tokens", "3",
                 "--batch-size", "2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["questions"] == 2 and summary["answered_now"] == 2
    lines = read_lines(Path(summary["answers"]))
    assert lines[0]["prompt"] == f"{LINES[0]['text']}\n{SHORT_ANSWER_KO}"  # koliv defaults to Korean
