"""`xllava eval preference` against a scripted judge: both-order logic, the paper's one order, truncation,
failures and missing answers reported, outputs (JSONL, JSON, PNG)."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from tests.chat_server import Reply, ScriptedServer, status
from xllava_jax.cli import main
from xllava_jax.eval.preference import pair_outcome, parse_verdict, truncate_words

# question_id -> (answer of model A, answer of model B)
PAIRS = {1: ("good answer about a red cube", "bad answer"), 2: ("bad answer", "good answer 좋은 대답"),
         3: ("plain one", "plain two"), 4: ("good but lonely", None), 5: (None, "no A for this one")}


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "images").mkdir()
    for q in PAIRS:
        Image.new("RGB", (2, 2), (q, q, q)).save(tmp_path / "images" / f"{q}.png")
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": q, "image": f"{q}.png", "text": f"Question {q}?"} for q in PAIRS])
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": q, "text": pa, "model_id": "x-llava"}
                                            for q, (pa, _) in PAIRS.items() if pa])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"question_id": q, "text": pb, "model_id": "llava-1.5"}
                                            for q, (_, pb) in PAIRS.items() if pb])
    return {"questions": questions, "a": a, "b": b, "images": str(tmp_path / "images"), "tmp": tmp_path}


def _shown(request: dict) -> tuple[str, str]:
    text = request["messages"][1]["content"][-1]["text"]
    first = re.search(r"\[Answer A\]\n(.*)\n\[End of Answer A\]", text, re.S).group(1)
    second = re.search(r"\[Answer B\]\n(.*)\n\[End of Answer B\]", text, re.S).group(1)
    return first, second


def consistent_judge(request: dict) -> str:
    """Prefers the answer that says 'good', whichever position it is shown in."""
    first, second = _shown(request)
    if "good" in first and "good" not in second:
        return "A"
    if "good" in second and "good" not in first:
        return "**Answer B**\nIt is more helpful."
    return "Similar."


def _run(files, server, out, *extra) -> tuple[int, dict]:
    argv = ["eval", "preference", "--questions", files["questions"], "--answers-a", files["a"], "--answers-b",
            files["b"], "--api-base", server.url, "--judge-model", "judge-v", "--api-key-env", "XLLAVA_NO_KEY",
            "--cache-dir", str(files["tmp"] / "cache"), "--out", str(out), "--concurrency", "3", *extra]
    return main(argv), json.loads((out / "preference.json").read_text())


def test_parse_verdict_and_rules():
    for reply, want in (("A", "A"), ("**B**", "B"), ("Answer A\nbecause", "A"), ("Verdict: B", "B"),
                        ("A is better.", "A"), ("similar", "similar"), ("Similar.", "similar"), ("Tie", "similar"),
                        ("B가 더 낫습니다", "B"), ("비슷합니다", "similar")):
        assert parse_verdict(reply) == want, reply
    for reply in ("", "I think A", "A and B", "Answer C", "both are bad"):
        assert parse_verdict(reply) is None, reply
    assert pair_outcome(["A", "A"]) == "win" and pair_outcome(["B", "B"]) == "loss"
    assert pair_outcome(["A", "B"]) == "tie" and pair_outcome(["A", "similar"]) == "tie"
    assert pair_outcome(["A", None]) == "failed" and pair_outcome(["B"]) == "loss"
    assert truncate_words("하나 둘  셋\n넷 다섯", 3) == "하나 둘 셋" and truncate_words("a  b\nc", 3) == "a  b\nc"


def test_position_biased_judge_gives_only_ties(files, capsys):
    with ScriptedServer(lambda request: "A") as server:
        code, summary = _run(files, server, files["tmp"] / "biased")
    assert code == 0 and len(server.requests) == 6  # 3 pairs x 2 orders
    assert (summary["win"], summary["tie"], summary["loss"], summary["tie_pct"]) == (0, 3, 0, 100.0)
    assert summary["missing_in_a"] == ["5"] and summary["missing_in_b"] == ["4"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_consistent_judge_wins_losses_and_outputs(files, capsys):
    with ScriptedServer(consistent_judge) as server:
        code, summary = _run(files, server, files["tmp"] / "out", "--image-root", files["images"])
    assert code == 0
    assert (summary["win"], summary["tie"], summary["loss"]) == (1, 1, 1)
    assert (summary["win_pct"], summary["loss_pct"]) == (33.3, 33.3)
    assert (summary["name_a"], summary["name_b"]) == ("x-llava", "llava-1.5")
    assert (summary["judged"], summary["failed"]) == (3, 0)
    assert summary["settings"]["orders"] == ["ab", "ba"] and summary["usage"]["requests"] == 6
    image_urls = [r["messages"][1]["content"][0]["image_url"]["url"] for r in server.requests]
    assert all(u.startswith("data:image/png;base64,") for u in image_urls)
    lines = [json.loads(line) for line in (files["tmp"] / "out" / "judgements.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["final"]) for r in lines] == [(1, "win"), (2, "loss"), (3, "tie")]
    assert lines[0]["verdicts"]["ba"] == {"label": "B", "side": "A", "reply": "**Answer B**\nIt is more helpful.",
                                          "error": None}
    assert (files["tmp"] / "out" / "preference.png").read_bytes().startswith(b"\x89PNG")
    assert "1 question(s) unanswered in --answers-a" in capsys.readouterr().err


def test_one_order_reproduces_paper_bias(files):
    with ScriptedServer(lambda request: "A") as server:
        _, summary = _run(files, server, files["tmp"] / "paper", "--one-order", "--name-a", "X", "--name-b", "Y")
    assert len(server.requests) == 3 and summary["win_pct"] == 100.0 and summary["settings"]["orders"] == ["ab"]
    assert (summary["name_a"], summary["name_b"]) == ("X", "Y")


def test_truncation_and_unreadable_verdicts(files):
    def responder(request: dict) -> str:
        first, second = _shown(request)
        return "I cannot decide." if "plain" in first else consistent_judge(request)

    with ScriptedServer(responder) as server:
        _, summary = _run(files, server, files["tmp"] / "cut", "--truncate-words", "2")
    shown = {text for r in server.requests for text in _shown(r)}
    assert shown == {"good answer", "bad answer", "plain one", "plain two"}
    assert summary["failed"] == 1 and summary["failed_ids"] == [3] and summary["judged"] == 2
    assert summary["settings"]["truncate_words"] == 2 and (summary["win"], summary["loss"]) == (1, 1)


def test_bad_answers_line_exits_2(files, capsys):
    with open(files["a"], "a") as f:
        f.write('{"question_id": 9}\n')
    assert main(["eval", "preference", "--questions", files["questions"], "--answers-a", files["a"], "--answers-b",
                 files["b"], "--api-base", "http://127.0.0.1:9/v1", "--judge-model", "j",
                 "--out", str(files["tmp"] / "x")]) == 2
    assert "a.jsonl:5: answers line has no string 'text'" in capsys.readouterr().err


def test_failed_judge_calls_are_failed_pairs_not_ties(files, capsys):
    def responder(request: dict):
        first, second = _shown(request)
        if "plain" in first and second == "plain two":
            return status(500)  # pair 3 shown A first: fails on every attempt
        if "bad answer" in (first, second) and "good answer 좋은 대답" in (first, second):
            return Reply(body="upstream timeout")  # pair 2, both orders: a malformed 200 every time
        return consistent_judge(request)

    with ScriptedServer(responder) as server:
        code, summary = _run(files, server, files["tmp"] / "failed", "--max-retries", "1", "--backoff", "0.01",
                             "--timeout", "5")
    err = capsys.readouterr().err
    assert code == 3 and (summary["win"], summary["tie"], summary["loss"], summary["failed"]) == (1, 0, 0, 2)
    assert summary["failed_ids"] == [2, 3] and summary["judged"] == 1 and summary["win_pct"] == 100.0
    assert len(server.requests) == 2 + 4 + 3  # pair 1: two orders; pair 2: 2 x 2 attempts; pair 3: 2 + 1
    lines = {r["question_id"]: r for r in map(json.loads, (files["tmp"] / "failed" / "judgements.jsonl")
                                              .read_text().splitlines())}
    assert lines[3]["final"] == "failed" and "HTTP 500" in lines[3]["verdicts"]["ab"]["error"]
    assert lines[3]["verdicts"]["ba"]["error"] is None and "malformed" in lines[2]["verdicts"]["ba"]["error"]
    assert "2 question(s) whose judging failed, not scored: 2, 3; the first: " in err
