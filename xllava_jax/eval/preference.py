"""`xllava eval preference`: which of two models' answers an LLM judge prefers, LIMA style, as X-LLaVA's
preference study does (A better / B better / similar).

Each question answered in both files is judged with the image, the question and the two answers. By default
every pair is judged twice, once with A shown first and once with B shown first, to cancel the judge's
position bias; the pair's verdict is:
  - both orders name the same answer -> that answer wins;
  - the orders disagree, or either says "similar" -> tie;
  - either order's reply cannot be read as A / B / similar, or its judge call failed for good (the endpoint
    failed after retries) -> failed: listed in `failed_ids`, left out of the percentages, never a tie, and
    asked again on a rerun (the judged calls come from the cache).
`--one-order` reproduces the paper (A always shown first, one call per pair). `--truncate-words N` cuts every
answer to its first N whitespace-separated words (the paper's 30-word control against the judge's taste for
long answers; Korean words are whitespace-separated as well).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from xllava_jax.errors import UserError
from xllava_jax.eval.judging import (
    CallFailed,
    JudgeSettings,
    by_question_id,
    image_for,
    run_parallel,
    warn_unjudged,
)

RULE = ("both orders agree -> that side wins; orders disagree or either says similar -> tie; "
        "an unreadable verdict or a failed judge call -> failed (excluded)")
JUDGE_MAX_TOKENS = 32
SYSTEM = "You are a careful and impartial judge of answers to questions about images."
PROMPT = """Look at the image and read the question, then compare the two answers to it.

[Question]
{question}

[Answer A]
{first}
[End of Answer A]

[Answer B]
{second}
[End of Answer B]

Which answer is better: more correct about what the image shows, more helpful and more relevant to the \
question? Length by itself is no merit. Reply with exactly one word: A if Answer A is better, B if Answer B \
is better, or similar if neither is clearly better."""
_LABEL = re.compile(r"^(?:(?:final\s+)?(?:verdict|answer|judg(?:e)?ment|choice|output)\s*[:：]\s*)?"
                    r"(?:answer\s+|response\s+|답변\s*)?([ab])"
                    r"(?:\s+is\s+better|\s+better|\s*(?:가|이)\s*더\s*(?:낫습니다|낫다|좋습니다|좋다))?$")
_SIMILAR = re.compile(r"^(?:similar|tie|neither|both are similar|they are similar|비슷함|비슷하다|비슷합니다|비슷)$")


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "similar" from the judge's first non-blank line ("A", "**B**", "Answer A", "Verdict: B",
    "A is better", "Similar."); None when the line says anything else."""
    lines = [line for line in reply.splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[0].strip().strip("*_`#\"'").strip().lower()
    line = line.rstrip(".!。").strip("*_`\"' ")
    if match := _LABEL.match(line):
        return match.group(1).upper()
    return "similar" if _SIMILAR.match(line) else None


def truncate_words(text: str, n: int | None) -> str:
    """The first `n` whitespace-separated words of `text` (joined by single spaces); `text` itself when it
    has no more than `n` words or `n` is None."""
    if n is None:
        return text
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n])


def pair_outcome(sides: list[str | None]) -> str:
    """A's result ("win" / "tie" / "loss" / "failed") from the side each order chose ("A", "B", "similar" or
    None for unreadable), by the rule in RULE."""
    if any(s is None for s in sides):
        return "failed"
    if len(set(sides)) == 1 and sides[0] != "similar":
        return "win" if sides[0] == "A" else "loss"
    return "tie"


def _model_name(answers: dict[str, dict], fallback: str) -> str:
    """The one `model_id` the answer lines share, else `fallback`."""
    ids = {str(a["model_id"]) for a in answers.values() if a.get("model_id")}
    return ids.pop() if len(ids) == 1 else fallback


def _plot(summary: dict, path: Path) -> None:
    """A horizontal stacked bar (win / tie / loss percentages from A's side), as the paper's figures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 1.4))
    ax = fig.subplots()
    left = 0.0
    for key, colour, label in (("win", "#3b6fb6", f"{summary['name_a']} better"), ("tie", "#b9b9b9", "similar"),
                               ("loss", "#d9793b", f"{summary['name_b']} better")):
        pct = summary[f"{key}_pct"]
        ax.barh([0], [pct], left=left, color=colour, label=label, height=0.6)
        if pct >= 6:
            ax.text(left + pct / 2, 0, f"{pct:.0f}%", ha="center", va="center", color="white", fontsize=10)
        left += pct
    ax.set_xlim(0, 100)
    ax.set_yticks([0], [f"{summary['name_a']}\nvs {summary['name_b']}"])
    ax.set_xlabel("% of questions")
    words = summary["settings"]["truncate_words"]
    ax.set_title(f"judge {summary['settings']['judge_model']}"
                 f"{f', answers cut to {words} words' if words else ''}, n={summary['judged']}", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=3, frameon=False, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def judge_preference(questions_path: str | Path, answers_a: str | Path, answers_b: str | Path,
                     judge_settings: JudgeSettings, out: str | Path, *, image_root: str | Path | None = None,
                     truncate: int | None = None, one_order: bool = False, name_a: str | None = None,
                     name_b: str | None = None, concurrency: int = 4) -> dict:
    """Judge every question both answer files answer; write judgements.jsonl, preference.json and
    preference.png under `out` and return the summary (preference.json). `truncate` cuts every answer to its
    first words; `one_order` judges each pair once, A shown first."""
    if truncate is not None and truncate < 1:
        raise UserError(f"`truncate_words` must be at least 1, got {truncate}")
    questions = by_question_id(questions_path, "questions")
    answers = {"A": by_question_id(answers_a, "answers"), "B": by_question_id(answers_b, "answers")}
    missing = {side: [q for q in questions if q not in answers[side]] for side in "AB"}
    unknown = sorted({q for side in "AB" for q in answers[side] if q not in questions})
    todo = [q for q in questions if q in answers["A"] and q in answers["B"]]
    if not todo:
        raise UserError(f"{answers_a}, {answers_b}: no question of {questions_path} is answered in both")
    client = judge_settings.client()
    orders = ("ab",) if one_order else ("ab", "ba")

    def judge(task: tuple[str, str]) -> dict:
        qid, order = task
        shown = (answers["A"][qid]["text"], answers["B"][qid]["text"])
        first, second = (truncate_words(t, truncate) for t in (shown if order == "ab" else shown[::-1]))
        text = PROMPT.format(question=questions[qid]["text"], first=first, second=second)
        content = [image_for(questions[qid], image_root, questions_path)] if image_root else []
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": [*content, {"type": "text", "text": text}]}]
        reply = client.chat(messages, temperature=0.0, max_tokens=JUDGE_MAX_TOKENS).text
        label = parse_verdict(reply)
        side = label if order == "ab" or label in (None, "similar") else {"A": "B", "B": "A"}[label]
        error = None if label else f"unreadable verdict {reply[:80]!r}"
        return {"label": label, "side": side, "reply": reply, "error": error}

    tasks = [(q, o) for q in todo for o in orders]
    results = {task: {"label": None, "side": None, "reply": "", "error": r.reason} if isinstance(r, CallFailed) else r
               for task, r in zip(tasks, run_parallel(judge, tasks, concurrency, "judging pairs"))}
    records = []
    for qid in todo:
        verdicts = {o: results[(qid, o)] for o in orders}
        records.append({"question_id": questions[qid]["question_id"], "verdicts": verdicts,
                        "final": pair_outcome([v["side"] for v in verdicts.values()])})
    counts = Counter(r["final"] for r in records)
    judged = len(records) - counts["failed"]
    errors = [v["error"] for r in records for v in r["verdicts"].values() if v["error"]]
    if judged == 0:
        raise UserError(f"{judge_settings.model}: no pair could be judged ({len(records)} tried); the first failure: "
                        f"{errors[0]}")
    summary = {
        "name_a": name_a or _model_name(answers["A"], "A"),
        "name_b": name_b or _model_name(answers["B"], "B"),
        "questions": len(questions), "judged": judged,
        **{k: counts[k] for k in ("win", "tie", "loss")},
        **{f"{k}_pct": round(100 * counts[k] / judged, 1) for k in ("win", "tie", "loss")},
        "failed": counts["failed"], "failed_ids": [r["question_id"] for r in records if r["final"] == "failed"],
        "missing_in_a": missing["A"], "missing_in_b": missing["B"], "not_in_questions": unknown, "rule": RULE,
        "settings": {"judge_model": judge_settings.model, "orders": list(orders), "truncate_words": truncate,
                     "with_image": bool(image_root)},
        "usage": asdict(client.usage),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judgements.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                          encoding="utf-8")
    (out / "preference.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    _plot(summary, out / "preference.png")
    warn_unjudged("unanswered in --answers-a", missing["A"])
    warn_unjudged("unanswered in --answers-b", missing["B"])
    warn_unjudged("answered but not in --questions", unknown)
    warn_unjudged("whose judging failed", summary["failed_ids"], errors[0] if errors else None)
    return summary
