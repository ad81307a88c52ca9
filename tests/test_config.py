import pytest
from flax import nnx

from xllava_jax.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from xllava_jax.models.vision import VisionTower
from xllava_jax.models.xllava import abstract_model, count_params

# Published parameter counts (no weights are allocated: the models are abstract).
KNOWN = {
    "llava15_7b": 7_063_427_072,    # llava-hf/llava-1.5-7b-hf
    "llava15_13b": 13_351_494_656,  # llava-hf/llava-1.5-13b-hf
    # LLaMA-2-13B (13,015,864,320) + 7,478 new rows in embed and lm_head (2 x 7,478 x 5,120)
    # + CLIP ViT-L/14-336 (303,507,456) + mlp2x_gelu 1024 -> 5120 (31,467,520).
    "xllava_13b": 13_015_864_320 + 2 * 7_478 * 5_120 + 303_507_456 + 31_467_520,
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_preset_parameter_counts(name):
    assert count_params(abstract_model(ModelConfig.preset(name))) == KNOWN[name]


def test_component_counts():
    assert count_params(abstract_model(ModelConfig(text=TextConfig.llama2_7b(), vision=None))) == 6_738_415_616
    tower = nnx.eval_shape(lambda: VisionTower(VisionConfig.clip_l14_336(), rngs=nnx.Rngs(0)))
    assert count_params(tower) == 303_507_456


def test_bench_small_is_about_77m():
    cfg = ModelConfig.bench_small()
    assert cfg.num_image_tokens == 196 and cfg.text.vocab_size == 39_479
    assert 76e6 < count_params(abstract_model(cfg)) < 78e6


def test_dict_round_trip_and_bad_keys():
    cfg = ModelConfig.xllava_13b(dtype="bfloat16")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["text"]["hidden"] = 3
    with pytest.raises(ConfigError, match="unknown key.*hidden"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        TextConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("gpt5")


def test_initializer_range_sets_every_llm_init_and_travels_through_hf_config():
    import numpy as np

    from xllava_jax.convert.formats import text_from_hf, text_to_hf
    from xllava_jax.models.llama import Llama

    for std in (0.02, 0.1):
        cfg = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                         num_kv_heads=2, initializer_range=std)
        lm = Llama(cfg, rngs=nnx.Rngs(0))
        layer = lm.layers[0]
        for name, w in (("embed", lm.embed_tokens.embedding), ("lm_head", lm.lm_head.kernel),
                        ("q_proj", layer.self_attn.q_proj.kernel), ("down_proj", layer.mlp.down_proj.kernel)):
            assert np.std(np.asarray(w[...])) == pytest.approx(std, rel=0.1), name
        hf = text_to_hf(cfg, "float32")
        assert hf["initializer_range"] == std
        assert text_from_hf(hf).initializer_range == std
    assert text_from_hf({k: v for k, v in hf.items() if k != "initializer_range"}).initializer_range == 0.02
    assert ModelConfig.demo().text.initializer_range == 0.06
