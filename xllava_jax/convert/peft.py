"""PEFT-format LoRA adapters: export ours, import peft's (adapters on the LLM projections only).

An adapter directory holds `adapter_config.json` (peft's LoraConfig) and `adapter_model.safetensors`
with two tensors per wrapped projection:

    base_model.model.{module}.lora_A.weight  float[r, in]   (our lora_a float[in, r], transposed)
    base_model.model.{module}.lora_B.weight  float[out, r]  (our lora_b float[r, out], transposed)

`{module}` is the projection's name inside the transformers model as peft sees it, i.e. in memory:
`model.language_model.layers.{i}.self_attn.q_proj` for LlavaForConditionalGeneration (`hf-llava`),
`model.layers.{i}.mlp.down_proj` for LlamaForCausalLM (`llama`). Names go through the conversion
tables of `convert/hf.py` (our path <-> canonical name <-> layout), so reading also accepts the
older layouts those tables know (e.g. transformers 4.x `language_model.model.layers...`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from xllava_jax.config import ConfigError
from xllava_jax.convert import hf
from xllava_jax.convert.load import ConversionError, _summary, iter_tensors, read_json
from xllava_jax.models.lora import LLM_TARGETS, LoraConfig, apply_lora, lora_config, lora_modules, lora_sites

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Where each transformers class keeps the decoder (canonical `text.`) in memory; peft names from there.
TEXT_MODULE_PREFIX = {"hf-llava": "model.language_model.", "llama": "model."}
SIDES = {"lora_a": "lora_A", "lora_b": "lora_B"}
_OUR_SIDE = {side: attr for attr, side in SIDES.items()}
_KEY = re.compile(re.escape(PEFT_PREFIX) + r"(?P<module>.+)\.(?P<side>lora_A|lora_B)\.weight")
# peft LoraConfig fields we cannot honour unless they keep their default (a falsy value also passes).
_DEFAULTS = {"peft_type": "LORA", "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
             "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
             "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


class AdapterError(ConversionError):
    """An adapter that does not fit: unsupported options, missing/unexpected/mis-shaped tensors."""


def peft_module(path: str, fmt: str) -> str:
    """Our projection path (`language_model.layers.0.self_attn.q_proj`) -> peft's module name in `fmt`."""
    canonical, _ = hf.ours_to_canonical(path + ".kernel")
    return TEXT_MODULE_PREFIX[fmt] + canonical.removeprefix("text.").removesuffix(".weight")


def _peft_key(path: str, fmt: str) -> str:
    """Our adapter path (`...self_attn.q_proj.lora_a`) -> its key in peft's weight file for `fmt`."""
    module, attr = path.rsplit(".", 1)
    return f"{PEFT_PREFIX}{peft_module(module, fmt)}.{SIDES[attr]}.weight"


def _our_path(module: str) -> str | None:
    """peft's module name in any known layout -> our projection path, or None."""
    for fmt in TEXT_MODULE_PREFIX:
        canonical = hf.to_canonical(module + ".weight", fmt)
        rule = hf.canonical_to_ours(canonical) if canonical not in (None, hf.IGNORED) else None
        if rule is not None and rule[0].endswith(".kernel"):
            return rule[0].removesuffix(".kernel")
    return None


def _target_regex(targets: tuple[str, ...], fmt: str) -> str:
    """peft's target_modules: a regex matched in full against module names, so that it selects the
    decoder's projections and never the vision tower's (which has q_proj, k_proj and v_proj too)."""
    return re.escape(TEXT_MODULE_PREFIX[fmt]) + rf"layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(targets)})"


def adapter_config(cfg: LoraConfig, fmt: str, base_model_name_or_path: str | None) -> dict[str, Any]:
    """peft's `adapter_config.json` (LoraConfig fields) for adapters made with `cfg`."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
            "target_modules": _target_regex(cfg.targets, fmt), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(model: nnx.Module, out_dir: str | Path, *, fmt: str = "hf-llava",
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a peft adapter directory for the transformers class of `fmt`
    (hf-llava: LlavaForConditionalGeneration, llama: LlamaForCausalLM). Returns the directory."""
    if fmt not in TEXT_MODULE_PREFIX:
        raise AdapterError(f"adapter format must be one of {sorted(TEXT_MODULE_PREFIX)}, got {fmt!r}")
    cfg = lora_config(model)
    if cfg is None:
        raise AdapterError("the model has no LoRA adapters to save (apply_lora or load_peft_adapter first)")
    tensors = {}
    for path, module in lora_modules(model):
        for attr in SIDES:
            array = np.asarray(jax.device_get(getattr(module, attr)[...]))
            if array.ndim == 3:  # scanned layers: float[L, ...], one adapter per layer in peft's file
                for i, layer in enumerate(array):
                    layer_path = path.replace(".layers.", f".layers.{i}.", 1)
                    tensors[_peft_key(f"{layer_path}.{attr}", fmt)] = hf.to_hf(layer, "linear")
            else:
                tensors[_peft_key(f"{path}.{attr}", fmt)] = hf.to_hf(array, "linear")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config(cfg, fmt, base_model_name_or_path)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def load_peft_adapter(model: nnx.Module, adapter_dir: str | Path, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Apply LoRA as a peft adapter directory describes and load its weights, in place; returns the model.

    r, lora_alpha and lora_dropout come from `adapter_config.json`; the wrapped projections are those
    the weight file holds (peft's target_modules may be a list or a regex). Keys in any layout the
    conversion tables know are accepted, so a LlamaForCausalLM adapter fits a LLaVA model's decoder.
    `rngs` seeds the dropout streams. Raises AdapterError, with nothing changed, when it does not fit.
    """
    src = Path(adapter_dir)
    try:
        config = read_json(src / CONFIG_FILE)
        found, unexpected = _read_weights(src / WEIGHTS_FILE)
    except ConversionError as e:
        raise AdapterError(str(e)) from None
    bad = [f"{key}={config[key]!r}" for key, default in _DEFAULTS.items() if config.get(key) and config[key] != default]
    if bad:
        raise AdapterError(f"{src / CONFIG_FILE}: unsupported peft options {', '.join(bad)} "
                           "(supported: plain LoRA on the LLM projections)")
    targets = tuple(t for t in LLM_TARGETS
                    if any(p.startswith("language_model.layers.") and p.split(".")[-2] == t for p in found))
    if not targets:
        raise AdapterError(f"{src / WEIGHTS_FILE}: no adapter weights for the LLM projections "
                           f"({_summary('unexpected', unexpected)})")
    try:
        cfg = LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                         targets=targets)
    except KeyError as e:
        raise AdapterError(f"{src / CONFIG_FILE}: no {e} field") from None
    except ConfigError as e:
        raise AdapterError(f"{src / CONFIG_FILE}: {e}") from None
    if lora_config(model) is not None:
        raise AdapterError("the model already has LoRA adapters")
    if model.cfg.scan_layers:
        raise AdapterError("peft adapters load into a model with one module per layer: load the base with "
                           "scan_layers=False")
    expected = {}
    for path, parent, name in lora_sites(model):
        if name in targets:
            din, dout = getattr(parent, name).kernel.shape
            expected[f"{path}.lora_a"], expected[f"{path}.lora_b"] = (din, cfg.r), (cfg.r, dout)
    fmt = "llama" if model.vision_tower is None else "hf-llava"
    problems = [_summary(label, items) for label, items in (
        ("missing", [_peft_key(p, fmt) for p in expected if p not in found]),
        ("unexpected", unexpected + [key for p, (key, _) in found.items() if p not in expected]),
        ("mis-shaped", [f"{key} {tuple(a.shape[::-1])} (model expects {hf.hf_shape(expected[p], 'linear')})"
                        for p, (key, a) in found.items() if p in expected and a.shape != expected[p]]),
    ) if items]
    if problems:
        raise AdapterError(f"{src}: adapter does not fit the model: " + "; ".join(problems))
    apply_lora(model, cfg, rngs=rngs or nnx.Rngs(0))
    for path, module in lora_modules(model):
        for attr in SIDES:
            var = getattr(module, attr)
            var[...] = jnp.asarray(found[f"{path}.{attr}"][1], dtype=var.dtype)
    return model


def _read_weights(file: Path) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
    """Our adapter path -> (file key, array in our layout) for every key that names a projection we
    know; plus the keys that name nothing of ours."""
    if not file.exists():
        raise ConversionError(f"{file}: not found (adapters are read from safetensors only)")
    found, unexpected = {}, []
    for key, tensor in iter_tensors(file):
        match = _KEY.fullmatch(key)
        path = _our_path(match["module"]) if match else None
        if path is None:
            unexpected.append(key)
        else:
            found[f"{path}.{_OUR_SIDE[match['side']]}"] = (key, hf.to_ours(tensor, "linear"))
    return found, unexpected
