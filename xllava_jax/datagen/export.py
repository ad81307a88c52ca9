"""LLaVA-format export and the summary of a generation folder, derived from its files alone.

Reads `OUT/run.json` (settings and selection, written by `xllava datagen run`), `OUT/accepted.jsonl`,
`OUT/rejected.jsonl` and `OUT/review_labels.json` (written by `xllava datagen review --import`), and writes
`OUT/llava_<lang>.json`, `OUT/llava_mixed.json` and `OUT/summary.json`. Records: `{"id":
"<image>_<task>_<lang>", "image": relpath under the image root, "conversations": [...], "lang", "task"}`,
"<image>\\n" before the first question, sorted by (image, task, lang); the mixed file shuffles all
languages with the run's seed.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from xllava_jax.datagen.runner import Journal
from xllava_jax.datagen.sources import DatagenError, natural_key

RUN_FILE, LABELS_FILE = "run.json", "review_labels.json"
ACCEPTED_FILE, REJECTED_FILE = "accepted.jsonl", "rejected.jsonl"


def item_key(image_id: str, task: str) -> str:
    """The key of one work item (an image and a task) in the journals."""
    return f"{image_id}::{task}"


def write_json(path: Path, value: object) -> None:
    """Write JSON through a temporary file renamed into place (a crash leaves the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_run(out_dir: Path) -> dict:
    """The run settings of a generation folder; DatagenError when it was never started."""
    path = out_dir / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatagenError(f"{path}: not found; is {out_dir} the `out` of `xllava datagen run`?") from None
    except (OSError, ValueError) as e:
        raise DatagenError(f"{path}: cannot read ({e})") from None


def read_labels(out_dir: Path) -> dict[str, dict]:
    """{key: {"label": "pass"|"error", "note": str}} from the imported review labels (empty without any)."""
    path = out_dir / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatagenError(f"{path}: cannot read ({e})") from None


def accepted_records(out_dir: Path) -> list[dict]:
    """The accepted records, one per key (the first written wins), sorted by (image, task)."""
    records, _ = Journal(out_dir / ACCEPTED_FILE).load()
    unique: dict[str, dict] = {}
    for record in records:
        unique.setdefault(record["key"], record)
    return sorted(unique.values(), key=lambda r: (natural_key(str(r["image_id"])), r["task"]))


def conversations(record: dict, lang: str) -> list[dict]:
    """LLaVA turns of one accepted record in `lang`, with "<image>\\n" before the first question."""
    turns = []
    for i, pair in enumerate(record["response"][lang]):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + pair["question"]})
        turns.append({"from": "gpt", "value": pair["answer"]})
    return turns


def _usage_totals(lines: list[dict]) -> tuple[int, int]:
    prompt = sum(int((r.get("usage") or {}).get("prompt_tokens", 0)) for r in lines)
    return prompt, sum(int((r.get("usage") or {}).get("completion_tokens", 0)) for r in lines)


def spent_usd(out_dir: Path, price_in: float, price_out: float) -> float:
    """Cost of every reply recorded in the journals at the given prices per 1000 tokens."""
    lines = Journal(out_dir / ACCEPTED_FILE).load()[0] + Journal(out_dir / REJECTED_FILE).load()[0]
    prompt, completion = _usage_totals(lines)
    return prompt / 1000 * price_in + completion / 1000 * price_out


def export(out_dir: str | Path, *, stopped: str | None = None) -> dict:
    """Write the LLaVA files and summary.json of a generation folder; returns the summary."""
    out = Path(out_dir)
    run = read_run(out)
    langs, tasks = run["identity"]["langs"], run["identity"]["tasks"]
    labels = read_labels(out)
    accepted = accepted_records(out)
    rejected, _ = Journal(out / REJECTED_FILE).load()
    removed = sorted((r["key"] for r in accepted if labels.get(r["key"], {}).get("label") == "error"),
                     key=natural_key)
    removed_keys = set(removed)
    kept = [r for r in accepted if r["key"] not in removed_keys]
    task_order = {t: i for i, t in enumerate(tasks)}
    kept.sort(key=lambda r: (natural_key(str(r["image_id"])), task_order.get(r["task"], len(tasks)), r["task"]))
    per_lang: dict[str, list[dict]] = {}
    for lang in langs:
        per_lang[lang] = [{"id": f"{r['image_id']}_{r['task']}_{lang}", "image": r["image"],
                           "conversations": conversations(r, lang), "lang": lang, "task": r["task"]} for r in kept]
        write_json(out / f"llava_{lang}.json", per_lang[lang])
    mixed = [rec for lang in langs for rec in per_lang[lang]]
    random.Random(run["identity"]["seed"]).shuffle(mixed)
    write_json(out / "llava_mixed.json", mixed)

    accepted_keys = {r["key"] for r in accepted}
    attempts = Counter(r["key"] for r in rejected if r.get("counts", True))
    selected = [item_key(image_id, task) for image_id, _ in run["selection"] for task in tasks]
    gave_up = [k for k in selected if k not in accepted_keys and attempts[k] >= run["max_attempts"]]
    prompt, completion = _usage_totals(accepted + rejected)
    prices = run["prices"]
    summary = {
        "images_selected": len(run["selection"]), "work_items": len(selected),
        "accepted": len(accepted), "pending": sum(k not in accepted_keys for k in selected) - len(gave_up),
        "gave_up": len(gave_up),
        "accepted_by_task": dict(Counter(r["task"] for r in accepted)),
        "records_by_lang": {lang: len(per_lang[lang]) for lang in langs},
        "records_by_task_and_lang": {t: {lang: sum(r["task"] == t for r in kept) for lang in langs} for t in tasks},
        "mixed_records": len(mixed),
        "rejections": len(rejected),
        "rejections_by_reason": dict(Counter(code for r in rejected for code in r["reasons"]).most_common()),
        "flags": dict(Counter(f["code"] for r in accepted for f in r.get("flags", ()))),
        "review_labels": dict(Counter(v["label"] for v in labels.values())),
        "removed_by_review": removed,
        "replies": len(accepted) + sum(r.get("usage") is not None for r in rejected),
        "prompt_tokens": prompt, "completion_tokens": completion,
        "cost_usd": round(prompt / 1000 * prices["in"] + completion / 1000 * prices["out"], 6),
        "prices_usd_per_1k": prices, "budget_usd": run.get("budget_usd"),
        "source_problems": run.get("source_problems", 0), "stopped": stopped,
    }
    write_json(out / "summary.json", summary)
    return summary
