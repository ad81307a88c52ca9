"""`xllava serve`: the official `openai` client (and our own ChatClient) against the server on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
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
from xllava_jax.infer.serve import ChatServer

MAX = 8
GREEDY = {"temperature": 0, "max_tokens": MAX}
QUESTIONS = ["What is in the picture?", "Say hello.", "Count to three, please.", "Name a colour."]
KEY, TIMEOUT = "test-key-0123", 2.0  # the guarded server's API key and request timeout (s)
CHAT, JSON = "/v1/chat/completions", {"Content-Type": "application/json"}


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
    client.close()  # its idle keep-alive connections would otherwise time out in a later test, logging to stderr
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def guarded(env):
    """A second server on the same engine (nothing compiles again) with an API key and a short request timeout."""
    server = ChatServer(env.engine, "127.0.0.1", 0, api_key=KEY, request_timeout=TIMEOUT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()  # the client closes each connection, so none is reused just as the server times it out
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120,
                           default_headers={"Connection": "close"})
    yield SimpleNamespace(server=server, client=client)
    client.close()
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
    prompt = env.engine.prompt_ids([("human", QUESTIONS[1])], with_image=False, system=system)
    assert prompt != env.engine.prompt_ids([("human", QUESTIONS[1])], with_image=False)
    assert reply.usage.prompt_tokens == len(prompt)


# ---------------------------------------------------------------------------------------- errors
def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_good_request_is_answered_after_every_kind_of_bad_one(env):
    """Each refusal is OpenAI-shaped JSON; the connection stays open when the request was read whole, and the
    next request (on it, or on a new one after a close) is answered."""
    good = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[1]}], **GREEDY}).encode()
    want = ask(env, QUESTIONS[1]).choices[0].message.content

    def chat(**fields) -> bytes:
        return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()

    outside = with_image("file://" + str(env.root / "outside.png"))
    bad = [  # what, method, path, body, headers, status, code, whether the server closes the connection
        ("malformed JSON", "POST", CHAT, b'{"model": "tiny", "messages": [', JSON, 400, "invalid_json", False),
        ("wrong content type", "POST", CHAT, chat(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type",
         False),
        ("missing messages", "POST", CHAT, b'{"model": "tiny"}', JSON, 400, None, False),
        ("unknown model", "POST", CHAT, chat(model="gpt-4o"), JSON, 404, "model_not_found", False),
        ("bad image URL", "POST", CHAT, chat(messages=with_image("https://example.com/a.png")), JSON, 400,
         "invalid_image_url", False),
        ("file outside the root", "POST", CHAT, chat(messages=outside), JSON, 403, "image_outside_root", False),
        ("oversized body", "POST", CHAT, b" " * (1 << 20) + b"{}", JSON, 413, "request_too_large", True),
        ("PUT", "PUT", CHAT, chat(), JSON, 405, "method_not_allowed", False),
        ("GET on a POST route", "GET", CHAT, None, {}, 405, "method_not_allowed", False),
        ("unknown method", "BREW", "/v1/models", None, {}, 501, None, True),
        ("unknown POST path", "POST", "/v1/completions", chat(), JSON, 404, "unknown_route", False),
        ("unknown GET path", "GET", "/nope", None, {}, 404, "unknown_route", False),
    ]
    raw = [  # sent whole on a fresh connection, which the client then half-closes
        ("truncated body", f"POST {CHAT} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                           "Content-Length: 100\r\n\r\n{\"model\": ", 400, "incomplete_body"),
        ("malformed Content-Length", f"POST {CHAT} HTTP/1.1\r\nContent-Type: application/json\r\n"
                                     "Content-Length: ten\r\n\r\n{}", 400, None),
        ("oversized header", f"GET /v1/models HTTP/1.1\r\nX-Big: {'x' * 70000}\r\n\r\n", 431, None),
    ]
    conn = http.client.HTTPConnection(*env.server.server_address[:2], timeout=120)

    def answers_a_good_request(what: str) -> None:
        conn.request("POST", CHAT, good, JSON)  # http.client reconnects when the server closed
        response = conn.getresponse()
        assert (response.status, json.load(response)["choices"][0]["message"]["content"]) == (200, want), what

    for what, method, path, body, headers, status, code, closes in bad:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        error = json.load(response)["error"]
        assert (response.status, error["code"], response.will_close) == (status, code, closes), what
        assert set(error) == {"message", "type", "param", "code"}, what
        answers_a_good_request(what)
    for what, request, status, code in raw:
        with socket.create_connection(env.server.server_address[:2], timeout=60) as sock:
            sock.sendall(request.encode())
            sock.shutdown(socket.SHUT_WR)
            head, _, body = read_to_end(sock).partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and json.loads(body)["error"]["code"] == code, what
        answers_a_good_request(what)
    conn.close()


def test_a_stalled_client_is_cut_off_while_others_are_answered(guarded):
    """A body that stops short, headers that stop short, a connection that sends nothing: each is closed after
    the request timeout (the first with a 408), and other clients are answered meanwhile."""
    address = guarded.server.server_address[:2]
    stalled = [socket.create_connection(address, timeout=TIMEOUT + 30) for _ in range(3)]
    stalled[0].sendall(f"POST {CHAT} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ".encode())
    stalled[1].sendall(f"POST {CHAT} HTTP/1.1\r\nHost: t\r\n".encode())
    start = time.monotonic()
    with urllib.request.urlopen(guarded.server.url.removesuffix("/v1") + "/health", timeout=TIMEOUT) as response:
        assert response.status == 200
    assert time.monotonic() - start < TIMEOUT  # answered while all three stalls are still open
    assert ask(guarded, QUESTIONS[1]).choices[0].finish_reason == "length"
    replies = []
    for sock in stalled:
        with sock:
            replies.append(read_to_end(sock))
    assert TIMEOUT / 2 < time.monotonic() - start < TIMEOUT + 20
    head, _, body = replies[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and json.loads(body)["error"]["code"] == "request_timeout"
    assert replies[1:] == [b"", b""]


def test_health_and_an_api_key_on_every_other_route(env, guarded):
    for server in (env.server, guarded.server):  # /health needs no key
        with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=30) as response:
            assert json.load(response) == {"status": "ok", "model": "tiny"}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(guarded.server.url + "/models", headers=headers), timeout=30)
        body = json.load(err.value)
        assert (err.value.code, err.value.headers["WWW-Authenticate"]) == (401, "Bearer")
        assert body["error"]["code"] == "invalid_api_key" and "wrong" not in json.dumps(body)
    with openai.OpenAI(base_url=guarded.server.url, api_key="wrong-key", max_retries=0, timeout=60) as wrong, \
            pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert err.value.code == "invalid_api_key"
    assert [m.id for m in guarded.client.models.list().data] == ["tiny"]
    assert ask(guarded, QUESTIONS[1]).choices[0].message.content == ask(env, QUESTIONS[1]).choices[0].message.content


def test_sampling_draws_a_fresh_seed_unless_the_request_sets_one(env):
    """16 tokens drawn from the whole vocabulary: equal samples by chance are out of the question."""
    sample = partial(ask, env, QUESTIONS[1], temperature=1.0, top_p=1.0, max_tokens=16, extra_body={"top_k": 0})
    first, second = (sample().choices[0].message.content for _ in range(2))
    assert first != second
    assert sample(seed=1234).choices[0].message.content == sample(seed=1234).choices[0].message.content
    assert env.engine.tokenizer.decode([env.engine.cfg.image_token_id]) == ""  # a drawn placeholder: no 500


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
def test_cli_bad_flags_exit_2(env, tmp_path, capsys, monkeypatch):
    serve = ["serve", "--ckpt", str(env.ckpt)]
    monkeypatch.delenv("XLLAVA_SERVE_API_KEY", raising=False)
    assert main([*serve, "--image-root", str(tmp_path / "nope")]) == 2
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    assert main([*serve, "--request-timeout", "0"]) == 2
    assert main([*serve, "--api-key", "a secret with spaces"]) == 2
    monkeypatch.setenv("XLLAVA_SERVE_API_KEY", "")  # set but empty: refused rather than serving without a key
    assert main(serve) == 2
    err = capsys.readouterr().err
    # (stray reports of earlier tests' garbage, such as orbax's orphaned reads, may land here too)
    lines = [line for line in err.splitlines() if line.startswith("xllava")]
    assert len(lines) == 5 and all(line.startswith("xllava: error: ") for line in lines), err
    assert "Traceback" not in err
    assert ["image root" in lines[0], "missing" in lines[1], "--request-timeout" in lines[2]] == [True] * 3
    assert "secret" not in lines[3] and "XLLAVA_SERVE_API_KEY" in lines[4]


def test_cli_serves_and_shuts_down_on_sigterm(env):
    """With the API key from the environment, never printed."""
    env_vars = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "XLLAVA_SERVE_API_KEY": "cli-key-42"}
    proc = subprocess.Popen([sys.executable, "-m", "xllava_jax.cli", "serve", "--ckpt", str(env.ckpt), "--port", "0",
                             "--model-name", "cli"], stderr=subprocess.PIPE, text=True, env=env_vars)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving")):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        url = lines[-1].split(" at ")[1].split()[0]
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
            assert json.load(response) == {"status": "ok", "model": "cli"}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/models", timeout=30)
        assert err.value.code == 401
        keyed = urllib.request.Request(url + "/models", headers={"Authorization": "Bearer cli-key-42"})
        with urllib.request.urlopen(keyed, timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == "cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        rest = proc.stderr.read()
        assert "shutting down" in rest and "cli-key-42" not in "".join(lines) + rest
    finally:
        proc.kill()
