"""Our params-only checkpoints: an orbax directory of parameters plus the model config.

Layout of DIR: `xllava.json` ({"format": "xllava_jax", "kind": "xllava" | "vision", "config": ...,
"source": the config.json we were converted from, "source_format": its layout}), `params/` (orbax),
and the tokenizer files, copied along so a checkpoint needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from xllava_jax.config import ConfigError, ModelConfig, VisionConfig
from xllava_jax.models.vision import VisionTower
from xllava_jax.models.xllava import XLlava

META_FILE = "xllava.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json", "expansion.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# What the reads of a failed orbax restore that were still in flight report when they finish.
_READ_ECHOES = ("Encountered error while reading array index", "Event loop is closed")


def _is_read_echo(exc: BaseException | None) -> bool:
    return exc is not None and any(text in str(exc) for text in _READ_ECHOES)


class _EchoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_read_echo(record.exc_info[1]))


@contextlib.contextmanager
def muted_read_echoes():
    """Around an orbax restore: when it fails on one array, its other reads keep running in
    TensorStore's threads and, as they finish, report the same failure again (callbacks into the
    closed event loop, coroutines finalised with the read error, asyncio's "exception was never
    retrieved"): hundreds of lines around the one error we raise, some of them while the failure
    is still propagating. Those reports are dropped from the start of the restore: only exceptions
    whose text is one of `_READ_ECHOES`, anything else is reported as before. After a restore that
    succeeded the hooks are put back; after a failure they stay, since the echoes come later too."""
    unraisable, excepthook, echo_filter = sys.unraisablehook, sys.excepthook, _EchoFilter()

    def quiet_unraisable(report):
        if not _is_read_echo(report.exc_value):
            unraisable(report)

    def quiet_excepthook(kind, value, tb):
        if not _is_read_echo(value):
            excepthook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    logging.getLogger("asyncio").addFilter(echo_filter)
    yield
    if sys.unraisablehook is quiet_unraisable:
        sys.unraisablehook = unraisable
    if sys.excepthook is quiet_excepthook:
        sys.excepthook = excepthook
    logging.getLogger("asyncio").removeFilter(echo_filter)


@contextlib.contextmanager
def restore_errors(error: type[Exception], misfit: str, damaged: str, suffix: str = ""):
    """Around an orbax restore: its read echoes muted (`muted_read_echoes`), and a failure raised as
    one line: `error(f"{misfit} (reason){suffix}")` for a target that does not fit what is stored
    (ValueError, KeyError, FileNotFoundError), `error(f"{damaged} (reason){suffix}")` for anything
    else (TensorStore's read errors arrive as a bare Exception; its array spec is dropped)."""
    try:
        with muted_read_echoes():
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
        raise CheckpointError(f"{path}: already holds a checkpoint; choose an empty --out directory")
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
                         f"{path}: cannot read the parameters, the checkpoint is damaged or incomplete"),
          ocp.StandardCheckpointer() as ckptr):
        restored = ckptr.restore(path / "params", targets)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract), meta
