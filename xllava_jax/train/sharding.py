"""Logical axis names -> mesh axes: the one table that decides how parameters are sharded.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters carry logical names (see models/layers.py);
a logical name maps to a mesh axis, or to None (replicated). A mesh axis is used at most once per
array, and a dimension that the mesh axis does not divide stays replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (None: replicated). MaxText-style: FSDP over the model dimension,
# tensor parallelism over heads and MLP width; the vocabulary is split over `tensor`.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
}


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: dict[str, str | None] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with these logical `axes` and `shape` on `mesh`."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_sharding(mesh: jax.sharding.Mesh, rules: dict[str, str | None] | None = None):
    """A function (logical_axes, shape) -> NamedSharding on `mesh`, for loading and initialising."""

    def sharding(axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return sharding
