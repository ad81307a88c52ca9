"""Checks of a model's response before it is accepted, each failure named by a stable short code.

Codes: `invalid_json`, `truncated` (cut at max_tokens), `bad_shape`, `missing_language:<lang>`,
`wrong_script:<lang>`, `turn_count`, `answer_length`, `proper_noun` (a flag; a rejection only when asked).
Scripts: the share of Latin letters among all letters for English, of Hangul for Korean, of Han
characters for Chinese.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LANGUAGES = {"en": "English", "ko": "Korean", "zh": "Chinese (Simplified)"}
SCRIPTS = {"en": "Latin", "ko": "Hangul", "zh": "Han"}
_SCRIPT_RANGES = {
    "Latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "Hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xD7B0, 0xD7FF)),
    "Han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F)),
}
# Capitalised words that are not names: pronouns, abbreviations and words often capitalised mid-sentence.
_NOT_NAMES = {"i", "i'm", "i'd", "i've", "i'll", "ok", "okay", "tv", "uk", "us", "usa", "a", "no", "yes", "the"}
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n\s*```$", re.S)


@dataclass
class Verdict:
    """What validation found: `reasons` (rejection codes, empty when accepted), `details` (one line per
    reason), `flags` (codes kept on accepted records, e.g. proper_noun) and the parsed response."""

    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    flags: list[dict] = field(default_factory=list)
    parsed: dict | None = None

    @property
    def ok(self) -> bool:
        """True when nothing was rejected."""
        return not self.reasons

    def reject(self, code: str, detail: str) -> Verdict:
        """Add a rejection reason; returns self."""
        self.reasons.append(code)
        self.details.append(f"{code}: {detail}")
        return self


def check_languages(langs: Sequence[str]) -> list[str]:
    """The language codes, checked against the supported set; ValueError naming the unknown ones."""
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown or not langs:
        raise ValueError(f"languages {','.join(unknown) or '(none)'}: choose from {','.join(LANGUAGES)}")
    return list(dict.fromkeys(langs))


def script_share(text: str, lang: str) -> float:
    """Share of the letters of `text` that are in `lang`'s script (0.0 when there are no letters)."""
    ranges = _SCRIPT_RANGES[SCRIPTS[lang]]
    letters = [ord(c) for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(any(lo <= c <= hi for lo, hi in ranges) for c in letters) / len(letters)


def parse_json_object(text: str) -> dict | None:
    """The JSON object a reply holds (one surrounding markdown fence tolerated), or None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def proper_nouns(texts: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """Capitalised word runs that are not at a sentence start and not among the `allowed` names (object names,
    compared case-insensitively word by word, plural "s" ignored): likely names from the model's own
    knowledge (people, places, brands), the main hallucination class of generated data."""
    known = set()
    for name in allowed:
        for word in name.lower().split():
            known.update({word, word.rstrip("s")})
    found: dict[str, None] = {}
    for text in texts:
        for sentence in re.split(r"(?<=[.!?:;\"])\s+|\n+", text):
            words = re.findall(r"[A-Za-z][A-Za-z'\-]*", sentence)
            run: list[str] = []
            for i, word in enumerate([*words, ""]):
                candidate = i > 0 and word[:1].isupper() and word.lower() not in _NOT_NAMES
                candidate = candidate and word.lower() not in known and word.lower().rstrip("s") not in known
                if candidate:
                    run.append(word)
                elif run:
                    found.setdefault(" ".join(run), None)
                    run = []
    return list(found)


def _turns(value: object) -> list[tuple[str, str]] | None:
    """[(question, answer)] of a language's list, or None when it is not a list of such objects."""
    if not isinstance(value, list):
        return None
    out = []
    for turn in value:
        if not isinstance(turn, dict):
            return None
        q, a = turn.get("question"), turn.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
            return None
        out.append((q.strip(), a.strip()))
    return out


def _scene_graph_ok(graph: object) -> bool:
    """A non-empty list of [subject, relation, object] string triples (or non-empty strings)."""
    if not isinstance(graph, list) or not graph:
        return False
    return all((isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) and x.strip() for x in t))
               or (isinstance(t, str) and t.strip()) for t in graph)


def validate_response(text: str, *, langs: Sequence[str], turns: int, objects: Sequence[str],
                      min_answer_chars: int = 1, max_answer_chars: int = 2000, scene_graph: bool = False,
                      min_script_share: float = 0.6, reject_proper_nouns: bool = False,
                      finish_reason: str | None = None) -> Verdict:
    """Validate one generation reply: strict JSON `{"scene_graph"?: [...], lang: [{"question", "answer"}, ...]}`
    with every language in `langs`, `turns` items each, answers within the length bounds (characters) and each
    language in its script. The parsed value keeps only the requested languages (and the scene graph)."""
    verdict = Verdict()
    data = parse_json_object(text)
    if data is None:
        if finish_reason == "length":
            return verdict.reject("truncated", "the reply stopped at max_tokens before the JSON was complete")
        return verdict.reject("invalid_json", f"not a JSON object: {text[:80]!r}")
    if scene_graph and not _scene_graph_ok(data.get("scene_graph")):
        verdict.reject("bad_shape", "scene_graph is not a non-empty list of [subject, relation, object] triples")
    parsed: dict = {"scene_graph": data["scene_graph"]} if scene_graph and not verdict.reasons else {}
    for lang in langs:
        if lang not in data:
            verdict.reject(f"missing_language:{lang}", f"no {lang!r} key")
            continue
        pairs = _turns(data[lang])
        if pairs is None:
            verdict.reject("bad_shape", f"{lang!r} is not a list of {{question, answer}} objects with text")
            continue
        parsed[lang] = [{"question": q, "answer": a} for q, a in pairs]
        if len(pairs) != turns:
            verdict.reject("turn_count", f"{lang!r} has {len(pairs)} turns, expected {turns}")
        lengths = [len(a) for _, a in pairs]
        if lengths and not all(min_answer_chars <= n <= max_answer_chars for n in lengths):
            verdict.reject("answer_length", f"{lang!r} answer lengths {lengths} outside "
                                            f"{min_answer_chars}..{max_answer_chars} characters")
        share = script_share(" ".join(q + " " + a for q, a in pairs), lang)
        if share < min_script_share:
            verdict.reject(f"wrong_script:{lang}", f"{lang!r} is {share:.0%} {SCRIPTS[lang]}, "
                                                   f"need {min_script_share:.0%}")
    if "en" in parsed:
        names = proper_nouns([t for turn in parsed["en"] for t in turn.values()], objects)
        if names:
            verdict.flags.append({"code": "proper_noun", "detail": ", ".join(names)})
            if reject_proper_nouns:
                verdict.reject("proper_noun", ", ".join(names))
    verdict.parsed = parsed if verdict.ok else None
    return verdict
