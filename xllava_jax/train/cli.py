"""`xllava train`: one stage from a config file, with `--config.KEY=VALUE` overrides.

`xllava_jax.cli.main` takes the `--config.KEY=VALUE` arguments out of the command line before parsing (argparse
cannot declare a flag per config key) and hands them over as `args.config_overrides` (["KEY=VALUE", ...]).
"""

from __future__ import annotations

import argparse

from xllava_jax.errors import SettingFlags
from xllava_jax.train.stage_config import CONFIG_KEYS

CONFIG_PREFIX = "--config."
EXAMPLES = """examples:
  xllava train --config configs/align.py:demo --config.init=runs/pretrain/final \\
      --config.data.corpus=synth/captions_en.json,synth/captions_ko.json --config.data.image_root=synth \\
      --workdir runs/align
  xllava train --config configs/vif.py:xllava_13b --config.init=runs/align/final --config.train.steps=3000 \\
      --config.mesh.fsdp=8 --workdir runs/vif
  # does the 13B step fit a v5p-32? (TPU topologies need pip install -e ".[tpu]")
  xllava train --config configs/vif.py:xllava_13b --compile-only --topology v5p-32
Rerunning the same command resumes from the workdir's latest checkpoint. --compile-only exits 0 when the step
fits the chips' memory, 1 when it does not; its last line is one JSON object (fits, per_chip_gib, hbm_gib,
estimate_gib, compile_s, largest_collective_bytes).
"""
# Library messages name config keys as the config spells them (`train.skip_nonfinite`) and the run's own
# settings as train() and compile_only() do; the command line spells them as flags.
TRAIN_FLAGS = SettingFlags({"workdir": "--workdir", "topology": "--topology", "compile_only=True": "--compile-only",
                            "coordinator": "--coordinator", "num_processes": "--num-processes",
                            "process_id": "--process-id"},
                           config_prefix=CONFIG_PREFIX, config_keys=CONFIG_KEYS)


def add_train_parser(subparsers) -> None:
    """Add `train` to the `xllava` subcommands."""
    p = subparsers.add_parser("train", help="train one stage (llm_pretrain, align, vif)", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Train one X-LLaVA stage from a config file; any key can be overridden "
                                          "with --config.KEY=VALUE. Metrics go to WORKDIR/metrics.jsonl and "
                                          "TensorBoard.")
    p.add_argument("--config", required=True, help="configs/STAGE.py:PRESET (PRESET: demo, xllava_13b, ...)")
    p.add_argument("--workdir", help="run directory (checkpoints, metrics, final params); required to train")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the train step without training (no weights read) and report per-chip memory, "
                        "FLOPs, collectives and compile time")
    p.add_argument("--topology", help="with --compile-only: a TPU slice to compile for (v5p-32, v5e-64, v4-32, "
                                      "v6e-16, ... or a libtpu string like v5:2x2x4); default: the local devices")
    p.add_argument("--coordinator", help="host:port of process 0, for multi-process runs without auto-detection")
    p.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    p.set_defaults(run=run_train, flags=TRAIN_FLAGS, config_overrides=[])


def run_train(args: argparse.Namespace) -> int:
    """`xllava train`: 0 when the run finished (or, with --compile-only, the step fits), 1 when it does not fit."""
    from xllava_jax.config import ConfigError
    from xllava_jax.train.config import apply_overrides, load_config
    from xllava_jax.train.distributed import initialize
    from xllava_jax.train.trainer import train

    config = apply_overrides(load_config(args.config), args.config_overrides)
    if args.compile_only:
        from xllava_jax.train.compile_only import compile_only, report_line

        report = compile_only(config, args.topology)
        print(report_line(report))
        return 0 if report["fits"] else 1
    if args.topology:
        raise ConfigError("--topology goes with --compile-only (a run trains on the devices it has)")
    if not args.workdir:
        raise ConfigError("--workdir is required to train (or pass --compile-only)")
    initialize(args.coordinator, args.num_processes, args.process_id)
    out = train(config, args.workdir)
    print(f"wrote {out}")
    return 0
