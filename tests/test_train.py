"""`xllava train`: frozen parts and per-group learning rates, exact resume after SIGKILL / SIGTERM, the
non-finite guard, sharded steps on 8 fake CPU devices, two real processes, LoRA pretraining, and what
a user sees (metrics, TensorBoard, loss plot, help, one-line errors).

One synthetic corpus and tokenizer serve the whole module, and one uninterrupted `vif` run (8 devices,
in a subprocess like a user's) is the reference that the resumed and the two-process runs must match.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from xllava_jax.checkpoint import load_checkpoint
from xllava_jax.cli import main as cli_main
from xllava_jax.config import ModelConfig
from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.data.synthetic import synthesize
from xllava_jax.models.xllava import XLlava
from xllava_jax.sharding import MESH_AXES, activation_rules, logical_to_spec
from xllava_jax.train.config import apply_overrides, load_config
from xllava_jax.train.data import global_batch
from xllava_jax.train.errors import TrainingError
from xllava_jax.train.loop import EMPTY_STEPS_LIMIT
from xllava_jax.train.metrics import read_metrics
from xllava_jax.train.setup import initial_model, make_mesh, model_config, prepare
from xllava_jax.train.stage_config import StageConfig
from xllava_jax.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
VIF, ALIGN, PRETRAIN = (f"{ROOT}/configs/{stage}.py:demo" for stage in ("vif", "align", "llm_pretrain"))
STEPS, EVERY, BATCH = 32, 8, 8          # the reference run: checkpoints at 8, 16, 24, 32
LR, PROJECTOR_LR, EMBEDDINGS_LR, WARMUP = 1e-3, 3e-3, 2e-3, 8  # warmup_ratio 0.25 of 32 steps
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------- helpers
def subprocess_env(devices: int | None = 8, cache: Path | None = None) -> dict[str, str]:
    """The environment of an `xllava train` subprocess: CPU, `devices` fake devices (None: leave it to
    the launcher), and a persistent compilation cache shared by this module's runs (a rerun of the
    same command then skips most compilation, as it would with a cache configured for real runs)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def cli_args(spec: str, overrides: dict[str, object], workdir: Path) -> list[str]:
    """`xllava train` arguments (after `train`)."""
    return ["--config", spec, *(f"--config.{k}={v}" for k, v in overrides.items()), "--workdir", str(workdir)]


def run_cli(spec: str, overrides: dict[str, object], workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xllava_jax.cli", "train", *cli_args(spec, overrides, workdir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def start_cli(spec: str, overrides: dict[str, object], workdir: Path, env: dict[str, str],
              log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "xllava_jax.cli", "train", *cli_args(spec, overrides, workdir)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def in_process_config(spec: str, overrides: dict[str, object]):
    return apply_overrides(load_config(spec), [f"{k}={v}" for k, v in overrides.items()])


def vif_overrides(corpus: dict[str, Path], **changes: object) -> dict[str, object]:
    """The reference `vif` run: short `plain` captions, so a 64-token bucket holds every answer."""
    base = {"model.preset": "tiny", "tokenizer": corpus["tokenizer"],
            "data.corpus": f"{corpus['captions_en']},{corpus['captions_ko']}",
            "data.image_root": corpus["root"], "data.template": "plain", "data.max_len": 64,
            "train.steps": STEPS, "train.batch_size": BATCH, "checkpoint.every": EVERY, "train.lr": LR,
            "train.projector_lr": PROJECTOR_LR, "train.embeddings_lr": EMBEDDINGS_LR,
            "train.warmup_ratio": WARMUP / STEPS, "train.schedule": "cosine"}
    return {**base, **{k.replace("__", "."): v for k, v in changes.items()}}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def finished_checkpoints(workdir: Path) -> list[int]:
    """Steps whose orbax checkpoint is committed (orbax renames its temporary directory when done)."""
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def last_logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    complete = text[: text.rfind("\n") + 1].splitlines()
    return json.loads(complete[-1])["step"] if complete else 0


def checkpoint_tree(step_dir: Path) -> dict:
    """The pytree (of array metadata) of a train-state checkpoint, without reading its arrays."""
    return ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata.tree


def dotted_paths(tree) -> list[str]:
    return [".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def moment_paths(opt_tree) -> list[str]:
    """The parameter paths that Adam's mu / nu of an optimizer-state tree cover."""
    out = []
    for path in dotted_paths(opt_tree):
        for moment in (".mu.", ".nu."):
            if moment in path:
                out.append(path.split(moment, 1)[1])
    return sorted(set(out))


def params_of(model: nnx.Module) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(var[...]) for path, var in flat}


def start_model(config) -> nnx.Module:
    """The model a run of `config` starts from (a random init is a function of the seed)."""
    config = StageConfig.from_config_dict(config)
    mesh = make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        return initial_model(config, model_config(config, list(mesh.devices.flat)), mesh, None)


def assert_same_rows(got: list[dict], want: list[dict], keys=("loss", "grad_norm", "supervised_tokens")) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, f"step {g['step']}"


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """`xllava data synth` output (40 images, 32 px) plus a 600-piece BPE tokenizer trained on its text."""
    root = tmp_path_factory.mktemp("train") / "synth"
    synthesize(root, seed=0, num_images=40, num_heldout=2, image_size=32, text_lines=200)
    spm.SentencePieceTrainer.train(
        input=f"{root / 'text_en.txt'},{root / 'text_ko.txt'}", model_prefix=str(root / "tokenizer"),
        vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return {"root": root, "tokenizer": root / "tokenizer.model", "captions_en": root / "captions_en.json",
            "captions_ko": root / "captions_ko.json", "text_en": root / "text_en.txt", "text_ko": root / "text_ko.txt"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return subprocess_env(cache=tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(corpus, env, tmp_path_factory) -> Path:
    """An uninterrupted `vif` run on 8 devices, as a user starts it; returns its workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = run_cli(VIF, vif_overrides(corpus), workdir, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


# ------------------------------------------------------------------------- 7. what a user sees
def test_metrics_tensorboard_plot_and_final_checkpoint(reference):
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "supervised_tokens", "tokens_per_s", "useful_tokens_per_s", "lr_projector", "lr_llm",
                "lr_embeddings", "grad_norm", "skipped_records", "nonfinite_steps_skipped", "mfu", "tflops"):
        assert all(key in r for r in rows), key
    assert all(math.isfinite(r["loss"]) and r["supervised_tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["useful_tokens_per_s"] <= r["tokens_per_s"] for r in rows)
    assert any(r["useful_tokens_per_s"] < r["tokens_per_s"] for r in rows)  # the padding is not counted
    assert all(0 < r["mfu"] < 2 for r in rows[1:])  # step 1 includes compilation
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["skipped_records"] == 0 and r["nonfinite_steps_skipped"] == 0 for r in rows)
    events = list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(b"loss" in e.read_bytes() and b"lr_projector" in e.read_bytes() for e in events)
    assert (reference / "loss.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == STEPS and Path(summary["final_checkpoint"]) == reference / "final"
    assert (reference / "final" / "xllava.json").is_file() and (reference / "final" / "tokenizer.model").is_file()


def test_train_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "xllava train --config configs/" in out and "--workdir" in out


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "--config.train.stepz: no such key"),
    ("train.steps=many", "--config.train.steps: expected an integer, got 'many'"),
    ("train.skip_nonfinite=maybe", "--config.train.skip_nonfinite: expected true or false"),
    ("train.trainable=wings", "train.trainable 'wings': choose from"),
    ("train.schedule=linear", "train.schedule 'linear': choose cosine or constant"),
    ("mesh.fsdp=3", "needs 6 devices, 8 present"),
    ("model.preset=huge", "unknown model preset 'huge'"),
])
def test_bad_config_is_one_line_and_exit_code_2(override, message, corpus, tmp_path, capsys):
    code = cli_main(["train", "--config", VIF, f"--config.tokenizer={corpus['tokenizer']}", f"--config.{override}",
                     "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("xllava: error: ") and message in err[0], err[0]


def test_coordinator_without_the_other_process_flags_is_one_line(corpus, tmp_path, capsys):
    code = cli_main(["train", "--config", VIF, f"--config.tokenizer={corpus['tokenizer']}", "--workdir", str(tmp_path),
                     "--coordinator", "127.0.0.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["xllava: error: --coordinator needs --num-processes and --process-id"], err


# ------------------------------------------------------- 1. frozen parts, per-group learning rates
def test_learning_rates_per_group_follow_warmup_and_cosine(reference):
    def expected(peak: float, step: int) -> float:
        t = step - 1  # the lr used by step t+1 is the schedule at t
        if t < WARMUP:
            return peak * t / WARMUP
        return peak * 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (STEPS - WARMUP)))

    rows = read_metrics(reference)
    for key, peak in (("lr_projector", PROJECTOR_LR), ("lr_llm", LR), ("lr_embeddings", EMBEDDINGS_LR)):
        want = [expected(peak, r["step"]) for r in rows]
        np.testing.assert_allclose([r[key] for r in rows], want, rtol=1e-5, atol=1e-9 * peak, err_msg=key)
    assert max(r["lr_projector"] for r in rows) == pytest.approx(PROJECTOR_LR)
    assert max(r["lr_llm"] for r in rows) == pytest.approx(LR)
    assert max(r["lr_embeddings"] for r in rows) == pytest.approx(EMBEDDINGS_LR)


def test_vif_keeps_the_vision_tower_frozen(corpus, reference):
    start = params_of(start_model(in_process_config(VIF, vif_overrides(corpus))))
    final = params_of(load_checkpoint(reference / "final")[0])
    assert final.keys() == start.keys()
    for name, before in start.items():
        if name.startswith("vision_tower."):
            assert np.array_equal(final[name], before), f"{name} changed"
        else:
            assert not np.array_equal(final[name], before), f"{name} did not train"
    state = checkpoint_tree(reference / "checkpoints" / str(STEPS))
    trained = sorted(dotted_paths(state["params"]))
    assert moment_paths(state["opt"]) == trained
    assert {p.split(".")[0] for p in trained} == {"projector", "language_model"}


def test_align_trains_only_the_projector(corpus, tmp_path):
    overrides = vif_overrides(corpus, train__steps=3, checkpoint__every=3, train__projector_lr=-1.0)
    config = in_process_config(ALIGN, overrides)
    final_dir = train(config, tmp_path)
    start = params_of(start_model(config))
    final = params_of(load_checkpoint(final_dir)[0])
    for name, before in start.items():
        assert np.array_equal(final[name], before) != name.startswith("projector."), name
    state = checkpoint_tree(tmp_path / "checkpoints" / "3")
    trained = sorted(dotted_paths(state["params"]))
    assert trained == sorted(k for k in start if k.startswith("projector."))
    assert moment_paths(state["opt"]) == trained
    assert {k for k in read_metrics(tmp_path)[0] if k.startswith("lr_")} == {"lr_projector"}


# --------------------------------------------------------------------------- 2. resume exactness
def assert_resumed(before: list[dict], after: list[dict], start: int, end: int) -> None:
    """A rerun resumed from step `start` and ran steps `start + 1 .. end`, each once, as metrics.jsonl (one
    row per step, with that step's wall-clock `step_time_s`) shows: `before` holds its rows before the rerun,
    `after` its rows after. Rows up to `start` are the earlier run's, untouched (a rerun from scratch, or
    from an earlier checkpoint, rewrites them with other timings); rows after it are the rerun's own (an
    earlier run's row for the same step, dropped on resume, had another timing)."""
    assert [r["step"] for r in before[:start]] == list(range(1, start + 1)), "the earlier run's rows are missing"
    assert [r["step"] for r in after] == list(range(1, end + 1))
    assert after[:start] == before[:start], f"rows up to step {start} were rewritten: the rerun did not resume there"
    old = {r["step"]: r["step_time_s"] for r in before}
    rerun = after[start:]
    assert len(rerun) == end - start
    assert all(r["step_time_s"] != old.get(r["step"]) for r in rerun), "a row after the resume step was not rerun"


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, log: Path, timeout: float = 300) -> int:
    """Poll metrics.jsonl until it shows `step` (returns the step it shows)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (last := last_logged_step(workdir)) >= step:
            return last
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
        time.sleep(0.002)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture
def processes():
    """Subprocesses a test starts; any still alive at the end (a failed test) are killed, and so is what is
    left of the process group of one started in its own session (a launcher and the trainers it started)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # only a session leader's pid names a process group
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_matches_an_uninterrupted_run(corpus, reference, env, processes, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    overrides, workdir, log = vif_overrides(corpus), tmp_path / "run", tmp_path / "run.log"

    # SIGKILL at a random step after the first checkpoint is committed (stopped first, so it cannot run on).
    kill_at = rng.randint(EVERY + 1, STEPS - 10)
    proc = start_cli(VIF, overrides, workdir, env, log)
    processes.append(proc)
    wait_for_step(proc, workdir, kill_at, log)
    os.kill(proc.pid, signal.SIGSTOP)
    while not finished_checkpoints(workdir):  # let the async save of step 8 finish
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        assert last_logged_step(workdir) < STEPS - 4, f"seed {seed}: no checkpoint committed before the end"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = last_logged_step(workdir)
    assert finished_checkpoints(workdir) and max(finished_checkpoints(workdir)) <= killed_at
    killed_rows = read_metrics(workdir)

    # The same command resumes; SIGTERM at a random later step saves that step and exits with one line.
    resumed_from = max(finished_checkpoints(workdir))
    assert resumed_from % EVERY == 0 and resumed_from >= EVERY, finished_checkpoints(workdir)
    term_at = rng.randint(killed_at + 1, STEPS - 3)
    proc = start_cli(VIF, overrides, workdir, env, log)
    processes.append(proc)
    wait_for_step(proc, workdir, term_at, log)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    line = last_line(log.read_text())
    assert line.startswith("xllava: stopped by signal 15 at step "), line
    saved = int(line.split(" at step ")[1].split(";")[0])
    assert term_at <= saved < STEPS and saved in finished_checkpoints(workdir), (line, finished_checkpoints(workdir))
    assert "rerun the same command to resume" in line
    print(f"seed {seed}: SIGKILL at step {killed_at} (checkpoint {resumed_from}), SIGTERM saved step {saved}")
    # It resumed from the SIGKILLed run's last checkpoint and ran exactly the steps after it, up to `saved`.
    terminated_rows = read_metrics(workdir)
    assert_resumed(killed_rows, terminated_rows, resumed_from, saved)

    # Once more to the end: it resumes from the SIGTERM checkpoint and runs every later step once, with
    # exactly the reference run's batches and losses.
    proc = start_cli(VIF, overrides, workdir, env, log)
    processes.append(proc)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert_resumed(terminated_rows, read_metrics(workdir), saved, STEPS)
    assert_same_rows(read_metrics(workdir), read_metrics(reference))
    final, ref = params_of(load_checkpoint(workdir / "final")[0]), params_of(load_checkpoint(reference / "final")[0])
    assert all(np.array_equal(final[k], ref[k]) for k in ref), f"seed {seed}: final params differ"


def test_a_damaged_checkpoint_stops_the_resume_with_one_line_and_is_kept(corpus, reference, env, tmp_path):
    """The latest checkpoint cut short (an interrupted copy of a workdir): rerunning names it in one
    line, says which earlier step to resume from, and deletes nothing; orbax's in-flight reads print
    no echoes of the failure."""
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    steps = finished_checkpoints(workdir)
    latest = workdir / "checkpoints" / str(steps[-1])
    data = max((p for p in latest.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])
    proc = run_cli(VIF, vif_overrides(corpus), workdir, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"xllava: error: {latest}: cannot restore this checkpoint, it is damaged or incomplete ("), \
        line
    assert line.endswith(f"; move it out of {latest.parent} to resume from step {steps[-2]} instead"), line
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert finished_checkpoints(workdir) == steps and data.stat().st_size == 1000


# ------------------------------------------------------------------------- 3. non-finite guard
def test_nonfinite_step_stops_with_a_message_then_skip_counts(corpus, env, tmp_path):
    overrides = vif_overrides(corpus, train__steps=4, checkpoint__every=1, train__lr=1e30, train__projector_lr=-1.0,
                              train__warmup_ratio=0.0)
    proc = run_cli(VIF, overrides, tmp_path, env)
    line = last_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line.startswith("xllava: error: non-finite loss or gradient at step 2 "), line
    assert "the last good checkpoint is step 1" in line
    assert finished_checkpoints(tmp_path) == [1]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]

    # The same workdir with skip_nonfinite resumes from step 1 and skips (and counts) every bad step.
    train(in_process_config(VIF, {**overrides, "train.skip_nonfinite": True}), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["nonfinite_steps_skipped"] for r in rows] == [0, 1, 2, 3]
    assert all(r["loss"] is None for r in rows[1:])  # non-finite losses are written as null (strict JSON)
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_steps_skipped"] == 3


def test_a_run_whose_batches_hold_no_answer_stops_with_a_message(corpus, tmp_path):
    """With LLaMA-2's system prompt before the question, max_len 24 cuts every record before its answer:
    each is skipped, and after EMPTY_STEPS_LIMIT empty batches the run stops instead of 'training' on nothing."""
    overrides = vif_overrides(corpus, train__steps=EMPTY_STEPS_LIMIT + 5, data__max_len=24,
                              data__template="llava_llama_2", data__system="default")
    with pytest.raises(TrainingError, match=f"the last {EMPTY_STEPS_LIMIT} batches held no supervised token"):
        train(in_process_config(VIF, overrides), tmp_path)
    assert [r["supervised_tokens"] for r in read_metrics(tmp_path)] == [0] * (EMPTY_STEPS_LIMIT - 1)


# --------------------------------------------------------------------------- 4. sharding (8 devices)
def synthetic_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A VIF-shaped batch: bos, the image placeholders, random text; half the samples padded."""
    rng = np.random.default_rng(seed)
    n_img = cfg.num_image_tokens
    ids = rng.integers(3, cfg.image_token_id, (batch, seq)).astype(np.int32)
    ids[:, 0], ids[:, 1:1 + n_img] = 1, cfg.image_token_id
    mask = np.ones((batch, seq), np.int32)
    mask[::2, seq - 5:] = 0
    labels = np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int32)
    labels[:, : 1 + n_img] = IGNORE_INDEX
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def one_step(config, mesh, batch) -> tuple[float, dict, object]:
    # `prepare` places everything explicitly; outside the mesh context the eager random-init ops
    # compile once for all meshes instead of once per mesh.
    run = prepare(StageConfig.from_config_dict(config), mesh)
    with jax.set_mesh(mesh), activation_rules(run.rules):
        state, metrics = run.step_fn(run.state, run.frozen, global_batch(batch, mesh))
    return float(metrics["loss"]), state, run


def check_sharding(tree: dict, axes: dict[tuple, tuple], mesh) -> None:
    """Every array in `tree` (params, or a mirror of them such as Adam's mu) sits as the table says."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(k.key for k in path)
        spec = logical_to_spec(axes[keys], leaf.shape, mesh)
        assert leaf.sharding.spec == spec, (keys, leaf.sharding.spec, spec)
        want = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(leaf.shape, spec))
        assert all(s.data.shape == want for s in leaf.addressable_shards), (keys, want)
        if leaf.size >= 1024 and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
            assert math.prod(want) < leaf.size, f"{keys} {leaf.shape} is not split on {dict(mesh.shape)}"


def adam_moments(opt_state) -> list[dict]:
    """Adam's state of each optimizer group: (mu, nu) pytrees like the params they cover."""
    return [group.inner_state[0] for group in opt_state[1].inner_states.values()]


def flat_arrays(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str, rel: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        err = np.linalg.norm(got[key] - value) / max(np.linalg.norm(value), 1e-30)
        assert err <= rel, f"{what} {key}: relative error {err:.2e}"


def test_sharded_train_step_matches_one_device():
    """One step on four 8-device meshes against one device: the loss, each gradient (Adam's first
    moment after one step is 0.1 x the gradient) and the updated params as a whole agree to 1e-5
    (each updated array to 1e-4: zero-initialised biases hold nothing but the update), and every
    array sits where the logical table puts it. eps 1e-3 keeps Adam's first step, g / (|g| + eps),
    from turning float noise in near-zero gradients into +-lr sign flips."""
    config = in_process_config(VIF, {"model.preset": "tiny", "train.steps": 10, "train.warmup_ratio": 0.0,
                                     "train.projector_lr": 3e-3, "train.eps": 1e-3})
    cfg = ModelConfig.tiny()
    batch = synthetic_batch(cfg, BATCH, 32)
    one = jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:1])
    ref_loss, ref_state, _ = one_step(config, one, batch)
    ref_params, ref_mu = flat_arrays(ref_state["params"]), [flat_arrays(m.mu) for m in adam_moments(ref_state["opt"])]
    abstract = nnx.eval_shape(lambda: XLlava(cfg, rngs=nnx.Rngs(0)))
    axes = {tuple(path): var.get_metadata()["logical_axes"]
            for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    for sizes in [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)]:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
        mesh = make_mesh(config.mesh)
        loss, state, run = one_step(config, mesh, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5), sizes
        for moments, want_mu in zip(adam_moments(state["opt"]), ref_mu, strict=True):
            assert_close(flat_arrays(moments.mu), want_mu, f"{sizes} gradient")
            check_sharding(moments.mu, axes, mesh)
            check_sharding(moments.nu, axes, mesh)
        params = flat_arrays(state["params"])
        assert_close(params, ref_params, f"{sizes} updated", rel=1e-4)
        diff = math.sqrt(sum(float(np.sum((params[k] - v) ** 2)) for k, v in ref_params.items()))
        assert diff <= 1e-5 * math.sqrt(sum(float(np.sum(v**2)) for v in ref_params.values())), sizes
        check_sharding(state["params"], axes, mesh)
        check_sharding(run.frozen, axes, mesh)
        if sizes == (1, 2, 4):  # the table, spelled out for a few parameters
            layer = state["params"]["language_model"]["layers"][0]
            assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
            assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
            embed = state["params"]["language_model"]["embed_tokens"]["embedding"]
            assert embed.sharding.spec == P("tensor", "fsdp") and embed.addressable_shards[0].data.shape == (64, 32)
            fc1 = run.frozen["vision_tower"]["layers"][0]["mlp"]["fc1"]["kernel"]
            assert fc1.sharding.spec == P("fsdp", "tensor") and fc1.addressable_shards[0].data.shape == (16, 16)


# ---------------------------------------------------------------------- 5. two real processes
@pytest.mark.slow
def test_two_processes_match_one_process(corpus, reference, tmp_path):
    workdir = tmp_path / "mp"
    env = subprocess_env(devices=None)  # the script gives each process its 4 devices
    console = Path(sys.executable).with_name("xllava")
    if console.exists():
        env["XLLAVA"] = str(console)
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "4",
                           "-p", str(port), "--", *cli_args(VIF, vif_overrides(corpus), workdir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(workdir.glob("process_*.log")))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs
    got, want = read_metrics(workdir), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    data_state = workdir / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_state.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]


def _launch_two_processes(corpus, workdir: Path, port: int) -> subprocess.Popen:
    env = subprocess_env(devices=None)
    console = Path(sys.executable).with_name("xllava")
    if console.exists():
        env["XLLAVA"] = str(console)
    return subprocess.Popen(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "4",
                             "-p", str(port), "--", *cli_args(VIF, vif_overrides(corpus), workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: `processes` kills both trainers


def _pid_of(workdir: Path, process_id: int) -> int:
    """The pid of the `xllava train` process with this --process-id working in `workdir`."""
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in args and str(workdir).encode() in args and b"--process-id" in args:
            if args[args.index(b"--process-id") + 1] == str(process_id).encode():
                return int(entry.name)
    raise AssertionError(f"no xllava train process {process_id} for {workdir}")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_then_resumes(corpus, reference, processes, tmp_path):
    workdir = tmp_path / "mp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = _launch_two_processes(corpus, workdir, port)
    processes.append(launcher)
    log = workdir / "process_1.log"
    wait_for_step(launcher, workdir, EVERY + 2, log, timeout=600)
    os.kill(_pid_of(workdir, 1), signal.SIGTERM)          # only process 1 is told to stop
    assert launcher.wait(timeout=300) == 143, "\n".join(p.read_text()[-2000:] for p in workdir.glob("process_*.log"))
    lines = [last_line(p.read_text()) for p in sorted(workdir.glob("process_*.log"))]
    assert len(lines) == 2 and lines[0] == lines[1], lines   # both stopped at the same step, with one line
    assert lines[0].startswith("xllava: stopped by signal 15 at step "), lines
    saved = int(lines[0].split(" at step ")[1].split(";")[0])
    assert EVERY + 2 <= saved < STEPS and saved in finished_checkpoints(workdir), (lines, finished_checkpoints(workdir))

    resumed = _launch_two_processes(corpus, workdir, port)
    processes.append(resumed)
    assert resumed.wait(timeout=600) == 0, "\n".join(p.read_text()[-2000:] for p in workdir.glob("process_*.log"))
    got, want = read_metrics(workdir), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)


# ------------------------------------------------------------------------------ 6. LoRA pretraining
def test_llm_pretrain_with_lora_trains_adapters_and_writes_a_merged_model(corpus, tmp_path):
    overrides = {"model.preset": "tiny", "tokenizer": corpus["tokenizer"],
                 "data.text": f"{corpus['text_en']},{corpus['text_ko']}", "data.max_len": 64, "lora.r": 4,
                 "lora.alpha": 8.0, "train.trainable": "lora,embeddings",
                 "train.steps": 3, "train.batch_size": BATCH, "checkpoint.every": 3, "train.warmup_ratio": 0.0}
    config = in_process_config(PRETRAIN, overrides)
    final_dir = train(config, tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]

    # Only the adapters and the embedding / lm_head rows are in the train state (and its optimizer).
    state = checkpoint_tree(tmp_path / "checkpoints" / "3")
    trained = sorted(dotted_paths(state["params"]))
    assert trained and all(p.endswith(("lora_a", "lora_b")) or p.startswith(("language_model.embed_tokens",
                                                                               "language_model.lm_head"))
                           for p in trained), trained
    assert sum(p.endswith("lora_a") for p in trained) == 7 * 2  # q,k,v,o,gate,up,down x 2 layers
    assert moment_paths(state["opt"]) == trained
    adapters = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")["params"]

    # The final checkpoint is a plain model: base + lora_a @ lora_b * alpha / r, nothing else moved.
    start = start_model(config)
    final = params_of(load_checkpoint(final_dir)[0])
    assert not [k for k in final if "lora" in k or ".base." in k]
    scale = 8.0 / 4
    for i, layer in enumerate(start.language_model.layers):
        for kind, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                base = np.asarray(getattr(getattr(layer, kind), name).base.kernel[...])
                ab = adapters["language_model"]["layers"][str(i)][kind][name]
                delta = np.asarray(ab["lora_a"], np.float64) @ np.asarray(ab["lora_b"], np.float64) * scale
                assert np.abs(delta).max() > 0, f"{name}: lora_b never trained"
                merged = final[f"language_model.layers.{i}.{kind}.{name}.kernel"]
                np.testing.assert_allclose(merged, base + delta, rtol=0, atol=1e-6, err_msg=f"layer {i} {name}")
    start_params = params_of(start)
    for name, value in final.items():
        if name.startswith(("vision_tower.", "projector.")) or "norm" in name:
            assert np.array_equal(value, start_params[name]), f"{name} changed"
    for name in ("language_model.embed_tokens.embedding", "language_model.lm_head.kernel"):
        assert not np.array_equal(final[name], start_params[name]), f"{name} did not train"


def test_an_export_killed_half_way_is_redone_by_the_rerun(corpus, tmp_path, monkeypatch):
    """The final checkpoint is written into FINAL.partial and renamed when complete: a run killed
    after the parameters but before the metadata (the export's last write) leaves no FINAL, and the
    rerun (which resumes at the last step and trains nothing) writes it whole."""
    from xllava_jax import checkpoint as ckpt

    overrides = vif_overrides(corpus, train__steps=2, checkpoint__every=2)
    real_save = ckpt.save_checkpoint

    def killed_after_params(path, model, **kw):
        real_save(path, model, **kw)
        (Path(path) / ckpt.META_FILE).unlink()
        raise KeyboardInterrupt("killed between params/ and xllava.json")

    monkeypatch.setattr(ckpt, "save_checkpoint", killed_after_params)
    with pytest.raises(KeyboardInterrupt):
        train(in_process_config(VIF, overrides), tmp_path)
    assert not (tmp_path / "final").exists() and (tmp_path / "final.partial" / "params").exists()
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    out = train(in_process_config(VIF, overrides), tmp_path)
    assert out == tmp_path / "final" and ckpt.is_checkpoint(out) and not (tmp_path / "final.partial").exists()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    load_checkpoint(out)
