"""The multimodal projector: vision features -> LLM embedding space."""

from __future__ import annotations

import jax
from flax import nnx

from xllava_jax.models.layers import Dense, gelu_exact


class Projector(nnx.Module):
    """`mlp2x_gelu`: Linear -> GELU (exact) -> Linear, or `linear`: one Linear. Both with bias."""

    def __init__(self, vision_dim: int, text_dim: int, kind: str, *, dtype, param_dtype, rngs: nnx.Rngs,
                 platform: str = ""):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, platform=platform)
        self.linear_1 = Dense(vision_dim, text_dim, ("vision_embed", "embed"), **kw)
        self.linear_2 = Dense(text_dim, text_dim, ("mlp", "embed"), **kw) if kind == "mlp2x_gelu" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., vision_dim] -> float[..., text_dim]."""
        h = self.linear_1(x)
        return h if self.linear_2 is None else self.linear_2(gelu_exact(h))
