"""Settings records of the demo's steps. Each step writes, next to its outputs, the settings that made them: its
own DemoSettings fields under its name and those of every step it consumes ({step: {field: value}}), so a change
upstream changes the record of everything downstream. A rerun skips a step only when its record is complete and
equal to the run's settings; otherwise the step's outputs are removed and the step is redone (a resumable step, a
training stage say, keeps the outputs of an interrupted run with the same settings and goes on from them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Settings = dict[str, dict]  # {step: {setting: value}} for a step and every step it consumes


def describe(recorded: Settings | None, current: Settings, presets: Mapping[str, Mapping]) -> str:
    """A few words on the settings in `recorded` that made a step's outputs: the name of the preset they match
    when the current settings do not match it (`smoke`, `default`), else the recorded values that differ."""
    if recorded is None:
        return "unrecorded"
    old = {key: value for fields in recorded.values() for key, value in fields.items()}
    new = {key: value for fields in current.values() for key, value in fields.items()}
    for name, preset in presets.items():
        if _matches(old, preset) and not _matches(new, preset):
            return name
    changed = [f"{key}={value}" for key, value in old.items() if key not in new or new[key] != value]
    changed += [f"no {key}" for key in new if key not in old]
    return ", ".join(changed) or "other steps"


def _matches(flat: Mapping, preset: Mapping) -> bool:
    """Whether every setting of `flat` that `preset` has takes the preset's value."""
    return all(preset[key] == value for key, value in flat.items() if key in preset)


@dataclass(frozen=True)
class StepRecord:
    """The settings record of one step at `path`: {"settings": Settings, "complete": bool}. `outputs` are the
    files and directories the step writes (removed when it is redone); `products` must exist for a finished step
    to count as done (default: `outputs`)."""

    name: str
    path: Path
    settings: Settings
    outputs: Sequence[Path]
    products: Sequence[Path] = ()

    def read(self) -> dict | None:
        """The record on disk, or None when there is none (or it is unreadable: written by a killed run)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def done(self) -> bool:
        """Whether the step finished with these settings and its products are still there."""
        record = self.read()
        return (record is not None and record.get("complete") is True and record.get("settings") == self.settings
                and all(p.exists() for p in (self.products or self.outputs)))

    def start(self, log: Callable[[str], None], presets: Mapping[str, Mapping], *, resumable: bool = False) -> None:
        """Before the step's work: remove its outputs, saying so when other settings made them, unless the step is
        `resumable` and its outputs come from an interrupted run with these settings; then record the settings as
        incomplete (after the removal, so a run killed while removing removes again)."""
        record = self.read()
        same = record is not None and record.get("settings") == self.settings
        if not (same and resumable):
            present = [p for p in self.outputs if p.exists() or p.is_symlink()]
            if present and not same:
                log(f"redoing {self.name}: its outputs were made with other settings "
                    f"({describe(record and record.get('settings'), self.settings, presets)})")
            for p in present:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        self._write(complete=False)

    def finish(self) -> None:
        """After the step's work: record its settings as complete."""
        self._write(complete=True)

    def _write(self, *, complete: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"settings": self.settings, "complete": complete}, indent=1) + "\n",
                           encoding="utf-8")
        partial.replace(self.path)
