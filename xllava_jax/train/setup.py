"""A run before its first step: the mesh, the model config resolved for the mesh's devices, the train
state built abstractly first (shapes and shardings), then initialised under `jit` straight into its
shards or read shard by shard from `init`, and the jitted step.

No process ever holds a whole model it does not need: a random init runs as one jitted program whose
outputs are the shards; `init` checkpoints are streamed tensor by tensor onto their shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from xllava_jax import sharding
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.models.vision import VisionTower
from xllava_jax.models.xllava import XLlava, resolve_kernels
from xllava_jax.train import optim
from xllava_jax.train.stage_config import MeshSettings, StageConfig
from xllava_jax.train.step import make_train_step


def mesh_rules(config: StageConfig) -> dict[str, sharding.Rule]:
    """The logical rules of the run: DEFAULT_RULES with `mesh.rules` overrides applied."""
    try:
        return sharding.make_rules(dict(config.mesh.rules))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def make_mesh(mesh_cfg: MeshSettings, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """('data', 'fsdp', 'tensor') over `devices` (default: all); one size may be -1 for "the rest"."""
    try:
        return sharding.make_mesh([mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor], devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_batch(config: StageConfig, mesh) -> None:
    """The batch and loss settings fit the mesh and the process count (one line naming the keys)."""
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % (data_ways * config.train.grad_accum) or config.train.batch_size % jax.process_count():
        raise ConfigError(f"`train.batch_size` {config.train.batch_size} must divide by data x fsdp ({data_ways}) x "
                          f"`train.grad_accum` ({config.train.grad_accum}) and by the process count")
    if config.train.loss_chunk < 0:
        raise ConfigError(f"`train.loss_chunk` must be >= 0 (0: unfused loss), got {config.train.loss_chunk}")


def model_config(config: StageConfig, devices: Sequence) -> ModelConfig:
    """The model the run trains, without reading any weights: `init`'s config (our checkpoint's
    metadata or a HF config.json) or the preset (vocabulary from the tokenizer, plus one row for the
    image placeholder), with the run's dtype / remat / scan / attention settings, resolved for
    `devices`."""
    m = config.model
    overrides = {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat, "scan_layers": m.scan_layers,
                 "attention": m.attention}
    try:
        if config.init:
            from xllava_jax.convert.load import init_model_config

            cfg = init_model_config(config.init).replace(**overrides)
        else:
            cfg = ModelConfig.preset(m.preset, **overrides)
            if config.tokenizer:
                from xllava_jax.tokenizer.runtime import Tokenizer

                size = Tokenizer(config.tokenizer).vocab_size
                cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=size + 1), image_token_id=size)
    except ValueError as e:  # ConfigError and the conversion errors
        raise ConfigError(str(e)) from None
    return resolve_kernels(cfg, devices)


def lora_settings(config: StageConfig):
    """The run's LoRA settings (`lora.*`) as a LoraConfig."""
    from xllava_jax.models.lora import LoraConfig

    return LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                      targets=config.lora.targets)


def random_model(cfg: ModelConfig, config: StageConfig) -> XLlava:
    """A random init of `cfg` with the run's LoRA adapters (dropout on): the function that the
    abstract state and the jitted init both trace."""
    model = XLlava(cfg, rngs=nnx.Rngs(config.seed))
    _add_lora(model, config)
    return model


def _add_lora(model: XLlava, config: StageConfig) -> None:
    if config.lora.r > 0:
        from xllava_jax.models.lora import apply_lora

        apply_lora(model, lora_settings(config), rngs=nnx.Rngs(config.seed + 1))
        model.train()  # adapter dropout on (apply_lora leaves it off)


def initial_model(config: StageConfig, cfg: ModelConfig, mesh, rules) -> XLlava:
    """The model the run starts from, every variable on its shard of `mesh`: `init` read shard by
    shard (plus `init_vision`), or a random init computed under `jit` straight into its shards."""
    if not config.init:
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: random_model(cfg, config)))
        shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))
        values = jax.jit(lambda: nnx.to_pure_dict(nnx.split(random_model(cfg, config))[1]),
                         out_shardings=shardings)()
        nnx.replace_by_pure_dict(abstract, values)
        return nnx.merge(graphdef, abstract)
    from xllava_jax.convert.load import load_pretrained

    model = load_pretrained(config.init, mesh=mesh, rules=rules, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            remat=cfg.remat, scan_layers=cfg.scan_layers, attention=cfg.attention,
                            platform=cfg.platform)
    if config.init_vision:
        replace_vision_tower(model, config.init_vision)
    _add_lora(model, config)
    place(model, mesh, rules)
    return model


def replace_vision_tower(model: XLlava, source: str) -> None:
    """Put the vision tower at `source` (a CLIP HF directory or our vision checkpoint) over `model`'s,
    as LLaVA builds its model from an LLM and a separately trained CLIP."""
    from xllava_jax.convert.load import load_pretrained
    from xllava_jax.models.scan import restack

    tower = load_pretrained(source, dtype=model.cfg.dtype, param_dtype=model.cfg.param_dtype)
    if not isinstance(tower, VisionTower):
        raise ConfigError(f"`init_vision` {source}: not a vision tower checkpoint")
    if model.vision_tower is None or tower.cfg != model.cfg.vision:
        raise ConfigError(f"`init_vision` {source}: its vision config {tower.cfg} does not match the model's "
                          f"{model.cfg.vision}")
    if model.cfg.scan_layers:  # a lone tower has one module per layer: stack it through a whole model
        holder = XLlava(model.cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))
        holder.vision_tower = tower
        tower = restack(holder, True).vision_tower
    nnx.update(model.vision_tower, nnx.state(tower))


def place(model: nnx.Module, mesh, rules=None) -> None:
    """Move every variable of `model` onto its shard of `mesh` (in place)."""
    state = nnx.state(model)
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
    nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), shardings))
    nnx.update(model, state)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """A run before its first step: the train state and frozen params (see train/step.py), concrete
    and sharded or, for a compile-only run, ShapeDtypeStructs carrying their shardings; the jitted
    step (donates the state); each optimizer group's lr schedule."""

    model_cfg: ModelConfig
    parts: tuple[str, ...]
    graphdef: nnx.GraphDef
    state: dict
    frozen: dict
    step_fn: Callable
    schedules: dict[str, optax.Schedule]
    rules: dict


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def prepare(config: StageConfig, mesh, *, abstract: bool = False) -> TrainSetup:
    """Resolve the model for the mesh's devices, build the state (abstract first, then concrete
    unless `abstract`), and jit the step with the state's shardings. Call the step inside
    `jax.set_mesh(mesh)` and `sharding.activation_rules(setup.rules)`. The optimizer state exists
    only for the trainable params and is sharded like them."""
    parts = config.train.trainable
    optim.lr_schedule(config.train.lr, config.train.steps, config.train.warmup_ratio, config.train.schedule)  # checks
    rules = mesh_rules(config)
    cfg = model_config(config, list(mesh.devices.flat))
    if abstract:
        model = nnx.eval_shape(lambda: random_model(cfg, config))
    else:
        model = initial_model(config, cfg, mesh, rules)
    graphdef, params, frozen, other = nnx.split(model, optim.trainable_filter(parts), nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise ConfigError(f"`train.trainable`={','.join(parts)!r} selects no parameter of this model")
    tx, schedules = optim.make_optimizer(config.train, params)
    params_sh, frozen_sh, other_sh = (nnx.to_pure_dict(sharding.state_shardings(s, mesh, rules))
                                      for s in (params, frozen, other))
    params, frozen, other = (nnx.to_pure_dict(s) for s in (params, frozen, other))
    opt_sh = sharding.opt_state_shardings(tx, params, params_sh, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    if abstract:
        params, frozen, other = _abstract(params, params_sh), _abstract(frozen, frozen_sh), _abstract(other, other_sh)
        opt_state = _abstract(jax.eval_shape(tx.init, params), opt_sh)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    else:
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = {"params": params, "opt": opt_state, "other": other, "step": step}
    state_sh = {"params": params_sh, "opt": opt_sh, "other": other_sh, "step": replicated}
    batch_axes = sharding.batch_sharding(mesh, rules).spec[0]
    step_fn = jax.jit(make_train_step(graphdef, tx, grad_accum=config.train.grad_accum,
                                      loss_chunk=config.train.loss_chunk, batch_axes=batch_axes),
                      in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
    return TrainSetup(cfg, parts, graphdef, state, frozen, step_fn, schedules, rules)

