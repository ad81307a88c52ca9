"""LLaVA-Bench (in-the-wild) and K-LLaVA-W scored by an LLM judge, as LLaVA's `eval_gpt_review_bench.py` and
`summarize_gpt_review.py` do.

Per question the judge reads the image's caption context (`--context`, LLaVA-Bench's context.jsonl keyed by
image) and, with `--image-root`, the image itself; then the question, the reference answer as Assistant 1 and
our answer as Assistant 2, and LLaVA's rule prompt asking for two 1-10 scores on the first line. The relative
score of a category (and overall) is 100 * mean(our scores) / mean(reference scores). A reply whose first
line holds no score pair is asked again once with a note; if it still fails, or the endpoint fails for good (after
retries), the question counts as `failed`: listed in `failed_ids` with its reason in the reviews file, never
averaged in, and asked again on a rerun (answered questions come from the cache). K-LLaVA-W gives the judge the
same rules in Korean.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from xllava_jax.api.client import ChatClient
from xllava_jax.errors import UserError
from xllava_jax.eval.judging import (
    CallFailed,
    JudgeSettings,
    by_question_id,
    image_for,
    read_jsonl,
    run_parallel,
    warn_unjudged,
)

JUDGE_TEMPERATURE = 0.2  # LLaVA's setting
JUDGE_MAX_TOKENS = 1024
# The judge's instructions, per language. The English rule is LLaVA's `rule.json` prompt for the llava_bench
# categories (all three use the same text), kept verbatim so scores stay comparable with published ones.
_TEXT = {
    "en": {
        "system": "You are a helpful and precise assistant for checking the quality of the answer.",
        "context": "Context", "question": "Question", "rules": "System", "role": "Assistant",
        "end": "End of {role} {n}",
        "rule_head": "We would like to request your feedback on the performance of two AI assistants in response "
                     "to the user question displayed above. The user asks the question on observing an image.",
        "rule_context": " For your reference, the visual content in the image is represented with a few sentences "
                        "describing the image.",
        "rule_image": " The image itself is attached as well.",
        "rule_tail": " \nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. "
                     "Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
                     "indicates better overall performance.\nPlease first output a single line containing only "
                     "two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
                     "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation "
                     "of your evaluation, avoiding any potential bias and ensuring that the order in which the "
                     "responses were presented does not affect your judgment.",
        "again": "Your first line must contain only the two scores separated by a space, for example: 7 8. "
                 "Please give your evaluation again in that format.",
    },
    "ko": {
        "system": "당신은 답변의 품질을 꼼꼼하고 정확하게 점검하는 유용한 어시스턴트입니다.",
        "context": "맥락", "question": "질문", "rules": "시스템", "role": "어시스턴트", "end": "{role} {n} 끝",
        "rule_head": "위에 제시된 사용자 질문에 대한 두 AI 어시스턴트의 응답을 평가해 주세요. 사용자는 이미지를 보면서 "
                     "질문합니다.",
        "rule_context": " 참고로, 이미지의 시각적 내용은 이미지를 설명하는 몇 개의 문장으로 주어집니다.",
        "rule_image": " 이미지도 함께 첨부되어 있습니다.",
        "rule_tail": " \n응답의 유용성, 관련성, 정확성, 상세함을 평가해 주세요. "
                     "각 어시스턴트는 1점에서 10점 사이의 종합 점수를 받으며, "
                     "점수가 높을수록 전반적인 성능이 좋다는 뜻입니다.\n"
                     "먼저 어시스턴트 1과 어시스턴트 2의 점수를 차례로 나타내는 두 값만 담은 한 줄을 출력해 주세요. "
                     "두 점수는 공백 하나로 구분합니다.\n"
                     "다음 줄부터는 평가에 대한 종합적인 설명을 해 주세요. "
                     "편향을 피하고, 응답이 제시된 순서가 판단에 영향을 주지 않도록 해 주세요.",
        "again": "첫 줄에는 공백으로 구분한 두 점수만 적어야 합니다 (예: 7 8). 그 형식으로 다시 평가해 주세요.",
    },
}
BENCHMARK_LANG = {"llava_bench": "en", "kllava_w": "ko"}
UNPARSEABLE = "no score pair on the first line of the judge's reply (asked twice)"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_ROLE_LABEL = re.compile(r"(?:assistant|어시스턴트)\s*[12]", re.IGNORECASE)


def parse_score_pair(review: str) -> tuple[float, float] | None:
    """The two scores on the first non-blank line ("8 9", "8, 9", "8/9", "**8 9**", "8/10 9/10",
    "Assistant 1: 8, Assistant 2: 9"); None when that line does not hold exactly two scores in 0..10."""
    lines = [line for line in review.splitlines() if line.strip()]
    if not lines:
        return None
    line = _ROLE_LABEL.sub(" ", lines[0])
    numbers = [float(x) for x in _NUMBER.findall(line)]
    if len(numbers) == 4 and numbers[1] == numbers[3] == 10:  # "8/10 9/10"
        numbers = [numbers[0], numbers[2]]
    if len(numbers) != 2 or not all(0 <= x <= 10 for x in numbers):
        return None
    return numbers[0], numbers[1]


def review_prompt(lang: str, question: str, reference: str, answer: str, context: str | None,
                  with_image: bool) -> str:
    """The judge's user text in LLaVA's layout: [Context], [Question], the two answers, [System] rule."""
    t = _TEXT[lang]
    role = t["role"]
    rule = t["rule_head"] + (t["rule_context"] if context else "") + (t["rule_image"] if with_image else "")
    parts = [f"[{t['context']}]\n{context}\n\n"] if context else []
    parts += [f"[{t['question']}]\n{question}\n\n",
              f"[{role} 1]\n{reference}\n\n[{t['end'].format(role=role, n=1)}]\n\n",
              f"[{role} 2]\n{answer}\n\n[{t['end'].format(role=role, n=2)}]\n\n",
              f"[{t['rules']}]\n{rule + t['rule_tail']}\n\n"]
    return "".join(parts)


def review_one(client: ChatClient, lang: str, user_content: list[dict]) -> tuple[tuple[float, float] | None, str]:
    """Ask the judge; once more with a format note when the first line holds no score pair.
    Returns (scores or None, the judge's last reply text)."""
    t = _TEXT[lang]
    messages = [{"role": "system", "content": t["system"]}, {"role": "user", "content": user_content}]
    reply = client.chat(messages, temperature=JUDGE_TEMPERATURE, max_tokens=JUDGE_MAX_TOKENS).text
    scores = parse_score_pair(reply)
    if scores is None:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": t["again"]}]
        reply = client.chat(messages, temperature=JUDGE_TEMPERATURE, max_tokens=JUDGE_MAX_TOKENS).text
        scores = parse_score_pair(reply)
    return scores, reply


def _contexts(path: str | None) -> dict[str, str]:
    """LLaVA-Bench context.jsonl: image file name -> caption text (a list of captions joined by newlines)."""
    if not path:
        return {}
    out = {}
    for number, obj in read_jsonl(path, "context"):
        caption = obj.get("caption")
        if isinstance(caption, list):
            caption = "\n".join(str(c) for c in caption)
        if not isinstance(obj.get("image"), str) or not isinstance(caption, str):
            raise UserError(f"{path}:{number}: context line needs a string 'image' and a 'caption'")
        out[obj["image"]] = caption
    return out


def relative_scores(pairs: list[tuple[float, float]]) -> dict:
    """Means of reference (Assistant 1) and our (Assistant 2) scores over `pairs` and 100 * ours / reference."""
    ref = sum(p[0] for p in pairs) / len(pairs)
    ours = sum(p[1] for p in pairs) / len(pairs)
    return {"relative": round(100 * ours / ref, 2) if ref > 0 else None, "reference_mean": round(ref, 3),
            "answer_mean": round(ours, 3), "count": len(pairs)}


def score_llava_bench(benchmark: str, questions_path: str | Path, references_path: str | Path,
                      answers_path: str | Path, judge_settings: JudgeSettings, *, context_path: str | None = None,
                      image_root: str | Path | None = None, concurrency: int = 4,
                      out: str | Path | None = None) -> dict:
    """Judge every question answered in `answers_path` against the reference answers (`references_path`) and
    return the metrics: overall relative score as `accuracy`, `per_category`, raw means, `failed`. With `out`,
    the reviews go to OUT's stem + `_reviews.jsonl` beside it."""
    lang = BENCHMARK_LANG.get(benchmark)
    if lang is None:
        raise UserError(f"`benchmark` {benchmark}: the LLM judge scores only {', '.join(BENCHMARK_LANG)}")
    context = _contexts(context_path)
    if not context and not image_root:
        raise UserError(f"`benchmark` {benchmark}: give the judge `context` (captions) or `image_root` "
                        "(images); it cannot judge answers about an image it knows nothing of")
    questions = by_question_id(questions_path, "questions")
    references = by_question_id(references_path, "reference answers")
    answers = by_question_id(answers_path, "answers")
    missing_answers = [q for q in questions if q not in answers]
    missing_references = [q for q in questions if q not in references]
    todo = [q for q in questions if q in answers and q in references]
    if not todo:
        raise UserError(f"{answers_path}: no question of {questions_path} has both an answer and a reference")
    uncaptioned = [q for q in todo if context and questions[q].get("image") not in context]
    if uncaptioned:
        raise UserError(f"{context_path}: no caption for the image of question(s) {', '.join(uncaptioned[:10])}")
    client = judge_settings.client()

    def review(qid: str, scores: tuple[float, float] | None, content: str, error: str | None) -> dict:
        """One line of the reviews file (LLaVA's layout, plus `failed` and `error`)."""
        return {"question_id": questions[qid]["question_id"], "category": str(questions[qid].get("category", "all")),
                "answer1_id": references[qid].get("answer_id", qid), "answer2_id": answers[qid].get("answer_id", qid),
                "tuple": list(scores) if scores else [-1, -1], "content": content, "failed": scores is None,
                "error": error}

    def judge(qid: str) -> dict:
        q = questions[qid]
        caption = context.get(q.get("image"))
        text = review_prompt(lang, q["text"], references[qid]["text"], answers[qid]["text"], caption,
                             bool(image_root))
        content = [image_for(q, image_root, questions_path)] if image_root else []
        scores, reply = review_one(client, lang, [*content, {"type": "text", "text": text}])
        return review(qid, scores, reply, None if scores else UNPARSEABLE)

    results = run_parallel(judge, todo, concurrency, f"judging {benchmark}")
    reviews = [review(qid, None, "", r.reason) if isinstance(r, CallFailed) else r for qid, r in zip(todo, results)]
    judged = [r for r in reviews if not r["failed"]]
    failed = [r for r in reviews if r["failed"]]
    if out:
        path = Path(out).with_name(Path(out).stem + "_reviews.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews), encoding="utf-8")
    warn_unjudged("with no answer", missing_answers)
    warn_unjudged("with no reference answer", missing_references)
    warn_unjudged("whose judging failed", [r["question_id"] for r in failed], failed[0]["error"] if failed else None)
    if not judged:
        raise UserError(f"{answers_path}: no question could be judged ({len(reviews)} tried); the first failure: "
                        f"{failed[0]['error']}")
    overall = relative_scores([tuple(r["tuple"]) for r in judged])
    categories = sorted({r["category"] for r in judged})
    per_category = {c: relative_scores([tuple(r["tuple"]) for r in judged if r["category"] == c])
                    for c in categories}
    model_ids = sorted({str(a["model_id"]) for a in answers.values() if a.get("model_id")})
    return {"benchmark": benchmark, "rules": "llava", "questions": len(questions), "judged": len(judged),
            "accuracy": overall["relative"], "reference_mean": overall["reference_mean"],
            "answer_mean": overall["answer_mean"], "per_category": per_category,
            "judge_model": client.model, "model_id": model_ids[0] if len(model_ids) == 1 else model_ids or None,
            "usage": asdict(client.usage), "failed": len(failed), "failed_ids": [r["question_id"] for r in failed],
            "missing_answers": missing_answers, "missing_references": missing_references}
