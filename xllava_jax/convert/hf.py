"""Hugging Face <-> xllava_jax parameter names, as data.

Every supported checkpoint layout is first reduced to *canonical* names (`text.*`, `lm_head.weight`,
`vision.*`, `projector.*`: HF's names inside each component), then one table maps canonical names
onto our parameter paths with a per-tensor transform. Writing runs the same table backwards.
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open

IGNORED = "<ignored>"

# (canonical template, our path template, transform). `{i}` is a layer index, `{n}` a name part.
RULES: tuple[tuple[str, str, str], ...] = (
    ("text.embed_tokens.weight", "language_model.embed_tokens.embedding", "id"),
    ("text.layers.{i}.self_attn.{n}.weight", "language_model.layers.{i}.self_attn.{n}.kernel", "linear"),
    ("text.layers.{i}.mlp.{n}.weight", "language_model.layers.{i}.mlp.{n}.kernel", "linear"),
    ("text.layers.{i}.{n}.weight", "language_model.layers.{i}.{n}.scale", "id"),
    ("text.norm.weight", "language_model.norm.scale", "id"),
    ("lm_head.weight", "language_model.lm_head.kernel", "linear"),
    ("vision.embeddings.class_embedding", "vision_tower.class_embedding", "id"),
    ("vision.embeddings.patch_embedding.weight", "vision_tower.patch_embedding", "conv"),
    ("vision.embeddings.position_embedding.weight", "vision_tower.position_embedding", "id"),
    ("vision.{n}.weight", "vision_tower.{n}.scale", "id"),
    ("vision.{n}.bias", "vision_tower.{n}.bias", "id"),
    ("vision.encoder.layers.{i}.self_attn.{n}.weight", "vision_tower.layers.{i}.self_attn.{n}.kernel", "linear"),
    ("vision.encoder.layers.{i}.self_attn.{n}.bias", "vision_tower.layers.{i}.self_attn.{n}.bias", "id"),
    ("vision.encoder.layers.{i}.mlp.{n}.weight", "vision_tower.layers.{i}.mlp.{n}.kernel", "linear"),
    ("vision.encoder.layers.{i}.mlp.{n}.bias", "vision_tower.layers.{i}.mlp.{n}.bias", "id"),
    ("vision.encoder.layers.{i}.{n}.weight", "vision_tower.layers.{i}.{n}.scale", "id"),
    ("vision.encoder.layers.{i}.{n}.bias", "vision_tower.layers.{i}.{n}.bias", "id"),
    ("projector.{n}.weight", "projector.{n}.kernel", "linear"),
    ("projector.{n}.bias", "projector.{n}.bias", "id"),
)

# Each transform is the axis permutation that takes our array to the HF tensor: a Linear weight is
# [out, in] in HF and [in, out] here; a patch conv is [O, I, kh, kw] in HF and [kh, kw, I, O] here.
PERM_TO_HF: dict[str, tuple[int, ...] | None] = {"id": None, "linear": (1, 0), "conv": (3, 2, 0, 1)}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{n\}", r"(?P<n>[A-Za-z_0-9]+)")
    return re.compile(pattern + "$")


_FORWARD = tuple((_compile(c), o, t) for c, o, t in RULES)
_BACKWARD = tuple((_compile(o), c, t) for c, o, t in RULES)


def _fill(template: str, match: re.Match) -> str:
    out = template
    for key, value in match.groupdict().items():
        out = out.replace("{" + key + "}", value)
    return out


def canonical_to_ours(name: str) -> tuple[str, str] | None:
    """Canonical name -> (our dotted parameter path, transform), or None when no rule matches."""
    for pattern, target, transform in _FORWARD:
        m = pattern.match(name)
        if m:
            return _fill(target, m), transform
    return None


def ours_to_canonical(path: str) -> tuple[str, str]:
    """Our dotted parameter path -> (canonical name, transform)."""
    for pattern, target, transform in _BACKWARD:
        m = pattern.match(path)
        if m:
            return _fill(target, m), transform
    raise KeyError(f"no Hugging Face name for parameter {path}")


# ---------------------------------------------------------------------------------- layouts
# Reading: (checkpoint prefix, canonical prefix), first match wins; covers every layout we know.
_READ_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "hf-llava": (
        ("language_model.model.", "text."),        # transformers 4.x (<4.52) and 5.x save_pretrained
        ("model.language_model.", "text."),        # transformers 4.52+ save / 5.x in memory
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "vision."),  # transformers 4.x
        ("model.vision_tower.vision_model.", "vision."),
        ("model.vision_tower.", "vision."),
        ("vision_tower.", "vision."),               # transformers 5.x save_pretrained
        ("multi_modal_projector.", "projector."),
        ("model.multi_modal_projector.", "projector."),
    ),
    "llava": (
        ("model.mm_projector.0.", "projector.linear_1."),
        ("model.mm_projector.2.", "projector.linear_2."),
        ("model.mm_projector.", "projector.linear_1."),   # projector type `linear`
        ("model.vision_tower.vision_tower.vision_model.", "vision."),
        ("model.", "text."),
        ("lm_head.", "lm_head."),
    ),
    "llama": (("model.", "text."), ("lm_head.", "lm_head.")),
    "clip": (("vision_model.", "vision."), ("", "vision.")),
}

# Writing: canonical prefix -> checkpoint prefix, per layout. The LLaVA layouts (`--layout`): what
# transformers 5 (`hf5`), 4.52+ (`hf4_52`) and earlier 4.x (`hf4`) `save_pretrained` write for
# LlavaForConditionalGeneration, and the original LLaVA release (`llava`: the LLM's names plus
# `model.mm_projector`, the vision tower kept in a CLIP directory of its own).
_WRITE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "hf5": (("text.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("vision.", "vision_tower."), ("projector.", "multi_modal_projector.")),
    "hf4_52": (("text.", "model.language_model."), ("lm_head.", "lm_head."),
               ("vision.", "model.vision_tower.vision_model."), ("projector.", "model.multi_modal_projector.")),
    "hf4": (("text.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("vision.", "vision_tower.vision_model."), ("projector.", "multi_modal_projector.")),
    "llava": (("text.", "model."), ("lm_head.", "lm_head.")),
    "llama": (("text.", "model."), ("lm_head.", "lm_head.")),
    "clip": (("vision.", ""),),
}
# The original release's projector: an nn.Sequential (`mlp2x_gelu`, Linear at 0 and 2) or a bare nn.Linear.
_LLAVA_PROJECTOR: dict[str, tuple[tuple[str, str], ...]] = {
    "mlp2x_gelu": (("projector.linear_1.", "model.mm_projector.0."), ("projector.linear_2.", "model.mm_projector.2.")),
    "linear": (("projector.linear_1.", "model.mm_projector."),),
}
HF_LLAVA_LAYOUTS = ("hf5", "hf4_52", "hf4")
# The reading format (`_READ_PREFIXES`) each layout belongs to.
FORMAT_OF = {**dict.fromkeys(HF_LLAVA_LAYOUTS, "hf-llava"), "llava": "llava", "llama": "llama", "clip": "clip"}

# Buffers and parts of other models that some checkpoints carry and no layout needs.
_IGNORE = re.compile(
    r"(rotary_emb\.inv_freq$|embeddings\.position_ids$|^text_model\.|^visual_projection\.|"
    r"^text_projection\.|^logit_scale$)")

FORMATS = tuple(_READ_PREFIXES)


def to_canonical(key: str, fmt: str) -> str | None:
    """A checkpoint key in layout `fmt` -> canonical name, IGNORED, or None (not of this layout)."""
    if _IGNORE.search(key):
        return IGNORED
    for prefix, canon in _READ_PREFIXES[fmt]:
        if key.startswith(prefix):
            return canon + key[len(prefix):]
    return None


def from_canonical(name: str, layout: str, projector_type: str = "mlp2x_gelu") -> str:
    """A canonical name -> the key that `layout` writes (`projector_type` picks the `llava` projector's names)."""
    prefixes = _WRITE_PREFIXES[layout] + (_LLAVA_PROJECTOR[projector_type] if layout == "llava" else ())
    for canon, prefix in prefixes:
        if name.startswith(canon):
            return prefix + name[len(canon):]
    raise KeyError(f"layout {layout!r} has no place for {name}")


def layout_of(keys: Iterable[str], fmt: str, projector_type: str = "mlp2x_gelu") -> str | None:
    """The layout of reading format `fmt` that writes every one of `keys` as it is (buffers and keys
    of no layout aside), or None when none does."""
    def writes(layout: str, key: str) -> bool:
        canon = to_canonical(key, fmt)
        try:
            return canon in (None, IGNORED) or from_canonical(canon, layout, projector_type) == key
        except KeyError:
            return False

    keys = list(keys)
    return next((layout for layout, of in FORMAT_OF.items() if of == fmt and all(writes(layout, k) for k in keys)),
                None)


@functools.cache
def installed_llava_layout() -> tuple[str | None, str]:
    """The layout the installed transformers' `LlavaForConditionalGeneration.save_pretrained` writes, found
    by saving a tiny one: (layout, how it was found); layout None without transformers and torch."""
    try:
        import transformers
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging
    except Exception:  # noqa: BLE001 - ImportError, or a torch that fails to load its libraries
        return None, "transformers (with torch) is not installed here"
    tiny = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    config = LlavaConfig(text_config=LlamaConfig(vocab_size=8, **tiny),
                         vision_config=CLIPVisionConfig(image_size=4, patch_size=2, **tiny), image_token_index=7)
    keys: list[str] = []
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            LlavaForConditionalGeneration(config).save_pretrained(tmp)
            for file in Path(tmp).glob("*.safetensors"):
                with safe_open(str(file), framework="np") as f:
                    keys += f.keys()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    layout = layout_of(keys, "hf-llava")
    found = f"what transformers {transformers.__version__} writes"
    return layout, found if layout else f"transformers {transformers.__version__} writes keys of no known layout"


def to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    """A HF tensor -> our layout."""
    perm = PERM_TO_HF[transform]
    return array if perm is None else array.transpose(np.argsort(perm))


def to_hf(array: np.ndarray, transform: str) -> np.ndarray:
    """Our array -> the HF tensor (contiguous, ready to write)."""
    perm = PERM_TO_HF[transform]
    return array if perm is None else np.ascontiguousarray(array.transpose(perm))


def hf_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """The HF tensor shape of one of our parameter shapes."""
    perm = PERM_TO_HF[transform]
    return tuple(shape) if perm is None else tuple(shape[i] for i in perm)
