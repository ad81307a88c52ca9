"""LoRA adapters on the LLM projections, with PEFT's semantics, plus merge, unmerge and strip.

A wrapped projection computes `base(x) + dropout(x) @ lora_a @ lora_b * alpha / r` (PEFT's LoRA
Linear). Adapter weights are `LoraParam`s, a subclass of `nnx.Param`, so a filter tells them apart:
`nnx.split(model, LoraParam, ...)` (LoraParam before any `nnx.Param` filter) gives the trainable
adapters first and the frozen base after. Adapters are float32 whatever the base dtype (peft's
`autocast_adapter_dtype`) and are computed in the base projection's compute dtype.

Dropout follows NNX's mode switch: it is off after `apply_lora`; `model.train()` turns it on and
`model.eval()` off again (they set the `deterministic` attribute of every `nnx.Dropout`). Each
wrapped projection draws its masks from its own RNG stream (`nnx.RngState` in the model's state:
a pure train step must return the updated RNG state to advance it).

`merge`/`unmerge` change the model in place and run eagerly (they flip a static `merged` flag, so
not inside `jax.jit`); unmerging subtracts the update it added, which restores the base kernel up to
float rounding (one ulp-level error per merge/unmerge cycle, none in the adapter weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xllava_jax.config import ConfigError
from xllava_jax.models.layers import Dense
from xllava_jax.models.ops import matmul

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
LLM_TARGETS = ATTENTION_TARGETS + MLP_TARGETS

# kaiming_uniform(a=sqrt(5)) as PEFT initialises lora_A: U(-1/sqrt(in), 1/sqrt(in)) over float[in, r]
# (over float[L, in, r] of scanned layers, each layer's from its own in).
_INIT_A = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1)
_INIT_A_STACKED = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                                    batch_axis=(0,))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling (`alpha / r`), input dropout, and which LLM projections get adapters."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LLM_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # lists from JSON
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.r < 1:
            raise ConfigError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LLM_TARGETS))
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora targets must be distinct names from {LLM_TARGETS}, got {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"lora config: unknown key(s) {unknown}; known keys are {sorted(names)}")
        return cls(**data)

    @classmethod
    def llm_pretrain(cls) -> LoraConfig:
        """X-LLaVA stage 0 (bilingual LLM pretraining): r 8, alpha 32, dropout 0.05, all projections."""
        return cls()

    @classmethod
    def vif(cls) -> LoraConfig:
        """X-LLaVA stage 2 (visual instruction tuning) with LoRA: r 128, alpha 256, dropout 0.05."""
        return cls(r=128, alpha=256.0)


class LoraParam(nnx.Param):
    """An adapter weight (lora_a or lora_b): trainable while the base parameters stay frozen."""


class LoraDense(nnx.Module):
    """A `Dense` plus a low-rank update. lora_a: float32[in, r], lora_b: float32[r, out] (with a
    leading layers axis when the base is a scanned stack of projections, kernel float[L, in, out]).

    The base projection is kept unchanged as `self.base`; lora_b starts at zero, so a fresh adapter
    leaves the outputs as they were.
    """

    def __init__(self, base: Dense, cfg: LoraConfig, *, rngs: nnx.Rngs):
        *stack, din, dout = base.kernel.shape
        *stack_axes, in_axis, out_axis = base.kernel.get_metadata()["logical_axes"]
        init = _INIT_A_STACKED if stack else _INIT_A
        self.base = base
        self.lora_a = LoraParam(init(rngs.params(), (*stack, din, cfg.r), jnp.float32),
                                logical_axes=(*stack_axes, in_axis, None))
        self.lora_b = LoraParam(jnp.zeros((*stack, cfg.r, dout), jnp.float32),
                                logical_axes=(*stack_axes, None, out_axis))
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs if cfg.dropout > 0 else None)
        self.cfg = cfg
        self.merged = False

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., in] -> float[..., out]."""
        y = self.base(x)
        if self.merged:
            return y
        dt, platform = self.base.dtype, self.base.platform
        h = matmul(self.dropout(x).astype(dt), self.lora_a[...].astype(dt), platform)
        return y + matmul(h, self.lora_b[...].astype(dt), platform) * self.cfg.scale

    def delta(self) -> jax.Array:
        """The weight update `lora_a @ lora_b * scale`: float32[in, out] (float32[L, in, out] stacked)."""
        ab = jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
        return ab * self.cfg.scale

    def merge(self) -> None:
        """Fold the update into the base kernel; the adapter path becomes a no-op."""
        if not self.merged:
            self._add_to_kernel(self.delta())
            self.merged = True

    def unmerge(self) -> None:
        """Take the update out of the base kernel again (by subtraction)."""
        if self.merged:
            self._add_to_kernel(-self.delta())
            self.merged = False

    def _add_to_kernel(self, update: jax.Array) -> None:
        kernel = self.base.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) + update).astype(kernel.dtype)


def lora_sites(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, str]]:
    """(dotted path, parent module, attribute name) of every LLM projection an adapter can wrap (one
    per kind for scanned layers, whose projections are stacked: `language_model.layers.self_attn.q_proj`)."""
    layers = model.language_model.layers
    indexed = [("", layers)] if model.language_model.scan else [(f"{i}.", layer) for i, layer in enumerate(layers)]
    for index, layer in indexed:
        for parent, kind, names in ((layer.self_attn, "self_attn", ATTENTION_TARGETS),
                                    (layer.mlp, "mlp", MLP_TARGETS)):
            for name in names:
                yield f"language_model.layers.{index}{kind}.{name}", parent, name


def lora_modules(model: nnx.Module) -> Iterator[tuple[str, LoraDense]]:
    """(dotted path of the projection, its LoraDense) for every wrapped projection."""
    for path, parent, name in lora_sites(model):
        module = getattr(parent, name)
        if isinstance(module, LoraDense):
            yield path, module


def lora_config(model: nnx.Module) -> LoraConfig | None:
    """The LoRA config the model's adapters were made with, or None when it has none."""
    return next((module.cfg for _, module in lora_modules(model)), None)


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Wrap `cfg.targets` of every decoder layer in a LoraDense, in place; returns the model.

    `rngs.params` initialises lora_a; each adapter's dropout stream is forked from `rngs.dropout`
    (or `rngs.default` when there is none).
    """
    if lora_config(model) is not None:
        raise ValueError("the model already has LoRA adapters")
    for _, parent, name in lora_sites(model):
        if name in cfg.targets:
            setattr(parent, name, LoraDense(getattr(parent, name), cfg, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel, in place (eager); returns the model."""
    for _, module in lora_modules(model):
        module.merge()
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Undo `merge_lora`, in place (eager); returns the model."""
    for _, module in lora_modules(model):
        module.unmerge()
    return model


def strip_lora(model: nnx.Module) -> nnx.Module:
    """A plain model (no LoraDense left) whose kernels have the adapters merged in.

    The input model is left as it is: the copy shares every array except the merged kernels.
    """
    plain = nnx.clone(model)
    for _, parent, name in lora_sites(plain):
        module = getattr(parent, name)
        if isinstance(module, LoraDense):
            module.merge()
            setattr(parent, name, module.base)
    return plain


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapter weights (every LoraParam) as an `nnx.State`."""
    return nnx.state(model, LoraParam)
