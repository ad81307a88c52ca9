"""Tiny random Hugging Face models for parity and conversion tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_SIZE, PATCH = 32, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
VOCAB = 128
IMAGE_TOKEN = 127


def vision_config(**kw) -> CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu")
    return CLIPVisionConfig(**{**base, **kw})


def text_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                initializer_range=0.2)
    return LlamaConfig(**{**base, **kw})


def llava(seed: int = 0, vision_kw=None, text_kw=None, **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision_config(**(vision_kw or {})), text_config=text_config(**(text_kw or {})),
                      image_token_id=IMAGE_TOKEN, **kw)
    if (text_kw or {}).get("tie_word_embeddings"):
        cfg.tie_word_embeddings = True
    return LlavaForConditionalGeneration(cfg).eval()


def llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config(**kw)).eval()


def clip(seed: int = 0, **kw) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(vision_config(**kw)).eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    """Normalised-looking pixel values float32[n, H, W, 3] (channels last)."""
    return np.random.default_rng(seed).standard_normal((n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def to_torch_pixels(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())


def prompt_ids(num_image_tokens: int, text_len: int, seed: int, with_image: bool = True) -> list[int]:
    rng = np.random.default_rng(seed)
    text = rng.integers(3, VOCAB - 1, size=text_len).tolist()
    head = [1] + ([IMAGE_TOKEN] * num_image_tokens if with_image else [])
    return head + text


def save_original_llava(hf_model: LlavaForConditionalGeneration, out: Path, vision_out: Path) -> None:
    """Write `hf_model` in the original LLaVA release layout (LlavaLlamaForCausalLM) + a CLIP directory."""
    out.mkdir(parents=True)
    sd = hf_model.state_dict()
    tensors = {}
    for key, value in sd.items():
        if key.startswith("model.language_model."):
            tensors["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.multi_modal_projector.linear_1."):
            tensors["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.multi_modal_projector.linear_2."):
            tensors["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif key == "lm_head.weight":
            tensors[key] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    text = hf_model.config.text_config.to_dict()
    config = {**{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                       "max_position_embeddings", "bos_token_id", "eos_token_id")},
              "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
              "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": hf_model.config.vision_config.hidden_size,
              "mm_vision_select_layer": hf_model.config.vision_feature_layer, "mm_vision_select_feature": "patch",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tower = CLIPVisionModel(hf_model.config.vision_config)
    tower.load_state_dict({k[len("model.vision_tower."):]: v for k, v in sd.items()
                           if k.startswith("model.vision_tower.")})
    tower.save_pretrained(vision_out)
