"""Our params-only checkpoints: an orbax directory of parameters plus the model config.

Layout of DIR: `xllava.json` ({"format": "xllava_jax", "kind": "xllava" | "vision", "config": ...,
"source": the config.json we were converted from, "source_format": its layout}), `params/` (orbax),
and the tokenizer files, copied along so a checkpoint needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jax
import orbax.checkpoint as ocp
from flax import nnx

from xllava_jax.config import ConfigError, ModelConfig, VisionConfig
from xllava_jax.errors import UserError
from xllava_jax.models.vision import VisionTower
from xllava_jax.models.xllava import XLlava

META_FILE = "xllava.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json", "expansion.json")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


def _ocdbt_roots(directory: Path, depth: int = 2) -> list[Path]:
    """The OCDBT databases orbax wrote in `directory` (or, `depth` levels down, in its items: a train
    checkpoint's `state/`, a params checkpoint's per-process databases when no merged one is on top)."""
    if (directory / "manifest.ocdbt").is_file():
        return [directory]
    if depth == 0 or not directory.is_dir():
        return []
    return [root for child in sorted(directory.iterdir()) if child.is_dir() for root in _ocdbt_roots(child, depth - 1)]


def _location(text: str, root: Path) -> tuple[Path, int]:
    """(file, end offset) of an OCDBT location, `kind:base_path:relative_path:offset:length`."""
    path, offset, length = text.split(":", 1)[1].rsplit(":", 2)
    base, _, relative = path.partition(":")
    return root / unquote(base) / unquote(relative), int(offset) + int(length)


def stored_problem(directory: str | Path) -> str | None:
    """Why the arrays orbax stored under `directory` cannot all be read, or None when nothing is missing.

    Walks each OCDBT database's latest b-tree (one node at a time) and checks that every data file it
    points into exists and is long enough: a checkpoint cut short (an interrupted copy, a full disk) is
    found before a restore starts, so no restore fails halfway with reads still in flight (their failures
    would be reported again, as tracebacks and asyncio errors, as they finish). Only OCDBT databases (a
    `manifest.ocdbt`, orbax's default) are checked."""
    import tensorstore as ts

    sizes: dict[Path, int] = {}

    def short(path: Path, end: int) -> str | None:
        if path not in sizes:
            sizes[path] = path.stat().st_size if path.is_file() else -1
        if sizes[path] < 0:
            return f"{path}: missing"
        return f"{path}: {sizes[path]} bytes where at least {end} are expected" if sizes[path] < end else None

    for root in _ocdbt_roots(Path(directory)):
        try:
            store = ts.KvStore.open({"driver": "file", "path": f"{root}/"}).result()
            versions = ts.ocdbt.dump(store).result().get("versions") or []
            nodes = [versions[-1].get("root", {}).get("location")] if versions else []
            while nodes:
                node = nodes.pop()
                if node is None:  # an empty database
                    continue
                if problem := short(*_location(node, root)):
                    return problem
                for entry in ts.ocdbt.dump(store, node).result().get("entries", []):
                    if "location" in entry:  # an interior node's child
                        nodes.append(entry["location"])
                    elif "indirect_value" in entry and (problem := short(*_location(entry["indirect_value"], root))):
                        return problem
        except Exception as e:  # noqa: BLE001 - TensorStore reports unreadable nodes as bare exceptions
            return f"{root}: {str(e).splitlines()[0][:300]}" if str(e) else f"{root}: {type(e).__name__}"
    return None


def _shapes(tree) -> dict[str, tuple[int, ...] | None]:
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in where): getattr(leaf, "shape", None)
            for where, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def stored_misfit(stored, target) -> str | None:
    """How the arrays of a target tree differ from what orbax's metadata says is stored (`stored`, an
    item's metadata tree), in one line; None when every name and shape matches."""
    have, want = _shapes(stored), _shapes(target)
    missing, unexpected = [k for k in want if k not in have], [k for k in have if k not in want]
    if missing or unexpected:
        return "; ".join(f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                         for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    for name, shape in want.items():
        if have[name] is not None and tuple(have[name]) != tuple(shape):
            return f"{name}: stored {tuple(have[name])}, the config needs {tuple(shape)}"
    return None


@contextlib.contextmanager
def restore_errors(error: type[Exception], misfit: str, damaged: str, suffix: str = "", *,
                   stored: str | Path | None = None):
    """Around an orbax restore: a failure raised as one line, `error(f"{misfit} (reason){suffix}")` for a
    target that does not fit what is stored (ValueError, KeyError, FileNotFoundError), `error(f"{damaged}
    (reason){suffix}")` for anything else (TensorStore's read errors arrive as a bare Exception; its array
    spec is dropped). With `stored` (the directory restored from), its data files are checked first
    (`stored_problem`), so a checkpoint cut short is reported as damaged before any read starts."""
    if stored is not None and (problem := stored_problem(stored)):
        raise error(f"{damaged} ({problem}){suffix}")
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise error(f"{misfit} ({str(e).splitlines()[0][:300]}){suffix}") from None
    except Exception as e:  # noqa: BLE001
        reason = str(e).split(" See full TensorStore details")[0].splitlines()[0][:300]
        raise error(f"{damaged} ({reason}){suffix}") from None


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def model_kind(model: nnx.Module) -> str:
    return "vision" if isinstance(model, VisionTower) else "xllava"


def build_abstract(kind: str, cfg: ModelConfig | VisionConfig, remat: str = "none") -> nnx.Module:
    """An abstract (shape-only) model of the given kind."""
    if kind == "vision":
        return nnx.eval_shape(lambda: VisionTower(cfg, remat=remat, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: XLlava(cfg, rngs=nnx.Rngs(0)))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / processor files that exist in `src` to `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_checkpoint(path: str | Path, model: nnx.Module, *, source: dict[str, Any] | None = None,
                    source_format: str | None = None, tokenizer_dir: str | Path | None = None,
                    prompt: dict[str, Any] | None = None) -> Path:
    """Write `model`'s parameters and config to `path` (created; must not hold a checkpoint). `prompt`
    records how the model was trained to be prompted ({"template", "mode", "system"}); inference
    (`infer/engine.py`) uses it unless told otherwise."""
    path = Path(path).absolute()
    if (path / "params").exists():
        raise CheckpointError(f"{path}: already holds a checkpoint; choose an empty `out` directory")
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", state)
    meta = {"format": "xllava_jax", "kind": model_kind(model), "config": model.cfg.to_dict(),
            "source": source, "source_format": source_format}
    if prompt is not None:
        meta["prompt"] = prompt
    (path / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read checkpoint metadata ({e})") from None
    if meta.get("format") != "xllava_jax" or meta.get("kind") not in ("xllava", "vision"):
        raise CheckpointError(f"{meta_path}: not an xllava_jax checkpoint")
    return meta


def config_from_meta(meta: dict[str, Any], **overrides) -> ModelConfig | VisionConfig:
    try:
        if meta["kind"] == "vision":
            return VisionConfig.from_dict(meta["config"])
        return ModelConfig.from_dict(meta["config"]).replace(**overrides)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"bad model config in checkpoint: {e}") from None


def load_checkpoint(path: str | Path, *, sharding=None, **overrides) -> tuple[nnx.Module, dict[str, Any]]:
    """Restore a model saved by `save_checkpoint`. `overrides` replace ModelConfig fields (e.g.
    dtype, param_dtype, remat); `sharding(logical_axes, shape)` places each parameter.
    Returns (model, metadata)."""
    path = Path(path).absolute()
    meta = read_meta(path)
    cfg = config_from_meta(meta, **overrides)
    graphdef, abstract = nnx.split(build_abstract(meta["kind"], cfg))

    def target(var):
        shard = sharding(var.get_metadata().get("logical_axes"), var.shape) if sharding else None
        return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shard)

    flat = nnx.to_flat_state(abstract)
    targets = nnx.to_pure_dict(nnx.from_flat_state([(p, v.replace(target(v))) for p, v in flat]))
    with (restore_errors(CheckpointError, f"{path}: parameters do not fit the config",
                         f"{path}: cannot read the parameters, the checkpoint is damaged or incomplete",
                         stored=path / "params"),
          ocp.StandardCheckpointer() as ckptr):
        if problem := stored_misfit(ckptr.metadata(path / "params").item_metadata, targets):
            raise ValueError(problem)
        restored = ckptr.restore(path / "params", targets)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract), meta
