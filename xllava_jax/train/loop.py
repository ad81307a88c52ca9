"""The train loop: steps up to `train.steps`, a metrics row per step (loss, throughput, MFU, each group's
lr), a checkpoint every `checkpoint.every` steps, and on SIGTERM / SIGINT a checkpoint at the step that
every process agrees on, then a stop."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from xllava_jax.train.checkpointing import Checkpoints
from xllava_jax.train.data import global_batch
from xllava_jax.train.errors import Preempted, TrainingError
from xllava_jax.train.flops import matmul_peak_flops, model_flops_per_step
from xllava_jax.train.metrics import MetricsWriter
from xllava_jax.train.setup import TrainSetup
from xllava_jax.train.stage_config import StageConfig

EMPTY_STEPS_LIMIT = 10  # consecutive batches without a supervised token that stop a run


@dataclasses.dataclass
class LoopState:
    """What the loop carries from step to step: all but `rejected` is checkpointed."""

    state: dict                       # the train state (train/step.py)
    data: Iterator                    # this process's batches
    step: int = 0                     # steps done
    skipped_records: int = 0          # records the step skipped (no answer within max_len, ...)
    nonfinite_steps_skipped: int = 0  # with train.skip_nonfinite
    rejected: int = 0                 # records the corpus reader rejected (read again on a resume)


class StopFlag:
    """Set by SIGTERM / SIGINT: the loop saves a checkpoint at the current step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def agreed_signal(local: int | None) -> int | None:
    """The stop signal as every process sees it after a step: the signal any process has received
    (process 0's first), or None. With several processes, one that got SIGTERM must not leave the
    others waiting in the next step's collectives: all of them save the same step and stop."""
    if jax.process_count() == 1:
        return local
    got = np.ravel(multihost_utils.process_allgather(np.int32(local or 0)))
    return next((int(sig) for sig in got if sig), None)


class _Meter:
    """Each step's metrics row, to WORKDIR/metrics.jsonl (every `train.log_every` steps) and the progress bar."""

    def __init__(self, config: StageConfig, run: TrainSetup, workdir: Path, start: int):
        main = jax.process_index() == 0
        self.config, self.run = config, run
        self.trainable_llm = any(p in run.parts for p in ("llm", "lora", "embeddings"))
        # Each group's lr at every step, computed once (an optax schedule called per step costs more
        # eager dispatch than a small model's whole train step).
        self.lrs = {g: np.asarray(s(np.arange(config.train.steps))) for g, s in run.schedules.items()}
        # MFU against what XLA reaches on a plain matmul here, in the compute dtype, over all devices.
        self.peak = matmul_peak_flops(config.model.dtype) * jax.device_count()
        self.writer = MetricsWriter(workdir, start, enabled=main)
        self.bar = tqdm(total=config.train.steps, initial=start, disable=not main, unit="step", desc=config.stage)

    def record(self, loop: LoopState, batch: dict, m: dict, elapsed: float) -> None:
        tokens = int(np.prod(batch["input_ids"].shape))
        useful = int(m["useful_tokens"])  # tokens that are not padding (packing raises it, not tokens_per_s)
        flops_per_s = model_flops_per_step(self.run.model_cfg, batch, self.trainable_llm) / elapsed
        row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               "supervised_tokens": int(m["supervised_tokens"]), "tokens_per_s": tokens / elapsed,
               "useful_tokens_per_s": useful / elapsed,
               "tflops": flops_per_s / 1e12, "mfu": flops_per_s / self.peak,
               "step_time_s": elapsed, "skipped_records": loop.rejected + loop.skipped_records,
               "nonfinite_steps_skipped": loop.nonfinite_steps_skipped}
        row.update({f"lr_{g}": float(lr[loop.step - 1]) for g, lr in self.lrs.items()})
        if loop.step % self.config.train.log_every == 0 or loop.step == self.config.train.steps:
            self.writer.write(loop.step, row)
        self.bar.update()
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def train_steps(config: StageConfig, run: TrainSetup, mesh, loop: LoopState, checkpoints: Checkpoints,
                workdir: Path) -> None:
    """Steps `loop.step` .. `train.steps`, advancing `loop` in place; metrics go to `workdir`."""
    meter = _Meter(config, run, workdir, loop.step)
    try:
        with StopFlag() as stop:
            empty = 0
            while loop.step < config.train.steps:
                batch = global_batch(next(loop.data), mesh, run.rules)
                t0 = time.perf_counter()
                loop.state, m = run.step_fn(loop.state, run.frozen, batch)
                m = jax.device_get(m)
                elapsed = time.perf_counter() - t0
                loop.step += 1
                empty = _count(config, loop, checkpoints, m, empty)
                meter.record(loop, batch, m, elapsed)
                signalled = agreed_signal(stop.signal)
                if loop.step % config.checkpoint.every == 0 or loop.step == config.train.steps or signalled:
                    checkpoints.save(loop)
                if signalled:
                    checkpoints.wait()
                    raise Preempted(f"stopped by signal {signalled} at step {loop.step}; checkpoint saved in "
                                    f"{checkpoints.directory}, rerun the same command to resume")
    finally:
        # Whatever ends the loop, the checkpoints it started are complete before the process exits.
        checkpoints.wait()
        meter.close()


def _count(config: StageConfig, loop: LoopState, checkpoints: Checkpoints, m: dict, empty: int) -> int:
    """Count the step's skipped records and a skipped non-finite step into `loop`; a non-finite step (unless
    `train.skip_nonfinite`) or the EMPTY_STEPS_LIMIT-th batch in a row without a supervised token stops the run.
    Returns how many batches in a row held no supervised token."""
    if not m["finite"]:
        if not config.train.skip_nonfinite:
            checkpoints.wait()
            raise TrainingError(f"non-finite loss or gradient at step {loop.step} (loss {m['loss']}, grad norm "
                                f"{m['grad_norm']}); stopped, the last good checkpoint is step "
                                f"{checkpoints.latest_step()} in {checkpoints.directory} (set "
                                "`train.skip_nonfinite`=true to skip such steps instead)")
        loop.nonfinite_steps_skipped += 1
    loop.skipped_records += int(m.get("skipped_records", 0))
    empty = empty + 1 if int(m["supervised_tokens"]) == 0 else 0
    if empty == EMPTY_STEPS_LIMIT:
        checkpoints.wait()
        raise TrainingError(f"the last {EMPTY_STEPS_LIMIT} batches held no supervised token (every record "
                            f"skipped or without an answer; {loop.skipped_records} records skipped so far, see "
                            "the warnings); raise `data.max_len` or check `data.corpus`")
    return empty
