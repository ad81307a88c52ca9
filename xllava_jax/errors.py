"""The base class of errors a user can cause, and how a command spells the settings their messages name.

The `xllava` command prints a UserError as one line and exits 2. Library code names a setting as the library
spells it, in backticks: "pass `allow_bin`=True to read them", "`out` exists", "`train.skip_nonfinite`=true";
each command registers the flags it spells those settings with (`SettingFlags`, set on its parser as
`flags=`), and the command line prints "pass --allow-bin to read them", "--out exists",
"--config.train.skip_nonfinite=true". A backticked name the command does not know is printed as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


class UserError(ValueError):
    """Bad input from a user (a path, a file's content, a flag, a server's answer): the message names the
    file or setting and the problem, in one line."""


# `setting` or `setting`=value (a value: letters, digits, `_`, `.`, `+`, `-`, not ending in `.`).
SETTING = re.compile(r"`([A-Za-z_][\w.]*)`(?:=([\w.+-]*[\w+-]))?")


@dataclass(frozen=True)
class SettingFlags:
    """How one command spells the settings named in library messages.

    names: setting -> flag (`out` -> `--out`: "`out` exists" reads "--out exists", and "`seed`=3"
    "--seed=3"), or setting=value -> flag for a switch (`allow_bin=True` -> `--allow-bin`: "pass
    `allow_bin`=True" reads "pass --allow-bin"). config_prefix: also spell each config key as prefix + key
    (`--config.` for `xllava train`): a dotted name (`train.steps`), or a name in config_keys (`tokenizer`).
    """

    names: Mapping[str, str] = field(default_factory=dict)
    config_prefix: str | None = None
    config_keys: frozenset[str] = frozenset()

    def flag(self, setting: str, value: str | None = None) -> str | None:
        """The text that stands for `setting` (with `value`, when the message gives one); None when this
        command has no flag for it."""
        if value is not None and f"{setting}={value}" in self.names:
            return self.names[f"{setting}={value}"]
        flag = self.names.get(setting)
        if flag is None and self.config_prefix is not None and ("." in setting or setting in self.config_keys):
            flag = self.config_prefix + setting
        if flag is None:
            return None
        return flag if value is None else f"{flag}={value}"

    def spell(self, message: str) -> str:
        """`message` with each backticked setting this command knows replaced by its flag."""
        def one(match: re.Match) -> str:
            return self.flag(match[1], match[2]) or match[0]

        return SETTING.sub(one, message)


def spell_flags(message: str, flags: SettingFlags | None) -> str:
    """`message` as a command with `flags` prints it (unchanged without flags)."""
    return message if flags is None else flags.spell(message)
