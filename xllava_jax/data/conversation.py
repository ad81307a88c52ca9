"""Conversation templates and supervision spans, built by construction.

A conversation is rendered into pieces (text, bos, eos, image), each marked supervised or not, and
the pieces are tokenised one by one, so labels never disagree with input ids (no "tokenization
mismatch"). Supervised: every assistant answer and the eos that closes it; everything else is -100.

Two tokenisation modes:
- `clean` (default): the first text piece is tokenised as a fresh string, every later piece as a
  continuation, so the ids are those of the whole template string.
- `llava`: the ids the original LLaVA / X-LLaVA code produces, for continuing training of or
  evaluating a released checkpoint: `tokenizer_image_token(prompt)` with LLaMA's legacy slow
  tokenizer (text on each side of `<image>` and between special tokens tokenised as a fresh string,
  literal `<s>` / `</s>` as bos / eos). Labels mark the tokens that fall on answer characters.

`chat_template` writes each template as a Jinja chat template for transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.errors import UserError
from xllava_jax.tokenizer.runtime import Tokenizer

IMAGE = "<image>"
TEMPLATES = ("plain", "llava_llama_2", "vicuna_v1")
MODES = ("clean", "llava")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
DEFAULT_SYSTEM = {"llava_llama_2": LLAMA2_SYSTEM, "vicuna_v1": VICUNA_SYSTEM, "plain": ""}


class ConversationError(UserError):
    """A conversation that the template cannot render."""


@dataclass(frozen=True)
class Piece:
    """One rendered piece: kind is "text", "image", "bos" or "eos"."""

    kind: str
    text: str = ""
    supervised: bool = False

    def literal(self) -> str:
        return {"text": self.text, "image": IMAGE, "bos": "<s>", "eos": "</s>"}[self.kind]


@dataclass(frozen=True)
class Encoded:
    """input_ids int[S] (image slots as `num_image_tokens` placeholder ids) and labels int[S]."""

    input_ids: list[int]
    labels: list[int]


def move_image_first(text: str) -> str:
    """LLaVA's rule (preprocess_multimodal): `<image>` goes to the start of its turn, followed by a newline
    and the rest of the turn stripped; a turn that is only `<image>` stays `<image>`, with no newline."""
    if IMAGE not in text:
        return text
    if text.count(IMAGE) > 1:
        raise ConversationError(f"a turn holds {text.count(IMAGE)} {IMAGE} tags; one image per sample is supported")
    rest = text.replace(IMAGE, "").strip()
    return f"{IMAGE}\n{rest}" if rest else IMAGE


def _split_image(text: str) -> list[Piece]:
    head, sep, tail = text.partition(IMAGE)
    pieces = [Piece("text", head)] if head else []
    if sep:
        pieces.append(Piece("image"))
        if tail:
            pieces.append(Piece("text", tail))
    return pieces


def _check_turns(turns: list[tuple[str, str]], generation: bool) -> None:
    if not turns:
        raise ConversationError("empty conversation")
    for i, (role, _) in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if role != want:
            raise ConversationError(f"turn {i} is {role!r}, expected {want!r} (turns must alternate, human first)")
    if not generation and len(turns) % 2:
        raise ConversationError("the last turn must be the assistant's (gpt)")
    if generation and len(turns) % 2 == 0:
        raise ConversationError("a generation prompt must end with a human turn")


def render(template: str, turns: list[tuple[str, str]], *, system: str | None = None,
           generation: bool = False) -> list[Piece]:
    """Pieces of `turns` ((role, text) with role "human" / "gpt") under `template`.

    generation=True renders a prompt that ends where the model starts answering. A training sample
    (generation=False) whose first turn is the assistant's loses that turn, as LLaVA's preprocess_v1 /
    preprocess_llama_2 skip a first turn that is not the human's (LLaVA's `plain` asserts instead).
    """
    if template not in TEMPLATES:
        raise ConversationError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if not generation and turns and turns[0][0] == "gpt":
        turns = turns[1:]
    _check_turns(turns, generation)
    system = DEFAULT_SYSTEM[template] if system is None else system
    turns = [(role, move_image_first(text) if role == "human" else text) for role, text in turns]
    pieces = [Piece("bos")]
    if template == "plain":
        # Stage 1: the image, then the caption; the human text is dropped.
        if IMAGE not in turns[0][1]:
            raise ConversationError(f"the plain template needs {IMAGE} in the human turn")
        pieces.append(Piece("image"))
        if not generation:
            pieces += [Piece("text", turns[1][1], True), Piece("text", "\n", True)]
        return pieces
    for k in range(0, len(turns), 2):
        question = turns[k][1]
        answer = turns[k + 1][1] if k + 1 < len(turns) else None
        if template == "llava_llama_2":
            if k == 0:
                question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}" if system else question
            else:
                pieces.append(Piece("bos"))
            pieces += _split_image(f"[INST] {question} [/INST]")
            if answer is not None:
                pieces += [Piece("text", f" {answer} ", True), Piece("eos", supervised=True)]
        else:
            prefix = f"{system} " if k == 0 else ""
            pieces += _split_image(f"{prefix}USER: {question} ASSISTANT:")
            if answer is not None:
                pieces += [Piece("text", f" {answer}", True), Piece("eos", supervised=True)]
    return _merge_text(pieces)


def _merge_text(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out and p.kind == "text" and out[-1].kind == "text" and out[-1].supervised == p.supervised:
            out[-1] = Piece("text", out[-1].text + p.text, p.supervised)
        else:
            out.append(p)
    return out


def template_text(pieces: list[Piece]) -> str:
    """The template string with `<s>`, `</s>` and `<image>` spelled out; the leading bos is left out,
    as LLaVA's get_prompt() leaves it to the tokenizer."""
    return "".join(p.literal() for p in _without_leading_bos(pieces))


def _without_leading_bos(pieces: list[Piece]) -> list[Piece]:
    return pieces[1:] if pieces and pieces[0].kind == "bos" else pieces


def encode(pieces: list[Piece], tokenizer: Tokenizer, *, num_image_tokens: int, image_token_id: int,
           mode: str = "clean") -> Encoded:
    """Token ids and labels of rendered pieces (see the module docstring for the modes)."""
    if mode == "clean":
        return _encode_clean(pieces, tokenizer, num_image_tokens, image_token_id)
    if mode == "llava":
        return _encode_llava(pieces, tokenizer, num_image_tokens, image_token_id)
    raise ConversationError(f"unknown tokenisation mode {mode!r}; choose one of {MODES}")


def encode_turns(template: str, turns: list[tuple[str, str]], tokenizer: Tokenizer, *, num_image_tokens: int,
                 image_token_id: int, mode: str = "clean", system: str | None = None,
                 generation: bool = False) -> Encoded:
    """`render` then `encode`: the ids and labels of `turns` under `template` (system None: the template's
    own); generation=True gives a prompt that ends where the model starts answering."""
    pieces = render(template, turns, system=system, generation=generation)
    return encode(pieces, tokenizer, num_image_tokens=num_image_tokens, image_token_id=image_token_id, mode=mode)


def _encode_clean(pieces, tok: Tokenizer, num_image_tokens: int, image_token_id: int) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    started = False
    for p in pieces:
        if p.kind == "bos":
            new = [tok.bos_id]
        elif p.kind == "eos":
            new = [tok.eos_id]
        elif p.kind == "image":
            new = [image_token_id] * num_image_tokens
            started = True
        else:
            new = tok.encode(p.text, start=not started)
            started = True
        ids += new
        labels += new if p.supervised else [IGNORE_INDEX] * len(new)
    return Encoded(ids, labels)


def _encode_llava(pieces, tok: Tokenizer, num_image_tokens: int, image_token_id: int) -> Encoded:
    # Lay the prompt string out as LLaVA's get_prompt() does, noting where supervised characters sit.
    text, spans = "", []
    for p in _without_leading_bos(pieces):
        lit = p.literal()
        if p.supervised:
            spans.append((len(text), len(text) + len(lit)))
        text += lit
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    offset = 0
    for i, chunk in enumerate(text.split(IMAGE)):
        if i:
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            offset += len(IMAGE)
        for token, begin, end in tok.llama_slow_tokens(chunk):
            ids.append(token)
            supervised = any(s <= offset + begin < e or (begin < end and s < offset + end <= e) for s, e in spans)
            labels.append(token if supervised else IGNORE_INDEX)
        offset += len(chunk)
    return Encoded(ids, labels)


# ------------------------------------------------------------------------------ chat templates
CHAT_TEMPLATE_TAG = "xllava_jax chat template: "

# One Jinja block per template: how a user turn, an assistant turn and the generation prompt are written.
# `first` is true on the first user turn; `prefix` (see `chat_template`) opens the first text.
_JINJA_TURNS = {
    "llava_llama_2": (
        "{%- if first -%}{{- prefix + '[INST] ' + ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if system else '') -}}"
        "{%- else -%}{{- bos_token + '[INST] ' -}}{%- endif -%}{{- text + ' [/INST]' -}}",
        "{{- ' ' + text + ' ' + eos_token -}}",
        ""),
    "vicuna_v1": (
        "{{- (prefix + system + ' ' if first else '') + 'USER: ' + text + ' ' -}}",
        "{{- 'ASSISTANT: ' + text + eos_token -}}",
        "{{- 'ASSISTANT:' -}}"),
    "plain": (
        "{%- if first -%}{%- if not has_image -%}{{- raise_exception('the plain template needs an image in the "
        "first user turn') -}}{%- endif -%}{{- '<image>' -}}{%- endif -%}",
        "{%- if loop.index0 == 1 -%}{{- text + '\\n' -}}{%- endif -%}",
        ""),
}

_JINJA = """{#- @tag@ (system prompt: default_system, or the system messages) -#}
{%- set default_system = @default@ -%}
{%- set prefix = @prefix@ -%}
{%- macro text_of(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{{- content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system=none) -%}
{%- for message in messages if message.role == 'system' -%}
{%- set ns.system = text_of(message.content) if ns.system is none else ns.system + '\\n' + text_of(message.content) -%}
{%- endfor -%}
{%- set system = default_system if ns.system is none else ns.system -%}
{{- bos_token -}}
{%- for message in messages if message.role != 'system' -%}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('roles must alternate user, assistant, user, ... after the system messages') -}}
{%- endif -%}
{%- set text = text_of(message.content) -%}
{%- set has_image = message.content is not string and
                    message.content | selectattr('type', 'equalto', 'image') | list | length > 0 -%}
{%- set first = loop.first -%}
{%- if message.role == 'user' -%}
{%- if has_image or '<image>' in text -%}
{%- set has_image = true -%}
{%- set rest = text.replace('<image>', '') | trim -%}
{%- set text = '<image>\\n' + rest if rest else '<image>' -%}
{%- endif -%}
@user@
{%- else -%}
@assistant@
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}@generation@{%- endif -%}"""


def chat_template(template: str, system: str | None = None, mode: str = "clean") -> str:
    """A Jinja chat template (transformers' `apply_chat_template`) that writes conversations as `render`
    does: messages {"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text"},
    {"type": "image"}]}; system messages replace `system` (default: the template's); an image becomes
    `<image>` at the start of its turn, as HF LLaVA processors expect it.

    It opens with the bos token (transformers tokenizes rendered chats without adding special tokens). With
    the tokenizer's `legacy` set for `mode` its ids are `encode`'s: `legacy: true` (`llava`) puts
    SentencePiece's dummy prefix before every text after a special token, as `llava` mode does;
    `legacy: false` (`clean`) before none, so for `clean` the template spells out the first text's prefix
    as a space."""
    if template not in TEMPLATES:
        raise ConversationError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if mode not in MODES:
        raise ConversationError(f"unknown tokenisation mode {mode!r}; choose one of {MODES}")
    user, assistant, generation = _JINJA_TURNS[template]
    system = DEFAULT_SYSTEM[template] if system is None else system
    parts = {"tag": CHAT_TEMPLATE_TAG + template, "default": json.dumps(system, ensure_ascii=False),
             "prefix": "' '" if mode == "clean" else "''", "user": user, "assistant": assistant,
             "generation": generation}
    return re.sub(r"@(\w+)@", lambda m: parts[m[1]], _JINJA)  # one pass: inserted text is not scanned again
