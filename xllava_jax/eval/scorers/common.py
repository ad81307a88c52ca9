"""What every scorer shares: the request, gold/answer matching, percentages and the metrics header."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.eval.answers import Record, ScoreError, by_question, load_questions, model_id


@dataclass(frozen=True)
class ScoreRequest:
    """One `xllava eval score` call: the benchmark, the answer JSONL and the gold files it names."""

    benchmark: str
    answers: Path
    questions: Path | None = None
    annotations: tuple[Path, ...] = ()
    rules: str | None = None


def pct(part: float, whole: int) -> float:
    """`part / whole` as a percentage rounded to 2 decimals (0.0 when `whole` is 0)."""
    return round(100.0 * part / whole, 2) if whole else 0.0


@dataclass(frozen=True)
class Matched:
    """Gold records paired with their answers (None: the question has no answer line), and the number of answer
    lines that match no gold question (scored nowhere; reported)."""

    pairs: list[tuple[Record, Record | None]]
    ignored: int


def match_gold(req: ScoreRequest, answers: Sequence[Record]) -> Matched:
    """With `--questions`, gold comes from the question file (matched by question_id, round-0 answers);
    otherwise every answer line is its own gold record (the runner copies the gold keys into it)."""
    if req.questions is None:
        return Matched([(a, a) for a in answers], 0)
    questions = load_questions(req.questions)
    answered = by_question(answers)
    pairs = [(gold, answered.get(qid)) for qid, gold in questions.items()]
    return Matched(pairs, sum(1 for a in answers if a.round_id != 0 or a.qid not in questions))


def header(req: ScoreRequest, answers: Sequence[Record], rules: str, questions: int, missing: int,
           ignored: int) -> dict:
    """The fields every metrics dict starts with; warns on stderr about answers that match no question."""
    if ignored:
        print(f"xllava: warning: {ignored} answer line(s) in {req.answers} match no question in the gold "
              f"files and are not scored", file=sys.stderr)
    if questions == 0:
        raise ScoreError(f"{req.answers}: no questions to score")
    return {"benchmark": req.benchmark, "rules": rules, "model_id": model_id(answers), "answers": str(req.answers),
            "questions": questions, "missing": missing, "ignored_answers": ignored}
