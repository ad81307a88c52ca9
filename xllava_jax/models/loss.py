"""Next-token cross-entropy over labels, -100 ignored: from logits (`next_token_loss`), or fused with
the output projection (`head_loss_sum`), which never builds the full [B, S, V] logits."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from xllava_jax import sharding
from xllava_jax.constants import IGNORE_INDEX


def shifted_targets(labels: jax.Array) -> jax.Array:
    """int[B, S] labels aligned with the inputs -> the target of each position: labels[t + 1], and
    IGNORE_INDEX for the last position (it predicts nothing)."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float[B, S, V], labels int[B, S] (aligned with the inputs; shifted here).

    Returns (mean loss over supervised tokens float[], supervised token count int[]). The loss is
    computed in float32; with no supervised token it is 0.
    """
    # Shifting the labels rather than slicing the logits keeps the (large) logits and their gradient unsliced.
    logits = logits.astype(jnp.float32)
    targets = shifted_targets(labels)
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = valid.sum()
    total = jnp.where(valid, logz - picked, 0.0).sum()
    return total / jnp.maximum(count, 1), count


def head_loss_sum(h: jax.Array, w: jax.Array, labels: jax.Array, *, chunk: int = 64,
                  vocab_major: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token losses of `h @ w` over the supervised positions, and their count.

    h float[B, S, D] (final hidden states), w float[D, V] (lm_head kernel) or float[V, D] with
    `vocab_major` (a tied embedding table), labels int[B, S] as for `next_token_loss`. Equal to
    `next_token_loss(h @ w, labels)` (loss x count), with its gradients, but computed chunk by chunk
    over each row's supervised positions only: they are moved to the front of the row, and a loop
    with a data-dependent trip count runs ceil(max supervised per row / chunk) chunks of [B, chunk]
    positions. Unsupervised positions (image tokens, prompts) cost no lm_head work, and at most
    [B, chunk, V] logits exist at a time. The gradients are made in the same pass (the backward
    only scales them), so a step needs no [B, S, V] buffer either. Logits and the softmax are
    float32 whatever the compute dtype of h and w.
    """
    targets = shifted_targets(labels)
    return _head_loss(h, w, targets, chunk, vocab_major), (targets != IGNORE_INDEX).sum()


def _head_pass(h, w, targets, chunk: int, vocab_major: bool, grads: bool):
    """(loss sum float32[], and with `grads` d/dh float32[B, S, D], d/dw float32 like w)."""
    b, s, d = h.shape
    vocab = w.shape[0] if vocab_major else w.shape[1]
    valid = targets != IGNORE_INDEX
    order = jnp.argsort(~valid, axis=1, stable=True)        # each row's supervised positions first
    pad = (-s) % chunk
    gather = lambda x: jnp.pad(jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1),  # noqa: E731
                               ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    hs, ts, vs = gather(h), gather(jnp.where(valid, targets, 0)), gather(valid)
    n_chunks = (valid.sum(1).max() + chunk - 1) // chunk
    shards = _batch_shards(b)
    logits_dims = (((1,), (1,)), ((), ())) if vocab_major else (((1,), (0,)), ((), ()))

    def body(i, carry):
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)  # noqa: E731
        hc, tc, vc = cut(hs).reshape(b * chunk, d), cut(ts).reshape(-1), cut(vs).reshape(-1)
        logits = jax.lax.dot_general(hc, w, logits_dims, preferred_element_type=jnp.float32)   # [b*chunk, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        total = carry[0] + jnp.where(vc, lse - picked, 0.0).sum()
        if not grads:
            return (total,)
        # d(loss sum)/d(logits) = softmax - one_hot(target) on supervised rows, 0 elsewhere.
        dlogits = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(tc, vocab, dtype=jnp.float32)
        dlogits = jnp.where(vc[:, None], dlogits, 0.0).astype(h.dtype)
        if shards > 1:  # d/dw summed per batch shard, reduced once after the loop (not once per chunk)
            dhc = jax.lax.dot_general(dlogits, w, (((1,), (0 if vocab_major else 1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            per_shard = lambda x: x.reshape(shards, -1, x.shape[-1])  # noqa: E731
            lhs, rhs = (dlogits, hc) if vocab_major else (hc, dlogits)
            dwc = sharding.shard(jnp.einsum("snx,sny->sxy", per_shard(lhs), per_shard(rhs),
                                            preferred_element_type=jnp.float32), ("act_batch", None, None))
        elif vocab_major:
            dhc = jnp.dot(dlogits, w, preferred_element_type=jnp.float32)
            dwc = jax.lax.dot_general(dlogits, hc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:
            dhc = jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            # x^T g contracts the token axis, the major axis of both; a transposed copy of the (small)
            # hidden chunk keeps XLA:CPU from transposing the [tokens, V] chunk instead.
            dwc = jnp.dot(jax.lax.optimization_barrier(hc.T), dlogits, preferred_element_type=jnp.float32)
        dhs = jax.lax.dynamic_update_slice_in_dim(carry[1], dhc.reshape(b, chunk, d), i * chunk, axis=1)
        return total, dhs, carry[2] + dwc

    init = (jnp.float32(0.0),)
    if grads:
        dw_shape = ((shards,) if shards > 1 else ()) + w.shape
        init += (jnp.zeros(hs.shape, jnp.float32), jnp.zeros(dw_shape, jnp.float32))
    out = jax.lax.fori_loop(0, n_chunks, body, init)
    if not grads:
        return out[0]
    inverse = jnp.argsort(order, axis=1)
    dh = jnp.take_along_axis(out[1][:, :s], inverse[..., None], axis=1)
    return out[0], dh, out[2].sum(0) if shards > 1 else out[2]


def _batch_shards(batch: int) -> int:
    """How many ways the activation rules split a batch of `batch` rows (1 without rules or a mesh)."""
    spec = sharding.activation_spec(("act_batch",), (batch,))
    if spec is None or spec[0] is None:
        return 1
    axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
    shape = jax.sharding.get_abstract_mesh().shape
    return math.prod(shape[a] for a in axes)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_loss(h, w, targets, chunk, vocab_major):
    return _head_pass(h, w, targets, chunk, vocab_major, grads=False)


def _head_loss_fwd(h, w, targets, chunk, vocab_major):
    total, dh, dw = _head_pass(h, w, targets, chunk, vocab_major, grads=True)
    return total, (dh.astype(h.dtype), dw.astype(w.dtype))


def _head_loss_bwd(chunk, vocab_major, residuals, g):
    dh, dw = residuals
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
