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
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.api.client import user_message
from xllava_jax.datagen import export as ex
from xllava_jax.datagen.endpoint import EndpointSettings, RequestRun
from xllava_jax.datagen.prompts import TASKS, TaskSpec, load_tasks, system_prompt, task_prompt
from xllava_jax.datagen.runner import ACCEPTED, REJECTED, Finished
from xllava_jax.datagen.sources import DatagenError, ImageItem, load_image_folder, load_visual_genome, select_images
from xllava_jax.datagen.validate import check_languages, validate_response

MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(EndpointSettings):
    """Everything `generate` needs; the fields of `identity()` must not change between runs of one folder."""

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
    reject_proper_nouns: bool = False

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
        raise DatagenError("give either `vg` DIR or both `images` DIR and `objects` FILE")
    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown or not settings.tasks:
        raise DatagenError(f"tasks {','.join(unknown) or '(none)'}: choose from {','.join(TASKS)}")
    try:
        check_languages(settings.langs)
    except ValueError as e:
        raise DatagenError(str(e)) from None
    settings.check_counts()
    if settings.max_images is not None and settings.max_images < 1:
        raise DatagenError(f"`max_images` {settings.max_images}: must be >= 1")


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
                                   f"now {value!r}; use the same settings or a new `out`")


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


def _work(settings: GenerateSettings, requests: RequestRun, specs: dict[str, TaskSpec],
          root: Path) -> Callable[[tuple], str]:
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
        reply = requests.chat(base, messages, max_tokens=spec.max_tokens,
                              seed=_request_seed(settings.seed, key, attempt))
        if isinstance(reply, str):
            return reply
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
            return requests.journal(ACCEPTED, line)
        line = {**base, "reasons": verdict.reasons, "details": verdict.details, "flags": verdict.flags,
                "counts": True, "text": reply.text}
        return requests.journal(REJECTED, line)

    def work(job: tuple[ImageItem, str, int]) -> str:
        """Attempts until one is accepted or `max_attempts` is reached; the last outcome."""
        item, task, first = job
        return requests.until_accepted(lambda attempt: attempt_once(item, task, attempt), first)

    return work


def generate(settings: GenerateSettings) -> Finished:
    """Run (or resume) generation into `settings.out`; exports the LLaVA files and summary unless interrupted."""
    _check(settings)
    specs = load_tasks(settings.templates, list(settings.tasks), list(settings.langs))
    _check_folder(settings)
    root, selection, problems = _select(settings)
    _start_folder(settings, root, selection, problems)
    requests = RequestRun(settings)
    jobs = []
    for item in selection:
        for task in settings.tasks:
            attempt = requests.next_attempt(ex.item_key(item.image_id, task))
            if attempt is not None:
                jobs.append((item, task, attempt))
    return requests.run(jobs, _work(settings, requests, specs, root), "generating",
                        lambda stopped: ex.export(settings.out, stopped=stopped))

