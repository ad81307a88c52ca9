"""The inference engine: a model, its tokenizer and a template, turned into text answers.

`Engine` sits between user-facing commands (`xllava generate`, `chat`, `serve`, `eval run`) and the
token-level `Generator`. It renders conversations with a template, preprocesses images, generates for
batches with static shapes, and decodes text (cut at stop strings; streamed without splitting a
multi-byte character).

Static shapes: `generate` pads a batch with copies of its first row up to the batch size (and to a
multiple of the mesh's 'data' axis) and, for a model with a vision tower, always passes per-row pixel
values `float[B, 1, H, W, 3]` with a zero image for image-less rows (which hold no placeholder ids, so the
zeros are never read). One program is compiled per (batch size, prompt bucket, max_new_tokens), whatever
mix of rows with and without images a batch holds.

With a `mesh`, each batch is laid out along its 'data' axis (the parameters replicated, or sharded as
`load_pretrained(mesh=...)` places them); the mesh should hold this process's devices only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from xllava_jax.checkpoint import CheckpointError
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.convert.load import ConversionError, load_pretrained
from xllava_jax.convert.prompt import DEFAULT_MODE, DEFAULT_TEMPLATE, recorded_prompt, resolve_prompt
from xllava_jax.data import conversation as conv
from xllava_jax.data.images import ImageConfig, ImageError, preprocess
from xllava_jax.errors import UserError
from xllava_jax.infer.generate import GenerationConfig, Generator, truncate_at_stop
from xllava_jax.models.xllava import XLlava
from xllava_jax.tokenizer.runtime import Tokenizer, TokenizerError

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to
# The help of the prompt flags of generate, chat, serve and eval run (all resolved by `Engine.load`).
TEMPLATE_HELP = ("conversation template (default: the checkpoint's recorded one; for a Hugging Face directory the "
                 f"one its chat template or model name implies; else {DEFAULT_TEMPLATE})")
MODE_HELP = ("tokenisation: clean (ids of the template string) or llava (the original LLaVA code's ids) (default: "
             "the checkpoint's, else clean)")
SYSTEM_HELP = "system prompt (default: the checkpoint's, else the template's)"


class EngineError(UserError):
    """A checkpoint, tokenizer, image or prompt the engine cannot use (one line)."""


@dataclass(frozen=True)
class Answer:
    """One generated answer: its text (cut before a stop string, surrounding whitespace removed), the
    number of prompt and generated tokens, and why it ended: "stop" (eos or stop string) or "length"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _MeshGenerator(Generator):
    """A Generator whose batches are laid out along the 'data' axis of a mesh (parameters replicated
    there unless they already live on it); a batch the axis does not divide is replicated."""

    def __init__(self, model: XLlava, mesh: jax.sharding.Mesh):
        super().__init__(model)
        self.mesh = mesh
        devices = set(mesh.devices.flat)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state = jax.tree.map(lambda x: x if set(x.devices()) == devices else jax.device_put(x, replicated),
                                  self.state)

    def _prepare(self, prompts, attention_mask, pixel_values, config: GenerationConfig):
        ids, mask, pixel_values, lengths = super()._prepare(prompts, attention_mask, pixel_values, config)
        split = ids.shape[0] % self.mesh.shape["data"] == 0  # else (e.g. one streamed prompt) replicated
        rows = NamedSharding(self.mesh, PartitionSpec("data" if split else None))
        ids, mask = jax.device_put(ids, rows), jax.device_put(mask, rows)
        if pixel_values is not None:
            pixel_values = jax.device_put(pixel_values, rows)
        return ids, mask, pixel_values, lengths


class Engine:
    """Generates answers to conversations (optionally with one image each) with one model."""

    def __init__(self, model: XLlava, tokenizer: Tokenizer, *, template: str = DEFAULT_TEMPLATE,
                 mode: str = DEFAULT_MODE, model_id: str = "xllava", system: str | None = None,
                 mesh: jax.sharding.Mesh | None = None):
        if template not in conv.TEMPLATES:
            raise EngineError(f"unknown template {template!r}; choose one of {', '.join(conv.TEMPLATES)}")
        if mode not in conv.MODES:
            raise EngineError(f"unknown tokenisation mode {mode!r}; choose one of {', '.join(conv.MODES)}")
        self.cfg: ModelConfig = model.cfg
        if tokenizer.vocab_size > self.cfg.text.vocab_size:
            raise EngineError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} pieces but the model's "
                              f"vocabulary only {self.cfg.text.vocab_size}")
        self.tokenizer = tokenizer
        self.template, self.mode, self.system, self.model_id = template, mode, system, model_id
        self.mesh = mesh
        self.generator: Generator = Generator(model) if mesh is None else _MeshGenerator(model, mesh)
        vision = self.cfg.vision
        self.image_config: ImageConfig | None = None if vision is None else ImageConfig.for_vision(vision.image_size)
        self.max_context: int = self.cfg.text.max_position_embeddings

    @classmethod
    def load(cls, ckpt: str | Path, *, template: str | None = None, mode: str | None = None,
             dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, tokenizer: str | Path | None = None,
             model_id: str | None = None, system: str | None = None) -> Engine:
        """An engine for our checkpoint or a Hugging Face directory; the tokenizer comes from that directory
        unless `tokenizer` (a tokenizer.model or a directory holding one) is given. `model_id` defaults
        to the directory's name. `template`, `mode` and `system` (None: not given) are resolved against the
        checkpoint's prompt record, or what a Hugging Face directory implies (`convert.prompt`); a template
        that nothing implied is said on stderr."""
        path = Path(ckpt)
        if not path.is_dir():
            raise EngineError(f"{path}: no such checkpoint directory")
        try:
            inferred = recorded_prompt(path)
        except CheckpointError as e:
            raise EngineError(str(e)) from None
        if inferred.guessed and template is None:
            print(f"xllava: note: {inferred.reason}", file=sys.stderr)
        template, mode, system = resolve_prompt(inferred.record, template, mode, system)
        try:
            tok = Tokenizer(tokenizer if tokenizer is not None else path)
        except TokenizerError as e:
            raise EngineError(f"{e} (pass a tokenizer.model explicitly)") from None
        try:
            model = load_pretrained(path, dtype=dtype, mesh=mesh)
        except (CheckpointError, ConversionError, ConfigError) as e:
            raise EngineError(str(e)) from None
        if not isinstance(model, XLlava):
            raise EngineError(f"{path}: holds a vision tower alone, not a language model")
        return cls(model, tok, template=template, mode=mode, model_id=model_id or path.absolute().name,
                   system=system, mesh=mesh)

    # --------------------------------------------------------------------------------- inputs
    def load_image(self, source: str | Path | bytes, name: str | None = None) -> np.ndarray:
        """A path or encoded bytes -> the model's input image float32[H, W, 3] (normalised)."""
        if self.image_config is None:
            raise EngineError(f"{name or source}: this model is text-only and takes no images")
        try:
            return preprocess(source, self.image_config, name)
        except ImageError as e:
            raise EngineError(str(e)) from None

    def prompt_ids(self, turns: list[tuple[str, str]], *, with_image: bool, system: str | None = None) -> list[int]:
        """Token ids of a generation prompt for `turns` ((role, text), role "human" or "gpt", ending with
        a human turn), with `system` in place of the engine's system prompt when given. with_image puts
        `<image>\\n` before the first human turn's text unless it holds `<image>` already; the image slot
        becomes `num_image_tokens` placeholder ids."""
        turns = [(role, text) for role, text in turns]
        tagged = any(conv.IMAGE in text for _, text in turns)
        if tagged and not with_image:
            raise EngineError(f"the prompt holds an {conv.IMAGE} tag but no image was given")
        if with_image:
            if self.image_config is None:
                raise EngineError("this model is text-only and takes no images")
            if not tagged:
                if not turns or turns[0][0] != "human":
                    raise EngineError("a conversation must start with a human turn")
                turns[0] = (turns[0][0], f"{conv.IMAGE}\n{turns[0][1]}")
        try:
            return conv.encode_turns(self.template, turns, self.tokenizer, num_image_tokens=self.cfg.num_image_tokens,
                                     image_token_id=self.cfg.image_token_id, mode=self.mode,
                                     system=self.system if system is None else system, generation=True).input_ids
        except conv.ConversationError as e:
            raise EngineError(str(e)) from None

    def generation_config(self, **changes) -> GenerationConfig:
        """A GenerationConfig with the tokenizer's eos and pad ids; `changes` set any other field."""
        try:
            return GenerationConfig(eos_token_ids=(self.tokenizer.eos_id,), pad_token_id=self.tokenizer.pad_id,
                                    **changes)
        except (TypeError, ValueError) as e:
            raise EngineError(f"bad generation settings: {e}") from None

    def _check_row(self, prompt: Sequence[int], image: np.ndarray | None, config: GenerationConfig,
                   limit: int | None = None) -> None:
        """A prompt must fit the context with its new tokens (`limit`, default config.max_new_tokens), and hold
        an image slot iff it has an image."""
        if not prompt:
            raise EngineError("empty prompt")
        limit = config.max_new_tokens if limit is None else limit
        if len(prompt) + limit > self.max_context:
            raise EngineError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({limit}) "
                              f"exceeds the model's context of {self.max_context} tokens")
        if (self.cfg.image_token_id in prompt) != (image is not None):
            raise EngineError("a prompt with an image slot needs an image, and an image needs an image slot "
                              "(build prompts with prompt_ids(..., with_image=True))")

    # ------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], images: list[np.ndarray | None], config: GenerationConfig,
                 stop: Sequence[str] = (), *, batch_size: int | None = None,
                 limits: Sequence[int] | None = None, stops: Sequence[Sequence[str]] | None = None) -> list[Answer]:
        """Answers for prompts (from `prompt_ids`; rows with an image hold its placeholders) and their
        images (float32[H, W, 3] or None per row). The batch is padded with copies of its first row to
        `batch_size` (default: the number of prompts), rounded up to a multiple of the mesh's 'data' axis.
        Per row, `limits` cut an answer to its own number of new tokens (at most config.max_new_tokens;
        finish_reason "length") and `stops` replace `stop`, so requests with different limits and stop
        strings share one compiled program."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        if not prompts:
            return []
        limits = list(limits) if limits is not None else [config.max_new_tokens] * len(prompts)
        stops = list(stops) if stops is not None else [stop] * len(prompts)
        for prompt, image, limit in zip(prompts, images, limits):
            self._check_row(prompt, image, config, limit)
        rows = max(batch_size or 0, len(prompts))
        if self.mesh is not None:
            data = self.mesh.shape["data"]
            rows = -(-rows // data) * data
        padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
        pixels = None
        if self.image_config is not None:
            size = self.image_config.size
            pixels = np.zeros((rows, 1, size, size, 3), np.float32)
            for i, image in enumerate(list(images) + [images[0]] * (rows - len(images))):
                if image is not None:
                    pixels[i, 0] = image
        result = self.generator.generate(padded, pixels, config)
        answers = []
        for prompt, tokens, reason, limit, row_stop in zip(prompts, result.tokens, result.finish_reasons, limits,
                                                            stops):
            if len(tokens) >= limit:  # an eos after the row's own limit was never reached
                tokens, reason = tokens[:limit], "length"
            text, stopped = truncate_at_stop(self.tokenizer.decode(tokens), row_stop)
            used = _tokens_until_stop(self.tokenizer, tokens, row_stop) if stopped else len(tokens)
            answers.append(Answer(text.strip(), len(prompt), used, "stop" if stopped else reason))
        return answers

    def stream(self, prompt: list[int], image: np.ndarray | None, config: GenerationConfig,
               stop: Sequence[str] = (), *, limit: int | None = None) -> AnswerStream:
        """Text deltas of one answer as it is generated. Their concatenation is `generate`'s text for the
        same prompt and `limit` (new tokens, at most config.max_new_tokens): a multi-byte character is never
        split, leading whitespace is dropped and trailing whitespace held back; it ends at eos, at the limit
        or before a stop string (which is not yielded)."""
        self._check_row(prompt, image, config, limit)
        pixels = None if image is None else np.asarray(image, np.float32)[None]
        limit = config.max_new_tokens if limit is None else min(limit, config.max_new_tokens)
        return AnswerStream(self.generator.stream(prompt, pixels, config), _TextStream(self.tokenizer, stop), limit)


class AnswerStream(Iterator[str]):
    """The text deltas of one answer (see `Engine.stream`); once they are all read, `completion_tokens` and
    `finish_reason` are what `Engine.generate`'s Answer says for the same prompt."""

    def __init__(self, tokens: Iterator[int], text: _TextStream, limit: int):
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._deltas = self._run(tokens, text, limit)

    def __next__(self) -> str:
        return next(self._deltas)

    def _run(self, tokens: Iterator[int], text: _TextStream, limit: int) -> Iterator[str]:
        reason = "stop"  # an eos (the generator ends) or a stop string
        for token in tokens:
            self.completion_tokens += 1
            if delta := text.push(token):
                yield delta
            if text.stopped:
                break
            if self.completion_tokens == limit:
                reason = "length"
                break
        self.finish_reason = reason
        if not text.stopped and (delta := text.finish()):
            yield delta


def _tokens_until_stop(tokenizer: Tokenizer, tokens: list[int], stop: Sequence[str]) -> int:
    """How many of `tokens` were generated up to the first one that completes a stop string."""
    for n in range(1, len(tokens) + 1):
        if truncate_at_stop(tokenizer.decode(tokens[:n]), stop)[1]:
            return n
    return len(tokens)


class _TextStream:
    """Turns token ids into text deltas that never need taking back (see `Engine.stream`)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = ""  # the text yielded so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now safe to show (maybe empty)."""
        self.tokens.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """The text held back at the end of generation (trailing whitespace excepted)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        full = self.tokenizer.decode(self.tokens)
        if not final and full.endswith(REPLACEMENT):  # an incomplete multi-byte character: wait for the rest
            return ""
        text, self.stopped = truncate_at_stop(full, self.stop)
        if not (final or self.stopped):  # hold back what may be the start of a stop string
            text = text[:len(text) - _held_back(text, self.stop)]
        ready = text.strip()
        if not ready.startswith(self.emitted):  # SentencePiece decoding only appends; never take text back
            return ""
        delta, self.emitted = ready[len(self.emitted):], ready
        return delta


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
