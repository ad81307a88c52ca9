"""LLaMA decoder with the semantics of HF `LlamaForCausalLM`, plus a static KV cache.

RoPE is HF's half-split ("rotate_half") form, so converted q/k weights need no permutation.
Attention and matmuls run the kernels chosen for the target devices (models/ops.py). Activations are
constrained at block boundaries by the sharding rules (`sharding.shard`). With `scan` the layers are
one stacked block run by `jax.lax.scan` (parameters float[L, ...]; the KV cache one (k, v) pair of
float[L, B, S, K, H]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from xllava_jax import sharding
from xllava_jax.config import DTYPES, TextConfig
from xllava_jax.models import ops
from xllava_jax.models.layers import Dense, Embed, RMSNorm, checkpointed, remat_block, stacked

KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies float32[head_dim / 2] for the config's RoPE type (default, linear, llama3)."""
    dim = cfg.dim_per_head
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(inv_freq: np.ndarray, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin float[B, T, 1, head_dim] for int[B, T] positions (halves duplicated, HF layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: float[B, T, N, H] rotated by the tables (rotate_half form)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs: nnx.Rngs, *, attention: str, platform: str):
        d, hd = cfg.hidden_size, cfg.dim_per_head
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range,
                  platform=platform)
        self.q_proj = Dense(d, cfg.num_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Dense(cfg.num_heads * hd, d, ("heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attention, self.platform = attention, platform

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, segments=None):
        """x: float[B, T, D]; mask: bool[B, 1, T, S]; kv: (float[B, S, K, H], float[B, S, K, H]) or None;
        segments: int[B, T] (see `ops.attention`). Returns (float[B, T, D], updated kv or None).
        """
        split = lambda y: rearrange(y, "b t (n h) -> b t n h", h=self.head_dim)  # noqa: E731
        q = apply_rope(sharding.shard(split(self.q_proj(x)), sharding.HEADS), cos, sin)
        k = apply_rope(sharding.shard(split(self.k_proj(x)), sharding.KV_HEADS), cos, sin)
        v = sharding.shard(split(self.v_proj(x)), sharding.KV_HEADS)
        if kv is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        first_slot = cache_index if type(cache_index) is int else None
        out = ops.attention(q, k, v, mask, impl=self.attention, platform=self.platform, first_slot=first_slot,
                            segments=segments, cached=kv is not None)
        out = sharding.shard(out, sharding.HEADS)
        return self.o_proj(rearrange(out, "b t n h -> b t (n h)")), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs: nnx.Rngs, *, platform: str):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range,
                  platform=platform)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = sharding.shard(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), sharding.MLP)
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs: nnx.Rngs, *, attention: str = "xla",
                 platform: str = ""):
        kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.self_attn = Attention(cfg, dtype, param_dtype, rngs, attention=attention, platform=platform)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs, platform=platform)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, segments=None):
        """x: float[B, T, D] -> (float[B, T, D], updated kv or None)."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_index, segments)
        x = sharding.shard(x + h, sharding.HIDDEN)
        return sharding.shard(x + self.mlp(self.post_attention_layernorm(x)), sharding.HIDDEN), kv


def causal_mask(q_pos: jax.Array, kv_len: int, key_valid: jax.Array | None,
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal mask bool[B, 1, T, S] over key slots 0..S-1 for queries at slots int[B, T].

    key_valid: bool/int[B, S] (padding mask over keys); segment_ids: int[B, S] (packing, no cache:
    T == S), a query attends only to keys of its own segment.
    """
    keys = jnp.arange(kv_len)
    mask = keys[None, None, :] <= q_pos[:, :, None]
    if key_valid is not None:
        mask = mask & key_valid.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask[:, None]


class Llama(nnx.Module):
    """Embedding, decoder layers, final RMSNorm, lm_head (or tied to the embedding)."""

    def __init__(self, cfg: TextConfig, *, dtype: str = "float32", param_dtype: str = "float32",
                 remat: str = "none", scan: bool = False, attention: str = "xla", platform: str = "",
                 rngs: nnx.Rngs):
        cdt, pdt = DTYPES[dtype], DTYPES[param_dtype]
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cdt, param_dtype=pdt, rngs=rngs,
                                  init_std=cfg.initializer_range)
        make = lambda r: DecoderLayer(cfg, cdt, pdt, r, attention=attention, platform=platform)  # noqa: E731
        self.layers = stacked(make, cfg.num_layers, rngs) if scan else nnx.List(
            [make(rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cdt, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=cdt, param_dtype=pdt, rngs=rngs,
            init_std=cfg.initializer_range, platform=platform)
        self.cfg = cfg
        self.dtype = cdt
        self.remat = remat
        self.scan = scan
        self.attention = attention

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, T] -> float[B, T, D]; ids outside the table (e.g. image placeholders) must be masked first."""
        return self.embed_tokens(input_ids)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states float[B, T, D] -> logits float[B, T, V]."""
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return sharding.shard(out, sharding.LOGITS) if out.ndim == 3 else out

    def output_kernel(self) -> tuple[jax.Array, bool]:
        """The output projection in the compute dtype and whether it is vocabulary-major: (lm_head
        kernel float[D, V], False), or (the tied embedding table float[V, D], True)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].astype(self.dtype), True
        return self.lm_head.kernel[...].astype(self.dtype), False

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0):
        """Causal LM forward.

        input_ids int[B, T] (or inputs_embeds float[B, T, D]); attention_mask int[B, T] without a
        cache, int[B, S] over the cache slots with one; position_ids int[B, T] (default: arange, or
        the cache slots). Returns logits float[B, T, V], and with a cache also the updated cache.
        """
        out = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, segment_ids=segment_ids, cache=cache,
                                 cache_index=cache_index)
        return self.logits(out) if cache is None else (self.logits(out[0]), out[1])

    def hidden_states(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                      cache_index: jax.Array | int = 0):
        """`__call__` up to the final RMSNorm: float[B, T, D] (and with a cache also the updated
        cache). `logits` of a slice of it (e.g. the last position during a prefill) skips the
        lm_head work for the positions left out."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        x = sharding.shard(x, sharding.HIDDEN)
        b, t, _ = x.shape
        slots = jnp.broadcast_to(jnp.arange(t)[None] + cache_index, (b, t))
        if position_ids is None:
            position_ids = slots
        cos, sin = rope_tables(rope_inv_freq(self.cfg), position_ids, self.dtype)
        kv_len = t if cache is None else cache[0][0].shape[-3]
        mask = causal_mask(slots, kv_len, attention_mask, segment_ids)
        segments = None if cache is not None else attention_segments(b, t, attention_mask, segment_ids)
        if self.scan:
            x, new_cache = self._scan(x, cos, sin, mask, cache, cache_index, segments)
        elif cache is None:
            run = remat_block(lambda layer, h: layer(h, cos, sin, mask, None, cache_index, segments)[0], self.remat)
            for layer in self.layers:
                x = run(layer, x)
        else:
            new_cache = []
            for layer, kv in zip(self.layers, cache):
                x, kv = layer(x, cos, sin, mask, kv, cache_index)
                new_cache.append(kv)
            new_cache = tuple(new_cache)
        x = self.norm(x)
        return x if cache is None else (x, new_cache)

    def _scan(self, x, cos, sin, mask, cache, cache_index, segments):
        """The stacked layers over x float[B, T, D] with `jax.lax.scan`: parameters are scanned over,
        any other layer state (LoRA dropout RNG streams) is carried through the layers in order."""
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)

        def body(carry, xs):
            h, state = carry
            layer = nnx.merge(graphdef, xs[0], state)
            h, kv = layer(h, cos, sin, mask, xs[1], cache_index, segments)
            return (h, nnx.state(layer, nnx.Not(nnx.Param))), kv

        kv = None if cache is None else cache[0]
        (x, rest), new_kv = jax.lax.scan(checkpointed(body, self.remat if cache is None else "none"),
                                         (x, rest), (params, kv))
        nnx.update(self.layers, rest)
        return x, (None if cache is None else (new_kv,))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """Zeroed KV cache: per layer (k, v), each float[B, max_len, num_kv_heads, head_dim]; with
        scanned layers one (k, v) pair of float[L, B, max_len, num_kv_heads, head_dim]."""
        shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.dim_per_head)
        dtype = dtype or self.dtype
        if self.scan:
            shape = (self.cfg.num_layers,) + shape
            return ((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.cfg.num_layers))


def attention_segments(batch: int, length: int, attention_mask: jax.Array | None,
                       segment_ids: jax.Array | None) -> jax.Array:
    """int32[B, T] segment ids for kernels that mask by segments: the packing segments (or one
    segment), with padding (attention_mask 0) moved to a segment of its own (-1)."""
    seg = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return seg if attention_mask is None else jnp.where(attention_mask.astype(bool), seg, -1)
