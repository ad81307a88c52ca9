"""Prompt templates of the four generation tasks and of translation, as editable files.

A template folder (the packaged `templates/`, or a copy given with `--templates`) holds `tasks.json`
(per task: its template and seed file, the number of turns, answer length bounds in characters, the
token limit, and whether a scene graph comes first), `system.txt`, one `<task>.txt` per task,
`translate.txt`, and `seeds/<task>.json` with two worked examples each (objects, optional relations, and
the expected response in every language). Templates use `$name` placeholders:
`$objects`, `$relations`, `$turns`, `$languages`, `$json_shape`, `$examples` (tasks) and `$language`,
`$source`, `$count`, `$texts` (translation). Seed examples must pass the same validation as model replies.
"""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.datagen.sources import DatagenError, ImageItem
from xllava_jax.datagen.validate import LANGUAGES, validate_response

TEMPLATE_DIR = Path(__file__).parent / "templates"
TASKS = ("object", "location", "atmosphere", "conversation")
_TASK_KEYS = {"template", "seeds", "turns", "min_answer_chars", "max_answer_chars", "max_tokens", "scene_graph"}


@dataclass(frozen=True)
class TaskSpec:
    """One task type: its filled-in template text, seed examples and the shape its replies must have."""

    name: str
    template: str
    template_path: Path
    seeds: tuple[dict, ...]
    turns: int
    min_answer_chars: int
    max_answer_chars: int
    max_tokens: int
    scene_graph: bool


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatagenError(f"{path}: cannot read template file ({e.strerror or e})") from None


def _fill(template: str, path: Path, values: dict[str, str]) -> str:
    """`template` with its `$name` placeholders replaced; DatagenError naming the file on an unknown one."""
    try:
        return string.Template(template).substitute(values)
    except KeyError as e:
        raise DatagenError(f"{path}: unknown placeholder ${e.args[0]} (known: "
                           f"{', '.join('$' + k for k in sorted(values))})") from None
    except ValueError as e:
        raise DatagenError(f"{path}: bad placeholder ({e}); write $$ for a literal $") from None


def _check_seeds(spec: TaskSpec, langs: list[str]) -> None:
    """Every seed example passes the task's own validation for the requested languages."""
    if len(spec.seeds) != 2:
        raise DatagenError(f"{spec.template_path.parent / 'seeds'}: {spec.name} needs exactly 2 seed examples, "
                           f"found {len(spec.seeds)}")
    for i, seed in enumerate(spec.seeds):
        if not isinstance(seed, dict) or not isinstance(seed.get("objects"), list):
            raise DatagenError(f"{spec.name} seed {i}: expected an object with objects and response")
        verdict = validate_response(json.dumps(seed.get("response")), langs=langs, turns=spec.turns,
                                    objects=seed["objects"], min_answer_chars=spec.min_answer_chars,
                                    max_answer_chars=spec.max_answer_chars, scene_graph=spec.scene_graph)
        if not verdict.ok:
            raise DatagenError(f"{spec.name} seed {i} fails validation: {'; '.join(verdict.details)}")


def load_tasks(template_dir: str | Path | None, tasks: list[str], langs: list[str]) -> dict[str, TaskSpec]:
    """The specs of `tasks` from a template folder (default: the packaged one), seeds checked for `langs`."""
    root = Path(template_dir) if template_dir is not None else TEMPLATE_DIR
    table_path = root / "tasks.json"
    try:
        table = json.loads(_read(table_path))
    except ValueError as e:
        raise DatagenError(f"{table_path}: invalid JSON ({e})") from None
    specs = {}
    for name in tasks:
        entry = table.get(name) if isinstance(table, dict) else None
        if not isinstance(entry, dict) or not {"template", "seeds", "turns"} <= set(entry):
            raise DatagenError(f"{table_path}: no entry for task {name!r} with template, seeds and turns")
        unknown = set(entry) - _TASK_KEYS
        if unknown:
            raise DatagenError(f"{table_path}: task {name!r} has unknown keys {sorted(unknown)}")
        seeds_path = root / entry["seeds"]
        try:
            seeds = json.loads(_read(seeds_path))
        except ValueError as e:
            raise DatagenError(f"{seeds_path}: invalid JSON ({e})") from None
        spec = TaskSpec(name=name, template=_read(root / entry["template"]), template_path=root / entry["template"],
                        seeds=tuple(seeds) if isinstance(seeds, list) else (), turns=int(entry["turns"]),
                        min_answer_chars=int(entry.get("min_answer_chars", 1)),
                        max_answer_chars=int(entry.get("max_answer_chars", 2000)),
                        max_tokens=int(entry.get("max_tokens", 4096)), scene_graph=bool(entry.get("scene_graph")))
        _check_seeds(spec, langs)
        specs[name] = spec
    return specs


def system_prompt(template_dir: str | Path | None) -> str:
    """The system message text of the template folder."""
    return _read((Path(template_dir) if template_dir is not None else TEMPLATE_DIR) / "system.txt").strip()


def _language_list(langs: list[str]) -> str:
    return ", ".join(f'{LANGUAGES[lang]} ("{lang}")' for lang in langs)


def _json_shape(spec: TaskSpec, langs: list[str]) -> str:
    """A skeleton of the expected reply, one line per key."""
    lines = ['  "scene_graph": [["subject", "relation", "object"], ...],'] if spec.scene_graph else []
    lines += [f'  "{lang}": [{{"question": "...", "answer": "..."}}, ...],' for lang in langs]
    lines[-1] = lines[-1].rstrip(",")
    return "{\n" + "\n".join(lines) + "\n}"


def _relations_text(relations) -> str:
    return "; ".join(" - ".join(t) for t in relations) if relations else "(none)"


def _examples(spec: TaskSpec, langs: list[str]) -> str:
    """The seed examples, each as its objects (and relations) and the expected JSON in the requested languages."""
    parts = []
    for i, seed in enumerate(spec.seeds, start=1):
        keep = (["scene_graph"] if spec.scene_graph else []) + langs
        response = {k: seed["response"][k] for k in keep}
        head = f"Example {i}\nObjects: {', '.join(seed['objects'])}"
        if spec.scene_graph:
            head += f"\nRelations: {_relations_text(seed.get('relations'))}"
        parts.append(f"{head}\nOutput:\n{json.dumps(response, ensure_ascii=False)}")
    return "\n\n".join(parts)


def task_prompt(spec: TaskSpec, item: ImageItem, langs: list[str]) -> str:
    """The user text of one generation request: the task template filled for this image."""
    values = {"objects": ", ".join(item.objects), "relations": _relations_text(item.relations),
              "turns": str(spec.turns), "languages": _language_list(langs), "json_shape": _json_shape(spec, langs),
              "examples": _examples(spec, langs)}
    return _fill(spec.template, spec.template_path, values).strip()


def translate_prompt(template_dir: str | Path | None, texts: list[str], source: str, target: str) -> str:
    """The user text of one translation request for `texts` from `source` into `target`."""
    path = (Path(template_dir) if template_dir is not None else TEMPLATE_DIR) / "translate.txt"
    values = {"source": LANGUAGES[source], "language": LANGUAGES[target], "count": str(len(texts)),
              "texts": json.dumps(texts, ensure_ascii=False, indent=0)}
    return _fill(_read(path), path, values).strip()


def copy_templates(out_dir: str | Path) -> Path:
    """Copy the packaged templates to `out_dir` (which must not exist) for editing; returns it."""
    out = Path(out_dir)
    if out.exists():
        raise DatagenError(f"{out}: already exists; choose a new folder for the template copy")
    shutil.copytree(TEMPLATE_DIR, out)
    return out
