"""X-LLaVA composition: CLIP features -> projector -> the LLM, at the image-placeholder positions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from xllava_jax import sharding
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.models import ops
from xllava_jax.models.llama import KVCache, Llama
from xllava_jax.models.projector import Projector
from xllava_jax.models.vision import VisionTower


class XLlava(nnx.Module):
    """LLaVA-1.5 architecture. `vision_tower` and `projector` are None for a text-only config.

    `cfg.attention` is resolved for `cfg.platform` (default: the platform of `jax.devices()`); the
    model's `cfg` holds the resolved pair."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = resolve_kernels(cfg)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, scan=cfg.scan_layers,
                  platform=cfg.platform, rngs=rngs)
        self.language_model = Llama(cfg.text, attention=cfg.attention, **kw)
        if cfg.vision is None:
            self.vision_tower = self.projector = None
        else:
            self.vision_tower = VisionTower(cfg.vision, **kw)
            self.projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.projector_type,
                                       dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs,
                                       platform=cfg.platform)
        self.cfg = cfg

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """float[N, H, W, 3] -> projected features float[N, num_image_tokens, D_text]."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (text-only config) but pixel_values were given")
        feats = self.vision_tower.hidden_state(pixel_values, self.cfg.vision_feature_layer)
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return sharding.shard(self.projector(feats), sharding.HIDDEN)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
        """Token embeddings with image features written over the placeholder ids: float[B, S, D].

        pixel_values float[N, H, W, 3]: the k-th placeholder of the whole batch (row-major) takes
        feature k of the concatenated images, as HF LLaVA does. pixel_values float[B, M, H, W, 3]:
        one group of M image slots per row; row b's placeholders take its own images' features in
        order (text-only rows simply have no placeholders), which keeps batch shapes static.
        """
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if pixel_values is None:
            return embeds
        per_row = pixel_values.ndim == 5
        images = pixel_values.reshape((-1,) + pixel_values.shape[-3:])
        feats = self.image_features(images).astype(embeds.dtype)
        b, s, d = embeds.shape
        if per_row:
            feats = feats.reshape(b, -1, d)
            slot = jnp.cumsum(is_image, axis=1) - 1
            picked = jnp.take_along_axis(feats, jnp.clip(slot, 0, feats.shape[1] - 1)[..., None], axis=1)
        else:
            check_placeholder_count(is_image, feats.shape[0] * feats.shape[1])
            flat = feats.reshape(-1, d)
            slot = jnp.cumsum(is_image.reshape(-1)) - 1
            picked = flat[jnp.clip(slot, 0, flat.shape[0] - 1)].reshape(b, s, d)
        return jnp.where(is_image[..., None], picked, embeds)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """input_ids int[B, S] (one placeholder id per image feature), pixel_values float[N, H, W, 3]
        or float[B, M, H, W, 3] (normalised, channels last), attention_mask int[B, S] -> logits float[B, S, V]."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, segment_ids=segment_ids)

    def hidden_states(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """`__call__` up to the LLM's final RMSNorm: float[B, S, D] (the training loss applies the
        output projection itself, see `models.loss.head_loss_sum`)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask,
                                                 position_ids=position_ids, segment_ids=segment_ids)

    def decode(self, embeds: jax.Array, cache: KVCache, cache_index, attention_mask, position_ids):
        """One cached forward step: float[B, T, D] embeddings -> (logits float[B, T, V], cache)."""
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, cache_index=cache_index)


def check_placeholder_count(is_image, num_features: int) -> None:
    """ValueError unless the placeholder mask bool[B, S] (a jax or numpy array) marks `num_features` ids;
    a traced mask is not checked (its values are unknown)."""
    if isinstance(is_image, jax.core.Tracer):
        return
    count = int(is_image.sum())
    if count != num_features:
        raise ValueError(f"input_ids hold {count} image placeholder ids but the images give {num_features} "
                         "features: each image needs exactly num_image_tokens placeholders")


def resolve_kernels(cfg: ModelConfig, devices=None) -> ModelConfig:
    """`cfg` with its target platform set (from `devices`, else jax.devices(), unless already set)
    and its attention setting resolved for it (models/ops.py)."""
    platform = cfg.platform or ops.target_platform(devices)
    try:
        attention = ops.resolve_attention(cfg.attention, platform)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg.replace(platform=platform, attention=attention)


def build_model(cfg: ModelConfig, seed: int = 0) -> XLlava:
    """A randomly initialised model."""
    return XLlava(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> XLlava:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: XLlava(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars (works on abstract models too)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
