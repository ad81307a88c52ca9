"""The glibc malloc settings `xllava` applies on CPU-only hosts (xllava_jax/hostmem.py)."""

import json
import os
import subprocess
import sys

import pytest

from xllava_jax import cli
from xllava_jax.hostmem import cpu_only, user_set_malloc

# Runs one jitted function with a 128 MiB output 30 times and prints the median page faults of a run (the first four
# to six runs grow the heap: buffers are freed asynchronously). Without the settings XLA's worker thread maps that
# block fresh every time and the kernel faults in all its 32,768 pages.
FAULTS = """
import json, resource, statistics
from xllava_jax.hostmem import tune_malloc_for_xla_cpu
applied = tune_malloc_for_xla_cpu()
import jax, jax.numpy as jnp
x = jnp.ones((32 * 1024 * 1024,), jnp.float32)
double = jax.jit(lambda v: v * 2.0)
faults = []
for run in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = double(x)
    y.block_until_ready()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_run": statistics.median(faults)}))
"""


def _faults(**env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", **env_changes)
    done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tuned_process_reuses_xla_cpu_blocks_instead_of_faulting_them_in_again():
    tuned = _faults()
    assert tuned["applied"]
    untouched = _faults(MALLOC_ARENA_MAX="8")  # the user's own setting wins: nothing applied
    assert not untouched["applied"]
    assert untouched["faults_per_run"] > 20_000  # the 128 MiB output mapped and faulted in on every run
    assert tuned["faults_per_run"] < untouched["faults_per_run"] / 10


def test_only_cpu_only_processes_without_malloc_settings_are_tuned():
    assert cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
    assert not cpu_only({"JAX_PLATFORMS": "tpu"})
    assert user_set_malloc({"MALLOC_ARENA_MAX": "4"})
    assert user_set_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert user_set_malloc({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert not user_set_malloc({"LD_PRELOAD": "/usr/lib/libfoo.so", "PATH": "/bin"})


@pytest.mark.parametrize("argv,tuned", [(["train"], True), (["demo"], True), (["train", "--compile-only"], False),
                                        (["eval"], False)])
def test_xllava_tunes_malloc_before_running_the_step_commands_alone(monkeypatch, argv, tuned):
    calls = []

    def parser():
        p = cli.argparse.ArgumentParser()
        sub = p.add_subparsers(dest="command")
        for name in ("train", "demo", "eval"):
            command = sub.add_parser(name)
            command.add_argument("--compile-only", action="store_true")
            command.set_defaults(run=lambda args: calls.append("run"))
        return p

    monkeypatch.setattr(cli, "tune_malloc_for_xla_cpu", lambda: calls.append("tune"))
    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(argv) == 0
    assert calls == (["tune", "run"] if tuned else ["run"])


def test_parsing_a_command_line_starts_no_xla_backend():
    # `main` tunes malloc after parsing; that only works while XLA's threads do not exist yet.
    script = ("import jax._src.xla_bridge as xb\nfrom xllava_jax import cli\n"
              "cli.build_parser().parse_args(['train', '--config', 'configs/vif.py:demo', '--workdir', 'w'])\n"
              "cli.build_parser().parse_args(['demo', '--out', 'd'])\nprint(xb.backends_are_initialized())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
