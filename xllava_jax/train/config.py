"""Stage configs: `configs/STAGE.py:PRESET` files with `get_config(preset)`, plus `--config.KEY=VALUE`
overrides checked against the keys and types the file defines."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import ml_collections

from xllava_jax.config import ConfigError


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/stage.py[:ARG]` -> the ConfigDict its `get_config(ARG)` returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    sys.path.insert(0, str(file.parent.resolve()))  # stage files import their shared `common` module
    try:
        module_spec = importlib.util.spec_from_file_location(f"xllava_config_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in a user's config file is one line for them
        raise ConfigError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    finally:
        sys.path.pop(0)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: get_config({arg!r}) failed ({type(e).__name__}: {e})") from None
    return config


def _parse(raw: str, current, key: str):
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"`{key}`: expected true or false, got {raw!r}")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"`{key}`: expected an integer, got {raw!r}") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"`{key}`: expected a number, got {raw!r}") from None
    if isinstance(current, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"`{key}`: cannot parse {raw!r}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `KEY=VALUE` strings (KEY dotted, e.g. `train.steps=10`); unknown keys are an error."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"`{item}`: expected KEY=VALUE")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"`{key}`: no such key (known: {', '.join(sorted(node.keys()))})")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"`{key}`: no such key (known: {', '.join(sorted(node.keys()))})")
        node[parts[-1]] = _parse(raw, node[parts[-1]], key)
    return config
