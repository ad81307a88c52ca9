"""Which parameters train, their optimizer groups, and the optimizer (AdamW, warmup + cosine)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax
from flax import nnx

from xllava_jax.config import ConfigError

PARTS = ("vision", "projector", "llm", "embeddings", "lora")


def parse_trainable(spec: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ConfigError(f"`train.trainable` {spec!r}: choose from {', '.join(PARTS)} (comma-separated)")
    return parts


def group_of(path: Sequence, var: nnx.Variable) -> str:
    """The part a parameter belongs to: vision, projector, embeddings, lora or llm."""
    names = [str(p) for p in path]
    if type(var).__name__ == "LoraParam":
        return "lora"
    if names[0] == "vision_tower":
        return "vision"
    if names[0] == "projector":
        return "projector"
    if names[:2] in (["language_model", "embed_tokens"], ["language_model", "lm_head"]):
        return "embeddings"
    return "llm"


def trainable_filter(parts: tuple[str, ...]):
    """An NNX filter selecting the trainable parameters. `llm` includes the embeddings; with LoRA
    the base weights of the projections stay frozen unless `llm` is named too."""
    wanted = set(parts) | ({"embeddings"} if "llm" in parts else set())

    def select(path, var) -> bool:
        return isinstance(var, nnx.Param) and group_of(path, var) in wanted

    return select


def lr_schedule(lr: float, steps: int, warmup_ratio: float, kind: str) -> optax.Schedule:
    warmup = max(1, round(steps * warmup_ratio)) if warmup_ratio > 0 else 0
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if kind != "cosine":
        raise ConfigError(f"`train.schedule` {kind!r}: choose cosine or constant")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.0)


def make_optimizer(train_cfg, trainable_state) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW per group (the projector and the embeddings + lm_head at their own lr when set),
    clipped by global norm. Returns the transformation and the lr schedule of each group present."""
    labels = label_tree(trainable_state)
    present = sorted(set(jax.tree.leaves(labels)))
    schedules, transforms = {}, {}
    for group in present:
        own = {"projector": train_cfg.projector_lr, "embeddings": train_cfg.embeddings_lr}.get(group, -1.0)
        lr = own if own >= 0 else train_cfg.lr
        schedules[group] = lr_schedule(lr, train_cfg.steps, train_cfg.warmup_ratio, train_cfg.schedule)
        transforms[group] = optax.adamw(schedules[group], b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                                        weight_decay=train_cfg.weight_decay)
    tx = optax.multi_transform(transforms, labels)
    if train_cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), tx)
    return tx, schedules


def label_tree(state: nnx.State):
    """A pytree like the pure trainable state whose leaves name each parameter's group."""
    flat = [(path, group_of(path, var)) for path, var in nnx.to_flat_state(state)]
    return nnx.to_pure_dict(nnx.from_flat_state([(p, nnx.Param(g)) for p, g in flat]))
