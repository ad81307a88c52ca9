"""Streaming conversion between Hugging Face directories and our models / checkpoints.

Reading streams one tensor at a time from (sharded) safetensors into an abstract model, shape-checks
it, and places it on its shard; a checkpoint never exists twice in memory. Writing goes the other
way, one output shard at a time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from xllava_jax import checkpoint as ckpt
from xllava_jax.config import ConfigError, ModelConfig
from xllava_jax.convert import formats, hf
from xllava_jax.convert.prompt import write_chat_template
from xllava_jax.errors import UserError
from xllava_jax.models.ops import target_platform
from xllava_jax.models.scan import per_layer_params, restack
from xllava_jax.models.vision import VisionTower
from xllava_jax.models.xllava import XLlava

Sharding = Callable[[tuple, tuple], Any]
DEFAULT_SHARD_BYTES = 5 * 1024**3


class ConversionError(UserError):
    """A checkpoint that does not fit: missing, unexpected or mis-shaped tensors, unreadable files."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def weight_files(src: Path, allow_bin: bool = False) -> list[Path]:
    """The weight files of a HF directory: safetensors (sharded or not), else `.bin` when allowed."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if single.endswith(".bin") and not allow_bin:
            if (src / single).exists() or (src / index_name).exists():
                raise ConversionError(f"{src}: holds only PyTorch .bin weights; pass `allow_bin`=True to read them "
                                      "(loaded with torch.load(weights_only=True))")
            continue
        if (src / index_name).exists():
            weight_map = read_json(src / index_name).get("weight_map") or {}
            return [src / name for name in dict.fromkeys(weight_map.values())]
        if (src / single).exists():
            return [src / single]
    found = sorted(src.glob("*.safetensors"))
    if found:
        return found
    raise ConversionError(f"{src}: no model.safetensors (or index) found")


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs of one weight file, one tensor in memory at a time."""
    if path.suffix == ".bin":
        yield from _iter_bin(path)
        return
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{path}: cannot read safetensors ({e})") from None


def _iter_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    import ml_dtypes

    try:
        import torch
    except ImportError:
        raise ConversionError(f'{path}: reading PyTorch .bin weights needs torch: pip install -e ".[torch]" '
                              "(or convert the checkpoint to safetensors)") from None

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; report them as one line
        raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True) ({e})") from None
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            yield key, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield key, tensor.numpy()


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _summary(label: str, items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"


def _count_tensors(files: list[Path]) -> int | None:
    try:
        total = 0
        for f in files:
            with safe_open(str(f), framework="np") as handle:
                total += len(handle.keys())
        return total
    except Exception:  # noqa: BLE001 - .bin files or unreadable headers: the bar simply has no total
        return None


def load_hf_weights(abstract: nnx.Module, sources: list[tuple[Path, str]], src: Path, *, tied: bool,
                    sharding: Sharding | None = None, progress: bool = False) -> nnx.Module:
    """Fill an abstract model from weight files. sources: (file, layout) pairs, read in order; a
    tensor already loaded from an earlier source is not read again."""
    graphdef, state = nnx.split(abstract)
    prefix = _path_prefix(abstract)
    flat = {prefix + _dotted(p): (p, v) for p, v in nnx.to_flat_state(state)}
    loaded: dict[str, Any] = {}
    unexpected, misshaped, seen = [], [], []
    bar = tqdm(total=_count_tensors([f for f, _ in sources]), unit="tensor", desc="reading", disable=not progress)
    for file, fmt in sources:
        for key, tensor in iter_tensors(file):
            bar.update()
            if fmt == sources[0][1]:
                seen.append(key)
            canon = hf.to_canonical(key, fmt)
            if canon == hf.IGNORED or (canon == "lm_head.weight" and tied):
                continue
            rule = hf.canonical_to_ours(canon) if canon else None
            if rule is None or rule[0] not in flat:
                unexpected.append(key)
                continue
            path, transform = rule
            if path in loaded:
                continue
            var = flat[path][1]
            array = hf.to_ours(tensor, transform)
            if array.shape != tuple(var.shape):
                misshaped.append(f"{key} {tuple(tensor.shape)} (model expects {hf.hf_shape(var.shape, transform)})")
                continue
            array = np.asarray(array, dtype=var.dtype)
            shard = sharding(var.get_metadata().get("logical_axes"), var.shape) if sharding else None
            loaded[path] = jax.device_put(array, shard) if shard is not None else jax.numpy.asarray(array)
    bar.close()
    projector = getattr(abstract.cfg, "projector_type", "mlp2x_gelu")
    layout = hf.layout_of(seen, sources[0][1], projector) or _first_layout(sources[0][1])
    missing = [_hf_name(p, layout, projector) for p in flat if p not in loaded]
    problems = [_summary(label, items) for label, items in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    if problems:
        raise ConversionError(f"{src}: checkpoint does not fit the config: " + "; ".join(problems))
    state = nnx.from_flat_state([(p, v.replace(loaded[name])) for name, (p, v) in flat.items()])
    return nnx.merge(graphdef, state)


def _path_prefix(model: nnx.Module) -> str:
    """A lone vision tower's parameters sit where the full model keeps them, under `vision_tower.`."""
    return "vision_tower." if isinstance(model, VisionTower) else ""


def _first_layout(fmt: str) -> str:
    return next(layout for layout, of in hf.FORMAT_OF.items() if of == fmt)


def _hf_name(path: str, layout: str, projector_type: str) -> str:
    """The checkpoint key a parameter has in `layout` (our path when the layout has none)."""
    try:
        return hf.from_canonical(hf.ours_to_canonical(path)[0], layout, projector_type)
    except KeyError:
        return path


def load_hf(src: str | Path, *, vision_src: str | Path | None = None, dtype: str | None = None,
            param_dtype: str | None = None, remat: str = "none", sharding: Sharding | None = None,
            allow_bin: bool = False, progress: bool = False,
            kernels: dict[str, str] | None = None) -> tuple[nnx.Module, dict[str, Any]]:
    """Read a HF directory in any supported layout. Returns (model, metadata with the layout and
    source config). The parameter dtype defaults to the checkpoint's; `kernels` ({"attention",
    "platform"}) choose the model's kernels (models/ops.py)."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    config = read_json(src / "config.json")
    try:
        fmt = formats.detect_format(config)
        sources = [(f, fmt) for f in weight_files(src, allow_bin)]
        if fmt == "clip":
            vcfg = formats.vision_from_hf(formats.clip_vision_dict(config))
            abstract = ckpt.build_abstract("vision", vcfg, remat)
            model = load_hf_weights(abstract, sources, src, tied=False, sharding=sharding, progress=progress)
            return model, {"format": fmt, "source": config}
        vision_config = None
        if fmt == "llava":
            vision_dir = Path(vision_src) if vision_src else src / "vision_tower"
            if vision_src or vision_dir.is_dir():
                vision_config = read_json(vision_dir / "config.json")
                sources += [(f, "clip") for f in weight_files(vision_dir, allow_bin)]
        cfg = formats.model_config_from_hf(config, fmt, vision_config)
        changes = {"remat": remat, **(kernels or {})}
        if dtype:
            changes["dtype"] = dtype
        if param_dtype:
            changes["param_dtype"] = param_dtype
        cfg = cfg.replace(**changes)
    except ConfigError as e:
        raise ConversionError(f"{src / 'config.json'}: {e}") from None
    abstract = ckpt.build_abstract("xllava", cfg)
    model = load_hf_weights(abstract, sources, src, tied=cfg.text.tie_word_embeddings, sharding=sharding,
                            progress=progress)
    return model, {"format": fmt, "source": config, "vision_source": vision_config}


def init_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint to start from (ours or a HF directory) without reading weights."""
    if ckpt.is_checkpoint(path):
        meta = ckpt.read_meta(path)
        if meta["kind"] != "xllava":
            raise ConversionError(f"{path}: a lone vision tower, not a model to train (use init_vision for it)")
        return ckpt.config_from_meta(meta)
    src = Path(path)
    config = read_json(src / "config.json")
    try:
        fmt = formats.detect_format(config)
        if fmt == "clip":
            raise ConversionError(f"{src}: a lone CLIP vision model, not a model to train (use init_vision for it)")
        vision_dir = src / "vision_tower"
        vision = read_json(vision_dir / "config.json") if fmt == "llava" and vision_dir.is_dir() else None
        return formats.model_config_from_hf(config, fmt, vision)
    except ConfigError as e:
        raise ConversionError(f"{src / 'config.json'}: {e}") from None


def _plan_shards(entries: list[tuple[str, Any]], max_bytes: int) -> list[list[tuple[str, Any]]]:
    shards, current, size = [], [], 0
    for key, value in entries:
        nbytes = value.size * value.dtype.itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, value))
        size += nbytes
    return shards + [current] if current else shards


def write_safetensors(entries: list[tuple[str, Any, str]], out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      progress: bool = False) -> list[str]:
    """Write (key, our array, transform) entries as HF safetensors, sharded with an index when larger
    than `max_shard_bytes`. Only one shard is gathered to host memory at a time."""
    shards = _plan_shards([(k, v) for k, v, _ in entries], max_shard_bytes)
    transforms = {k: t for k, _, t in entries}
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    bar = tqdm(total=len(entries), unit="tensor", desc=f"writing {out.name}", disable=not progress)
    for name, shard in zip(names, shards):
        tensors = {}
        for key, value in shard:
            tensors[key] = hf.to_hf(np.asarray(jax.device_get(value)), transforms[key])
            weight_map[key] = name
            total += tensors[key].nbytes
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        bar.update(len(shard))
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def hf_entries(model: nnx.Module, layout: str, component: str | None = None) -> list[tuple[str, Any, str]]:
    """(HF key, array, transform) for every parameter that `layout` stores."""
    entries = []
    prefix = _path_prefix(model)
    projector = getattr(model.cfg, "projector_type", "mlp2x_gelu")
    for path, value in per_layer_params(model):  # scanned layers one layer at a time, sliced when written
        canon, transform = hf.ours_to_canonical(prefix + path)
        if component and not canon.startswith(component):
            continue
        try:
            key = hf.from_canonical(canon, layout, projector)
        except KeyError:
            continue
        entries.append((key, value, transform))
    return entries


def installed_layout() -> str:
    """The LLaVA layout to write by default: the installed transformers' (hf5 when it cannot be found, said on
    stderr)."""
    layout, found = hf.installed_llava_layout()
    if layout is None:
        print(f"xllava: note: {found}; writing the transformers 5 layout (hf5); pass --layout to choose",
              file=sys.stderr)
    return layout or "hf5"


def save_hf(model: nnx.Module, out: str | Path, layout: str, *, source: dict[str, Any] | None = None,
            vision_source: dict[str, Any] | None = None, tokenizer_dir: str | Path | None = None,
            prompt: tuple[str, str, str | None] | None = None, vision_name: str | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> Path:
    """Write `model` as a HF directory in `layout` (hf5, hf4_52, hf4, llava, llama, clip; `hf-llava`: the
    installed transformers'). For `llava` the vision tower goes to OUT/vision_tower as a CLIPVisionModel (the
    original code loads it separately) and `mm_vision_tower` names `vision_name` (its hub name), else that
    folder. `prompt` ((template, mode, system)) goes into the tokenizer files as a chat template
    (prompt.write_chat_template)."""
    out = Path(out)
    cfg = model.cfg
    layout = installed_layout() if layout == "hf-llava" else layout
    fmt = hf.FORMAT_OF[layout]
    if isinstance(model, VisionTower):
        if fmt != "clip":
            raise ConversionError(f"a vision tower can only be written as `fmt` clip, not {fmt}")
        config = formats.vision_to_hf(cfg, str(np.dtype(model.patch_embedding.dtype)))
    else:
        if fmt == "clip":
            if cfg.vision is None:
                raise ConversionError("this model has no vision tower to write as `fmt` clip")
            return save_hf(model.vision_tower, out, fmt, source=vision_source, tokenizer_dir=None,
                           max_shard_bytes=max_shard_bytes, progress=progress)
        try:
            config = formats.model_config_to_hf(cfg, fmt, source, transformers4=layout in ("hf4", "hf4_52"))
        except ConfigError as e:
            raise ConversionError(f"cannot write `fmt` {fmt}: {e}") from None
    if fmt == "llava":
        config["mm_vision_tower"] = vision_name or "vision_tower"
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(hf_entries(model, layout, "vision." if fmt == "clip" else None), out, max_shard_bytes, progress)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if fmt == "llava":
        save_hf(model.vision_tower, out / "vision_tower", "clip", source=vision_source,
                max_shard_bytes=max_shard_bytes, progress=progress)
    if tokenizer_dir is not None:
        ckpt.copy_tokenizer_files(tokenizer_dir, out)
    if prompt is not None and fmt != "clip":
        write_chat_template(out, *prompt, image_token_id=cfg.image_token_id if fmt == "hf-llava" else None)
    return out


def load_pretrained(path: str | Path, *, vision_src: str | Path | None = None, dtype: str | None = None,
                    param_dtype: str | None = None, remat: str = "none", mesh=None, rules=None,
                    allow_bin: bool = False, scan_layers: bool | None = None, attention: str | None = None,
                    platform: str | None = None) -> nnx.Module:
    """A HF directory (hf-llava, original llava, llama, clip) or one of our checkpoints -> the model.

    `mesh` (with optional logical `rules`) places every parameter on its shard as it is read.
    `scan_layers` (None: as stored) stacks or unstacks the layers after reading; `attention` and
    `platform` choose the kernels (models/ops.py; default: resolved for the mesh's devices, or for
    jax.devices() without a mesh).
    """
    sharding = None
    if mesh is not None:
        from xllava_jax.sharding import param_sharding

        sharding = param_sharding(mesh, rules)
        platform = platform or target_platform(mesh.devices.flat)
    kernels = {k: v for k, v in (("attention", attention), ("platform", platform)) if v}
    if ckpt.is_checkpoint(path):
        overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
        if ckpt.read_meta(path)["kind"] == "xllava":
            overrides.update(remat=remat, **kernels)
        model = ckpt.load_checkpoint(path, sharding=sharding, **overrides)[0]
    else:
        model = load_hf(path, vision_src=vision_src, dtype=dtype, param_dtype=param_dtype, remat=remat,
                        sharding=sharding, allow_bin=allow_bin, kernels=kernels)[0]
    if scan_layers is not None and isinstance(model, XLlava):
        model = restack(model, scan_layers)
    return model
