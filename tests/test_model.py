"""Model behaviour beyond HF parity: logical axes, remat, loss, packing, bfloat16."""

import hf_models as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import xllava_jax
from xllava_jax.config import ModelConfig
from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.models.loss import next_token_loss
from xllava_jax.models.xllava import build_model
from xllava_jax.sharding import DEFAULT_RULES as LOGICAL_RULES

TINY = ModelConfig.tiny()


def test_every_parameter_has_known_logical_axes():
    model = build_model(TINY)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert all(a is None or a in LOGICAL_RULES for a in axes), (path, axes)


def _loss_and_grads(model, ids, pixels, labels):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(ids, pixels)
        return next_token_loss(logits, labels)[0]

    return jax.value_and_grad(loss_fn)(params)


def test_remat_gives_identical_loss_and_gradients():
    n = TINY.num_image_tokens
    ids = jnp.asarray([[1] + [TINY.image_token_id] * n + list(range(3, 13))])
    labels = ids.at[:, : n + 1].set(IGNORE_INDEX)
    pixels = jnp.asarray(H.images(1))
    results = [_loss_and_grads(build_model(TINY.replace(remat=r), seed=3), ids, pixels, labels)
               for r in ("none", "full", "dots")]
    for loss, grads in results[1:]:
        assert float(loss) == pytest.approx(float(results[0][0]), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_loss_matches_transformers(tmp_path):
    hf = H.llava(seed=9)
    hf.save_pretrained(tmp_path)
    ours = xllava_jax.load_pretrained(tmp_path)
    ids = [H.prompt_ids(H.NUM_PATCHES, 12, seed=1), H.prompt_ids(H.NUM_PATCHES, 12, seed=2)]
    labels = np.array(ids)
    labels[:, : H.NUM_PATCHES + 5] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    pixels = H.images(2)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), pixel_values=H.to_torch_pixels(pixels),
                  labels=torch.tensor(labels)).loss.item()
    loss, count = next_token_loss(ours(jnp.asarray(ids), jnp.asarray(pixels)), jnp.asarray(labels))
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_no_supervised_token_gives_zero_loss():
    loss, count = next_token_loss(jnp.zeros((1, 4, 8)), jnp.full((1, 4), IGNORE_INDEX))
    assert float(loss) == 0.0 and int(count) == 0


def test_packed_documents_do_not_attend_to_each_other():
    model = build_model(TINY.replace(vision=None), seed=4)
    a, b = list(range(3, 12)), list(range(40, 47))
    packed = jnp.asarray([a + b])
    segments = jnp.asarray([[1] * len(a) + [2] * len(b)])
    positions = jnp.asarray([list(range(len(a))) + list(range(len(b)))])
    got = np.asarray(model(packed, segment_ids=segments, position_ids=positions))
    np.testing.assert_allclose(got[0, : len(a)], np.asarray(model(jnp.asarray([a])))[0], atol=1e-5)
    np.testing.assert_allclose(got[0, len(a):], np.asarray(model(jnp.asarray([b])))[0], atol=1e-5)


def test_bfloat16_compute_and_params():
    model = build_model(TINY.replace(dtype="bfloat16", param_dtype="bfloat16"), seed=5)
    n = TINY.num_image_tokens
    ids = jnp.asarray([[1] + [TINY.image_token_id] * n + [5, 6, 7]])
    logits = model(ids, jnp.asarray(H.images(1)))
    assert logits.dtype == jnp.bfloat16 and bool(jnp.isfinite(logits).all())
    assert model.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16


def test_single_row_matmul_split_over_the_cores_gives_the_dot_and_its_gradients():
    """The CPU matmul of one row (a batch-1 decode step) runs as row blocks of the kernel, partial
    sums added (ops._dot_cpu): the same value and gradients as jnp.dot, in float32 and bfloat16; its
    kernel gradient transposes the narrower operand."""
    from xllava_jax.models import ops

    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((512, 384), dtype=np.float32) * 0.05)
    for shape in ((1, 1, 512), (512,), (2, 512), (1, 4, 512)):
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        want = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
        np.testing.assert_allclose(np.asarray(ops.matmul(x, kernel, "cpu")), want, rtol=1e-5, atol=1e-4, err_msg=shape)
        grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(ops.matmul(a, b, "cpu"))), argnums=(0, 1))(x, kernel)
        ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.dot(a, b))), argnums=(0, 1))(x, kernel)
        for got, exp in zip(grads, ref):
            np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-4, atol=1e-4, err_msg=shape)
    # a single row takes the split (a sum over the blocks); several rows, an odd depth, a large kernel do not
    split = {shape: "reduce_sum" in str(jax.make_jaxpr(ops._dot_cpu)(jnp.ones(shape), jnp.ones(k)))
             for shape, k in (((1, 1, 512), (512, 384)), ((2, 512), (512, 384)), ((1, 510), (510, 384)),
                              ((1, 512), (512, 8192)))}
    assert split == {(1, 1, 512): True, (2, 512): False, (1, 510): False, (1, 512): False}, split
    # the kernel gradient x^T g over the tokens copies the narrower operand transposed: the activations of an up
    # projection, the output gradient of a down projection (whose wide input XLA would recompute in a slow loop)
    for k, n in ((128, 512), (512, 128)):
        x2 = jnp.asarray(rng.standard_normal((64, k), dtype=np.float32))
        g2 = jnp.asarray(rng.standard_normal((64, n), dtype=np.float32))
        np.testing.assert_allclose(np.asarray(ops._token_contraction(x2, g2)),
                                   np.asarray(x2, np.float64).T @ np.asarray(g2, np.float64), rtol=1e-4, atol=1e-4)
        eqns = jax.make_jaxpr(ops._token_contraction)(x2, g2).eqns
        assert [e.invars[0].aval.shape for e in eqns if e.primitive.name == "transpose"][0] == (64, 128), (k, n)
    x16, k16 = jnp.ones((1, 1, 512), jnp.bfloat16) * 0.5, kernel.astype(jnp.bfloat16)
    got = ops.matmul(x16, k16, "cpu")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(jnp.dot(x16, k16), np.float32), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("kv_heads,first_slot", [(4, 0), (2, 0), (2, None), (1, 0)])
def test_cpu_attention_value_and_gradients_match_dot_product_attention(kv_heads, first_slot):
    from xllava_jax.models.llama import causal_mask
    from xllava_jax.models.ops import ATTENTION_BLOCK, causal_attention

    b, t, n, h = 2, ATTENTION_BLOCK + 9, 4, 16          # two query blocks, the second one partial
    rng = np.random.default_rng(kv_heads)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32) for _ in range(2))
    d_out = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    valid = np.ones((b, t), np.int32)
    valid[1, :5] = 0                                    # left padding in the second row
    mask = causal_mask(jnp.broadcast_to(jnp.arange(t)[None], (b, t)), t, jnp.asarray(valid))

    def ours(q, k, v):
        return causal_attention(q, k, v, mask, first_slot)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    got, got_vjp = jax.vjp(ours, q, k, v)
    want, want_vjp = jax.vjp(reference, q, k, v)
    rows = np.asarray(valid, bool)                      # queries at padded slots see no key: meaningless output
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-6)
    d_out = d_out * jnp.asarray(rows)[:, :, None, None]
    for a, ref in zip(got_vjp(d_out), want_vjp(d_out)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), atol=2e-5)


def test_splash_attention_matches_the_dense_mask_with_padding_and_segments():
    """The TPU kernel (Pallas splash attention, interpreted on this CPU) against the XLA path on the
    same causal + padding + packing mask: values and gradients over every non-padding position."""
    from xllava_jax.models import ops
    from xllava_jax.models.llama import attention_segments, causal_mask

    rng = np.random.default_rng(0)
    b, t, n, k, h = 2, 128, 4, 2, 32
    q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
    key, value = (jnp.asarray(rng.standard_normal((b, t, k, h), np.float32)) for _ in range(2))
    mask_in = np.ones((b, t), np.int32)
    mask_in[1, 100:] = 0                                   # right padding
    segments_in = np.ones((b, t), np.int32)
    segments_in[0, 60:] = 2                                # two packed documents
    mask = causal_mask(jnp.broadcast_to(jnp.arange(t)[None], (b, t)), t, jnp.asarray(mask_in), jnp.asarray(segments_in))
    segments = attention_segments(b, t, jnp.asarray(mask_in), jnp.asarray(segments_in))
    keep = jnp.asarray(mask_in, jnp.float32)[:, :, None, None]

    def run(impl, *qkv):
        return ops.attention(*qkv, mask, impl=impl, platform="cpu", first_slot=0, segments=segments, cached=False)

    np.testing.assert_allclose(np.asarray(run("splash", q, key, value) * keep),
                               np.asarray(run("xla", q, key, value) * keep), atol=1e-5)
    grads = {impl: jax.grad(lambda *qkv, impl=impl: jnp.sum(jnp.sin(run(impl, *qkv)) * keep), argnums=(0, 1, 2))(
        q, key, value) for impl in ("splash", "xla")}
    for got, want in zip(grads["splash"], grads["xla"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
