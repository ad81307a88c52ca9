"""Hugging Face <-> xllava_jax parameter names, as data.

Every supported checkpoint layout is first reduced to *canonical* names (`text.*`, `lm_head.weight`,
`vision.*`, `projector.*`: HF's names inside each component), then one table maps canonical names
onto our parameter paths with a per-tensor transform. Writing runs the same table backwards.
"""

from __future__ import annotations

import re

import numpy as np

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

# Writing: canonical prefix -> checkpoint prefix, in the layout the installed transformers writes.
_WRITE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "hf-llava": (("text.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("vision.", "vision_tower."), ("projector.", "multi_modal_projector.")),
    "llava": (("text.", "model."), ("lm_head.", "lm_head."),
              ("projector.linear_1.", "model.mm_projector.0."), ("projector.linear_2.", "model.mm_projector.2.")),
    "llama": (("text.", "model."), ("lm_head.", "lm_head.")),
    "clip": (("vision.", ""),),
}

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


def from_canonical(name: str, fmt: str) -> str:
    """A canonical name -> the key that layout `fmt` writes."""
    for canon, prefix in _WRITE_PREFIXES[fmt]:
        if name.startswith(canon):
            return prefix + name[len(canon):]
    raise KeyError(f"layout {fmt!r} has no place for {name}")


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
