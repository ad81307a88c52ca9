"""CLIP vision transformer with the semantics of HF `CLIPVisionModel`.

Pixel values are channels-last `float[B, H, W, C]`, already normalised. Hidden state 0 is the
pre-LayerNorm'd embedding sequence, hidden state i the output of block i, as in HF's `hidden_states`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from xllava_jax import sharding
from xllava_jax.config import DTYPES, VisionConfig
from xllava_jax.models.layers import ACTIVATIONS, Dense, LayerNorm, checkpointed, param, remat_block, stacked
from xllava_jax.models.ops import target_platform


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, param_dtype, rngs: nnx.Rngs, *, platform: str = ""):
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, platform=platform)
        self.q_proj = Dense(d, d, ("vision_embed", "vision_heads"), **kw)
        self.k_proj = Dense(d, d, ("vision_embed", "vision_heads"), **kw)
        self.v_proj = Dense(d, d, ("vision_embed", "vision_heads"), **kw)
        self.out_proj = Dense(d, d, ("vision_heads", "vision_embed"), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[B, T, D] -> float[B, T, D]; full (bidirectional) attention."""
        q, k, v = (sharding.shard(rearrange(p(x), "b t (n h) -> b t n h", h=self.head_dim), sharding.HEADS)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = sharding.shard(jax.nn.dot_product_attention(q, k, v), sharding.HEADS)
        return self.out_proj(rearrange(out, "b t n h -> b t (n h)"))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, param_dtype, rngs: nnx.Rngs, *, platform: str = ""):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, platform=platform)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(sharding.shard(self.act(self.fc1(x)), sharding.MLP))


class VisionBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, dtype, param_dtype, rngs: nnx.Rngs, *, platform: str = ""):
        kw = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, axis_name="vision_embed", rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **kw)
        self.self_attn = VisionAttention(cfg, dtype, param_dtype, rngs, platform=platform)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **kw)
        self.mlp = VisionMLP(cfg, dtype, param_dtype, rngs, platform=platform)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[B, T, D] -> float[B, T, D]."""
        x = sharding.shard(x + self.self_attn(self.layer_norm1(x)), sharding.HIDDEN)
        return sharding.shard(x + self.mlp(self.layer_norm2(x)), sharding.HIDDEN)


class VisionTower(nnx.Module):
    """CLIP ViT: patch embedding + class token + positions, pre-LayerNorm, encoder blocks."""

    def __init__(self, cfg: VisionConfig, *, dtype: str = "float32", param_dtype: str = "float32",
                 remat: str = "none", scan: bool = False, platform: str = "", rngs: nnx.Rngs):
        cdt, pdt = DTYPES[dtype], DTYPES[param_dtype]
        platform = platform or target_platform()
        d, p = cfg.hidden_size, cfg.patch_size
        normal = nnx.initializers.normal(0.02)
        self.patch_embedding = param(rngs, normal, (p, p, cfg.num_channels, d), pdt, (None, None, None, "vision_embed"))
        self.class_embedding = param(rngs, normal, (d,), pdt, ("vision_embed",))
        self.position_embedding = param(rngs, normal, (cfg.num_patches + 1, d), pdt, (None, "vision_embed"))
        ln = dict(eps=cfg.layer_norm_eps, dtype=cdt, param_dtype=pdt, axis_name="vision_embed", rngs=rngs)
        self.pre_layrnorm = LayerNorm(d, **ln)
        make = lambda r: VisionBlock(cfg, cdt, pdt, r, platform=platform)  # noqa: E731
        self.layers = stacked(make, cfg.num_layers, rngs) if scan else nnx.List(
            [make(rngs) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, **ln)
        self.cfg = cfg
        self.dtype = cdt
        self.remat = remat
        self.scan = scan

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: float[B, H, W, C] -> float[B, 1 + N, D] (class token first), before pre-LN."""
        b, h, w, c = pixel_values.shape
        p = self.cfg.patch_size
        if (h, w) != (self.cfg.image_size, self.cfg.image_size) or c != self.cfg.num_channels:
            raise ValueError(f"pixel_values must be [B, {self.cfg.image_size}, {self.cfg.image_size}, "
                             f"{self.cfg.num_channels}] (channels last), got {tuple(pixel_values.shape)}")
        # Patches in row-major order, each flattened as the (p, p, C) kernel is: a p x p stride-p convolution.
        patches = rearrange(pixel_values.astype(self.dtype), "b (gh ph) (gw pw) c -> b (gh gw) (ph pw c)", ph=p, pw=p)
        kernel = rearrange(self.patch_embedding[...].astype(self.dtype), "ph pw c d -> (ph pw c) d")
        tokens = jnp.dot(patches, kernel)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...].astype(self.dtype)

    def hidden_state(self, pixel_values: jax.Array, layer: int = -1) -> jax.Array:
        """HF `hidden_states[layer]`: float[B, H, W, C] -> float[B, 1 + N, D].

        Only the blocks up to the requested one run (LLaVA's layer -2 skips the last block).
        """
        n = self.cfg.num_layers
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise ValueError(f"layer {layer} is outside the {n + 1} hidden states of a {n}-layer tower")
        x = sharding.shard(self.pre_layrnorm(self.embed(pixel_values)), sharding.HIDDEN)
        if self.scan:
            graphdef, params = nnx.split(self.layers)

            def body(h, block_params):
                return nnx.merge(graphdef, block_params)(h), None

            first = jax.tree.map(lambda a: a[:index], params)
            return jax.lax.scan(checkpointed(body, self.remat), x, first)[0] if index else x
        run = remat_block(lambda block, h: block(h), self.remat)
        for block in self.layers[:index]:
            x = run(block, x)
        return x

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`CLIPVisionModel` outputs: (last_hidden_state float[B, 1 + N, D], pooler_output float[B, D])."""
        last = self.hidden_state(pixel_values, -1)
        return last, self.post_layernorm(last[:, 0])
