"""Benchmark question files -> the human-turn texts `xllava eval run` asks, with their images.

Readers (strict: a bad line or record raises `QuestionError` naming file and line, or file and record):
- LLaVA question JSONL (`question_id`, `text`, optional `image`, any other keys): LLaVA-Bench, KLLaVA-W,
  POPE (`label`), the Korean sets (BOK-VQA, KoViz, KoLiv: `label`), the synthetic held-out split, and
  LLaVA's own VQAv2 / GQA / KVQA question JSONL.
- VQAv2 questions JSON `{"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}`:
  images `COCO_{split}_{image_id:012d}.jpg`, split = `data_subtype` (`test-dev2015` images live in `test2015`).
- GQA questions JSON `{qid: {"imageId", "question", ...}}`: images `{imageId}.jpg`; `imageId` and `answer`
  are copied to the answer lines (the scorer reads the rest from the questions file).
- MMBench-style TSV (`index`, `question`, `hint`, `A`..`E`, `answer`, `category`, `image` base64); K-MMBench,
  K-SEED, K-MMStar and K-DTCBench share it. Options are the letters with a non-empty value.

Prompts: short-answer benchmarks get the "single word or phrase" instruction on a new line (unless the text
already ends with one); multiple-choice prompts are hint + question + "A. ..." option lines + the letter
instruction, as LLaVA's `model_vqa_mmbench` builds them. With `all_rounds`, round r shows the options shifted
by r (circular evaluation); each round's `answer` is the gold letter in that round's order.
Language: a line's `lang` key, else the `lang` argument, else the benchmark's (Korean for the Korean sets).
Image paths never leave the image root (`..`, absolute paths and symlinks out are refused).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllava_jax.data.synth_phrases import SUFFIX
from xllava_jax.data.vif import PathEscapeError, resolve_image
from xllava_jax.errors import UserError

SHORT_ANSWER = ("vqav2", "kvqa", "gqa", "pope", "bokvqa_ko", "bokvqa_en", "koviz", "koliv", "synth_vqa")
MULTIPLE_CHOICE = ("mmbench", "kmmbench", "kseed", "kmmstar", "kdtcbench")
OPEN_ENDED = ("llava_bench", "kllava_w")
BENCHMARKS = SHORT_ANSWER + MULTIPLE_CHOICE + OPEN_ENDED
KOREAN = ("bokvqa_ko", "koviz", "koliv", "kvqa", "kmmbench", "kseed", "kmmstar", "kdtcbench", "kllava_w")
MC_INSTRUCTION = {"en": "Answer with the option's letter from the given choices directly.",
                  "ko": "주어진 선택지 중 해당 옵션의 문자로 직접 답하세요.",
                  "zh": "请直接回答选项字母。"}
LETTERS = "ABCDE"
# Answer-line keys the runner writes itself; a question line's own values for them are not copied.
RESERVED = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


class QuestionError(UserError):
    """A question file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    """One prompt to answer. image: a resolved file path, encoded bytes (TSV) or None (text only);
    fields: keys copied to the answer line (for multiple choice: round_id, options, option_char, answer)."""

    question_id: Any
    prompt: str
    image: Path | bytes | None
    where: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        """(question id as a string, round id): what identifies an answer line."""
        return answer_key(self.question_id, self.fields.get("round_id", 0))


def answer_key(question_id: Any, round_id: Any = 0) -> tuple[str, int]:
    """The identity of an answer line: its question id as a string (7 and "7" are one question, as the
    scorers read them) and its round."""
    return str(question_id), int(round_id or 0)


def default_lang(benchmark: str) -> str:
    return "ko" if benchmark in KOREAN else "en"


def with_short_answer(text: str, lang: str) -> str:
    """`text` plus the short-answer instruction in `lang` on a new line, unless it ends with one already."""
    if any(text.rstrip().endswith(s) for s in SUFFIX.values()):
        return text
    return f"{text}\n{SUFFIX[lang]}"


def multiple_choice_prompt(question: str, hint: str | None, options: list[str], lang: str) -> str:
    """LLaVA's MMBench prompt: hint, question, one `X. option` line per option, the letter instruction."""
    text = f"{hint}\n{question}" if hint else question
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return f"{text}\n{MC_INSTRUCTION[lang]}"


class _Reader:
    """Shared state of one question file: benchmark, language, image root and duplicate ids."""

    def __init__(self, path: Path, benchmark: str, image_root: Path, lang: str | None, all_rounds: bool):
        if benchmark not in BENCHMARKS:
            raise QuestionError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        self.path, self.benchmark, self.image_root, self.all_rounds = path, benchmark, image_root, all_rounds
        self.lang = lang or default_lang(benchmark)
        self.seen: dict[tuple[str, int], str] = {}

    def fail(self, where: str, problem: str) -> QuestionError:
        return QuestionError(f"{self.path}:{where}: {problem}")

    def language(self, where: str, value: Any) -> str:
        lang = self.lang if value is None else value
        if lang not in SUFFIX:
            raise self.fail(where, f"unsupported lang {lang!r}; use one of {', '.join(SUFFIX)}")
        return lang

    def image(self, where: str, relpath: Any) -> Path:
        if not isinstance(relpath, str):
            raise self.fail(where, f"image must be a string path, got {type(relpath).__name__}")
        try:
            path = resolve_image(self.image_root, relpath)
        except PathEscapeError as e:
            raise self.fail(where, str(e)) from None
        if not path.is_file():
            raise self.fail(where, f"image {relpath!r} not found under {self.image_root}")
        return path

    def question(self, where: str, qid: Any, prompt: str, image: Path | bytes | None, fields: dict) -> Question:
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise self.fail(where, f"question_id must be a string or an integer, got {qid!r}")
        q = Question(qid, prompt, image, f"{self.path}:{where}", fields)
        if q.key in self.seen:
            raise self.fail(where, f"duplicate question_id {qid!r} (first at {self.seen[q.key]})")
        self.seen[q.key] = where
        return q

    def ask(self, text: str, lang: str) -> str:
        return with_short_answer(text, lang) if self.benchmark in SHORT_ANSWER else text


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_llava_jsonl(reader: _Reader, limit: int | None) -> list[Question]:
    out = []
    for number, line in _jsonl_lines(reader.path):
        if limit is not None and len(out) >= limit:
            break
        where = str(number)
        if not isinstance(line, dict):
            raise reader.fail(where, f"expected a JSON object, got {type(line).__name__}")
        missing = [k for k in ("question_id", "text") if k not in line]
        if missing:
            raise reader.fail(where, f"missing key(s) {missing}")
        if not isinstance(line["text"], str) or not line["text"].strip():
            raise reader.fail(where, "text must be a non-empty string")
        lang = reader.language(where, line.get("lang"))
        image = reader.image(where, line["image"]) if line.get("image") is not None else None
        fields = {k: v for k, v in line.items() if k not in RESERVED}
        out.append(reader.question(where, line["question_id"], reader.ask(line["text"], lang), image, fields))
    return out


def _read_vqav2_json(reader: _Reader, data: dict, limit: int | None) -> list[Question]:
    split = data.get("data_subtype")
    if not isinstance(split, str) or not isinstance(data.get("questions"), list):
        raise reader.fail("1", "a VQAv2 questions file needs a data_subtype string and a questions list")
    split = "test2015" if split == "test-dev2015" else split
    out = []
    for i, item in enumerate(data["questions"][:limit]):
        where = f"questions[{i}]"
        if not isinstance(item, dict) or not all(k in item for k in ("question_id", "image_id", "question")):
            raise reader.fail(where, "needs question_id, image_id and question")
        if not isinstance(item["image_id"], int) or not isinstance(item["question"], str):
            raise reader.fail(where, "image_id must be an integer and question a string")
        image = reader.image(where, f"COCO_{split}_{item['image_id']:012d}.jpg")
        lang = reader.language(where, None)
        out.append(reader.question(where, item["question_id"], reader.ask(item["question"], lang), image,
                                   {"image_id": item["image_id"]}))
    return out


def _read_gqa_json(reader: _Reader, data: dict, limit: int | None) -> list[Question]:
    out = []
    for qid, item in list(data.items())[:limit]:
        where = f"question {qid}"
        if not isinstance(item, dict) or not isinstance(item.get("imageId"), str) or \
                not isinstance(item.get("question"), str):
            raise reader.fail(where, "needs imageId and question strings")
        image = reader.image(where, f"{item['imageId']}.jpg")
        fields = {k: item[k] for k in ("imageId", "answer") if k in item}
        lang = reader.language(where, None)
        out.append(reader.question(where, qid, reader.ask(item["question"], lang), image, fields))
    return out


def _cell(row: dict[str, str | None], name: str) -> str | None:
    """A TSV cell; empty and pandas' "nan" count as absent."""
    value = row.get(name)
    if value is None or not value.strip() or value.strip().lower() == "nan":
        return None
    return value


def _read_tsv(reader: _Reader, limit: int | None) -> list[Question]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    out = []
    with open(reader.path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        missing = [k for k in ("index", "question", "image") if k not in (rows.fieldnames or [])]
        if missing:
            raise reader.fail("1", f"missing column(s) {missing}")
        extra = [k for k in rows.fieldnames if k not in ("index", "question", "hint", "image", "answer", *LETTERS)]
        count = 0
        for row in rows:
            where = str(rows.line_num)
            if limit is not None and count >= limit:
                break
            count += 1
            if None in row or any(row[k] is None for k in ("index", "question", "image")):
                raise reader.fail(where, "wrong number of columns")
            options = [row[k] for k in LETTERS if _cell(row, k) is not None]
            if len(options) < 2:
                raise reader.fail(where, "needs at least two options (columns A, B, ...)")
            gold = _cell(row, "answer")
            if gold is not None and gold.strip() not in LETTERS[:len(options)]:
                raise reader.fail(where, f"answer {gold!r} is not one of the option letters")
            try:
                image = base64.b64decode("".join(row["image"].split()), validate=True)
            except (binascii.Error, ValueError):
                raise reader.fail(where, "image is not valid base64") from None
            try:
                qid: Any = int(row["index"])
            except ValueError:
                qid = row["index"]
            lang = reader.language(where, _cell(row, "lang"))
            copied = {k: row[k] for k in extra if _cell(row, k) is not None}
            for r in range(len(options) if reader.all_rounds else 1):
                shown = options[r:] + options[:r]
                fields = {**copied, "round_id": r, "options": shown, "option_char": list(LETTERS[:len(shown)])}
                if gold is not None:
                    fields["answer"] = LETTERS[(LETTERS.index(gold.strip()) - r) % len(options)]
                prompt = multiple_choice_prompt(row["question"], _cell(row, "hint"), shown, lang)
                out.append(reader.question(where, qid, prompt, image, fields))
    return out


def read_questions(path: str | Path, benchmark: str, *, image_root: str | Path | None = None,
                   lang: str | None = None, all_rounds: bool = False, limit: int | None = None) -> list[Question]:
    """The questions of `path` for `benchmark` (see the module docstring for formats). image_root defaults
    to the file's directory; `limit` keeps the first N questions (before expanding rounds)."""
    path = Path(path)
    if not path.is_file():
        raise QuestionError(f"{path}: no such question file")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise QuestionError(f"{root}: image root is not a directory")
    reader = _Reader(path, benchmark, root, lang, all_rounds)
    if benchmark in MULTIPLE_CHOICE:
        return _read_tsv(reader, limit)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        data = None  # JSON lines
    except UnicodeDecodeError as e:
        raise QuestionError(f"{path}: not UTF-8 text ({e.reason})") from None
    if isinstance(data, dict) and "questions" in data:
        return _read_vqav2_json(reader, data, limit)
    if isinstance(data, dict) and data and "question_id" not in data:
        return _read_gqa_json(reader, data, limit)
    return _read_llava_jsonl(reader, limit)
