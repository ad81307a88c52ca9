"""Hugging Face tokenizer files for an expanded SentencePiece model (written without transformers).

tokenizer.json holds the vocabulary and BPE merges ranked by piece score, as sentencepiece ranks them,
and a pipeline (dummy prefix, whitespace mark, byte fallback) that encodes as sentencepiece does, as the
LLaMA-2 release's tokenizer.json does. transformers 5's `AutoTokenizer` and `LlamaTokenizerFast` take the
vocabulary and merges from it and settings from tokenizer_config.json (LlamaTokenizer; bos added, eos
not, unless the base directory's tokenizer_config.json said otherwise). They give sentencepiece's ids
(after the bos) on text that does not start with whitespace; for text that does, transformers 5's
LlamaTokenizer adds no dummy-prefix space where sentencepiece adds one (true of the unexpanded LLaMA
tokenizer too). Special-token strings such as `<s>` typed inside text are parsed as special tokens by
transformers and as plain characters by sentencepiece.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as pb

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TOKENIZER_FILE = "tokenizer.json"
SPACE = "\u2581"  # sentencepiece's whitespace mark
# Settings carried over from the base directory's tokenizer_config.json when it has them.
CARRIED_KEYS = ("add_bos_token", "add_eos_token", "model_max_length", "chat_template", "padding_side", "legacy",
                "clean_up_tokenization_spaces")
Piece = pb.ModelProto.SentencePiece


def read_base_config(base_path: Path) -> dict[str, Any]:
    """The tokenizer_config.json next to the base model, or {} when there is none (or it is unreadable)."""
    try:
        config = json.loads((base_path.parent / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def token_text(value: Any) -> str | None:
    """A special token as written in a tokenizer config: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def added_tokens_beyond(config: dict[str, Any], size: int) -> list[str]:
    """`token=id` for each added token of a HF config whose id lies at or past `size` (the
    SentencePiece vocabulary): such tokens would collide with appended pieces."""
    decoder = config.get("added_tokens_decoder") or {}
    return [f"{token_text(v)}={k}" for k, v in decoder.items() if str(k).isdigit() and int(k) >= size]


def _piece_at(proto: pb.ModelProto, index: int) -> str | None:
    return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None


def special_tokens(proto: pb.ModelProto, base_config: dict[str, Any]) -> dict[str, str | None]:
    """bos/eos/unk from the model proto; pad from the base config (if it is a piece) or the proto."""
    spec = proto.trainer_spec
    pieces = {p.piece for p in proto.pieces}
    pad = token_text(base_config.get("pad_token"))
    return {"bos_token": _piece_at(proto, spec.bos_id), "eos_token": _piece_at(proto, spec.eos_id),
            "unk_token": _piece_at(proto, spec.unk_id),
            "pad_token": pad if pad in pieces else _piece_at(proto, spec.pad_id)}


def tokenizer_config(proto: pb.ModelProto, base_config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json for transformers' LlamaTokenizer (LLaMA-2's layout)."""
    specials = special_tokens(proto, base_config)
    decoder = {
        str(i): {"content": p.piece, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, p in enumerate(proto.pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN)
    }
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "clean_up_tokenization_spaces": False, "added_tokens_decoder": decoder, **specials}
    config.update({k: base_config[k] for k in CARRIED_KEYS if k in base_config})
    return config


def bpe_merges(proto: pb.ModelProto) -> list[list[str]]:
    """Every pair of normal pieces whose concatenation is a normal piece, highest-scoring result first
    (then by id): the order in which sentencepiece's BPE applies them."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, normal[left][1], normal[right][1], left, right))
    return [[left, right] for *_, left, right in sorted(ranked)]


def _template(config: dict[str, Any], specials: dict[str, str | None], ids: dict[str, int]) -> dict[str, Any]:
    """The bos/eos post-processor of tokenizer.json (TemplateProcessing)."""
    bos = specials["bos_token"] if config.get("add_bos_token") else None
    eos = specials["eos_token"] if config.get("add_eos_token") else None

    def around(sequence: str, type_id: int) -> list[dict[str, Any]]:
        def special(token: str | None) -> list[dict[str, Any]]:
            return [] if token is None else [{"SpecialToken": {"id": token, "type_id": type_id}}]

        return [*special(bos), {"Sequence": {"id": sequence, "type_id": type_id}}, *special(eos)]

    used = [t for t in dict.fromkeys((bos, eos)) if t is not None]
    return {"type": "TemplateProcessing", "single": around("A", 0), "pair": around("A", 0) + around("B", 1),
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in used}}


def tokenizer_json(proto: pb.ModelProto, config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json (the `tokenizers` format) for a SentencePiece BPE model with the settings in `config`."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    specials = special_tokens(proto, config)
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": p.type != Piece.USER_DEFINED}
             for i, p in enumerate(proto.pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)]
    steps: list[dict[str, Any]] = []
    if norm.precompiled_charsmap:
        charsmap = base64.b64encode(norm.precompiled_charsmap).decode()
        steps.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if norm.remove_extra_whitespaces:
        steps += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if norm.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": SPACE})
    if norm.escape_whitespaces:
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
        "post_processor": _template(config, specials, ids),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": _piece_at(proto, spec.unk_id),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": spec.byte_fallback, "ignore_merges": False, "vocab": ids,
                  "merges": bpe_merges(proto)},
    }


def write_hf_files(out: Path, proto: pb.ModelProto, base_config: dict[str, Any]) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`; returns their names."""
    config = tokenizer_config(proto, base_config)
    special_map = {k: v for k, v in special_tokens(proto, base_config).items() if v is not None}
    files = {TOKENIZER_FILE: tokenizer_json(proto, config), CONFIG_FILE: config, SPECIAL_MAP_FILE: special_map}
    for name, content in files.items():
        indent = None if name == TOKENIZER_FILE else 2
        (out / name).write_text(json.dumps(content, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return list(files)
