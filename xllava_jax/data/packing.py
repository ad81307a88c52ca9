"""Packed multimodal rows: several VIF conversations per fixed-length row, none of them split.

A packed row of `max_len` tokens holds conversations one after another. Each has its own segment id
(1, 2, ... in the row; 0 on padding), positions restarting at 0, labels whose first token is ignored
(so no target crosses from one conversation into the next), and its image in the row's next free
image slot: pixel_values float32[M, S, S, 3] with M = `images_per_row` static slots (unused slots
are zeros). The model reads the slots in order, one image's features per `num_image_tokens`
placeholders of the row, and attends within segments only (`models.llama.causal_mask`).

Packing is first-fit decreasing over windows of `window` consecutive (already shuffled) examples: the
window's examples, longest first, go to the first row with room for their tokens and, for those with
an image, a free slot; a new row opens when none has. Rows are a function of the window's contents
alone, so the iterator's state is the parent's state at the window's start plus how many of the
window's rows were emitted: restoring it re-reads the window and continues mid-window exactly.

Examples that carry no tokens (records the encoder skipped: a bad image, too long under
`overflow=drop`) are counted in the `skipped` of their window's first row; a window of nothing but
such examples yields one row of padding that carries the count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from xllava_jax.constants import IGNORE_INDEX

MIN_TEXT_TOKENS = 64  # text assumed next to each image when sizing the default slots: template, question, answer


def default_images_per_row(max_len: int, num_image_tokens: int) -> int:
    """Image slots of a packed row when not configured: as many images as fit with a short text each."""
    return max(1, max_len // (num_image_tokens + MIN_TEXT_TOKENS))


def plan_rows(lengths: Sequence[int], images: Sequence[int], max_len: int, images_per_row: int) -> list[list[int]]:
    """First-fit decreasing: the indices of the examples in each row, every example with 0 < length
    <= max_len in exactly one row (in ascending index order within a row), rows in the order they
    opened. lengths int[N] (tokens), images int[N] (image slots each example needs)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[list[int]] = []  # per row: [free tokens, free image slots]
    for i in order:
        n, k = lengths[i], images[i]
        if n > max_len or k > images_per_row:
            raise ValueError(f"example {i} ({n} tokens, {k} images) cannot fit a row of {max_len} tokens and "
                             f"{images_per_row} image slots")
        for row, free in zip(rows, room):
            if free[0] >= n and free[1] >= k:
                row.append(i)
                free[0] -= n
                free[1] -= k
                break
        else:
            rows.append([i])
            room.append([max_len - n, images_per_row - k])
    return [sorted(row) for row in rows]


def pack_row(examples: Sequence[dict[str, np.ndarray]], *, max_len: int, images_per_row: int, image_size: int,
             pad_id: int, skipped: int = 0) -> dict[str, np.ndarray]:
    """One packed row from variable-length examples (input_ids, labels int32[n], pixel_values
    float32[k, S, S, 3], skipped, truncated).

    Returns input_ids, labels, attention_mask, segment_ids, positions int32[max_len]; pixel_values
    float32[images_per_row, S, S, 3]; skipped, truncated int32[] (records of the row, plus `skipped`).
    """
    ids = np.full(max_len, pad_id, np.int32)
    labels = np.full(max_len, IGNORE_INDEX, np.int32)
    segments = np.zeros(max_len, np.int32)
    positions = np.zeros(max_len, np.int32)
    pixels = np.zeros((images_per_row, image_size, image_size, 3), np.float32)
    at = slot = truncated = 0
    for segment, ex in enumerate(examples, start=1):
        n, k = len(ex["input_ids"]), len(ex["pixel_values"])
        ids[at: at + n] = ex["input_ids"]
        labels[at: at + n] = ex["labels"]
        labels[at] = IGNORE_INDEX  # never a target: the previous segment's last token predicts nothing
        segments[at: at + n] = segment
        positions[at: at + n] = np.arange(n, dtype=np.int32)
        pixels[slot: slot + k] = ex["pixel_values"]
        at, slot = at + n, slot + k
        skipped += int(ex["skipped"])
        truncated += int(ex["truncated"])
    return {"input_ids": ids, "labels": labels, "attention_mask": (segments > 0).astype(np.int32),
            "segment_ids": segments, "positions": positions, "pixel_values": pixels,
            "skipped": np.int32(skipped), "truncated": np.int32(truncated)}


class PackVif(grain.IterDataset):
    """Variable-length VIF examples -> packed rows (see the module docstring); checkpointable."""

    def __init__(self, parent: grain.IterDataset, *, max_len: int, images_per_row: int, image_size: int,
                 pad_id: int, window: int):
        super().__init__(parent)
        if window < 1:
            raise ValueError(f"the packing window must hold at least one example, got {window}")
        self.options = dict(max_len=max_len, images_per_row=images_per_row, image_size=image_size, pad_id=pad_id)
        self.window = window

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self.options, self.window)

    def __str__(self) -> str:
        return f"PackVif(window={self.window}, {self.options})"


class _PackIterator(grain.DatasetIterator):
    """State: the parent's state before the current window and the rows of the window already returned."""

    def __init__(self, parent: grain.DatasetIterator, options: dict[str, int], window: int):
        super().__init__(parent)
        self._options, self._window = options, window
        self._start = parent.get_state()   # the parent's state before the current window
        self._examples: list[dict] | None = None
        self._rows: list[list[int]] = []
        self._skipped = 0
        self._emitted = 0                  # rows of the current window already returned

    def _read_window(self) -> None:
        self._start = self._parent.get_state()
        examples = []
        for _ in range(self._window):
            try:
                examples.append(next(self._parent))
            except StopIteration:
                break
        if not examples:
            raise StopIteration
        lengths = [len(ex["input_ids"]) for ex in examples]
        images = [len(ex["pixel_values"]) for ex in examples]
        # Skipped examples hold no tokens and sit in no row; their count rides on the window's first row (a
        # window of nothing else makes one row of padding).
        self._rows = plan_rows(lengths, images, self._options["max_len"], self._options["images_per_row"]) or [[]]
        self._skipped = sum(int(ex["skipped"]) for ex in examples)
        self._examples = examples

    def __next__(self) -> dict[str, np.ndarray]:
        if self._examples is not None and self._emitted >= len(self._rows):
            self._examples, self._emitted = None, 0
        if self._examples is None:
            self._read_window()  # after `set_state`, `_emitted` rows of it were returned before
        row = self._rows[self._emitted]
        skipped = self._skipped if self._emitted == 0 else 0
        self._emitted += 1
        return pack_row([self._examples[i] for i in row], skipped=skipped, **self._options)

    def get_state(self) -> dict[str, Any]:
        if self._examples is not None and self._emitted >= len(self._rows):
            return {"parent": self._parent.get_state(), "emitted": 0}
        return {"parent": self._start, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._start, self._emitted, self._examples = state["parent"], state["emitted"], None


def pad_fractions(lengths: Sequence[int], images: Sequence[int], max_len: int, images_per_row: int,
                  window: int) -> dict[str, float]:
    """Padding of a stream of examples (lengths int[N] <= max_len, images int[N]) in rows of `max_len`:
    one example per row (`padded`) and packed window by window as `PackVif` packs them (`packed`),
    with the rows each needs per 1,000 examples and the most images a packed row holds."""
    rows = most_images = 0
    for start in range(0, len(lengths), window):
        plan = plan_rows(lengths[start: start + window], images[start: start + window], max_len, images_per_row)
        rows += len(plan)
        most_images = max([most_images] + [sum(images[start + i] for i in row) for row in plan])
    tokens, n = float(sum(lengths)), len(lengths)
    return {"pad_fraction_padded": 1 - tokens / (n * max_len), "pad_fraction_packed": 1 - tokens / (rows * max_len),
            "rows_per_1000_padded": 1000.0, "rows_per_1000_packed": 1000.0 * rows / n,
            "most_images_in_a_row": most_images}
