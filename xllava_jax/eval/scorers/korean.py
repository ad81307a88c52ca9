"""BOK-VQA (Korean and English questions), KoViz and KoLiv: accuracy against the `label` of each answer line
(as X-LLaVA's release reads it; with `--questions`, the question file's `label` by question id).

`--rules paper` (default) is the reference scripts' rule on any input, quirks included; neither side is stripped
(a prediction " 예" or "야구 " is wrong; LLaVA-style runners, ours too, strip the generated text before writing it):
  bokvqa_ko, koliv: correct iff prediction == label.
  koviz: correct iff the prediction is a substring of the label, or the prediction is one of 네/예/yes and the
    label is 예, or one of 아니요/no and the label is 아니요. An empty prediction is a substring of every label
    and so counts as correct.
  bokvqa_en: correct iff label.strip().lower() is a substring of prediction.lower().
`--rules strict` fixes the quirks: whitespace stripped and collapsed, trailing periods dropped, lowercased; for the
Korean sets yes/no words mapped (네/예/yes/응 -> 예; 아니요/아니오/아니/no -> 아니요) and an exact match required; for
bokvqa_en punctuation removed and the label must equal the prediction or appear in it as whole words. An empty
prediction (or label) is wrong under strict rules.
"""

from __future__ import annotations

import re
import unicodedata

from xllava_jax.eval.answers import read_answers
from xllava_jax.eval.scorers.common import ScoreRequest, header, match_gold, pct

KOREAN_SETS = ("bokvqa_ko", "koviz", "koliv")
BENCHMARKS = (*KOREAN_SETS, "bokvqa_en")
PAPER_YES, PAPER_NO = ("네", "예", "yes"), ("아니요", "no")
STRICT_YES_NO = {"네": "예", "예": "예", "yes": "예", "응": "예",
                 "아니요": "아니요", "아니오": "아니요", "아니": "아니요", "no": "아니요"}


def paper_correct(benchmark: str, prediction: str, label: str) -> bool:
    """The paper's (the reference scripts') rule for one answer; see the module docstring."""
    if benchmark == "bokvqa_en":
        return label.strip().lower() in prediction.lower()
    if benchmark == "koviz":
        return (prediction in label or (prediction in PAPER_YES and label == "예")
                or (prediction in PAPER_NO and label == "아니요"))
    return prediction == label


def _squash(text: str) -> str:
    return " ".join(text.split()).rstrip(".。 ").lower()


def normalise_korean(text: str) -> str:
    """Strict-rule form of a Korean-set answer: whitespace collapsed, trailing periods dropped, lowercased,
    yes/no words mapped to 예 / 아니요."""
    text = _squash(text)
    return STRICT_YES_NO.get(text, text)


def normalise_english(text: str) -> str:
    """Strict-rule form of a BOK-VQA English answer: lowercased, punctuation removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def strict_correct(benchmark: str, prediction: str, label: str) -> bool:
    """The strict rule for one answer (see the module docstring)."""
    if benchmark == "bokvqa_en":
        prediction, label = normalise_english(prediction), normalise_english(label)
        return bool(prediction and label) and (
            prediction == label or re.search(rf"(?<!\S){re.escape(label)}(?!\S)", prediction) is not None)
    prediction, label = normalise_korean(prediction), normalise_korean(label)
    return bool(prediction) and prediction == label


def score(req: ScoreRequest) -> dict:
    """Accuracy (%) under the paper's or the strict rules."""
    rules = req.rules or "paper"
    correct_fn = paper_correct if rules == "paper" else strict_correct
    answers = read_answers(req.answers)
    matched = match_gold(req, answers)
    correct = missing = empty = 0
    for gold, answer in matched.pairs:
        label = str(gold.require("label", (str, int, float)))
        if answer is None:
            missing += 1
            continue
        prediction = answer.data["text"]
        empty += not prediction.strip()
        correct += correct_fn(req.benchmark, prediction, label)
    metrics = header(req, answers, rules, len(matched.pairs), missing, matched.ignored)
    metrics.update(accuracy=pct(correct, len(matched.pairs)), correct=correct, empty_predictions=empty)
    return metrics
