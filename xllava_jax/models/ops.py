"""The kernels of the models: matmul and attention implementations, chosen for the target devices.

`model.attention` (ModelConfig.attention) is one of ATTENTION_IMPLS; `auto` resolves from the
platform of the devices the program is built for (a mesh's, a TPU topology's), never from the host's
default backend: cpu -> `cpu_blocked`, gpu -> `cudnn`, tpu -> `splash`. The matmul takes the CPU path
(`_matmul_cpu`) only when the target is a CPU.

- `xla`: `jax.nn.dot_product_attention` with the dense mask (holds [B, N, T, S] scores).
- `cudnn`: cuDNN's fused attention for bf16 / fp16 without a cache (GPU); the XLA path otherwise.
- `splash`: the Pallas splash attention (TPU; interpreted on a CPU target, for tests): causal with
  segment ids, no [B, N, T, S] scores; shard_mapped over the activation rules' batch and head axes.
  Cached decoding and lengths that no block size divides take the XLA path.
- `cpu_blocked`: blocks of 64 query rows that skip key blocks hidden from a whole block, with a
  written-out backward (`_attention_bwd`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from xllava_jax import sharding

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "cpu_blocked")
PLATFORMS = ("cpu", "gpu", "tpu")
_AUTO = {"cpu": "cpu_blocked", "gpu": "cudnn", "tpu": "splash"}
# Query block length of `causal_attention`.
ATTENTION_BLOCK = 64


def target_platform(devices=None) -> str:
    """The platform of `devices` (default: jax.devices(), what an unplaced program runs on)."""
    devices = jax.devices() if devices is None else list(devices)
    platform = devices[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_attention(setting: str, platform: str) -> str:
    """The attention implementation for `setting` on a `platform` target (an error names bad pairs)."""
    if setting not in ATTENTION_IMPLS:
        raise ValueError(f"attention {setting!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
    if platform not in PLATFORMS:
        raise ValueError(f"target platform {platform!r}: expected one of {', '.join(PLATFORMS)}")
    impl = _AUTO[platform] if setting == "auto" else setting
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"attention cudnn needs a GPU target, not {platform}")
    if impl == "splash" and platform == "gpu":
        raise ValueError("attention splash is a TPU kernel; use cudnn or xla on GPUs")
    return impl


# ------------------------------------------------------------------------------------------ matmul
# A single row times a kernel (a batch-1 decode step) is bound by memory, and XLA:CPU streams kernels
# of a layer's size on one core; as a batch of _ROW_SPLIT contiguous row blocks of the kernel, partial
# sums added, it runs on all cores. Kernels above _ROW_SPLIT_MAX_BYTES only lose by it (BENCHMARKS.md).
_ROW_SPLIT, _ROW_SPLIT_MAX_BYTES = 4, 8 << 20


def _dot_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k, n = kernel.shape
    if x.size != k or k % _ROW_SPLIT or k * n * kernel.dtype.itemsize > _ROW_SPLIT_MAX_BYTES:
        return jnp.dot(x, kernel)
    blocks = jnp.einsum("pk,pkn->pn", x.reshape(_ROW_SPLIT, k // _ROW_SPLIT),
                        kernel.reshape(_ROW_SPLIT, k // _ROW_SPLIT, n), preferred_element_type=jnp.float32)
    return blocks.sum(axis=0).astype(jnp.result_type(x, kernel)).reshape(*x.shape[:-1], n)


@jax.custom_vjp
def _matmul_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _dot_cpu(x, kernel)


def _matmul_cpu_fwd(x, kernel):
    return _dot_cpu(x, kernel), (x, kernel)


def _matmul_cpu_bwd(residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dkernel = _token_contraction(x2, g2)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _token_contraction(x2: jax.Array, g2: jax.Array) -> jax.Array:
    """x2^T @ g2 for x2 float[M, K], g2 float[M, N] (M tokens): float[K, N].

    The contraction runs over the token axis, the major axis of both operands, so one of them is copied
    transposed for the library dot: the narrower one (M x min(K, N) values; the barrier keeps XLA:CPU from
    folding the transpose into the dot and transposing the other), and when that is the gradient, the small
    [N, K] product is transposed back. A down projection's input is the wide one (K = the MLP width, N =
    the model width): XLA fuses the activation that made it into its transposed copy, a slow loop."""
    if x2.shape[1] <= g2.shape[1]:
        return jnp.dot(jax.lax.optimization_barrier(x2.T), g2)
    return jnp.dot(jax.lax.optimization_barrier(g2.T), x2).T


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def matmul(x: jax.Array, kernel: jax.Array, platform: str = "") -> jax.Array:
    """x float[..., K] @ kernel float[K, N] -> float[..., N], with `jnp.dot`'s value and gradients;
    on a CPU target through `_matmul_cpu` (single rows split over the cores, a kernel gradient that
    transposes the narrower of its operands)."""
    return _matmul_cpu(x, kernel) if platform == "cpu" else jnp.dot(x, kernel)


# --------------------------------------------------------------------------------------- attention
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str, platform: str,
              first_slot: int | None, segments: jax.Array | None, cached: bool) -> jax.Array:
    """Grouped-query attention: q float[B, T, N, H]; k, v float[B, S, K, H]; mask bool[B, 1, T, S]
    (causal, padding and segments folded in). `segments` int[B, T] (no cache, T == S): the segment of
    each position with padding as its own segment, for kernels that take segment ids instead of a
    mask. `first_slot`: the cache slot of query 0 when known statically; `platform`: the target's
    (splash is interpreted on a CPU target). Returns float[B, T, N, H]."""
    if impl == "cpu_blocked":
        return causal_attention(q, k, v, mask, first_slot)
    if impl == "splash" and not cached and segments is not None and _splash_block(q.shape[1]):
        return splash_attention(q, k, v, segments, interpret=platform == "cpu")
    fused = impl == "cudnn" and not cached and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if fused else None)


def _splash_block(length: int) -> int:
    """The largest splash block size that divides `length` (0: none does)."""
    return next((b for b in (512, 256, 128) if length % b == 0), 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Causal splash attention with segment ids; q float[B, T, N, H], k, v float[B, T, K, H],
    segments int[B, T]. Under a mesh and activation rules the kernel runs per shard of the batch
    and head axes (shard_map); `interpret` runs the kernel in Pallas' interpreter (CPU targets)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    q = q * np.float32(1.0 / np.sqrt(q.shape[-1])).astype(q.dtype)

    def local(q, k, v, seg):
        b, t, n, _ = q.shape
        block = _splash_block(t)
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
        kernel = splash.make_splash_mha(mask=masks.MultiHeadMask([masks.CausalMask((t, t))] * n),
                                        block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        heads_first = lambda x: rearrange(x, "b t n h -> b n t h")  # noqa: E731
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(s1, s1)))(
            heads_first(q), heads_first(k), heads_first(v), seg)
        return rearrange(out, "b n t h -> b t n h")

    spec = sharding.activation_spec(sharding.HEADS, q.shape)
    if spec is None:
        return local(q, k, v, segments)
    seg_spec = jax.sharding.PartitionSpec(spec[0], None)
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec, spec, spec, seg_spec),
                         out_specs=spec, check_vma=False)(q, k, v, segments)


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
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    # Query head n = kv head k * G + group g (kv head k serves query heads kG .. kG + G - 1).
    q = rearrange(q * scale.astype(q.dtype), "b t (k g) h -> b k g t h", k=k.shape[2])
    heads_first = lambda x: rearrange(x, "b s k h -> b k s h")  # noqa: E731
    out = _attention(q, heads_first(k), heads_first(v), mask, first_slot)
    return rearrange(out, "b k g t h -> b t (k g) h")


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
