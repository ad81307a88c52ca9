"""`xllava datagen translate`: machine translation of an English LLaVA-format dataset (how the recipe's Korean
halves of the stage-1 captions and of LLaVA-Instruct were made), resumable and validated like generation.

Per record one request carries the list of its turn texts without `<image>` as JSON and asks for
`{"turns": [...]}` back; a reply is accepted when it has the same number of non-empty strings, no
`<image>` tag and the target script. The tag is then put back exactly where it was (start or end of its
turn, with the same whitespace). Records whose tag sits inside a text are reported and skipped. Outputs:
`OUT/accepted.jsonl`, `OUT/rejected.jsonl` (appended as it goes), and `OUT/translated_<lang>.json` in
source order plus `OUT/summary.json` at the end. Keys are record ids (`id#2`, `id#3` for repeats).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.api.client import user_message
from xllava_jax.data.vif import IMAGE_TAG, Problem, VifRecord, read_corpus
from xllava_jax.datagen import export as ex
from xllava_jax.datagen.endpoint import EndpointSettings, RequestRun
from xllava_jax.datagen.prompts import translate_prompt
from xllava_jax.datagen.runner import ACCEPTED, REJECTED, Finished, Journal
from xllava_jax.datagen.sources import DatagenError
from xllava_jax.datagen.validate import SCRIPTS, Verdict, check_languages, parse_json_object, script_share

_AT_START = re.compile(r"(\s*<image>\s*)(.*?)(\s*)", re.S)
_AT_END = re.compile(r"(\s*)(.*?)(\s*<image>\s*)", re.S)
MAX_GROWTH, MAX_PROBLEMS_SHOWN = 4, 10


@dataclass(frozen=True, kw_only=True)
class TranslateSettings(EndpointSettings):
    """Everything `translate` needs; src, source_lang and target must not change between runs of one folder."""

    src: str
    target: str = "ko"
    source_lang: str = "en"
    max_records: int | None = None
    temperature: float = 0.2
    min_script_share: float = 0.5


@dataclass(frozen=True)
class Job:
    """One record to translate: its key, the record, and each turn as (prefix, text, suffix)."""

    key: str
    record: VifRecord
    parts: tuple[tuple[str, str, str], ...]
    attempt: int = 1


def split_image_tag(value: str) -> tuple[str, str, str] | None:
    """(prefix, text, suffix) with `<image>` and the whitespace around it in prefix or suffix, so that
    prefix + text + suffix == value; None when the tag sits inside the text or appears twice."""
    if IMAGE_TAG not in value:
        stripped = value.strip()
        start = value.find(stripped) if stripped else len(value)
        return value[:start], stripped, value[start + len(stripped):]
    if value.count(IMAGE_TAG) > 1:
        return None
    for pattern in (_AT_START, _AT_END):
        m = pattern.fullmatch(value)
        if m and IMAGE_TAG not in m.group(2):
            return m.group(1), m.group(2), m.group(3)
    return None


def _jobs(settings: TranslateSettings) -> tuple[list[Job], list[Problem]]:
    """Every usable record of the source as a job, and the problems of the others."""
    jobs, problems, seen = [], [], Counter()
    for item in read_corpus(settings.src):
        if settings.max_records is not None and len(jobs) >= settings.max_records:
            break
        if isinstance(item, Problem):
            problems.append(item)
            continue
        parts = [split_image_tag(text) for _, text in item.turns]
        if any(p is None for p in parts):
            problems.append(Problem(settings.src, item.where, item.id, f"{IMAGE_TAG} inside a text, not at its start "
                                                                      "or end; not translated"))
            continue
        seen[item.id] += 1
        key = item.id if seen[item.id] == 1 else f"{item.id}#{seen[item.id]}"
        jobs.append(Job(key, item, tuple(parts)))
    return jobs, problems


def check_translation(text: str, sources: list[str], *, target: str, min_script_share: float,
                      finish_reason: str | None = None) -> Verdict:
    """Validate a translation reply of `sources` (the texts sent): `{"turns": [str, ...]}` (or a bare list)."""
    verdict = Verdict()
    data = parse_json_object(text)
    if data is None:
        try:
            data = json.loads(text)
        except ValueError:
            code = "truncated" if finish_reason == "length" else "invalid_json"
            return verdict.reject(code, f"not JSON: {text[:80]!r}")
    turns = data.get("turns") if isinstance(data, dict) else data
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        return verdict.reject("bad_shape", 'expected {"turns": [strings]}')
    if any(IMAGE_TAG in t for t in turns):
        return verdict.reject("bad_shape", f"a translation holds {IMAGE_TAG}")
    if len(turns) != len(sources):
        return verdict.reject("turn_count", f"{len(turns)} texts, expected {len(sources)}")
    bad = [i for i, (t, s) in enumerate(zip(turns, sources)) if not t.strip() or len(t) > MAX_GROWTH * len(s) + 50]
    if bad:
        verdict.reject("answer_length", f"texts {bad} are empty or far longer than their source")
    joined = " ".join(turns)
    share = script_share(joined, target)
    if share < min_script_share and any(c.isalpha() for c in joined):
        verdict.reject(f"wrong_script:{target}", f"{share:.0%} {SCRIPTS[target]}, need {min_script_share:.0%}")
    verdict.parsed = {"turns": [t.strip() for t in turns]} if verdict.ok else None
    return verdict


def _work(settings: TranslateSettings, requests: RequestRun) -> Callable[[Job], str]:
    """The function that runs one translation job and journals its outcome."""

    def attempt_once(job: Job, attempt: int) -> str:
        """One request for the record, journaled; the outcome name."""
        sources = [text for _, text, _ in job.parts if text]
        base = {"key": job.key, "id": job.record.id, "attempt": attempt, "model": settings.model}
        messages = [user_message(translate_prompt(settings.templates, sources, settings.source_lang,
                                                  settings.target))]
        reply = requests.chat(base, messages, max_tokens=min(16384, max(256, 4 * sum(len(s) for s in sources))),
                              seed=attempt)
        if isinstance(reply, str):
            return reply
        verdict = check_translation(reply.text, sources, target=settings.target,
                                    min_script_share=settings.min_script_share, finish_reason=reply.finish_reason)
        base["usage"] = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
        if not verdict.ok:
            line = {**base, "reasons": verdict.reasons, "details": verdict.details, "counts": True, "text": reply.text}
            return requests.journal(REJECTED, line)
        translated = iter(verdict.parsed["turns"])
        values = [pre + next(translated) + post if text else pre + post for pre, text, post in job.parts]
        return requests.journal(ACCEPTED, {**base, "values": values})

    def work(job: Job) -> str:
        """Attempts until one is accepted or `max_attempts` is reached; the last outcome."""
        return requests.until_accepted(lambda attempt: attempt_once(job, attempt), job.attempt)

    return work


def _export(settings: TranslateSettings, jobs: list[Job], problems: int, stopped: str | None) -> dict:
    """Write translated_<lang>.json (source order) and summary.json; returns the summary."""
    out = Path(settings.out)
    done = {r["key"]: r for r in reversed(Journal(out / ex.ACCEPTED_FILE).load()[0])}
    rejected = Journal(out / ex.REJECTED_FILE).load()[0]
    records = []
    for job in jobs:
        if job.key in done:
            rec = {"id": job.record.id}
            if job.record.image is not None:
                rec["image"] = job.record.image
            rec["conversations"] = [{"from": role, "value": value}
                                    for (role, _), value in zip(job.record.turns, done[job.key]["values"])]
            rec["lang"] = settings.target
            records.append(rec)
    ex.write_json(out / f"translated_{settings.target}.json", records)
    attempts = Counter(r["key"] for r in rejected if r.get("counts", True))
    gave_up = sum(job.key not in done and attempts[job.key] >= settings.max_attempts for job in jobs)
    lines = list(done.values()) + rejected
    prompt = sum(int((r.get("usage") or {}).get("prompt_tokens", 0)) for r in lines)
    completion = sum(int((r.get("usage") or {}).get("completion_tokens", 0)) for r in lines)
    summary = {
        "records": len(jobs), "source_problems": problems, "translated": len(records),
        "pending": len(jobs) - len(records) - gave_up, "gave_up": gave_up, "rejections": len(rejected),
        "rejections_by_reason": dict(Counter(c for r in rejected for c in r["reasons"]).most_common()),
        "prompt_tokens": prompt, "completion_tokens": completion,
        "cost_usd": round(prompt / 1000 * settings.price_in + completion / 1000 * settings.price_out, 6),
        "budget_usd": settings.budget_usd, "stopped": stopped}
    ex.write_json(out / "summary.json", summary)
    return summary


def translate(settings: TranslateSettings) -> Finished:
    """Run (or resume) a translation into `settings.out`; exports unless interrupted."""
    try:
        check_languages([settings.source_lang, settings.target])
    except ValueError as e:
        raise DatagenError(str(e)) from None
    settings.check_counts()
    if settings.max_records is not None and settings.max_records < 1:
        raise DatagenError(f"`max_records` {settings.max_records}: must be >= 1")
    jobs, problems = _jobs(settings)
    if not jobs:
        why = f"{len(problems)} unusable, the first: {problems[0]}" if problems else "no records"
        raise DatagenError(f"{settings.src}: no record to translate ({why})")
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"skipped {problem}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more skipped source records", file=sys.stderr)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"src": str(Path(settings.src).resolve()), "source_lang": settings.source_lang,
                "target": settings.target}
    run_file = out / ex.RUN_FILE
    before = ex.read_run(out).get("identity") if run_file.is_file() else identity
    if before != identity:
        raise DatagenError(f"{run_file}: this folder was started with {before}; use the same `src`, `source_lang` "
                           "and `target` or a new `out`")
    ex.write_json(run_file, {"identity": identity, "model": settings.model, "api_base": settings.api_base})
    requests = RequestRun(settings)
    todo = [Job(j.key, j.record, j.parts, attempt) for j in jobs
            if (attempt := requests.next_attempt(j.key)) is not None]
    return requests.run(todo, _work(settings, requests), "translating",
                        lambda stopped: _export(settings, jobs, len(problems), stopped))
