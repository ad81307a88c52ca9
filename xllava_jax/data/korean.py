"""Korean particles (조사) chosen by the final sound of the word before them, and native counting numerals.

`josa("사과", "을/를")` -> "사과를", `josa("책", "을/를")` -> "책을", `josa("연필", "으로/로")` -> "연필로"
(ㄹ takes 로), `josa("3", "이/가")` -> "3이" (삼), `josa("'A'", "이/가")` -> "'A'가" (에이). The end of a word
is read the way Korean speakers read it: a Hangul syllable by its final consonant (받침), digits as
Sino-Korean numbers (10 십, 100 백, 1000 천, 10000 만), Latin letters by their Korean names (L 엘, M 엠,
N 엔, R 알 end in a consonant); lowercase English words by a rough spelling rule (-m, -n, -ng, -l, -k, -p).
Closing quotes, brackets and punctuation after the word are skipped.
"""

from __future__ import annotations

# (form after a final consonant, form after a vowel); 으로/로 also takes 로 after ㄹ.
PARTICLES = (("이", "가"), ("은", "는"), ("을", "를"), ("과", "와"), ("으로", "로"), ("이나", "나"),
             ("이랑", "랑"), ("아", "야"), ("이라고", "라고"), ("이에요", "예요"))
NO_FINAL, RIEUL = 0, 8  # final-consonant (종성) indices: none, ㄹ
_FINALS = {"ㄱ": 1, "ㄴ": 4, "ㄹ": 8, "ㅁ": 16, "ㅂ": 17, "ㅇ": 21}
# Sino-Korean readings of the last digit: 영 일 이 삼 사 오 육 칠 팔 구.
_DIGIT_FINALS = ("ㅇ", "ㄹ", "", "ㅁ", "", "", "ㄱ", "ㄹ", "ㄹ", "")
# A number ending in zeros ends in the place name: 십 백 천, then 만 억 조 경 every four places.
_PLACE_FINALS = ("ㅂ", "ㄱ", "ㄴ")
_GROUP_FINALS = ("ㄴ", "ㄱ", "", "ㅇ")
_LETTER_FINALS = {"l": "ㄹ", "m": "ㅁ", "n": "ㄴ", "r": "ㄹ"}  # 엘 엠 엔 알; other letter names end in a vowel
_WORD_FINALS = (("ng", "ㅇ"), ("ck", "ㄱ"), ("m", "ㅁ"), ("n", "ㄴ"), ("l", "ㄹ"), ("k", "ㄱ"), ("p", "ㅂ"))
_DIGITS = "0123456789"
_NATIVE = ("한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉", "열")


def _is_hangul(ch: str) -> bool:
    return "가" <= ch <= "힣"


def _number_final(digits: str) -> str:
    stripped = digits.rstrip("0")
    if not stripped:
        return "ㅇ"  # 영
    zeros = len(digits) - len(stripped)
    if zeros == 0:
        return _DIGIT_FINALS[int(stripped[-1])]
    if zeros % 4:
        return _PLACE_FINALS[zeros % 4 - 1]
    return _GROUP_FINALS[min(zeros // 4, len(_GROUP_FINALS)) - 1]


def _latin_final(word: str) -> str:
    if len(word) == 1 or word.isupper():
        return _LETTER_FINALS.get(word[-1].lower(), "")
    lower = word.lower()
    return next((final for end, final in _WORD_FINALS if lower.endswith(end)), "")


def final_consonant(word: str) -> int:
    """Index of the final consonant (종성) the word ends in, as read aloud: 0 none, 8 ㄹ, others > 0.

    Raises ValueError when the word ends in nothing readable (no Hangul, digit or Latin letter)."""
    end = len(word)
    while end and not word[end - 1].isalnum():
        end -= 1
    if not end:
        raise ValueError(f"cannot tell how {word!r} ends: no Hangul, digit or letter")
    ch = word[end - 1]
    if _is_hangul(ch):
        return (ord(ch) - 0xAC00) % 28
    start = end
    if ch in _DIGITS:
        while start and word[start - 1] in _DIGITS:
            start -= 1
        return _FINALS.get(_number_final(word[start:end]), NO_FINAL)
    if ch.isascii() and ch.isalpha():
        while start and word[start - 1].isascii() and word[start - 1].isalpha():
            start -= 1
        return _FINALS.get(_latin_final(word[start:end]), NO_FINAL)
    raise ValueError(f"cannot tell how {word!r} ends: {ch!r} is not Hangul, a digit or a Latin letter")


def particle(word: str, pair: str) -> str:
    """The particle of `pair` ("이/가", "을/를", "와/과", "으로/로", ... either order) that follows `word`."""
    forms = set(pair.split("/"))
    for after_consonant, after_vowel in PARTICLES:
        if forms == {after_consonant, after_vowel}:
            final = final_consonant(word)
            if final == NO_FINAL or (final == RIEUL and after_vowel == "로"):
                return after_vowel
            return after_consonant
    raise ValueError(f"unknown particle pair {pair!r}")


def josa(word: str, pair: str) -> str:
    """`word` followed by the right particle of `pair`: josa("사과", "을/를") -> "사과를"."""
    return word + particle(word, pair)


def native_number(n: int) -> str:
    """The native Korean numeral before a counter (한 개, 두 개, ... 열 개) for 1 <= n <= 10."""
    if not 1 <= n <= len(_NATIVE):
        raise ValueError(f"native numerals are provided for 1..{len(_NATIVE)}, not {n}")
    return _NATIVE[n - 1]
