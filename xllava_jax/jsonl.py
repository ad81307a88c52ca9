"""Append-only JSONL journals (training metrics, data-generation results) read back after a crash.

A writer appends each row as one JSON object and its newline in one write, then flushes, so a process
killed mid-write can leave at worst one unterminated last line. `read_journal` drops exactly that line
(and, with `repair`, cuts it from the file so later appends start on a line of their own); any other
damage is an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from xllava_jax.errors import UserError


class JournalError(UserError):
    """A journal that cannot be read back: unreadable, or damaged somewhere other than a torn last line."""


def read_journal(path: str | Path, *, check: Callable[[dict], str | None] | None = None,
                 repair: bool = True) -> tuple[list[dict], str | None]:
    """(rows, warning): the JSON objects of the complete lines of `path`, in order ([] when it does not exist).

    An unterminated last line (an interrupted write) is left out and described in `warning` (None when
    there is none); with `repair` it is also cut from the file. Any other line that is not a JSON object,
    or that `check` describes as a problem (it returns a short reason, None for a good row), raises
    JournalError naming the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as e:
        raise JournalError(f"{path}: cannot read ({e.strerror or e})") from None
    warning = None
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        torn = data.count(b"\n") + 1
        warning = (f"{path}:{torn}: dropped an unterminated last line "
                   f"({len(data) - cut} bytes, an interrupted write)")
        data = data[:cut]
        if repair:
            try:
                os.truncate(path, cut)
            except OSError as e:
                raise JournalError(f"{path}: cannot cut its unterminated last line ({e.strerror or e})") from None
    rows = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise JournalError(f"{path}:{number}: not a JSON line ({e}); fix or remove it") from None
        problem = "not a JSON object" if not isinstance(row, dict) else check(row) if check else None
        if problem:
            raise JournalError(f"{path}:{number}: {problem}; fix or remove it")
        rows.append(row)
    return rows, warning

