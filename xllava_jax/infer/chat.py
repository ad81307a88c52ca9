"""`xllava chat`: a terminal chat with a checkpoint, one image at a time, answers streamed token by token.

Lines typed are questions; `/image PATH`, `/reset`, `/help` and `/quit` are commands (see `COMMANDS`).
The conversation is kept turn by turn and rendered with the recipe's template on every question.
`ChatSession` takes its input and output streams as arguments, so scripts and tests can drive it; the
command's flags and their glue are in `infer/cli.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import numpy as np

from xllava_jax.errors import UserError
from xllava_jax.infer.engine import Engine, EngineError
from xllava_jax.infer.generate import GenerationConfig

COMMANDS = """commands:
  /image PATH   load or change the image (the conversation restarts: LLaVA-1.5 takes one image)
  /reset        forget the conversation (the image stays)
  /help         show this text
  /quit         leave (end of input and Ctrl-C at the prompt also leave)"""


class ChatError(UserError):
    """A chat setting that cannot work (e.g. a missing --image file)."""


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
