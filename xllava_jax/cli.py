"""The `xllava` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xllava_jax.config import DTYPES

CONVERT_EXAMPLES = """examples:
  xllava convert hf2jax --src llava-1.5-7b-hf --out ckpt/llava7b
  xllava convert hf2jax --src X-LLaVA --vision-src clip-vit-large-patch14-336 --out ckpt/xllava
  xllava convert hf2jax --src my-finetune --out ckpt/mine --template vicuna_v1
  xllava convert jax2hf --src ckpt/xllava --out export/xllava-hf
  xllava convert jax2hf --src ckpt/xllava --out export/xllava-hf-4x --layout hf4
  xllava convert jax2hf --src ckpt/xllava --out export/xllava-orig --layout llava
"""
LAYOUT_HELP = ("--format says what is written: hf-llava (transformers' LlavaForConditionalGeneration), llava (the "
               "original LLaVA release: LlavaLlamaForCausalLM, vision tower in OUT/vision_tower), llama (the LLM "
               "alone), clip (the vision tower alone). --layout says how a LLaVA model's keys are named: hf5, "
               "hf4_52 or hf4 (what transformers 5, 4.52+ and earlier 4.x save; these imply --format hf-llava) "
               "or llava (the same as --format llava).")


def _convert_parser(sub) -> None:
    from xllava_jax.data.conversation import TEMPLATES

    convert = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face",
                             description="Convert checkpoints between Hugging Face directories and ours.",
                             epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = convert.add_subparsers(dest="direction", required=True)
    h2j = steps.add_parser(
        "hf2jax", help="HF directory -> our checkpoint", epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a Hugging Face directory (LlavaForConditionalGeneration in the 4.x or 5.x layout, the "
                    "original LLaVA / X-LLaVA release, LlamaForCausalLM or CLIPVisionModel) and write our "
                    "orbax checkpoint with the tokenizer files and the prompt template the model expects "
                    "(from its chat template or model name: vicuna_v1 for LLaVA-1.5, llava_llama_2 for "
                    "X-LLaVA; the choice and its reason are printed).")
    h2j.add_argument("--src", required=True, help="Hugging Face model directory (config.json + safetensors)")
    h2j.add_argument("--out", required=True, help="output checkpoint directory (created)")
    h2j.add_argument("--vision-src", help="CLIP directory for the original LLaVA layout's vision tower")
    h2j.add_argument("--param-dtype", choices=sorted(DTYPES), help="parameter dtype (default: the checkpoint's)")
    h2j.add_argument("--allow-bin", action="store_true",
                     help="also read PyTorch .bin weights (through torch.load(weights_only=True))")
    h2j.add_argument("--template", choices=TEMPLATES,
                     help="the prompt template to record (default: inferred from the source)")
    j2h = steps.add_parser(
        "jax2hf", help="our checkpoint -> HF directory", epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write our checkpoint as a Hugging Face directory (safetensors, config.json, tokenizer files "
                    "with a chat template that prompts as the checkpoint's template does). " + LAYOUT_HELP)
    j2h.add_argument("--src", required=True, help="our checkpoint directory")
    j2h.add_argument("--out", required=True, help="output directory (created; must be empty)")
    j2h.add_argument("--format", choices=["hf-llava", "llava", "llama", "clip"],
                     help="what to write (default: hf-llava, or llava with --layout llava)")
    j2h.add_argument("--layout", choices=["hf5", "hf4_52", "hf4", "llava"],
                     help="key names of a LLaVA export (default for hf-llava: what the installed transformers "
                          "writes, else hf5)")
    j2h.add_argument("--max-shard-size", type=float, default=5.0, help="safetensors shard size in GB (default 5)")


TRAIN_EXAMPLES = """examples:
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


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one stage (llm_pretrain, align, vif)", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one X-LLaVA stage from a config file; any key can be overridden with "
                                   "--config.KEY=VALUE. Metrics go to WORKDIR/metrics.jsonl and TensorBoard.")
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


def _run_train(args, overrides: list[str]) -> int:
    from xllava_jax.config import ConfigError
    from xllava_jax.train.config import apply_overrides, load_config
    from xllava_jax.train.distributed import initialize
    from xllava_jax.train.trainer import train

    config = apply_overrides(load_config(args.config), overrides)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllava", description="X-LLaVA in JAX: convert, train, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    from xllava_jax.data.cli import add_data_parser

    add_data_parser(sub)
    from xllava_jax.tokenizer.cli import add_vocab_parser

    add_vocab_parser(sub)
    _train_parser(sub)
    from xllava_jax.eval.cli import add_eval_parser

    add_eval_parser(sub)
    from xllava_jax.infer.cli import add_generate_parser

    add_generate_parser(sub)
    from xllava_jax.datagen.cli import add_datagen_parser

    add_datagen_parser(sub)
    from xllava_jax.infer.chat import add_chat_parser
    from xllava_jax.infer.serve import add_serve_parser

    add_chat_parser(sub)
    add_serve_parser(sub)
    from xllava_jax.demo.cli import add_demo_parser

    add_demo_parser(sub)
    return parser


def _run_convert(args) -> None:
    from xllava_jax.convert.commands import checkpoint_to_hf, hf_to_checkpoint

    if args.direction == "hf2jax":
        out = hf_to_checkpoint(args.src, args.out, vision_src=args.vision_src, param_dtype=args.param_dtype,
                               allow_bin=args.allow_bin, template=args.template, progress=True)
    else:
        out = checkpoint_to_hf(args.src, args.out, args.format, args.layout,
                               max_shard_bytes=int(args.max_shard_size * 1024**3), progress=True)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    from xllava_jax.checkpoint import CheckpointError
    from xllava_jax.config import ConfigError
    from xllava_jax.convert.load import ConversionError
    from xllava_jax.data.conversation import ConversationError
    from xllava_jax.data.images import ImageError
    from xllava_jax.data.pipeline import DataError
    from xllava_jax.data.text import CorpusError
    from xllava_jax.errors import UserError
    from xllava_jax.tokenizer.expand import TokenizerError
    from xllava_jax.train.trainer import Preempted, TrainingError

    user_errors = (ConversionError, CheckpointError, ConfigError, FileNotFoundError, ConversationError, ImageError,
                   DataError, CorpusError, TokenizerError, TrainingError, UserError)
    try:
        if getattr(args, "run", None) is not None:  # subcommands that register their own handler
            return args.run(args) or 0
        if args.command == "convert":
            _run_convert(args)
        elif args.command == "train":
            return _run_train(args, overrides)
        elif args.command == "vocab":
            from xllava_jax.tokenizer.cli import run_vocab

            run_vocab(args)
        elif args.command == "data":
            from xllava_jax.data.cli import run_data

            return run_data(args)
    except Preempted as e:
        print(f"xllava: {e}", file=sys.stderr)
        return 143
    except user_errors as e:
        print(f"xllava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xllava: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
