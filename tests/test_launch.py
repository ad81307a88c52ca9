"""The launchers and the Makefile's install paths: each launcher's `--dry-run` prints the exact commands it
would run (parsed back here word by word, as a shell would), SLURM's output file needs no directory made by
the job, and `make` picks a Python >= 3.11 and installs GPU / TPU environments from setup.py's extras."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
# Train arguments with a space and a quote in them: they must reach `xllava train` as the same words.
TRAIN_ARGS = ["--config", "configs/vif.py:xllava_13b", "--workdir", "runs/a b", "--config.data.corpus=it's.json"]


def launcher(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLLAVA", "XLA_", "JAX_", "DRY_RUN"))}
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def test_launch_scripts_parse():
    for script in [*sorted(LAUNCH.glob("*.sh")), LAUNCH / "slurm_gpu.sbatch"]:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_local_dry_run_prints_each_process(tmp_path):
    workdir = tmp_path / "mp"
    args = ["--config", "configs/vif.py:demo", "--workdir", str(workdir), "--config.data.corpus=it's a.json"]
    cmds = commands(launcher("local_multiprocess.sh", "-n", "3", "-d", "2", "-p", "12345", "--dry-run", "--", *args))
    assert cmds[0] == ["mkdir", "-p", str(workdir)]
    procs = cmds[1:]
    assert len(procs) == 3
    for i, cmd in enumerate(procs):
        assert cmd == ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu",
                       str(ROOT / ".venv" / "bin" / "xllava"), "train", *args, "--coordinator", "127.0.0.1:12345",
                       "--num-processes", "3", "--process-id", str(i),
                       ">", str(workdir / f"process_{i}.log"), "2>&1", "&"], cmd
    assert not workdir.exists()  # a dry run runs nothing


def test_local_dry_run_keeps_the_users_xla_flags(tmp_path):
    cmds = commands(launcher("local_multiprocess.sh", "-n", "1", "--dry-run", "--", "--workdir", str(tmp_path / "w"),
                             env={"XLA_FLAGS": "--xla_dump_to=/tmp/d", "XLLAVA": "/opt/x/bin/xllava"}))
    assert cmds[1][:4] == ["env", "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4",
                           "JAX_PLATFORMS=cpu", "/opt/x/bin/xllava"]


def test_local_runs_what_its_dry_run_prints(tmp_path):
    fake = tmp_path / "xllava"  # stands in for the real executable: writes its environment and arguments
    fake.write_text('#!/bin/sh\necho "XLA_FLAGS=$XLA_FLAGS"\necho "JAX_PLATFORMS=$JAX_PLATFORMS"\n'
                    'for a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    args = ["--workdir", str(tmp_path / "w"), "--config.data.corpus=it's a.json"]
    env = {"XLLAVA": str(fake)}
    printed = commands(launcher("local_multiprocess.sh", "-n", "2", "--dry-run", "--", *args, env=env))[1:]
    ran = launcher("local_multiprocess.sh", "-n", "2", "--", *args, env=env)
    assert ran.returncode == 0, ran.stderr
    for i, cmd in enumerate(printed):
        log = (tmp_path / "w" / f"process_{i}.log").read_text().splitlines()
        assert log == [*cmd[1:3], *cmd[4:-4]]  # env, executable, ARGS..., '>', LOG, '2>&1', '&'


def _gcloud(verb: str, *rest: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest]


def test_tpu_dry_run_with_setup_prints_copy_install_train_collect():
    cmds = commands(launcher("tpu_pod.sh", "my-v5p", "us-east5-a", "--project", "proj", "--setup", "--dry-run",
                             "--", *TRAIN_ARGS))
    where = ["--zone", "us-east5-a", "--project", "proj", "--worker=all"]
    assert len(cmds) == 6, cmds
    assert cmds[0] == _gcloud("ssh", "my-v5p", *where, "--command", "mkdir -p ~/xllava_jax")
    sources = [str(ROOT / name) for name in ("setup.py", "Makefile", "xllava_jax", "configs", "launch")]
    assert cmds[1] == _gcloud("scp", "--recurse", *sources, "my-v5p:~/xllava_jax/", *where)
    assert cmds[2] == _gcloud("ssh", "my-v5p", *where, "--command", "cd ~/xllava_jax && make install-tpu")
    train = cmds[3]
    assert train[:-1] == _gcloud("ssh", "my-v5p", *where, "--command")
    # What every worker runs, read back as its shell reads it: the train arguments arrive unchanged.
    assert shlex.split(train[-1]) == ["cd", "~/xllava_jax", "&&", "mkdir", "-p", "logs", "&&",
                                      ".venv-tpu/bin/xllava", "train", *TRAIN_ARGS,
                                      ">", "logs/worker_$(hostname).log", "2>&1"]
    assert cmds[4] == ["mkdir", "-p", "logs/my-v5p"]
    assert cmds[5] == _gcloud("scp", "my-v5p:~/xllava_jax/logs/*", "logs/my-v5p/", *where)
    assert not (ROOT / "logs" / "my-v5p").exists()


def test_tpu_dry_run_without_setup_only_trains_and_collects():
    cmds = commands(launcher("tpu_pod.sh", "t1", "europe-west4-b", "--dry-run", "--", "--workdir", "gs://b/r"))
    assert [c[4] for c in cmds if c[0] == "gcloud"] == ["ssh", "scp"]
    assert cmds[0][5:9] == ["t1", "--zone", "europe-west4-b", "--worker=all"]
    assert "make install" not in " ".join(cmds[0])


def test_slurm_output_file_needs_no_directory():
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    output = re.search(r"^#SBATCH --output=(\S+)", header, re.M).group(1)
    assert "/" not in output, output  # SLURM opens it before the script runs: in the submit directory
    # jax.distributed under SLURM gives task i the i-th GPU it sees, so every task must see all of its node's GPUs.
    assert "--gpus-per-task" not in header and re.search(r"^#SBATCH --gpus-per-node=", header, re.M)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run_installs_the_gpu_venv_and_sruns_it(how):
    env = {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}
    args = ["--dry-run", *TRAIN_ARGS] if how == "flag" else TRAIN_ARGS
    cmds = commands(launcher("slurm_gpu.sbatch", *args, env={**env, **({"DRY_RUN": "1"} if how == "env" else {})}))
    assert cmds == [
        ["make", "-C", str(ROOT), "install-gpu"],
        ["srun", "--kill-on-bad-exit=1", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92", "JAX_PLATFORMS=cuda",
         str(ROOT / ".venv-gpu" / "bin" / "xllava"), "train", *TRAIN_ARGS],
    ]


def test_slurm_outside_a_job_says_so_in_one_line():
    proc = launcher("slurm_gpu.sbatch", *TRAIN_ARGS)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "sbatch" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------ the Makefile
MAKE = shutil.which("make") or "make"  # absolute: the tests run it with a PATH of their own


def _fake_path(tmp_path: Path, pythons: dict[str, str]) -> str:
    """A PATH holding only the given interpreters: name -> 'real' (this Python) or 'old' (a Python 3.10)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, kind in pythons.items():
        exe = bin_dir / name
        if kind == "real":
            exe.symlink_to(sys.executable)
        else:
            exe.write_text("#!/bin/sh\necho 'AssertionError: Python 3.10' >&2\nexit 1\n")
            exe.chmod(0o755)
    return str(bin_dir)


def _make_n(tmp_path: Path, path: str, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "-n", "-C", str(ROOT), f"VENV={tmp_path}/v", f"GPU_VENV={tmp_path}/g",
                           f"TPU_VENV={tmp_path}/t", *targets], env={"PATH": path, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)


def test_make_picks_any_python_from_3_11(tmp_path):
    proc = _make_n(tmp_path, _fake_path(tmp_path, {"python3": "old", "python3.12": "real"}), f"{tmp_path}/v/bin/python")
    assert proc.returncode == 0, proc.stderr
    assert f"python3.12 -m venv {tmp_path}/v" in proc.stdout, proc.stdout


def test_make_without_python_3_11_says_so(tmp_path):
    proc = _make_n(tmp_path, _fake_path(tmp_path, {"python3": "old"}), f"{tmp_path}/v/bin/python")
    assert proc.returncode != 0 and "Python >= 3.11" in proc.stderr, proc.stderr


def test_make_install_gpu_and_tpu_use_their_extras_in_their_own_venvs(tmp_path):
    path = _fake_path(tmp_path, {"python3": "real"})
    gpu = _make_n(tmp_path, path, "install-gpu")
    assert gpu.returncode == 0, gpu.stderr
    assert f"python3 -m venv {tmp_path}/g" in gpu.stdout and f'{tmp_path}/g/bin/pip install' in gpu.stdout
    assert '-e ".[cuda]"' in gpu.stdout and f"{tmp_path}/v" not in gpu.stdout
    tpu = _make_n(tmp_path, path, "install-tpu")
    assert tpu.returncode == 0, tpu.stderr
    assert f'{tmp_path}/t/bin/pip install' in tpu.stdout and '-e ".[tpu]"' in tpu.stdout
