"""The 2,350 Hangul syllables of KS X 1001, the everyday Korean set: every one is made a piece on expansion.

A syllable that is not a piece falls back to its three UTF-8 bytes, however common the words it appears
in; pieces learned from one corpus miss syllables that another text needs (a law text's 녀, 훈, 죄, 벌).
The set is the Hangul block of EUC-KR, rows 0xB0-0xC8 (25 rows of 94 two-byte codes), in 가나다 order.
Python's `euc-kr` codec also writes the other 8,822 modern syllables, as 8-byte jamo sequences, so the
set is read off the two-byte codes rather than tested by encoding.
"""

from __future__ import annotations

from collections.abc import Collection

KSX1001_SYLLABLES = tuple(bytes((row, cell)).decode("euc-kr") for row in range(0xB0, 0xC9)
                          for cell in range(0xA1, 0xFF))


def missing_syllables(pieces: Collection[str]) -> list[str]:
    """The KS X 1001 syllables that are not among `pieces` (a set of piece strings), in 가나다 order."""
    return [s for s in KSX1001_SYLLABLES if s not in pieces]


def syllable_count(pieces: Collection[str]) -> int:
    """How many of the 2,350 KS X 1001 syllables are among `pieces` (a set of piece strings)."""
    return len(KSX1001_SYLLABLES) - len(missing_syllables(pieces))
