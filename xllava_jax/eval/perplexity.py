"""`xllava eval perplexity`: mean NLL per token, perplexity and bits per character of text files.

Each non-empty line of a file is one document. A document's tokens (no bos, no eos) are cut into
windows of `seq_len - 1` tokens without overlap; each window is scored as `[bos] + window`, so every
document token is predicted exactly once, the first token of every window conditioned on nothing but
bos (later windows do not see earlier ones). The eos is not scored. Figures per file:
- tokens: scored tokens; characters: characters of the scored documents (the lines without newlines);
- nll_per_token: total NLL (nats) / tokens; perplexity: exp(nll_per_token);
- bits_per_character: total NLL / ln 2 / characters (comparable across tokenizers, e.g. before and after
  vocabulary expansion).
Windows are right-padded to `seq_len` and batched by `batch_size` (a short last batch padded with empty
rows), so one program is compiled per (batch size, seq_len).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from xllava_jax.errors import UserError
from xllava_jax.infer.engine import Engine


def windows(documents: list[list[int]], bos_id: int, seq_len: int) -> list[list[int]]:
    """`[bos] + chunk` for every chunk of `seq_len - 1` tokens of every document (see the module docstring)."""
    if seq_len < 2:
        raise UserError(f"`seq_len` must be at least 2, got {seq_len}")
    step = seq_len - 1
    return [[bos_id, *doc[i:i + step]] for doc in documents for i in range(0, len(doc), step)]


def _window_nll(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed NLL (nats, float32) of each row's tokens after the first: ids, mask int32[B, S] -> float[B]."""
    model = nnx.merge(graphdef, state)
    logits = model(ids, attention_mask=mask).astype(jnp.float32)[:, :-1]
    targets = ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.where(mask[:, 1:] > 0, nll, 0.0).sum(axis=1)


class Scorer:
    """Sums NLL over windows with one compiled program per (batch size, seq_len)."""

    def __init__(self, engine: Engine, seq_len: int = 512, batch_size: int = 8):
        if batch_size < 1:
            raise UserError(f"`batch_size` must be at least 1, got {batch_size}")
        if seq_len > engine.max_context:
            raise UserError(f"`seq_len` {seq_len} exceeds the model's context of {engine.max_context}")
        self.engine, self.seq_len, self.batch_size = engine, seq_len, batch_size
        graphdef, self.state = engine.generator.graphdef, engine.generator.state
        self._nll = jax.jit(lambda state, ids, mask: _window_nll(graphdef, state, ids, mask))

    def total_nll(self, rows: list[list[int]], progress: str | None = None) -> float:
        """Summed NLL (nats) of every window's tokens after its bos; float64 accumulation on the host."""
        total = 0.0
        pad = self.engine.tokenizer.pad_id
        with tqdm(total=len(rows), unit="window", desc=progress, disable=progress is None, file=sys.stderr) as bar:
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                ids = np.full((self.batch_size, self.seq_len), pad, np.int32)
                mask = np.zeros((self.batch_size, self.seq_len), np.int32)
                for i, row in enumerate(batch):
                    ids[i, :len(row)], mask[i, :len(row)] = row, 1
                total += float(np.asarray(self._nll(self.state, ids, mask), np.float64).sum())
                bar.update(len(batch))
        return total


def score_file(scorer: Scorer, path: str | Path) -> dict[str, Any]:
    """The figures of one text file (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [line for line in lines if line.strip()]
    tok = scorer.engine.tokenizer
    tokens = [tok.encode(doc) for doc in docs]
    count = sum(map(len, tokens))
    if count == 0:
        raise UserError(f"{path}: no text to score")
    nll = scorer.total_nll(windows(tokens, tok.bos_id, scorer.seq_len), progress=path.name)
    chars = sum(map(len, docs))
    return {"documents": len(docs), "tokens": count, "characters": chars, "nll_per_token": nll / count,
            "perplexity": math.exp(nll / count), "bits_per_character": nll / math.log(2) / chars}
