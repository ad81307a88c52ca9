"""The jitted train step: micro-batched gradients, clipping + AdamW, and a guard that keeps the old
state when the loss or gradient is not finite.

State layout (pure pytrees, so jit can shard and donate them):
  train state  {"params": trainable params, "opt": optimizer state, "other": non-param model state
                (RNG streams of dropout), "step": int32[]}
  frozen       the params that do not train (never donated, never in the optimizer)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from xllava_jax.models.loss import head_loss_sum, next_token_loss

Batch = dict[str, jax.Array]


def forward_loss_sum(model, batch: Batch, loss_chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, supervised token count) of one batch.

    VIF batches carry pixel_values float[B, M, S, S, 3] (M image slots) and attention_mask; packed
    ones (text or VIF) also segment_ids and positions. loss_chunk > 0: the lm_head and the loss run
    fused over the supervised positions only, `loss_chunk` positions per row at a time
    (`head_loss_sum`); 0: full logits, then `next_token_loss`.
    """
    args = (batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"))
    kw = dict(position_ids=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    if loss_chunk > 0:
        kernel, vocab_major = model.language_model.output_kernel()
        return head_loss_sum(model.hidden_states(*args, **kw), kernel, batch["labels"], chunk=loss_chunk,
                             vocab_major=vocab_major)
    loss, count = next_token_loss(model(*args, **kw), batch["labels"])
    return loss * count, count


def micro_batches(batch: Batch, count: int, batch_axes=None) -> Batch:
    """Split float/int[B, ...] arrays into `count` micro-batches [count, B / count, ...], row r going to
    micro-batch r % count: with the batch split over devices in contiguous blocks, every device then
    holds an equal share of each micro-batch (no resharding between them). `batch_axes`: the mesh
    axes of the batch dimension, kept on the micro-batches' rows."""

    def split(x):
        b = x.shape[0]
        out = jnp.swapaxes(x.reshape((b // count, count) + x.shape[1:]), 0, 1)
        if batch_axes is None:
            return out
        return jax.lax.with_sharding_constraint(out, jax.sharding.PartitionSpec(None, batch_axes))

    return jax.tree.map(split, batch)


def useful_tokens(batch: Batch) -> jax.Array:
    """Tokens of a batch that are not padding: int32[]."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).sum()
    return jnp.int32(batch["input_ids"].size)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, grad_accum: int = 1, loss_chunk: int = 64,
                    batch_axes=None):
    """A pure function (state, frozen, batch) -> (state, metrics); see the module docstring.
    `batch_axes`: the mesh axes the batch is split over (None: no constraint, e.g. one device)."""

    def loss_fn(params, frozen, other, batch):
        model = nnx.merge(graphdef, params, frozen, other)
        total, count = forward_loss_sum(model, batch, loss_chunk)
        return total, (count, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict[str, Any], frozen, batch: Batch):
        params = state["params"]
        micro = micro_batches(batch, grad_accum, batch_axes)

        def accumulate(carry, mb):
            grads, total, count, other = carry
            (t, (c, other)), g = grad_fn(params, frozen, other, mb)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + c, other), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0.0), jnp.int32(0), state["other"])
        (grads, total, count, other), _ = jax.lax.scan(accumulate, init, micro)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(new_params, params), "opt": keep(opt, state["opt"]), "other": other,
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": count, "finite": finite,
                   "useful_tokens": useful_tokens(batch)}
        if "skipped" in batch:
            metrics["skipped_records"] = batch["skipped"].sum()
        return new_state, metrics

    return step
