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

    VIF batches carry pixel_values float[B, 1, S, S, 3] and attention_mask; packed text batches carry
    segment_ids and positions instead. loss_chunk > 0: the lm_head and the loss run fused over the
    supervised positions only, `loss_chunk` positions per row at a time (`head_loss_sum`); 0: full
    logits, then `next_token_loss`.
    """
    args = (batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"))
    kw = dict(position_ids=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    if loss_chunk > 0:
        kernel, vocab_major = model.language_model.output_kernel()
        return head_loss_sum(model.hidden_states(*args, **kw), kernel, batch["labels"], chunk=loss_chunk,
                             vocab_major=vocab_major)
    loss, count = next_token_loss(model(*args, **kw), batch["labels"])
    return loss * count, count


def make_train_step(graphdef, tx: optax.GradientTransformation, *, grad_accum: int = 1, loss_chunk: int = 64):
    """A pure function (state, frozen, batch) -> (state, metrics); see the module docstring."""

    def loss_fn(params, frozen, other, batch):
        model = nnx.merge(graphdef, params, frozen, other)
        total, count = forward_loss_sum(model, batch, loss_chunk)
        return total, (count, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict[str, Any], frozen, batch: Batch):
        params = state["params"]
        micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

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
        metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": count, "finite": finite}
        if "skipped" in batch:
            metrics["skipped_records"] = batch["skipped"].sum()
        return new_state, metrics

    return step
