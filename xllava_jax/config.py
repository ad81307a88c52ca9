"""Model configuration: frozen dataclasses with one classmethod per model size.

`VisionConfig` describes a CLIP ViT, `TextConfig` a LLaMA decoder and `ModelConfig` the X-LLaVA
composition (vision tower + projector + LLM). All three serialise to plain dicts (`to_dict` /
`from_dict`) so they travel with our checkpoints.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp

from xllava_jax.errors import UserError


class RopeType(enum.StrEnum):
    """How RoPE frequencies are scaled for long contexts (HF `rope_scaling.rope_type`)."""

    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


class ProjectorType(enum.StrEnum):
    """The vision -> LLM projector: two linears with a GELU between (LLaVA-1.5) or one linear."""

    MLP2X_GELU = "mlp2x_gelu"
    LINEAR = "linear"


class Remat(enum.StrEnum):
    """What the backward recomputes: nothing, each whole layer, or a layer less its matmul outputs."""

    NONE = "none"
    FULL = "full"
    DOTS = "dots"


SELECT_STRATEGIES = ("default", "full")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "cpu_blocked")
# Settings of how a model runs rather than what it is: not written into checkpoints.
RUNTIME_FIELDS = ("attention", "platform")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The original LLaVA code marks the image slot with this id (never a vocabulary row).
LLAVA_IMAGE_TOKEN_INDEX = -200


class ConfigError(UserError):
    """A configuration that cannot describe a model or a run (unknown key, bad value)."""


def enum_value(kind: type[enum.StrEnum], value: str, name: str):
    """`value` as a member of `kind`; anything else is a ConfigError naming `name` and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be one of {tuple(m.value for m in kind)}, got {value!r}") from None


def _from_dict(cls, data: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision transformer (HF `CLIPVisionModel` semantics)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"vision hidden_act must be quick_gelu or gelu, got {self.hidden_act!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return _from_dict(cls, data, "vision config")

    @classmethod
    def clip_l14_336(cls) -> VisionConfig:
        """OpenAI CLIP ViT-L/14 at 336 px (`openai/clip-vit-large-patch14-336`)."""
        return cls()


@dataclass(frozen=True)
class TextConfig:
    """A LLaMA-family decoder (HF `LlamaForCausalLM` semantics)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: RopeType = RopeType.DEFAULT
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    pad_vocab_to_multiple_of: int = 1
    initializer_range: float = 0.02  # std of the normal init of every weight matrix and embedding (HF's key)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "rope_type", enum_value(RopeType, self.rope_type, "rope_type"))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        return _from_dict(cls, data, "text config")

    @classmethod
    def llama2_7b(cls, vocab_size: int = 32000) -> TextConfig:
        return cls(vocab_size=vocab_size)

    @classmethod
    def llama2_13b(cls, vocab_size: int = 32000) -> TextConfig:
        return cls(vocab_size=vocab_size, hidden_size=5120, intermediate_size=13824, num_layers=40,
                   num_heads=40, num_kv_heads=40)


@dataclass(frozen=True)
class ModelConfig:
    """X-LLaVA: vision tower -> projector -> LLM, with image features at the placeholder ids.

    `vision` is None for a text-only model (the LLM-pretraining stage). `dtype` is the compute dtype,
    `param_dtype` the storage dtype of the parameters. `scan_layers` stacks each tower's layers into
    one scanned block (parameters with a leading `layers` axis). `attention` is the kernel setting
    (models/ops.py) and `platform` the target it is resolved for ("": the default devices' at build).
    """

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    projector_type: ProjectorType = ProjectorType.MLP2X_GELU
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_token_id: int = 32000
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Remat = Remat.NONE
    scan_layers: bool = False
    attention: str = "auto"
    platform: str = ""

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        object.__setattr__(self, "projector_type", enum_value(ProjectorType, self.projector_type, "projector_type"))
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                              f"got {self.vision_feature_select_strategy!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        object.__setattr__(self, "remat", enum_value(Remat, self.remat, "remat"))
        if self.vision is not None:
            n = self.vision.num_layers
            if not -(n + 1) <= self.vision_feature_layer <= n:
                raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} is outside the "
                                  f"{n + 1} hidden states of a {n}-layer vision tower")

    @property
    def num_image_tokens(self) -> int:
        """How many placeholder ids (and projected features) one image takes."""
        if self.vision is None:
            return 0
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}
        out["text"] = self.text.to_dict()
        out["vision"] = None if self.vision is None else self.vision.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        text = TextConfig.from_dict(data.pop("text", {}))
        vision = data.pop("vision", None)
        vision = None if vision is None else VisionConfig.from_dict(vision)
        names = {f.name for f in dataclasses.fields(cls)} - {"text", "vision"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {unknown}; known keys are {sorted(names)}")
        return cls(text=text, vision=vision, **data)

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, **changes) -> ModelConfig:
        """A few-thousand-parameter model for tests."""
        cfg = cls(
            vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_layers=3, num_heads=4),
            text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=512),
            image_token_id=255,
        )
        return cfg.replace(**changes)

    @classmethod
    def demo(cls, **changes) -> ModelConfig:
        """The `make demo` model (about 2.5M parameters): 96-pixel images in 32-pixel patches, so each of
        the synthetic corpus's 3x3 grid cells is one patch; the class token is kept among the image
        features (strategy `full`); a 128-wide LLM, which on a 2-core CPU trains twice the steps of a
        256-wide one in the same time (and learned more in them); the vocabulary is set from the demo's
        tokenizer. The LLM starts from std 0.06 rather than LLaMA's 0.02: the short text pretraining
        leaves the output rows of words the text uses interchangeably (colours, shapes) as far apart as
        it found them, and at 0.02 they sit so close that instruction tuning spent its first ~350 steps
        of colour questions on a plateau before reading colours at all (under 100 at 0.06)."""
        cfg = cls(
            vision=VisionConfig(image_size=96, patch_size=32, hidden_size=128, intermediate_size=512,
                                num_layers=4, num_heads=4),
            text=TextConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4,
                            num_heads=4, num_kv_heads=4, max_position_embeddings=512, initializer_range=0.06),
            image_token_id=2047, vision_feature_select_strategy="full",
        )
        return cfg.replace(**changes)

    @classmethod
    def bench_small(cls, **changes) -> ModelConfig:
        """The performance yardstick of DESIGN.md (about 77M parameters)."""
        cfg = cls(
            vision=VisionConfig(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                                num_layers=6, num_heads=6),
            text=TextConfig(vocab_size=39479, hidden_size=512, intermediate_size=1376, num_layers=8,
                            num_heads=8, num_kv_heads=8, max_position_embeddings=2048),
            image_token_id=39478,
        )
        return cfg.replace(**changes)

    @classmethod
    def llava15_7b(cls, **changes) -> ModelConfig:
        """LLaVA-1.5-7B as published on the Hub (`llava-hf/llava-1.5-7b-hf`: vocab 32064)."""
        cfg = cls(vision=VisionConfig.clip_l14_336(), text=TextConfig.llama2_7b(vocab_size=32064),
                  image_token_id=32000)
        return cfg.replace(**changes)

    @classmethod
    def llava15_13b(cls, **changes) -> ModelConfig:
        """LLaVA-1.5-13B as published on the Hub (`llava-hf/llava-1.5-13b-hf`: vocab 32064)."""
        cfg = cls(vision=VisionConfig.clip_l14_336(), text=TextConfig.llama2_13b(vocab_size=32064),
                  image_token_id=32000)
        return cfg.replace(**changes)

    @classmethod
    def xllava_13b(cls, **changes) -> ModelConfig:
        """X-LLaVA: LLaMA-2-13B with the Korean-expanded 39,478-piece vocabulary + CLIP-L/14-336.

        The image slot uses LLaVA's sentinel id, so it takes no vocabulary row.
        """
        cfg = cls(vision=VisionConfig.clip_l14_336(), text=TextConfig.llama2_13b(vocab_size=39478),
                  image_token_id=LLAVA_IMAGE_TOKEN_INDEX)
        return cfg.replace(**changes)

    @classmethod
    def preset(cls, name: str, **changes) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return getattr(cls, name)(**changes)


PRESETS = ("tiny", "demo", "bench_small", "llava15_7b", "llava15_13b", "xllava_13b")
