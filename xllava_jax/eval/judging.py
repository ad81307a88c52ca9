"""What the LLM-judged evaluations share: strict JSONL reading, matching lines by question id, the judge
client built from its settings (endpoint, timeout, retries), images as data URLs, and a bounded thread
pool with a progress bar in which a judge call that fails for good marks its item failed instead of ending the run.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from xllava_jax.api.client import ApiError, ChatClient, image_part
from xllava_jax.data.vif import PathEscapeError, resolve_image
from xllava_jax.errors import UserError

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_CACHE_DIR = "~/.cache/xllava/judge"
EXIT_SOME_FAILED = 3
EXIT_STATUS_HELP = f"""exit status: 0 all judged; 2 bad input, or nothing could be judged; {EXIT_SOME_FAILED} finished
and the figures written, but some judgements failed (the endpoint failed after retries, or the judge's reply
could not be read): `failed` counts them and `failed_ids` lists them, the figures leave them out, and a
rerun asks only them again (the rest come from the cache)."""
MAX_FAILURES_IN_A_ROW = 8


@dataclass(frozen=True)
class CallFailed:
    """In place of a result: the judge call failed for good (after the client's retries), for `reason` (one line)."""

    reason: str


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; UserError naming file:line on a line
    that is not a JSON object. `what` names the file's role in messages ("questions", "answers")."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: {what} file is not UTF-8 ({err.reason})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{number}: malformed JSON in {what} file ({err})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: {what} line is a {type(obj).__name__}, not an object")
        rows.append((number, obj))
    return rows


def by_question_id(path: str | Path, what: str, required: Sequence[str] = ("text",)) -> dict[str, dict]:
    """The lines of a JSONL file keyed by `str(question_id)`; UserError (file:line) on a missing id, a missing
    required key or a repeated id."""
    out: dict[str, dict] = {}
    for number, obj in read_jsonl(path, what):
        if "question_id" not in obj:
            raise UserError(f"{path}:{number}: {what} line has no question_id")
        for key in required:
            if not isinstance(obj.get(key), str):
                raise UserError(f"{path}:{number}: {what} line has no string {key!r}")
        qid = str(obj["question_id"])
        if qid in out:
            raise UserError(f"{path}:{number}: question_id {qid} appears twice in the {what} file")
        out[qid] = obj
    return out


def image_for(question: dict, image_root: str | Path, where: str) -> dict:
    """The `image_url` part of a question's image under `image_root` (which it may not leave)."""
    relpath = question.get("image")
    if not isinstance(relpath, str):
        raise UserError(f"{where}: question {question.get('question_id')} has no image path")
    try:
        path = resolve_image(image_root, relpath)
    except PathEscapeError as err:
        raise UserError(f"{where}: {err}") from None
    return image_part(path)


@dataclass(frozen=True)
class JudgeSettings:
    """Where and how to ask the judge: the endpoint (`api_base`), the judge `model`, the environment variable
    holding the API key, the reply cache, and the per-request `timeout`, `max_retries` and `backoff`."""

    api_base: str | None
    model: str
    api_key_env: str | None = None
    cache_dir: str | None = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 1.0

    def client(self) -> ChatClient:
        """The judge's ChatClient; UserError when the endpoint is missing or a request setting is out of range."""
        if not self.api_base:
            raise UserError("`api_base` is required for an LLM-judged evaluation (e.g. https://api.openai.com/v1)")
        if self.timeout <= 0 or self.max_retries < 0 or self.backoff < 0:
            raise UserError(f"`timeout` must be > 0, `max_retries` and `backoff` >= 0 (got {self.timeout:g}, "
                            f"{self.max_retries}, {self.backoff:g})")
        return ChatClient(self.api_base, self.model, api_key_env=self.api_key_env or "OPENAI_API_KEY",
                          cache_dir=self.cache_dir or DEFAULT_CACHE_DIR, timeout_s=self.timeout,
                          max_retries=self.max_retries, backoff_s=self.backoff)


def run_parallel(fn: Callable[[T], R], items: Sequence[T], concurrency: int, desc: str) -> list[R | CallFailed]:
    """`[fn(x) for x in items]` on at most `concurrency` threads, in input order, with a progress bar. A call that
    raises ApiError (the endpoint failed for good) leaves a CallFailed in its place; once MAX_FAILURES_IN_A_ROW
    calls in a row have failed, the calls not yet started are not made (CallFailed too), so a dead endpoint is
    given up in seconds. Any other exception stops the run."""
    if concurrency < 1:
        raise UserError(f"`concurrency` must be at least 1, got {concurrency}")
    lock = threading.Lock()
    in_a_row, given_up = 0, ""

    def call(item: T) -> R | CallFailed:
        """`fn(item)`, its ApiError as a CallFailed, or a CallFailed without calling once the endpoint is given up."""
        nonlocal in_a_row, given_up
        with lock:
            if given_up:
                return CallFailed(given_up)
        try:
            result = fn(item)
        except ApiError as err:
            with lock:
                in_a_row += 1
                if in_a_row >= MAX_FAILURES_IN_A_ROW and not given_up:
                    given_up = f"not sent: {in_a_row} judge calls in a row failed, the last: {err}"
            return CallFailed(str(err))
        with lock:
            in_a_row = 0
        return result

    results: list = [None] * len(items)
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(items), desc=desc, unit="q") as bar:
        futures = {pool.submit(call, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # a failing call stops the run; the cache keeps the rest
            raise
    return results


def warn_unjudged(what: str, ids: Sequence, example: str | None = None) -> None:
    """One stderr warning line listing (the first 20 of) the question ids left out for reason `what`, and the
    reason of the first when given."""
    if ids:
        shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
        tail = f"; the first: {example}" if example else ""
        print(f"xllava: warning: {len(ids)} question(s) {what}, not scored: {shown}{tail}", file=sys.stderr)
