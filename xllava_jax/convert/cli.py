"""`xllava convert hf2jax|jax2hf`: checkpoints to and from Hugging Face directories."""

from __future__ import annotations

import argparse

from xllava_jax.config import DTYPES
from xllava_jax.errors import SettingFlags

EXAMPLES = """examples:
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
# The settings of hf_to_checkpoint / checkpoint_to_hf (and what they call) that their messages name.
HF2JAX_FLAGS = SettingFlags({"src": "--src", "out": "--out", "vision_src": "--vision-src",
                             "param_dtype": "--param-dtype", "allow_bin=True": "--allow-bin",
                             "template": "--template"})
JAX2HF_FLAGS = SettingFlags({"src": "--src", "out": "--out", "fmt": "--format", "layout": "--layout"})


def add_convert_parser(subparsers) -> None:
    """Add `convert` (with `hf2jax`, `jax2hf`) to the `xllava` subcommands."""
    from xllava_jax.data.conversation import TEMPLATES

    convert = subparsers.add_parser("convert", help="convert checkpoints to and from Hugging Face",
                                    description="Convert checkpoints between Hugging Face directories and ours.",
                                    epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = convert.add_subparsers(dest="direction", required=True)
    h2j = steps.add_parser(
        "hf2jax", help="HF directory -> our checkpoint", epilog=EXAMPLES,
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
    h2j.set_defaults(run=run_hf2jax, flags=HF2JAX_FLAGS)
    j2h = steps.add_parser(
        "jax2hf", help="our checkpoint -> HF directory", epilog=EXAMPLES,
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
    j2h.set_defaults(run=run_jax2hf, flags=JAX2HF_FLAGS)


def run_hf2jax(args: argparse.Namespace) -> int:
    """`xllava convert hf2jax`."""
    from xllava_jax.convert.commands import hf_to_checkpoint

    out = hf_to_checkpoint(args.src, args.out, vision_src=args.vision_src, param_dtype=args.param_dtype,
                           allow_bin=args.allow_bin, template=args.template, progress=True)
    print(f"wrote {out}")
    return 0


def run_jax2hf(args: argparse.Namespace) -> int:
    """`xllava convert jax2hf`."""
    from xllava_jax.convert.commands import checkpoint_to_hf

    out = checkpoint_to_hf(args.src, args.out, args.format, args.layout,
                           max_shard_bytes=int(args.max_shard_size * 1024**3), progress=True)
    print(f"wrote {out}")
    return 0
