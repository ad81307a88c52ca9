"""The inference engine: batched answers equal plain Generator runs, one compiled program, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
from infer_fixtures import make_checkpoint, make_image

import xllava_jax
from xllava_jax.cli import main
from xllava_jax.errors import UserError
from xllava_jax.infer.engine import Engine, _TextStream
from xllava_jax.infer.generate import Generator
from xllava_jax.tokenizer.runtime import Tokenizer

NEW = 8
QUESTIONS = ["What colour is the shape?", "무슨 색인가요?", "how many circles are there", "왼쪽 위 모양은?",
             "what shape is left", "Describe it."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine, checkpoint dir, images float32[H, W, 3] x 3)."""
    root = tmp_path_factory.mktemp("engine")
    ckpt = make_checkpoint(root / "ckpt")
    engine = Engine.load(ckpt)
    images = [engine.load_image(make_image(root / f"{i}.png", seed=i)) for i in range(3)]
    return engine, ckpt, images


@pytest.fixture(scope="module")
def reference(setup):
    """Greedy answers of a plain Generator, one row at a time: {(question index, image index | None): tokens}."""
    engine, ckpt, images = setup
    generator = Generator(xllava_jax.load_pretrained(ckpt))
    config = engine.generation_config(max_new_tokens=NEW)
    out = {}
    for q, image in [(0, 0), (1, None), (2, 1), (3, None), (4, 2), (5, None)]:
        ids = engine.prompt_ids([("human", QUESTIONS[q])], with_image=image is not None)
        pixels = None if image is None else images[image][None]
        out[q, image] = generator.generate([ids], pixels, config).tokens[0]
    return out


def run_batch(engine: Engine, images, rows, batch_size: int | None = 4, **kw):
    prompts = [engine.prompt_ids([("human", QUESTIONS[q])], with_image=i is not None) for q, i in rows]
    pixels = [None if i is None else images[i] for _, i in rows]
    return engine.generate(prompts, pixels, engine.generation_config(max_new_tokens=NEW), batch_size=batch_size, **kw)


def test_batches_match_single_rows_and_compile_once(setup, reference):
    """Mixed, image-only, text-only and a short last batch give the plain Generator's tokens, and all
    of them share one compiled program."""
    engine, _, images = setup
    batches = [[(0, 0), (1, None), (2, 1), (3, None)], [(0, 0), (2, 1), (4, 2), (0, 0)],
               [(1, None), (3, None), (5, None), (1, None)], [(4, 2), (5, None)]]
    for rows in batches:
        answers = run_batch(engine, images, rows)
        for (q, i), answer in zip(rows, answers, strict=True):
            tokens = reference[q, i]
            assert answer.text == engine.tokenizer.decode(tokens).strip()
            assert answer.completion_tokens == len(tokens)
            assert answer.finish_reason == ("stop" if len(tokens) < NEW else "length")
            ids = engine.prompt_ids([("human", QUESTIONS[q])], with_image=i is not None)
            assert answer.prompt_tokens == len(ids)
    assert engine.generator.num_compiled == 1


def test_stop_strings_cut_batch_answers_and_streams(setup, reference):
    engine, _, images = setup
    tokens = reference[0, 0]
    full = engine.tokenizer.decode(tokens).strip()
    assert len(full) >= 4, "the random model should produce some text"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    [answer] = run_batch(engine, images, [(0, 0)], stop=[stop])
    assert answer.text == full[: full.index(stop)].strip()
    assert answer.finish_reason == "stop" and answer.completion_tokens <= len(tokens)
    ids = engine.prompt_ids([("human", QUESTIONS[0])], with_image=True)
    config = engine.generation_config(max_new_tokens=NEW)
    assert "".join(engine.stream(ids, images[0], config)) == full
    assert "".join(engine.stream(ids, images[0], config, stop=[stop])) == answer.text


def test_text_stream_never_splits_characters_and_holds_stop_prefixes(setup):
    engine = setup[0]
    tok: Tokenizer = engine.tokenizer
    text = "빨간색 日本 원 ✓ end STOP tail"  # 日本 and ✓ are not pieces: byte fallback, 3 tokens each
    ids = tok.encode(text)
    assert any(tok.piece(i).startswith("<0x") for i in ids)
    stream = _TextStream(tok, ["STOP"])
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "빨간색 日本 원 ✓ end"
    assert stream.stopped
    held = _TextStream(tok, ["ST"])
    assert "".join(held.push(i) for i in tok.encode("aS")) == "a"  # "S" may start "ST"
    assert held.finish() == "S"


def test_prompt_ids_place_the_image_first(setup):
    engine = setup[0]
    cfg = engine.cfg
    with_image = engine.prompt_ids([("human", "what colour")], with_image=True)
    assert with_image.count(cfg.image_token_id) == cfg.num_image_tokens
    tagged = engine.prompt_ids([("human", "<image>\nwhat colour")], with_image=True)
    assert tagged == with_image
    assert cfg.image_token_id not in engine.prompt_ids([("human", "what colour")], with_image=False)
    with pytest.raises(UserError, match="no image"):
        engine.prompt_ids([("human", "<image> what colour")], with_image=False)
    with pytest.raises(UserError, match="human"):
        engine.prompt_ids([("gpt", "hi")], with_image=False)


def test_user_errors(setup, tmp_path):
    engine, ckpt, images = setup
    with pytest.raises(UserError, match="no such checkpoint"):
        Engine.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="tokenizer"):
        Engine.load(tmp_path / "empty")
    with pytest.raises(UserError, match="not a recognised image"):
        engine.load_image(b"not an image", "x.png")
    long = engine.prompt_ids([("human", "✓" * 400)], with_image=False)
    with pytest.raises(UserError, match="context"):
        engine.generate([long], [None], engine.generation_config(max_new_tokens=NEW))
    ids = engine.prompt_ids([("human", "hi")], with_image=False)
    with pytest.raises(UserError, match="image slot"):
        engine.generate([ids], [images[0]], engine.generation_config())
    with pytest.raises(UserError, match="image slot"):
        next(engine.stream(ids, images[0], engine.generation_config()))
    with pytest.raises(UserError, match="temperature"):
        engine.generation_config(temperature=-1)


def test_generate_command_streams_the_answer(setup, reference, tmp_path, capsys):
    engine, ckpt, _ = setup
    image = make_image(tmp_path / "img.png", seed=0)
    code = main(["generate", "--ckpt", str(ckpt), "--image", str(image), "--prompt", QUESTIONS[0],
                 "--max-new-tokens", str(NEW)])
    assert code == 0
    assert capsys.readouterr().out == engine.tokenizer.decode(reference[0, 0]).strip() + "\n"
    assert main(["generate", "--ckpt", str(ckpt), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"xllava: error: {tmp_path / 'nope.png'}: no such file"


def test_generate_resolves_the_prompt_as_chat_serve_and_eval_do(setup, tmp_path, monkeypatch):
    """No prompt flag of generate, chat, serve or eval run has a default of its own: with none given,
    generate prompts with the checkpoint's recorded template, mode and system prompt."""
    import json
    import shutil

    from xllava_jax import checkpoint
    from xllava_jax.cli import build_parser

    parser = build_parser()
    for command in (["generate", "--prompt", "p"], ["chat"], ["serve"],
                    ["eval", "run", "--benchmark", "gqa", "--data", "d", "--out", "o"]):
        args = parser.parse_args([*command, "--ckpt", "c"])
        assert (args.template, args.mode, getattr(args, "system", None)) == (None, None, None), command
    ckpt = Path(shutil.copytree(setup[1], tmp_path / "vicuna"))
    meta = json.loads((ckpt / checkpoint.META_FILE).read_text())
    meta["prompt"] = {"template": "vicuna_v1", "mode": "llava", "system": "Answer in one word."}
    (ckpt / checkpoint.META_FILE).write_text(json.dumps(meta))
    used = []

    def prompt_ids(engine, turns, *, with_image):
        used.append((engine.template, engine.mode, engine.system))
        return original(engine, turns, with_image=with_image)

    original = Engine.prompt_ids
    monkeypatch.setattr(Engine, "prompt_ids", prompt_ids)
    monkeypatch.setattr(Engine, "stream", lambda *args, **kwargs: iter(["ok"]))  # the prompt is what matters
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1",
                 "--template", "llava_llama_2"]) == 0
    assert used == [("vicuna_v1", "llava", "Answer in one word."), ("llava_llama_2", "llava", None)]
