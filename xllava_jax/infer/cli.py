"""`xllava generate`: one answer to one prompt (optionally about one image), streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xllava_jax.infer.chat import add_engine_flags

EXAMPLES = """examples:
  xllava generate --ckpt ckpt/xllava --image photo.jpg --prompt "이 사진을 자세히 설명해 주세요."
  xllava generate --ckpt runs/vif/final --image synth/images/val_0001.png --prompt "What colour is the circle?"
  xllava generate --ckpt ckpt/xllava --prompt "Tell me about Seoul." --temperature 0.1 --top-p 0.9 --top-k 40
"""


def run_generate(args: argparse.Namespace) -> None:
    """Stream the answer's text to stdout as it is generated, then a newline."""
    from xllava_jax.infer.engine import Engine

    engine = Engine.load(args.ckpt, template=args.template, mode=args.mode, dtype=args.dtype, system=args.system)
    image = None if args.image is None else engine.load_image(Path(args.image), name=args.image)
    prompt = engine.prompt_ids([("human", args.prompt)], with_image=image is not None)
    config = engine.generation_config(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    for delta in engine.stream(prompt, image, config):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def add_generate_parser(subparsers) -> None:
    """Add `generate` to the `xllava` subcommands."""
    p = subparsers.add_parser("generate", help="answer one prompt (with an optional image), streamed",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Load a checkpoint (ours or a Hugging Face directory, with its tokenizer) "
                                          "and stream one answer to stdout. Greedy unless --temperature > 0.")
    p.add_argument("--ckpt", required=True, help="our checkpoint or a Hugging Face directory")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--image", help="an image file the prompt is about")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1: off (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    add_engine_flags(p)
    p.set_defaults(run=run_generate)
