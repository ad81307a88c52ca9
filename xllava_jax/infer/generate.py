"""Text generation: a jitted prefill plus a decode loop over a static KV cache.

Prompts are left-padded up to a length bucket, so prompts of different lengths share one compiled
program per (batch, prompt bucket, max_new_tokens, image shape). The whole decode loop runs inside that
program as a `jax.lax.while_loop`, which exits as soon as every row has stopped. Sampling settings
(temperature, top-k, top-p), the seed, the eos ids and the pad id are runtime values, never part of the
compilation key. Positions follow HF: `cumsum(attention_mask) - 1`, so a left-padded row produces the
same tokens as when it runs alone.

Cache layout for a prompt bucket P and N new tokens: slots 0..P-1 hold the left-padded prompt, decode
step t (t >= 1) writes the previous token at slot P + t - 1 with position `num_prompt_tokens + t - 1`.

`Generator.stream` yields tokens one at a time for a single prompt (terminal chat); it runs the same
prefill and a single jitted decode step, compiled once per cache length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xllava_jax.models.llama import KVCache
from xllava_jax.models.xllava import XLlava, check_placeholder_count

SamplingArrays = tuple[jax.Array, jax.Array, jax.Array]  # temperature float32[], top_k int32[], top_p float32[]


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    temperature 0 means greedy decoding; otherwise logits are divided by it, then filtered by `top_k`
    (0: off) and `top_p` (nucleus; 1.0: off) before sampling. Generation of a row stops after one of
    `eos_token_ids` or after `max_new_tokens`. Prompt lengths are padded up to a multiple of `bucket`
    (0: to the next power of two, at least 16).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int = 0
    bucket: int = 64

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.bucket < 0:
            raise ValueError(f"bucket must be >= 0, got {self.bucket}")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    def replace(self, **changes) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def bucket_length(self, length: int) -> int:
        """The padded prompt length for a prompt of `length` tokens."""
        if self.bucket == 0:
            return max(16, 1 << (length - 1).bit_length())
        return -(-length // self.bucket) * self.bucket


@dataclass(frozen=True)
class GenerationResult:
    """Per row: the new token ids (cut before the first eos; the eos itself is not included), the
    number of real prompt tokens, and why the row stopped: "stop" (eos or stop string) or "length"."""

    tokens: list[list[int]]
    num_prompt_tokens: list[int]
    finish_reasons: list[str]


# ------------------------------------------------------------------------------ pure functions
def greedy_tokens(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` as int32[B] (the first maximum; the first NaN where a row has
    one), computed as a max and a min over the indices that reach it: two plain reductions, where
    XLA:CPU runs argmax's (value, index) reduction unvectorised."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), index, logits.shape[-1]), axis=-1)


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingArrays) -> jax.Array:
    """Pick the next token per row: float[B, V] -> int32[B]. Greedy when the temperature is 0."""
    temperature, top_k, top_p = sampling

    def draw() -> jax.Array:
        scaled = logits.astype(jnp.float32) / temperature
        ordered = -jnp.sort(-scaled, axis=-1)
        kth = ordered[:, jnp.clip(top_k - 1, 0, scaled.shape[-1] - 1)]
        kth = jnp.where(top_k > 0, kth, -jnp.inf)[:, None]
        ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before a token is under top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        allowed = (scaled >= kth) & (scaled >= cutoff)
        return jax.random.categorical(key, jnp.where(allowed, scaled, -jnp.inf)).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda: greedy_tokens(logits))


def _prefill(model: XLlava, input_ids: jax.Array, prompt_mask: jax.Array, pixel_values: jax.Array | None,
             max_new_tokens: int) -> tuple[jax.Array, KVCache, jax.Array]:
    """Run the left-padded prompt int[B, P] (mask int[B, P]) into a fresh cache of P + max_new_tokens
    slots. Returns (last-position logits float[B, V], cache, cache mask int32[B, P + max_new_tokens])."""
    b, p = input_ids.shape
    cache = model.language_model.init_cache(b, p + max_new_tokens)
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.where(prompt_mask > 0, jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    embeds = model.embed(input_ids, pixel_values)
    lm = model.language_model
    hidden, cache = lm.hidden_states(inputs_embeds=embeds, attention_mask=cache_mask, position_ids=positions,
                                     cache=cache, cache_index=0)
    return lm.logits(hidden[:, -1]), cache, cache_mask  # the lm_head for the last position only


def _decode_step(model: XLlava, tokens: jax.Array, cache: KVCache, slot: jax.Array, positions: jax.Array,
                 cache_mask: jax.Array) -> tuple[jax.Array, KVCache]:
    """Feed tokens int32[B] at cache slot `slot` with positions int32[B] -> (logits float[B, V], cache)."""
    embeds = model.language_model.embed(tokens[:, None])
    logits, cache = model.decode(embeds, cache, slot, cache_mask, positions[:, None])
    return logits[:, 0], cache


def _generate(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, prompt_mask: jax.Array,
              pixel_values: jax.Array | None, key: jax.Array, sampling: SamplingArrays, eos_ids: jax.Array,
              pad_id: jax.Array, *, max_new_tokens: int) -> jax.Array:
    """Prefill + the whole decode loop. input_ids, prompt_mask int32[B, P] (left-padded) ->
    new tokens int32[B, max_new_tokens]; after a row's first eos (kept here) come `pad_id`s."""
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    logits, cache, cache_mask = _prefill(model, input_ids, prompt_mask, pixel_values, max_new_tokens)
    num_prompt = prompt_mask.sum(axis=1, dtype=jnp.int32)
    first = sample_tokens(logits, jax.random.fold_in(key, 0), sampling)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def running(carry) -> jax.Array:
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(carry):
        step, prev, done, cache, out = carry
        logits, cache = _decode_step(model, prev, cache, p + step - 1, num_prompt + step - 1, cache_mask)
        tokens = sample_tokens(logits, jax.random.fold_in(key, step), sampling)
        tokens = jnp.where(done, pad_id, tokens)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, step))
        return step + 1, tokens, done | jnp.isin(tokens, eos_ids), cache, out

    carry = (jnp.int32(1), first, jnp.isin(first, eos_ids), cache, out)
    return jax.lax.while_loop(running, advance, carry)[-1]


def _stream_prefill(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, prompt_mask: jax.Array,
                    pixel_values: jax.Array | None, key: jax.Array, sampling: SamplingArrays, *,
                    max_new_tokens: int) -> tuple[jax.Array, KVCache, jax.Array]:
    """The prefill of `_generate` on its own: (first tokens int32[B], cache, cache mask int32[B, L])."""
    model = nnx.merge(graphdef, state)
    logits, cache, cache_mask = _prefill(model, input_ids, prompt_mask, pixel_values, max_new_tokens)
    return sample_tokens(logits, jax.random.fold_in(key, 0), sampling), cache, cache_mask


def _stream_step(graphdef: nnx.GraphDef, state: nnx.State, prev: jax.Array, cache: KVCache,
                 cache_mask: jax.Array, step: jax.Array, prompt_len: jax.Array, num_prompt: jax.Array,
                 key: jax.Array, sampling: SamplingArrays) -> tuple[jax.Array, KVCache]:
    """One iteration of `_generate`'s loop: token `step - 1` int32[B] in, token `step` int32[B] out."""
    model = nnx.merge(graphdef, state)
    logits, cache = _decode_step(model, prev, cache, prompt_len + step - 1, num_prompt + step - 1, cache_mask)
    return sample_tokens(logits, jax.random.fold_in(key, step), sampling), cache


# ------------------------------------------------------------------------------------ Generator
class Generator:
    """Generates with a fixed snapshot of `model`'s weights (taken at construction).

    Compiled programs are cached per (function, static settings, argument shapes); `num_compiled`
    says how many exist.
    """

    def __init__(self, model: XLlava):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self._compiled: dict[tuple, Callable] = {}

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def _call(self, fn: Callable, static: dict, *args, donate: tuple[int, ...] = ()):
        """Run `fn(graphdef, state, *args, **static)`, compiling it once per static settings and shapes."""
        leaves, tree = jax.tree.flatten(args)
        key = (fn.__name__, tuple(sorted(static.items())), tree, tuple((x.shape, x.dtype) for x in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            jitted = jax.jit(partial(fn, self.graphdef, **static), donate_argnums=tuple(d + 1 for d in donate))
            compiled = self._compiled[key] = jitted.lower(self.state, *args).compile()
        return compiled(self.state, *args)

    def _prepare(self, prompts, attention_mask, pixel_values, config: GenerationConfig):
        """Left-pad the prompts to their bucket: (input_ids int32[B, P], mask int32[B, P], pixel_values,
        number of real tokens per row)."""
        if isinstance(prompts, (np.ndarray, jax.Array)):
            ids = np.asarray(prompts)
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
            if ids.ndim != 2 or mask.shape != ids.shape:
                raise ValueError(f"input_ids must be int[B, S] with a mask of the same shape, got "
                                 f"{ids.shape} and {mask.shape}")
            prompts = [row[m > 0].tolist() for row, m in zip(ids, mask)]
        rows = [list(map(int, p)) for p in prompts]
        if not rows or min(map(len, rows)) == 0:
            raise ValueError("every prompt needs at least one token")
        lengths = [len(r) for r in rows]
        width = config.bucket_length(max(lengths))
        ids = np.full((len(rows), width), config.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values, self.cfg.compute_dtype)
            if pixel_values.ndim == 4:  # checked here: inside the compiled program the ids are traced
                features = pixel_values.shape[0] * self.cfg.num_image_tokens
                check_placeholder_count(ids == self.cfg.image_token_id, features)
        return jnp.asarray(ids), jnp.asarray(mask), pixel_values, lengths

    @staticmethod
    def _runtime(config: GenerationConfig) -> tuple[jax.Array, SamplingArrays]:
        """The seed's key and the sampling settings as arrays (runtime values, not compile keys)."""
        sampling = (jnp.float32(config.temperature), jnp.int32(config.top_k), jnp.float32(config.top_p))
        return jax.random.key(config.seed), sampling

    def generate(self, prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array, pixel_values=None,
                 config: GenerationConfig = GenerationConfig(), *, attention_mask=None) -> GenerationResult:
        """Generate for a batch of prompts.

        prompts: token-id lists of any lengths, or input_ids int[B, S] with `attention_mask` int[B, S]
        (padding on either side); one image placeholder id per image feature. pixel_values:
        float[N, H, W, 3] (placeholders of the whole batch take the images in order) or
        float[B, M, H, W, 3] (M images per row), normalised, channels last.
        """
        ids, mask, pixel_values, lengths = self._prepare(prompts, attention_mask, pixel_values, config)
        key, sampling = self._runtime(config)
        eos = np.full(max(4, -(-len(config.eos_token_ids) // 4) * 4), -1, np.int32)
        eos[:len(config.eos_token_ids)] = config.eos_token_ids
        out = self._call(_generate, {"max_new_tokens": config.max_new_tokens}, ids, mask, pixel_values, key,
                         sampling, jnp.asarray(eos), jnp.int32(config.pad_token_id))
        tokens, reasons = [], []
        for row in np.asarray(out).tolist():
            stops = [i for i, t in enumerate(row) if t in config.eos_token_ids]
            tokens.append(row[:stops[0]] if stops else row)
            reasons.append("stop" if stops else "length")
        return GenerationResult(tokens, lengths, reasons)

    def stream(self, prompt: Sequence[int], pixel_values=None,
               config: GenerationConfig = GenerationConfig()) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are made (the eos is not yielded).

        Same tokens as `generate([prompt], ...)` with the same config. pixel_values: float[N, H, W, 3].
        The decode step compiles once per cache length (prompt bucket + max_new_tokens).
        """
        ids, mask, pixel_values, lengths = self._prepare([prompt], None, pixel_values, config)
        key, sampling = self._runtime(config)
        static = {"max_new_tokens": config.max_new_tokens}
        token, cache, cache_mask = self._call(_stream_prefill, static, ids, mask, pixel_values, key, sampling)
        prompt_len, num_prompt = jnp.int32(ids.shape[1]), jnp.asarray(lengths, jnp.int32)
        for step in range(1, config.max_new_tokens + 1):
            value = int(token[0])
            if value in config.eos_token_ids:
                return
            yield value
            if step == config.max_new_tokens:
                return
            token, cache = self._call(_stream_step, {}, token, cache, cache_mask, jnp.int32(step), prompt_len,
                                      num_prompt, key, sampling, donate=(1,))


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest occurrence of any stop string; says whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def generate_text(generator: Generator, decode: Callable[[list[int]], str],
                  prompts: Sequence[Sequence[int]], pixel_values=None,
                  config: GenerationConfig = GenerationConfig(), stop_strings: Sequence[str] = ()) -> list[str]:
    """Generate, decode each row with `decode(token_ids) -> str`, and cut it at the first stop string."""
    result = generator.generate(prompts, pixel_values, config)
    return [truncate_at_stop(decode(tokens), stop_strings)[0] for tokens in result.tokens]
