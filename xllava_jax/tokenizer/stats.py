"""`xllava vocab stats`: how well tokenizers compress text, per file and per script.

For each tokenizer and text file: tokens per character, tokens per whitespace-separated word, the share
of byte-fallback tokens and the number of unknown tokens, over the whole file and for the characters of
each script (Hangul, Han, Latin, other). Lines are encoded one by one, without bos/eos. For each
tokenizer also: how many of the 2,350 KS X 1001 Hangul syllables it has as whole pieces (the others
fall back to bytes wherever they appear).

A token counts towards the script of the first non-space character it covers. A byte-fallback token that
covers no character of its own (the leading bytes of a character) and a bare whitespace token (`▁` before
a word that falls back to bytes) count towards the character that follows, so `tokens per Hangul
character` is what a Korean word costs, its word-start mark included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tqdm import tqdm

from xllava_jax.tokenizer.expand import load_proto
from xllava_jax.tokenizer.runtime import TokenizerError
from xllava_jax.tokenizer.scripts import SCRIPTS, script_of
from xllava_jax.tokenizer.syllables import KSX1001_SYLLABLES, syllable_count

ALL_SCRIPTS = (*SCRIPTS, "other")
BATCH_LINES = 2000


def load_processor(path: str | Path) -> spm.SentencePieceProcessor:
    """A SentencePiece processor for a model file or a directory holding tokenizer.model."""
    return spm.SentencePieceProcessor(model_proto=load_proto(path, "tokenizer").SerializeToString())


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"`text` {path}: no such file") from None
    except IsADirectoryError:
        raise TokenizerError(f"`text` {path}: a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"`text` {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def whole_syllables(processor: spm.SentencePieceProcessor) -> int:
    """How many KS X 1001 Hangul syllables are pieces of `processor` that encoding can produce (not
    control, unknown, unused or byte pieces)."""
    pieces = {processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i)
                      or processor.is_byte(i))}
    return syllable_count(pieces)


def _first_script(surface: str) -> str | None:
    for char in surface:
        if not char.isspace():
            return script_of(char)
    return None


def token_scripts(surfaces: Sequence[str]) -> list[str]:
    """The script each token of one encoded line counts towards (see the module docstring)."""
    scripts: list[str] = []
    following = "other"
    for surface in reversed(surfaces):
        following = _first_script(surface) or following
        scripts.append(following)
    return scripts[::-1]


def _empty_counts() -> dict[str, Any]:
    return {"chars": 0, "words": 0, "tokens": 0, "byte_tokens": 0, "unk_tokens": 0,
            "scripts": {s: {"chars": 0, "tokens": 0} for s in ALL_SCRIPTS}}


def count_tokens(processor: spm.SentencePieceProcessor, lines: Sequence[str], bar: tqdm | None = None) -> dict:
    """Raw counts for `lines` under one tokenizer: chars, words, tokens, byte and unknown tokens, and
    chars and tokens per script."""
    counts = _empty_counts()
    per_script = counts["scripts"]
    for start in range(0, len(lines), BATCH_LINES):
        batch = lines[start:start + BATCH_LINES]
        for line, encoded in zip(batch, processor.encode(batch, return_type="proto"), strict=True):
            counts["chars"] += len(line)
            counts["words"] += len(line.split())
            for char in line:
                per_script[script_of(char)]["chars"] += 1
            pieces = encoded.pieces
            counts["tokens"] += len(pieces)
            counts["byte_tokens"] += sum(processor.is_byte(p.id) for p in pieces)
            counts["unk_tokens"] += sum(processor.is_unknown(p.id) for p in pieces)
            for script in token_scripts([p.surface for p in pieces]):
                per_script[script]["tokens"] += 1
        if bar is not None:
            bar.update(len(batch))
    return counts


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def summarise(counts: dict[str, Any]) -> dict[str, Any]:
    """Counts plus the ratios: tokens_per_char, tokens_per_word, byte_fallback_share and per-script
    tokens_per_char."""
    scripts = {s: {**c, "tokens_per_char": _ratio(c["tokens"], c["chars"])} for s, c in counts["scripts"].items()}
    return {**counts, "tokens_per_char": _ratio(counts["tokens"], counts["chars"]),
            "tokens_per_word": _ratio(counts["tokens"], counts["words"]),
            "byte_fallback_share": _ratio(counts["byte_tokens"], counts["tokens"]), "scripts": scripts}


def compute_stats(tokenizers: Sequence[str | Path], texts: Sequence[str | Path], progress: bool = False) -> dict:
    """`xllava vocab stats`: {"tokenizers": [...], "files": [...], "results": [one summary per (file,
    tokenizer), with "file", "tokenizer", "vocab_size" and "ksx1001_syllables" keys]}."""
    processors = [load_processor(t) for t in tokenizers]
    syllables = [whole_syllables(p) for p in processors]
    files = [(str(t), read_lines(t)) for t in texts]
    total = len(processors) * sum(len(lines) for _, lines in files)
    results = []
    with tqdm(total=total, unit="line", desc="encoding", disable=not progress) as bar:
        for name, lines in files:
            for tokenizer, processor, whole in zip(tokenizers, processors, syllables, strict=True):
                summary = summarise(count_tokens(processor, lines, bar))
                results.append({"file": name, "tokenizer": str(tokenizer), "vocab_size": processor.get_piece_size(),
                                "ksx1001_syllables": whole, **summary})
    return {"tokenizers": [str(t) for t in tokenizers], "files": [name for name, _ in files], "results": results}


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(stats: dict[str, Any]) -> str:
    """The stats as one plain-text table per file; `vs first` compares tokens per character with the
    first tokenizer, `KS X 1001` counts the Hangul syllables of that set the tokenizer has as pieces."""
    lines = []
    width = max(len("tokenizer"), *(len(t) for t in stats["tokenizers"]))
    total = len(KSX1001_SYLLABLES)
    header = (f"{'tokenizer':<{width}}  {'vocab':>7}  {'KS X 1001':>9}  {'tokens':>9}  {'tok/char':>8}  "
              f"{'vs first':>8}  {'tok/word':>8}  {'bytes %':>7}  {'unk':>5}  "
              + "  ".join(f"{s + ' t/c':>10}" for s in SCRIPTS))
    for name in stats["files"]:
        rows = [r for r in stats["results"] if r["file"] == name]
        script_chars = ", ".join(f"{s} {rows[0]['scripts'][s]['chars']:,}" for s in ALL_SCRIPTS)
        lines += [f"{name}: {rows[0]['chars']:,} characters ({script_chars}), {rows[0]['words']:,} words",
                  header, "-" * len(header)]
        first = rows[0]["tokens_per_char"]
        for r in rows:
            change = f"{100 * (r['tokens_per_char'] / first - 1):+.1f}%" if first and r["tokens_per_char"] else "-"
            share = None if r["byte_fallback_share"] is None else 100 * r["byte_fallback_share"]
            syllables = f"{r['ksx1001_syllables']}/{total}"
            lines.append(f"{r['tokenizer']:<{width}}  {r['vocab_size']:>7}  {syllables:>9}  {r['tokens']:>9,}  "
                         f"{_cell(r['tokens_per_char']):>8}  {change:>8}  {_cell(r['tokens_per_word']):>8}  "
                         f"{_cell(share, 1):>7}  {r['unk_tokens']:>5}  "
                         + "  ".join(f"{_cell(r['scripts'][s]['tokens_per_char']):>10}" for s in SCRIPTS))
        lines.append("")
    return "\n".join(lines).rstrip("\n")
