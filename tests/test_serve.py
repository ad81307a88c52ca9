"""`xllava serve`: the official `openai` client (and our own ChatClient) against the server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
from infer_fixtures import make_checkpoint, make_image

from xllava_jax.api.client import ChatClient, user_message
from xllava_jax.cli import main
from xllava_jax.data.conversation import LLAMA2_SYSTEM
from xllava_jax.infer import openai_protocol as api
from xllava_jax.infer.engine import Engine
from xllava_jax.infer.serve import ChatServer, prompt_ids

MAX = 8
GREEDY = {"temperature": 0, "max_tokens": MAX}
QUESTIONS = ["What is in the picture?", "Say hello.", "Count to three, please.", "Name a colour."]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def with_image(url: str, text: str = QUESTIONS[0]) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def ask(env, text: str, **kw):
    return env.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                              **{**GREEDY, **kw})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root / "ckpt")
    engine = Engine.load(ckpt, model_id="tiny")
    images = root / "images"
    make_image(images / "a.png", seed=1)
    make_image(root / "outside.png", seed=2)
    (images / "link.png").symlink_to(root / "outside.png")
    server = ChatServer(engine, "127.0.0.1", 0, image_root=images, max_batch=4, batch_wait_ms=150,
                        max_body_bytes=1 << 20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    yield SimpleNamespace(server=server, client=client, engine=engine, root=root, images=images, ckpt=ckpt)
    server.shutdown()
    server.server_close()
    thread.join()


def test_models_lists_the_served_model(env):
    assert [m.id for m in env.client.models.list().data] == ["tiny"]
    assert env.client.models.retrieve("tiny").owned_by == "xllava"
    with pytest.raises(openai.NotFoundError):
        env.client.models.retrieve("gpt-4o")


def test_text_completion_is_cut_to_max_tokens(env):
    """Generated with the 16-token bucket, answered with the first MAX tokens."""
    reply = ask(env, QUESTIONS[1])
    engine = env.engine
    prompt = engine.prompt_ids([("human", QUESTIONS[1])], with_image=False)
    size = engine.image_config.size  # the engine's layout: one image slot per row, zeros without an image
    tokens = engine.generator.generate([prompt], np.zeros((1, 1, size, size, 3), np.float32),
                                       engine.generation_config(max_new_tokens=16)).tokens[0]
    assert len(tokens) > MAX  # no eos before the cut, so the cut is what ends the answer
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny" and choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (engine.tokenizer.decode(tokens[:MAX]).strip(), "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(prompt), MAX, len(prompt) + MAX)


def test_image_as_data_url_and_file_url(env):
    path = env.images / "a.png"
    by_data = env.client.chat.completions.create(model="tiny", messages=with_image(data_url(path)), **GREEDY)
    by_file = env.client.chat.completions.create(model="tiny", messages=with_image(path.as_uri()), **GREEDY)
    assert by_data.choices[0].message.content == by_file.choices[0].message.content
    prompt = env.engine.prompt_ids([("human", QUESTIONS[0])], with_image=True)
    assert by_data.usage.prompt_tokens == by_file.usage.prompt_tokens == len(prompt)


def test_streaming_equals_non_streaming(env):
    messages = with_image(data_url(env.images / "a.png"), QUESTIONS[2])
    whole = env.client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    chunks = list(env.client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # token by token, not one block
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_strings_cut_the_answer(env):
    messages = with_image(data_url(env.images / "a.png"), QUESTIONS[2])
    create = partial(env.client.chat.completions.create, model="tiny", messages=messages, **GREEDY)
    full = create().choices[0].message.content
    stop = full[len(full) // 2:][:2]
    reply = create(stop=[stop])
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < MAX
    want = full[:full.find(stop)].strip()
    assert reply.choices[0].message.content == want
    assert "".join(c.choices[0].delta.content or "" for c in create(stop=stop, stream=True)) == want


def test_concurrent_requests_share_one_generate_call(env):
    singles = [ask(env, q).choices[0].message.content for q in QUESTIONS]
    before = len(env.server.batcher.batch_sizes)
    barrier, answers = threading.Barrier(len(QUESTIONS)), [None] * len(QUESTIONS)

    def worker(i: int) -> None:
        barrier.wait()
        answers[i] = ask(env, QUESTIONS[i]).choices[0].message.content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == singles
    assert max(env.server.batcher.batch_sizes[before:]) > 1


def test_our_chat_client_talks_to_the_server(env):
    """The client the judge and data generation use, pointed at this server."""
    path = env.images / "a.png"
    reply = ChatClient(env.server.url, "tiny", max_retries=0).chat([user_message(QUESTIONS[0], [path])],
                                                                   temperature=0, max_tokens=MAX)
    want = env.client.chat.completions.create(model="tiny", messages=with_image(data_url(path)), **GREEDY)
    assert reply.text == want.choices[0].message.content
    assert reply.completion_tokens == want.usage.completion_tokens


def test_system_message_replaces_the_template_system_prompt(env):
    system = LLAMA2_SYSTEM.replace("helpful", "kind")  # about as long, to reuse the compiled prompt bucket
    reply = env.client.chat.completions.create(model="tiny", messages=[
        {"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[1]}], **GREEDY)
    prompt = prompt_ids(env.engine, [("human", QUESTIONS[1])], system)
    assert prompt != env.engine.prompt_ids([("human", QUESTIONS[1])], with_image=False)
    assert reply.usage.prompt_tokens == len(prompt)


# ---------------------------------------------------------------------------------------- errors
def post_raw(env, body: bytes, path: str = "/chat/completions") -> tuple[int, dict]:
    request = urllib.request.Request(env.server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_json_unknown_route_and_oversized_body(env):
    status, body = post_raw(env, b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert post_raw(env, b"{}", "/completions")[0] == 404
    status, body = post_raw(env, b" " * (1 << 20) + b"{}")
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_unknown_model_is_not_found(env):
    with pytest.raises(openai.NotFoundError) as err:
        env.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("messages, code", [
    (with_image("data:image/png;base64," + base64.b64encode(b"not an image").decode()), "invalid_image"),
    (with_image("data:image/png;base64,@@@"), "invalid_image"),
    (with_image("https://example.com/cat.png"), "invalid_image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,eA=="}}] * 2}],
     "too_many_images"),
    ([{"role": "assistant", "content": "hi"}], None),
    ([{"role": "user", "content": "look at <image>"}], None),
])
def test_bad_messages_are_400(env, messages, code):
    with pytest.raises(openai.BadRequestError) as err:
        env.client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert err.value.code == code and err.value.param == "messages"


@pytest.mark.parametrize("extra, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"extra_body": {"top_k": "many"}}, "top_k"),
])
def test_bad_fields_are_400(env, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        env.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           **{**GREEDY, **extra})
    assert err.value.param == param


def test_too_many_tokens_is_context_length_exceeded(env):
    with pytest.raises(openai.BadRequestError) as err:
        ask(env, "hi", max_tokens=env.engine.max_context)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        ask(env, "word " * env.engine.max_context, stream=True)
    assert err.value.code == "context_length_exceeded"


@pytest.mark.parametrize("name", ["outside.png", "images/link.png", "images/../outside.png"])
def test_file_urls_outside_the_root_are_refused(env, name):
    url = "file://" + str(env.root / name)  # not normalised: '..' and the symlink reach the server
    with pytest.raises(openai.PermissionDeniedError) as err:
        env.client.chat.completions.create(model="tiny", messages=with_image(url), **GREEDY)
    assert err.value.code == "image_outside_root"


def test_file_urls_without_an_image_root_are_refused(env):
    with pytest.raises(api.APIError) as err:
        api.resolve_file_url((env.images / "a.png").as_uri(), None)
    assert err.value.status == 403 and err.value.code == "file_urls_disabled"


# ------------------------------------------------------------------------------------------- CLI
def test_cli_bad_flags_exit_2(env, tmp_path, capsys):
    assert main(["serve", "--ckpt", str(env.ckpt), "--image-root", str(tmp_path / "nope")]) == 2
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("xllava: error: ") and "image root" in lines[0]
    assert lines[-1].startswith("xllava: error: ") and "missing" in lines[-1]


def test_cli_serves_and_shuts_down_on_sigterm(env):
    env_vars = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "xllava_jax.cli", "serve", "--ckpt", str(env.ckpt), "--port", "0",
                             "--model-name", "cli"], stderr=subprocess.PIPE, text=True, env=env_vars)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving")):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        url = lines[-1].split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "/models", timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == "cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        proc.kill()
