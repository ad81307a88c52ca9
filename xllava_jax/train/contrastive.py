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

Captions are packed several to a text row (first-fit decreasing), each attending to itself alone with its own
positions and pooled over its own tokens: the same embeddings as one padded row per caption, in about half the
text tokens (the demo's captions average 27 tokens of the 48 a padded row holds).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

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
    `max_text_len` tokens and packed into rows of `text_row` tokens; `embed_dim` is the shared embedding size.
    Each step draws `negatives_per_step` of an image's hard negatives at random."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    text_layers: int = 2
    embed_dim: int = 128
    max_text_len: int = 48
    negatives_per_step: int = 1
    text_row: int = 64  # the demo's captions (27 tokens on average) fill 97% of 64-token rows, 90% of 48 or 96
    seed: int = 0

    def __post_init__(self):
        if self.text_row < self.max_text_len:
            raise ValueError(f"text_row ({self.text_row}) must hold a whole caption of max_text_len "
                             f"({self.max_text_len}) tokens")


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

    def __call__(self, x: jax.Array, owner: jax.Array) -> jax.Array:
        """x: float[R, T, D], owner int[R, T] (the caption each token belongs to) -> float[R, T, D]: a token
        attends to its own caption's tokens only."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3, self.num_heads, -1), 3, axis=2)
        same = owner[:, None, :, None] == owner[:, None, None, :]
        attn = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=same)
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

    def text_embeds(self, text: PackedText, n: int) -> jax.Array:
        """`n` packed captions (`pack_captions`) -> float[n, E]: each caption's mean over its own tokens of the
        last layer, projected (a caption with no tokens pools to zero)."""
        x = self.token_embedding(text.ids) + self.text_positions[...][text.positions]
        for block in self.text_blocks:
            x = block(x, text.owner)
        x = self.text_norm(x)
        owner = text.owner.reshape(-1)  # padding belongs to caption n, dropped below
        sums = jax.ops.segment_sum(x.reshape(owner.shape[0], -1), owner, num_segments=n + 1)[:n]
        tokens = jax.ops.segment_sum(jnp.ones_like(owner, jnp.float32), owner, num_segments=n + 1)[:n]
        return self.text_projection(sums / jnp.maximum(tokens, 1)[:, None])


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(model: ContrastiveModel, pixels: jax.Array, text: PackedText,
                     negatives: int = 0) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE. pixels float[B, H, W, 3]; `text` packs B captions, then (with `negatives` K > 0) each
    image's K hard negatives, image by image (image-to-text side only). Returns (loss, {"i2t_acc", "hard_acc"})."""
    b = pixels.shape[0]
    img, every = model.image_embeds(pixels), model.text_embeds(text, b * (1 + negatives))
    txt = every[:b]
    img_mean, txt_mean = img.mean(0), txt.mean(0)
    img, txt = _unit(img - img_mean), _unit(txt - txt_mean)
    scale = jnp.exp(jnp.clip(model.logit_scale[...], 0.0, math.log(100.0)))
    logits = scale * img @ txt.T                                  # [B, B]: row i = image i vs every caption
    labels = jnp.arange(img.shape[0])
    i2t_logits = logits
    hard_acc = jnp.float32(1.0)
    if negatives:
        neg = _unit(every[b:] - txt_mean).reshape(b, negatives, -1)
        hard = scale * jnp.einsum("be,bke->bk", img, neg)         # image i vs its own hard negatives
        i2t_logits = jnp.concatenate([logits, hard], axis=1)
        hard_acc = (jnp.diagonal(logits)[:, None] > hard).all(1).mean()
    i2t = optax.softmax_cross_entropy_with_integer_labels(i2t_logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    acc = (jnp.argmax(i2t_logits, axis=1) == labels).mean()
    return (i2t + t2i) / 2, {"i2t_acc": acc, "hard_acc": hard_acc}


class PackedText(NamedTuple):
    """Captions packed into rows: ids and positions int[R, T]; `owner` int[R, T] is the caption each token belongs
    to (the caption count for padding)."""

    ids: jax.Array
    positions: jax.Array
    owner: jax.Array


ROW_MULTIPLE = 8  # packed text rows come in multiples of this, so a run compiles its step for a few row counts


def pack_captions(captions: list[list[int]], width: int, max_len: int) -> PackedText:
    """Captions (each cut to `max_len` tokens) packed first-fit decreasing into rows of `width` tokens, the row
    count rounded up to a multiple of ROW_MULTIPLE. Every caption lands whole in one row."""
    if width < max_len:
        raise ValueError(f"a packed row of {width} tokens cannot hold a {max_len}-token caption")
    cut = [c[:max_len] for c in captions]
    free: list[int] = []      # tokens left in each row
    place = [0] * len(cut)    # the row of each caption
    for i in sorted(range(len(cut)), key=lambda i: -len(cut[i])):
        row = next((r for r, room in enumerate(free) if room >= len(cut[i])), None)
        if row is None:
            row = len(free)
            free.append(width)
        place[i] = row
        free[row] -= len(cut[i])
    rows = max(ROW_MULTIPLE, -(-len(free) // ROW_MULTIPLE) * ROW_MULTIPLE)
    ids = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    owner = np.full((rows, width), len(cut), np.int32)
    filled = [0] * rows
    for i, caption in enumerate(cut):
        row, start = place[i], filled[place[i]]
        ids[row, start: start + len(caption)] = caption
        positions[row, start: start + len(caption)] = np.arange(len(caption))
        owner[row, start: start + len(caption)] = i
        filled[row] += len(caption)
    return PackedText(ids, positions, owner)


@functools.partial(nnx.jit, static_argnames="negatives")
def _step(model: ContrastiveModel, optimizer: nnx.Optimizer, pixels, text: PackedText, negatives: int):
    (loss, stats), grads = nnx.value_and_grad(contrastive_loss, has_aux=True)(model, pixels, text, negatives)
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
    if negatives is not None:
        k = min(len(x) for x in negatives)
    rng = np.random.default_rng(cfg.seed)
    order, cursor, history = rng.permutation(n), 0, []
    for step in tqdm(range(1, cfg.steps + 1), desc="contrastive", unit="step", disable=not progress):
        if cursor + cfg.batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = order[cursor: cursor + cfg.batch_size]
        cursor += cfg.batch_size
        rows = [captions[i] for i in idx]
        if negatives is not None:
            pick = np.stack([rng.choice(k, cfg.negatives_per_step, replace=False) for _ in idx])
            rows += [negatives[i][j] for i, chosen in zip(idx, pick) for j in chosen]
        text = pack_captions(rows, cfg.text_row, cfg.max_text_len)
        loss, stats = _step(model, optimizer, images[idx], text, cfg.negatives_per_step if negatives else 0)
        history.append({"step": step, "loss": float(loss)} | {k: float(v) for k, v in stats.items()})
    return model.vision_tower, history
