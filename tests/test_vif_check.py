"""Every kind of bad VIF record is reported with file, line or id, and reason; nothing is lost."""

import json
import os

import pytest
from PIL import Image

from xllava_jax.data.vif import check_corpus, read_corpus


def conv(q="<image>\nWhat is it?", a="A cat."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 6), "red").save(root / "ok.png")
    data = (root / "ok.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    lines = [
        json.dumps({"id": "good", "image": "ok.png", "conversations": conv()}),
        json.dumps({"id": "text-only", "conversations": conv("Hello?", "Hi.")}),
        "{broken json",
        json.dumps({"id": "roles", "image": "ok.png", "conversations": [conv()[1], conv()[0]]}),
        json.dumps({"id": "empty", "image": "ok.png", "conversations": conv(a="  ")}),
        json.dumps({"id": "no-image", "conversations": conv()}),
        json.dumps({"id": "no-tag", "image": "ok.png", "conversations": conv("What is it?")}),
        json.dumps({"id": "missing", "image": "nope.png", "conversations": conv()}),
        json.dumps({"id": "truncated", "image": "truncated.png", "conversations": conv()}),
        json.dumps({"id": "garbage", "image": "garbage.jpg", "conversations": conv()}),
        json.dumps({"id": "dotdot", "image": "../outside.png", "conversations": conv()}),
        json.dumps({"id": "absolute", "image": str(tmp_path / "outside.png"), "conversations": conv()}),
        json.dumps({"id": "symlink", "image": "link.png", "conversations": conv()}),
    ]
    body = "\n".join(lines).encode() + b"\n" + b'{"id": "utf8", "conversations": []}\xff\xfe\n'
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(body)
    return path, root


def test_every_problem_is_reported(corpus):
    path, root = corpus
    report = check_corpus(path, root)
    assert report.records == 2
    by_id = {p.id or p.where: p for p in report.problems}
    expected = {
        "line 3": "invalid JSON", "roles": "not an answer", "empty": "is empty",
        "no-image": "<image> without an image", "no-tag": "an image without <image>",
        "missing": "not found", "truncated": "image truncated.png", "garbage": "image garbage.jpg",
        "dotdot": "climbs out", "absolute": "not relative", "symlink": "outside the image root",
        "line 14": "invalid UTF-8",
    }
    assert set(by_id) == set(expected)
    for key, fragment in expected.items():
        assert fragment in by_id[key].reason, (key, by_id[key].reason)
        assert str(path) in str(by_id[key])
    assert report.records + len(report.problems) == 14  # nothing silently dropped


def test_json_list_and_whole_file_errors(tmp_path):
    good = [{"id": i, "conversations": conv("q", "a")} for i in range(3)] + [{"id": 9, "conversations": "x"}]
    (tmp_path / "list.json").write_text(json.dumps(good))
    items = list(read_corpus(tmp_path / "list.json"))
    assert [type(i).__name__ for i in items] == ["VifRecord"] * 3 + ["Problem"]
    assert items[3].where == "[3]" and items[3].id == "9"
    (tmp_path / "bad.json").write_text("[{\"id\": 1,\n oops]")
    (problem,) = list(read_corpus(tmp_path / "bad.json"))
    assert "line 2" == problem.where and "invalid JSON" in problem.reason
    with pytest.raises(FileNotFoundError, match="cannot read corpus"):
        list(read_corpus(tmp_path / "missing.json"))
