"""LoRA: merge/unmerge, PEFT adapter export/import against transformers + peft, merged export, training."""

from __future__ import annotations

import json

import hf_models as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

import xllava_jax
from xllava_jax.config import ConfigError
from xllava_jax.convert.load import save_hf
from xllava_jax.convert.peft import AdapterError, load_peft_adapter, save_peft_adapter
from xllava_jax.models.lora import (
    LoraConfig,
    LoraDense,
    LoraParam,
    apply_lora,
    lora_config,
    lora_modules,
    lora_sites,
    lora_state,
    merge_lora,
    strip_lora,
    unmerge_lora,
)

TOL = 1e-4
CFG = LoraConfig(r=4, alpha=16.0, dropout=0.1)


def randomize(model, seed: int = 0):
    """Non-zero random adapter weights (B too), so every adapter changes the logits."""
    rng = np.random.default_rng(seed)
    for _, module in lora_modules(model):
        for var in (module.lora_a, module.lora_b):
            var[...] = jnp.asarray(0.05 * rng.standard_normal(var.shape), jnp.float32)
    return model


def read_safetensors(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def hf_logits(model, ids, pixels=None):
    kw = {} if pixels is None else {"pixel_values": H.to_torch_pixels(pixels)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), **kw).logits.numpy()


def our_logits(model, ids, pixels=None):
    return np.asarray(model(jnp.asarray(ids), None if pixels is None else jnp.asarray(pixels)))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    H.llava(seed=5).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    H.llama(seed=6).save_pretrained(path)
    return path


IMAGE_IDS = [H.prompt_ids(H.NUM_PATCHES, 10, seed=1)]
TEXT_IDS = [H.prompt_ids(0, H.NUM_PATCHES + 10, seed=2, with_image=False)]  # same length: shared compiles
PIXELS = H.images(1, seed=3)


def test_config_round_trip_and_validation():
    assert LoraConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG
    assert LoraConfig.vif().scale == 2.0 and LoraConfig.llm_pretrain().scale == 4.0
    for bad in (dict(r=0), dict(dropout=1.0), dict(targets=("out_proj",)), dict(targets=())):
        with pytest.raises(ConfigError):
            LoraConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        LoraConfig.from_dict({"rank": 4})


def test_merged_and_unmerged_agree_and_unmerge_restores_base(llava_dir):
    model = xllava_jax.load_pretrained(llava_dir)
    base = our_logits(model, IMAGE_IDS, PIXELS)
    kernels = {path: np.asarray(getattr(parent, name).kernel[...]) for path, parent, name in lora_sites(model)}
    apply_lora(model, CFG, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(our_logits(model, IMAGE_IDS, PIXELS), base)  # lora_b starts at zero
    randomize(model)
    unmerged = our_logits(model, IMAGE_IDS, PIXELS)
    assert np.abs(unmerged - base).max() > 1e-2
    tol = 1e-5 * np.abs(unmerged).max()  # float32 rounding: these random weights give logits up to ~6
    merge_lora(model)
    assert all(m.merged for _, m in lora_modules(model))
    assert np.abs(our_logits(model, IMAGE_IDS, PIXELS) - unmerged).max() <= tol
    plain = strip_lora(model)
    assert not any(isinstance(m, LoraDense) for _, m in nnx.iter_modules(plain))
    assert np.abs(our_logits(plain, IMAGE_IDS, PIXELS) - unmerged).max() <= tol
    unmerge_lora(model)
    for path, module in lora_modules(model):
        np.testing.assert_allclose(np.asarray(module.base.kernel[...]), kernels[path], rtol=0, atol=1e-6)
    assert np.abs(our_logits(model, IMAGE_IDS, PIXELS) - unmerged).max() <= tol  # kernels within an ulp or so


@pytest.mark.parametrize("fmt", ["hf-llava", "llama"])
def test_exported_adapter_gives_our_logits_in_peft(fmt, llava_dir, llama_dir, tmp_path):
    src, ids, pixels = (llava_dir, IMAGE_IDS, PIXELS) if fmt == "hf-llava" else (llama_dir, TEXT_IDS, None)
    ours = randomize(apply_lora(xllava_jax.load_pretrained(src), CFG, rngs=nnx.Rngs(0)), seed=1)
    save_peft_adapter(ours, tmp_path, fmt=fmt, base_model_name_or_path=str(src))
    hf_class = LlavaForConditionalGeneration if fmt == "hf-llava" else LlamaForCausalLM
    peft_model = PeftModel.from_pretrained(hf_class.from_pretrained(src), tmp_path).eval()
    written = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert set(written) == set(get_peft_model_state_dict(peft_model))  # peft's own key set: no vision keys
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 16
    assert np.abs(hf_logits(peft_model, ids, pixels) - our_logits(ours, ids, pixels)).max() <= TOL
    again = load_peft_adapter(xllava_jax.load_pretrained(src), tmp_path)
    assert lora_config(again) == CFG
    np.testing.assert_array_equal(our_logits(again, ids, pixels), our_logits(ours, ids, pixels))


@pytest.mark.parametrize("fmt", ["hf-llava", "llama"])
def test_imported_peft_adapter_gives_peft_logits(fmt, llava_dir, llama_dir, tmp_path):
    if fmt == "hf-llava":  # a regex, as a list would also pick the vision tower's q/k/v
        src, ids, pixels, hf_class = llava_dir, IMAGE_IDS, PIXELS, LlavaForConditionalGeneration
        targets, want = r".*language_model.*\.(q_proj|v_proj|down_proj)", ("q_proj", "v_proj", "down_proj")
    else:
        src, ids, pixels, hf_class = llama_dir, TEXT_IDS, None, LlamaForCausalLM
        targets, want = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], CFG.targets
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_class.from_pretrained(src), PeftLoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.05, target_modules=targets, init_lora_weights=False)).eval()
    assert all(p.abs().max() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(tmp_path)
    ours = load_peft_adapter(xllava_jax.load_pretrained(src), tmp_path)
    assert lora_config(ours) == LoraConfig(r=8, alpha=32.0, dropout=0.05, targets=want)
    assert np.abs(our_logits(ours, ids, pixels) - hf_logits(peft_model, ids, pixels)).max() <= TOL


def test_adapter_errors_are_one_clear_line(llava_dir, llama_dir, tmp_path):
    base = xllava_jax.load_pretrained(llava_dir)
    vision = get_peft_model(LlavaForConditionalGeneration.from_pretrained(llava_dir),
                            PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    vision.save_pretrained(tmp_path / "vision")
    with pytest.raises(AdapterError, match=r"unexpected: base_model\.model\.model\.vision_tower"):
        load_peft_adapter(base, tmp_path / "vision")
    assert lora_config(base) is None  # nothing changed
    partial = get_peft_model(LlavaForConditionalGeneration.from_pretrained(llava_dir), PeftLoraConfig(
        r=4, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"))
    partial.save_pretrained(tmp_path / "partial")
    with pytest.raises(AdapterError, match=r"2 missing: .*layers\.1\.self_attn\.q_proj\.lora_A.*; 2 unexpected"):
        load_peft_adapter(base, tmp_path / "partial")  # list targets: the vision tower's q_proj too
    save_peft_adapter(apply_lora(xllava_jax.load_pretrained(llama_dir), CFG, rngs=nnx.Rngs(0)), tmp_path / "llama",
                      fmt="llama")
    weights = tmp_path / "llama" / "adapter_model.safetensors"
    tensors = read_safetensors(weights)
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] = np.zeros((128, 5), np.float32)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=r"1 mis-shaped: .*layers\.1\.mlp\.up_proj\.lora_B\.weight \(128, 5\) "
                                           r"\(model expects \(128, 4\)\)"):
        load_peft_adapter(base, tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    (tmp_path / "llama" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="unsupported peft options use_dora=True"):
        load_peft_adapter(base, tmp_path / "llama")
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        save_peft_adapter(base, tmp_path / "none")


def test_stripped_model_exports_a_merged_hf_checkpoint(llava_dir, tmp_path):
    ours = randomize(apply_lora(xllava_jax.load_pretrained(llava_dir), CFG, rngs=nnx.Rngs(0)), seed=2)
    want = our_logits(ours, IMAGE_IDS, PIXELS)
    save_hf(strip_lora(ours), tmp_path, "hf-llava")
    assert not any(isinstance(m, LoraDense) and m.merged for _, m in nnx.iter_modules(ours))  # input unchanged
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert np.abs(hf_logits(reloaded, IMAGE_IDS, PIXELS) - want).max() <= TOL


def test_only_adapters_get_gradients_under_jit_and_remat(llava_dir):
    model = apply_lora(xllava_jax.load_pretrained(llava_dir, remat="full"), CFG, rngs=nnx.Rngs(0))
    model.train()
    ids = jnp.asarray(TEXT_IDS)
    graphdef, adapters, frozen = nnx.split(model, LoraParam, ...)
    assert len(jax.tree.leaves(adapters)) == 2 * 7 * model.cfg.text.num_layers

    @jax.jit
    def grads(adapters, frozen):
        def loss(adapters):
            # copy=True: fresh Variables at this trace level (the frozen ones come from jit's).
            logits = nnx.merge(graphdef, adapters, frozen, copy=True)(ids)
            return -jax.nn.log_softmax(logits)[0, :-1, ids[0, 1:]].mean()
        return jax.grad(loss)(adapters)

    def max_abs(tree, side):
        return [float(jnp.abs(v[...]).max()) for p, v in nnx.to_flat_state(tree) if p[-1] == side]

    g = grads(adapters, frozen)
    assert min(max_abs(g, "lora_b")) > 0 and max(max_abs(g, "lora_a")) == 0  # B = 0 at the start
    stepped = jax.tree.map(lambda a, b: a - 0.1 * b, adapters, g)
    assert min(max_abs(grads(stepped, frozen), "lora_a")) > 0
    nnx.update(model, stepped)
    assert float(jnp.abs(lora_state(model)["language_model"]["layers"][0]["mlp"]["up_proj"]["lora_b"][...]).max()) > 0


def test_dropout_only_in_train_mode(llava_dir):
    model = randomize(apply_lora(xllava_jax.load_pretrained(llava_dir), CFG, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(TEXT_IDS)
    eval_logits = model(ids)
    np.testing.assert_array_equal(model(ids), eval_logits)
    model.train()
    first, second = model(ids), model(ids)
    assert jnp.abs(first - second).max() > 1e-3 and jnp.abs(first - eval_logits).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(model(ids), eval_logits)
