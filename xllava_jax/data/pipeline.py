"""grain input pipeline for VIF corpora: records -> tokens + labels + pixels -> fixed-shape batches.

Order: source (JSON/JSONL records, or ArrayRecord shards from `xllava data build`) -> global seeded
shuffle (reshuffled each epoch) -> this process's share -> encode (frozen-dataclass transform) ->
batch -> multiprocess prefetch. Every element has the same shapes, so a training step compiles once.
With `pack` the encoded conversations are packed several to a row (`data.packing.PackVif`) before
batching, instead of one per row padded to `max_len`.

Bad records never vanish: those the reader rejects are counted and logged before training starts;
those whose image turns out unusable at load time (or that are too long, with `overflow="drop"`)
stay in the batch as `skipped=1` with every label ignored (packed: they take no room and are counted
in a row's `skipped`), logged with their file, line and reason.
`strict=True` stops at the first bad record instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.data import conversation as conv
from xllava_jax.data.images import ImageConfig, ImageError, normalise, resize_crop
from xllava_jax.data.packing import PackVif, default_images_per_row
from xllava_jax.data.vif import Problem, image_problem, read_corpus, resolve_image
from xllava_jax.errors import UserError
from xllava_jax.tokenizer.runtime import tokenizer_for

log = logging.getLogger("xllava.data")
OVERFLOW = ("truncate", "drop")


class DataError(UserError):
    """Bad data met in strict mode, or a pipeline that cannot be built."""


@dataclass(frozen=True)
class VifSpec:
    """Everything the encode transform needs; picklable, so grain workers rebuild the same thing."""

    tokenizer: str
    num_image_tokens: int
    image_token_id: int
    template: str = "llava_llama_2"
    mode: str = "clean"
    image_root: str | None = None
    image_size: int = 336
    aspect: str = "pad"
    max_len: int = 2048
    overflow: str = "truncate"
    system: str | None = None
    strict: bool = False
    pack: bool = False          # several conversations per row (segment ids, positions, image slots)
    images_per_row: int = 0     # packed rows' image slots (0: max_len // (num_image_tokens + 64))
    pack_window: int = 128      # examples packed together (first-fit decreasing); each holds its pixels
    image_cache_mb: int = 256   # resized images kept per process (ImageCache; 0: none)

    def __post_init__(self):
        if self.overflow not in OVERFLOW:
            raise DataError(f"overflow must be one of {OVERFLOW}, got {self.overflow!r}")
        if self.template not in conv.TEMPLATES:
            raise DataError(f"unknown template {self.template!r}; choose one of {conv.TEMPLATES}")
        if self.mode not in conv.MODES:
            raise DataError(f"unknown mode {self.mode!r}; choose one of {conv.MODES}")
        if self.max_len <= self.num_image_tokens + 1:
            raise DataError(f"max_len {self.max_len} leaves no room for text after {self.num_image_tokens} "
                            "image tokens")
        if self.images_per_row < 0 or self.pack_window < 1:
            raise DataError(f"images_per_row must be >= 0 (0: automatic) and pack_window >= 1, got "
                            f"{self.images_per_row} and {self.pack_window}")
        if self.image_cache_mb < 0:
            raise DataError(f"image_cache_mb must be >= 0 (0: no cache), got {self.image_cache_mb}")

    @property
    def image_slots(self) -> int:
        """Images per row: 1 unpacked; `images_per_row` (or its default) packed."""
        if not self.pack:
            return 1
        return self.images_per_row or default_images_per_row(self.max_len, self.num_image_tokens)


def encode_record(record: dict, spec: VifSpec) -> conv.Encoded:
    """Render and tokenise one record (`turns` as (role, text) pairs) under the spec's template."""
    return conv.encode_turns(spec.template, [tuple(t) for t in record["turns"]], tokenizer_for(spec.tokenizer),
                             num_image_tokens=spec.num_image_tokens, image_token_id=spec.image_token_id,
                             mode=spec.mode, system=spec.system)


def fit_length(ids: list[int], labels: list[int], spec: VifSpec) -> tuple[list[int], list[int], str | None]:
    """Truncate (keeping image placeholders whole) or flag an overlong sample: (ids, labels, reason).
    A sample whose answers would all be cut off is flagged too: it would train on nothing."""
    if len(ids) <= spec.max_len:
        return ids, labels, None
    if spec.overflow == "drop":
        return ids, labels, f"{len(ids)} tokens > max_len {spec.max_len} (dropped)"
    cut = spec.max_len
    if ids[cut - 1] == spec.image_token_id and ids[cut] == spec.image_token_id:
        while cut > 0 and ids[cut - 1] == spec.image_token_id:  # never split an image's placeholders
            cut -= 1
    if all(lab == IGNORE_INDEX for lab in labels[:cut]):
        return ids, labels, f"no answer token within max_len {spec.max_len} ({len(ids)} tokens; raise data.max_len)"
    return ids[:cut], labels[:cut], None


def _example(ids, labels, pixels, spec: VifSpec, skipped: bool, truncated: bool) -> dict[str, np.ndarray]:
    """One record as a row padded to max_len (see `vif_dataset`), or with `pack` as a variable-length
    example for `PackVif`: input_ids, labels int32[n], pixel_values float32[k, S, S, 3] (k: the images
    its placeholders stand for), skipped, truncated; a skipped record keeps no tokens."""
    if spec.pack:
        if skipped:
            ids = labels = []
        images = sum(t == spec.image_token_id for t in ids) // spec.num_image_tokens
        return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
                "pixel_values": np.broadcast_to(pixels, (images,) + pixels.shape),
                "skipped": np.int32(skipped), "truncated": np.int32(truncated)}
    n = len(ids)
    pad = spec.max_len - n
    tok = tokenizer_for(spec.tokenizer)
    return {
        "input_ids": np.asarray(ids + [tok.pad_id] * pad, np.int32),
        "labels": np.asarray((labels if not skipped else [IGNORE_INDEX] * n) + [IGNORE_INDEX] * pad, np.int32),
        "attention_mask": np.asarray([1] * n + [0] * pad, np.int32),
        "pixel_values": pixels[None],
        "skipped": np.int32(skipped),
        "truncated": np.int32(truncated),
    }


def _blank(spec: VifSpec) -> np.ndarray:
    return np.zeros((spec.image_size, spec.image_size, 3), np.float32)


def _skip(record: dict, reason: str, spec: VifSpec):
    where = f"{record.get('file', '?')}:{record.get('where', '?')} (id {record.get('id')})"
    if spec.strict:
        raise DataError(f"{where}: {reason}")
    log.warning("skipping %s: %s", where, reason)


def _resized(source, cfg: ImageConfig, name: str) -> tuple[np.ndarray | None, str | None]:
    """(uint8 pixels, None) for a usable image, else (None, why not)."""
    try:
        return resize_crop(source, cfg, name=name), None
    except ImageError as e:
        return None, f"image {e}"


def _resized_file(image_root: str | None, relpath: str, cfg: ImageConfig) -> tuple[np.ndarray | None, str | None]:
    """`_resized` for the file `relpath` names under `image_root` (a path escaping the root is a reason too)."""
    reason = image_problem(image_root, relpath, decode=False)
    return (None, reason) if reason else _resized(resolve_image(image_root, relpath), cfg, relpath)


class ImageCache:
    """Resized uint8 images (or why an image cannot be used) by file, the least recently used dropped once the
    pixels held pass the limit; one per process, shared by its reader threads. A corpus whose records share
    images (many questions per image, or epochs over a few thousand images) then decodes and resizes each image
    once per process rather than once per record; a file changed on disk during the run keeps its first read."""

    def __init__(self):
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, limit: int, load) -> tuple[np.ndarray | None, str | None]:
        """The value cached for `key`, else `load()`'s, kept while the cache holds at most `limit` bytes."""
        if limit <= 0:
            return load()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()  # outside the lock: threads decode in parallel (two may load one image; both agree)
        with self._lock:
            if key not in self._items and _cost(value) <= limit:
                self._items[key] = value
                self._bytes += _cost(value)
                while self._bytes > limit:
                    self._bytes -= _cost(self._items.popitem(last=False)[1])
        return value

    def __len__(self) -> int:
        return len(self._items)


def _cost(value: tuple[np.ndarray | None, str | None]) -> int:
    """Bytes an ImageCache entry counts for against the limit: its pixels, or 256 for a reason."""
    return 256 if value[0] is None else value[0].nbytes


_IMAGES = ImageCache()


@dataclass(frozen=True)
class EncodeVif(grain.transforms.Map):
    """A raw record -> a fixed-shape example (see `_example`). The image comes from `image_bytes`
    when the record carries them (TFDS-built corpora), else from `image` under the image root."""

    spec: VifSpec

    def map(self, record: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        enc = encode_record(record, spec)
        pixels, reason = _blank(spec), None
        if record.get("image") is not None:
            cfg = ImageConfig.for_vision(spec.image_size, spec.aspect)
            if record.get("image_bytes") is not None:
                resized, reason = _resized(record["image_bytes"], cfg, record["image"])
            else:
                key = (spec.image_root, record["image"], cfg.size, cfg.aspect)
                resized, reason = _IMAGES.get(key, spec.image_cache_mb << 20,
                                              lambda: _resized_file(spec.image_root, record["image"], cfg))
            if reason is None:
                pixels = normalise(resized, cfg)
        ids, labels, overflow = fit_length(enc.input_ids, enc.labels, spec)
        reason = reason or overflow
        if reason is not None:
            _skip(record, reason, spec)
            ids, labels = ids[: spec.max_len], labels[: spec.max_len]
        return _example(ids, labels, pixels, spec, reason is not None, len(ids) < len(enc.input_ids))


@dataclass(frozen=True)
class DecodeBuilt(grain.transforms.Map):
    """A record built by `xllava data build` (tokens + encoded image bytes) -> a fixed-shape example."""

    spec: VifSpec

    def map(self, raw: bytes) -> dict[str, np.ndarray]:
        spec = self.spec
        record, image_bytes = unpack_built(raw)
        pixels, reason = _blank(spec), None
        if image_bytes:
            cfg = ImageConfig.for_vision(spec.image_size, spec.aspect)
            resized, reason = _resized(image_bytes, cfg, record.get("image"))
            if reason is None:
                pixels = normalise(resized, cfg)
        ids, labels, overflow = fit_length(record["input_ids"], record["labels"], spec)
        reason = reason or overflow
        if reason is not None:
            _skip(record, reason, spec)
            ids, labels = ids[: spec.max_len], labels[: spec.max_len]
        return _example(ids, labels, pixels, spec, reason is not None, len(ids) < len(record["input_ids"]))


def pack_built(record: dict, image_bytes: bytes) -> bytes:
    """The ArrayRecord payload of one built record: 4-byte JSON length, JSON, image bytes."""
    head = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return len(head).to_bytes(4, "little") + head + image_bytes


def unpack_built(raw: bytes) -> tuple[dict, bytes]:
    """Inverse of `pack_built`."""
    n = int.from_bytes(raw[:4], "little")
    return json.loads(raw[4: 4 + n]), raw[4 + n:]


def batch_shapes(spec: VifSpec, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of a `vif_dataset` batch (e.g. for compiling the step ahead of data)."""
    b, s, size = batch_size, spec.max_len, spec.image_size
    shapes = {"input_ids": ((b, s), np.int32), "labels": ((b, s), np.int32), "attention_mask": ((b, s), np.int32),
              "pixel_values": ((b, spec.image_slots, size, size, 3), np.float32), "skipped": ((b,), np.int32),
              "truncated": ((b,), np.int32)}
    if spec.pack:
        shapes.update(segment_ids=((b, s), np.int32), positions=((b, s), np.int32))
    return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in shapes.items()}


def load_records(paths: list[str | Path], strict: bool = False) -> tuple[list[dict], list[Problem]]:
    """Usable records (as picklable dicts) of several corpora, and the problems met reading them."""
    records, problems = [], []
    for path in paths:
        for item in read_corpus(path):
            if isinstance(item, Problem):
                if strict:
                    raise DataError(str(item))
                log.warning("skipping %s", item)
                problems.append(item)
            else:
                records.append({"id": item.id, "turns": [list(t) for t in item.turns], "image": item.image,
                                "lang": item.lang, "where": item.where, "file": str(path)})
    if not records:
        raise DataError(f"no usable records in {', '.join(str(p) for p in paths)}")
    return records, problems


def vif_dataset(source, spec: VifSpec, *, batch_size: int, seed: int = 0, num_epochs: int | None = None,
                process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                read_threads: int | None = None, built: bool = False) -> grain.IterDataset:
    """Batches for one JAX process. `source`: record dicts (a list from `load_records`, or the
    `build.tfds_records` dataset) or, with built=True, a grain data source of `pack_built` payloads
    (`build.array_record_source`).

    Each batch: input_ids, labels, attention_mask int32[B, L]; pixel_values float32[B, M, S, S, 3];
    skipped, truncated int32[B] (records of each row); with `spec.pack` also segment_ids and
    positions int32[B, L] (see `batch_shapes`). Processes read disjoint shares of each (reshuffled) epoch.
    """
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(DecodeBuilt(spec) if built else EncodeVif(spec))
    # Threads inside each process: image decoding releases the GIL, so without worker processes a few
    # threads use the cores; with workers, one thread each avoids oversubscribing them.
    threads = read_threads if read_threads is not None else (1 if num_workers else min(os.cpu_count() or 1, 8))
    if spec.pack:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads))
        it = PackVif(it, max_len=spec.max_len, images_per_row=spec.image_slots, image_size=spec.image_size,
                     pad_id=tokenizer_for(spec.tokenizer).pad_id, window=spec.pack_window)
        it = it.batch(batch_size, drop_remainder=True)
    else:
        ds = ds.batch(batch_size, drop_remainder=True)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch_size))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=num_workers))
    return it

