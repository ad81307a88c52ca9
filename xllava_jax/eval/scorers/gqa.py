"""GQA: LLaVA's conversion (`convert_gqa_for_eval.py`: the answer text with trailing '.' characters stripped,
lowercased, nothing else) scored by exact match against the gold `answer` as the official GQA `eval.py` does.

Gold: `--questions` GQA questions JSON (`{qid: {"answer", "types": {"structural", ...}, "isBalanced", ...}}`),
or, without it, the same keys on each answer line. Only questions whose `isBalanced` is true count when the
key is present (the official script scores the balanced set); the others are counted in `unbalanced_skipped`.
Binary / open follows the official script: a question is "open" when its structural type is "query" and
"binary" otherwise (verify, logical, choose, compare); a question without a structural type is "binary" when
its gold answer is yes/no and "open" otherwise. A question without an answer is wrong and counted in `missing`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from xllava_jax.eval.answers import read_answers
from xllava_jax.eval.scorers.common import ScoreRequest, header, match_gold, pct


def llava_prediction(text: str) -> str:
    """The prediction LLaVA submits: trailing periods stripped, lowercased."""
    return text.rstrip(".").lower()


def answer_type(question: dict) -> str:
    """"open" or "binary" for a GQA question (see the module docstring)."""
    structural = (question.get("types") or {}).get("structural")
    if structural is not None:
        return "open" if structural == "query" else "binary"
    return "binary" if str(question.get("answer", "")).lower() in ("yes", "no") else "open"


def score(req: ScoreRequest) -> dict:
    """Balanced-set accuracy, binary, open and per structural type, as percentages."""
    answers = read_answers(req.answers)
    matched = match_gold(req, answers)
    groups: dict[str, list[int]] = {"binary": [], "open": []}
    structural: dict[str, list[int]] = {}
    scores: list[int] = []
    skipped = missing = 0
    for gold, answer in tqdm(matched.pairs, desc="scoring", unit="q", disable=None, file=sys.stderr):
        if gold.data.get("isBalanced") is False:
            skipped += 1
            continue
        expected = gold.require("answer", str)
        missing += answer is None
        correct = int(answer is not None and llava_prediction(answer.data["text"]) == expected)
        scores.append(correct)
        groups[answer_type(gold.data)].append(correct)
        kind = (gold.data.get("types") or {}).get("structural")
        if kind is not None:
            structural.setdefault(kind, []).append(correct)
    metrics = header(req, answers, "official", len(scores), missing, matched.ignored)
    metrics.update(accuracy=pct(sum(scores), len(scores)), unbalanced_skipped=skipped,
                   **{name: pct(sum(s), len(s)) for name, s in groups.items()},
                   per_structural={k: pct(sum(s), len(s)) for k, s in sorted(structural.items())})
    return metrics
