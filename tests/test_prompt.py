"""Prompt records: inferred from a Hugging Face source (at conversion, and for a HF directory at inference, by
one function), resolved against flags by one rule, and exported as a chat template that gives transformers'
`apply_chat_template` our prompt ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hf_models as H
import pytest
from data_fixtures import train_tokenizer
from infer_fixtures import make_checkpoint, make_image

from xllava_jax import checkpoint as ckpt
from xllava_jax.cli import main as cli
from xllava_jax.data import conversation as conv
from xllava_jax.infer.engine import Engine

# llava-hf/llava-1.5-*-hf's chat template (chat_template.json): Vicuna's roles, no system prompt.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QUESTIONS = ("what colour is the circle", "the circle is red", "how many are there")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny transformers LLaVA (vocabulary 512, room for the test tokenizer) saved once, with a tokenizer."""
    path = tmp_path_factory.mktemp("tiny_llava") / "model"
    H.llava(seed=1, text_kw={"vocab_size": 512}).save_pretrained(path)
    train_tokenizer(path)
    return path


def copy_model(src: Path, dst: Path, *, chat_template: str | None = None, text_name: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if chat_template is not None:
        (dst / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}))
    if text_name is not None:
        config = json.loads((dst / "config.json").read_text())
        config["text_config"]["_name_or_path"] = text_name
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("case, name, expected, reason", [
    ("llava-hf chat template", "tiny", "vicuna_v1", "the chat template in chat_template.json"),
    ("Vicuna text model", "tiny", "vicuna_v1", "the model name 'lmsys/vicuna-7b-v1.5'"),
    ("LLaVA-1.5 directory", "llava-1.5-7b-hf", "vicuna_v1", "the model name 'llava-1.5-7b-hf'"),
    ("X-LLaVA directory", "X-LLaVA-13b", "llava_llama_2", "the model name 'X-LLaVA-13b'"),
    ("nothing to go by", "tiny", "llava_llama_2", "nothing in"),
    ("--template", "llava-1.5-7b-hf", "llava_llama_2", "--template"),
])
def test_hf2jax_records_the_prompt_its_source_implies(tiny_llava, tmp_path, capsys, case, name, expected, reason):
    src = copy_model(tiny_llava, tmp_path / name, chat_template=LLAVA_HF_TEMPLATE if "chat" in case else None,
                     text_name="lmsys/vicuna-7b-v1.5" if "Vicuna" in case else None)
    flags = ["--template", "llava_llama_2"] if case == "--template" else []
    assert cli(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "ckpt"), *flags]) == 0
    assert ckpt.read_meta(tmp_path / "ckpt")["prompt"] == {"template": expected, "mode": "clean", "system": None}
    [said] = [line for line in capsys.readouterr().err.splitlines() if "prompt template" in line]
    assert f"prompt template {expected}, clean ids ({reason}" in said
    if case == "nothing to go by":
        assert "pass --template vicuna_v1 for a LLaVA-1.5 (Vicuna) model" in said


def test_original_llava_1_5_release_records_vicuna_with_the_original_ids(tmp_path):
    """The original LLaVA-1.5 release (named so) is Vicuna-based, and was trained on its code's ids."""
    H.save_original_llava(H.llava(seed=2), tmp_path / "llava-v1.5-13b", tmp_path / "clip")
    assert cli(["convert", "hf2jax", "--src", str(tmp_path / "llava-v1.5-13b"), "--vision-src", str(tmp_path / "clip"),
                "--out", str(tmp_path / "ckpt")]) == 0
    assert ckpt.read_meta(tmp_path / "ckpt")["prompt"] == {"template": "vicuna_v1", "mode": "llava", "system": None}


def test_inference_on_a_hf_directory_infers_the_same_prompt(tiny_llava, tmp_path, capsys):
    vicuna = copy_model(tiny_llava, tmp_path / "llava-1.5-7b-hf")
    engine = Engine.load(vicuna)
    assert (engine.template, engine.mode, engine.system) == ("vicuna_v1", "clean", None)
    assert Engine.load(vicuna, template="llava_llama_2").template == "llava_llama_2"
    assert "nothing in" not in capsys.readouterr().err
    unknown = Engine.load(copy_model(tiny_llava, tmp_path / "tiny"))
    assert unknown.template == "llava_llama_2"
    assert "nothing in" in capsys.readouterr().err


def test_one_rule_resolves_the_prompt():
    from xllava_jax.convert.prompt import resolve_prompt

    record = {"template": "vicuna_v1", "mode": "llava", "system": "S"}
    assert resolve_prompt(record) == ("vicuna_v1", "llava", "S")
    assert resolve_prompt(record, template="vicuna_v1") == ("vicuna_v1", "llava", "S")
    # another template brings its own system prompt; flags win
    assert resolve_prompt(record, template="llava_llama_2") == ("llava_llama_2", "llava", None)
    assert resolve_prompt(record, mode="clean", system="T") == ("vicuna_v1", "clean", "T")
    assert resolve_prompt({}) == resolve_prompt(None) == ("llava_llama_2", "clean", None)


def hf_messages(image_part: dict, turns: tuple[str, ...], system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": [image_part, {"type": "text", "text": turns[0]}]})
    for i, text in enumerate(turns[1:], 1):
        messages.append({"role": "assistant" if i % 2 else "user", "content": [{"type": "text", "text": text}]})
    return messages


@pytest.mark.parametrize("template, mode, system", [
    ("vicuna_v1", "clean", None), ("llava_llama_2", "clean", None),
    ("llava_llama_2", "llava", "당신은 친절한 \"조수\"입니다.\n짧게 답하세요."), ("vicuna_v1", "llava", ""),
    ("plain", "clean", None),
])
def test_exported_chat_template_gives_our_prompt_ids(tmp_path, template, mode, system):
    """jax2hf's tokenizer files prompt as we do: transformers' tokenizer and LLaVA processor give the ids of
    our prompt (multi-turn, an image, the generation prompt, a system message), and converting the export
    back records the same prompt."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    src = make_checkpoint(tmp_path / "ckpt")
    meta = json.loads((src / ckpt.META_FILE).read_text())
    meta["prompt"] = {"template": template, "mode": mode, "system": system}
    (src / ckpt.META_FILE).write_text(json.dumps(meta))
    assert cli(["convert", "jax2hf", "--src", str(src), "--out", str(tmp_path / "hf")]) == 0

    engine = Engine.load(src)
    cfg = engine.cfg
    turns = QUESTIONS if template != "plain" else QUESTIONS[:1]
    ours = engine.prompt_ids([("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(turns)], with_image=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_tokens_to_ids(conv.IMAGE) == cfg.image_token_id
    theirs = tokenizer.apply_chat_template(hf_messages({"type": "image"}, turns), add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    expanded = [t for i in theirs for t in ([i] * cfg.num_image_tokens if i == cfg.image_token_id else [i])]
    assert expanded == ours

    size = cfg.vision.image_size
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size), tokenizer,
                               patch_size=cfg.vision.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    image = {"type": "image", "path": str(make_image(tmp_path / "image.png"))}
    batch = processor.apply_chat_template(hf_messages(image, turns), add_generation_prompt=True, tokenize=True,
                                          return_dict=True)
    assert list(batch["input_ids"][0]) == ours

    if template != "plain":  # a system message replaces the recorded system prompt
        pieces = conv.render(template, [("human", f"{conv.IMAGE}\n{turns[0]}"), *zip(("gpt", "human"), turns[1:])],
                             system="Be brief.", generation=True)
        want = conv.encode(pieces, engine.tokenizer, num_image_tokens=cfg.num_image_tokens,
                           image_token_id=cfg.image_token_id, mode=mode).input_ids
        theirs = processor.apply_chat_template(hf_messages(image, turns, system="Be brief."),
                                               add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(theirs["input_ids"][0]) == want

    assert cli(["convert", "hf2jax", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    assert ckpt.read_meta(tmp_path / "again")["prompt"] == meta["prompt"]
