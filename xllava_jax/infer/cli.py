"""`xllava generate`, `xllava chat` and `xllava serve`: their parsers and the glue from flags to the engine
(`engine.py`), the chat session (`chat.py`) and the server (`serve.py`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from xllava_jax.config import DTYPES
from xllava_jax.data import conversation as conv
from xllava_jax.errors import SettingFlags
from xllava_jax.infer.chat import COMMANDS, ChatError, ChatSession
from xllava_jax.infer.engine import MODE_HELP, SYSTEM_HELP, TEMPLATE_HELP, Engine
from xllava_jax.infer.openai_protocol import Defaults

GENERATE_EXAMPLES = """examples:
  xllava generate --ckpt ckpt/xllava --image photo.jpg --prompt "이 사진을 자세히 설명해 주세요."
  xllava generate --ckpt runs/vif/final --image synth/images/val_0001.png --prompt "What colour is the circle?"
  xllava generate --ckpt ckpt/xllava --prompt "Tell me about Seoul." --temperature 0.1 --top-p 0.9 --top-k 40
"""


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The model flags `generate`, `chat` and `serve` share: --template, --mode, --dtype, --system (no defaults of
    their own: `Engine.load` resolves the prompt)."""
    parser.add_argument("--template", choices=conv.TEMPLATES, help=TEMPLATE_HELP)
    parser.add_argument("--mode", choices=conv.MODES, help=MODE_HELP)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--system", help=SYSTEM_HELP)


def add_sampling_flags(parser: argparse.ArgumentParser, limit_flag: str) -> None:
    """--temperature, --top-p, --top-k and `limit_flag` (the new-token limit), defaulting to the paper's
    demo settings: temperature 0.1, top_p 0.9, top_k 40, 512 tokens."""
    demo = Defaults()
    parser.add_argument("--temperature", type=float, default=demo.temperature,
                        help=f"0 decodes greedily (default: {demo.temperature})")
    parser.add_argument("--top-p", type=float, default=demo.top_p, help=f"nucleus mass, (0, 1] (default: {demo.top_p})")
    parser.add_argument("--top-k", type=int, default=demo.top_k, help=f"0 turns it off (default: {demo.top_k})")
    parser.add_argument(limit_flag, type=int, default=demo.max_tokens,
                        help=f"most new tokens per answer (default: {demo.max_tokens})")


def add_model_parser(subparsers, name: str, *, help: str, epilog: str, description: str) -> argparse.ArgumentParser:
    """Add the `name` subcommand of a long-running model command (`chat`, `serve`), with its examples as the
    epilog, and its first flag: --ckpt."""
    p = subparsers.add_parser(name, help=help, epilog=epilog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our checkpoint or a Hugging Face directory (with its tokenizer)")
    return p


def load_engine(args: argparse.Namespace, model_id: str | None = None) -> Engine:
    """The engine for `args.ckpt` with the flags of `add_engine_flags`."""
    print(f"loading {args.ckpt} ...", file=sys.stderr, flush=True)
    return Engine.load(args.ckpt, template=args.template, mode=args.mode, dtype=args.dtype, system=args.system,
                       model_id=model_id)


# ------------------------------------------------------------------------------------------------ generate
def run_generate(args: argparse.Namespace) -> None:
    """Stream the answer's text to stdout as it is generated, then a newline."""
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
                              epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
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


# ------------------------------------------------------------------------------------------------ chat
CHAT_EXAMPLES = """examples:
  xllava chat --ckpt ckpt/xllava --image photo.jpg
  xllava chat --ckpt ckpt/xllava --temperature 0 --max-new-tokens 128
  printf '/image cat.png\\nWhat is in the picture?\\n' | xllava chat --ckpt ckpt/xllava
""" + COMMANDS + "\n"


def run_chat(args: argparse.Namespace) -> int:
    """`xllava chat`: load the checkpoint (and --image), then chat on stdin/stdout."""
    if args.image is not None and not Path(args.image).expanduser().is_file():
        raise ChatError(f"{args.image}: no such image file")
    engine = load_engine(args)
    config = engine.generation_config(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    session = ChatSession(engine, config, sys.stdin, sys.stdout)
    if args.image is not None:
        session.image = engine.load_image(Path(args.image).expanduser(), name=args.image)
    return session.run()


def add_chat_parser(subparsers) -> None:
    """Add `chat` to the `xllava` subcommands."""
    p = add_model_parser(
        subparsers, "chat", help="chat with a checkpoint in the terminal", epilog=CHAT_EXAMPLES,
        description="A terminal chat: type questions about the image (or none), get answers streamed token by "
                    "token; the conversation is kept with the recipe's template. Sampling defaults are the "
                    "paper's demo settings.")
    p.add_argument("--image", help="image to start with (change it with /image PATH)")
    add_sampling_flags(p, "--max-new-tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_engine_flags(p)
    p.set_defaults(run=run_chat)


# ------------------------------------------------------------------------------------------------ serve
SERVE_EXAMPLES = """examples:
  xllava serve --ckpt ckpt/xllava --port 8000
  xllava serve --ckpt ckpt/xllava --image-root /data/images --model-name xllava-13b --max-batch 16
  XLLAVA_SERVE_API_KEY=$(cat key.txt) xllava serve --ckpt ckpt/xllava --host 0.0.0.0 --request-timeout 60
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "xllava", "messages": [{"role": "user", "content": "Hello"}]}'
  curl http://127.0.0.1:8000/health
From Python: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").chat.completions.create(...)
"""


def add_serve_parser(subparsers) -> None:
    """Add `serve` to the `xllava` subcommands."""
    from xllava_jax.infer.serve import API_KEY_ENV, MAX_BODY_BYTES, REQUEST_TIMEOUT_S

    p = add_model_parser(
        subparsers, "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API", epilog=SERVE_EXAMPLES,
        description="An OpenAI-compatible server: POST /v1/chat/completions (text and image_url parts: data URLs, "
                    "or file URLs under --image-root; streaming or not), GET /v1/models and GET /health. Concurrent "
                    "non-streaming requests are batched into one generate call; streaming requests run one at a "
                    "time. The sampling flags set what a request leaves out. Ctrl-C or SIGTERM stops it.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--image-root", help="allow file:// image URLs under this directory (default: refused)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests per generate call (default: 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long to wait for more requests after the first of a batch (default: 10)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20,
                   help=f"largest request body in MiB (default: {MAX_BODY_BYTES // 2**20})")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                   help="seconds a connection may wait on the client (a stalled upload, an idle keep-alive, an "
                        f"answer not read) before it is closed (default: {REQUEST_TIMEOUT_S:g})")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                                     f"${API_KEY_ENV} when set, else none; the variable keeps the key out of ps)")
    add_sampling_flags(p, "--max-tokens")
    add_engine_flags(p)
    p.set_defaults(run=run_serve, flags=SERVE_FLAGS)


# The settings serve's checks name, as its flags.
SERVE_FLAGS = SettingFlags({"max_batch": "--max-batch", "batch_wait_ms": "--batch-wait-ms",
                            "request_timeout": "--request-timeout", "api_key": "--api-key"})


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """`xllava serve`: load the checkpoint and answer requests until Ctrl-C or SIGTERM."""
    from xllava_jax.infer.serve import API_KEY_ENV, ChatServer, ServeError, check_settings

    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in [0, 65535], got {args.port}")
    max_body_bytes = int(args.max_body_mb * 2**20)
    api_key = os.environ.get(API_KEY_ENV) if args.api_key is None else args.api_key
    check_settings(args.image_root, args.max_batch, args.batch_wait_ms, max_body_bytes, args.request_timeout, api_key)
    engine = load_engine(args, model_id=args.model_name)
    defaults = Defaults(args.temperature, args.top_p, args.top_k, args.max_tokens)
    server = ChatServer(engine, args.host, args.port, image_root=args.image_root, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, defaults=defaults, max_body_bytes=max_body_bytes,
                        request_timeout=args.request_timeout, api_key=api_key)
    signal.signal(signal.SIGTERM, _interrupt)
    access = "API key required" if api_key else "no API key"
    print(f"serving {engine.model_id!r} at {server.url} ({access}; Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        server.server_close()
    return 0
