"""Building blocks shared by the vision tower, projector and decoder.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension); the
training code maps those names onto mesh axes. Kernels are stored `[in, out]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
    """A parameter initialised with `init(key, shape, dtype)` and tagged with logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes for a {len(shape)}-d parameter")
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def on_cpu() -> bool:
    """Whether computations are placed on the CPU backend (selects the CPU-tuned code paths)."""
    return jax.default_backend() == "cpu"


# A single row times a kernel (a batch-1 decode step) is a matrix-vector product bound by memory,
# and XLA:CPU streams kernels of a layer's size on one core. The same product as a batch of
# _ROW_SPLIT contiguous row blocks of the kernel (a free reshape), partial sums added, runs on all
# cores: 512 x 512 in 53 instead of 76 us, a bench_small decode step 15-20% faster. Kernels above
# _ROW_SPLIT_MAX_BYTES (an lm_head) are already spread over the cores and only lose by it; more
# than one row takes XLA's slow path for this layout.
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
    # dkernel = x^T @ g contracts the token axis, the major axis of both operands. XLA:CPU would
    # transpose one of them itself, often the output gradient (for the lm_head a [tokens, vocab]
    # array); the barrier pins a transposed copy of the activations (usually the smaller operand)
    # instead, so the dot runs in the fast library path on canonical [K, N] x [N, M] operands.
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dkernel = jnp.dot(jax.lax.optimization_barrier(x2.T), g2)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x float[..., K] @ kernel float[K, N] -> float[..., N], with `jnp.dot`'s value and gradients.

    On CPU the backward pass is spelled out (see `_matmul_cpu_bwd`) to keep XLA from transposing
    large gradients, and a single row is split over the cores (`_dot_cpu`); elsewhere this is `jnp.dot`.
    """
    return _matmul_cpu(x, kernel) if on_cpu() else jnp.dot(x, kernel)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel: float[in, out]."""

    def __init__(self, din: int, dout: int, axes: Axes, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs, init_std: float = 0.02):
        self.kernel = param(rngs, nnx.initializers.normal(init_std), (din, dout), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, (dout,), param_dtype, axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., in] -> float[..., out]."""
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table. embedding: float[V, D]."""

    def __init__(self, num: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.embedding = param(rngs, nnx.initializers.normal(init_std), (num, dim), param_dtype, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: int[...] -> float[..., D]. Ids outside the table must be masked by the caller."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection. x: float[..., D] -> float[..., V]."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, axis_name: str, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (axis_name,))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, (axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., D] -> float[..., D]."""
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (HF order of operations)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., D] -> float[..., D]."""
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * h.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}


def remat_block(fn, policy: str):
    """Wrap a block's call in `nnx.remat` according to the config's policy name."""
    if policy == "none":
        return fn
    if policy == "full":
        return nnx.remat(fn)
    return nnx.remat(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
