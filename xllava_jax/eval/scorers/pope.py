"""POPE: LLaVA's yes/no reading of free text (`eval_pope.py`) and per-split accuracy, precision, recall, F1 and
yes-ratio with "yes" as the positive class.

Gold: `--annotations` one or more POPE files (`coco_pope_{random,popular,adversarial}.json`, JSON lines with
`question_id`, `text`, `label`); the split is the file name after `pope_`. The split of an answer comes from:
  - `--questions`, LLaVA's question JSONL (`llava_pope_test.jsonl`: `question_id`, `image`, `text`, `category`),
    as LLaVA's `eval_pope.py` takes it: the answer's question id names a question, whose `category` is the split.
    That file numbers its questions over all splits while each annotation file restarts at 1; it was made by
    concatenating the annotation files, so the n-th question of a split is the n-th line of its annotation file
    (checked: same count, same `image`). Without `--annotations`, the question lines' own `label` is the gold.
  - otherwise the answer line's `category` (our runner copies it) or, with a single annotation file, that
    file's split; answers are then matched by question id within their split.
Without `--annotations` and `--questions`, each answer line's own `label` (and `category`, else split "all") is the
gold. LLaVA's script zips answers and labels in file order; here answers are matched by question id, so their order
does not matter. A question without an answer counts as wrong in the split's accuracy; precision, recall, F1 and
yes-ratio are over the answered questions. The headline `accuracy` and `f1` are the means over splits.
"""

from __future__ import annotations

import re
from pathlib import Path

from xllava_jax.eval.answers import Record, ScoreError, load_questions, read_answers, read_jsonl
from xllava_jax.eval.scorers.common import ScoreRequest, header, pct


def llava_yes_no(text: str) -> str:
    """"yes" or "no" as LLaVA reads it: the first sentence, commas dropped, split on single spaces; any word
    "No", "not" or "no" makes it "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def split_name(path: Path) -> str:
    """`coco_pope_adversarial.json` -> "adversarial"; any other file -> its stem."""
    found = re.search(r"pope_(\w+)$", path.stem)
    return found.group(1) if found else path.stem


def _label(record: Record) -> str:
    label = record.require("label", str).strip().lower()
    if label not in ("yes", "no"):
        raise ScoreError(f"{record.where}: `label` must be yes or no, got {record.data['label']!r}")
    return label


def split_metrics(pairs: list[tuple[str, str | None]]) -> dict:
    """Figures for one split from (label, prediction or None) pairs, as percentages."""
    answered = [(label, pred) for label, pred in pairs if pred is not None]
    tp = sum(1 for label, pred in answered if label == pred == "yes")
    tn = sum(1 for label, pred in answered if label == pred == "no")
    fp = sum(1 for label, pred in answered if label == "no" and pred == "yes")
    fn = sum(1 for label, pred in answered if label == "yes" and pred == "no")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"questions": len(pairs), "missing": len(pairs) - len(answered), "accuracy": pct(tp + tn, len(pairs)),
            "precision": round(100 * precision, 2), "recall": round(100 * recall, 2), "f1": round(100 * f1, 2),
            "yes_ratio": pct(tp + fp, len(answered))}


def _annotation_files(req: ScoreRequest) -> dict[str, tuple[Path, list[Record]]]:
    """Split name -> (annotation file, its lines in file order), each line with a question id and a yes/no label."""
    files: dict[str, tuple[Path, list[Record]]] = {}
    for path in req.annotations:
        name = split_name(Path(path))
        if name in files:
            raise ScoreError(f"{path}: a second annotation file for split {name}")
        records, seen = read_jsonl(path), set()
        for record in records:
            record.require("question_id", (int, str))
            _label(record)
            if record.qid in seen:
                raise ScoreError(f"{record.where}: duplicate question id {record.qid}")
            seen.add(record.qid)
        files[name] = (Path(path), records)
    return files


def _gold_by_question_file(req: ScoreRequest) -> dict[str, dict[str, str]]:
    """Split -> {question id of `--questions` -> label}: the question file's `category` names the split; the
    labels are the annotation file's lines in order (or, without annotations, the question lines' own)."""
    by_split: dict[str, list[Record]] = {}
    for question in load_questions(req.questions).values():
        by_split.setdefault(question.require("category", str), []).append(question)
    if not req.annotations:
        return {split: {q.qid: _label(q) for q in questions} for split, questions in by_split.items()}
    gold = {}
    for split, (path, labels) in _annotation_files(req).items():
        questions = by_split.get(split, [])
        if len(questions) != len(labels):
            raise ScoreError(f"{req.questions}: {len(questions)} question(s) of split {split} (`category`), but "
                             f"{path} has {len(labels)} lines; LLaVA's question file pairs them in order")
        for question, label in zip(questions, labels):
            if question.data.get("image") != label.data.get("image"):
                raise ScoreError(f"{question.where}: image {question.data.get('image')!r}, but the line in the same "
                                 f"place of split {split}, {label.where}, has {label.data.get('image')!r}")
        gold[split] = {q.qid: _label(label) for q, label in zip(questions, labels)}
    return gold


def _gold(req: ScoreRequest, answers: list[Record]) -> dict[str, dict[str, str]]:
    """Split -> {question id -> label} from the annotation files, else from the answer lines."""
    if req.annotations:
        return {name: {r.qid: _label(r) for r in records} for name, (_, records) in _annotation_files(req).items()}
    gold: dict[str, dict[str, str]] = {}
    for a in answers:
        gold.setdefault(str(a.data.get("category", "all")), {})[a.qid] = _label(a)
    return gold


def _split_of(answer: Record, splits: list[str]) -> str:
    category = answer.data.get("category")
    if category is not None and str(category) in splits:
        return str(category)
    if len(splits) == 1:
        return splits[0]
    raise ScoreError(f"{answer.where}: `category` {category!r} names none of the POPE splits {splits}")


def score(req: ScoreRequest) -> dict:
    """Per-split POPE figures plus their means (headline `accuracy` = mean accuracy)."""
    by_question_file = req.questions is not None
    answers = read_answers(req.answers, extra_key=() if by_question_file else ("category",))
    gold = _gold_by_question_file(req) if by_question_file else _gold(req, answers)
    question_split = {qid: split for split, labels in gold.items() for qid in labels}
    predictions: dict[str, dict[str, str]] = {name: {} for name in gold}
    ignored = 0
    for answer in answers:
        split = question_split.get(answer.qid) if by_question_file else _split_of(answer, list(gold))
        if split is not None and answer.qid in gold[split] and answer.round_id == 0:
            predictions[split][answer.qid] = llava_yes_no(answer.data["text"])
        else:
            ignored += 1
    per_split = {name: split_metrics([(label, predictions[name].get(qid)) for qid, label in labels.items()])
                 for name, labels in sorted(gold.items())}
    metrics = header(req, answers, "llava", sum(s["questions"] for s in per_split.values()),
                     sum(s["missing"] for s in per_split.values()), ignored)
    metrics["accuracy"] = round(sum(s["accuracy"] for s in per_split.values()) / len(per_split), 2)
    metrics["f1"] = round(sum(s["f1"] for s in per_split.values()) / len(per_split), 2)
    metrics["per_split"] = per_split
    return metrics
