"""The one home of sharding: mesh axes, the logical rules, meshes over any devices, and the specs of
parameters, optimizer state, batches and activations.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters carry logical axis names (models/layers.py);
activations are constrained at block boundaries with `shard(x, axes)` using activation names
(`act_batch`, `act_heads`, ...). One table, `DEFAULT_RULES`, maps every logical name onto a mesh
axis, a tuple of mesh axes, or None (replicated); a config overrides entries (`mesh.rules`). A mesh
axis is used at most once per array, and a dimension that its mesh axes do not divide stays
replicated. Below models/ and train/: nothing here imports them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rule = str | tuple[str, ...] | None

# MaxText-style: weights FSDP-sharded over their model dimension and tensor-parallel over heads and MLP
# width; activations split over the batch on data x fsdp (so FSDP all-gathers weights and
# reduce-scatters gradients instead of all-reducing whole-batch activations) and over heads / MLP width
# on tensor. `layers` is the stacked axis of scanned layers (never split).
DEFAULT_RULES: dict[str, Rule] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "act_batch": ("data", "fsdp"),
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# Activation layouts at the block boundaries the models constrain.
HIDDEN = ("act_batch", "act_length", "act_embed")          # [B, T, D]
HEADS = ("act_batch", "act_length", "act_heads", None)     # [B, T, N, H]
KV_HEADS = ("act_batch", "act_length", "act_kv_heads", None)
MLP = ("act_batch", "act_length", "act_mlp")               # [B, T, F]
LOGITS = ("act_batch", "act_length", "act_vocab")          # [B, T, V]
BATCH = ("act_batch",)                                     # the leading axis of every batch array


def parse_rule(name: str, value) -> Rule:
    """A rule from a config: "fsdp", "data+fsdp" (several mesh axes), "" or None (replicated), or a
    tuple of names. Unknown mesh axes are an error naming the rule."""
    if value is None or value == "" or value == ():
        return None
    axes = tuple(value.split("+")) if isinstance(value, str) else tuple(value)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh.rules.{name}: unknown mesh axis {unknown[0]!r}; use {', '.join(MESH_AXES)} "
                         "(several joined by '+', '' for replicated)")
    return axes[0] if len(axes) == 1 else axes


def make_rules(overrides: Mapping[str, object] | None = None) -> dict[str, Rule]:
    """DEFAULT_RULES with `overrides` (logical name -> rule as `parse_rule` reads it) applied."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if name not in rules:
            raise ValueError(f"mesh.rules.{name}: no such logical axis (known: {', '.join(sorted(rules))})")
        rules[name] = parse_rule(name, value)
    return rules


def make_mesh(sizes: Sequence[int], devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices): local ones, fake CPU
    devices, or a TPU topology's. One size may be -1 for "the devices left over". Axis types are
    Auto (GSPMD propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(sizes)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes}: give positive sizes, at most one -1")
    known = math.prod(s for s in sizes if s > 0)
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} present")
    from jax.experimental import mesh_utils

    try:  # a layout that follows the physical interconnect (TPU tori), where the devices say it
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError):  # a mesh shape mesh_utils cannot lay onto the torus: device order
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules: Mapping[str, Rule] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with these logical `axes` and `shape` on a mesh of `mesh_shape`
    (a Mesh's or AbstractMesh's `.shape`, or the mesh itself)."""
    rules = DEFAULT_RULES if rules is None else rules
    mesh_shape = getattr(mesh_shape, "shape", mesh_shape)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        rule = rules.get(name) if name is not None else None
        wanted = (rule,) if isinstance(rule, str) else tuple(rule or ())
        picked = tuple(a for a in wanted if a in mesh_shape and a not in used and mesh_shape[a] > 1)
        if not picked or size % math.prod(mesh_shape[a] for a in picked):
            spec.append(None)
            continue
        used.update(picked)
        spec.append(picked[0] if len(picked) == 1 else picked)
    return PartitionSpec(*spec)


def param_sharding(mesh: Mesh, rules: Mapping[str, Rule] | None = None):
    """A function (logical_axes, shape) -> NamedSharding on `mesh`, for loading and initialising."""

    def sharding(axes: Sequence[str | None] | None, shape: Sequence[int]) -> NamedSharding:
        spec = logical_to_spec(axes, shape, mesh, rules) if axes is not None else PartitionSpec()
        return NamedSharding(mesh, spec)

    return sharding


def state_shardings(state, mesh: Mesh, rules: Mapping[str, Rule] | None = None):
    """NamedShardings for an NNX state (concrete or abstract): every variable by its `logical_axes`
    metadata, anything without them (RNG streams) replicated. Returns the state's tree of Variables
    holding NamedShardings (`nnx.to_pure_dict` gives the plain tree)."""
    from flax import nnx

    place = param_sharding(mesh, rules)

    def one(var):
        return var.replace(place(var.get_metadata().get("logical_axes"), var.shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh: Mesh):
    """Shardings for `tx.init(params)`: every leaf that optax knows mirrors a parameter (Adam's mu and
    nu, per-group states of a partitioned optimizer) takes that parameter's sharding, anything else
    (counts, scalars) is replicated. `params` may be abstract."""
    from optax.transforms import MaskedNode  # the empty stand-in of a parameter a partition leaves out

    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)
    shardings = jax.tree.map(lambda _: replicated, abstract)
    return optax.tree_map_params(tx, lambda leaf, sharding: leaf if isinstance(leaf, MaskedNode) else sharding,
                                 shardings, param_shardings, transform_non_params=lambda leaf: leaf,
                                 is_leaf=lambda x: isinstance(x, MaskedNode))


def batch_sharding(mesh: Mesh, rules: Mapping[str, Rule] | None = None, ndim: int = 1) -> NamedSharding:
    """Batches split on their leading axis as `act_batch` says (data x fsdp by default)."""
    rule = (rules or DEFAULT_RULES).get("act_batch")
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    axes = tuple(a for a in axes if a in mesh.shape)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


# ------------------------------------------------------------------------------------ activations
_ACTIVATION_RULES: contextvars.ContextVar[Mapping[str, Rule] | None] = contextvars.ContextVar(
    "xllava_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules: Mapping[str, Rule] | None = None) -> Iterator[None]:
    """While tracing inside this context (and a `jax.set_mesh` mesh), `shard` constrains activations
    by `rules` (default: DEFAULT_RULES). Outside it `shard` is the identity, so single-device
    inference and tests trace no constraint."""
    token = _ACTIVATION_RULES.set(DEFAULT_RULES if rules is None else rules)
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def activation_spec(axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec `shard` would give an activation, or None when no rules or mesh are set."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return None
    return logical_to_spec(axes, shape, mesh.shape, rules)


def shard(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` (one logical name per dimension) to the rules' layout; the identity
    outside `activation_rules` or without a mesh."""
    spec = activation_spec(axes, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
