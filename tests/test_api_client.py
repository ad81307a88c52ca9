"""ChatClient against a real local server: replies, retries, timeouts, errors, cache, budget, threads, images."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.chat_server import Reply, ScriptedServer, ok, status
from xllava_jax.api.client import ApiError, BudgetExceeded, ChatClient, Usage, image_part, user_message
from xllava_jax.errors import UserError

FAKE_KEY = "sk-test-SECRET-1234567890"
MESSAGES = [{"role": "user", "content": "hello"}]


class Sleeps:
    """An injected sleep that records the delays instead of waiting."""

    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("XLLAVA_TEST_KEY", FAKE_KEY)
    return "XLLAVA_TEST_KEY"


def _client(server: ScriptedServer, key_env: str | None = None, **kw) -> tuple[ChatClient, Sleeps]:
    sleeps = Sleeps()
    kw.setdefault("api_key_env", key_env or "XLLAVA_TEST_NO_SUCH_KEY")
    return ChatClient(server.url, "judge-x", sleep=sleeps, **kw), sleeps


def test_good_reply_sends_request_and_key(key_env):
    with ScriptedServer() as server:
        server.script(ok("hi there", prompt_tokens=7, completion_tokens=3))
        client, sleeps = _client(server, key_env)
        reply = client.chat(MESSAGES, temperature=0.2, max_tokens=64, seed=3, response_format={"type": "json_object"})
    assert reply.text == "hi there" and not reply.cached and reply.finish_reason == "stop"
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 3)
    body = server.requests[0]
    assert body == {"model": "judge-x", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 64, "seed": 3,
                    "response_format": {"type": "json_object"}}
    assert server.headers[0]["Authorization"] == f"Bearer {FAKE_KEY}"
    assert client.usage == Usage(requests=1, cached=0, retries=0, prompt_tokens=7, completion_tokens=3)
    assert sleeps.calls == []


def test_no_key_sends_no_authorization():
    with ScriptedServer() as server:
        server.script(ok("x"))
        client, _ = _client(server)
        client.chat(MESSAGES)
    assert "Authorization" not in server.headers[0]


def test_429_honours_retry_after():
    with ScriptedServer() as server:
        server.script(status(429, retry_after=2.5), ok("after wait"))
        client, sleeps = _client(server)
        assert client.chat(MESSAGES).text == "after wait"
    assert sleeps.calls == [2.5]
    assert client.usage.retries == 1 and client.usage.requests == 1 and len(server.requests) == 2


def test_5xx_back_off_exponentially_then_succeed():
    with ScriptedServer() as server:
        server.script(status(500), status(502), status(503), ok("finally"))
        client, sleeps = _client(server, backoff_s=0.5, max_backoff_s=1.5)
        assert client.chat(MESSAGES).text == "finally"
    assert sleeps.calls == [0.5, 1.0, 1.5]  # 0.5 * 2**attempt, capped at max_backoff_s
    assert client.usage.retries == 3


def test_hang_past_timeout_is_retried():
    with ScriptedServer() as server:
        server.script(Reply(content="too late", delay_s=1.0), ok("in time"))
        client, sleeps = _client(server, timeout_s=0.3)
        assert client.chat(MESSAGES).text == "in time"
    assert sleeps.calls == [1.0] and len(server.requests) == 2


def test_4xx_fails_at_once_with_one_line(key_env):
    with ScriptedServer() as server:
        server.script(status(400), ok("never reached"))
        client, sleeps = _client(server, key_env)
        with pytest.raises(ApiError) as info:
            client.chat(MESSAGES)
    message = str(info.value)
    assert "HTTP 400" in message and server.url in message and "\n" not in message
    assert FAKE_KEY not in message and len(server.requests) == 1 and sleeps.calls == []


def test_retries_exhausted_never_leaks_key(key_env, tmp_path):
    echo = Reply(status=503, body='{"error": {"message": "bad key ' + FAKE_KEY + '\\nsecond line"}}')
    with ScriptedServer() as server:
        server.script(*[echo] * 3)
        client, sleeps = _client(server, key_env, max_retries=2, cache_dir=tmp_path / "cache")
        with pytest.raises(ApiError) as info:
            client.chat(MESSAGES)
        server.script(ok("good"))
        client.chat(MESSAGES)
    message = str(info.value)
    assert not isinstance(info.value, BudgetExceeded)
    assert "HTTP 503" in message and "3 attempts" in message and "\n" not in message and "***" in message
    assert FAKE_KEY not in message and len(sleeps.calls) == 2
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and FAKE_KEY not in files[0].read_text()


def test_connection_refused_is_an_api_error():
    with ScriptedServer() as server:
        url = server.url
    client = ChatClient(url, "m", max_retries=1, sleep=lambda s: None, timeout_s=1.0)
    with pytest.raises(ApiError, match="connection failed"):
        client.chat(MESSAGES)


def test_malformed_success_body_is_retried_like_a_5xx():
    with ScriptedServer() as server:
        server.script(Reply(body="not json at all"), Reply(body='{"choices": []}'), ok("fine"))
        client, sleeps = _client(server, backoff_s=0.5)
        assert client.chat(MESSAGES).text == "fine"
        assert sleeps.calls == [0.5, 1.0] and client.usage.retries == 2 and len(server.requests) == 3
        server.script(*[Reply(body="<html>proxy error</html>")] * 2)
        client, _ = _client(server, max_retries=1)
        with pytest.raises(ApiError, match=r"malformed chat completion: <html>proxy error</html> \(gave up after 2"):
            client.chat([{"role": "user", "content": "other"}])
    assert len(server.requests) == 5


def test_cache_hit_on_rerun_makes_no_request(tmp_path):
    with ScriptedServer(lambda req: ok("answer to " + req["messages"][0]["content"])) as server:
        first, _ = _client(server, cache_dir=tmp_path, price_in_per_1k=1.0, price_out_per_1k=2.0)
        texts = [first.chat([{"role": "user", "content": q}]).text for q in ("a", "b")]
        assert len(server.requests) == 2 and first.cost_usd() == pytest.approx(2 * (0.010 + 0.010))
        second, _ = _client(server, cache_dir=tmp_path, price_in_per_1k=1.0, price_out_per_1k=2.0)
        replies = [second.chat([{"role": "user", "content": q}]) for q in ("a", "b")]
        assert len(server.requests) == 2  # nothing new reached the server
        other = second.chat([{"role": "user", "content": "a"}], temperature=0.7)  # a different key
    assert [r.text for r in replies] == texts == ["answer to a", "answer to b"]
    assert all(r.cached for r in replies) and not other.cached and len(server.requests) == 3
    assert second.usage == Usage(requests=1, cached=2, retries=0, prompt_tokens=10, completion_tokens=5)
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".json"]  # no temp file left behind


def test_budget_cap_stops_requests():
    with ScriptedServer(lambda req: ok("x", prompt_tokens=1000, completion_tokens=0)) as server:
        client, _ = _client(server, price_in_per_1k=0.01, budget_usd=0.025)
        client.chat(MESSAGES)
        client.chat(MESSAGES)
        client.chat(MESSAGES)  # spent 0.02 < 0.025 before this one
        with pytest.raises(BudgetExceeded, match="budget"):
            client.chat(MESSAGES)
    assert len(server.requests) == 3 and client.cost_usd() == pytest.approx(0.03)


def test_usage_counts_are_thread_safe(tmp_path):
    barrier = threading.Barrier(8)

    def responder(req: dict) -> Reply:
        return ok(req["messages"][0]["content"].upper(), prompt_tokens=3, completion_tokens=2)

    with ScriptedServer(responder) as server:
        server.script(status(500), status(500))
        client, _ = _client(server, cache_dir=tmp_path)

        def one(i: int) -> str:
            if i < 8:
                barrier.wait()
            return client.chat([{"role": "user", "content": f"q{i % 40}"}]).text

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(one, range(80)))
    assert texts == [f"Q{i % 40}" for i in range(80)]
    usage = client.usage
    assert usage.retries == 2 and usage.requests + usage.cached == 80 and usage.requests >= 40
    assert usage.requests == len(server.requests) - 2
    assert (usage.prompt_tokens, usage.completion_tokens) == (3 * usage.requests, 2 * usage.requests)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_data_url_round_trip(tmp_path):
    png = _png_bytes()
    path = tmp_path / "picture.bin"  # a suffix that says nothing: the bytes decide
    path.write_bytes(png)

    def responder(req: dict) -> Reply:
        parts = req["messages"][0]["content"]
        url = parts[0]["image_url"]["url"]
        header, data = url.split(",", 1)
        decoded = base64.b64decode(data)
        image = Image.open(io.BytesIO(decoded))
        return ok(f"{header} {decoded == png} {image.size} {parts[1]['text']}")

    with ScriptedServer(responder) as server:
        client, _ = _client(server)
        reply = client.chat([user_message("what colour?", [path])])
    assert reply.text == "data:image/png;base64 True (4, 3) what colour?"
    assert image_part(b"\xff\xd8\xff\xe0rest")["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert user_message("only text") == {"role": "user", "content": [{"type": "text", "text": "only text"}]}


def test_bad_images_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read image"):
        image_part(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a recognised image"):
        image_part(tmp_path / "notes.txt")
