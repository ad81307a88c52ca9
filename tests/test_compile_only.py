"""`xllava train --compile-only [--topology ...]`: the real step compiled for a TPU topology described
by libtpu (installed by the test extra's `tpu` part) and for the local fake CPU devices, with the
report's last line; abstract preparation of a model far bigger than this host's memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from xllava_jax.cli import main as cli
from xllava_jax.config import ConfigError
from xllava_jax.train.compile_only import collectives, parse_topology, topology_devices

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("fits", "per_chip_gib", "hbm_gib", "estimate_gib", "compile_s", "largest_collective_bytes")


def run(capsys, *args: str) -> tuple[int, dict, str]:
    code = cli(["train", *args, "--compile-only"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]), "\n".join(out[:-1])


def test_topology_names_map_to_libtpu_strings():
    assert parse_topology("v5p-32") == parse_topology("v5p-32")
    t = parse_topology("v5p-32")
    assert (t.topology, t.chip_config, t.chips, t.hbm_gib) == ("v5:2x2x4", "megacore", 16, 95.74)
    assert parse_topology("v5e-64").topology == "v5e:8x8" and parse_topology("v5e-64").chips == 64
    assert parse_topology("v4-32").topology == "v4:2x2x4" and parse_topology("v4-32").chips == 16
    assert parse_topology("v6e-16").topology == "v6e:4x4"
    assert parse_topology("v5:2x2x1").chips == 4
    with pytest.raises(ConfigError, match="not a slice size of v5p"):
        parse_topology("v5p-12")
    with pytest.raises(ConfigError, match="expected a slice name"):
        parse_topology("tpu-32")


@pytest.mark.parametrize("name,chips", [("v5p-8", 4), ("v5e-4", 4), ("v4-8", 4), ("v6e-4", 4)])
def test_libtpu_describes_each_family_on_this_host(name, chips):
    devices = topology_devices(parse_topology(name))
    assert len(devices) == chips and devices[0].platform == "tpu"


def test_compile_for_a_tpu_topology_reports_and_fits(capsys):
    code, report, text = run(capsys, "--config", f"{ROOT}/configs/vif.py:demo", "--config.model.preset=tiny",
                             "--config.train.batch_size=8", "--config.data.max_len=128", "--config.mesh.data=1",
                             "--config.mesh.fsdp=-1", "--config.model.scan_layers=true", "--topology", "v5e-4")
    assert code == 0, text
    assert list(report)[:len(KEYS)] == list(KEYS)
    assert report["fits"] is True and report["hbm_gib"] == 15.75 and report["devices"] == 4
    assert 0 < report["per_chip_gib"] < 1 and report["estimate_gib"] > 0 and report["compile_s"] > 0
    assert "attention splash" in text and "scan True" in text  # the TPU's kernel, not this host's
    assert report["full_batch_collectives"] == 0 and report["largest_collective_bytes"] > 0


def test_a_step_that_does_not_fit_exits_1(capsys):
    code, report, text = run(capsys, "--config", f"{ROOT}/configs/vif.py:demo", "--config.model.preset=bench_small",
                             "--config.train.batch_size=64", "--config.data.max_len=4096",
                             "--config.train.loss_chunk=0", "--config.model.attention=xla", "--topology", "v5e-4")
    assert code == 1, text
    assert report["fits"] is False and report["per_chip_gib"] > report["hbm_gib"] == 15.75


def test_compile_for_the_local_fake_devices(capsys):
    code, report, text = run(capsys, "--config", f"{ROOT}/configs/llm_pretrain.py:demo", "--config.model.preset=tiny",
                             "--config.train.batch_size=8", "--config.data.max_len=64", "--config.mesh.tensor=2")
    assert code == 0, text
    assert report["topology"] is None and report["devices"] == 8 and report["mesh"]["tensor"] == 2
    assert "cpu_blocked" in text


def test_bad_topology_and_missing_libtpu_are_one_line(capsys, monkeypatch):
    spec = ["--config", f"{ROOT}/configs/vif.py:demo", "--config.model.preset=tiny"]
    assert cli(["train", *spec, "--compile-only", "--topology", "tpu-9"]) == 2
    assert "expected a slice name" in capsys.readouterr().err
    from jax.experimental import topologies

    def no_libtpu(**_):
        raise RuntimeError("Unable to initialize backend 'tpu'")

    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    assert cli(["train", *spec, "--compile-only", "--topology", "v5e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[tpu]"' in err[0]
    assert cli(["train", *spec, "--topology", "v5e-4", "--workdir", "x"]) == 2
    assert "--topology goes with --compile-only" in capsys.readouterr().err


def test_preparing_13b_abstractly_allocates_nothing():
    """The 13B recipe state (about 160 GB of parameters and Adam moments, more than this host's
    memory) prepares as shapes and shardings only."""
    from xllava_jax.train.config import apply_overrides, load_config
    from xllava_jax.train.setup import make_mesh, prepare
    from xllava_jax.train.stage_config import StageConfig

    config = StageConfig.from_config_dict(apply_overrides(load_config(f"{ROOT}/configs/vif.py:xllava_13b"), []))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = prepare(config, make_mesh(config.mesh), abstract=True)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    import jax

    leaves = jax.tree.leaves((run.state, run.frozen))
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    assert total > 150e9 and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.sharding is not None for x in leaves)
    assert grown_mb < 500, grown_mb


def test_collectives_are_read_from_hlo():
    hlo = """
  %all-gather-start.1 = (bf16[4,128,96]{2,1,0}, bf16[64,128,96]{2,1,0}) all-gather-start(bf16[4,128,96] %p)
  %reduce-scatter.2 = f32[8,16]{1,0} reduce-scatter(f32[128,16]{1,0} %g), dimensions={0}
  %all-reduce.3 = f32[] all-reduce(f32[] %x), to_apply=%add
  %all-gather.4 = s32[64,128]{1,0} all-gather(s32[4,128]{1,0} %ids), dimensions={0}
  %fusion = f32[9]{0} fusion(f32[9]{0} %y), kind=kLoop
"""
    found = collectives(hlo, (64, 128))
    assert found == {"all-gather": {"count": 2, "largest_bytes": 64 * 128 * 96 * 2, "full_batch": 1},
                     "reduce-scatter": {"count": 1, "largest_bytes": 128 * 16 * 4, "full_batch": 0},
                     "all-reduce": {"count": 1, "largest_bytes": 4, "full_batch": 0}}


@pytest.mark.parametrize("name,sizes", [("v5e-64", (2, 8, 4)), ("v5p-32", (1, 16, 1)), ("v6e-16", (1, 4, 4))])
def test_meshes_over_topology_devices(name, sizes):
    """A mesh over a slice's devices, laid onto its torus where mesh_utils can and in device order where
    it cannot (v5e-64 as 2 x 8 x 4 is such a shape): every device once."""
    from xllava_jax.sharding import make_mesh

    devices = topology_devices(parse_topology(name))
    mesh = make_mesh(sizes, devices)
    assert tuple(mesh.shape.values()) == sizes
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
