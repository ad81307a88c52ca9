"""`xllava chat`: a scripted stdin through `xllava_jax.cli.main` against a tiny checkpoint."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from infer_fixtures import make_checkpoint, make_image

from xllava_jax.cli import build_parser, main
from xllava_jax.infer.engine import Engine

MAX = 8
FIRST, SECOND = "What is in the picture?", "Tell me more."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    ckpt = make_checkpoint(root / "ckpt")
    return SimpleNamespace(ckpt=ckpt, engine=Engine.load(ckpt, model_id="tiny"), image=make_image(root / "a.png", 1),
                           root=root)


def chat(env, monkeypatch, capsys, script: str, *flags: str) -> tuple[int, str, list, list]:
    """Run `xllava chat` on `script` with the module's engine; returns (exit code, stdout, the turns of every
    prompt built, the (prompt, image, config) of every streamed answer)."""
    loads, prompts, streams = [], [], []
    engine = env.engine

    def load(ckpt, **kw):
        loads.append((ckpt, kw))
        return engine

    def prompt_ids(turns, *, with_image):
        prompts.append(list(turns))
        return Engine.prompt_ids(engine, turns, with_image=with_image)

    def stream(prompt, image, config, stop=()):
        streams.append((prompt, image, config))
        return Engine.stream(engine, prompt, image, config, stop)

    monkeypatch.setattr(Engine, "load", staticmethod(load))
    monkeypatch.setattr(engine, "prompt_ids", prompt_ids)
    monkeypatch.setattr(engine, "stream", stream)
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code = main(["chat", "--ckpt", str(env.ckpt), *flags])
    assert [ckpt for ckpt, _ in loads] == [str(env.ckpt)]
    return code, capsys.readouterr().out, prompts, streams


def test_two_turns_about_an_image(env, monkeypatch, capsys):
    missing = env.root / "missing.png"
    script = f"/help\n/image {missing}\n/image {env.image}\n{FIRST}\n\n{SECOND}\n/quit\nnever asked\n"
    code, out, prompts, streams = chat(env, monkeypatch, capsys, script, "--temperature", "0",
                                       "--max-new-tokens", str(MAX))
    assert code == 0
    assert "/image PATH" in out  # the help text
    assert f"error: {missing}: no such file" in out.splitlines()
    assert len(streams) == 2  # nothing after /quit, nothing for the empty line
    (first_prompt, image, config), (second_prompt, _, _) = streams
    assert image is not None and config.temperature == 0 and config.max_new_tokens == MAX
    engine = env.engine
    want = Engine.generate(engine, [first_prompt], [image], config)[0].text  # the non-streamed answer
    assert want and want in out
    assert prompts[1] == [("human", FIRST), ("gpt", want), ("human", SECOND)]
    answer_ids = engine.tokenizer.encode(f" {want} ", start=False)  # the template's answer piece
    assert any(second_prompt[i:i + len(answer_ids)] == answer_ids for i in range(len(second_prompt)))
    assert first_prompt.count(engine.cfg.image_token_id) == engine.cfg.num_image_tokens


def test_image_change_and_reset_restart_the_conversation(env, monkeypatch, capsys):
    script = f"{FIRST}\n/reset\n{FIRST}\n/image {env.image}\n/bogus\n"  # ends at end of input
    code, out, prompts, streams = chat(env, monkeypatch, capsys, script, "--image", str(env.image),
                                       "--temperature", "0", "--max-new-tokens", str(MAX))
    assert code == 0
    assert prompts == [[("human", FIRST)], [("human", FIRST)]]
    assert streams[0][0] == streams[1][0] and streams[0][1] is not None
    assert "[new conversation]" in out and "unknown command /bogus" in out


def test_sampling_defaults_are_the_paper_demo():
    args = build_parser().parse_args(["chat", "--ckpt", "x"])
    assert (args.temperature, args.top_p, args.top_k, args.max_new_tokens) == (0.1, 0.9, 40, 512)


def test_bad_image_flag_exits_2(env, capsys):
    assert main(["chat", "--ckpt", str(env.ckpt), "--image", str(env.root / "nope.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xllava: error: ") and "nope.png" in err[0]
