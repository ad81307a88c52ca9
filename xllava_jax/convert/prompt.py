"""The prompt a model is used with: inferred from a Hugging Face source, resolved against the user's
flags, and written back as a chat template.

A prompt record is {"template", "mode", "system"} (system None: the template's own). `xllava train` and
`xllava convert hf2jax` store one in our checkpoints; for a Hugging Face directory (or a checkpoint
converted before records existed) `infer_prompt` reads it off the source, strongest evidence first:
a chat template (`[INST]`: llava_llama_2, `ASSISTANT:`: vicuna_v1; one this module wrote gives back its
template and system prompt exactly), then model names (the directory's, the config's `_name_or_path`s:
LLaMA-2 / X-LLaVA: llava_llama_2, Vicuna / LLaVA-1.5: vicuna_v1), else llava_llama_2, said so. The mode
is `llava` for the original LLaVA release layout (its code's ids) or a tokenizer configured `legacy: true`,
else `clean`. `resolve_prompt` is the one rule every command applies on top (generate, chat, serve, eval
run, jax2hf).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from xllava_jax import checkpoint as ckpt
from xllava_jax.config import ConfigError
from xllava_jax.convert import formats
from xllava_jax.data import conversation as conv
from xllava_jax.errors import UserError
from xllava_jax.tokenizer import hf_files

DEFAULT_TEMPLATE = "llava_llama_2"  # the X-LLaVA recipe's
DEFAULT_MODE = "clean"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # read by transformers 5's tokenizers and processors
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"  # a processor file of transformers 4.4x; 5.x still prefers it
# A model name -> its template; the first rule that matches any name wins (LLaVA's own builder checks
# `llama-2` before `v1`).
_NAME_RULES = ((re.compile(r"llama[-_ ]?2|x-?llava", re.IGNORECASE), "llava_llama_2"),
               (re.compile(r"vicuna|llava[-_ ]?v?1[._-]?5", re.IGNORECASE), "vicuna_v1"))
_OUR_TAG = re.compile(re.escape(conv.CHAT_TEMPLATE_TAG) + r"(\w+)")
_OUR_SYSTEM = re.compile(r"\{%- set default_system = (\"(?:[^\"\\]|\\.)*\") -%\}")


class PromptError(UserError):
    """A tokenizer file that a chat template cannot be written into."""


@dataclass(frozen=True)
class Inferred:
    """A prompt record, what it was read from (`reason`), and whether it is a default nothing supported."""

    record: dict[str, Any]
    reason: str
    guessed: bool = False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def chat_templates(directory: Path) -> list[tuple[str, str]]:
    """(file name, Jinja text) of every chat template in `directory`, in the order transformers prefers them."""
    found = []
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        found.append((CHAT_TEMPLATE_FILE, (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")))
    for name in (LEGACY_CHAT_TEMPLATE_FILE, hf_files.CONFIG_FILE):
        value = (_read_json(directory / name) or {}).get("chat_template") if (directory / name).is_file() else None
        if isinstance(value, list):  # named templates: [{"name", "template"}], the default one first
            value = next((t.get("template") for t in sorted(value, key=lambda t: t.get("name") != "default")
                          if isinstance(t, dict)), None)
        if isinstance(value, str):
            found.append((name, value))
    return found


def _from_chat_template(text: str) -> tuple[str, str | None] | None:
    """(template, system or None) a chat template speaks, or None when it is none of ours."""
    ours = _OUR_TAG.search(text)
    if ours and ours[1] in conv.TEMPLATES:
        found = _OUR_SYSTEM.search(text)
        system = json.loads(found[1]) if found else None
        return ours[1], None if system == conv.DEFAULT_SYSTEM[ours[1]] else system
    if "[INST]" in text:
        return "llava_llama_2", None
    if "ASSISTANT:" in text:
        return "vicuna_v1", None
    return None


def snapshot_repo(directory: Path) -> str | None:
    """The repository id ("org/name") of a Hugging Face hub cache snapshot directory, else None."""
    repo = directory.absolute().parent.parent.name
    if directory.absolute().parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return None


def model_names(directory: Path, config: dict[str, Any]) -> list[str]:
    """The names a model goes by: its directory's (a hub cache snapshot's repository id), then the
    `_name_or_path` of its config and text config."""
    names = [snapshot_repo(directory) or directory.absolute().name]
    for part in (config, config.get("text_config") or {}):
        if isinstance(part.get("_name_or_path"), str) and part["_name_or_path"]:
            names.append(part["_name_or_path"])
    return names


def infer_prompt(directory: str | Path, config: dict[str, Any], fmt: str) -> Inferred:
    """The prompt record of a model in reading format `fmt` from its `directory` (chat templates and
    tokenizer_config.json) and its config.json contents."""
    directory = Path(directory)
    tokenizer_config = _read_json(directory / hf_files.CONFIG_FILE) or {}
    legacy = isinstance(tokenizer_config, dict) and tokenizer_config.get("legacy") is True
    mode = "llava" if fmt == "llava" or legacy else DEFAULT_MODE
    for name, text in chat_templates(directory):
        spoken = _from_chat_template(text)
        if spoken:
            return Inferred({"template": spoken[0], "mode": mode, "system": spoken[1]}, f"the chat template in {name}")
    for name in model_names(directory, config):
        for pattern, template in _NAME_RULES:
            if pattern.search(name):
                return Inferred({"template": template, "mode": mode, "system": None}, f"the model name {name!r}")
    return Inferred({"template": DEFAULT_TEMPLATE, "mode": mode, "system": None},
                    f"nothing in {directory} tells the prompt template (no chat template, no known model name), so "
                    f"{DEFAULT_TEMPLATE} (X-LLaVA's); pass --template vicuna_v1 for a LLaVA-1.5 (Vicuna) model",
                    guessed=True)


def recorded_prompt(path: str | Path) -> Inferred:
    """The prompt record of our checkpoint (its own, else inferred from the source it was converted from)
    or of a Hugging Face directory (inferred); an empty record for what holds no language model."""
    path = Path(path)
    if ckpt.is_checkpoint(path):
        meta = ckpt.read_meta(path)
        source = meta.get("source") or {}
        if meta.get("prompt"):
            return Inferred(meta["prompt"], "the checkpoint's record")
        if meta["kind"] == "xllava" and source.get("config") and meta.get("source_format"):
            return infer_prompt(path, source["config"], meta["source_format"])
        return Inferred({}, "no record")
    config = _read_json(path / "config.json")
    try:
        fmt = formats.detect_format(config) if isinstance(config, dict) else None
    except ConfigError:
        fmt = None  # loading the model says what is wrong with it
    return Inferred({}, "no language model") if fmt in (None, "clip") else infer_prompt(path, config, fmt)


def resolve_prompt(record: dict[str, Any] | None, template: str | None = None, mode: str | None = None,
                   system: str | None = None) -> tuple[str, str, str | None]:
    """(template, mode, system) from a prompt record and the user's flags (None: not given). A flag wins;
    the recorded system prompt goes with the recorded template only (None: the template's own)."""
    record = record or {}
    chosen = template or record.get("template") or DEFAULT_TEMPLATE
    if system is None and chosen == record.get("template"):
        system = record.get("system")
    return chosen, mode or record.get("mode") or DEFAULT_MODE, system


def write_chat_template(directory: str | Path, template: str, mode: str, system: str | None,
                        image_token_id: int | None = None) -> None:
    """Make the tokenizer files in `directory` prompt as we do: `conv.chat_template` in chat_template.jinja,
    tokenizer_config.json (`chat_template`; `legacy` true for `llava` mode, false for `clean`; created from
    tokenizer.model when missing) and a legacy chat_template.json when there is one. `image_token_id`, when it
    lies past the SentencePiece vocabulary and no token holds it, becomes the `<image>` token HF LLaVA
    processors expand."""
    directory = Path(directory)
    text = conv.chat_template(template, system, mode)
    (directory / CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")
    if (directory / LEGACY_CHAT_TEMPLATE_FILE).is_file():
        (directory / LEGACY_CHAT_TEMPLATE_FILE).write_text(json.dumps({"chat_template": text}, ensure_ascii=False))
    config_path, model_path = directory / hf_files.CONFIG_FILE, directory / "tokenizer.model"
    proto = None
    if model_path.is_file():
        proto = sp_pb2.ModelProto()
        try:
            proto.ParseFromString(model_path.read_bytes())
        except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
            raise PromptError(f"{model_path}: not a SentencePiece model ({e})") from None
    if config_path.is_file():
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise PromptError(f"{config_path}: not a JSON object; cannot add the chat template to it")
    elif proto is not None:
        config = hf_files.tokenizer_config(proto, {})
    else:
        return
    config.update(chat_template=text, legacy=mode == "llava")
    added = config.setdefault("added_tokens_decoder", {})
    if (image_token_id is not None and proto is not None and image_token_id >= len(proto.pieces)
            and str(image_token_id) not in added and all(hf_files.token_text(v) != conv.IMAGE for v in added.values())):
        added[str(image_token_id)] = {"content": conv.IMAGE, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
