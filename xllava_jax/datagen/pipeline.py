"""`xllava datagen run`: generate multilingual visual-instruction data with any chat-completions endpoint.

One work item is (image, task). For each item one request carries the image (a data URL), the task's
template filled with the image's main objects and two seed examples, and asks for every language at once
as strict JSON; the reply is validated and appended to `OUT/accepted.jsonl` or, with its reasons, to
`OUT/rejected.jsonl`. A rejected item is asked again at once, up to `max_attempts` requests over all runs
(endpoint failures do not count as attempts). A rerun skips accepted items; the budget covers the replies
of all runs together.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.api.client import ApiError, BudgetExceeded, ChatClient, user_message
from xllava_jax.datagen import export as ex
from xllava_jax.datagen.prompts import TASKS, TaskSpec, load_tasks, system_prompt, task_prompt
from xllava_jax.datagen.runner import ACCEPTED, API_ERROR, DROPPED, REJECTED, Finished, Journal, run_parallel
from xllava_jax.datagen.sources import DatagenError, ImageItem, load_image_folder, load_visual_genome, select_images
from xllava_jax.datagen.validate import check_languages, validate_response

MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class GenerateSettings:
    """Everything `generate` needs; the fields of `identity()` must not change between runs of one folder."""

    out: str
    api_base: str
    model: str
    vg: str | None = None
    images: str | None = None
    objects: str | None = None
    langs: tuple[str, ...] = ("en", "ko", "zh")
    tasks: tuple[str, ...] = TASKS
    max_images: int | None = None
    min_objects: int = 3
    max_objects: int = 10
    min_object_area: float = 0.02
    seed: int = 0
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
    reject_proper_nouns: bool = False
    json_mode: bool = True
    api_key_env: str = "OPENAI_API_KEY"
    progress: bool = False

    def identity(self) -> dict:
        """The settings that decide the work items and their shape."""
        source = ({"vg": str(Path(self.vg).resolve())} if self.vg else
                  {"images": str(Path(self.images).resolve()), "objects": str(Path(self.objects).resolve())})
        return {"source": source, "langs": list(self.langs), "tasks": list(self.tasks), "seed": self.seed,
                "min_objects": self.min_objects, "max_objects": self.max_objects,
                "min_object_area": self.min_object_area}


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _check(settings: GenerateSettings) -> None:
    """Settings a user can get wrong, each reported in one line."""
    if bool(settings.vg) == bool(settings.images) or bool(settings.images) != bool(settings.objects):
        raise DatagenError("give either --vg DIR or both --images DIR and --objects FILE")
    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown or not settings.tasks:
        raise DatagenError(f"tasks {','.join(unknown) or '(none)'}: choose from {','.join(TASKS)}")
    try:
        check_languages(settings.langs)
    except ValueError as e:
        raise DatagenError(str(e)) from None
    if settings.max_attempts < 1 or settings.concurrency < 1:
        raise DatagenError("--max-attempts and --concurrency must be >= 1")
    if settings.max_images is not None and settings.max_images < 1:
        raise DatagenError(f"--max-images {settings.max_images}: must be >= 1")


def _select(settings: GenerateSettings) -> tuple[Path, list[ImageItem], int]:
    """(image root, selection, number of source problems), the problems reported on stderr."""
    source = (load_visual_genome(settings.vg, min_area=settings.min_object_area) if settings.vg
              else load_image_folder(settings.images, settings.objects))
    selection, missing = select_images(source, min_objects=settings.min_objects, max_objects=settings.max_objects,
                                       max_images=settings.max_images, seed=settings.seed)
    problems = source.problems + missing
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        _say(f"skipped {problem}")
    if len(problems) > MAX_PROBLEMS_SHOWN:
        _say(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more skipped source entries")
    if not selection:
        raise DatagenError(f"no image with {settings.min_objects}..{settings.max_objects} main objects and an image "
                           f"file in {settings.vg or settings.objects} ({len(source.items)} images read)")
    return source.root, selection, len(problems)


def _check_folder(settings: GenerateSettings) -> None:
    """Refuse an output folder that was started with other identity settings."""
    out = Path(settings.out)
    if (out / ex.RUN_FILE).is_file():
        before = ex.read_run(out)["identity"]
        for name, value in settings.identity().items():
            if before.get(name) != value:
                raise DatagenError(f"{out / ex.RUN_FILE}: this folder was started with {name}={before.get(name)!r}, "
                                   f"now {value!r}; use the same settings or a new --out")


def _start_folder(settings: GenerateSettings, root: Path, selection: list[ImageItem], problems: int) -> None:
    """Create OUT and write run.json (settings, prices, budget and the selection)."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    ex.write_json(out / ex.RUN_FILE, {
        "identity": settings.identity(), "image_root": str(root.resolve()), "model": settings.model,
        "api_base": settings.api_base, "prices": {"in": settings.price_in, "out": settings.price_out},
        "budget_usd": settings.budget_usd, "max_attempts": settings.max_attempts, "source_problems": problems,
        "selection": [[it.image_id, it.image] for it in selection]})


def _request_seed(*parts: object) -> int:
    """A stable 31-bit seed for one request (the endpoint may ignore it)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) >> 1


def _work(settings: GenerateSettings, client: ChatClient, specs: dict[str, TaskSpec], root: Path,
          accepted: Journal, rejected: Journal, errors: list[str]) -> Callable[[tuple], str]:
    """The function that runs one (image, task, attempt) job and journals its outcome."""
    system = system_prompt(settings.templates)
    langs = list(settings.langs)

    def attempt_once(item: ImageItem, task: str, attempt: int) -> str:
        """One request for the item, journaled; the outcome name."""
        spec = specs[task]
        key = ex.item_key(item.image_id, task)
        base = {"key": key, "image_id": item.image_id, "image": item.image, "task": task, "attempt": attempt,
                "model": settings.model}
        messages = [{"role": "system", "content": system},
                    user_message(task_prompt(spec, item, langs), [root / item.image])]
        try:
            reply = client.chat(messages, temperature=settings.temperature, max_tokens=spec.max_tokens,
                                response_format={"type": "json_object"} if settings.json_mode else None,
                                seed=_request_seed(settings.seed, key, attempt))
        except BudgetExceeded:
            raise
        except ApiError as err:
            errors.append(str(err))
            line = {**base, "reasons": ["api_error"], "details": [str(err)], "counts": False, "usage": None}
            return API_ERROR if rejected.append(line) else DROPPED
        verdict = validate_response(
            reply.text, langs=langs, turns=spec.turns, objects=item.objects, min_answer_chars=spec.min_answer_chars,
            max_answer_chars=spec.max_answer_chars, scene_graph=spec.scene_graph,
            min_script_share=settings.min_script_share, reject_proper_nouns=settings.reject_proper_nouns,
            finish_reason=reply.finish_reason)
        base["usage"] = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
        base["finish_reason"] = reply.finish_reason
        if verdict.ok:
            line = {**base, "objects": list(item.objects), "relations": [list(r) for r in item.relations],
                    "response": verdict.parsed, "flags": verdict.flags}
            return ACCEPTED if accepted.append(line) else DROPPED
        line = {**base, "reasons": verdict.reasons, "details": verdict.details, "flags": verdict.flags,
                "counts": True, "text": reply.text}
        return REJECTED if rejected.append(line) else DROPPED

    def work(job: tuple[ImageItem, str, int]) -> str:
        """Attempts until one is accepted or `max_attempts` is reached; the last outcome."""
        item, task, first = job
        outcome = REJECTED
        for attempt in range(first, settings.max_attempts + 1):
            outcome = attempt_once(item, task, attempt)
            if outcome != REJECTED:
                break
        return outcome

    return work


def generate(settings: GenerateSettings) -> Finished:
    """Run (or resume) generation into `settings.out`; exports the LLaVA files and summary unless interrupted."""
    _check(settings)
    specs = load_tasks(settings.templates, list(settings.tasks), list(settings.langs))
    _check_folder(settings)
    root, selection, problems = _select(settings)
    _start_folder(settings, root, selection, problems)
    out = Path(settings.out)
    accepted, rejected = Journal(out / ex.ACCEPTED_FILE), Journal(out / ex.REJECTED_FILE)
    done_lines, warning_a = accepted.load()
    rejected_lines, warning_r = rejected.load()
    for warning in (warning_a, warning_r):
        if warning:
            _say(warning)
    done = {r["key"] for r in done_lines}
    attempts = Counter(r["key"] for r in rejected_lines if r.get("counts", True))
    jobs = []
    for item in selection:
        for task in settings.tasks:
            key = ex.item_key(item.image_id, task)
            if key not in done and attempts[key] < settings.max_attempts:
                jobs.append((item, task, attempts[key] + 1))
    if not os.environ.get(settings.api_key_env):
        _say(f"note: ${settings.api_key_env} is not set; requests carry no API key")
    budget = None
    if settings.budget_usd is not None:
        budget = settings.budget_usd - ex.spent_usd(out, settings.price_in, settings.price_out)
    client = ChatClient(settings.api_base, settings.model, api_key_env=settings.api_key_env,
                        timeout_s=settings.timeout_s, max_retries=settings.max_retries, backoff_s=settings.backoff_s,
                        price_in_per_1k=settings.price_in, price_out_per_1k=settings.price_out, budget_usd=budget)
    errors: list[str] = []
    result = run_parallel(jobs, _work(settings, client, specs, root, accepted, rejected, errors), total=len(jobs),
                          concurrency=settings.concurrency, journals=(accepted, rejected), desc="generating",
                          progress=settings.progress)
    accepted.close()
    rejected.close()
    summary = None if result.stopped == "interrupted" else ex.export(out, stopped=result.stopped)
    return Finished(result, summary, len(done), errors[-1] if errors else "")

