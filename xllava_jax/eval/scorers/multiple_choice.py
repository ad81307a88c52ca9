"""Multiple choice (MMBench, K-MMBench, K-SEED, K-MMStar, K-DTCBench): a rule-based option letter read from the
free-text answer, circular evaluation over option rotations.

Reading an answer: the letters the text gives as its answer are collected from these forms: a bare letter
("B", "B.", "(B)", "B)"), a letter opening the text before its option text ("B. Paris", "(B) Paris"), a letter
after an English cue ("Answer: B", "The answer is (B)", "option B", "choice B") or a Korean one ("정답은 B입니다",
"답: B", "옵션 B", "선택지 B", "보기 B"), and "B번". Only letters shown with the question count. One distinct
letter is the answer; two or more is ambiguous: no answer. With no letter, the text is matched against the option
texts (lowercased, whitespace collapsed, trailing period dropped): an exact match, else the one option contained
in the answer, else the one option containing the answer. A line with no answer is wrong and counted in
`unparsed`.

Gold: each answer line's `answer` (the gold letter in that round's shown order), `options` (texts in shown
order), `option_char` (letters shown; default A, B, ... for the options), `round_id` (0 without rotation),
`question_id` (the question's index) and optional `category`. When any line has `round_id` > 0 the file is a
circular run: a question counts correct only when all its len(options) rounds are present and correct (absent
rounds are counted in `missing_rounds`). `single_round` is the accuracy of round 0 alone. `rules` is
"official": MMBench's circular protocol, with the letter read by the rules above rather than by a ChatGPT
extractor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from xllava_jax.eval.answers import Record, ScoreError, read_answers
from xllava_jax.eval.scorers.common import ScoreRequest, header, pct

_LETTER = r"[\(\[]?([A-Z])[\)\]]?"
_END = r"(?![A-Za-z0-9])"
LETTER_FORMS = (
    re.compile(rf"^\s*{_LETTER}\s*[.:：)]?\s*$"),
    re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\]]|[.:：])\s"),
    re.compile(rf"(?i:answer|option|choice)\s*(?i:is|would be|should be)?\s*[:：=]?\s*{_LETTER}{_END}"),
    re.compile(rf"(?:정답|답|옵션|선택지|보기)\s*(?:은|는|:|：)?\s*{_LETTER}{_END}"),
    re.compile(rf"(?<![A-Za-z0-9]){_LETTER}\s*번"),
)


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".。 ")


def _one(found: Sequence[str]) -> str | None:
    return found[0] if len(found) == 1 else None


def extract_choice(text: str, options: Sequence[str], letters: Sequence[str]) -> str | None:
    """The option letter a free-text answer gives, or None when there is none or it is ambiguous."""
    named = {m.group(1) for form in LETTER_FORMS for m in form.finditer(text) if m.group(1) in letters}
    if named:
        return _one(sorted(named))
    prediction = _norm(text)
    if not prediction:
        return None
    texts = [(letter, _norm(option)) for letter, option in zip(letters, options)]
    exact = [letter for letter, option in texts if option == prediction]
    if exact:
        return _one(exact)
    inside = [letter for letter, option in texts if option and option in prediction]
    if inside:
        return _one(inside)
    return _one([letter for letter, option in texts if prediction in option])


def _gold(record: Record) -> tuple[str, list[str], list[str]]:
    options = record.require("options", list)
    letters = record.data.get("option_char") or [chr(ord("A") + i) for i in range(len(options))]
    if len(letters) != len(options) or not all(isinstance(x, str) for x in [*letters, *options]):
        raise ScoreError(f"{record.where}: `options` and `option_char` must be lists of strings of one length")
    answer = record.require("answer", str).strip()
    if answer not in letters:
        raise ScoreError(f"{record.where}: gold `answer` {answer!r} is not one of the shown letters {letters}")
    return answer, options, letters


def score(req: ScoreRequest) -> dict:
    """Circular and single-round accuracy (%), overall and per category."""
    answers = read_answers(req.answers)
    circular = any(a.round_id > 0 for a in answers)
    rounds: dict[str, dict[int, bool]] = {}
    size: dict[str, int] = {}
    category: dict[str, str] = {}
    unparsed = 0
    for a in answers:
        answer, options, letters = _gold(a)
        choice = extract_choice(a.data["text"], options, letters)
        unparsed += choice is None
        rounds.setdefault(a.qid, {})[a.round_id] = choice == answer
        size[a.qid] = len(options)
        category.setdefault(a.qid, str(a.data.get("category", "")))
    expected = {q: set(range(size[q])) if circular else set(r) for q, r in rounds.items()}
    missing_rounds = sum(len(expected[q] - set(r)) for q, r in rounds.items())
    whole = {q: expected[q] <= set(r) and all(r.values()) for q, r in rounds.items()}
    single = {q: r[0] for q, r in rounds.items() if 0 in r}
    metrics = header(req, answers, "official", len(rounds), len(rounds) - len(single), 0)
    accuracy = pct(sum(whole.values()), len(whole))
    metrics.update(accuracy=accuracy, circular_run=circular, circular_accuracy=accuracy,
                   single_round=pct(sum(single.values()), len(rounds)), rounds=len(answers), unparsed=unparsed,
                   missing_rounds=missing_rounds)
    if any(category.values()):
        per: dict[str, dict] = {}
        for name in sorted(set(category.values())):
            qids = [q for q in rounds if category[q] == name]
            per[name] = {"accuracy": pct(sum(whole[q] for q in qids), len(qids)),
                         "single_round": pct(sum(single.get(q, False) for q in qids), len(qids)),
                         "questions": len(qids)}
        metrics["per_category"] = per
    return metrics
