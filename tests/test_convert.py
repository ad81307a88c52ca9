"""Conversion both ways: every layout, bit-identical round trips, sharded files, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hf_models as H
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

import xllava_jax
from xllava_jax.cli import main as cli
from xllava_jax.config import LLAVA_IMAGE_TOKEN_INDEX
from xllava_jax.convert.load import ConversionError, load_hf

TOL = 1e-4


def read_all(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_bit_identical(a: Path, b: Path):
    ta, tb = read_all(a), read_all(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert ta[key].tobytes() == tb[key].tobytes(), key


def llava_logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=H.to_torch_pixels(pixels)).logits.numpy()


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    model = H.llava(seed=3)
    path = tmp_path_factory.mktemp("hf_llava")
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    ids = [H.prompt_ids(H.NUM_PATCHES, 10, seed=1)]
    pixels = H.images(1, seed=2)
    return model, path, ids, pixels, llava_logits(model, ids, pixels)


def test_hf_llava_round_trip(hf_llava, tmp_path):
    model, src, ids, pixels, want = hf_llava
    assert cli(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    ours = xllava_jax.load_pretrained(tmp_path / "ckpt")
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL
    assert (tmp_path / "ckpt" / "tokenizer_config.json").exists()
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert_bit_identical(src, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()
    original, again = LlavaConfig.from_pretrained(src).to_dict(), LlavaConfig.from_pretrained(tmp_path / "hf").to_dict()
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
                "multimodal_projector_bias", "tie_word_embeddings"):
        assert original[key] == again[key], key
    for sub in ("text_config", "vision_config"):
        for key, value in original[sub].items():
            if key not in ("transformers_version", "_name_or_path", "architectures", "dtype", "initializer_range"):
                assert again[sub][key] == value, (sub, key)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_array_equal(llava_logits(reloaded, ids, pixels), want)


@pytest.mark.parametrize("layout", ["4.x", "4.52"])
def test_reads_older_transformers_layouts(hf_llava, tmp_path, layout):
    """Published checkpoints: 4.x (`vision_tower.vision_model.*`) and 4.52+ (`model.language_model.*`)."""
    model, src, ids, pixels, want = hf_llava
    renamed = {}
    for key, value in read_all(src).items():
        if layout == "4.x":
            key = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        else:
            key = (key.replace("language_model.model.", "model.language_model.", 1)
                   .replace("language_model.lm_head.", "lm_head.", 1)
                   .replace("vision_tower.", "model.vision_tower.vision_model.", 1)
                   .replace("multi_modal_projector.", "model.multi_modal_projector.", 1))
        renamed[key] = value
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]  # 4.x spelling
    text["rope_scaling"] = None
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = xllava_jax.load_pretrained(tmp_path)
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL


def test_original_llava_layout_round_trip(hf_llava, tmp_path):
    model, _, ids, pixels, want = hf_llava
    src, vision = tmp_path / "xllava", tmp_path / "clip"
    H.save_original_llava(model, src, vision)
    ours = xllava_jax.load_pretrained(src, vision_src=vision)
    assert ours.cfg.image_token_id == LLAVA_IMAGE_TOKEN_INDEX
    llava_ids = [[LLAVA_IMAGE_TOKEN_INDEX if t == H.IMAGE_TOKEN else t for t in row] for row in ids]
    assert np.abs(np.asarray(ours(jnp.asarray(llava_ids), jnp.asarray(pixels))) - want).max() <= TOL

    assert cli(["convert", "hf2jax", "--src", str(src), "--vision-src", str(vision), "--out", str(tmp_path / "c")]) == 0
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "back"),
                "--format", "llava"]) == 0
    assert_bit_identical(src, tmp_path / "back")
    assert_bit_identical(vision, tmp_path / "back" / "vision_tower")
    original, again = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    for key, value in original.items():
        assert again[key] == value, key
    # The exported directory converts again with no --vision-src: its tower sits in vision_tower/.
    again_model = xllava_jax.load_pretrained(tmp_path / "back")
    np.testing.assert_array_equal(np.asarray(again_model(jnp.asarray(llava_ids), jnp.asarray(pixels))),
                                  np.asarray(ours(jnp.asarray(llava_ids), jnp.asarray(pixels))))
    # transformers reads the exported LLM half (the mm_projector keys are LLaVA's own addition).
    text_ids = [H.prompt_ids(0, 12, seed=3, with_image=False)]
    with torch.no_grad():
        want_text = model(input_ids=torch.tensor(text_ids)).logits.numpy()
        llm = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
        np.testing.assert_array_equal(llm(input_ids=torch.tensor(text_ids)).logits.numpy(), want_text)
    # transformers' LLaVA embeds the placeholder id, so a sentinel-id model cannot be written as hf-llava.
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "hf")]) == 2


def test_original_llava_layout_needs_vision_src(hf_llava, tmp_path):
    H.save_original_llava(hf_llava[0], tmp_path / "x", tmp_path / "clip")
    with pytest.raises(ConversionError, match="--vision-src"):
        xllava_jax.load_pretrained(tmp_path / "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_round_trip(tmp_path, dtype):
    hf = H.llama(seed=4, tie_word_embeddings=dtype == torch.bfloat16).to(dtype)
    hf.save_pretrained(tmp_path / "src")
    ids = [H.prompt_ids(0, 24, seed=5, with_image=False)]
    ours = xllava_jax.load_pretrained(tmp_path / "src")
    assert ours.vision_tower is None
    assert ours.cfg.param_dtype == ("float32" if dtype == torch.float32 else "bfloat16")
    hf_to = xllava_jax.convert.load
    hf_to.hf_to_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    hf_to.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "back", "llama")
    assert_bit_identical(tmp_path / "src", tmp_path / "back")
    if dtype == torch.float32:
        with torch.no_grad():
            want = hf(input_ids=torch.tensor(ids)).logits.numpy()
            again = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()(input_ids=torch.tensor(ids)).logits
        assert np.abs(np.asarray(ours(jnp.asarray(ids))) - want).max() <= TOL
        np.testing.assert_array_equal(again.numpy(), want)


def test_clip_round_trip(tmp_path):
    H.clip(seed=2).save_pretrained(tmp_path / "src")
    xllava_jax.convert.load.hf_to_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    xllava_jax.convert.load.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "back", "clip")
    assert_bit_identical(tmp_path / "src", tmp_path / "back")


def test_sharded_safetensors_both_ways(hf_llava, tmp_path):
    model, _, ids, pixels, want = hf_llava
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    ours = xllava_jax.load_pretrained(tmp_path / "src")
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL
    xllava_jax.convert.load.save_hf(ours, tmp_path / "out", "hf-llava", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(llava_logits(reloaded, ids, pixels), want)


def test_placement_on_a_mesh(hf_llava):
    import jax
    from jax.sharding import AxisType

    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    model, src, ids, pixels, want = hf_llava
    ours = xllava_jax.load_pretrained(src, mesh=mesh)
    q = ours.language_model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 16)
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL


def _corrupt(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    tensors = read_all(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_unexpected_and_misshaped_keys_name_them(hf_llava, tmp_path):
    src = hf_llava[1]
    missing = _corrupt(src, tmp_path / "m", lambda t: t.pop("language_model.model.norm.weight"))
    with pytest.raises(ConversionError, match=r"1 missing: language_model\.model\.norm\.weight"):
        load_hf(missing)
    extra = _corrupt(src, tmp_path / "u", lambda t: t.update({"bogus.weight": np.zeros(2, np.float32)}))
    with pytest.raises(ConversionError, match=r"1 unexpected: bogus\.weight"):
        load_hf(extra)

    def reshape(t):
        t["multi_modal_projector.linear_1.weight"] = np.zeros((64, 31), np.float32)

    with pytest.raises(ConversionError, match=r"mis-shaped: multi_modal_projector\.linear_1\.weight \(64, 31\) "
                                              r"\(model expects \(64, 32\)\)"):
        load_hf(_corrupt(src, tmp_path / "s", reshape))


def test_bad_inputs_give_one_line(hf_llava, tmp_path, capsys):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli(["convert", "hf2jax", "--src", str(tmp_path / "weird"), "--out", str(tmp_path / "o")]) == 2
    assert "unsupported model_type 'bert'" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert cli(["convert", "hf2jax", "--src", str(tmp_path / "broken"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read checkpoint metadata" in capsys.readouterr().err


def test_bin_weights_only_when_asked(hf_llava, tmp_path):
    model, _, ids, pixels, want = hf_llava
    _write_bin(model, tmp_path)
    with pytest.raises(ConversionError, match="--allow-bin"):
        load_hf(tmp_path)
    ours, _ = load_hf(tmp_path, allow_bin=True)
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL


def _write_bin(model, path: Path) -> None:
    """A transformers-4-style pytorch_model.bin (transformers 5 itself writes safetensors only)."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd = {k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
          .replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.",
                                                                   "multi_modal_projector."): v
          for k, v in sd.items()}
    torch.save(sd, path / "pytorch_model.bin")
    model.config.save_pretrained(path)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "xllava_jax.cli", "convert", "hf2jax", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--vision-src" in out and "example" in out


def test_damaged_checkpoint_ends_with_one_line_naming_it(tmp_path):
    from xllava_jax import checkpoint as ckpt
    from xllava_jax.config import ModelConfig
    from xllava_jax.models.xllava import build_model

    out = tmp_path / "ck"
    ckpt.save_checkpoint(out, build_model(ModelConfig.tiny()))
    data = max((p for p in (out / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])          # a data file cut short (an interrupted copy)
    with pytest.raises(ckpt.CheckpointError, match="cannot read the parameters, the checkpoint is damaged"):
        ckpt.load_checkpoint(out)
    proc = subprocess.run([sys.executable, "-m", "xllava_jax.cli", "convert", "jax2hf", "--src", str(out),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # and nothing else: the echoes of orbax's other reads (tracebacks, asyncio errors) are dropped
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]
    assert proc.stderr.startswith(f"xllava: error: {out}: cannot read the parameters"), proc.stderr[-3000:]
