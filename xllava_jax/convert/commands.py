"""`xllava convert hf2jax` and `jax2hf`: whole checkpoints both ways, with what a model needs besides its
weights: the prompt record (inferred from the source, written back as a chat template), the layout to
write, and the vision tower's hub name.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from xllava_jax import checkpoint as ckpt
from xllava_jax.convert import hf
from xllava_jax.convert.load import DEFAULT_SHARD_BYTES, ConversionError, installed_layout, load_hf, save_hf
from xllava_jax.convert.prompt import infer_prompt, recorded_prompt, resolve_prompt, snapshot_repo
from xllava_jax.data import conversation as conv


def _hub_name(value: Any) -> str | None:
    """`value` when it reads as a hub repository id ("org/name"), not a local path."""
    ok = isinstance(value, str) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", value) and not Path(value).exists()
    return value if ok else None


def vision_hub_name(config: dict[str, Any] | None, vision: dict[str, Any] | None,
                    vision_dir: str | Path | None = None) -> str | None:
    """The hub name of a model's vision tower: the original layout's `mm_vision_tower`, else the `_name_or_path`
    of the vision config (a CLIP directory's, or hf-llava's `vision_config`), else the hub cache snapshot
    `vision_dir` is; None when none is known."""
    config, vision = config or {}, vision or {}
    candidates = (config.get("mm_vision_tower"), vision.get("_name_or_path"),
                  (config.get("vision_config") or {}).get("_name_or_path"),
                  snapshot_repo(Path(vision_dir)) if vision_dir else None)
    return next((name for name in map(_hub_name, candidates) if name), None)


def hf_to_checkpoint(src: str | Path, out: str | Path, *, vision_src: str | Path | None = None,
                     param_dtype: str | None = None, allow_bin: bool = False, template: str | None = None,
                     progress: bool = False) -> Path:
    """`xllava convert hf2jax`: a HF directory -> our checkpoint (tokenizer files copied), with the prompt record
    inferred from the source (`template` overrides it; what was chosen and why is said on stderr) and the
    vision tower's hub name."""
    if ckpt.is_checkpoint(out) or (Path(out) / "params").exists():
        raise ConversionError(f"{out}: already holds a checkpoint; choose an empty `out` directory")
    if template is not None and template not in conv.TEMPLATES:
        raise ConversionError(f"unknown `template` {template!r}; choose one of {', '.join(conv.TEMPLATES)}")
    model, meta = load_hf(src, vision_src=vision_src, param_dtype=param_dtype, allow_bin=allow_bin,
                          progress=progress)
    source = {"config": meta["source"], "vision": meta.get("vision_source"),
              "vision_name": vision_hub_name(meta["source"], meta.get("vision_source"), vision_src)}
    record = None
    if meta["format"] != "clip":
        inferred = infer_prompt(src, meta["source"], meta["format"])
        record, reason = inferred.record, inferred.reason
        if template is not None:
            record, reason = {**record, "template": template, "system": None}, "--template"
        print(f"xllava: prompt template {record['template']}, {record['mode']} ids ({reason})", file=sys.stderr)
    return ckpt.save_checkpoint(out, model, source=source, source_format=meta["format"], tokenizer_dir=src,
                                prompt=record)


def export_layout(fmt: str | None, layout: str | None) -> str:
    """The layout `jax2hf` writes for its --format (what is written: hf-llava, llava, llama, clip) and --layout
    (the key names of a LLaVA model: hf5, hf4_52, hf4, llava; default: the installed transformers')."""
    if fmt is not None and fmt not in hf.FORMATS:
        raise ConversionError(f"unknown `fmt` {fmt!r}; choose one of {', '.join(hf.FORMATS)}")
    if layout is not None and layout not in (*hf.HF_LLAVA_LAYOUTS, "llava"):
        raise ConversionError(f"unknown `layout` {layout!r}; choose one of {', '.join(hf.HF_LLAVA_LAYOUTS)}, llava")
    fmt = fmt or ("llava" if layout == "llava" else "hf-llava")
    if layout is not None and hf.FORMAT_OF[layout] != fmt:
        raise ConversionError(f"`layout` {layout} does not go with `fmt` {fmt}: `layout` names the keys of a "
                              "LLaVA export (hf5, hf4_52, hf4 for `fmt` hf-llava; llava for `fmt` llava)")
    return layout or (installed_layout() if fmt == "hf-llava" else fmt)


def checkpoint_to_hf(src: str | Path, out: str | Path, fmt: str | None = None, layout: str | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> Path:
    """`xllava convert jax2hf`: our checkpoint -> a HF directory (`export_layout(fmt, layout)`), its tokenizer
    files with the chat template of the checkpoint's prompt (resolved as inference resolves it)."""
    layout = export_layout(fmt, layout)
    model, meta = ckpt.load_checkpoint(src)
    source = meta.get("source") or {}
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: exists and is not empty")
    inferred = recorded_prompt(src)
    if inferred.guessed:
        print(f"xllava: note: {inferred.reason}", file=sys.stderr)
    vision_name = source.get("vision_name") or vision_hub_name(source.get("config"), source.get("vision"))
    return save_hf(model, out, layout, source=source.get("config"), vision_source=source.get("vision"),
                   tokenizer_dir=src, prompt=resolve_prompt(inferred.record), vision_name=vision_name,
                   max_shard_bytes=max_shard_bytes, progress=progress)
