"""Building blocks shared by the vision tower, projector and decoder.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension); the
training code maps those names onto mesh axes. Kernels are stored `[in, out]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xllava_jax import sharding
from xllava_jax.models.ops import matmul

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
    """A parameter initialised with `init(key, shape, dtype)` and tagged with logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes for a {len(shape)}-d parameter")
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def stack_axes(module: nnx.Module, name: str = "layers") -> None:
    """Prepend the logical axis `name` to every parameter of `module` (stacked by `nnx.vmap`)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            node.set_metadata(logical_axes=(name,) + tuple(node.get_metadata()["logical_axes"]))


def stacked(make, count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` layers made by `make(rngs)` as one module whose parameters have a leading `layers`
    axis (each layer initialised from its own split of `rngs`)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(split: nnx.Rngs):
        return make(split)

    module = create(rngs)
    stack_axes(module)
    return module


def checkpointed(fn, policy: str):
    """`jax.checkpoint` of a scanned block's body according to the remat policy name."""
    if policy == "none":
        return fn
    saveable = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel: float[in, out]."""

    def __init__(self, din: int, dout: int, axes: Axes, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs, init_std: float = 0.02, platform: str = ""):
        self.kernel = param(rngs, nnx.initializers.normal(init_std), (din, dout), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, (dout,), param_dtype, axes[1:]) if use_bias else None
        self.dtype = dtype
        self.platform = platform  # the target's: selects the matmul kernel (models/ops.py)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., in] -> float[..., out]."""
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.platform)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table. embedding: float[V, D]."""

    def __init__(self, num: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.embedding = param(rngs, nnx.initializers.normal(init_std), (num, dim), param_dtype, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: int[...] -> float[..., D]. Ids outside the table must be masked by the caller. Under
        sharding rules the table is gathered whole in the compute dtype first (as FSDP gathers any
        weight), so the lookup follows the ids' batch split and its gradient is reduce-scattered."""
        table = sharding.shard(self.embedding[...].astype(self.dtype), (None, None))
        return jnp.take(table, ids, axis=0)

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
