"""Generation: greedy parity with HF `generate` (left padding, images), sampling, eos, compile counts."""

from __future__ import annotations

import hf_models as H
import jax
import numpy as np
import pytest
import torch

import xllava_jax
from xllava_jax.infer import generate as G

jax.config.update("jax_default_matmul_precision", "highest")

NEW = 32
GREEDY = G.GenerationConfig(max_new_tokens=NEW, bucket=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model, our Generator, [image prompt, text prompt], pixels float32[1, H, W, 3])."""
    # Wide init: the smallest top-1/top-2 logit gap over the 32 greedy steps is ~0.025, far above float noise.
    hf = H.llava(seed=0, text_kw=dict(initializer_range=0.3))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(path)
    generator = G.Generator(xllava_jax.load_pretrained(path))
    prompts = [H.prompt_ids(H.NUM_PATCHES, 7, seed=1), H.prompt_ids(0, 12, seed=2, with_image=False)]
    return hf, generator, prompts, H.images(1, seed=3)


@pytest.fixture(scope="module")
def greedy(setup):
    """Our greedy tokens for the two-row batch: list of two lists of NEW ids."""
    _, generator, prompts, pixels = setup
    return generator.generate(prompts, pixels, GREEDY).tokens


def test_greedy_matches_hf_generate_with_left_padding(setup, greedy):
    hf, _, prompts, pixels = setup
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=H.to_torch_pixels(pixels),
                          do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    assert out[:, width:].tolist() == greedy


@pytest.mark.parametrize("attention", ["cpu_blocked", "xla"])
def test_scanned_layers_generate_the_same_tokens(setup, greedy, tmp_path, attention):
    """Prefill and decode through stacked layers (one (k, v) cache of float[L, B, S, K, H]) give the
    greedy tokens of per-layer modules, with either attention kernel."""
    hf, _, prompts, pixels = setup
    hf.save_pretrained(tmp_path)
    model = xllava_jax.load_pretrained(tmp_path, scan_layers=True, attention=attention)
    cache = model.language_model.init_cache(2, 8)
    assert len(cache) == 1 and cache[0][0].shape[0] == hf.config.text_config.num_hidden_layers
    assert G.Generator(model).generate(prompts, pixels, GREEDY).tokens == greedy


def test_rows_alone_match_the_batch(setup, greedy):
    _, generator, prompts, pixels = setup
    alone = [generator.generate([prompts[0]], pixels, GREEDY), generator.generate([prompts[1]], None, GREEDY)]
    assert [r.tokens[0] for r in alone] == greedy
    assert [r.num_prompt_tokens[0] for r in alone] == [len(p) for p in prompts]
    assert [r.finish_reasons[0] for r in alone] == ["length", "length"]


def test_padded_array_input_matches_lists(setup, greedy):
    """input_ids + attention_mask with right padding are re-padded on the left."""
    _, generator, prompts, pixels = setup
    width = max(map(len, prompts)) + 3
    ids = np.array([p + [0] * (width - len(p)) for p in prompts])
    mask = np.array([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    assert generator.generate(ids, pixels, GREEDY, attention_mask=mask).tokens == greedy


def test_sampling_is_seeded(setup, greedy):
    _, generator, prompts, pixels = setup
    hot = GREEDY.replace(temperature=1.5, seed=1)
    first = generator.generate(prompts, pixels, hot).tokens
    assert generator.generate(prompts, pixels, hot).tokens == first
    assert generator.generate(prompts, pixels, hot.replace(seed=2)).tokens != first
    assert first != greedy
    filtered = generator.generate(prompts, pixels, hot.replace(top_k=5, top_p=0.9)).tokens
    assert filtered != first


def test_top_k_1_and_tiny_top_p_are_greedy(setup, greedy):
    _, generator, prompts, pixels = setup
    hot = GREEDY.replace(temperature=2.0, seed=3)
    assert generator.generate(prompts, pixels, hot.replace(top_k=1)).tokens == greedy
    assert generator.generate(prompts, pixels, hot.replace(top_p=1e-6)).tokens == greedy


def _first_unique(row: list[int], other: list[int]) -> int:
    """Index of the first token of `row` that appears neither earlier in `row` nor anywhere in `other`."""
    return next(i for i, t in enumerate(row) if i > 0 and t not in row[:i] and t not in other)


def test_eos_stops_one_row_and_the_other_continues(setup, greedy):
    _, generator, prompts, pixels = setup
    cut = _first_unique(greedy[0], greedy[1])
    result = generator.generate(prompts, pixels, GREEDY.replace(eos_token_ids=(greedy[0][cut],)))
    assert result.tokens == [greedy[0][:cut], greedy[1]]
    assert result.finish_reasons == ["stop", "length"]


def test_several_eos_ids_stop_every_row(setup, greedy):
    _, generator, prompts, pixels = setup
    cuts = [_first_unique(greedy[0], greedy[1]), _first_unique(greedy[1], greedy[0])]
    eos = (greedy[0][cuts[0]], greedy[1][cuts[1]])
    result = generator.generate(prompts, pixels, GREEDY.replace(eos_token_ids=eos))
    assert result.tokens == [greedy[0][:cuts[0]], greedy[1][:cuts[1]]]
    assert result.finish_reasons == ["stop", "stop"]


def test_stream_matches_generate_and_stops_at_eos(setup, greedy):
    _, generator, prompts, pixels = setup
    assert list(generator.stream(prompts[0], pixels, GREEDY)) == greedy[0]
    cut = _first_unique(greedy[0], [])
    stopped = generator.stream(prompts[0], pixels, GREEDY.replace(eos_token_ids=(greedy[0][cut],)))
    assert list(stopped) == greedy[0][:cut]


def test_generate_text_cuts_at_stop_strings(setup, greedy):
    _, generator, prompts, pixels = setup
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731
    stop = f"<{greedy[1][4]}>"
    texts = G.generate_text(generator, decode, prompts, pixels, GREEDY, stop_strings=(stop, "never"))
    assert texts[0] == decode(greedy[0]).split(stop)[0]
    assert texts[1] == decode(greedy[1]).split(stop)[0]
    assert stop not in texts[1]


def test_one_compilation_per_bucket(setup, monkeypatch):
    """Prompt lengths inside one bucket and new sampling settings neither recompile nor retrace."""
    _, generator, prompts, pixels = setup
    traces = {"prefill": 0, "step": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traces[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(G, "_prefill", counted("prefill", G._prefill))
    monkeypatch.setattr(G, "_decode_step", counted("step", G._decode_step))
    config = G.GenerationConfig(max_new_tokens=8, bucket=32)
    generator.generate(prompts, pixels, config)
    compiled, seen = generator.num_compiled, dict(traces)
    assert seen == {"prefill": 1, "step": 1}
    shorter = [prompts[0][:-5], prompts[1][:-7]]
    generator.generate(shorter, pixels, config.replace(temperature=0.7, top_k=3, seed=5, eos_token_ids=(9, 10)))
    assert (generator.num_compiled, traces) == (compiled, seen)
    tokens = list(generator.stream(prompts[1], None, config))
    assert len(tokens) == 8 and traces == {"prefill": 2, "step": 2}
    list(generator.stream(shorter[1], None, config.replace(temperature=0.7)))
    assert traces == {"prefill": 2, "step": 2}
    assert generator.num_compiled == compiled + 2


def test_bucket_lengths():
    assert [G.GenerationConfig(bucket=64).bucket_length(n) for n in (1, 64, 65)] == [64, 64, 128]
    assert [G.GenerationConfig(bucket=0).bucket_length(n) for n in (1, 17, 64, 65)] == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="top_p"):
        G.GenerationConfig(top_p=0.0)


def test_greedy_tokens_equal_argmax_with_ties_and_nan():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    logits[1, [7, 300, 999]] = 9.0                      # ties: the first wins
    logits[2, :] = 0.0                                  # all equal
    logits[3, [5, 40]] = np.nan                         # the first NaN, as argmax
    logits[4, 999] = np.inf
    logits[5, :] = -np.inf
    got = np.asarray(jax.jit(G.greedy_tokens)(logits))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jax.numpy.argmax(logits, axis=-1)))
    assert list(got[1:5]) == [7, 0, 5, 999]
