"""`xllava train`: one stage of the recipe (llm_pretrain, align or vif) on a device mesh.

Rerunning the same command resumes from the workdir's latest checkpoint (params, optimizer state,
step, RNG streams and the data iterator), so a run killed at any point continues exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from xllava_jax import checkpoint as ckpt
from xllava_jax import sharding
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.train.flops import matmul_peak_flops, model_flops_per_step
from xllava_jax.train.metrics import MetricsWriter, plot_loss
from xllava_jax.train.setup import TrainSetup, check_batch, make_mesh, prepare, tokenizer_path

log = logging.getLogger("xllava.train")
STAGES = ("llm_pretrain", "align", "vif")


EMPTY_STEPS_LIMIT = 10  # consecutive batches without a supervised token that stop a run


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad setup); the message says why and where."""


class Preempted(TrainingError):
    """SIGTERM / SIGINT arrived: a checkpoint was saved at the current step."""


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def system_prompt(config) -> str | None:
    """`data.system`: "default" (None: the template's own system prompt) or the text to use ("" for none)."""
    value = config.data.system
    return None if value == "default" else value


def vif_spec(config, model_cfg: ModelConfig, tokenizer: str):
    """The align / vif stage's encoding and packing settings (data/pipeline.py: VifSpec)."""
    from xllava_jax.data.pipeline import VifSpec

    return VifSpec(tokenizer=tokenizer, num_image_tokens=model_cfg.num_image_tokens,
                   image_token_id=model_cfg.image_token_id, template=config.data.template, mode=config.data.mode,
                   system=system_prompt(config), image_root=config.data.image_root or None,
                   image_size=model_cfg.vision.image_size, aspect=config.data.aspect, max_len=config.data.max_len,
                   overflow=config.data.overflow, strict=config.data.strict, pack=config.data.pack,
                   images_per_row=config.data.images_per_row, pack_window=config.data.pack_window)


def make_data(config, model_cfg: ModelConfig, local_batch: int):
    """This process's batch iterator for the stage, and the records the reader rejected."""
    from xllava_jax.data.text import text_dataset

    index, count = jax.process_index(), jax.process_count()
    if config.stage == "llm_pretrain":
        specs = _split_list(config.data.text)
        if not specs:
            raise ConfigError("llm_pretrain needs --config.data.text (comma-separated text corpora)")
        weights = [float(w) for w in _split_list(config.data.weights)] or None
        ds = text_dataset(specs, tokenizer_path(config), seq_len=config.data.max_len, weights=weights,
                          seed=config.seed, process_index=index, process_count=count)
        return iter(ds.batch(local_batch, drop_remainder=True)), []
    from xllava_jax.data.pipeline import load_records, vif_dataset

    corpora = _split_list(config.data.corpus)
    if not corpora:
        raise ConfigError(f"{config.stage} needs --config.data.corpus (comma-separated VIF JSON/JSONL files)")
    if model_cfg.vision is None:
        raise ConfigError(f"{config.stage} needs a model with a vision tower; the init checkpoint has none")
    records, problems = load_records(corpora, strict=config.data.strict)
    spec = vif_spec(config, model_cfg, tokenizer_path(config))
    ds = vif_dataset(records, spec, batch_size=local_batch, seed=config.seed, process_index=index,
                     process_count=count, num_workers=config.data.num_workers)
    return iter(ds), problems


def global_batch(local: dict, mesh, rules=None) -> dict[str, jax.Array]:
    """Process-local numpy batches -> global arrays split over the batch axes (data x fsdp by default)."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


class _StopFlag:
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


def _agreed_signal(local: int | None) -> int | None:
    """The stop signal as every process sees it after a step: the signal any process has received
    (process 0's first), or None. With several processes, one that got SIGTERM must not leave the
    others waiting in the next step's collectives: all of them save the same step and stop."""
    if jax.process_count() == 1:
        return local
    got = np.ravel(multihost_utils.process_allgather(np.int32(local or 0)))
    return next((int(sig) for sig in got if sig), None)


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True,
                                           enable_async_checkpointing=config.checkpoint.async_save)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _resume(manager: ocp.CheckpointManager, step: int, state, data):
    """Restore (state, data iterator, counters) from checkpoint `step`; a checkpoint that does not
    fit this run or cannot be read ends in one line naming its directory (nothing is deleted)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    where = Path(manager.directory) / str(step)
    earlier = [s for s in manager.all_steps() if s < step]
    hint = (f"; move it out of {where.parent} to resume from step {max(earlier)} instead" if earlier
            else "; move it away (or use a new --workdir) to start afresh")
    with ckpt.restore_errors(TrainingError, f"{where}: this checkpoint does not fit the run's config",
                             f"{where}: cannot restore this checkpoint, it is damaged or incomplete", hint):
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data),
            counters=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["counters"]


def train(config, workdir: str | Path) -> Path:
    """Run (or resume) one stage; returns the params-only checkpoint it writes at the end."""
    if config.stage not in STAGES:
        raise ConfigError(f"stage {config.stage!r}: choose one of {STAGES}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(config.mesh)
    check_batch(config, mesh)
    run = prepare(config, mesh)
    with jax.set_mesh(mesh), sharding.activation_rules(run.rules):
        state = run.state
        local_batch = config.train.batch_size // jax.process_count()
        data, problems = make_data(config, run.model_cfg, local_batch)
        manager = _checkpoint_manager(workdir, config)
        start, counters = 0, {"skipped_records": 0, "nonfinite_steps_skipped": 0}
        if manager.latest_step() is not None:
            start = manager.latest_step()
            state, data, counters = _resume(manager, start, state, data)
            log.info("resumed from step %d", start)
        metrics_out = MetricsWriter(workdir, start, enabled=main)
        bar = tqdm(total=config.train.steps, initial=start, disable=not main, unit="step", desc=config.stage)
        try:
            with _StopFlag() as stop:
                state, step = _loop(config, run, state, data, mesh, manager, metrics_out, bar, stop, start,
                                    counters, len(problems), workdir)
        finally:
            # Whatever ends the loop, the checkpoints it started are complete before the process exits.
            manager.wait_until_finished()
            bar.close()
            metrics_out.close()
        out = Path(config.output or workdir / "final").absolute()
        if not (out / ckpt.META_FILE).exists():
            _export(config, run, state, out)
        if main:
            plot_loss({config.stage: workdir}, workdir / "loss.png")
            (workdir / "summary.json").write_text(json.dumps(
                {"steps": step, "final_checkpoint": str(out),
                 "skipped_records": len(problems) + counters["skipped_records"],
                 "nonfinite_steps_skipped": counters["nonfinite_steps_skipped"]}, indent=2))
    return out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _export(config, run: TrainSetup, state, out: Path) -> None:
    """Write the final params-only checkpoint atomically: into `OUT.partial` (a leftover of a killed
    export is removed first), then renamed to OUT by process 0 once every process has written its
    part. A run killed at any moment of the export redoes it on the rerun."""
    final = nnx.merge(run.graphdef, state["params"], run.frozen, state["other"])
    if config.lora.r > 0:
        from xllava_jax.models.lora import strip_lora

        final = strip_lora(final)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise TrainingError(f"{out}: exists and is not a checkpoint; move it, or set --config.output to a new "
                            "directory, and rerun to write the final checkpoint")
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier("xllava_export_start")
    tok = Path(tokenizer_path(config))
    prompt = {"template": config.data.template, "mode": config.data.mode, "system": system_prompt(config)}
    ckpt.save_checkpoint(partial, final, tokenizer_dir=tok.parent if tok.is_file() else tok, prompt=prompt)
    _barrier("xllava_export_written")
    if jax.process_index() == 0:
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    _barrier("xllava_export_done")


def _loop(config, run: TrainSetup, state, data, mesh, manager, metrics_out, bar, stop, start: int,
          counters: dict[str, int], rejected: int, workdir: Path):
    """Steps `start` .. `train.steps`; returns (state, last step). `counters` (skipped batch records,
    skipped non-finite steps) are updated in place and checkpointed with the state."""
    trainable_llm = any(p in run.parts for p in ("llm", "lora", "embeddings"))
    # Each group's lr at every step, computed once (an optax schedule called per step costs more
    # eager dispatch than a small model's whole train step).
    lrs = {g: np.asarray(s(np.arange(config.train.steps))) for g, s in run.schedules.items()}
    # MFU against what XLA reaches on a plain matmul here, in the compute dtype, over all devices.
    peak = matmul_peak_flops(config.model.dtype) * jax.device_count()
    step, empty = start, 0
    while step < config.train.steps:
        batch = global_batch(next(data), mesh, run.rules)
        t0 = time.perf_counter()
        state, m = run.step_fn(state, run.frozen, batch)
        m = jax.device_get(m)
        elapsed = time.perf_counter() - t0
        step += 1
        if not m["finite"]:
            if not config.train.skip_nonfinite:
                manager.wait_until_finished()
                raise TrainingError(f"non-finite loss or gradient at step {step} (loss {m['loss']}, grad norm "
                                    f"{m['grad_norm']}); stopped, the last good checkpoint is step "
                                    f"{manager.latest_step()} in {workdir / 'checkpoints'} (set "
                                    "--config.train.skip_nonfinite=true to skip such steps instead)")
            counters["nonfinite_steps_skipped"] += 1
        counters["skipped_records"] += int(m.get("skipped_records", 0))
        empty = empty + 1 if int(m["supervised_tokens"]) == 0 else 0
        if empty == EMPTY_STEPS_LIMIT:
            manager.wait_until_finished()
            raise TrainingError(f"the last {EMPTY_STEPS_LIMIT} batches held no supervised token (every record "
                                f"skipped or without an answer; {counters['skipped_records']} records skipped so "
                                "far, see the warnings); raise data.max_len or check data.corpus")
        tokens = int(np.prod(batch["input_ids"].shape))
        useful = int(m["useful_tokens"])  # tokens that are not padding (packing raises it, not tokens_per_s)
        flops_per_s = model_flops_per_step(run.model_cfg, batch, trainable_llm) / elapsed
        row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               "supervised_tokens": int(m["supervised_tokens"]), "tokens_per_s": tokens / elapsed,
               "useful_tokens_per_s": useful / elapsed,
               "tflops": flops_per_s / 1e12, "mfu": flops_per_s / peak,
               "step_time_s": elapsed, "skipped_records": rejected + counters["skipped_records"],
               "nonfinite_steps_skipped": counters["nonfinite_steps_skipped"]}
        row.update({f"lr_{g}": float(lr[step - 1]) for g, lr in lrs.items()})
        if step % config.train.log_every == 0 or step == config.train.steps:
            metrics_out.write(step, row)
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        signalled = _agreed_signal(stop.signal)
        if step % config.checkpoint.every == 0 or step == config.train.steps or signalled:
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=grain.checkpoint.CheckpointSave(data),
                                                       counters=ocp.args.JsonSave(dict(counters))))
        if signalled:
            manager.wait_until_finished()
            raise Preempted(f"stopped by signal {signalled} at step {step}; checkpoint saved in "
                            f"{workdir / 'checkpoints'}, rerun the same command to resume")
    return state, step
