"""Visual-instruction (VIF) corpora in LLaVA's conversation format, read with every problem reported.

A record: `{"id", "image": relpath (optional), "conversations": [{"from": "human"|"gpt", "value"}...],
"lang" (optional)}`, in a JSON list or JSONL file. Nothing is dropped silently: every record that
cannot be used comes back as a `Problem` naming the file, the line (JSONL) or list index (JSON), the
id when there is one, and the reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xllava_jax.errors import UserError

IMAGE_TAG = "<image>"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass(frozen=True)
class VifRecord:
    """One usable conversation. turns: ((role, text), ...) with role "human" / "gpt"."""

    id: str
    turns: tuple[tuple[str, str], ...]
    image: str | None
    lang: str | None
    where: str


@dataclass(frozen=True)
class Problem:
    """A record that cannot be used, and why."""

    file: str
    where: str
    id: str | None
    reason: str

    def __str__(self) -> str:
        ident = f" (id {self.id})" if self.id is not None else ""
        return f"{self.file}:{self.where}{ident}: {self.reason}"


class PathEscapeError(UserError):
    """An image path that leaves its declared root."""


def resolve_image(root: str | Path, relpath: str) -> Path:
    """The file an image path names under `root`; refuses `..`, absolute paths and symlinks out."""
    if not relpath or os.path.isabs(relpath) or relpath.startswith("~"):
        raise PathEscapeError(f"image path {relpath!r} is not relative to the image root")
    if ".." in Path(relpath).parts:
        raise PathEscapeError(f"image path {relpath!r} climbs out of the image root")
    root = Path(root).resolve()
    path = (root / relpath).resolve()
    if path != root and root not in path.parents:
        raise PathEscapeError(f"image path {relpath!r} leads outside the image root (symlink)")
    return path


def _structure_problem(raw: object) -> tuple[str | None, str | None]:
    """(id, reason) for a raw JSON record that is not a valid conversation; reason None when valid."""
    if not isinstance(raw, dict):
        return None, f"record is a {type(raw).__name__}, not an object"
    ident = raw.get("id")
    ident = None if ident is None else str(ident)
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        return ident, "no conversations"
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return ident, "image is not a non-empty string"
    tags = 0
    # LLaVA's templates skip a first turn that is not the human's; the rest must alternate from the human.
    skip = int(isinstance(convs[0], dict) and ROLES.get(convs[0].get("from")) == "gpt")
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return ident, f"turn {i} has no text value"
        role = ROLES.get(turn.get("from"))
        want = "human" if (i - skip) % 2 == 0 else "gpt"
        if role is None:
            return ident, f"turn {i} has unknown role {turn.get('from')!r}"
        if role != want:
            return ident, f"turn {i} is {role}, expected {want} (roles must alternate, human first)"
        if not turn["value"].strip():
            return ident, f"turn {i} is empty"
        if role == "gpt" and IMAGE_TAG in turn["value"]:
            return ident, f"turn {i} (gpt) holds {IMAGE_TAG}"
        tags += turn["value"].count(IMAGE_TAG)
    if len(convs) == skip:
        return ident, "no human turn"
    if (len(convs) - skip) % 2:
        return ident, "the last turn is not an answer (gpt)"
    if tags and image is None:
        return ident, f"{IMAGE_TAG} without an image"
    if image is not None and tags == 0:
        return ident, f"an image without {IMAGE_TAG}"
    if tags > 1:
        return ident, f"{tags} {IMAGE_TAG} tags; one image per record is supported"
    return ident, None


def parse_record(raw: object, file: str, where: str) -> VifRecord | Problem:
    ident, reason = _structure_problem(raw)
    if reason is not None:
        return Problem(file, where, ident, reason)
    turns = tuple((ROLES[t["from"]], t["value"]) for t in raw["conversations"])
    lang = raw.get("lang")
    return VifRecord(id=ident if ident is not None else where, turns=turns, image=raw.get("image"),
                     lang=None if lang is None else str(lang), where=where)


def read_corpus(path: str | Path) -> Iterator[VifRecord | Problem]:
    """Records and problems of a JSON list or JSONL file, in file order."""
    path = Path(path)
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{name}: cannot read corpus ({e.strerror or e})") from None
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            yield Problem(name, f"line {line}", None, "invalid UTF-8; the whole JSON file is unreadable")
            return
        except json.JSONDecodeError as e:
            yield Problem(name, f"line {e.lineno}", None, f"invalid JSON ({e.msg}); the whole file is unreadable")
            return
        for i, raw in enumerate(items):
            yield parse_record(raw, name, f"[{i}]")
        return
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            raw = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield Problem(name, where, None, "invalid UTF-8")
            continue
        except json.JSONDecodeError as e:
            yield Problem(name, where, None, f"invalid JSON ({e.msg})")
            continue
        yield parse_record(raw, name, where)


@dataclass
class CheckReport:
    """What `check_corpus` found: usable record count, problems, and counts by reason."""

    records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def reasons(self) -> Counter:
        return Counter(_reason_kind(p.reason) for p in self.problems)

    @property
    def ok(self) -> bool:
        return not self.problems


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(": ")[0]


def image_problem(image_root: str | Path | None, relpath: str, decode: bool = True) -> str | None:
    """Why the image a record names cannot be used, or None when it can."""
    from xllava_jax.data.images import ImageError, load_image

    if image_root is None:
        return "the record has an image but no image root was given"
    try:
        path = resolve_image(image_root, relpath)
    except PathEscapeError as e:
        return str(e)
    if not path.is_file():
        return f"image {relpath} not found under {image_root}"
    if decode:
        try:
            load_image(path, name=relpath)
        except ImageError as e:
            return f"image {e}"
    return None


def check_corpus(path: str | Path, image_root: str | Path | None, *, decode_images: bool = True,
                 progress: bool = False) -> CheckReport:
    """Every problem of a corpus: JSON, structure, and (for records with images) the image files."""
    from tqdm import tqdm

    report = CheckReport()
    for item in tqdm(read_corpus(path), unit="record", desc="checking", disable=not progress):
        if isinstance(item, Problem):
            report.problems.append(item)
            continue
        reason = image_problem(image_root, item.image, decode_images) if item.image is not None else None
        if reason is not None:
            report.problems.append(Problem(str(path), item.where, item.id, reason))
        else:
            report.records += 1
    return report


def check_corpus_many(paths: list[str | Path], image_root: str | Path | None, *, decode_images: bool = True,
                      progress: bool = False) -> CheckReport:
    """`check_corpus` over several files, as one report."""
    total = CheckReport()
    for path in paths:
        report = check_corpus(path, image_root, decode_images=decode_images, progress=progress)
        total.records += report.records
        total.problems += report.problems
    return total
