"""A run's checkpoints: every `checkpoint.every` steps the train state, the data iterator's position and
the loop's counters (orbax, WORKDIR/checkpoints; a rerun resumes from the latest), and at the end the
params-only checkpoint that the other commands read, written atomically."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from xllava_jax import checkpoint as ckpt
from xllava_jax.train.errors import TrainingError
from xllava_jax.train.stage_config import CheckpointSettings, StageConfig

if TYPE_CHECKING:
    from xllava_jax.train.loop import LoopState
    from xllava_jax.train.setup import TrainSetup

log = logging.getLogger("xllava.train")


class Checkpoints:
    """The train-state checkpoints of a workdir, one per saved step: state, data iterator, counters."""

    def __init__(self, workdir: Path, settings: CheckpointSettings):
        self.directory = workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=settings.keep, create=True,
                                               enable_async_checkpointing=settings.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        """Until the saves started (in the background) are complete."""
        self.manager.wait_until_finished()

    def save(self, loop: LoopState) -> None:
        counters = {"skipped_records": loop.skipped_records, "nonfinite_steps_skipped": loop.nonfinite_steps_skipped}
        self.manager.save(loop.step, args=ocp.args.Composite(state=ocp.args.StandardSave(loop.state),
                                                             data=grain.checkpoint.CheckpointSave(loop.data),
                                                             counters=ocp.args.JsonSave(counters)))

    def resume(self, loop: LoopState) -> LoopState:
        """`loop` as the latest checkpoint left it (unchanged when there is none); a checkpoint that does not fit
        this run or cannot be read ends in one line naming its directory (nothing is deleted)."""
        step = self.latest_step()
        if step is None:
            return loop
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), loop.state)
        where = self.directory / str(step)
        earlier = [s for s in self.manager.all_steps() if s < step]
        hint = (f"; move it out of {self.directory} to resume from step {max(earlier)} instead" if earlier
                else "; move it away (or use a new `workdir`) to start afresh")
        with ckpt.restore_errors(TrainingError, f"{where}: this checkpoint does not fit the run's config",
                                 f"{where}: cannot restore this checkpoint, it is damaged or incomplete", hint,
                                 stored=where):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(loop.data),
                counters=ocp.args.JsonRestore()))
        counters = restored["counters"]
        log.info("resumed from step %d", step)
        return dataclasses.replace(loop, state=restored["state"], data=restored["data"], step=step,
                                   skipped_records=counters["skipped_records"],
                                   nonfinite_steps_skipped=counters["nonfinite_steps_skipped"])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def export_final(config: StageConfig, run: TrainSetup, state: dict, out: Path) -> None:
    """Write the final params-only checkpoint atomically: into `OUT.partial` (a leftover of a killed
    export is removed first), then renamed to OUT by process 0 once every process has written its
    part. A run killed at any moment of the export redoes it on the rerun."""
    final = nnx.merge(run.graphdef, state["params"], run.frozen, state["other"])
    if config.lora.r > 0:
        from xllava_jax.models.lora import strip_lora

        final = strip_lora(final)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise TrainingError(f"{out}: exists and is not a checkpoint; move it, or set `output` to a new directory, "
                            "and rerun to write the final checkpoint")
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier("xllava_export_start")
    tok = Path(config.tokenizer_path())
    prompt = {"template": config.data.template.value, "mode": config.data.mode, "system": config.data.system_prompt}
    ckpt.save_checkpoint(partial, final, tokenizer_dir=tok.parent if tok.is_file() else tok, prompt=prompt)
    _barrier("xllava_export_written")
    if jax.process_index() == 0:
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    _barrier("xllava_export_done")
