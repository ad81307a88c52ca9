"""Next-token cross-entropy over labels, -100 ignored."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float[B, S, V], labels int[B, S] (aligned with the inputs; shifted here).

    Returns (mean loss over supervised tokens float[], supervised token count int[]). The loss is
    computed in float32; with no supervised token it is 0.
    """
    # Position t predicts labels[t + 1]; the last position predicts nothing. Shifting the labels
    # rather than slicing the logits keeps the (large) logits and their gradient unsliced.
    logits = logits.astype(jnp.float32)
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = valid.sum()
    total = jnp.where(valid, logz - picked, 0.0).sum()
    return total / jnp.maximum(count, 1), count
