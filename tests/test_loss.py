"""The fused lm_head + loss (`head_loss_sum`) against full logits + `next_token_loss`: values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xllava_jax.config import ModelConfig
from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.models.loss import head_loss_sum, next_token_loss
from xllava_jax.models.xllava import XLlava
from xllava_jax.train.optim import trainable_filter
from xllava_jax.train.step import forward_loss_sum, make_train_step


def _labels(rng, b, s, v):
    labels = rng.integers(0, v, size=(b, s))
    labels[0, :7] = IGNORE_INDEX                           # a prompt, then the answer
    labels[1, rng.random(s) < 0.6] = IGNORE_INDEX          # scattered supervised positions
    labels[2] = IGNORE_INDEX                               # nothing supervised in this row
    labels[3, :-3] = IGNORE_INDEX                          # only the last positions (the last predicts nothing)
    return jnp.asarray(labels)


def _reference(h, w, labels, vocab_major):
    logits = h @ (w.T if vocab_major else w)
    loss, count = next_token_loss(logits, labels)
    return loss * count, count


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_head_loss_equals_full_logits_loss_with_gradients(chunk, vocab_major):
    rng = np.random.default_rng(chunk)
    b, s, d, v = 4, 23, 16, 50
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d) if vocab_major else (d, v)) * 0.3, jnp.float32)
    labels = _labels(rng, b, s, v)
    ours = jax.value_and_grad(lambda h, w: head_loss_sum(h, w, labels, chunk=chunk, vocab_major=vocab_major)[0],
                              argnums=(0, 1))
    want = jax.value_and_grad(lambda h, w: _reference(h, w, labels, vocab_major)[0], argnums=(0, 1))
    (got_loss, got_grads), (want_loss, want_grads) = jax.jit(ours)(h, w), want(h, w)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    for got, ref in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(want_grads[0][2]).max()) == 0.0     # the unsupervised row gets no gradient
    assert float(jnp.abs(got_grads[0][2]).max()) == 0.0
    total, count = jax.jit(lambda h, w: head_loss_sum(h, w, labels, chunk=chunk, vocab_major=vocab_major))(h, w)
    assert float(total) == pytest.approx(float(want_loss), rel=1e-6)
    assert int(count) == int(_reference(h, w, labels, vocab_major)[1])


@pytest.mark.parametrize("vocab_major", [False, True])
def test_head_loss_with_the_batch_split_over_devices_sums_the_lm_head_gradient_once(vocab_major):
    """Under a mesh and activation rules the lm_head gradient is kept per batch shard inside the
    chunk loop and reduced once after it (no all-reduce per chunk): the same values and gradients,
    and exactly one all-reduce / reduce-scatter of a weight-sized array in the compiled program."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from xllava_jax import sharding

    rng = np.random.default_rng(3)
    b, s, d, v = 8, 23, 16, 56
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d) if vocab_major else (d, v)) * 0.3, jnp.float32)
    labels = jnp.concatenate([_labels(rng, 4, s, v), _labels(rng, 4, s, v)])
    mesh = sharding.make_mesh((2, 4, 1))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    fn = jax.jit(jax.value_and_grad(lambda h, w: head_loss_sum(h, w, labels, chunk=5, vocab_major=vocab_major)[0],
                                    argnums=(0, 1)))
    with jax.set_mesh(mesh), sharding.activation_rules():
        args = (jax.device_put(h, rows), jax.device_put(w, NamedSharding(mesh, P())))
        got_loss, got_grads = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    want_loss, want_grads = jax.value_and_grad(lambda h, w: _reference(h, w, labels, vocab_major)[0],
                                               argnums=(0, 1))(h, w)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    for got, ref in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    computation, reductions = "", []
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            computation = line.split(" ")[0]            # ENTRY, or a loop body's computation
        if ("all-reduce(" in line or "reduce-scatter(" in line) and (f"[{d},{v}]" in line or f"[{v},{d}]" in line):
            reductions.append(computation)
    assert reductions == ["ENTRY"], reductions            # once, after the loop; not once per chunk


def test_head_loss_without_supervised_tokens_is_zero_with_zero_gradients():
    h, w = jnp.ones((2, 6, 4)), jnp.ones((4, 9))
    labels = jnp.full((2, 6), IGNORE_INDEX)
    (total, count), grads = jax.value_and_grad(lambda h, w: head_loss_sum(h, w, labels, chunk=4), argnums=(0, 1),
                                               has_aux=True)(h, w)
    assert float(total) == 0.0 and int(count) == 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_head_loss_in_bfloat16_stays_close_to_float32():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(4, 30, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 70)) * 0.2, jnp.float32)
    labels = _labels(rng, 4, 30, 70)
    grad = jax.value_and_grad(lambda h, w: head_loss_sum(h, w, labels, chunk=8)[0], argnums=(0, 1))
    (l16, g16), (l32, g32) = grad(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), grad(h, w)
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.bfloat16
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    for a, b in zip(g16, g32):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=2e-2 * float(jnp.abs(b).max()))


def _batch(cfg, rng, b=4, text=20):
    n = cfg.num_image_tokens
    ids = np.concatenate([np.ones((b, 1)), np.full((b, n), cfg.image_token_id),
                          rng.integers(3, 200, size=(b, text))], axis=1).astype(np.int32)
    labels = ids.copy()
    labels[:, : 1 + n + 4] = IGNORE_INDEX
    labels[1, -12:] = IGNORE_INDEX
    pixels = rng.normal(size=(b, 1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "pixel_values": jnp.asarray(pixels),
            "attention_mask": jnp.ones_like(jnp.asarray(ids))}


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_fused_and_unfused_agree(tied):
    cfg = ModelConfig.tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
    model = XLlava(cfg, rngs=nnx.Rngs(1))
    batch = _batch(cfg, np.random.default_rng(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, chunk):
        total, count = forward_loss_sum(nnx.merge(graphdef, p, rest), batch, chunk)
        return total, count

    grad = jax.value_and_grad(loss, has_aux=True)
    (want, want_count), want_grads = grad(params, 0)
    (got, got_count), got_grads = grad(params, 3)
    assert int(got_count) == int(want_count) > 0
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trainable", [("projector", "llm"), ("projector",)])
def test_train_step_fused_and_unfused_give_the_same_update(trainable):
    cfg = ModelConfig.tiny()
    model = XLlava(cfg, rngs=nnx.Rngs(0))
    graphdef, params, frozen, other = nnx.split(model, trainable_filter(trainable), nnx.Param, ...)
    params, frozen, other = (nnx.to_pure_dict(x) for x in (params, frozen, other))
    tx = optax.adamw(1e-3, eps=1e-3)
    batch = _batch(cfg, np.random.default_rng(1))
    results = []
    for chunk in (0, 8):
        state = {"params": params, "opt": tx.init(params), "other": other, "step": jnp.zeros((), jnp.int32)}
        results.append(jax.jit(make_train_step(graphdef, tx, loss_chunk=chunk))(state, frozen, batch))
    (want_state, want), (got_state, got) = results
    assert int(got["supervised_tokens"]) == int(want["supervised_tokens"])
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(got_state["params"]), jax.tree.leaves(want_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
