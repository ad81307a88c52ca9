"""Vocabulary expansion: append new pieces to a LLaMA-family SentencePiece BPE model.

New pieces come from another SentencePiece model (`merge_model`, e.g. KoBERT's, as X-LLaVA did), a plain
list (`merge_vocab`) or a BPE model trained here on text files (`train_corpus`, the Chinese-LLaMA route).
They are filtered (already in the base, byte, control, empty/whitespace-only, duplicate, without the
target script) and appended after the base pieces, so base ids never move, the normaliser and byte
fallback stay as they were, and text without the target script encodes exactly as before. Unless told
otherwise, the 2,350 KS X 1001 Hangul syllables the base lacks are added too (see `syllables`), so no
everyday Korean syllable falls back to bytes, whatever the source of the other pieces: first on the
training route, after the merged pieces on the merge routes. There the merged pieces keep the ids a plain
append gives them (X-LLaVA: LLaMA-2's 32,000 + KoBERT's 7,478 pieces in their order = 39,478), so
characters they need that neither the base nor the source holds follow them too.

Scores: the k-th new piece gets `min(base scores) - k * step` (step 1, or larger where float32 needs it
to keep the scores distinct), so base merges keep priority over new ones and scores fall with the id:
sentencepiece applies merges by score, the written tokenizer.json ranks them by score, and transformers
building merges from tokenizer.model alone ranks them by id; all three agree on the new pieces. Every
character of a new piece is made a piece too (transformers only merges pairs of vocabulary entries;
sentencepiece starts from bare characters).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as pb
from tqdm import tqdm

from xllava_jax.tokenizer.hf_files import (
    CONFIG_FILE,
    SPACE,
    added_tokens_beyond,
    read_base_config,
    write_hf_files,
)
from xllava_jax.tokenizer.runtime import TokenizerError
from xllava_jax.tokenizer.scripts import SCRIPTS, has_script
from xllava_jax.tokenizer.syllables import KSX1001_SYLLABLES, missing_syllables, syllable_count
from xllava_jax.tokenizer.train import train_bpe

MODEL_FILE = "tokenizer.model"
EXPANSION_FILE = "expansion.json"
EXPANSION_FORMAT = "xllava_vocab_expansion"
FILTERS = ("in_base", "duplicate", "byte", "control", "empty", "no_script", "beyond_num_new")
SUBWORD_RULE = (f"the piece's text ({SPACE} read as a space) encoded by the base model with its dummy prefix "
                "and whitespace clean-up switched off")
Piece = pb.ModelProto.SentencePiece
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
MODEL_TYPES = {pb.TrainerSpec.UNIGRAM: "unigram", pb.TrainerSpec.BPE: "bpe", pb.TrainerSpec.WORD: "word",
               pb.TrainerSpec.CHAR: "char"}


def model_path(path: str | Path, setting: str = "base") -> Path:
    """`path` itself, or `path/tokenizer.model` when `path` is a directory (a HF model, a checkpoint); errors
    name `setting`, the argument `path` was given as."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise TokenizerError(f"`{setting}` {path}: directory holds no {MODEL_FILE}")
        return path / MODEL_FILE
    if not path.is_file():
        raise TokenizerError(f"`{setting}` {path}: no such file or directory")
    return path


def load_proto(path: str | Path, setting: str = "base") -> pb.ModelProto:
    """Parse and check a SentencePiece model file (or a directory holding `tokenizer.model`)."""
    file = model_path(path, setting)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(file.read_bytes())
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except (DecodeError, RuntimeError, UnicodeDecodeError):
        proto.Clear()
    if not proto.pieces:
        raise TokenizerError(f"`{setting}` {file}: not a SentencePiece model (cannot parse it as a model proto)")
    return proto


def model_type(proto: pb.ModelProto) -> str:
    """`bpe`, `unigram`, `word` or `char`."""
    return MODEL_TYPES.get(proto.trainer_spec.model_type, "unknown")


def check_base(proto: pb.ModelProto, path: str | Path, source_is_bpe: bool) -> None:
    """Only BPE bases can be expanded; say why for the others."""
    kind = model_type(proto)
    if kind == "bpe":
        return
    if kind == "unigram" and source_is_bpe:
        raise TokenizerError(
            f"`base` {path}: a unigram SentencePiece model, but the new pieces come from a BPE model: their "
            "scores are merge ranks, not the log-probabilities a unigram model segments by, so the merged model "
            "would split text arbitrarily; expand a BPE base (LLaMA family) instead")
    raise TokenizerError(f"`base` {path}: a {kind} SentencePiece model; only BPE bases (LLaMA family) can be "
                         "expanded (transformers' LlamaTokenizer reads tokenizer.model as BPE)")


def model_candidates(proto: pb.ModelProto) -> list[tuple[str, int]]:
    """(piece, type) of a SentencePiece model, best first (score order, then id order)."""
    order = sorted(range(len(proto.pieces)), key=lambda i: -proto.pieces[i].score)
    return [(proto.pieces[i].piece, proto.pieces[i].type) for i in order]


def vocab_candidates(path: str | Path) -> list[tuple[str, int]]:
    """(piece, type) from a plain list, one piece per line, best first. Only the first tab-separated field
    counts (so sentencepiece's `.vocab` files work) and spaces are read as the whitespace mark."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"`merge_vocab` {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"`merge_vocab` {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for line in lines:
        piece = line.split("\t", 1)[0].replace(" ", SPACE)
        out.append((piece, Piece.BYTE if BYTE_PIECE.fullmatch(piece) else Piece.NORMAL))
    return out


def select_pieces(base: pb.ModelProto, candidates: Iterable[tuple[str, int]], script: str = "hangul",
                  limit: int | None = None, first: Sequence[str] = (), last: Sequence[str] = (),
                  contiguous: bool = False) -> tuple[list[str], dict[str, int]]:
    """The new pieces to append, in order, and how many candidates each filter dropped.

    `script` is one of SCRIPTS or `any` (no script filter). `first` and `last` are pieces the base lacks
    (e.g. the syllables to cover): `first` opens the list, `last` closes it, less those the source itself
    supplies (kept in the source's place). Characters a kept piece needs that the vocabulary lacks are added
    just before it or, when `contiguous`, at the very end (after `last`) unless the source supplies them
    later, so that the source's kept pieces follow the base in their order with nothing between them.
    `limit` caps the number of new pieces, all of these included. Filters: in_base, duplicate (repeated in
    the source, or already added: in `first` or, unless `contiguous`, as a character an earlier piece needs),
    byte, control (control, unknown and unused pieces), empty (empty or whitespace only), no_script and
    beyond_num_new.
    """
    if script != "any" and script not in SCRIPTS:
        raise TokenizerError(f"`script` {script}: choose one of {', '.join((*SCRIPTS, 'any'))}")
    in_base = {p.piece for p in base.pieces}
    present = in_base | set(first)
    owed = dict.fromkeys(p for p in last if p not in present)  # what the list ends with, in order
    counts = dict.fromkeys(FILTERS, 0)
    chosen = list(first)
    for piece, kind in candidates:
        if kind == Piece.BYTE or BYTE_PIECE.fullmatch(piece):
            reason = "byte"
        elif kind in (Piece.CONTROL, Piece.UNKNOWN, Piece.UNUSED):
            reason = "control"
        elif not piece.replace(SPACE, " ").strip():
            reason = "empty"
        elif piece in in_base:
            reason = "in_base"
        elif piece in present:
            reason = "duplicate"
        elif script != "any" and not has_script(piece, script):
            reason = "no_script"
        else:
            missing = [c for c in dict.fromkeys(piece) if c not in present and c != piece]
            added = [piece] if contiguous else [*missing, piece]
            deferred = [c for c in missing if c not in owed] if contiguous else []
            size = len(chosen) + len(added) + len(owed) - sum(p in owed for p in added) + len(deferred)
            if limit is not None and size > limit:
                reason = "beyond_num_new"
            else:
                chosen += added
                present.update(added)
                for p in added:
                    owed.pop(p, None)
                owed.update(dict.fromkeys(deferred))
                continue
        counts[reason] += 1
    return chosen + list(owed), counts


def score_step(lowest: float, count: int) -> float:
    """The smallest power-of-two step that keeps `lowest - k * step` (k = 1..count) distinct once stored
    as float32 (LLaMA's whitespace pieces score -1e9, where float32 values lie 64 apart)."""
    step = 1.0
    while True:
        spacing = 2.0 ** (math.frexp(abs(lowest) + count * step)[1] - 24)
        if spacing <= step:
            return step
        step = spacing


def merge_pieces(base: pb.ModelProto, pieces: Sequence[str]) -> pb.ModelProto:
    """A copy of `base` with `pieces` appended as normal pieces, scored below every base piece."""
    merged = pb.ModelProto()
    merged.CopyFrom(base)
    lowest = min(p.score for p in base.pieces)
    step = score_step(lowest, len(pieces))
    for rank, text in enumerate(pieces, 1):
        merged.pieces.add(piece=text, score=lowest - rank * step, type=Piece.NORMAL)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def subword_ids(base: pb.ModelProto, pieces: Sequence[str]) -> list[list[int]]:
    """Base-tokenizer ids of each piece's text (what `subword_mean` initialisation averages).

    The whitespace mark becomes a space and the dummy prefix is switched off, so a word-initial
    `▁사람` splits as the base splits ` 사람` inside a sentence, and a word-internal `니다` gets no `▁`
    that it does not have.
    """
    plain = pb.ModelProto()
    plain.CopyFrom(base)
    plain.normalizer_spec.add_dummy_prefix = False
    plain.normalizer_spec.remove_extra_whitespaces = False
    processor = spm.SentencePieceProcessor(model_proto=plain.SerializeToString())
    return processor.encode([p.replace(SPACE, " ") for p in pieces]) if pieces else []


def unreachable_pieces(merged: pb.ModelProto, pieces: Sequence[str]) -> list[str]:
    """Pieces that no chain of BPE merges can build: no split into two pieces that can be built.

    Merging pieces of a unigram model into a BPE base leaves many of these (they never appear in
    encoded text; the words they stand for fall apart into shorter pieces, often single syllables).
    """
    vocab = {p.piece for p in merged.pieces if p.type in (Piece.NORMAL, Piece.USER_DEFINED)}
    known: dict[str, bool] = {}

    def buildable(text: str) -> bool:
        if len(text) == 1 or text not in vocab:
            return text in vocab
        if text not in known:
            known[text] = any(buildable(text[:i]) and buildable(text[i:]) for i in range(1, len(text)))
        return known[text]

    return [p for p in pieces if not buildable(p)]


def check_out_dir(out: str | Path, setting: str = "out") -> Path:
    """`out` as a Path, if it does not exist or is an empty directory; errors name `setting`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TokenizerError(f"`{setting}` {out}: exists and is not empty; choose a new or empty directory")
    return out


def syllables_to_add(base: pb.ModelProto, num_new: int | None, script: str, coverage: bool) -> list[str] | None:
    """The KS X 1001 syllables the base lacks, in 가나다 order (None without `coverage` or when `script`
    excludes Hangul); TokenizerError when `num_new` leaves no room for them."""
    if not coverage or script not in ("hangul", "any"):
        return None
    missing = missing_syllables({p.piece for p in base.pieces})
    if num_new is not None and num_new < len(missing):
        raise TokenizerError(f"`num_new` {num_new}: the base lacks {len(missing):,} of the "
                             f"{len(KSX1001_SYLLABLES):,} KS X 1001 Hangul syllables, which count towards it; give "
                             f"`num_new` {len(missing)} or more, or `syllable_coverage`=False")
    return missing


def expansion_record(base_path: Path, base: pb.ModelProto, merged: pb.ModelProto, pieces: Sequence[str],
                     counts: dict[str, int], source: dict[str, Any], script: str,
                     syllables: Sequence[str] | None) -> dict[str, Any]:
    """The content of expansion.json: sizes, the new tokens with their base-tokenizer subwords, the
    filter counts, the KS X 1001 syllable counts (`syllables`: those the base lacked, all added; None
    when coverage was off) and where the pieces came from."""
    base_size = len(base.pieces)
    unreachable = unreachable_pieces(merged, pieces)
    warnings = []
    if unreachable:
        warnings.append(f"{len(unreachable)} of {len(pieces)} new pieces cannot be built by BPE merges (no split "
                        "into two vocabulary pieces), so they will never be produced; pieces from a unigram model "
                        "lack BPE's intermediate pieces (train a BPE model with --train-corpus instead)")
    if base.normalizer_spec.name != "identity" or base.normalizer_spec.remove_extra_whitespaces:
        warnings.append("the base normalises text (normalizer "
                        f"{base.normalizer_spec.name!r}); transformers' LlamaTokenizer does not, so its ids "
                        "may differ from sentencepiece's")
    return {
        "format": EXPANSION_FORMAT,
        "base": {"path": str(base_path.absolute()), "sha256": hashlib.sha256(base_path.read_bytes()).hexdigest(),
                 "model_type": model_type(base)},
        "base_size": base_size,
        "new_size": len(merged.pieces),
        "num_new": len(pieces),
        "source": source,
        "script": script,
        "filtered": counts,
        "ksx1001_syllables": {"total": len(KSX1001_SYLLABLES),
                              "in_base": syllable_count({p.piece for p in base.pieces}),
                              "added": len(syllables or ()), "after": syllable_count({p.piece for p in merged.pieces}),
                              "ensured": syllables is not None},
        "unreachable": len(unreachable),
        "warnings": warnings,
        "subword_rule": SUBWORD_RULE,
        "new_tokens": [{"id": base_size + i, "piece": p, "subword_ids": ids}
                       for i, (p, ids) in enumerate(zip(pieces, subword_ids(base, pieces), strict=True))],
    }


def read_expansion(directory: str | Path) -> dict[str, Any]:
    """Read and check `directory/expansion.json` (written by `expand_tokenizer`)."""
    path = Path(directory) / EXPANSION_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file; run `xllava vocab expand` first") from None
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read it ({e})") from None
    if not isinstance(record, dict) or record.get("format") != EXPANSION_FORMAT:
        raise TokenizerError(f"{path}: not an expansion record written by `xllava vocab expand`")
    try:
        base_size, new_size = int(record["base_size"]), int(record["new_size"])
        ids = [token["id"] for token in record["new_tokens"]]
    except (KeyError, TypeError, ValueError):
        raise TokenizerError(f"{path}: incomplete expansion record (base_size, new_size, new_tokens)") from None
    if ids != list(range(base_size, new_size)):
        raise TokenizerError(f"{path}: new token ids are not {base_size}..{new_size - 1}")
    return record


def read_corpus(files: Sequence[str | Path], progress: bool = False) -> set[str]:
    """Check the training files (present, UTF-8, holding text) and return their distinct characters."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise TokenizerError(f"`train_corpus` {path}: no such file")
    chars: set[str] = set()
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="reading corpus",
              disable=not progress) as bar:
        for path in paths:
            with path.open(encoding="utf-8") as handle:
                try:
                    for line in handle:
                        chars.update(line)
                        bar.update(len(line.encode("utf-8")))
                except UnicodeDecodeError as e:
                    raise TokenizerError(f"`train_corpus` {path}: not UTF-8 text ({e.reason})") from None
    chars -= set(" \t\r\n")
    if not chars:
        raise TokenizerError(f"`train_corpus` {' '.join(map(str, files))}: the files hold no text")
    return chars


def train_candidates(files: Sequence[str | Path], base: pb.ModelProto, script: str, num_new: int,
                     first: Sequence[str] = (), progress: bool = False) -> tuple[list[str], dict[str, int], int]:
    """Train a BPE model on `files` and select `num_new` new pieces (`first` opening them) from it, training
    again with a larger vocabulary while filtering leaves too few. Returns (pieces, filter counts, trained
    model size)."""
    vocab_size = len(read_corpus(files, progress)) + 3 + math.ceil((num_new - len(first)) * 1.25)
    pieces: list[str] = []
    for _ in range(4):
        try:
            trained = train_bpe([Path(f) for f in files], base, vocab_size, progress)
        except RuntimeError as e:
            raise TokenizerError(f"`train_corpus`: sentencepiece cannot train on these files "
                                 f"({str(e).strip().splitlines()[-1]})") from None
        pieces, counts = select_pieces(base, model_candidates(trained), script, num_new, first)
        if len(pieces) >= num_new:
            return pieces, counts, len(trained.pieces)
        if len(trained.pieces) < vocab_size:  # the text ran out of merges
            break
        vocab_size += math.ceil((num_new - len(pieces)) * 1.5) + 100
    after = f" besides the {len(first):,} KS X 1001 syllables added first" if first else ""
    raise TokenizerError(f"`num_new` {num_new}: the training corpus supports only {len(pieces) - len(first)} new "
                         f"{script} pieces not already in the base{after}; give more text or a smaller `num_new`")


def expand_tokenizer(base: str | Path, out: str | Path, *, merge_model: str | Path | None = None,
                     merge_vocab: str | Path | None = None, train_corpus: Sequence[str | Path] = (),
                     num_new: int | None = None, script: str = "hangul", syllable_coverage: bool = True,
                     progress: bool = False) -> dict[str, Any]:
    """`xllava vocab expand`: write OUT/tokenizer.model (base + new pieces), the HF tokenizer files and
    OUT/expansion.json; returns the expansion record. Exactly one source of pieces: `merge_model` (a
    SentencePiece model), `merge_vocab` (a list of pieces) or `train_corpus` (text files; needs `num_new`).
    With a merge source, `num_new` caps how many pieces are taken (best first). With `syllable_coverage`
    (and `script` hangul or any) the KS X 1001 syllables the base lacks are added, within `num_new`: first
    with `train_corpus`; after the merged pieces with a merge source, so that these keep the ids of a plain
    append (base size, base size + 1, ... in the source's order; characters they need follow too)."""
    if sum(map(bool, (merge_model, merge_vocab, train_corpus))) != 1:
        raise TokenizerError("give exactly one of `merge_model`, `merge_vocab` and `train_corpus`")
    if train_corpus and num_new is None:
        raise TokenizerError("`train_corpus` needs `num_new` N (how many pieces to add)")
    if num_new is not None and num_new < 1:
        raise TokenizerError(f"`num_new` {num_new}: must be at least 1")
    out = check_out_dir(out)
    base_path = model_path(base)
    proto = load_proto(base)
    base_config = read_base_config(base_path)
    clash = added_tokens_beyond(base_config, len(proto.pieces))
    if clash:
        raise TokenizerError(f"`base` {base}: its {CONFIG_FILE} adds tokens past the SentencePiece vocabulary "
                             f"({', '.join(clash[:3])}) that new pieces would collide with; expand the plain LLM "
                             "tokenizer and add such tokens afterwards")
    source_proto = load_proto(merge_model, "merge_model") if merge_model else None
    check_base(proto, base, source_is_bpe=model_type(source_proto) == "bpe" if source_proto else not merge_vocab)
    syllables = syllables_to_add(proto, num_new, script, syllable_coverage)
    if source_proto:
        pieces, counts = select_pieces(proto, model_candidates(source_proto), script, num_new,
                                       last=syllables or (), contiguous=True)
        source = {"kind": "merge_model", "path": str(model_path(merge_model, "merge_model").absolute()),
                  "model_type": model_type(source_proto), "size": len(source_proto.pieces)}
    elif merge_vocab:
        candidates = vocab_candidates(merge_vocab)
        pieces, counts = select_pieces(proto, candidates, script, num_new, last=syllables or (), contiguous=True)
        source = {"kind": "merge_vocab", "path": str(Path(merge_vocab).absolute()), "lines": len(candidates)}
    else:
        pieces, counts, trained_size = train_candidates(train_corpus, proto, script, num_new, syllables or (),
                                                       progress)
        source = {"kind": "train_corpus", "paths": [str(Path(f).absolute()) for f in train_corpus],
                  "model_type": "bpe", "size": trained_size}
    if not pieces:
        dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        raise TokenizerError(f"no new pieces left after filtering ({dropped or 'the source is empty'})")
    merged = merge_pieces(proto, pieces)
    record = expansion_record(base_path, proto, merged, pieces, counts, source, script, syllables)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(merged.SerializeToString())
    write_hf_files(out, merged, base_config)
    (out / EXPANSION_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return record
