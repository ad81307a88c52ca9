"""LLaMA decoder with the semantics of HF `LlamaForCausalLM`, plus a static KV cache.

RoPE is HF's half-split ("rotate_half") form, so converted q/k weights need no permutation.
Attention goes through `jax.nn.dot_product_attention` with grouped-query heads; on CPU through
`causal_attention`, the same computation that skips key blocks hidden from a whole query block.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xllava_jax.config import DTYPES, TextConfig
from xllava_jax.models.layers import Dense, Embed, RMSNorm, on_cpu, remat_block

KVCache = tuple[tuple[jax.Array, jax.Array], ...]
# Query block length of `causal_attention`.
ATTENTION_BLOCK = 64


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


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     first_slot: int | None) -> jax.Array:
    """`jax.nn.dot_product_attention(q, k, v, mask=mask)`, computed block by block (the CPU path).

    q float[B, T, N, H]; k, v float[B, S, K, H]; mask bool[B, 1, T, S], causal over slots (query t
    sits at slot first_slot + t and sees no key slot after its own). With `first_slot` known, query
    block i (ATTENTION_BLOCK rows, times the G query heads sharing a kv head) only meets the keys up
    to its last slot; the skipped scores are masked for every row of the block, so each row's
    softmax is unchanged (rows masked everywhere aside, whose output is meaningless anyway). The
    backward pass is written out (`_attention_bwd`). Returns float[B, T, N, H].
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads
    scale = np.float32(1.0 / np.sqrt(h))
    q = (q * scale.astype(q.dtype)).reshape(b, t, kv_heads, groups, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    out = _attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, first_slot)  # k, v: [B, K, S, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _attention_blocks(t: int, s: int, first_slot: int | None):
    """(first query row, end row, keys met) of each query block."""
    for start in range(0, t, ATTENTION_BLOCK):
        stop = min(start + ATTENTION_BLOCK, t)
        yield start, stop, (s if first_slot is None else min(s, first_slot + stop))


def _attention_pass(q, k, v, mask, first_slot):
    """q float[B, K, G, T, H] (scaled), k, v float[B, K, S, H] -> (out float[B, K, G, T, H], the
    probabilities of each block float[B, K, G x rows, keys])."""
    b, kv_heads, g, t, h = q.shape
    neg = np.float32(-0.7 * np.finfo(np.float32).max)  # jax.nn.dot_product_attention's fill value
    outs, probs = [], []
    for start, stop, keys in _attention_blocks(t, k.shape[2], first_slot):
        rows = g * (stop - start)
        scores = jnp.einsum("bkmh,bksh->bkms", q[:, :, :, start:stop].reshape(b, kv_heads, rows, h), k[:, :, :keys],
                            preferred_element_type=jnp.float32)
        keep = jnp.broadcast_to(mask[:, :, None, start:stop, :keys], (b, 1, g, stop - start, keys))
        p = jax.nn.softmax(jnp.where(keep.reshape(b, 1, rows, keys), scores, neg), axis=-1).astype(v.dtype)
        probs.append(p)
        outs.append(jnp.einsum("bkms,bksh->bkmh", p, v[:, :, :keys]).reshape(b, kv_heads, g, stop - start, h))
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)), probs


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, first_slot):
    return _attention_pass(q, k, v, mask, first_slot)[0]


def _attention_fwd(q, k, v, mask, first_slot):
    out, probs = _attention_pass(q, k, v, mask, first_slot)
    return out, (q, k, v, out, probs)


def _attention_bwd(first_slot, residuals, d_out):
    """Per block: dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K, dK += dS^T Q;
    masked probabilities are exact zeros, so they add nothing."""
    q, k, v, out, probs = residuals
    b, kv_heads, g, t, h = q.shape
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (start, stop, keys), p in zip(_attention_blocks(t, k.shape[2], first_slot), probs):
        rows = g * (stop - start)
        do, qb, ob = (x[:, :, :, start:stop].reshape(b, kv_heads, rows, h) for x in (d_out, q, out))
        dv = dv.at[:, :, :keys].add(jnp.einsum("bkms,bkmh->bksh", p, do, preferred_element_type=jnp.float32))
        dp = jnp.einsum("bkmh,bksh->bkms", do, v[:, :, :keys], preferred_element_type=jnp.float32)
        delta = jnp.sum(do.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1, keepdims=True)
        ds = (p * (dp - delta)).astype(q.dtype)
        dq.append(jnp.einsum("bkms,bksh->bkmh", ds, k[:, :, :keys]).reshape(b, kv_heads, g, stop - start, h))
        dk = dk.at[:, :, :keys].add(jnp.einsum("bkms,bkmh->bksh", ds, qb, preferred_element_type=jnp.float32))
    dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.dim_per_head
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)
        self.q_proj = Dense(d, cfg.num_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Dense(cfg.num_heads * hd, d, ("heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
        """x: float[B, T, D]; mask: bool[B, 1, T, S]; kv: (float[B, S, K, H], float[B, S, K, H]) or None.

        Returns (float[B, T, D], updated kv or None).
        """
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if kv is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if on_cpu():
            first_slot = cache_index if type(cache_index) is int else None
            out = causal_attention(q, k, v, mask, first_slot)
        else:
            # cuDNN's fused attention (bf16/fp16) is much faster on GPUs than XLA's; decode steps
            # with a cache keep the XLA path.
            fused = kv is None and q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if fused else None)
        return self.o_proj(out.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.self_attn = Attention(cfg, dtype, param_dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
        """x: float[B, T, D] -> (float[B, T, D], updated kv or None)."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


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
                 remat: str = "none", rngs: nnx.Rngs):
        cdt, pdt = DTYPES[dtype], DTYPES[param_dtype]
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cdt, param_dtype=pdt, rngs=rngs,
                                  init_std=cfg.initializer_range)
        self.layers = nnx.List([DecoderLayer(cfg, cdt, pdt, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cdt, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=cdt, param_dtype=pdt, rngs=rngs,
            init_std=cfg.initializer_range)
        self.cfg = cfg
        self.dtype = cdt
        self.remat = remat

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, T] -> float[B, T, D]; ids outside the table (e.g. image placeholders) must be masked first."""
        return self.embed_tokens(input_ids)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states float[B, T, D] -> logits float[B, T, V]."""
        return self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

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
        b, t, _ = x.shape
        slots = jnp.broadcast_to(jnp.arange(t)[None] + cache_index, (b, t))
        if position_ids is None:
            position_ids = slots
        cos, sin = rope_tables(rope_inv_freq(self.cfg), position_ids, self.dtype)
        kv_len = t if cache is None else cache[0][0].shape[1]
        mask = causal_mask(slots, kv_len, attention_mask, segment_ids)
        new_cache = []
        if cache is None:
            run = remat_block(lambda layer, h: layer(h, cos, sin, mask, None, cache_index)[0], self.remat)
            for layer in self.layers:
                x = run(layer, x)
        else:
            for layer, kv in zip(self.layers, cache):
                x, kv = layer(x, cos, sin, mask, kv, cache_index)
                new_cache.append(kv)
        x = self.norm(x)
        return x if cache is None else (x, tuple(new_cache))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """Zeroed KV cache: per layer (k, v), each float[B, max_len, num_kv_heads, head_dim]."""
        shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.dim_per_head)
        dtype = dtype or self.dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers)
