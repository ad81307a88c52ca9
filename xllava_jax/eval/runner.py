"""`xllava eval run`: answer a benchmark's questions with a checkpoint, as LLaVA answer JSONL.

Answers go to `OUT/answers.jsonl` line by line as batches finish; a rerun skips the (question_id, round_id)
pairs already there, and a last line cut short by a crash is dropped (with a warning) and redone.

Sharding: within a process, each batch is laid out over the local devices along the mesh's 'data' axis
(the batch size is rounded up to a multiple of the device count). With several processes
(`jax.process_count() > 1`), the question list is cut into batches and process i answers batches
i, i + n, i + 2n, ... into `OUT/answers.part{i}.jsonl`; after a barrier, process 0 merges the parts (in
question order) into `OUT/answers.jsonl` once every question is answered, and removes them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh
from tqdm import tqdm

from xllava_jax.errors import UserError
from xllava_jax.eval.questions import Question, answer_key, read_questions
from xllava_jax.infer.engine import Engine
from xllava_jax.sharding import MESH_AXES


class AnswerFileError(UserError):
    """An answers file that cannot be resumed from (a bad line that is not a cut-short last line)."""


@dataclass(frozen=True)
class RunOptions:
    """The settings of one `eval run` (see the command's --help)."""

    benchmark: str
    ckpt: str | Path
    data: str | Path
    out: str | Path
    image_root: str | Path | None = None
    batch_size: int = 8
    max_new_tokens: int = 128
    template: str | None = None  # None: resolved by Engine.load (convert.prompt.resolve_prompt)
    mode: str | None = None
    lang: str | None = None
    limit: int | None = None
    all_rounds: bool = False
    temperature: float = 0.0
    num_devices: int | None = None


def local_mesh(num_devices: int | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh of shape (n, 1, 1) over the first n of this process's devices."""
    devices = jax.local_devices()
    n = num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise UserError(f"`num_devices` {n}: this process has {len(devices)} device(s)")
    return Mesh(np.array(devices[:n]).reshape(n, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def shard_batches(items: Sequence[Any], batch_size: int, index: int, count: int) -> list[list[Any]]:
    """Process `index` of `count`'s share: batches index, index + count, ... of `items` cut into batches."""
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches[index::count]


def read_answer_lines(path: Path) -> list[tuple[tuple[str, int], str]]:
    """(key, line) of each answer line of `path` (none when missing). A last line cut short by a crash
    is removed from the file with a warning; any other bad line raises AnswerFileError (file:line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    raws = data.split(b"\n")
    out, offset = [], 0
    for number, raw in enumerate(raws, 1):
        if raw.strip():
            try:
                line = json.loads(raw)
            except ValueError:
                if number == len(raws):  # no newline after it: the write was cut short
                    print(f"warning: {path}:{number}: dropping a cut-short last line; it is answered again",
                          file=sys.stderr)
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                    return out
                raise AnswerFileError(f"{path}:{number}: not valid JSON; fix or remove the line") from None
            if not isinstance(line, dict) or "question_id" not in line:
                raise AnswerFileError(f"{path}:{number}: not an answer line (no question_id)")
            out.append((answer_key(line["question_id"], line.get("round_id", 0)), raw.decode("utf-8")))
        offset += len(raw) + 1
    if data and not data.endswith(b"\n"):  # a complete last line without its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    return out


def merge_parts(out: Path, questions: Sequence[Question], count: int) -> bool:
    """Merge `answers.part*.jsonl` into `answers.jsonl` in question order (answers to questions outside
    `questions` kept after them) and remove the parts. Does nothing, with a warning, while a question is
    unanswered; returns whether it merged."""
    parts = [out / f"answers.part{i}.jsonl" for i in range(count)]
    lines: dict[tuple[str, int], str] = {}
    for path in [out / "answers.jsonl", *parts]:
        for key, line in read_answer_lines(path):
            lines.setdefault(key, line)
    missing = sum(q.key not in lines for q in questions)
    if missing:
        print(f"warning: {missing} questions are unanswered; the parts stay until a rerun completes them",
              file=sys.stderr)
        return False
    ordered = [lines.pop(q.key) for q in questions] + list(lines.values())
    tmp = out / "answers.jsonl.tmp"
    tmp.write_text("".join(f"{line}\n" for line in ordered), encoding="utf-8")
    os.replace(tmp, out / "answers.jsonl")
    for path in parts:
        path.unlink(missing_ok=True)
    return True


def _inputs(engine: Engine, batch: list[Question], max_new_tokens: int) -> tuple[list[list[int]], list]:
    """Prompt ids and images float32[H, W, 3] (or None) of a batch; errors name the question's line."""
    prompts, images = [], []
    for q in batch:
        try:
            ids = engine.prompt_ids([("human", q.prompt)], with_image=q.image is not None)
            if isinstance(q.image, bytes):
                images.append(engine.load_image(q.image, name=f"{q.where}: image"))
            else:
                images.append(None if q.image is None else engine.load_image(q.image, name=f"{q.where}: {q.image}"))
        except UserError as e:
            raise UserError(str(e) if str(e).startswith(q.where) else f"{q.where}: {e}") from None
        if len(ids) + max_new_tokens > engine.max_context:
            raise UserError(f"{q.where}: the prompt ({len(ids)} tokens) plus `max_new_tokens` {max_new_tokens} "
                            f"exceeds the model's context of {engine.max_context}")
        prompts.append(ids)
    return prompts, images


def run_eval(opts: RunOptions, *, engine: Engine | None = None,
             process: tuple[int, int] | None = None) -> dict[str, Any]:
    """Answer the questions of `opts.data` (this process's share) and write them; returns the summary
    {answers, questions, answered_now, skipped, seconds}. `engine` reuses a loaded model; `process`
    (index, count) defaults to JAX's process index and count."""
    start = time.perf_counter()
    index, count = process or (jax.process_index(), jax.process_count())
    if opts.batch_size < 1 or opts.max_new_tokens < 1 or (opts.limit is not None and opts.limit < 1):
        raise UserError("`batch_size`, `max_new_tokens` and `limit` must be at least 1")
    questions = read_questions(opts.data, opts.benchmark, image_root=opts.image_root, lang=opts.lang,
                               all_rounds=opts.all_rounds, limit=opts.limit)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("answers.jsonl" if count == 1 else f"answers.part{index}.jsonl")
    answered = {key for key, _ in read_answer_lines(path)}
    if count > 1:
        answered |= {key for key, _ in read_answer_lines(out / "answers.jsonl")}
    mine = [q for batch in shard_batches(questions, opts.batch_size, index, count) for q in batch]
    todo = [q for q in mine if q.key not in answered]
    if todo:
        engine = engine or Engine.load(opts.ckpt, template=opts.template, mode=opts.mode,
                                       mesh=local_mesh(opts.num_devices))
        config = engine.generation_config(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature)
        metadata = {"template": engine.template, "mode": engine.mode, "temperature": opts.temperature,
                    "max_new_tokens": opts.max_new_tokens}
        with open(path, "a", encoding="utf-8") as f, \
                tqdm(total=len(todo), unit="question", desc=f"eval {opts.benchmark}", file=sys.stderr) as bar:
            for i in range(0, len(todo), opts.batch_size):
                batch = todo[i:i + opts.batch_size]
                prompts, images = _inputs(engine, batch, opts.max_new_tokens)
                answers = engine.generate(prompts, images, config, batch_size=opts.batch_size)
                for q, answer in zip(batch, answers):
                    line = {"question_id": q.question_id, "prompt": q.prompt, "text": answer.text,
                            "answer_id": uuid.uuid4().hex[:22], "model_id": engine.model_id, "metadata": metadata,
                            **q.fields}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
    if count > 1:
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("xllava eval run: parts written")
        if index == 0 and merge_parts(out, questions, count):
            path = out / "answers.jsonl"
    return {"answers": str(path), "questions": len(questions), "answered_now": len(todo),
            "skipped": len(mine) - len(todo), "seconds": round(time.perf_counter() - start, 3)}
