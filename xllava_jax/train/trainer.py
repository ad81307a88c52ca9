"""`xllava train`: one stage of the recipe (llm_pretrain, align or vif) on a device mesh.

Rerunning the same command resumes from the workdir's latest checkpoint (params, optimizer state,
step, RNG streams and the data iterator), so a run killed at any point continues exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from xllava_jax import checkpoint as ckpt
from xllava_jax import sharding
from xllava_jax.train.checkpointing import Checkpoints, export_final
from xllava_jax.train.data import make_data
from xllava_jax.train.loop import LoopState, train_steps
from xllava_jax.train.metrics import plot_loss
from xllava_jax.train.setup import check_batch, make_mesh, prepare
from xllava_jax.train.stage_config import StageConfig


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Run (or resume) one stage; returns the params-only checkpoint it writes at the end."""
    settings = StageConfig.from_config_dict(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(settings.mesh)
    check_batch(settings, mesh)
    run = prepare(settings, mesh)
    with jax.set_mesh(mesh), sharding.activation_rules(run.rules):
        data, problems = make_data(settings, run.model_cfg, settings.train.batch_size // jax.process_count())
        checkpoints = Checkpoints(workdir, settings.checkpoint)
        loop = checkpoints.resume(LoopState(run.state, data, rejected=len(problems)))
        train_steps(settings, run, mesh, loop, checkpoints, workdir)
        out = Path(settings.output or workdir / "final").absolute()
        if not (out / ckpt.META_FILE).exists():
            export_final(settings, run, loop.state, out)
        if main:
            plot_loss({settings.stage.value: workdir}, workdir / "loss.png")
            (workdir / "summary.json").write_text(json.dumps(
                {"steps": loop.step, "final_checkpoint": str(out),
                 "skipped_records": loop.rejected + loop.skipped_records,
                 "nonfinite_steps_skipped": loop.nonfinite_steps_skipped}, indent=2))
    return out
