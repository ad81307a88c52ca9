"""What makes generation and translation resumable: append-only JSONL journals and a bounded parallel loop.

A journal line is one JSON object with a `key` (the work item), written with one `write()` and a flush
under a lock, so a crash can at worst leave an unterminated last line; `Journal.load` reports and removes
exactly that line and refuses any other damage. `run_parallel` calls a work function on items in daemon
threads, at most `concurrency` at a time, and stops cleanly on a budget, on repeated endpoint failures or
on Ctrl-C (the journals are closed under their lock, so in-flight results are dropped whole and redone
on the next run).
"""

from __future__ import annotations

import json
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from xllava_jax.api.client import BudgetExceeded
from xllava_jax.datagen.sources import DatagenError
from xllava_jax.jsonl import JournalError, read_journal

ACCEPTED, REJECTED, API_ERROR, DROPPED = "accepted", "rejected", "api_error", "dropped"


class Journal:
    """An append-only JSONL file of records that each carry a `key`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = None
        self._closed = False

    def load(self) -> tuple[list[dict], str | None]:
        """(records, warning): every complete line, in order. An unterminated final line (a crash mid-write)
        is removed from the file and reported in `warning`; any other bad line raises DatagenError."""
        try:
            records, warning = read_journal(
                self.path, check=lambda record: None if isinstance(record.get("key"), str) else "record without a key")
        except JournalError as e:
            raise DatagenError(str(e)) from None
        return records, warning and f"{warning}; its work item will be redone"

    def append(self, record: dict) -> bool:
        """Write one record as one line and flush; False (nothing written) once the journal is closed."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._closed:
                return False
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            return True

    def close(self) -> None:
        """Stop accepting records (later appends return False) and close the file."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None


@dataclass
class RunResult:
    """How a parallel run ended: `outcomes` counted by name, and `stopped` (None when every item ran;
    "budget", "errors" or "interrupted") with a one-line `message`."""

    outcomes: Counter = field(default_factory=Counter)
    stopped: str | None = None
    message: str = ""


@dataclass
class Finished:
    """The end of a generation or translation: the parallel loop's result, the summary (None when interrupted),
    the accepted count before this run, and the last endpoint failure seen."""

    run: RunResult
    summary: dict | None
    accepted_before: int
    last_api_error: str = ""

    @property
    def saved(self) -> int:
        """Accepted records in the journal now."""
        return self.accepted_before + self.run.outcomes[ACCEPTED]


def run_parallel(items: Iterable, work: Callable[[object], str], *, total: int, concurrency: int,
                 journals: Iterable[Journal], desc: str, max_consecutive_errors: int = 8,
                 progress: bool = True) -> RunResult:
    """Call `work(item)` (returns an outcome name: accepted, rejected, api_error, dropped) on every item, in up to
    `concurrency` threads. Stops submitting on BudgetExceeded (waits for calls in flight), after
    `max_consecutive_errors` api_error outcomes in a row, or on Ctrl-C (closes `journals` at once and returns).
    A run that ends with any api_error outcome is `stopped` "errors" too (its items are left for a rerun).
    Any other exception of a work call is raised after the calls in flight have ended."""
    if concurrency < 1:
        raise DatagenError(f"concurrency {concurrency}: must be >= 1")
    todo: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def worker() -> None:
        """Run jobs from `todo` until a None arrives; results and errors go to `done`."""
        while True:
            item = todo.get()
            if item is None:
                return
            try:
                done.put((work(item), None))
            except BaseException as err:  # handed to the main thread, which decides
                done.put((None, err))

    for _ in range(concurrency):
        threading.Thread(target=worker, daemon=True).start()
    result = RunResult()
    source = iter(items)
    in_flight, streak, failure = 0, 0, None
    bar = tqdm(total=total, desc=desc, unit="item", disable=not progress)
    try:
        while True:
            while result.stopped is None and failure is None and in_flight < concurrency:
                item = next(source, None)
                if item is None:
                    break
                todo.put(item)
                in_flight += 1
            if in_flight == 0:
                break
            outcome, err = done.get()
            in_flight -= 1
            bar.update(1)
            if isinstance(err, BudgetExceeded):
                result.stopped, result.message = result.stopped or "budget", result.message or str(err)
                continue
            if err is not None:
                failure = failure or err
                continue
            result.outcomes[outcome] += 1
            streak = streak + 1 if outcome == API_ERROR else 0
            if streak >= max_consecutive_errors and result.stopped is None:
                result.stopped = "errors"
                result.message = f"{streak} requests in a row failed at the endpoint (see rejected.jsonl)"
            bar.set_postfix({k: v for k, v in result.outcomes.items() if v}, refresh=False)
    except KeyboardInterrupt:
        for journal in journals:
            journal.close()
        result.stopped, result.message = "interrupted", f"interrupted; {in_flight} requests in flight dropped"
    finally:
        bar.close()
        for _ in range(concurrency):
            todo.put(None)
    if failure is not None and result.stopped != "interrupted":
        raise failure
    if result.stopped is None and result.outcomes[API_ERROR]:  # items left undone: the run did not succeed
        result.stopped = "errors"
        result.message = (f"{result.outcomes[API_ERROR]} of {sum(result.outcomes.values())} requests failed at the "
                          "endpoint (see rejected.jsonl)")
    return result
