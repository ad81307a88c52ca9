"""CLIP-style contrastive pretraining of a vision tower on image-caption pairs.

A small text transformer and the vision tower (`models/vision.py`) are trained together with CLIP's
symmetric InfoNCE loss: image i must pick caption i among the batch's captions, and caption i image i
among the batch's images. Optional hard-negative captions per image (the same caption with two objects'
colours swapped, say) join the image-to-text side only, as NegCLIP does, which pushes the tower to encode
which attribute belongs to which object. The image embedding pools the last layer's tokens by their mean
rather than CLIP's class token: every patch token then carries what its patch shows from the first step
(a class token pooled from a random tower barely varies between images), and LLaVA reads patch tokens.
Both embeddings are centred on their batch mean before they are normalised: from a random start, images
of one synthetic style (and captions of one template) all point one way, and the loss then falls fastest
by collapsing every embedding onto that common direction, a state the uncentred loss never leaves.
Only the vision tower is kept; the recipe then freezes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from xllava_jax.config import VisionConfig
from xllava_jax.models.layers import Dense, Embed, LayerNorm, param
from xllava_jax.models.ops import target_platform
from xllava_jax.models.vision import VisionMLP, VisionTower


@dataclass(frozen=True)
class ContrastiveConfig:
    """Training settings. Text: `text_layers` blocks of the vision tower's width, captions cut to
    `max_text_len` tokens; `embed_dim` is the shared embedding size. Each step draws
    `negatives_per_step` of an image's hard negatives at random."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    text_layers: int = 2
    embed_dim: int = 128
    max_text_len: int = 48
    negatives_per_step: int = 1
    seed: int = 0


class TextBlock(nnx.Module):
    """Pre-LN bidirectional transformer block with a padding mask."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        platform = target_platform()
        kw = dict(use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs, platform=platform)
        ln = dict(eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, axis_name="vision_embed", rngs=rngs)
        self.ln1, self.ln2 = LayerNorm(d, **ln), LayerNorm(d, **ln)
        self.qkv = Dense(d, 3 * d, ("vision_embed", "vision_heads"), **kw)
        self.out = Dense(d, d, ("vision_heads", "vision_embed"), **kw)
        self.mlp = VisionMLP(cfg, jnp.float32, jnp.float32, rngs, platform=platform)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: float[B, T, D], mask: bool[B, T] -> float[B, T, D]."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3, self.num_heads, -1), 3, axis=2)
        attn = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=mask[:, None, None, :])
        x = x + self.out(attn.reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ContrastiveModel(nnx.Module):
    """The vision tower, a text encoder, their projections and CLIP's learned temperature."""

    def __init__(self, vision_cfg: VisionConfig, vocab_size: int, cfg: ContrastiveConfig, rngs: nnx.Rngs):
        d = vision_cfg.hidden_size
        self.vision_tower = VisionTower(vision_cfg, rngs=rngs)
        self.token_embedding = Embed(vocab_size, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.text_positions = param(rngs, nnx.initializers.normal(0.02), (cfg.max_text_len, d), jnp.float32,
                                    (None, "vision_embed"))
        self.text_blocks = nnx.List([TextBlock(vision_cfg, rngs) for _ in range(cfg.text_layers)])
        self.text_norm = LayerNorm(d, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, axis_name="vision_embed",
                                   rngs=rngs)
        kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs, platform=target_platform())
        self.visual_projection = Dense(d, cfg.embed_dim, ("vision_embed", None), **kw)
        self.text_projection = Dense(d, cfg.embed_dim, ("vision_embed", None), **kw)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """float[B, H, W, 3] -> float[B, E]: the post-LayerNorm'd mean of the last layer's
        tokens, projected."""
        last, _ = self.vision_tower(pixel_values)
        return self.visual_projection(self.vision_tower.post_layernorm(last.mean(1)))

    def text_embeds(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids int[B, T], mask bool[B, T] -> float[B, E] (masked mean of the last layer, projected)."""
        x = self.token_embedding(ids) + self.text_positions[...][None, : ids.shape[1]]
        for block in self.text_blocks:
            x = block(x, mask)
        x = self.text_norm(x)
        pooled = (x * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
        return self.text_projection(pooled)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(model: ContrastiveModel, pixels: jax.Array, ids: jax.Array, mask: jax.Array,
                     neg_ids: jax.Array | None = None, neg_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE. pixels float[B, H, W, 3]; captions ids/mask [B, T]; hard negatives [B, K, T]
    (image-to-text side only). Returns (loss, {"i2t_acc", "hard_acc"})."""
    img, txt = model.image_embeds(pixels), model.text_embeds(ids, mask)
    img_mean, txt_mean = img.mean(0), txt.mean(0)
    img, txt = _unit(img - img_mean), _unit(txt - txt_mean)
    scale = jnp.exp(jnp.clip(model.logit_scale[...], 0.0, math.log(100.0)))
    logits = scale * img @ txt.T                                  # [B, B]: row i = image i vs every caption
    labels = jnp.arange(img.shape[0])
    i2t_logits = logits
    hard_acc = jnp.float32(1.0)
    if neg_ids is not None:
        b, k, t = neg_ids.shape
        neg = model.text_embeds(neg_ids.reshape(b * k, t), neg_mask.reshape(b * k, t))
        neg = _unit(neg - txt_mean).reshape(b, k, -1)
        hard = scale * jnp.einsum("be,bke->bk", img, neg)         # image i vs its own hard negatives
        i2t_logits = jnp.concatenate([logits, hard], axis=1)
        hard_acc = (jnp.diagonal(logits)[:, None] > hard).all(1).mean()
    i2t = optax.softmax_cross_entropy_with_integer_labels(i2t_logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    acc = (jnp.argmax(i2t_logits, axis=1) == labels).mean()
    return (i2t + t2i) / 2, {"i2t_acc": acc, "hard_acc": hard_acc}


def _pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        row = row[:width]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


@nnx.jit
def _step(model: ContrastiveModel, optimizer: nnx.Optimizer, pixels, ids, mask, neg_ids, neg_mask):
    (loss, stats), grads = nnx.value_and_grad(contrastive_loss, has_aux=True)(model, pixels, ids, mask, neg_ids,
                                                                              neg_mask)
    optimizer.update(model, grads)
    return loss, stats


def pretrain_vision_tower(images: np.ndarray, captions: list[list[int]], vocab_size: int, vision_cfg: VisionConfig,
                          cfg: ContrastiveConfig = ContrastiveConfig(), negatives: list[list[list[int]]] | None = None,
                          progress: bool = False) -> tuple[VisionTower, list[dict]]:
    """Train on images float[N, H, W, 3] (normalised) with caption token ids (one list per image) and,
    optionally, K hard-negative captions per image. Returns the vision tower and per-step metrics
    (`step`, `loss`, `i2t_acc`, `hard_acc`)."""
    n = len(images)
    if n != len(captions) or (negatives is not None and len(negatives) != n):
        raise ValueError(f"{n} images but {len(captions)} captions"
                         + ("" if negatives is None else f" and {len(negatives)} negative lists"))
    if n < cfg.batch_size:
        raise ValueError(f"need at least batch_size={cfg.batch_size} image-caption pairs, got {n}")
    model = ContrastiveModel(vision_cfg, vocab_size, cfg, nnx.Rngs(cfg.seed))
    warmup = max(1, round(cfg.steps * cfg.warmup_ratio))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=cfg.weight_decay), wrt=nnx.Param)
    ids, mask = _pad(captions, cfg.max_text_len)
    if negatives is not None:
        k = min(len(x) for x in negatives)
        neg = [_pad(x[:k], cfg.max_text_len) for x in negatives]
        neg_ids, neg_mask = np.stack([a for a, _ in neg]), np.stack([m for _, m in neg])
    rng = np.random.default_rng(cfg.seed)
    order, cursor, history = rng.permutation(n), 0, []
    for step in tqdm(range(1, cfg.steps + 1), desc="contrastive", unit="step", disable=not progress):
        if cursor + cfg.batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = order[cursor: cursor + cfg.batch_size]
        cursor += cfg.batch_size
        batch_neg = (None, None)
        if negatives is not None:
            pick = np.stack([rng.choice(k, cfg.negatives_per_step, replace=False) for _ in idx])
            batch_neg = (np.take_along_axis(neg_ids[idx], pick[..., None], 1),
                         np.take_along_axis(neg_mask[idx], pick[..., None], 1))
        loss, stats = _step(model, optimizer, images[idx], ids[idx], mask[idx], *batch_neg)
        history.append({"step": step, "loss": float(loss)} | {k: float(v) for k, v in stats.items()})
    return model.vision_tower, history
