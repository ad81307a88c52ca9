import jax.numpy as jnp
import numpy as np
import pytest

from xllava_jax.config import ModelConfig
from xllava_jax.models.vocab import resize_vocab
from xllava_jax.models.xllava import build_model

TINY = ModelConfig.tiny()


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["mean", "normal", "subword_mean"])
def test_old_vocabulary_logits_unchanged(method, tied):
    base = build_model(ModelConfig.tiny(text=TINY.text.__class__(**{**TINY.text.to_dict(),
                                                                    "tie_word_embeddings": tied})), seed=2)
    grown = resize_vocab(base, 300, method, subword_ids=[[5, 6], [7]], pad_to_multiple_of=64)
    assert grown.cfg.text.vocab_size == 320 and grown.cfg.text.pad_vocab_to_multiple_of == 64
    ids = jnp.asarray([[1, 5, 9, 44, 200, 3]])
    old, new = np.asarray(base(ids)), np.asarray(grown(ids))
    assert new.shape == (1, 6, 320)
    np.testing.assert_array_equal(new[..., :256], old)
    np.testing.assert_array_equal(np.asarray(grown.language_model.embed_tokens.embedding[...])[:256],
                                  np.asarray(base.language_model.embed_tokens.embedding[...]))


def test_subword_mean_rows(model):
    grown = resize_vocab(model, 260, "subword_mean", subword_ids=[[5, 6], [7], [8, 9, 10]])
    old_embed = np.asarray(model.language_model.embed_tokens.embedding[...])
    new_embed = np.asarray(grown.language_model.embed_tokens.embedding[...])
    old_head = np.asarray(model.language_model.lm_head.kernel[...])
    new_head = np.asarray(grown.language_model.lm_head.kernel[...])
    for k, ids in enumerate([[5, 6], [7], [8, 9, 10]]):
        np.testing.assert_allclose(new_embed[256 + k], old_embed[ids].mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(new_head[:, 256 + k], old_head[:, ids].mean(1), rtol=1e-6, atol=1e-7)
    # The fourth new token has no subword list: it gets the mean of all old rows.
    np.testing.assert_allclose(new_embed[259], old_embed.mean(0), rtol=1e-5, atol=1e-7)


def test_bad_requests(model):
    with pytest.raises(ValueError, match="smaller"):
        resize_vocab(model, 100)
    with pytest.raises(ValueError, match="outside the old vocabulary"):
        resize_vocab(model, 260, "subword_mean", subword_ids=[[300]])
    with pytest.raises(ValueError, match="unknown init method"):
        resize_vocab(model, 260, "zeros")
