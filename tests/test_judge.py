"""The LLaVA-Bench / K-LLaVA-W judge against a scripted judge server: relative scores, retries, failures."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re

import pytest
from PIL import Image

from tests.chat_server import Reply, ScriptedServer, status
from xllava_jax.api.client import ApiError
from xllava_jax.errors import UserError
from xllava_jax.eval.cli import judge_llava_bench
from xllava_jax.eval.judge import parse_score_pair

# question_id -> (category, reference score, our score) the scripted judge gives
PLAN = {1: ("conv", 8, 6), 2: ("conv", 10, 10), 3: ("detail", 5, 4), 4: ("complex", 9, 3), 5: ("complex", 7, 7)}


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def bench(tmp_path):
    """questions (+ one unanswered), reference answers, our answers, captions and images."""
    (tmp_path / "images").mkdir()
    questions = [{"question_id": q, "image": f"{q:03d}.png", "text": f"What is in picture {q}?", "category": cat}
                 for q, (cat, _, _) in PLAN.items()]
    questions.append({"question_id": 6, "image": "006.png", "text": "Unanswered?", "category": "conv"})
    for q in [*PLAN, 6]:
        Image.new("RGB", (3, 3), (q * 40, 0, 0)).save(tmp_path / "images" / f"{q:03d}.png")
    return argparse.Namespace(
        benchmark="llava_bench",
        questions=_write_jsonl(tmp_path / "questions.jsonl", questions),
        annotations=[_write_jsonl(tmp_path / "refs.jsonl", [
            {"question_id": q, "text": f"REF{q} score={ref}"} for q, (_, ref, _) in PLAN.items()] +
            [{"question_id": 6, "text": "REF6"}])],
        answers=_write_jsonl(tmp_path / "answers.jsonl", [
            {"question_id": q, "text": f"OURS{q} score={ours}", "model_id": "xllava-test", "answer_id": f"a{q}"}
            for q, (_, _, ours) in PLAN.items()]),
        context=_write_jsonl(tmp_path / "context.jsonl", [
            {"image": f"{q:03d}.png", "caption": [f"A caption of {q}.", "Second line."]} for q in [*PLAN, 6]]),
        image_root=None, api_base=None, judge_model="judge-4", api_key_env="XLLAVA_NO_KEY",
        cache_dir=str(tmp_path / "cache"), out=None)


def _user_text(request: dict) -> str:
    content = request["messages"][1]["content"]
    return next(p["text"] for p in content if p["type"] == "text")


def _scores_from_prompt(request: dict) -> str:
    text = _user_text(request)
    ref, ours = re.findall(r"score=(\d+)", text)
    return f"{ref} {ours}\nAssistant 1 is more detailed."


def test_parse_score_pair_formats():
    assert parse_score_pair("8 9\nbecause") == (8.0, 9.0)
    assert parse_score_pair("\n  8, 9  \nx") == (8.0, 9.0)
    assert parse_score_pair("8/9") == (8.0, 9.0)
    assert parse_score_pair("**7.5 6**") == (7.5, 6.0)
    assert parse_score_pair("8/10 9/10") == (8.0, 9.0)
    assert parse_score_pair("Assistant 1: 8, Assistant 2: 9") == (8.0, 9.0)
    for bad in ("", "Assistant 1 is better", "8\n9", "8 9 10", "12 3", "Assistant 1: 8"):
        assert parse_score_pair(bad) is None, bad


def test_relative_scores_per_category(bench, tmp_path, capsys):
    with ScriptedServer(_scores_from_prompt) as server:
        bench.api_base = server.url
        bench.out = str(tmp_path / "out" / "llava_bench.json")
        metrics = judge_llava_bench(bench)
    assert len(server.requests) == 5
    first = next(r for r in server.requests if "picture 1?" in _user_text(r))  # requests arrive in any order
    assert first["model"] == "judge-4" and first["temperature"] == 0.2
    assert first["messages"][0]["content"].startswith("You are a helpful and precise assistant")
    text = _user_text(first)
    assert text.startswith("[Context]\nA caption of 1.\nSecond line.\n\n[Question]\nWhat is in picture 1?")
    assert "[Assistant 1]\nREF1 score=8\n\n[End of Assistant 1]" in text and "[Assistant 2]\nOURS1" in text
    assert "first output a single line containing only two values" in text
    # conv: refs 8, 10 -> 9; ours 6, 10 -> 8; detail 4/5; complex refs 9, 7 -> 8, ours 3, 7 -> 5
    assert metrics["per_category"] == {
        "conv": {"relative": 88.89, "reference_mean": 9.0, "answer_mean": 8.0, "count": 2},
        "detail": {"relative": 80.0, "reference_mean": 5.0, "answer_mean": 4.0, "count": 1},
        "complex": {"relative": 62.5, "reference_mean": 8.0, "answer_mean": 5.0, "count": 2}}
    assert metrics["accuracy"] == round(100 * 30 / 39, 2)  # ours 6+10+4+3+7, refs 8+10+5+9+7
    assert (metrics["reference_mean"], metrics["answer_mean"]) == (7.8, 6.0)
    assert metrics["benchmark"] == "llava_bench" and metrics["rules"] == "llava" and metrics["judge_model"] == "judge-4"
    assert metrics["questions"] == 6 and metrics["judged"] == 5 and metrics["failed"] == 0
    assert metrics["missing_answers"] == ["6"] and metrics["model_id"] == "xllava-test"
    assert metrics["usage"]["requests"] == 5 and metrics["usage"]["prompt_tokens"] == 50
    assert "1 question(s) with no answer, not scored" in capsys.readouterr().err
    reviews = [json.loads(line) for line in (tmp_path / "out" / "llava_bench_reviews.jsonl").read_text().splitlines()]
    assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [10.0, 10.0], [5.0, 4.0], [9.0, 3.0], [7.0, 7.0]]
    assert reviews[0]["answer2_id"] == "a1"


def test_unparseable_retried_once_then_failed(bench):
    def responder(request: dict):
        text = _user_text(request)
        again = len(request["messages"]) == 4
        if "OURS1" in text:  # fixed by the retry note
            return _scores_from_prompt(request) if again else "Assistant 2 seems fine."
        if "OURS4" in text:  # never parseable
            return "I cannot rate these."
        return _scores_from_prompt(request)

    with ScriptedServer(responder) as server:
        bench.api_base = server.url
        metrics = judge_llava_bench(bench)
    retries = [r for r in server.requests if len(r["messages"]) == 4]
    assert len(retries) == 2 and retries[0]["messages"][3]["content"].startswith("Your first line must contain")
    assert metrics["failed"] == 1 and metrics["failed_ids"] == [4] and metrics["judged"] == 4
    assert metrics["per_category"]["complex"]["count"] == 1 and "conv" in metrics["per_category"]


def test_kllava_w_korean_rules_with_images(bench):
    bench.benchmark = "kllava_w"
    bench.context = None
    bench.image_root = str(bench.questions).replace("questions.jsonl", "images")
    seen = []

    def responder(request: dict):
        image = request["messages"][1]["content"][0]["image_url"]["url"]
        red = Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).getpixel((0, 0))[0]
        seen.append((red // 40, _user_text(request)))
        return _scores_from_prompt(request)

    with ScriptedServer(responder) as server:
        bench.api_base = server.url
        metrics = judge_llava_bench(bench)
    assert server.requests[0]["messages"][0]["content"].startswith("당신은")
    for qid, text in seen:
        assert f"picture {qid}?" in text  # the image sent is the question's own
        assert "[어시스턴트 1]" in text and "이미지도 함께 첨부" in text and "[맥락]" not in text
    assert metrics["benchmark"] == "kllava_w" and metrics["accuracy"] == round(100 * 30 / 39, 2)


def test_bad_inputs_are_one_line_errors(bench, tmp_path):
    bench.api_base = "http://127.0.0.1:9/v1"
    with open(bench.answers, "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"answers.jsonl:6: malformed JSON"):
        judge_llava_bench(bench)
    bench.answers = _write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "text": "a"}] * 2)
    with pytest.raises(UserError, match=r"dup.jsonl:2: question_id 1 appears twice"):
        judge_llava_bench(bench)
    bench.context = None
    with pytest.raises(UserError, match="--context .* or --image-root"):
        judge_llava_bench(bench)
    bench.context, bench.image_root = None, str(tmp_path)
    bench.questions = _write_jsonl(tmp_path / "escape.jsonl", [{"question_id": 1, "image": "../x.png", "text": "?"}])
    bench.answers = _write_jsonl(tmp_path / "one.jsonl", [{"question_id": 1, "text": "score=1"}])
    with pytest.raises(UserError, match="climbs out of the image root"):
        judge_llava_bench(bench)


def test_score_cli_prints_metrics_and_writes_reviews(bench, tmp_path, capsys):
    from xllava_jax.cli import main

    out = tmp_path / "scores" / "lb.json"
    with ScriptedServer(_scores_from_prompt) as server:
        code = main(["eval", "score", "--benchmark", "llava_bench", "--questions", bench.questions, "--annotations",
                     *bench.annotations, "--answers", bench.answers, "--context", bench.context, "--api-base",
                     server.url, "--judge-model", "judge-4", "--api-key-env", "XLLAVA_NO_KEY", "--cache-dir",
                     bench.cache_dir, "--out", str(out)])
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0 and metrics["accuracy"] == round(100 * 30 / 39, 2) and len(server.requests) == 5
        assert json.loads(out.read_text()) == metrics and (out.parent / "lb_reviews.jsonl").exists()
        main(["eval", "score", "--benchmark", "llava_bench", "--questions", bench.questions, "--annotations",
              *bench.annotations, "--answers", bench.answers, "--context", bench.context, "--api-base", server.url,
              "--judge-model", "judge-4", "--api-key-env", "XLLAVA_NO_KEY", "--cache-dir", bench.cache_dir])
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(server.requests) == 5 and again["usage"]["cached"] == 5  # the rerun came from the cache
    assert {k: v for k, v in again.items() if k != "usage"} == {k: v for k, v in metrics.items() if k != "usage"}


def _cli_args(bench, server_url: str, *extra: str) -> list[str]:
    return ["eval", "score", "--benchmark", "llava_bench", "--questions", bench.questions, "--annotations",
            *bench.annotations, "--answers", bench.answers, "--context", bench.context, "--api-base", server_url,
            "--judge-model", "judge-4", "--api-key-env", "XLLAVA_NO_KEY", "--cache-dir", bench.cache_dir, *extra]


def test_failed_judge_calls_are_listed_and_the_run_writes_its_figures(bench, tmp_path, capsys):
    from xllava_jax.cli import main

    seen: dict[str, int] = {}
    broken = [True]

    def responder(request: dict):
        text = _user_text(request)
        qid = re.search(r"OURS(\d)", text).group(1)
        seen[qid] = seen.get(qid, 0) + 1
        if not broken[0]:
            return _scores_from_prompt(request)
        if qid == "1" and seen[qid] == 1:
            return Reply(content="8 6", delay_s=1.0)  # hangs past --timeout once, then answered
        if qid == "2":
            return Reply(body="<html>bad gateway</html>")  # a malformed 200 on every attempt
        if qid == "3":
            return status(400)  # refused at once
        if qid == "4":
            return status(500)  # on every attempt
        if qid == "5" and seen[qid] == 1:
            return Reply(body='{"choices": []}')  # malformed once: retried like a 5xx
        return _scores_from_prompt(request)

    out = tmp_path / "scores" / "lb.json"
    with ScriptedServer(responder) as server:
        code = main(_cli_args(bench, server.url, "--timeout", "0.3", "--max-retries", "1", "--backoff", "0.01",
                              "--out", str(out)))
        stdout, err = capsys.readouterr()
        written, reviews = json.loads(out.read_text()), (out.parent / "lb_reviews.jsonl").read_text().splitlines()
        first_seen = dict(seen)
        seen.clear()
        broken[0] = False
        again = main(_cli_args(bench, server.url))  # the rerun asks again only what failed
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert code == 3, err
    assert first_seen == {"1": 2, "2": 2, "3": 1, "4": 2, "5": 2}
    assert (metrics["judged"], metrics["failed"], metrics["failed_ids"]) == (2, 3, [2, 3, 4])
    assert metrics["accuracy"] == round(100 * (6 + 7) / (8 + 7), 2)  # questions 1 and 5 only
    assert sum(c["count"] for c in metrics["per_category"].values()) == 2 and written == metrics
    reviews = {r["question_id"]: r for r in map(json.loads, reviews)}
    assert reviews[3]["failed"] and "HTTP 400" in reviews[3]["error"] and "HTTP 500" in reviews[4]["error"]
    assert "malformed chat completion" in reviews[2]["error"] and reviews[1]["error"] is None
    assert "3 question(s) whose judging failed, not scored: 2, 3, 4; the first: " in err
    assert "malformed chat completion: <html>bad gateway</html> (gave up after 2 attempts)" in err
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == 0 and seen == {"2": 1, "3": 1, "4": 1}
    assert rerun["failed"] == 0 and rerun["usage"]["cached"] == 2


def test_a_dead_endpoint_is_given_up_after_failures_in_a_row(bench, capsys):
    from xllava_jax.cli import main
    from xllava_jax.eval.judging import MAX_FAILURES_IN_A_ROW, CallFailed, run_parallel

    calls = []

    def dead(item: int):
        calls.append(item)
        raise ApiError(f"http://127.0.0.1:9/v1/chat/completions: connection failed (item {item})")

    results = run_parallel(dead, list(range(40)), 2, "judging")
    assert all(isinstance(r, CallFailed) for r in results) and len(results) == 40
    assert len(calls) <= MAX_FAILURES_IN_A_ROW + 1
    assert "not sent" in results[-1].reason and "connection failed" in results[-1].reason

    with ScriptedServer() as server:
        url = server.url  # closed on leaving: connection refused
    assert main(_cli_args(bench, url, "--max-retries", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xllava: error: ") and "no question could be judged" in err[-1]
    assert "connection failed" in err[-1]


def test_help_documents_the_exit_status_and_endpoint_flags(capsys):
    from xllava_jax.cli import main

    for command in (["eval", "score"], ["eval", "preference"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        assert "--timeout" in text and "--max-retries" in text
        assert "3 finished" in text and "`failed_ids` lists them" in text
