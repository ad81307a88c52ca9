"""The OpenAI chat-completions wire format: request parsing and validation, response and chunk building.

Everything a client can get wrong raises `APIError`, which carries the HTTP status and OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`. Nothing here touches the model: the server
turns a `ChatRequest` into token ids and images, and the builders below into JSON.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from xllava_jax.data.conversation import IMAGE

MAX_STOP_STRINGS = 4
SEED_MODULUS = 2**31  # seeds are reduced into jax.random.key's int32 range


class APIError(Exception):
    """A request the server refuses: HTTP `status`, a one-line `message`, OpenAI's `type`, `param`, `code`, and
    any extra response `headers`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}  # extra response headers (Allow, WWW-Authenticate)

    def body(self) -> dict[str, Any]:
        """The JSON error object OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request; requests with equal settings can share one batched generate."""

    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None: a fresh seed for each generate call


def check_bearer(authorization: str | None, key: str | None) -> None:
    """Raise a 401 unless `key` is None or the Authorization header is `Bearer <key>` (compared in constant
    time; the key a client sent is never echoed)."""
    if key is None:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key; send it as the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class ChatRequest:
    """A validated `/v1/chat/completions` request.

    turns: (role, text) with role "human" / "gpt", alternating, human first and last; the turn that
    carried the image holds the `<image>` tag. image: the image's encoded bytes or its checked local
    path (None without an image). max_tokens: None when the client left it to the server.
    """

    turns: list[tuple[str, str]]
    system: str | None
    image: bytes | Path | None
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Defaults:
    """Sampling values for fields a request leaves out (the paper's demo settings unless flags say otherwise)."""

    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 40
    max_tokens: int = 512


def _number(body: dict, key: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{key} must be a number, got {json.dumps(value)}", key)
    if value > high or value < low or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise bad_request(f"{key} must be in {interval}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer, got {json.dumps(value)}", key)
    if value < low:
        raise bad_request(f"{key} must be at least {low}, got {value}", key)
    return value


def resolve_file_url(url: str, image_root: Path | None) -> Path:
    """A `file:///abs/path` URL -> the real path, which must lie under `image_root` after resolving
    symlinks and `..` (403 otherwise; 400 when file URLs are off or the file does not exist)."""
    if image_root is None:
        raise APIError(403, "file URLs are disabled on this server (start it with --image-root DIR)",
                       param="messages", code="file_urls_disabled", type="permission_error")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"file URL names a remote host {parsed.netloc!r}", "messages", "invalid_image_url")
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        raise bad_request("file URLs need an absolute path (file:///abs/path)", "messages", "invalid_image_url")
    real, root = path.resolve(), image_root.resolve()
    if not real.is_relative_to(root):
        raise APIError(403, f"{path}: outside the server's image root", param="messages",
                       code="image_outside_root", type="permission_error")
    if not real.is_file():
        raise bad_request(f"{path}: no such image file under the image root", "messages", "image_not_found")
    return real


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:"):
        raise bad_request("malformed data URL (expected data:image/...;base64,...)", "messages", "invalid_image_url")
    if not header.endswith(";base64"):
        raise bad_request("data URLs must be base64-encoded (data:image/...;base64,...)", "messages",
                          "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"data URL is not valid base64 ({e})", "messages", "invalid_image") from None


def image_source(url: Any, image_root: Path | None) -> bytes | Path:
    """An image_url part's `url` -> encoded bytes (data URL) or a checked local path (file URL)."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        return _data_url_bytes(url)
    if url.startswith("file:"):
        return resolve_file_url(url, image_root)
    raise bad_request("only data: and file: image URLs are supported (this server fetches nothing remote)",
                      "messages", "invalid_image_url")


def _content(message: dict, index: int, image_root: Path | None) -> tuple[str, list[bytes | Path]]:
    """A message's text and the images among its parts."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if content is None:
        return "", []
    if isinstance(content, str):
        texts, images = [content], []
    elif isinstance(content, list):
        texts, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                spec = part.get("image_url")
                images.append(image_source(spec.get("url") if isinstance(spec, dict) else spec, image_root))
            else:
                raise bad_request(f"{where}: parts must be {{'type': 'text', 'text': ...}} or "
                                  f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}", "messages")
    else:
        raise bad_request(f"{where} must be a string or a list of parts", "messages")
    text = "\n".join(texts)
    if IMAGE in text:
        raise bad_request(f"{where}: the literal {IMAGE} tag is reserved; send images as image_url parts", "messages")
    return text, images


def _conversation(messages: Any, image_root: Path | None
                  ) -> tuple[list[tuple[str, str]], str | None, bytes | Path | None]:
    """messages -> (turns, system prompt or None, the one image or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    image, image_turn = None, -1
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant, got {json.dumps(role)}",
                              "messages")
        text, images = _content(message, i, image_root)
        if role in ("system", "developer"):
            if turns or images:
                raise bad_request(f"messages[{i}]: system messages must come first and hold text only", "messages")
            system.append(text)
            continue
        if images and (role != "user" or image is not None or len(images) > 1):
            raise bad_request("at most one image per conversation, in a user message (LLaVA-1.5 takes one image)",
                              "messages", "too_many_images")
        speaker = "human" if role == "user" else "gpt"
        if turns and turns[-1][0] == speaker:  # consecutive messages of one role form one turn
            turns[-1] = (speaker, turns[-1][1] + "\n" + text)
        else:
            turns.append((speaker, text))
        if images:
            image, image_turn = images[0], len(turns) - 1
    if not turns or turns[0][0] != "human" or turns[-1][0] != "human":
        raise bad_request("the conversation must start and end with a user message", "messages")
    if image is not None:
        turns[image_turn] = ("human", IMAGE + "\n" + turns[image_turn][1])
    return turns, ("\n".join(system) if system else None), image


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def parse_chat_request(raw: bytes, model_id: str, defaults: Defaults, image_root: Path | None) -> ChatRequest:
    """Validate a `/v1/chat/completions` body; 400 for bad JSON or fields, 404 for another model."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model is required (a string)", "model")
    if model != model_id:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    if _integer(body, "n", 1) not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    for key in ("tools", "functions", "logprobs"):
        if body.get(key):
            raise bad_request(f"{key} is not supported by this server", key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request("stream_options must be an object with a boolean include_usage", "stream_options")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, open_low=True)
    top_k = _integer(body, "top_k", 0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("seed must be an integer", "seed")
    turns, system, image = _conversation(body.get("messages"), image_root)
    temperature = defaults.temperature if temperature is None else temperature
    if temperature == 0:
        seed = 0  # greedy: the seed changes nothing, so greedy requests batch together whatever seed they carry
    sampling = Sampling(temperature, defaults.top_p if top_p is None else top_p,
                        defaults.top_k if top_k is None else top_k, None if seed is None else seed % SEED_MODULUS)
    return ChatRequest(turns, system, image, max_tokens, sampling, _stop(body.get("stop")), stream,
                       stream and options.get("include_usage", False))


# ------------------------------------------------------------------------------------ responses
def response_head(model: str, kind: str = "chat.completion.chunk") -> dict[str, Any]:
    """The fields every object of one response shares: a fresh `chatcmpl-...` id, `object`, `created`, `model`
    (one head serves all chunks of a stream)."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
               ) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {**response_head(model, "chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(head: dict[str, Any], delta: dict[str, str], finish_reason: str | None = None, *,
          include_usage: bool = False) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice (`usage` null when the client asked for usage)."""
    out = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(head: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_card(model_id: str, created: int) -> dict[str, Any]:
    """One entry of `/v1/models`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "xllava"}
