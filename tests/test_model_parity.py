"""Logits parity with transformers (float32, matmul precision highest) on tiny random models."""

from __future__ import annotations

import zlib

import hf_models as H
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import xllava_jax

TOL = 1e-4

CASES = {
    # GQA with 2 kv heads, untied, layer -2, drop CLS, plain RoPE.
    "gqa2": dict(text_kw=dict(num_key_value_heads=2)),
    # GQA with 1 kv head, tied embeddings, last layer, keep CLS, linear RoPE scaling, gelu tower.
    "gqa1_tied_full_linear": dict(
        text_kw=dict(num_key_value_heads=1, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        vision_kw=dict(hidden_act="gelu"), vision_feature_layer=-1, vision_feature_select_strategy="full"),
    # Multi-head (4 kv heads), llama3 RoPE scaling.
    "mha_llama3": dict(text_kw=dict(num_key_value_heads=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    hf = H.llava(seed=zlib.crc32(request.param.encode()) % 1000, **CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, xllava_jax.load_pretrained(path)


def _num_image_tokens(hf) -> int:
    return H.NUM_PATCHES + (1 if hf.config.vision_feature_select_strategy == "full" else 0)


def _compare(hf, ours, ids, pixels=None, mask=None):
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(ids))
        if pixels is not None:
            kw["pixel_values"] = H.to_torch_pixels(pixels)
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask)
        want = hf(**kw).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), None if pixels is None else jnp.asarray(pixels),
                          None if mask is None else jnp.asarray(mask)))
    valid = np.ones(want.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    diff = np.abs(got - want)[valid].max()
    assert diff <= TOL, diff
    return diff


def test_image_and_text(pair):
    hf, ours = pair
    n = _num_image_tokens(hf)
    ids = [H.prompt_ids(n, 12, seed=1), H.prompt_ids(n, 12, seed=2)]
    _compare(hf, ours, ids, H.images(2))


def test_text_only(pair):
    hf, ours = pair
    _compare(hf, ours, [H.prompt_ids(0, 20, seed=3, with_image=False)])


def test_right_padded_batch_with_mask(pair):
    hf, ours = pair
    n = _num_image_tokens(hf)
    long, short = H.prompt_ids(n, 14, seed=4), H.prompt_ids(n, 5, seed=5)
    pad = len(long) - len(short)
    ids = [long, short + [0] * pad]
    mask = [[1] * len(long), [1] * len(short) + [0] * pad]
    _compare(hf, ours, ids, H.images(2, seed=7), mask)


def test_mixed_batch_text_row_and_image_row(pair):
    """A batch where one row has an image and the other none (HF global placeholder order)."""
    hf, ours = pair
    n = _num_image_tokens(hf)
    with_image, text = H.prompt_ids(n, 6, seed=8), H.prompt_ids(0, 6 + n, seed=9, with_image=False)
    _compare(hf, ours, [text, with_image], H.images(1, seed=10))


def test_per_row_images_match_global_order(pair):
    """pixel_values [B, M, H, W, 3] (static per-row slots) gives the same logits as HF's [N, H, W, 3]."""
    _, ours = pair
    n = ours.cfg.num_image_tokens
    ids = jnp.asarray([H.prompt_ids(n, 6, seed=11), H.prompt_ids(n, 6, seed=12)])
    pixels = H.images(2, seed=13)
    flat = ours(ids, jnp.asarray(pixels))
    per_row = ours(ids, jnp.asarray(pixels)[:, None])
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(flat), atol=1e-6)


def test_placeholder_count_mismatch_is_a_clear_error(pair):
    _, ours = pair
    ids = jnp.asarray([H.prompt_ids(3, 6, seed=14)])
    with pytest.raises(ValueError, match="placeholder"):
        ours(ids, jnp.asarray(H.images(1)))


def test_llama_causal_lm_parity(tmp_path):
    hf = H.llama(seed=5, num_key_value_heads=1)
    hf.save_pretrained(tmp_path)
    ours = xllava_jax.load_pretrained(tmp_path)
    ids = [H.prompt_ids(0, 30, seed=6, with_image=False)]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(got - want).max() <= TOL


def test_clip_vision_model_parity(tmp_path):
    hf = H.clip(seed=6)
    hf.save_pretrained(tmp_path)
    ours = xllava_jax.load_pretrained(tmp_path)
    pixels = H.images(2, seed=3)
    with torch.no_grad():
        out = hf(pixel_values=H.to_torch_pixels(pixels), output_hidden_states=True)
    last, pooled = ours(jnp.asarray(pixels))
    assert np.abs(np.asarray(last) - out.last_hidden_state.numpy()).max() <= TOL
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() <= TOL
    for layer in (0, 1, -2):
        got = np.asarray(ours.hidden_state(jnp.asarray(pixels), layer))
        assert np.abs(got - out.hidden_states[layer].numpy()).max() <= TOL


@pytest.mark.parametrize("attention,scan", [("xla", False), ("xla", True), ("cpu_blocked", True)])
def test_other_kernels_and_scanned_layers_keep_parity(attention, scan, tmp_path):
    """The XLA attention path and scanned (stacked) layers, loaded from the same HF checkpoint, match
    transformers as the default CPU kernels do."""
    hf = H.llava(seed=7, **CASES["gqa2"])
    hf.save_pretrained(tmp_path)
    ours = xllava_jax.load_pretrained(tmp_path, attention=attention, scan_layers=scan)
    assert ours.cfg.attention == attention and ours.cfg.scan_layers == scan
    n = _num_image_tokens(hf)
    ids = [H.prompt_ids(n, 9, seed=1), H.prompt_ids(n, 9, seed=2)]
    mask = np.ones((2, len(ids[0])), np.int64)
    mask[1, -4:] = 0
    _compare(hf, ours, ids, H.images(2, seed=3), mask)
