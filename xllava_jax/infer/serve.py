"""`xllava serve`: an OpenAI-compatible HTTP server (stdlib `http.server`) in front of one `Engine`.

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (wire format in
`openai_protocol`). Every HTTP request has its own thread. Non-streaming requests queue for the
`Batcher` (see `batching`), which batches concurrent ones into one generate call. Streaming requests
(`stream: true`) run one at a time through the engine lock, token by token, as server-sent events; a
stream holds up only other generation, never `/v1/models` or request validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from xllava_jax.data import conversation as conv
from xllava_jax.errors import UserError
from xllava_jax.infer import openai_protocol as api
from xllava_jax.infer.batching import Batcher, Job, stream_answer
from xllava_jax.infer.chat import add_engine_flags, add_sampling_flags, load_engine
from xllava_jax.infer.engine import Engine, EngineError

MAX_BODY_BYTES = 20 * 1024 * 1024
log = logging.getLogger(__name__)


class ServeError(UserError):
    """A server setting that cannot work (bad flag, unusable image root, port in use)."""


def prompt_ids(engine: Engine, turns: list[tuple[str, str]], system: str | None) -> list[int]:
    """Token ids of a generation prompt for `turns` (the image turn holds `<image>`) under the engine's
    template and mode, with `system` in place of the engine's system prompt when given."""
    try:
        pieces = conv.render(engine.template, turns, system=engine.system if system is None else system,
                             generation=True)
        return conv.encode(pieces, engine.tokenizer, num_image_tokens=engine.cfg.num_image_tokens,
                           image_token_id=engine.cfg.image_token_id, mode=engine.mode).input_ids
    except conv.ConversationError as e:
        raise api.bad_request(f"cannot render the conversation: {e}", "messages") from None


def check_settings(image_root: str | Path | None, max_batch: int, batch_wait_ms: float, max_body_bytes: int) -> None:
    """Raise ServeError for server settings that cannot work."""
    if max_batch < 1:
        raise ServeError(f"--max-batch must be at least 1, got {max_batch}")
    if batch_wait_ms < 0:
        raise ServeError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    if max_body_bytes < 1:
        raise ServeError(f"the request body limit must be positive, got {max_body_bytes} bytes")
    if image_root is not None and not Path(image_root).is_dir():
        raise ServeError(f"{image_root}: the image root is not a directory")


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; `url` is its `.../v1` base. `server_close()` also stops the batcher."""

    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, *,
                 image_root: str | Path | None = None, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 defaults: api.Defaults | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        check_settings(image_root, max_batch, batch_wait_ms, max_body_bytes)
        defaults = defaults or api.Defaults()
        engine.generation_config(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                                 max_new_tokens=defaults.max_tokens)  # raises EngineError on bad defaults
        self.engine, self.model_id, self.defaults = engine, engine.model_id, defaults
        self.image_root = None if image_root is None else Path(image_root).resolve()
        self.max_body_bytes, self.created = max_body_bytes, int(time.time())
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
        prompt = prompt_ids(self.engine, request.turns, request.system)
        room = self.engine.max_context - len(prompt)
        limit = min(self.defaults.max_tokens, room) if request.max_tokens is None else request.max_tokens
        if limit > room or room < 1:
            raise api.bad_request(
                f"This model's maximum context length is {self.engine.max_context} tokens; the messages hold "
                f"{len(prompt)} tokens and {limit} new tokens were asked for", "max_tokens", "context_length_exceeded")
        return Job(prompt, image, limit, request.sampling, request.stop)


class _Handler(BaseHTTPRequestHandler):
    """One HTTP exchange; access log lines (no bodies) go to stderr."""

    protocol_version = "HTTP/1.1"
    server_version = "xllava"
    server: ChatServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, route: Callable[[str], None]) -> None:
        self._streaming = False
        try:
            route(urlsplit(self.path).path.rstrip("/"))
        except api.APIError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("internal error answering %s %s", self.command, self.path)
            if self._streaming:
                self.close_connection = True
            else:
                self._send_json(500, api.APIError(500, "internal server error", type="server_error").body())

    def _get(self, path: str) -> None:
        model_id = self.server.model_id
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [api.model_card(model_id, self.server.created)]})
        elif path.startswith("/v1/models/"):
            asked = unquote(path[len("/v1/models/"):])
            if asked != model_id:
                raise api.APIError(404, f"The model {asked!r} does not exist; this server serves {model_id!r}",
                                   param="model", code="model_not_found")
            self._send_json(200, api.model_card(model_id, self.server.created))
        else:
            raise api.APIError(404, f"no route GET {path}", code="unknown_route")

    def _post(self, path: str) -> None:
        if path != "/v1/chat/completions":
            self.close_connection = True  # the body is left unread
            raise api.APIError(404, f"no route POST {path}", code="unknown_route")
        server = self.server
        request = api.parse_chat_request(self._read_body(), server.model_id, server.defaults, server.image_root)
        job = server.job(request)
        if request.stream:
            self._stream(job, request.include_usage)
            return
        answer = server.batcher.submit(job)
        self._send_json(200, api.completion(server.model_id, answer.text, answer.finish_reason, answer.prompt_tokens,
                                            answer.completion_tokens))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            self.close_connection = True
            raise api.APIError(411, "send the request body with a Content-Length header", code="length_required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise api.bad_request("Content-Length must be a non-negative integer")
        cap = self.server.max_body_bytes
        if length > cap:
            self.close_connection = True
            left = length if length <= 4 * cap else 0  # drain it, so the client sees the 413 and not a reset
            while left > 0 and (got := len(self.rfile.read(min(1 << 20, left)))):
                left -= got
            raise api.APIError(413, f"request body of {self.headers['Content-Length']} bytes is over the limit of "
                                    f"{cap} bytes", code="request_too_large")
        return self.rfile.read(length)

    def _stream(self, job: Job, include_usage: bool) -> None:
        """Server-sent events: the role chunk, content deltas, the finish chunk, usage if asked, [DONE]."""
        head = api.response_head(self.server.model_id)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self._streaming = self.close_connection = True
        self._event(api.chunk(head, {"role": "assistant", "content": ""}, include_usage=include_usage))

        def emit(delta: str) -> None:
            self._event(api.chunk(head, {"content": delta}, include_usage=include_usage))

        try:
            with self.server.lock:
                count, reason = stream_answer(self.server.engine, job, emit)
        except (BrokenPipeError, ConnectionResetError):
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

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


SERVE_EXAMPLES = """examples:
  xllava serve --ckpt ckpt/xllava --port 8000
  xllava serve --ckpt ckpt/xllava --image-root /data/images --model-name xllava-13b --max-batch 16
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "xllava", "messages": [{"role": "user", "content": "Hello"}]}'
From Python: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)
"""


def add_serve_parser(subparsers) -> None:
    """Add `serve` to the `xllava` subcommands."""
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API", epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An OpenAI-compatible server: POST /v1/chat/completions (text and image_url parts: data URLs, "
                    "or file URLs under --image-root; streaming or not) and GET /v1/models. Concurrent "
                    "non-streaming requests are batched into one generate call; streaming requests run one at a "
                    "time. The sampling flags set what a request leaves out. Ctrl-C or SIGTERM stops it.")
    p.add_argument("--ckpt", required=True, help="our checkpoint or a Hugging Face directory (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--image-root", help="allow file:// image URLs under this directory (default: refused)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests per generate call (default: 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long to wait for more requests after the first of a batch (default: 10)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20,
                   help=f"largest request body in MiB (default: {MAX_BODY_BYTES // 2**20})")
    add_sampling_flags(p, "--max-tokens")
    add_engine_flags(p)
    p.set_defaults(run=run_serve)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """`xllava serve`: load the checkpoint and answer requests until Ctrl-C or SIGTERM."""
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in [0, 65535], got {args.port}")
    max_body_bytes = int(args.max_body_mb * 2**20)
    check_settings(args.image_root, args.max_batch, args.batch_wait_ms, max_body_bytes)
    engine = load_engine(args, model_id=args.model_name)
    defaults = api.Defaults(args.temperature, args.top_p, args.top_k, args.max_tokens)
    server = ChatServer(engine, args.host, args.port, image_root=args.image_root, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, defaults=defaults, max_body_bytes=max_body_bytes)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"serving {engine.model_id!r} at {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        server.server_close()
    return 0
