"""Vocabulary resize for new tokens: input embeddings and lm_head together, old rows untouched."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xllava_jax.models.xllava import XLlava

INIT_METHODS = ("mean", "normal", "subword_mean")


def padded_size(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _new_rows(old: np.ndarray, num_new: int, method: str, subword_ids, rng: np.random.Generator) -> np.ndarray:
    """Rows float[num_new, D] for a table float[V_old, D]."""
    mean = old.mean(axis=0, dtype=np.float64)
    if method == "normal":
        return rng.normal(0.0, float(old.std()), size=(num_new, old.shape[1]))
    rows = np.tile(mean, (num_new, 1))
    if method == "subword_mean":
        for i, ids in enumerate(subword_ids):
            if ids:
                rows[i] = old[np.asarray(ids)].mean(axis=0, dtype=np.float64)
    return rows


def resize_vocab(model: XLlava, new_size: int, method: str = "mean", *, subword_ids: Sequence[Sequence[int]] = (),
                 pad_to_multiple_of: int | None = None, seed: int = 0) -> XLlava:
    """A copy of `model` whose vocabulary holds `new_size` tokens (padded up to a multiple).

    Old rows of the embedding and lm_head are kept bit for bit. New rows: `mean` (the mean of the
    old rows), `normal` (random, with the old rows' standard deviation) or `subword_mean`:
    `subword_ids[k]` lists the base-tokenizer ids that new token `V_old + k` splits into, and its row
    is the mean of those old rows (rows with no entry, and padding rows, get the overall mean).
    """
    cfg = model.cfg.text
    old_size = cfg.vocab_size
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {INIT_METHODS}")
    if new_size < old_size:
        raise ValueError(f"new vocabulary size {new_size} is smaller than the current {old_size}")
    if len(subword_ids) > new_size - old_size:
        raise ValueError(f"{len(subword_ids)} subword lists for {new_size - old_size} new tokens")
    for ids in subword_ids:
        if any(not 0 <= i < old_size for i in ids):
            raise ValueError(f"subword ids {list(ids)} fall outside the old vocabulary of {old_size}")
    multiple = pad_to_multiple_of or cfg.pad_vocab_to_multiple_of
    total = padded_size(new_size, multiple)
    text = cfg.__class__(**{**cfg.to_dict(), "vocab_size": total, "pad_vocab_to_multiple_of": multiple})
    new_cfg = model.cfg.replace(text=text)
    rng = np.random.default_rng(seed)
    subwords = list(subword_ids) + [()] * (total - old_size - len(subword_ids))

    def grow(table: jax.Array, axis: int) -> jax.Array:
        old = np.asarray(jax.device_get(table), dtype=np.float32)
        old = old if axis == 0 else old.T
        rows = _new_rows(old, total - old_size, method, subwords, rng).astype(old.dtype)
        grown = np.concatenate([old, rows]) if axis == 0 else np.concatenate([old, rows]).T
        return jnp.asarray(grown, dtype=table.dtype)

    graphdef, state = nnx.split(nnx.eval_shape(lambda: XLlava(new_cfg, rngs=nnx.Rngs(0))))
    old_state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    filled = []
    for path, var in nnx.to_flat_state(state):
        value = old_state[path][...]
        if path == ("language_model", "embed_tokens", "embedding"):
            value = grow(value, 0)
        elif path == ("language_model", "lm_head", "kernel"):
            value = grow(value, 1)
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
