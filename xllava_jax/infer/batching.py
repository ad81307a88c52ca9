"""Batched and streamed generation for the server: `Job`s (validated requests) in, `Answer`s out.

`Batcher` runs a worker thread that collects up to `max_batch` queued jobs (waiting at most `wait_s` after
the first), groups those with equal sampling settings and answers each group with ONE batched generate
(`generate_rows`). max_tokens is rounded up to a bucket (the next power of two, at least 16) and the batch
to a power-of-two size, so few programs compile; each row is then cut to its own max_tokens and stop
strings. `stream_answer` generates one job token by token. Both run under the caller's engine lock.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xllava_jax.infer.engine import Answer, Engine
from xllava_jax.infer.generate import GenerationConfig
from xllava_jax.infer.openai_protocol import SEED_MODULUS, APIError, Sampling


def new_token_bucket(max_tokens: int) -> int:
    """The number of tokens actually generated for `max_tokens`: the next power of two, at least 16."""
    return max(16, 1 << (max_tokens - 1).bit_length())


@dataclass
class Job:
    """One validated request: prompt ids int[P], its image float32[H, W, 3] or None, its own limits."""

    prompt: list[int]
    image: np.ndarray | None
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    done: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None
    error: BaseException | None = None


def _config(engine: Engine, jobs: list[Job]) -> GenerationConfig:
    """The generate settings of `jobs` (equal sampling); a fresh random seed when they carry none, so requests
    without a seed never repeat one sample (rows of one batch draw apart from each other under one seed)."""
    s = jobs[0].sampling
    seed = secrets.randbelow(SEED_MODULUS) if s.seed is None else s.seed
    return engine.generation_config(max_new_tokens=new_token_bucket(max(j.max_tokens for j in jobs)),
                                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=seed)


def generate_rows(engine: Engine, jobs: list[Job], batch_size: int) -> list[Answer]:
    """Answer `jobs` (equal sampling settings) with ONE batched `Engine.generate` of at least `batch_size`
    rows; each row is cut to its own max_tokens (finish_reason "length") and stop strings."""
    return engine.generate([job.prompt for job in jobs], [job.image for job in jobs], _config(engine, jobs),
                           batch_size=batch_size, limits=[job.max_tokens for job in jobs],
                           stops=[job.stop for job in jobs])


def stream_answer(engine: Engine, job: Job, emit: Callable[[str], None]) -> tuple[int, str]:
    """Generate one answer with `Engine.stream`, calling `emit(delta)` with each text delta; returns
    (completion tokens, finish_reason). The text equals `generate_rows`' for the same job."""
    stream = engine.stream(job.prompt, job.image, _config(engine, [job]), job.stop, limit=job.max_tokens)
    for delta in stream:
        emit(delta)
    return stream.completion_tokens, stream.finish_reason


class Batcher:
    """Runs queued non-streaming jobs in batched generate calls on a worker thread.

    `batch_sizes` lists how many requests each generate call served (a hook for tests and logs).
    """

    def __init__(self, engine: Engine, lock: threading.Lock, *, max_batch: int = 8, wait_s: float = 0.01):
        self.engine, self.lock, self.max_batch, self.wait_s = engine, lock, max_batch, wait_s
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closing = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="xllava-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Answer:
        """Queue `job` and wait for its answer (re-raises the generate call's error)."""
        with self._submit_lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error")
            self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.answer

    def close(self) -> None:
        """Finish the jobs queued so far, then stop the worker."""
        with self._submit_lock:
            if self._closing:
                return
            self._closing = True
            self._queue.put(None)
        self._thread.join()

    def _collect(self) -> list[Job]:
        """The first queued job and those arriving within `wait_s` after it, up to `max_batch`."""
        first = self._queue.get()
        if first is None:
            return []
        jobs, deadline = [first], time.monotonic() + self.wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # seen again by the next _collect, which ends the loop
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while jobs := self._collect():
            groups: dict[Sampling, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.sampling, []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        try:
            with self.lock:
                answers = generate_rows(self.engine, jobs, min(self.max_batch, 1 << (len(jobs) - 1).bit_length()))
            self.batch_sizes.append(len(jobs))
        except Exception as e:  # noqa: BLE001 - handed to the waiting request threads, which answer 500
            for job in jobs:
                job.error = e
                job.done.set()
            return
        for job, answer in zip(jobs, answers):
            job.answer = answer
            job.done.set()
