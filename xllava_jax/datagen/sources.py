"""Image sources for data generation, and the seeded, deduplicated image selection.

Two layouts:
- Visual Genome as published: `image_data.json` (`image_id` or `id`, `url`, `width`, `height`),
  `objects.json` (per image `image_id` or `id` and `objects`, each with `names` or `name` and a box
  `x, y, w, h`), optionally `relationships.json` (per image `relationships`, each with `subject`,
  `predicate`, `object`), and the images under `VG_100K/`, `VG_100K_2/` (the folder named in the url),
  `images/` or the top folder, as `<image_id>.jpg`.
- Any image folder with a JSONL file, one image per line:
  `{"image": "rel/path.jpg", "objects": ["cat", {"name": "sofa"}, ...], "id": "optional",
  "relations": [["cat", "on", "sofa"], ...] (optional)}`.

The main objects of an image are its distinct object names (lower-cased), largest box first; for Visual
Genome only objects whose box covers at least `min_area` of the image count. Every entry that cannot be
used is reported as a `Problem` (file, line or index, reason) and counted, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from xllava_jax.data.vif import PathEscapeError, Problem, resolve_image
from xllava_jax.errors import UserError

VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "images", ".")
MAX_RELATIONS = 40


class DatagenError(UserError):
    """A source, template, setting or output folder that data generation cannot use."""


@dataclass(frozen=True)
class ImageItem:
    """One image with what the prompts need: `objects` (distinct names, largest first) and `relations`
    ((subject, predicate, object) triples among the main objects)."""

    image_id: str
    image: str
    objects: tuple[str, ...]
    relations: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Source:
    """Images found in a source: the image root, the usable items and the problems met while reading."""

    root: Path
    items: list[ImageItem]
    problems: list[Problem]
    image_dirs: tuple[str, ...] = ()


def natural_key(value: str) -> tuple:
    """Sort key that orders "2" before "10" (digit runs compared as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", value) if part)


def _norm(name: object) -> str:
    """A lower-cased object name with collapsed spaces; "" for anything that is not a string."""
    return " ".join(name.lower().split()) if isinstance(name, str) else ""


def _load_json(path: Path) -> object:
    """The parsed JSON file; DatagenError naming the file (and line) when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise DatagenError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise DatagenError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DatagenError(f"{path}: not UTF-8 text") from None


def _by_image(path: Path, data: object, field: str, problems: list[Problem]) -> dict[str, list]:
    """{image id: entries[field]} of a Visual Genome per-image list file."""
    if not isinstance(data, list):
        raise DatagenError(f"{path}: expected a JSON list of per-image entries")
    out: dict[str, list] = {}
    for i, entry in enumerate(data):
        ident = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        if ident is None or not isinstance(entry.get(field), list):
            problems.append(Problem(str(path), f"[{i}]", None, f"entry has no image_id or no {field} list"))
            continue
        out.setdefault(str(ident), []).extend(entry[field])
    return out


def _object_name(obj: dict) -> str:
    """The name of a Visual Genome object or relationship end (`names[0]` or `name`)."""
    names = obj.get("names")
    if isinstance(names, list) and names:
        return _norm(names[0])
    return _norm(obj.get("name"))


def _main_objects(objects: list, width: object, height: object, min_area: float) -> list[str]:
    """Distinct names of the objects whose box covers at least `min_area` of the image, largest first."""
    known_size = isinstance(width, int | float) and isinstance(height, int | float) and width > 0 and height > 0
    best: dict[str, float] = {}
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        name = _object_name(obj)
        try:
            area = float(obj.get("w", 0)) * float(obj.get("h", 0))
        except (TypeError, ValueError):
            area = 0.0
        share = area / (width * height) if known_size else 1.0
        if name and share >= min_area:
            best[name] = max(best.get(name, 0.0), area)
    return sorted(best, key=lambda n: (-best[n], n))


def _relations(entries: Iterable, main: set[str]) -> tuple[tuple[str, str, str], ...]:
    """Distinct (subject, predicate, object) triples whose both ends are main objects, first MAX_RELATIONS."""
    seen: dict[tuple[str, str, str], None] = {}
    for rel in entries:
        if not isinstance(rel, dict) or not isinstance(rel.get("subject"), dict) or not isinstance(
                rel.get("object"), dict):
            continue
        triple = (_object_name(rel["subject"]), _norm(rel.get("predicate")), _object_name(rel["object"]))
        if triple[0] in main and triple[2] in main and triple[1] and triple[0] != triple[2]:
            seen.setdefault(triple, None)
    return tuple(list(seen)[:MAX_RELATIONS])


def _url_path(url: object) -> str:
    """The last two parts of a Visual Genome image url ("VG_100K_2/1.jpg"), or "" without a url."""
    if not isinstance(url, str) or "/" not in url:
        return ""
    parts = url.rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}"


def _find_image(source: Source, item: ImageItem) -> str | None:
    """The path of the item's image file relative to the source root: its own path first, then (Visual Genome)
    `<image_id>.jpg` in the usual folders; None when there is no such file."""
    names = [item.image] if item.image else []
    names += [f"{d}/{item.image_id}.jpg" if d != "." else f"{item.image_id}.jpg" for d in source.image_dirs]
    for name in names:
        try:
            if resolve_image(source.root, name).is_file():
                return name
        except PathEscapeError:
            continue
    return None


def load_visual_genome(vg_dir: str | Path, *, min_area: float = 0.02) -> Source:
    """Images of a Visual Genome folder with their main objects and (with relationships.json) relations."""
    root = Path(vg_dir)
    if not root.is_dir():
        raise DatagenError(f"{root}: Visual Genome folder not found")
    problems: list[Problem] = []
    image_path = root / "image_data.json"
    images = _load_json(image_path)
    if not isinstance(images, list):
        raise DatagenError(f"{image_path}: expected a JSON list of images")
    objects = _by_image(root / "objects.json", _load_json(root / "objects.json"), "objects", problems)
    rel_path = root / "relationships.json"
    relations = (_by_image(rel_path, _load_json(rel_path), "relationships", problems) if rel_path.is_file()
                 else {})
    items: list[ImageItem] = []
    seen: set[str] = set()
    for i, meta in enumerate(images):
        ident = meta.get("image_id", meta.get("id")) if isinstance(meta, dict) else None
        if ident is None:
            problems.append(Problem(str(image_path), f"[{i}]", None, "entry has no image_id"))
            continue
        ident = str(ident)
        if ident in seen:
            problems.append(Problem(str(image_path), f"[{i}]", ident, "duplicate image id"))
            continue
        seen.add(ident)
        if ident not in objects:
            problems.append(Problem(str(image_path), f"[{i}]", ident, "no entry in objects.json"))
            continue
        main = _main_objects(objects[ident], meta.get("width"), meta.get("height"), min_area)
        items.append(ImageItem(ident, _url_path(meta.get("url")), tuple(main),
                               _relations(relations.get(ident, ()), set(main))))
    return Source(root, items, problems, VG_IMAGE_DIRS)


def _jsonl_objects(raw: list) -> tuple[list[str], str | None]:
    """(distinct names in order, problem) of a JSONL line's `objects`."""
    names: dict[str, None] = {}
    for obj in raw:
        name = _norm(obj) if isinstance(obj, str) else _object_name(obj) if isinstance(obj, dict) else ""
        if not name:
            return [], f"object {obj!r} has no name"
        names.setdefault(name, None)
    return list(names), None


def load_image_folder(images_dir: str | Path, objects_file: str | Path) -> Source:
    """Images of a folder described by a JSONL file of object lists (see the module docstring)."""
    root, path = Path(images_dir), Path(objects_file)
    if not root.is_dir():
        raise DatagenError(f"{root}: image folder not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise DatagenError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DatagenError(f"{path}: not UTF-8 text") from None
    items: list[ImageItem] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), where, None, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("image"), str) or not isinstance(
                raw.get("objects"), list):
            problems.append(Problem(str(path), where, None, "expected an object with image and objects (a list)"))
            continue
        ident = str(raw.get("id", raw["image"]))
        names, reason = _jsonl_objects(raw["objects"])
        if reason is None and ident in seen:
            reason = "duplicate image id"
        if reason is None:
            try:
                resolve_image(root, raw["image"])
            except PathEscapeError as e:
                reason = str(e)
        if reason is not None:
            problems.append(Problem(str(path), where, ident, reason))
            continue
        seen.add(ident)
        rels = raw.get("relations") or []
        triples = [tuple(_norm(x) for x in r) for r in rels if isinstance(r, list) and len(r) == 3]
        items.append(ImageItem(ident, raw["image"], tuple(names), tuple(
            t for t in triples if t[0] in names and t[2] in names)[:MAX_RELATIONS]))
    return Source(root, items, problems)


def select_images(source: Source, *, min_objects: int = 3, max_objects: int = 10, max_images: int | None = None,
                  seed: int = 0) -> tuple[list[ImageItem], list[Problem]]:
    """Images with `min_objects`..`max_objects` main objects, in a seeded random order, at most `max_images`,
    without repeated files (same path or same bytes). Returns (selection, problems: missing or duplicate
    files). The same source, settings and seed give the same selection; a larger `max_images` extends it."""
    if min_objects < 1 or max_objects < min_objects:
        raise DatagenError(f"object bounds {min_objects}..{max_objects}: need 1 <= min <= max")
    eligible = sorted((it for it in source.items if min_objects <= len(it.objects) <= max_objects),
                      key=lambda it: natural_key(it.image_id))
    random.Random(seed).shuffle(eligible)
    chosen: list[ImageItem] = []
    problems: list[Problem] = []
    digests: dict[str, str] = {}
    for item in eligible:
        if max_images is not None and len(chosen) >= max_images:
            break
        relpath = _find_image(source, item)
        if relpath is None:
            problems.append(Problem(str(source.root), item.image or f"{item.image_id}.jpg", item.image_id,
                                    "image file not found"))
            continue
        digest = hashlib.sha1(resolve_image(source.root, relpath).read_bytes()).hexdigest()
        if digest in digests:
            problems.append(Problem(str(source.root), relpath, item.image_id,
                                    f"same image file as image {digests[digest]}"))
            continue
        digests[digest] = item.image_id
        chosen.append(ImageItem(item.image_id, relpath, item.objects, item.relations))
    return chosen, problems
