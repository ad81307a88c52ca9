"""`xllava train --compile-only [--topology v5p-32]`: compile the real train step of any stage config for
a TPU topology (or the local / fake devices) on this host, and say whether it fits before anyone pays
for the chips: per-chip memory against the chip's HBM, an analytic estimate of what it should need,
model FLOPs, the collectives, the compile time. No weights are read or initialised: the state is
abstract (shapes and shardings).

TPU topologies come from libtpu (`pip install -e ".[tpu]"`); user names map onto topology strings as
Cloud TPU names slices: v5p-N and v4-N count TensorCores (two per chip, N/2 chips, 3-D tori), v5e-N
and v6e-N count chips (2-D). `TOPOLOGY_SHAPES` holds the chip grids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xllava_jax import sharding
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.train.flops import model_flops_per_step
from xllava_jax.train.setup import check_batch, make_mesh, prepare
from xllava_jax.train.stage_config import Stage, StageConfig

GIB = 1024**3
# family: (libtpu topology prefix, chip config, TensorCores per device name unit, grid dims, HBM GiB per chip as
# the TPU compiler reports it)
FAMILIES = {
    "v5p": ("v5", "megacore", 2, 3, 95.74),
    "v4": ("v4", "megacore", 2, 3, 30.75),
    "v5e": ("v5e", "default", 1, 2, 15.75),
    "v6e": ("v6e", "default", 1, 2, 31.25),
}
TOPOLOGY_SHAPES = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
        1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its user name, libtpu topology string, chip config, chip count and HBM per chip."""

    name: str
    topology: str
    chip_config: str
    chips: int
    hbm_gib: float


def parse_topology(name: str) -> Topology:
    """`v5p-32`, `v5e-64`, `v4-32`, `v6e-16` (or a libtpu string such as `v5:2x2x4`) -> Topology."""
    m = re.fullmatch(r"(v5p|v4|v5e|v6e)-(\d+)", name)
    if m:
        prefix, chip_config, per_chip, dims, hbm = FAMILIES[m[1]]
        units = int(m[2])
        chips = units // per_chip
        shape = TOPOLOGY_SHAPES[dims].get(chips) if units % per_chip == 0 else None
        if shape is None:
            known = ", ".join(f"{m[1]}-{c * per_chip}" for c in TOPOLOGY_SHAPES[dims])
            raise ConfigError(f"`topology` {name}: not a slice size of {m[1]} (known: {known})")
        return Topology(name, f"{prefix}:{shape}", chip_config, chips, hbm)
    m = re.fullmatch(r"(v5|v4|v5e|v6e):(\d+(?:x\d+)+)", name)
    if m:
        family = {"v5": "v5p"}.get(m[1], m[1])
        prefix, chip_config, _, _, hbm = FAMILIES[family]
        return Topology(name, name, chip_config, math.prod(int(d) for d in m[2].split("x")), hbm)
    raise ConfigError(f"`topology` {name!r}: expected a slice name such as v5p-32, v5e-64, v4-32, v6e-16 "
                      "(or a libtpu topology such as v5:2x2x4)")


def topology_devices(topo: Topology) -> list:
    """The devices of a TPU topology description (no TPU needed: libtpu describes it on any host)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes describing topologies too
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(topology_name=topo.topology, platform="tpu",
                                            chip_config_name=topo.chip_config)
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing the name: one line for the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(f"`topology` {topo.name}: cannot describe {topo.topology} ({reason}); TPU topologies need "
                          'libtpu: pip install -e ".[tpu]"') from None
    return list(desc.devices)


def abstract_batch(config: StageConfig, cfg: ModelConfig, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of the stage as ShapeDtypeStructs split over the batch axes: packed text rows
    for llm_pretrain, the VIF pipeline's rows (packed or not, data/pipeline.py: batch_shapes) else."""
    b, s = config.train.batch_size, config.data.max_len
    if config.stage == Stage.LLM_PRETRAIN:
        shapes = {k: ((b, s), np.int32) for k in ("input_ids", "labels", "segment_ids", "positions")}
    else:
        from xllava_jax.data.pipeline import DataError, batch_shapes
        from xllava_jax.train.data import vif_spec

        try:
            shapes = batch_shapes(vif_spec(config.data, cfg, config.tokenizer or config.init), b)
        except DataError as e:
            raise ConfigError(str(e)) from None
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def per_chip_bytes(tree) -> int:
    """Bytes one device holds of the arrays of `tree` (ShapeDtypeStructs with NamedShardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * _itemsize(leaf.dtype)
    return total


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a typed PRNG key (LoRA dropout streams): two uint32 words
        return 8


def estimate_bytes(config: StageConfig, cfg: ModelConfig, run, mesh, images_per_row: int = 1) -> dict[str, float]:
    """What the step should need per chip: the state (params, optimizer, frozen) as sharded, the
    gradients, the activations remat keeps, one layer's working set in the backward (its weights
    gathered in the compute dtype), and the frozen vision tower's forward."""
    t, v = cfg.text, cfg.vision
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = config.train.batch_size // ways // config.train.grad_accum
    s, d, f, n = config.data.max_len, t.hidden_size, t.intermediate_size, t.num_heads
    tensor = mesh.shape["tensor"]
    act = jnp.dtype(cfg.dtype).itemsize
    state = per_chip_bytes(run.state) + per_chip_bytes(run.frozen)
    grads = per_chip_bytes(run.state["params"]) * (2 if config.train.grad_accum > 1 else 1)
    per_token_saved = {"full": d, "dots": 5 * d + 3 * f // tensor, "none": 12 * d + 4 * f // tensor}[cfg.remat]
    saved = t.num_layers * rows * s * per_token_saved * act
    working = rows * s * (8 * d + 4 * f // tensor) * act * 2
    if cfg.attention not in ("splash", "cpu_blocked"):
        working += rows * (n // tensor) * s * s * 4 * 2
    layer_params = 4 * d * d + 3 * d * f
    gathered = 2 * layer_params * act // tensor
    logits = 0 if config.train.loss_chunk else rows * s * t.vocab_size * 4 * 2 // tensor
    if config.train.loss_chunk and ways > 1 and any(p in run.parts for p in ("llm", "embeddings")):
        logits = d * t.vocab_size * 4  # the fused loss's lm_head gradient, summed per batch shard (models/loss.py)
    vision = 0
    if v is not None and config.stage != Stage.LLM_PRETRAIN:
        tokens = rows * images_per_row * (v.num_patches + 1)
        features = rows * images_per_row * cfg.num_image_tokens * d * act * 2
        vision = tokens * (6 * v.hidden_size + 2 * v.intermediate_size) * act + features
    parts = {"state": state, "gradients": grads, "saved activations": saved, "layer working set": working,
             "gathered layer weights": gathered, "logits / lm_head gradient": logits, "vision forward": vision}
    return {k: float(x) for k, x in parts.items()}


def collectives(hlo: str, batch_dims: tuple[int, int] | None = None) -> dict[str, dict[str, int]]:
    """Per collective kind in an optimised HLO module: how many, the largest operand or result, and
    how many carry a whole-batch activation (a shape holding the global batch and length `batch_dims`
    side by side, or their product)."""
    found: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "largest_bytes": 0, "full_batch": 0})
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or "=" not in line:
            continue
        shapes = [(tuple(int(x) for x in dims.split(",") if x), _BYTES[dt]) for dt, dims in _SHAPE.findall(line)]
        entry = found[m[1]]
        entry["count"] += 1
        entry["largest_bytes"] = max(entry["largest_bytes"], max((math.prod(s) * n for s, n in shapes), default=0))
        if batch_dims and any(_holds_batch(s, batch_dims) for s, _ in shapes):
            entry["full_batch"] += 1
    return dict(found)


def _holds_batch(shape: tuple[int, ...], batch_dims: tuple[int, int]) -> bool:
    """Whether `shape` is a whole batch of token features: the global batch and length side by side
    (or flattened) followed by a feature dimension (ids and masks of [B, S] are not activations)."""
    b, s = batch_dims
    for i, size in enumerate(shape):
        rest = shape[i + 2:] if shape[i:i + 2] == (b, s) else shape[i + 1:] if size == b * s else None
        if rest and math.prod(rest) >= 64:
            return True
    return False


def _exhausted(message: str) -> float | None:
    """GiB the compiler said the program needs, from its out-of-memory error."""
    units = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM", message) or re.search(
        r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message)
    return float(m[1]) * units[m[2]] if m else None


def compile_only(config: ml_collections.ConfigDict, topology: str | None = None, log=print) -> dict:
    """Compile the stage's train step of `config` for `topology` (None: the local devices) and report;
    returns the report (its `fits` says whether the program fits the chip's memory)."""
    config = StageConfig.from_config_dict(config)
    topo = parse_topology(topology) if topology else None
    devices = topology_devices(topo) if topo else jax.devices()
    if topo:
        hbm = topo.hbm_gib
    else:
        hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / len(devices)
    mesh = make_mesh(config.mesh, devices)
    check_batch(config, mesh)
    where = topo.name if topo else f"{len(devices)} local {devices[0].platform} devices"
    start = time.perf_counter()
    run = prepare(config, mesh, abstract=True)
    batch = abstract_batch(config, run.model_cfg, mesh, run.rules)
    log(f"compiling {config.stage} {config.model.preset} (attention {run.model_cfg.attention}, scan "
        f"{run.model_cfg.scan_layers}, remat {run.model_cfg.remat}) for {where}, mesh {dict(mesh.shape)} ...")
    slots = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
    estimate = estimate_bytes(config, run.model_cfg, run, mesh, slots)
    report = {"topology": topo.name if topo else None, "devices": len(devices), "mesh": dict(mesh.shape),
              "hbm_gib": round(hbm, 2), "estimate_gib": round(sum(estimate.values()) / GIB, 2)}
    try:
        with jax.set_mesh(mesh), sharding.activation_rules(run.rules):
            lowered = run.step_fn.lower(run.state, run.frozen, batch)
            report["lower_s"] = round(time.perf_counter() - start, 1)
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory error is a result, not a crash
        needed = _exhausted(str(e))
        if needed is None:
            raise
        report.update(fits=False, per_chip_gib=round(needed, 2), compile_s=round(time.perf_counter() - start, 1),
                      largest_collective_bytes=None, error=str(e).splitlines()[0][:300])
        log(f"does not fit: the compiler needs {needed:.2f} GiB per chip of {hbm:.2f}")
        return report
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    parts = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes - mem.alias_size_in_bytes,
             "temporaries": mem.temp_size_in_bytes, "code": mem.generated_code_size_in_bytes}
    per_chip = sum(parts.values()) / GIB
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    found = collectives(compiled.as_text(), (config.train.batch_size // config.train.grad_accum, config.data.max_len))
    moved = sum(c["full_batch"] for c in found.values())
    largest = max((c["largest_bytes"] for c in found.values()), default=0)
    trainable_llm = any(p in run.parts for p in ("llm", "lora", "embeddings"))
    model_flops = model_flops_per_step(run.model_cfg, batch, trainable_llm)
    full_batch_activation = config.train.batch_size * config.data.max_len * run.model_cfg.text.hidden_size * \
        jnp.dtype(run.model_cfg.dtype).itemsize
    report.update(fits=per_chip <= hbm, per_chip_gib=round(per_chip, 2), compile_s=round(compile_s, 1),
                  largest_collective_bytes=int(largest), full_batch_collectives=moved)
    log("per chip (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) +
        f" = {per_chip:.2f} of {hbm:.2f} HBM -> {'fits' if per_chip <= hbm else 'DOES NOT FIT'}")
    log("estimate (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in estimate.items() if v) +
        f" = {report['estimate_gib']:.2f} (compiled / estimate {per_chip / max(report['estimate_gib'], 1e-9):.2f})")
    log(f"model FLOPs per step {model_flops / 1e12:.1f} T ({model_flops / len(devices) / 1e12:.2f} T per chip); "
        f"compiler's cost analysis (loop bodies counted once): {cost.get('flops', 0) / 1e12:.2f} T FLOPs, "
        f"{cost.get('bytes accessed', 0) / GIB:.1f} GiB accessed per chip")
    for kind, c in sorted(found.items()):
        log(f"  {kind}: {c['count']} ops, largest {c['largest_bytes'] / 2**20:.1f} MiB, {c['full_batch']} on a "
            "whole-batch activation")
    log(f"largest collective {largest / 2**20:.1f} MiB (a whole-batch activation [B, S, D] is "
        f"{full_batch_activation / 2**20:.1f} MiB); collectives moving a whole-batch activation: {moved}")
    log(f"compiled in {compile_s:.1f} s (traced and lowered in {report['lower_s']:.1f} s)")
    report.update(model_tflops=round(model_flops / 1e12, 2), collectives=found,
                  full_batch_activation_bytes=int(full_batch_activation),
                  memory={k: round(v / GIB, 3) for k, v in parts.items()},
                  estimate={k: round(v / GIB, 3) for k, v in estimate.items()})
    return report


def report_line(report: dict) -> str:
    """The last line the command prints: the JSON keys that outside checks read first."""
    keys = ("fits", "per_chip_gib", "hbm_gib", "estimate_gib", "compile_s", "largest_collective_bytes")
    return json.dumps({**{k: report.get(k) for k in keys}, **{k: v for k, v in report.items() if k not in keys}})
