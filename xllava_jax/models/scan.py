"""Scanned (stacked) layers <-> one module per layer, for conversion and checkpoints.

With `ModelConfig.scan_layers` every tower's layers are one module whose parameters have a leading
`layers` axis (`language_model.layers.mlp.up_proj.kernel`: float[L, D, F]); without it each layer has
its own (`language_model.layers.3.mlp.up_proj.kernel`: float[D, F]). Checkpoint layouts (HF's, ours
on disk) name layers one by one; these helpers move between the two forms without gathering a
sharded model onto one host: stacking and slicing run under `jit` with the sources' mesh.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# A per-layer parameter path: (tower prefix, layer index, the rest).
_PER_LAYER = re.compile(r"^(?P<tower>(?:language_model|vision_tower)\.layers)\.(?P<i>\d+)\.(?P<rest>.+)$")
_STACKED = re.compile(r"^(?P<tower>(?:language_model|vision_tower)\.layers)\.(?P<rest>[A-Za-z_].*)$")


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _num_layers(model: nnx.Module, tower: str) -> int:
    cfg = model.cfg
    return cfg.text.num_layers if tower.startswith("language_model") else cfg.vision.num_layers


def stacked_path(path: str) -> tuple[str, int] | None:
    """`language_model.layers.3.mlp.up_proj.kernel` -> (`language_model.layers.mlp.up_proj.kernel`, 3);
    None for a path outside the layers."""
    m = _PER_LAYER.match(path)
    return None if m is None else (f"{m['tower']}.{m['rest']}", int(m["i"]))


class LayerSlice:
    """Layer `index` of a stacked array float[L, ...], taken when read (`np.asarray`), so listing
    every layer of every parameter costs nothing until each is written."""

    def __init__(self, stacked: jax.Array, index: int):
        self.stacked, self.index = stacked, index
        self.shape, self.dtype = tuple(stacked.shape[1:]), stacked.dtype
        self.size = int(np.prod(self.shape))

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(jax.device_get(self.stacked[self.index]))
        return out if dtype is None else out.astype(dtype)


def per_layer_params(model: nnx.Module) -> Iterator[tuple[str, object]]:
    """(dotted per-layer path, array) for every parameter of `model`: a scanned model's stacked
    parameters come out one layer at a time as `LayerSlice`s; anything else as it is."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        dotted, value = _dotted(path), var[...]
        m = _STACKED.match(dotted) if getattr(model.cfg, "scan_layers", False) else None
        if m is None:
            yield dotted, value
            continue
        for i in range(value.shape[0]):
            yield f"{m['tower']}.{i}.{m['rest']}", LayerSlice(value, i)


def _with_layers_axis(sharding, add: bool):
    """The sharding of the stacked (add) or per-layer (not add) form of an array sharded as given."""
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(*((None, *spec) if add else spec[1:])))


def restack(model: nnx.Module, scan: bool) -> nnx.Module:
    """`model` (an XLlava without adapters) with scanned layers (`scan`) or one module per layer.
    Parameters keep their shardings (the stacked axis unsplit); the source's arrays are released
    group by group, so the model must not be used afterwards. The identity when already so."""
    from xllava_jax.models.xllava import XLlava

    if not isinstance(model, XLlava):
        raise TypeError("only a whole XLlava model has scanned layers")
    if model.cfg.scan_layers == scan:
        return model
    cfg = model.cfg.replace(scan_layers=scan)
    graphdef, target = nnx.split(nnx.eval_shape(lambda: XLlava(cfg, rngs=nnx.Rngs(0))))
    source = {_dotted(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    sliced: dict[str, tuple] = {}
    filled = []
    for path, var in nnx.to_flat_state(target):
        dotted = _dotted(path)
        if scan and _STACKED.match(dotted):
            m = _STACKED.match(dotted)
            parts = [source.pop(f"{m['tower']}.{i}.{m['rest']}") for i in range(_num_layers(model, m["tower"]))]
            out = _with_layers_axis(parts[0].sharding, add=True)
            value = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out)(*parts)
            for part in parts:
                part.delete()
        elif not scan and _PER_LAYER.match(dotted):
            key, index = stacked_path(dotted)
            if key not in sliced:
                whole = source.pop(key)
                out = _with_layers_axis(whole.sharding, add=False)
                sliced[key] = jax.jit(lambda x: tuple(x), out_shardings=out)(whole)
                whole.delete()
            value = sliced[key][index]
        else:
            value = source.pop(dotted)
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
