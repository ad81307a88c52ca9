"""`xllava chat`: a terminal chat with a checkpoint, one image at a time, answers streamed token by token.

Lines typed are questions; `/image PATH`, `/reset`, `/help` and `/quit` are commands (see `COMMANDS`).
The conversation is kept turn by turn and rendered with the recipe's template on every question.
`ChatSession` takes its input and output streams as arguments, so scripts and tests can drive it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from xllava_jax.config import DTYPES
from xllava_jax.data import conversation as conv
from xllava_jax.errors import UserError
from xllava_jax.infer.engine import MODE_HELP, SYSTEM_HELP, TEMPLATE_HELP, Engine, EngineError
from xllava_jax.infer.generate import GenerationConfig
from xllava_jax.infer.openai_protocol import Defaults

COMMANDS = """commands:
  /image PATH   load or change the image (the conversation restarts: LLaVA-1.5 takes one image)
  /reset        forget the conversation (the image stays)
  /help         show this text
  /quit         leave (end of input and Ctrl-C at the prompt also leave)"""

CHAT_EXAMPLES = """examples:
  xllava chat --ckpt ckpt/xllava --image photo.jpg
  xllava chat --ckpt ckpt/xllava --temperature 0 --max-new-tokens 128
  printf '/image cat.png\\nWhat is in the picture?\\n' | xllava chat --ckpt ckpt/xllava
""" + COMMANDS + "\n"


class ChatError(UserError):
    """A chat setting that cannot work (e.g. a missing --image file)."""


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


def load_engine(args: argparse.Namespace, model_id: str | None = None) -> Engine:
    """The engine for `args.ckpt` with the flags of `add_engine_flags`."""
    print(f"loading {args.ckpt} ...", file=sys.stderr, flush=True)
    return Engine.load(args.ckpt, template=args.template, mode=args.mode, dtype=args.dtype, system=args.system,
                       model_id=model_id)


class ChatSession:
    """A read-eval-print loop over `engine`: questions from `stdin`, answers streamed to `stdout`.

    `turns` holds the conversation ((role, text), role "human" / "gpt"); `image` the current image
    float32[H, W, 3] or None. Each answer uses `config` (its new-token limit cut to what the context has left).
    """

    def __init__(self, engine: Engine, config: GenerationConfig, stdin: TextIO, stdout: TextIO):
        self.engine, self.config, self.stdin, self.stdout = engine, config, stdin, stdout
        self.turns: list[tuple[str, str]] = []
        self.image: np.ndarray | None = None

    def _say(self, line: str) -> None:
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def set_image(self, path: str) -> bool:
        """Load the image at `path` and restart the conversation; on failure print one line and keep both."""
        try:
            image = self.engine.load_image(Path(path).expanduser(), name=path)
        except EngineError as e:
            self._say(f"error: {e}")
            return False
        self.image, self.turns = image, []
        self._say(f"[image {path} loaded; new conversation]")
        return True

    def ask(self, question: str) -> str | None:
        """Stream the answer to `question` and add both to the conversation; None when nothing was asked
        (a prompt the template refuses, no room left, or Ctrl-C while answering)."""
        turns = [*self.turns, ("human", question)]
        try:
            prompt = self.engine.prompt_ids(turns, with_image=self.image is not None)
        except EngineError as e:
            self._say(f"error: {e}")
            return None
        room = self.engine.max_context - len(prompt)
        if room < 1:
            self._say(f"error: the conversation fills the model's {self.engine.max_context}-token context; "
                      f"/reset to start over")
            return None
        config = self.config.replace(max_new_tokens=min(self.config.max_new_tokens, room))
        deltas: list[str] = []
        try:
            for delta in self.engine.stream(prompt, self.image, config):
                self.stdout.write(delta)
                self.stdout.flush()
                deltas.append(delta)
        except KeyboardInterrupt:
            self._say(" [interrupted; the answer is not kept]")
            return None
        self._say("")
        answer = "".join(deltas)
        self.turns = [*turns, ("gpt", answer)]
        return answer

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/image" and argument:
            self.set_image(argument)
        elif name == "/image":
            self._say("usage: /image PATH")
        elif name == "/reset":
            self.turns = []
            self._say("[new conversation]")
        elif name == "/help":
            self._say(COMMANDS)
        else:
            self._say(f"unknown command {name}; /help lists the commands")
        return True

    def run(self) -> int:
        """Read lines until /quit or end of input; returns the exit code (0)."""
        interactive = self.stdin.isatty()
        self._say(f"chatting with {self.engine.model_id}; /help lists the commands")
        while True:
            if interactive:
                self.stdout.write("> ")
                self.stdout.flush()
            try:
                line = self.stdin.readline()
            except KeyboardInterrupt:
                self._say("")
                break
            if not line:
                break
            line = line.strip()
            if line.startswith("/"):
                if not self.command(line):
                    break
            elif line:
                self.ask(line)
        return 0


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
    p = subparsers.add_parser(
        "chat", help="chat with a checkpoint in the terminal", epilog=CHAT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A terminal chat: type questions about the image (or none), get answers streamed token by "
                    "token; the conversation is kept with the recipe's template. Sampling defaults are the "
                    "paper's demo settings.")
    p.add_argument("--ckpt", required=True, help="our checkpoint or a Hugging Face directory (with its tokenizer)")
    p.add_argument("--image", help="image to start with (change it with /image PATH)")
    add_sampling_flags(p, "--max-new-tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_engine_flags(p)
    p.set_defaults(run=run_chat)
