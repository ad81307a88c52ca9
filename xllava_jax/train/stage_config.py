"""A run's settings, typed and frozen: `StageConfig.from_config_dict` reads the ConfigDict that a
`configs/STAGE.py` file and the `KEY=VALUE` overrides make (configs/common.py defines every key) once,
at the start of a run. Comma-separated strings become tuples and named choices enums; a missing key,
a value of the wrong type or an unknown choice is a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping

import ml_collections

from xllava_jax.config import ConfigError, Remat
from xllava_jax.data import conversation as conv
from xllava_jax.train import optim


class Stage(enum.StrEnum):
    """The recipe's training stages, in order."""

    LLM_PRETRAIN = "llm_pretrain"
    ALIGN = "align"
    VIF = "vif"


# The conversation templates of data/conversation.py, one member each (named like the template).
Template = enum.StrEnum("Template", [(name.upper(), name) for name in conv.TEMPLATES], module=__name__)

_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _scalar(value, kind: type, key: str):
    """`value` as `kind` (an int is a number too; a bool is no number)."""
    fits = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not fits or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"`{key}`: expected {_KINDS[kind]}, got {value!r}")
    return kind(value)


def _items(value, key: str) -> tuple[str, ...]:
    """A comma-separated string as its non-empty, stripped items."""
    return tuple(v.strip() for v in _scalar(value, str, key).split(",") if v.strip())


def _numbers(value, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in _items(value, key))
    except ValueError:
        raise ConfigError(f"`{key}` {value!r}: expected comma-separated numbers") from None


def _is_section(node) -> bool:
    return isinstance(node, Mapping | ml_collections.ConfigDict)


def _value(value, kind, key: str):
    """One setting as the field type `kind` says: a scalar, an enum member, a tuple (from a comma-separated
    string), a mapping, or a section (a dataclass of settings, read key by key)."""
    if key in _PARSERS:
        return _PARSERS[key](value, key)
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) is Mapping:
        if not _is_section(value):
            raise ConfigError(f"`{key}`: expected a section of settings, got {value!r}")
        return _read(kind, value, key + ".") if dataclasses.is_dataclass(kind) else types.MappingProxyType(dict(value))
    if isinstance(kind, enum.EnumType):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"`{key}` {value!r}: choose one of {', '.join(kind)}") from None
    if typing.get_origin(kind) is tuple:
        return _numbers(value, key) if typing.get_args(kind)[0] is float else _items(value, key)
    return _scalar(value, kind, key)


def _read(cls, node, prefix: str = ""):
    """`cls` from the ConfigDict `node`, each field from its key (`prefix` + name)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        if field.name not in node:
            raise ConfigError(f"`{key}` is missing from the config")
        values[field.name] = _value(node[field.name], hints[field.name], key)
    return cls(**values)


# Settings checked by their own parser (the message quotes the value as written).
_PARSERS = {"train.trainable": lambda value, key: optim.parse_trainable(_scalar(value, str, key))}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`model.*`: the preset (when there is no `init`) and how the model runs."""

    preset: str
    dtype: str
    param_dtype: str
    remat: Remat
    scan_layers: bool
    attention: str


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`data.*`: the corpora (text for llm_pretrain, VIF records else) and how records are encoded and packed."""

    corpus: tuple[str, ...]
    image_root: str
    text: tuple[str, ...]
    weights: tuple[float, ...]
    template: Template
    system: str
    mode: str
    aspect: str
    max_len: int
    overflow: str
    pack: bool
    images_per_row: int
    pack_window: int
    image_cache_mb: int
    strict: bool
    num_workers: int

    @property
    def system_prompt(self) -> str | None:
        """`system`: "default" (None: the template's own system prompt) or the text to use ("" for none)."""
        return None if self.system == "default" else self.system


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """`train.*`: steps, batch, loss, optimizer (AdamW per group, warmup + schedule) and what trains."""

    steps: int
    batch_size: int
    grad_accum: int
    loss_chunk: int
    lr: float
    projector_lr: float
    embeddings_lr: float
    warmup_ratio: float
    schedule: str
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float
    trainable: tuple[str, ...]
    skip_nonfinite: bool
    log_every: int


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """`lora.*`: adapters on the LLM's projections (`r` 0: none)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """`mesh.*`: the ('data', 'fsdp', 'tensor') sizes (one may be -1) and the logical rules' overrides."""

    data: int
    fsdp: int
    tensor: int
    rules: Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """`checkpoint.*`: how often the train state is saved, how many saves are kept, saved in the background."""

    every: int
    keep: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage's run: the stage, its seed, where it starts from and writes to, and the sections."""

    stage: Stage
    seed: int
    init: str           # params-only checkpoint to start from ("": random init)
    init_vision: str    # a vision tower put over init's ("": none)
    tokenizer: str      # "": the init checkpoint's
    output: str         # the final checkpoint ("": WORKDIR/final)
    model: ModelSettings
    data: DataSettings
    train: TrainSettings
    lora: LoraSettings
    mesh: MeshSettings
    checkpoint: CheckpointSettings

    @classmethod
    def from_config_dict(cls, cfg: ml_collections.ConfigDict) -> StageConfig:
        """Every key of `cfg` that configs/common.py defines, typed and checked (other keys are ignored)."""
        config = _read(cls, cfg)
        if "lora" in config.train.trainable and config.lora.r <= 0:
            raise ConfigError("`train.trainable` names lora but `lora.r` is 0")
        return config

    def tokenizer_path(self) -> str:
        """`tokenizer`, or else the `init` checkpoint (which holds its tokenizer)."""
        path = self.tokenizer or self.init
        if not path:
            raise ConfigError("no tokenizer: set `tokenizer` (or `init` to a checkpoint that has one)")
        return path


# Every key outside the sections and every section's name: what `--config.KEY` may start with.
CONFIG_KEYS = frozenset(field.name for field in dataclasses.fields(StageConfig))
