"""A real HTTP server on 127.0.0.1 speaking OpenAI chat completions, scripted by tests.

    with ScriptedServer(responder) as server:       # server.url == "http://127.0.0.1:PORT/v1"
        server.script(status(429, retry_after=2), ok("fine"))
        ...                                          # server.requests: every request body, in arrival order

Each `POST /v1/chat/completions` pops the next scripted Reply; when the queue is empty the responder (given
the parsed request JSON) answers; with neither, or when the responder raises, the server answers 400. `GET /v1/models`
lists the one model.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the server answers: a chat completion with `content` (status 200), or `body` verbatim when given;
    after sleeping `delay_s` (to hang past a client's timeout)."""

    status: int = 200
    content: str | None = None
    headers: dict = field(default_factory=dict)
    body: str | None = None
    delay_s: float = 0.0
    prompt_tokens: int = 10
    completion_tokens: int = 5
    finish_reason: str = "stop"


def ok(content: str, **kw) -> Reply:
    """A successful chat completion whose assistant message is `content`."""
    return Reply(content=content, **kw)


def status(code: int, retry_after: float | None = None) -> Reply:
    """An error reply with HTTP `code` (and a `Retry-After` header in seconds when given)."""
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    body = json.dumps({"error": {"message": f"scripted status {code}", "type": "scripted", "code": code}})
    return Reply(status=code, headers=headers, body=body)


class ScriptedServer:
    """A threaded chat-completions server on a free port of 127.0.0.1; use as a context manager."""

    def __init__(self, responder: Callable[[dict], Reply | str] | None = None, model: str = "scripted-model"):
        self.responder = responder
        self.model = model
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        """The API base, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies; each chat request takes the next one before the responder is asked."""
        with self._lock:
            self._queue.extend(replies)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_reply(self, request: dict) -> Reply:
        """The scripted reply, else the responder's, else a 400 saying nothing was scripted."""
        with self._lock:
            scripted = self._queue.popleft() if self._queue else None
        if scripted is not None:
            return scripted
        if self.responder is None:
            return Reply(status=400, body=json.dumps({"error": {"message": "no scripted reply left"}}))
        try:
            answer = self.responder(request)
        except Exception as err:  # a failing responder is a test bug: say so in a reply the client will not retry
            return Reply(status=400, body=json.dumps({"error": {"message": f"responder raised {err!r}"}}))
        return ok(answer) if isinstance(answer, str) else answer

    def _completion(self, request: dict, reply: Reply) -> str:
        """A chat.completion JSON body for `reply`."""
        return json.dumps({
            "id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
        }, ensure_ascii=False)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - the base class's signature
                """Silence the per-request log lines."""

            def _send(self, code: int, body: str, headers: dict | None = None) -> None:
                """Write one JSON response; a client that already hung up is ignored."""
                data = body.encode("utf-8")
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, str(value))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_GET(self):
                """`/v1/models`: the one model."""
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": server.model, "object": "model", "owned_by": "tests"}]}))
                else:
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))

            def do_POST(self):
                """`/v1/chat/completions`: record the request, then answer with the next reply."""
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))
                    return
                try:
                    request = json.loads(raw.decode("utf-8"))
                except ValueError:
                    self._send(400, json.dumps({"error": {"message": "request body is not JSON"}}))
                    return
                with server._lock:
                    server.requests.append(request)
                    server.headers.append(dict(self.headers.items()))
                reply = server._next_reply(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                body = reply.body if reply.body is not None else server._completion(request, reply)
                self._send(reply.status, body, reply.headers)

        return Handler
