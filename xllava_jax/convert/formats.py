"""Checkpoint layout detection and config.json translation, both ways.

Layouts: `hf-llava` (transformers `LlavaForConditionalGeneration`, 4.x and 5.x), `llava` (the original
LLaVA / X-LLaVA release, `LlavaLlamaForCausalLM`, vision tower from a separate CLIP directory),
`llama` (`LlamaForCausalLM`) and `clip` (`CLIPVisionModel`, or the vision half of a `CLIPModel`).
"""

from __future__ import annotations

from typing import Any

from xllava_jax.config import LLAVA_IMAGE_TOKEN_INDEX, ConfigError, ModelConfig, TextConfig, VisionConfig

# transformers' defaults, for configs that only list what differs from them.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
                      max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=None, initializer_range=0.02)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
# LlavaConfig's vision tower when its config names none: CLIP ViT-L/14-336.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14)
LLAVA_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def detect_format(config: dict[str, Any]) -> str:
    """The layout of a checkpoint from its config.json contents."""
    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    if model_type == "llava" and "text_config" in config or "LlavaForConditionalGeneration" in archs:
        return "hf-llava"
    if model_type == "llava_llama" or "LlavaLlamaForCausalLM" in archs or "mm_projector_type" in config:
        return "llava"
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        return "llama"
    if model_type in ("clip_vision_model", "clip") or "CLIPVisionModel" in archs or "CLIPModel" in archs:
        return "clip"
    raise ConfigError(f"unsupported model_type {model_type!r} (architectures {archs}); supported: LLaVA "
                      "(HF or original release), LlamaForCausalLM, CLIP vision")


def _get(d: dict[str, Any], defaults: dict[str, Any], key: str):
    value = d.get(key)
    return defaults[key] if value is None else value


def text_from_hf(d: dict[str, Any]) -> TextConfig:
    """A LLaMA config.json dict (transformers 4.x or 5.x) -> TextConfig."""
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"LLaMA hidden_act {d['hidden_act']!r} is not supported (only silu)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ConfigError("LLaMA configs with attention_bias or mlp_bias are not supported")
    rope = dict(d.get("rope_parameters") or {})
    if not rope:
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    heads = _get(d, LLAMA_DEFAULTS, "num_attention_heads")
    extra = {}
    if rope_type in ("linear", "llama3"):
        extra["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        extra.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                     rope_high_freq_factor=float(rope["high_freq_factor"]),
                     rope_original_max_position=int(rope["original_max_position_embeddings"]))
    return TextConfig(
        vocab_size=_get(d, LLAMA_DEFAULTS, "vocab_size"),
        hidden_size=_get(d, LLAMA_DEFAULTS, "hidden_size"),
        intermediate_size=_get(d, LLAMA_DEFAULTS, "intermediate_size"),
        num_layers=_get(d, LLAMA_DEFAULTS, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"),
        rms_norm_eps=_get(d, LLAMA_DEFAULTS, "rms_norm_eps"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        max_position_embeddings=_get(d, LLAMA_DEFAULTS, "max_position_embeddings"),
        tie_word_embeddings=bool(_get(d, LLAMA_DEFAULTS, "tie_word_embeddings")),
        bos_token_id=d.get("bos_token_id", LLAMA_DEFAULTS["bos_token_id"]),
        eos_token_id=d.get("eos_token_id", LLAMA_DEFAULTS["eos_token_id"]),
        pad_token_id=d.get("pad_token_id"),
        initializer_range=float(_get(d, LLAMA_DEFAULTS, "initializer_range")),
        **extra,
    )


def text_to_hf(t: TextConfig, dtype: str) -> dict[str, Any]:
    """TextConfig -> a transformers 5 LlamaConfig dict."""
    rope: dict[str, Any] = {"rope_type": t.rope_type, "rope_theta": t.rope_theta}
    if t.rope_type in ("linear", "llama3"):
        rope["factor"] = t.rope_factor
    if t.rope_type == "llama3":
        rope.update(low_freq_factor=t.rope_low_freq_factor, high_freq_factor=t.rope_high_freq_factor,
                    original_max_position_embeddings=t.rope_original_max_position)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": dtype,
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "head_dim": t.dim_per_head, "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": t.initializer_range,
        "pretraining_tp": 1, "use_cache": True,
    }


def vision_from_hf(d: dict[str, Any], defaults: dict[str, Any] | None = None) -> VisionConfig:
    """A CLIP vision config dict (CLIPVisionConfig, or a CLIPModel's `vision_config`) -> VisionConfig."""
    base = {**CLIP_VISION_DEFAULTS, **(defaults or {})}
    return VisionConfig(
        image_size=_get(d, base, "image_size"), patch_size=_get(d, base, "patch_size"),
        hidden_size=_get(d, base, "hidden_size"), intermediate_size=_get(d, base, "intermediate_size"),
        num_layers=_get(d, base, "num_hidden_layers"), num_heads=_get(d, base, "num_attention_heads"),
        hidden_act=_get(d, base, "hidden_act"), layer_norm_eps=_get(d, base, "layer_norm_eps"),
        num_channels=_get(d, base, "num_channels"),
    )


def vision_to_hf(v: VisionConfig, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "dtype": dtype,
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "num_channels": v.num_channels, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
        "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    }


def clip_vision_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The vision part of a CLIP config.json (CLIPModel nests it under `vision_config`)."""
    return d.get("vision_config") or d if d.get("model_type") == "clip" else d


def _dtype_of(d: dict[str, Any]) -> str:
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def model_config_from_hf(config: dict[str, Any], fmt: str, vision: dict[str, Any] | None = None) -> ModelConfig:
    """config.json (+ the CLIP config.json for the `llava` layout) -> ModelConfig (vision None for `llama`)."""
    dtype = _dtype_of(config)
    common = dict(dtype="float32", param_dtype=dtype)
    if fmt == "hf-llava":
        if config.get("projector_hidden_act", "gelu") != "gelu":
            raise ConfigError(f"projector_hidden_act {config['projector_hidden_act']!r} is not supported (gelu)")
        if config.get("multimodal_projector_bias") is False:
            raise ConfigError("LLaVA projectors without bias are not supported")
        layer = config.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        text_d = dict(config.get("text_config") or {})
        if "tie_word_embeddings" not in text_d and "tie_word_embeddings" in config:
            text_d["tie_word_embeddings"] = config["tie_word_embeddings"]
        image_token = config.get("image_token_index", config.get("image_token_id", 32000))
        return ModelConfig(text=text_from_hf(text_d),
                           vision=vision_from_hf(config.get("vision_config") or {}, LLAVA_DEFAULT_VISION),
                           projector_type="mlp2x_gelu", vision_feature_layer=layer,
                           vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
                           image_token_id=image_token, **common)
    if fmt == "llava":
        if vision is None:
            raise ConfigError("the original LLaVA layout keeps its vision tower elsewhere: pass `vision_src` "
                              "(a CLIP directory, e.g. openai/clip-vit-large-patch14-336)")
        projector = config.get("mm_projector_type", "linear")
        if projector not in ("linear", "mlp2x_gelu"):
            raise ConfigError(f"mm_projector_type {projector!r} is not supported (linear, mlp2x_gelu)")
        feature = config.get("mm_vision_select_feature", "patch")
        if feature not in LLAVA_SELECT_FEATURE:
            raise ConfigError(f"mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")
        vcfg = vision_from_hf(clip_vision_dict(vision))
        if config.get("mm_hidden_size", vcfg.hidden_size) != vcfg.hidden_size:
            raise ConfigError(f"mm_hidden_size {config['mm_hidden_size']} does not match the CLIP tower's "
                              f"hidden_size {vcfg.hidden_size}")
        return ModelConfig(text=text_from_hf(config), vision=vcfg, projector_type=projector,
                           vision_feature_layer=config.get("mm_vision_select_layer", -2),
                           vision_feature_select_strategy=LLAVA_SELECT_FEATURE[feature],
                           image_token_id=LLAVA_IMAGE_TOKEN_INDEX, **common)
    if fmt == "llama":
        return ModelConfig(text=text_from_hf(config), vision=None, image_token_id=LLAVA_IMAGE_TOKEN_INDEX, **common)
    raise ConfigError(f"no model config for layout {fmt!r}")


def _with_4x_spelling(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict that transformers 4.x reads too: `torch_dtype`, and RoPE as `rope_theta` / `rope_scaling`."""
    out = {**d, "torch_dtype": d["dtype"]}
    rope = d.get("rope_parameters")
    if rope:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        out.update(rope_theta=rope["rope_theta"], rope_scaling=None if scaling["rope_type"] == "default" else scaling)
    return out


def model_config_to_hf(cfg: ModelConfig, fmt: str, source: dict[str, Any] | None = None, *,
                       transformers4: bool = False) -> dict[str, Any]:
    """ModelConfig -> config.json for layout `fmt`. Keys of `source` (the config we were converted
    from, same layout) that we do not model are kept. `transformers4` adds the spellings transformers 4.x
    reads (hf-llava)."""
    dtype = cfg.param_dtype
    if fmt == "hf-llava":
        if cfg.vision is None:
            raise ConfigError("a text-only model cannot be written as LLaVA; use `fmt` llama")
        if cfg.projector_type != "mlp2x_gelu":
            raise ConfigError("transformers' LLaVA has no `linear` projector; use `fmt` llava")
        if not 0 <= cfg.image_token_id < cfg.text.vocab_size:
            raise ConfigError(f"image_token_id {cfg.image_token_id} is not a vocabulary row; transformers' LLaVA "
                              "embeds the placeholder id, so resize the vocabulary to add an <image> token first")
        out = {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": dtype,
            "text_config": text_to_hf(cfg.text, dtype), "vision_config": vision_to_hf(cfg.vision, dtype),
            "image_token_index": cfg.image_token_id, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "image_seq_length": cfg.num_image_tokens, "tie_word_embeddings": cfg.text.tie_word_embeddings,
        }
        for sub in ("text_config", "vision_config"):
            out[sub].pop("architectures")
        if transformers4:
            out = _with_4x_spelling({**out, "text_config": _with_4x_spelling(out["text_config"]),
                                     "vision_config": _with_4x_spelling(out["vision_config"])})
    elif fmt == "llava":
        if cfg.vision is None:
            raise ConfigError("a text-only model cannot be written as LLaVA; use `fmt` llama")
        select = {v: k for k, v in LLAVA_SELECT_FEATURE.items()}[cfg.vision_feature_select_strategy]
        out = {**text_to_hf(cfg.text, dtype), "architectures": ["LlavaLlamaForCausalLM"],
               "model_type": "llava_llama", "mm_projector_type": cfg.projector_type,
               "mm_hidden_size": cfg.vision.hidden_size, "mm_vision_select_layer": cfg.vision_feature_layer,
               "mm_vision_select_feature": select, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
               "mm_patch_merge_type": "flat", "use_mm_proj": True}
    elif fmt == "llama":
        out = text_to_hf(cfg.text, dtype)
    elif fmt == "clip":
        out = vision_to_hf(cfg.vision, dtype)
    else:
        raise ConfigError(f"unknown layout {fmt!r}")
    if source and detect_format(source) == fmt:
        out = {**source, **out}
    return out
