"""A stage's batches: packed text rows for llm_pretrain, the VIF pipeline's rows for align / vif, each
process reading its own share, and the global arrays they make over the mesh."""

from __future__ import annotations

import jax
import numpy as np

from xllava_jax import sharding
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.train.stage_config import DataSettings, Stage, StageConfig


def vif_spec(data: DataSettings, model_cfg: ModelConfig, tokenizer: str):
    """The align / vif stage's encoding and packing settings (data/pipeline.py: VifSpec) for `model_cfg`."""
    from xllava_jax.data.pipeline import VifSpec

    return VifSpec(tokenizer=tokenizer, num_image_tokens=model_cfg.num_image_tokens,
                   image_token_id=model_cfg.image_token_id, template=data.template.value, mode=data.mode,
                   system=data.system_prompt, image_root=data.image_root or None,
                   image_size=model_cfg.vision.image_size, aspect=data.aspect, max_len=data.max_len,
                   overflow=data.overflow, strict=data.strict, pack=data.pack,
                   images_per_row=data.images_per_row, pack_window=data.pack_window,
                   image_cache_mb=data.image_cache_mb)


def make_data(config: StageConfig, model_cfg: ModelConfig, local_batch: int):
    """This process's batch iterator for the stage, and the records the reader rejected."""
    from xllava_jax.data.text import text_dataset

    index, count = jax.process_index(), jax.process_count()
    data = config.data
    if config.stage == Stage.LLM_PRETRAIN:
        if not data.text:
            raise ConfigError("`data.text` is empty: llm_pretrain needs text corpora (comma-separated)")
        ds = text_dataset(list(data.text), config.tokenizer_path(), seq_len=data.max_len,
                          weights=list(data.weights) or None, seed=config.seed, process_index=index,
                          process_count=count)
        return iter(ds.batch(local_batch, drop_remainder=True)), []
    from xllava_jax.data.pipeline import load_records, vif_dataset

    if not data.corpus:
        raise ConfigError(f"`data.corpus` is empty: {config.stage} needs VIF JSON/JSONL files (comma-separated)")
    if model_cfg.vision is None:
        raise ConfigError(f"{config.stage} needs a model with a vision tower; the init checkpoint has none")
    records, problems = load_records(list(data.corpus), strict=data.strict)
    spec = vif_spec(data, model_cfg, config.tokenizer_path())
    ds = vif_dataset(records, spec, batch_size=local_batch, seed=config.seed, process_index=index,
                     process_count=count, num_workers=data.num_workers)
    return iter(ds), problems


def global_batch(local: dict, mesh, rules=None) -> dict[str, jax.Array]:
    """Process-local numpy batches -> global arrays split over the batch axes (data x fsdp by default)."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}
