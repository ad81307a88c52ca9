"""Unicode scripts the vocabulary tools tell apart: Hangul, Han and Latin (everything else is `other`)."""

from __future__ import annotations

SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    # Syllables, jamo, compatibility jamo, jamo extended A and B, halfwidth jamo.
    "hangul": ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF),
               (0xFFA0, 0xFFDC)),
    # CJK unified ideographs (+ extensions A to F) and compatibility ideographs.
    "han": ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2EBEF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)),
    # ASCII letters, Latin-1 letters, Latin extended A/B and additional.
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF)),
}
SCRIPTS = tuple(SCRIPT_RANGES)


def script_of(char: str) -> str:
    """The script of one character: `hangul`, `han`, `latin` or `other`."""
    code = ord(char)
    for name, ranges in SCRIPT_RANGES.items():
        if any(lo <= code <= hi for lo, hi in ranges):
            return name
    return "other"


def has_script(text: str, script: str) -> bool:
    """Whether `text` holds at least one character of `script`."""
    return any(script_of(char) == script for char in text)
