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
from xllava_jax.convert import hf
from xllava_jax.convert.commands import checkpoint_to_hf, hf_to_checkpoint
from xllava_jax.convert.load import ConversionError, load_hf, save_hf

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


def write_in_older_layout(src: Path, out: Path, layout: str) -> Path:
    """`src` (saved by transformers 5) rewritten with the keys and config spelling of transformers 4.x (`hf4`:
    `vision_tower.vision_model.*`) or 4.52+ (`hf4_52`: `model.language_model.*`, ...)."""
    out.mkdir(exist_ok=True)
    renamed = {}
    for key, value in read_all(src).items():
        if layout == "hf4":
            key = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        else:
            key = (key.replace("language_model.model.", "model.language_model.", 1)
                   .replace("language_model.lm_head.", "lm_head.", 1)
                   .replace("vision_tower.", "model.vision_tower.vision_model.", 1)
                   .replace("multi_modal_projector.", "model.multi_modal_projector.", 1))
        renamed[key] = value
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]  # 4.x spelling
    text["rope_scaling"] = None
    config["torch_dtype"] = config.pop("dtype")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("layout", ["hf4", "hf4_52"])
def test_reads_older_transformers_layouts(hf_llava, tmp_path, layout):
    """Published checkpoints: 4.x (`vision_tower.vision_model.*`) and 4.52+ (`model.language_model.*`)."""
    model, src, ids, pixels, want = hf_llava
    ours = xllava_jax.load_pretrained(write_in_older_layout(src, tmp_path / "src", layout))
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL


@pytest.mark.parametrize("layout", ["hf5", "hf4_52", "hf4"])
def test_writes_every_transformers_layout_bit_identical(hf_llava, tmp_path, layout):
    """`jax2hf --layout L` writes a checkpoint of layout L back to the same keys and bytes, and the installed
    transformers reads each of them to the same logits."""
    model, src, ids, pixels, want = hf_llava
    if layout != "hf5":
        src = write_in_older_layout(src, tmp_path / "src", layout)
    assert cli(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                "--layout", layout]) == 0
    assert_bit_identical(src, tmp_path / "hf")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_array_equal(llava_logits(reloaded, ids, pixels), want)


def test_default_layout_is_what_the_installed_transformers_writes(hf_llava, monkeypatch, capsys):
    """Checked against the real save_pretrained: the fixture's directory was written by the installed
    transformers, and the detected layout names its keys exactly. Without transformers: hf5, said so."""
    from xllava_jax.convert.load import installed_layout

    src = hf_llava[1]
    layout, found = hf.installed_llava_layout()
    assert layout == hf.layout_of(read_all(src), "hf-llava") and found.startswith("what transformers")
    for key in read_all(src):
        assert hf.from_canonical(hf.to_canonical(key, "hf-llava"), layout) == key
    import transformers

    if transformers.__version__.startswith("5."):
        assert layout == "hf5"
    monkeypatch.setattr(hf, "installed_llava_layout", lambda: (None, "transformers (with torch) is not installed here"))
    assert installed_layout() == "hf5"
    assert "not installed here; writing the transformers 5 layout (hf5); pass --layout" in capsys.readouterr().err


def test_format_and_layout_flags_one_line_when_they_clash(hf_llava, tmp_path, capsys):
    assert cli(["convert", "hf2jax", "--src", str(hf_llava[1]), "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    for flags in (["--format", "llama", "--layout", "hf4"], ["--format", "hf-llava", "--layout", "llava"],
                  ["--format", "llava", "--layout", "hf5"]):
        assert cli(["convert", "jax2hf", "--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "does not go with --format" in err, err
    help_text = subprocess.run([sys.executable, "-m", "xllava_jax.cli", "convert", "jax2hf", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--layout" in help_text and "hf4_52" in help_text and "--format says what is written" in help_text


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


def test_original_linear_projector_round_trip(hf_llava, tmp_path):
    """LLaVA's `linear` projector is a bare nn.Linear: `model.mm_projector.weight`, read and written as such."""
    model, _, ids, pixels, _ = hf_llava
    src, vision = tmp_path / "linear", tmp_path / "clip"
    H.save_original_llava(model, src, vision)
    tensors = {k: v for k, v in read_all(src).items() if not k.startswith("model.mm_projector.")}
    rng = np.random.default_rng(0)
    tensors["model.mm_projector.weight"] = rng.standard_normal((64, 32)).astype(np.float32)
    tensors["model.mm_projector.bias"] = rng.standard_normal(64).astype(np.float32)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    assert cli(["convert", "hf2jax", "--src", str(src), "--vision-src", str(vision), "--out", str(tmp_path / "c")]) == 0
    ours = xllava_jax.load_pretrained(tmp_path / "c")
    assert ours.cfg.projector_type == "linear" and ours.projector.linear_2 is None
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "back"),
                "--format", "llava"]) == 0
    assert_bit_identical(src, tmp_path / "back")
    assert_bit_identical(vision, tmp_path / "back" / "vision_tower")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["mm_projector_type"] == "linear"


def test_llava_export_names_its_vision_tower_by_hub_name_never_a_local_path(hf_llava, tmp_path):
    """`mm_vision_tower` of an export: the tower's hub name, recorded at conversion (here from the CLIP
    config, the source naming a local path), else the relative `vision_tower` folder beside it."""
    model, src, _, _, _ = hf_llava
    original, vision = tmp_path / "orig", tmp_path / "clip"
    H.save_original_llava(model, original, vision)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(vision.absolute())}))
    clip_config = json.loads((vision / "config.json").read_text())
    clip_config["_name_or_path"] = "openai/clip-vit-large-patch14-336"
    (vision / "config.json").write_text(json.dumps(clip_config))
    for name, source, extra in (("orig", original, ["--vision-src", str(vision)]), ("hf", src, [])):
        assert cli(["convert", "hf2jax", "--src", str(source), "--out", str(tmp_path / f"c_{name}"), *extra]) == 0
        assert cli(["convert", "jax2hf", "--src", str(tmp_path / f"c_{name}"), "--out", str(tmp_path / f"x_{name}"),
                    "--format", "llava"]) == 0
    names = {n: json.loads((tmp_path / f"x_{n}" / "config.json").read_text())["mm_vision_tower"]
             for n in ("orig", "hf")}
    assert names == {"orig": "openai/clip-vit-large-patch14-336", "hf": "vision_tower"}


def test_original_llava_layout_needs_vision_src(hf_llava, tmp_path, capsys):
    H.save_original_llava(hf_llava[0], tmp_path / "x", tmp_path / "clip")
    with pytest.raises(ConversionError, match="`vision_src`"):  # the library names its parameter
        xllava_jax.load_pretrained(tmp_path / "x")
    assert cli(["convert", "hf2jax", "--src", str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2
    assert "--vision-src" in capsys.readouterr().err  # the command names its flag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_round_trip(tmp_path, dtype):
    hf = H.llama(seed=4, tie_word_embeddings=dtype == torch.bfloat16).to(dtype)
    hf.save_pretrained(tmp_path / "src")
    ids = [H.prompt_ids(0, 24, seed=5, with_image=False)]
    ours = xllava_jax.load_pretrained(tmp_path / "src")
    assert ours.vision_tower is None
    assert ours.cfg.param_dtype == ("float32" if dtype == torch.float32 else "bfloat16")
    hf_to_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "back", "llama")
    assert_bit_identical(tmp_path / "src", tmp_path / "back")
    if dtype == torch.float32:
        with torch.no_grad():
            want = hf(input_ids=torch.tensor(ids)).logits.numpy()
            again = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()(input_ids=torch.tensor(ids)).logits
        assert np.abs(np.asarray(ours(jnp.asarray(ids))) - want).max() <= TOL
        np.testing.assert_array_equal(again.numpy(), want)


def test_clip_round_trip(tmp_path):
    H.clip(seed=2).save_pretrained(tmp_path / "src")
    hf_to_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "back", "clip")
    assert_bit_identical(tmp_path / "src", tmp_path / "back")


def test_sharded_safetensors_both_ways(hf_llava, tmp_path):
    model, _, ids, pixels, want = hf_llava
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    ours = xllava_jax.load_pretrained(tmp_path / "src")
    assert np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL
    save_hf(ours, tmp_path / "out", "hf-llava", max_shard_bytes=100_000)
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


def test_bin_weights_only_when_asked(hf_llava, tmp_path, capsys):
    model, _, ids, pixels, want = hf_llava
    _write_bin(model, tmp_path)
    with pytest.raises(ConversionError, match="`allow_bin`=True"):  # the library names its parameter
        load_hf(tmp_path)
    assert cli(["convert", "hf2jax", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--allow-bin" in capsys.readouterr().err  # the command names its flag
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


def test_scanned_layers_convert_both_ways_bit_identical(hf_llava, tmp_path):
    """A checkpoint read into scanned (stacked) layers: the same logits, saved stacked, exported back
    to the same bytes, and unstacked again on load."""
    from xllava_jax import checkpoint as ckpt

    model, src, ids, pixels, want = hf_llava
    scanned = xllava_jax.load_pretrained(src, scan_layers=True)
    kernel = scanned.language_model.layers.self_attn.q_proj.kernel
    assert kernel.shape[0] == model.config.text_config.num_hidden_layers
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    assert np.abs(np.asarray(scanned(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL
    ckpt.save_checkpoint(tmp_path / "scanned", scanned)
    assert ckpt.read_meta(tmp_path / "scanned")["config"]["scan_layers"] is True
    assert cli(["convert", "jax2hf", "--src", str(tmp_path / "scanned"), "--out", str(tmp_path / "hf")]) == 0
    assert_bit_identical(src, tmp_path / "hf")
    plain = xllava_jax.load_pretrained(tmp_path / "scanned", scan_layers=False)
    first = np.asarray(plain.language_model.layers[1].mlp.up_proj.kernel[...])
    np.testing.assert_array_equal(first, np.asarray(scanned.language_model.layers.mlp.up_proj.kernel[...][1]))
    assert np.abs(np.asarray(plain(jnp.asarray(ids), jnp.asarray(pixels))) - want).max() <= TOL


def test_scanned_lora_adapters_export_one_per_layer(tmp_path):
    from flax import nnx
    from safetensors.numpy import load_file

    from xllava_jax.config import ModelConfig
    from xllava_jax.convert.peft import save_peft_adapter
    from xllava_jax.models.lora import LoraConfig, apply_lora
    from xllava_jax.models.xllava import XLlava

    model = XLlava(ModelConfig.tiny(scan_layers=True), rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(r=2, targets=("q_proj",)), rngs=nnx.Rngs(1))
    stacked = np.asarray(model.language_model.layers.self_attn.q_proj.lora_a[...])
    assert stacked.shape == (2, 64, 2)
    tensors = load_file(str(save_peft_adapter(model, tmp_path / "adapter") / "adapter_model.safetensors"))
    for i in range(2):
        key = f"base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight"
        np.testing.assert_array_equal(tensors[key], stacked[i].T)
