"""`xllava datagen translate` against a real chat-completions server on 127.0.0.1 with scripted replies."""

from __future__ import annotations

import json
import threading

from chat_server import Reply, ScriptedServer, status

from xllava_jax.cli import main
from xllava_jax.datagen.translate import check_translation, split_image_tag

KO = {"What is in the picture?": "사진에 무엇이 있나요?", "A cat on a sofa.": "소파 위에 고양이가 있습니다.",
      "What colour is it?": "무슨 색인가요?", "It is black.": "검은색입니다.",
      "Describe the image briefly.": "이미지를 간단히 설명하세요.",
      "Two dogs play in a park.": "공원에서 개 두 마리가 놉니다.",
      "Hello there": "안녕하세요", "Hi! How can I help?": "안녕하세요! 무엇을 도와드릴까요?",
      "Is it day?": "낮인가요?", "Yes.": "네."}
SOURCE = [
    {"id": "000001", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat on a sofa."},
        {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "It is black."}]},
    {"id": "000002", "image": "coco/2.jpg", "conversations": [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": "Two dogs play in a park."}]},
    {"id": "t3", "conversations": [{"from": "human", "value": "Hello there"},
                                   {"from": "gpt", "value": "Hi! How can I help?"}]},
    {"id": "000001", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\n\nIs it day?"}, {"from": "gpt", "value": "Yes."}]},
    {"id": "mid", "image": "coco/3.jpg", "conversations": [
        {"from": "human", "value": "Look at <image> and say"}, {"from": "gpt", "value": "ok"}]},
    {"id": "bad", "conversations": []},
]


class Translator:
    """Translates the texts of a request with KO; `plan` gives replies (or functions of the texts) first."""

    def __init__(self, plan=()):
        self.plan = list(plan)
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, request: dict) -> Reply | str:
        text = request["messages"][-1]["content"][-1]["text"]
        texts = json.loads(text.split("as a JSON list:\n", 1)[1])
        with self.lock:
            self.calls.append(texts)
            step = self.plan.pop(0) if self.plan else None
        if isinstance(step, Reply):
            return step
        if step is not None:
            return step(texts)
        return json.dumps({"turns": [KO[t] for t in texts]}, ensure_ascii=False)


def args(server, src, out, *extra):
    return ["datagen", "translate", "--src", str(src), "--out", str(out), "--api-base", server.url, "--model", "m",
            "--concurrency", "1", "--backoff", "0.01", *extra]


def test_split_image_tag_round_trips():
    for value in ["<image>\nWhat?", "What?\n<image>", " <image>\n\nQ  ", "<image>", "plain ", ""]:
        pre, text, post = split_image_tag(value)
        assert pre + text + post == value and "<image>" not in text and text == text.strip()
    assert split_image_tag("a <image> b") is None and split_image_tag("<image> a <image>") is None
    ok = check_translation('{"turns": ["하나", "둘"]}', ["one", "two"], target="ko", min_script_share=0.5)
    assert ok.ok and ok.parsed == {"turns": ["하나", "둘"]}
    assert check_translation('["하나"]', ["one"], target="ko", min_script_share=0.5).ok
    assert check_translation('{"turns": ["1", "2"]}', ["1", "2"], target="ko", min_script_share=0.5).ok


def test_translate_validates_preserves_image_tags_and_resumes(tmp_path, capsys):
    src, out = tmp_path / "llava.json", tmp_path / "out"
    src.write_text(json.dumps(SOURCE))
    plan = [lambda texts: json.dumps({"turns": [KO[t] for t in texts[:-1]]}, ensure_ascii=False),  # turn_count
            status(500), None,  # record 1: a server error retried by the client, then accepted
            lambda texts: json.dumps({"turns": texts}), None,  # record 2: English back (wrong_script:ko)
            None,  # record 3
            Reply(content="oops"), Reply(content='{"turns": ["<image> 낮인가요?", "네."]}')]  # record 4 gives up
    model = Translator(plan)
    with ScriptedServer(model) as server:
        code = main(args(server, src, out))
        stdout, err = capsys.readouterr()
        summary = json.loads(stdout.splitlines()[-1])
        assert code == 0 and "llava.json:[4] (id mid): <image> inside a text" in err
        assert "llava.json:[5] (id bad): no conversations" in err
        assert summary["records"] == 4 and summary["source_problems"] == 2 and summary["translated"] == 3
        assert summary["gave_up"] == 1 and summary["rejections_by_reason"] == {
            "turn_count": 1, "wrong_script:ko": 1, "invalid_json": 1, "bad_shape": 1}
        assert model.calls[0] == ["What is in the picture?", "A cat on a sofa.", "What colour is it?", "It is black."]
        records = json.loads((out / "translated_ko.json").read_text())
        assert [r["id"] for r in records] == ["000001", "000002", "t3"]
        assert records[0]["image"] == "coco/1.jpg" and "image" not in records[2]
        assert [t["value"] for t in records[0]["conversations"]] == [
            "<image>\n사진에 무엇이 있나요?", "소파 위에 고양이가 있습니다.", "무슨 색인가요?", "검은색입니다."]
        assert records[1]["conversations"][0]["value"] == "이미지를 간단히 설명하세요.\n<image>"
        assert all(r["lang"] == "ko" and [t["from"] for t in r["conversations"]][:2] == ["human", "gpt"]
                   for r in records)

        with open(out / "accepted.jsonl", "a") as f:
            f.write('{"key": "000001#2", "val')  # a torn write
        n = len(model.calls)
        code = main(args(server, src, out, "--max-attempts", "3"))
        stdout, err = capsys.readouterr()
        assert code == 0 and "dropped an unterminated last line" in err
        assert model.calls[n:] == [["Is it day?", "Yes."]]  # only the record that had given up
        records = json.loads((out / "translated_ko.json").read_text())
        assert [r["id"] for r in records] == ["000001", "000002", "t3", "000001"]
        assert records[3]["conversations"][0]["value"] == "<image>\n\n낮인가요?"
        assert json.loads(stdout.splitlines()[-1])["translated"] == 4

        n = len(model.calls)
        assert main(args(server, src, out)) == 0 and len(model.calls) == n  # nothing left to do
        capsys.readouterr()
        assert main(args(server, src, out, "--target", "zh")) == 2
        assert "use the same --src" in capsys.readouterr().err


def test_translate_budget_and_unknown_language(tmp_path, capsys):
    src, out = tmp_path / "llava.json", tmp_path / "out"
    src.write_text(json.dumps(SOURCE))
    with ScriptedServer(Translator()) as server:
        code = main(args(server, src, out, "--price-in", "1", "--price-out", "0", "--budget-usd", "0.015"))
        stdout, err = capsys.readouterr()
        assert code == 3 and "budget of $0.015 reached" in err
        assert json.loads(stdout.splitlines()[-1])["translated"] == 2 and len(server.requests) == 2
        assert main(args(server, src, tmp_path / "o2", "--target", "fr")) == 2
        assert "languages fr" in capsys.readouterr().err



def test_unreadable_source_fails_loudly(tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedServer(Translator()) as server:
        for name, text, why in (("broken.json", '[{"id": "1", "conversations": [', "invalid JSON"),
                                ("empty.jsonl", "\n", "no records"),
                                ("bad.jsonl", '{"id": "x", "conversations": []}\n', "no conversations")):
            src = tmp_path / name
            src.write_text(text)
            code = main(args(server, src, out))
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and err[-1].startswith(f"xllava: error: {src}: no record to translate"), err
            assert why in err[-1] and len(err) == 1, err
            assert not (out / "translated_ko.json").exists()
    assert not server.requests


def test_endpoint_down_fails_loudly(tmp_path, capsys):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(SOURCE[:3]))
    with ScriptedServer(Translator()) as server:
        url = server.url  # closed on leaving: connection refused
    code = main(["datagen", "translate", "--src", str(src), "--out", str(tmp_path / "out"), "--api-base", url,
                 "--model", "m", "--max-retries", "0", "--timeout", "2"])
    stdout, err = capsys.readouterr()
    assert code == 2 and json.loads(stdout.splitlines()[-1])["translated"] == 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("xllava: error: 3 of 3 requests failed at the endpoint") and "connection failed" in last
