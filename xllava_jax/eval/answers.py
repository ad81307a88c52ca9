"""Strict readers for LLaVA answer JSONL and for benchmark question files.

An answer line (what `xllava eval run` and LLaVA's `model_vqa*.py` write) is a JSON object with `question_id`,
`prompt`, `text`, `answer_id`, `model_id`, `metadata`, plus whatever keys the runner copied from the question
line (`label`, `answer`, `answers`, `kind`, `lang`, `category`, `round_id`, `options`, `option_char`, ...).
Only `question_id` and `text` are required here; scorers ask for the rest with `Record.require`. A line that is
not a JSON object, lacks those keys, or repeats a (question_id, round_id) pair is an error naming file:line.
Question ids are compared as strings, so `7` and `"7"` are the same question (GQA keys are strings, VQAv2 ids
are numbers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xllava_jax.errors import UserError


class ScoreError(UserError):
    """A bad answer, question or annotation file, or a flag that does not fit the benchmark."""


@dataclass(frozen=True)
class Record:
    """One record of a data file: its fields and where it came from (`file:line` or `file: question ID`)."""

    data: dict
    where: str

    @property
    def qid(self) -> str:
        """The question id as a string."""
        return str(self.data["question_id"])

    @property
    def round_id(self) -> int:
        """The option-rotation round (0 when the line has none)."""
        return int(self.data.get("round_id", 0))

    def require(self, key: str, kind: type | tuple[type, ...] = object) -> Any:
        """The field `key`, which must be present and of type `kind`; else a ScoreError naming this record."""
        if key not in self.data:
            raise ScoreError(f"{self.where}: no `{key}` field")
        value = self.data[key]
        if not isinstance(value, kind):
            raise ScoreError(f"{self.where}: `{key}` is {type(value).__name__}, expected {_names(kind)}")
        return value


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScoreError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path) -> Any:
    """A whole JSON file; a ScoreError naming the file and the parse error when it is not JSON."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ScoreError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list[Record]:
    """Every non-blank line of a JSON-lines file as a Record; each must be a JSON object."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoreError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise ScoreError(f"{where}: expected a JSON object, got {type(data).__name__}")
        records.append(Record(data, where))
    return records


def _check_id(record: Record) -> None:
    qid = record.require("question_id", (int, str))
    if isinstance(qid, bool):
        raise ScoreError(f"{record.where}: `question_id` is bool, expected int or str")
    round_id = record.data.get("round_id", 0)
    if not isinstance(round_id, int) or isinstance(round_id, bool) or round_id < 0:
        raise ScoreError(f"{record.where}: `round_id` must be a non-negative integer, got {round_id!r}")


def read_answers(path: str | Path, extra_key: Sequence[str] = ()) -> list[Record]:
    """LLaVA answer JSONL: every line needs `question_id` (int or str) and `text` (str); `round_id`, when
    present, a non-negative int. Two lines with the same (question_id, round_id) (and the same values of the
    `extra_key` fields, e.g. POPE's `category`, whose ids restart per split) are an error."""
    answers = read_jsonl(path)
    seen: dict[tuple, str] = {}
    for record in answers:
        _check_id(record)
        record.require("text", str)
        key = (record.qid, record.round_id, *(str(record.data.get(k)) for k in extra_key))
        if key in seen:
            raise ScoreError(f"{record.where}: duplicate answer for question {record.qid} round {record.round_id} "
                             f"(first at {seen[key]})")
        seen[key] = record.where
    if not answers:
        raise ScoreError(f"{path}: no answer lines")
    return answers


def load_questions(path: str | Path) -> dict[str, Record]:
    """Questions by id (string) from any of: LLaVA question JSONL (one object with `question_id` per line),
    a JSON list of such objects, VQAv2 questions JSON (`{"questions": [{"question_id", ...}]}`) or GQA
    questions JSON (`{qid: {...}}`). Duplicate ids are an error."""
    try:
        whole = json.loads(_read_text(path))
    except json.JSONDecodeError:
        whole = None  # not one JSON document: JSON lines
    if isinstance(whole, dict) and "question_id" not in whole:
        if isinstance(whole.get("questions"), list):
            items = [Record(q, f"{path}: questions[{i}]") for i, q in enumerate(whole["questions"])]
        else:
            bad = next((k for k, v in whole.items() if not isinstance(v, dict)), None)
            if bad is not None:
                raise ScoreError(f"{path}: question {bad} is not a JSON object (expected GQA's {{qid: {{...}}}})")
            return {str(k): Record({"question_id": str(k), **v}, f"{path}: question {k}") for k, v in whole.items()}
    elif isinstance(whole, list):
        items = [Record(q if isinstance(q, dict) else {"_": q}, f"{path}: [{i}]") for i, q in enumerate(whole)]
    else:
        items = read_jsonl(path)
    questions: dict[str, Record] = {}
    for record in items:
        _check_id(record)
        if record.qid in questions:
            raise ScoreError(f"{record.where}: duplicate question id {record.qid} "
                             f"(first at {questions[record.qid].where})")
        questions[record.qid] = record
    if not questions:
        raise ScoreError(f"{path}: no questions")
    return questions


def model_id(answers: Sequence[Record]) -> str | None:
    """The answers' `model_id` (several distinct ones joined by ','; None when no line has one)."""
    ids = sorted({str(a.data["model_id"]) for a in answers if a.data.get("model_id") is not None})
    return ",".join(ids) if ids else None


def by_question(answers: Sequence[Record], round_id: int = 0) -> dict[str, Record]:
    """The answers of one round by question id."""
    return {a.qid: a for a in answers if a.round_id == round_id}

