"""synth_vqa: the project's synthetic held-out split (`xllava data synth` writes `vqa_heldout_{en,ko}.jsonl`).

Question lines carry `answer` (gold short answer), `kind`, `lang` and, for colour, shape and position
questions, `answers_present` (the answer each object in the image would give).
Gold comes from `--questions` (a held-out file, matched by question_id) when given, else from the answer
lines (the runner copies the keys). Prediction and gold are normalised (stripped, lowercased, trailing
'.'/'。' dropped, whitespace collapsed) and must match exactly. Besides accuracy per language and per
(language, kind), the report gives two baselines a model could reach without looking: answering every question
of a (language, kind) with its most common gold answer, and, where lines carry `answers_present`, naming anything
present in the image (any colour present for a colour question; the mean of 1 / number of distinct answers present).
"""

from __future__ import annotations

from collections import Counter

from xllava_jax.eval.answers import Record, ScoreError, read_answers
from xllava_jax.eval.scorers.common import ScoreRequest, header, match_gold, pct


def normalise(text: str) -> str:
    """Stripped, lowercased, trailing periods (. and 。) dropped, whitespace collapsed."""
    return " ".join(text.strip().lower().rstrip(".。").split())


def _group(rows: list[tuple[Record, bool]]) -> dict:
    gold = Counter(normalise(g.data["answer"]) for g, _ in rows)
    top, hits = gold.most_common(1)[0]
    out = {"accuracy": pct(sum(ok for _, ok in rows), len(rows)), "questions": len(rows), "majority_answer": top,
           "majority_baseline": pct(hits, len(rows))}
    present = [g.data["answers_present"] for g, _ in rows if g.data.get("answers_present")]
    if present:
        out["present_shortcut"] = pct(sum(1 / len(set(p)) for p in present), len(present))
    return out


def score(req: ScoreRequest) -> dict:
    """Exact-match accuracy (%) overall, per language and per (language, kind), with the two baselines."""
    answers = read_answers(req.answers)
    matched = match_gold(req, answers)
    rows: dict[str, dict[str, list[tuple[Record, bool]]]] = {}
    missing = 0
    for gold, answer in matched.pairs:
        expected = gold.require("answer", str)
        lang, kind = str(gold.require("lang", str)), str(gold.require("kind", str))
        present = gold.data.get("answers_present")
        if present is not None and not (isinstance(present, list) and present):
            raise ScoreError(f"{gold.where}: `answers_present` must be a non-empty list")
        missing += answer is None
        ok = answer is not None and normalise(answer.data["text"]) == normalise(expected)
        rows.setdefault(lang, {}).setdefault(kind, []).append((gold, ok))
    metrics = header(req, answers, "official", len(matched.pairs), missing, matched.ignored)
    correct = sum(ok for kinds in rows.values() for group in kinds.values() for _, ok in group)
    metrics["accuracy"] = pct(correct, len(matched.pairs))
    metrics["per_lang"] = {}
    for lang, kinds in sorted(rows.items()):
        flat = [row for group in kinds.values() for row in group]
        metrics["per_lang"][lang] = {"accuracy": pct(sum(ok for _, ok in flat), len(flat)), "questions": len(flat),
                                     "kinds": {kind: _group(group) for kind, group in sorted(kinds.items())}}
    return metrics
