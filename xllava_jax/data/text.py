"""Pretraining corpora: plain text, JSONL, ArrayRecord and TFDS sources, tokenised, mixed by weight
and packed into fixed-length sequences whose documents do not attend to each other.

Source specs (one per corpus):
  `PATH.txt`                one document per non-empty line
  `PATH.jsonl[:FIELD]`      one JSON object per line, text in FIELD (default `text`)
  `array_record:GLOB`       ArrayRecord files whose records are UTF-8 text or JSON with a `text` field
  `tfds:NAME[/SPLIT]@DIR`   a TFDS dataset in array_record format under DIR, `text` feature, no TensorFlow
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.errors import UserError
from xllava_jax.tokenizer.runtime import tokenizer_for


class CorpusError(UserError):
    """A pretraining corpus that cannot be read."""


class _Lines(grain.sources.RandomAccessDataSource):
    """Documents of a .txt (one per non-empty line) or .jsonl file, read once into memory offsets."""

    def __init__(self, path: str, field: str | None):
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None
        self._path, self._field = path, field
        self._lines = [line for line in data.split(b"\n") if line.strip()]
        if not self._lines:
            raise CorpusError(f"{path}: no documents")

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> str:
        return _text_of(self._lines[index], self._field, f"{self._path}:{index + 1}")


def _text_of(raw: bytes, field: str | None, where: str) -> str:
    try:
        text = raw.decode("utf-8")
        if field is None:
            return text
        value = json.loads(text)[field]
    except UnicodeDecodeError:
        raise CorpusError(f"{where}: invalid UTF-8") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CorpusError(f"{where}: not a JSON object with a {field!r} field") from None
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} is not a string")
    return value


class _ArrayRecordText(grain.sources.RandomAccessDataSource):
    def __init__(self, pattern: str):
        files = sorted(glob.glob(pattern))
        if not files:
            raise CorpusError(f"{pattern}: no ArrayRecord files match")
        self._source = grain.sources.ArrayRecordDataSource(files)
        self._pattern = pattern

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        raw = self._source[index]
        field = "text" if raw.lstrip()[:1] == b"{" else None
        return _text_of(raw, field, f"{self._pattern}[{index}]")


def open_source(spec: str):
    """A random-access source of document strings for one corpus spec (see the module docstring)."""
    if spec.startswith("array_record:"):
        return _ArrayRecordText(spec[len("array_record:"):])
    if spec.startswith("tfds:"):
        return _tfds_text(spec[len("tfds:"):])
    path, _, field = spec.partition(".jsonl:")
    if field:
        return _Lines(path + ".jsonl", field)
    if spec.endswith(".jsonl"):
        return _Lines(spec, "text")
    return _Lines(spec, None)


def _tfds_text(spec: str):
    import tensorflow_datasets as tfds

    name, _, data_dir = spec.partition("@")
    name, _, split = name.partition("/")
    try:
        source = tfds.data_source(name, split=split or "train", data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; report one line
        raise CorpusError(f"tfds:{spec}: cannot open ({str(e).splitlines()[0]})") from None
    return grain.MapDataset.source(source).map(lambda ex: ex["text"].decode("utf-8")
                                               if isinstance(ex["text"], bytes) else str(ex["text"]))


@dataclass(frozen=True)
class TokenizeDocument(grain.transforms.Map):
    """A document string -> {"input_ids": int32[n]}: bos + text + eos."""

    tokenizer: str

    def map(self, text: str) -> dict[str, np.ndarray]:
        tok = tokenizer_for(self.tokenizer)
        return {"input_ids": np.asarray([tok.bos_id] + tok.encode(text) + [tok.eos_id], np.int32)}


@dataclass(frozen=True)
class PackedToTrain(grain.transforms.Map):
    """A packed sequence -> model inputs: input_ids, labels (padding and each document's first token
    ignored), segment_ids (0 = padding), positions within each document."""

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = packed["input_ids"]
        seg = packed["input_ids_segment_ids"].astype(np.int32)
        starts = np.concatenate([[True], seg[1:] != seg[:-1]])
        labels = np.where((seg == 0) | starts, IGNORE_INDEX, ids).astype(np.int32)
        return {"input_ids": ids.astype(np.int32), "labels": labels, "segment_ids": seg,
                "positions": packed["input_ids_positions"].astype(np.int32)}


def text_dataset(specs: list[str], tokenizer: str, *, seq_len: int, weights: list[float] | None = None,
                 seed: int = 0, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Mixed, shuffled, tokenised and packed pretraining sequences for one JAX process.

    Each element: input_ids, labels, segment_ids, positions, all int32[seq_len]. Corpora are
    mixed by `weights` (default equal) and repeat forever; each process reads a disjoint share.
    """
    if weights is not None and len(weights) != len(specs):
        raise CorpusError(f"{len(weights)} weights for {len(specs)} corpora")
    parts = [grain.MapDataset.source(open_source(s)).shuffle(seed + i).repeat() for i, s in enumerate(specs)]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights or [1.0] * len(parts))
    mixed = mixed[process_index::process_count].map(TokenizeDocument(tokenizer))
    packed = ConcatThenSplitIterDataset(mixed.to_iter_dataset(), length_struct={"input_ids": seq_len})
    return packed.map(PackedToTrain())
