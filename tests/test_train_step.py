"""Gradient accumulation: micro-batches give the loss and update of one whole batch."""

import hf_models as H
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xllava_jax.config import ModelConfig
from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.models.xllava import XLlava
from xllava_jax.train.optim import trainable_filter
from xllava_jax.train.step import make_train_step


def test_grad_accumulation_matches_the_whole_batch():
    cfg = ModelConfig.tiny()
    model = XLlava(cfg, rngs=nnx.Rngs(0))
    graphdef, params, frozen, other = nnx.split(model, trainable_filter(("projector", "llm")), nnx.Param, ...)
    params, frozen, other = (nnx.to_pure_dict(s) for s in (params, frozen, other))
    tx = optax.adamw(1e-3, eps=1e-3)  # a large eps: Adam turns rounding noise in ~0 gradients into +-lr
    n = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.ones((4, 1)), np.full((4, n), cfg.image_token_id),
                          rng.integers(3, 200, size=(4, 20))], axis=1).astype(np.int32)
    labels = ids.copy()
    labels[:, : 1 + n] = IGNORE_INDEX
    labels[1, -12:] = IGNORE_INDEX  # unequal supervised counts: the mean must be over all tokens
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels),
             "pixel_values": jnp.asarray(H.images(4))[:, None], "attention_mask": jnp.ones_like(jnp.asarray(ids))}
    results = []
    for accum in (1, 2, 4):
        state = {"params": params, "opt": tx.init(params), "other": other, "step": jnp.zeros((), jnp.int32)}
        new_state, metrics = jax.jit(make_train_step(graphdef, tx, grad_accum=accum))(state, frozen, batch)
        results.append((metrics, new_state["params"]))
    for metrics, new_params in results[1:]:
        assert int(metrics["supervised_tokens"]) == int(results[0][0]["supervised_tokens"])
        np.testing.assert_allclose(float(metrics["loss"]), float(results[0][0]["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(results[0][0]["grad_norm"]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
