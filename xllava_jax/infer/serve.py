"""`xllava serve`: an OpenAI-compatible HTTP server (stdlib `http.server`) in front of one `Engine`.

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (wire format in
`openai_protocol`); with an API key every route but `/health` needs `Authorization: Bearer KEY`. Every
connection has its own thread, and every read and write on it times out after `request_timeout` seconds, so
a client that stalls cannot hold a thread. Non-streaming requests queue for the `Batcher` (see `batching`),
which batches concurrent ones into one generate call. Streaming requests (`stream: true`) run one at a time
through the engine lock, token by token, as server-sent events; a stream holds up only other generation,
never `/v1/models` or request validation. Every refusal, http.server's own included, is OpenAI-shaped JSON,
and a refused request's unread body is read and dropped (or the connection closed) so the next request on
the connection is read from its start.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from xllava_jax.errors import UserError
from xllava_jax.infer import openai_protocol as api
from xllava_jax.infer.batching import Batcher, Job, stream_answer
from xllava_jax.infer.engine import Engine, EngineError

MAX_BODY_BYTES = 20 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
API_KEY_ENV = "XLLAVA_SERVE_API_KEY"
ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}  # path -> the method it takes
log = logging.getLogger(__name__)


class ServeError(UserError):
    """A server setting that cannot work (bad flag, unusable image root, port in use)."""


def check_settings(image_root: str | Path | None, max_batch: int, batch_wait_ms: float, max_body_bytes: int,
                   request_timeout: float = REQUEST_TIMEOUT_S, api_key: str | None = None) -> None:
    """Raise ServeError for server settings that cannot work (never echoing the API key)."""
    if max_batch < 1:
        raise ServeError(f"`max_batch` must be at least 1, got {max_batch}")
    if batch_wait_ms < 0:
        raise ServeError(f"`batch_wait_ms` must be >= 0, got {batch_wait_ms}")
    if max_body_bytes < 1:
        raise ServeError(f"the request body limit must be positive, got {max_body_bytes} bytes")
    if not (request_timeout > 0 and math.isfinite(request_timeout)):
        raise ServeError(f"`request_timeout` must be a positive number of seconds, got {request_timeout}")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and api_key and " " not in api_key):
        raise ServeError(f"the API key (`api_key` or ${API_KEY_ENV}) must be non-empty printable ASCII without spaces")
    if image_root is not None and not Path(image_root).is_dir():
        raise ServeError(f"{image_root}: the image root is not a directory")


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; `url` is its `.../v1` base. `server_close()` also stops the batcher.

    request_timeout: seconds any read or write on a connection may wait (a stalled upload, an idle keep-alive
    connection, a client that does not read its answer) before the connection is closed. api_key: when set,
    every route but `/health` needs `Authorization: Bearer <api_key>`.
    """

    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, *,
                 image_root: str | Path | None = None, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 defaults: api.Defaults | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 request_timeout: float = REQUEST_TIMEOUT_S, api_key: str | None = None):
        check_settings(image_root, max_batch, batch_wait_ms, max_body_bytes, request_timeout, api_key)
        defaults = defaults or api.Defaults()
        engine.generation_config(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                                 max_new_tokens=defaults.max_tokens)  # raises EngineError on bad defaults
        self.engine, self.model_id, self.defaults = engine, engine.model_id, defaults
        self.image_root = None if image_root is None else Path(image_root).resolve()
        self.max_body_bytes, self.created = max_body_bytes, int(time.time())
        self.request_timeout, self.api_key = request_timeout, api_key
        self.lock = threading.Lock()
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.batcher = Batcher(engine, self.lock, max_batch=max_batch, wait_s=batch_wait_ms / 1000)

    @property
    def url(self) -> str:
        """The API base clients use: `http://HOST:PORT/v1`."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def server_close(self) -> None:
        """Close the socket and stop the batcher (after the jobs queued so far)."""
        super().server_close()
        self.batcher.close()

    def job(self, request: api.ChatRequest) -> Job:
        """Decode the request's image, build its prompt and check it fits the context (400 otherwise)."""
        image = None
        if request.image is not None:
            name = "image_url" if isinstance(request.image, bytes) else str(request.image)
            try:
                image = self.engine.load_image(request.image, name=name)
            except EngineError as e:
                raise api.bad_request(f"cannot use the image: {e}", "messages", "invalid_image") from None
        try:
            prompt = self.engine.prompt_ids(request.turns, with_image=image is not None, system=request.system)
        except EngineError as e:
            raise api.bad_request(f"cannot render the conversation: {e}", "messages") from None
        room = self.engine.max_context - len(prompt)
        limit = min(self.defaults.max_tokens, room) if request.max_tokens is None else request.max_tokens
        if limit > room or room < 1:
            raise api.bad_request(
                f"This model's maximum context length is {self.engine.max_context} tokens; the messages hold "
                f"{len(prompt)} tokens and {limit} new tokens were asked for", "max_tokens", "context_length_exceeded")
        return Job(prompt, image, limit, request.sampling, request.stop)


class _Handler(BaseHTTPRequestHandler):
    """One connection's HTTP exchanges; access log lines (no bodies, no headers) go to stderr."""

    protocol_version = "HTTP/1.1"
    server_version = "xllava"
    server: ChatServer
    _responded = False  # a status line went out for the current request
    _body_consumed = False  # the current request's body was read (or there was none to read)

    def setup(self) -> None:
        """Make every read and write on this connection time out after the server's request timeout."""
        self.timeout = self.server.request_timeout
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        """Answer a request of any method this class takes; `_route` refuses a method a path does not take."""
        self._answer()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815 - 405 rather than http.server's 501

    def send_response(self, code: int, message: str | None = None) -> None:
        """http.server's `send_response`, noting that this request's answer has begun."""
        self._responded = True
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an unknown method) as OpenAI-shaped
        JSON; the connection closes after them."""
        self.close_connection = True
        try:
            self._send_json(code, api.APIError(code, message or HTTPStatus(code).phrase).body())
        except OSError:
            pass  # the client is gone; the connection closes anyway

    def _answer(self) -> None:
        self._responded = self._body_consumed = False
        try:
            self._route(urlsplit(self.path).path.rstrip("/"))
        except api.APIError as e:
            self._refuse(e)
        except TimeoutError:  # the client sent or read nothing for request_timeout seconds
            self.close_connection = True
            self._refuse(api.APIError(408, f"the request did not arrive: no data for {self.timeout:g} s",
                                      code="request_timeout"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("internal error answering %s %s", self.command, self.path)
            self._refuse(api.APIError(500, "internal server error", type="server_error"))

    def _refuse(self, error: api.APIError) -> None:
        """Answer with `error` after dropping any unread request body; once an answer has begun (a stream),
        only close the connection."""
        if self._responded:
            self.close_connection = True
            return
        try:
            self._discard_body()
            self._send_json(error.status, error.body(), error.headers)
        except OSError:  # the client went away or went silent
            self.close_connection = True

    def _route(self, path: str) -> None:
        server = self.server
        if path != "/health":
            api.check_bearer(self.headers.get("Authorization"), server.api_key)
        method = ROUTES.get("/v1/models" if path.startswith("/v1/models/") else path)
        if method is None:
            raise api.APIError(404, f"no route {self.command} {path or '/'}", code="unknown_route")
        if self.command != method:
            raise api.APIError(405, f"{path} takes {method}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": method})
        if path == "/v1/chat/completions":
            self._chat()
        elif path == "/health":
            self._send_json(200, {"status": "ok", "model": server.model_id})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [api.model_card(server.model_id, server.created)]})
        else:
            asked = unquote(path[len("/v1/models/"):])
            if asked != server.model_id:
                raise api.APIError(404, f"The model {asked!r} does not exist; this server serves {server.model_id!r}",
                                   param="model", code="model_not_found")
            self._send_json(200, api.model_card(server.model_id, server.created))

    def _chat(self) -> None:
        server = self.server
        if self.headers.get_content_type() != "application/json":
            raise api.APIError(415, "send the request body as JSON with 'Content-Type: application/json' (got "
                                    f"{self.headers.get('Content-Type', 'none')})", code="unsupported_media_type")
        request = api.parse_chat_request(self._read_body(), server.model_id, server.defaults, server.image_root)
        job = server.job(request)
        if request.stream:
            self._stream(job, request.include_usage)
            return
        answer = server.batcher.submit(job)
        self._send_json(200, api.completion(server.model_id, answer.text, answer.finish_reason, answer.prompt_tokens,
                                            answer.completion_tokens))

    def _read_body(self) -> bytes:
        """Exactly Content-Length bytes: 411 without one (or when chunked), 413 over the limit, 400 when the body
        ends early."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            raise api.APIError(411, "send the request body with a Content-Length header", code="length_required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            raise api.bad_request("Content-Length must be a non-negative integer")
        cap = self.server.max_body_bytes
        if length > cap:
            raise api.APIError(413, f"request body of {length} bytes is over the limit of {cap} bytes",
                               code="request_too_large")
        self._body_consumed = True
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise api.bad_request(f"the request body ended after {len(body)} of its {length} bytes (Content-Length)",
                                  code="incomplete_body")
        return body

    def _discard_body(self) -> None:
        """Read and drop the body of a request refused before reading it (up to 4x the body limit), so the client
        reads the answer rather than a reset and the connection stays usable; close it when that cannot be done
        (chunked, a malformed or huge Content-Length, a body over the limit)."""
        if self._body_consumed:
            return
        self._body_consumed = True
        try:
            left = int(self.headers.get("Content-Length", 0))
        except ValueError:
            left = -1
        cap = self.server.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or not 0 <= left <= 4 * cap:
            self.close_connection = True
            return
        self.close_connection = self.close_connection or left > cap
        while left > 0 and (got := len(self.rfile.read(min(1 << 20, left)))):
            left -= got
        self.close_connection = self.close_connection or left > 0

    def _stream(self, job: Job, include_usage: bool) -> None:
        """Server-sent events: the role chunk, content deltas, the finish chunk, usage if asked, [DONE]."""
        head = api.response_head(self.server.model_id)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._event(api.chunk(head, {"role": "assistant", "content": ""}, include_usage=include_usage))

        def emit(delta: str) -> None:
            self._event(api.chunk(head, {"content": delta}, include_usage=include_usage))

        try:
            with self.server.lock:
                count, reason = stream_answer(self.server.engine, job, emit)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except Exception:
            log.exception("internal error while streaming %s", self.path)
            self._event(api.APIError(500, "internal server error during generation", type="server_error").body())
            return
        self._event(api.chunk(head, {}, reason, include_usage=include_usage))
        if include_usage:
            self._event(api.usage_chunk(head, len(job.prompt), count))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
