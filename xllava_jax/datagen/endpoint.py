"""What `datagen run` and `datagen translate` share: the endpoint, cost and request settings, and one journaled,
resumable, budgeted run of requests into an output folder (`RequestRun`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.api.client import ApiError, BudgetExceeded, ChatClient, ChatReply
from xllava_jax.datagen import export as ex
from xllava_jax.datagen.runner import ACCEPTED, API_ERROR, DROPPED, REJECTED, Finished, Journal, run_parallel
from xllava_jax.datagen.sources import DatagenError


@dataclass(frozen=True, kw_only=True)
class EndpointSettings:
    """Output folder, endpoint, cost, retry and request settings (keyword-only; subclasses add their own)."""

    out: str
    api_base: str
    model: str
    concurrency: int = 4
    budget_usd: float | None = None
    price_in: float = 0.01
    price_out: float = 0.03
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_attempts: int = 2
    temperature: float = 0.7
    templates: str | None = None
    min_script_share: float = 0.6
    json_mode: bool = True
    api_key_env: str = "OPENAI_API_KEY"
    progress: bool = False

    def check_counts(self) -> None:
        """Raise DatagenError when `max_attempts` or `concurrency` is below 1."""
        if self.max_attempts < 1 or self.concurrency < 1:
            raise DatagenError("`max_attempts` and `concurrency` must be >= 1")


class RequestRun:
    """One run of requests into `settings.out`: its journals (accepted.jsonl, rejected.jsonl, loaded on creation,
    their warnings on stderr), the chat client with what is left of the budget over all runs, and the endpoint
    failures seen."""

    def __init__(self, settings: EndpointSettings):
        self.settings = settings
        out = Path(settings.out)
        self.accepted, self.rejected = Journal(out / ex.ACCEPTED_FILE), Journal(out / ex.REJECTED_FILE)
        done_lines, warning_a = self.accepted.load()
        rejected_lines, warning_r = self.rejected.load()
        for warning in (warning_a, warning_r):
            if warning:
                print(warning, file=sys.stderr)
        self.done = {r["key"] for r in done_lines}
        self.attempts = Counter(r["key"] for r in rejected_lines if r.get("counts", True))
        self.errors: list[str] = []
        if not os.environ.get(settings.api_key_env):
            print(f"note: ${settings.api_key_env} is not set; requests carry no API key", file=sys.stderr)
        budget = None
        if settings.budget_usd is not None:
            budget = settings.budget_usd - ex.spent_usd(out, settings.price_in, settings.price_out)
        self.client = ChatClient(settings.api_base, settings.model, api_key_env=settings.api_key_env,
                                 timeout_s=settings.timeout_s, max_retries=settings.max_retries,
                                 backoff_s=settings.backoff_s, price_in_per_1k=settings.price_in,
                                 price_out_per_1k=settings.price_out, budget_usd=budget)

    def next_attempt(self, key: str) -> int | None:
        """The attempt number the work item `key` is due for; None when it is accepted or out of attempts."""
        if key in self.done or self.attempts[key] >= self.settings.max_attempts:
            return None
        return self.attempts[key] + 1

    def journal(self, outcome: str, line: dict) -> str:
        """Append `line` to accepted.jsonl (outcome ACCEPTED) or rejected.jsonl; the outcome, DROPPED once closed."""
        journal = self.accepted if outcome == ACCEPTED else self.rejected
        return outcome if journal.append(line) else DROPPED

    def chat(self, base: dict, messages: list[dict], *, max_tokens: int, seed: int) -> ChatReply | str:
        """The reply to `messages`, or, after an endpoint failure (journaled with the fields of `base`), the
        outcome name. BudgetExceeded propagates."""
        s = self.settings
        try:
            return self.client.chat(messages, temperature=s.temperature, max_tokens=max_tokens,
                                    response_format={"type": "json_object"} if s.json_mode else None, seed=seed)
        except BudgetExceeded:
            raise
        except ApiError as err:
            self.errors.append(str(err))
            line = {**base, "reasons": ["api_error"], "details": [str(err)], "counts": False, "usage": None}
            return self.journal(API_ERROR, line)

    def until_accepted(self, attempt_once: Callable[[int], str], first: int) -> str:
        """Call `attempt_once(attempt)` from `first` until an outcome is not REJECTED or `max_attempts` is
        reached; the last outcome."""
        outcome = REJECTED
        for attempt in range(first, self.settings.max_attempts + 1):
            outcome = attempt_once(attempt)
            if outcome != REJECTED:
                break
        return outcome

    def run(self, jobs: list, work: Callable[[object], str], desc: str,
            export: Callable[[str | None], dict]) -> Finished:
        """Run `work` on every job in parallel, close the journals, and unless interrupted call
        `export(stopped)` for the summary."""
        s = self.settings
        result = run_parallel(jobs, work, total=len(jobs), concurrency=s.concurrency,
                              journals=(self.accepted, self.rejected), desc=desc, progress=s.progress)
        self.accepted.close()
        self.rejected.close()
        summary = None if result.stopped == "interrupted" else export(result.stopped)
        return Finished(result, summary, len(self.done), self.errors[-1] if self.errors else "")
