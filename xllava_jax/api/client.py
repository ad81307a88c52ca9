"""A small, thread-safe client for OpenAI-compatible chat completion endpoints (stdlib only).

`ChatClient.chat` POSTs `{api_base}/chat/completions`, retries rate limits (429, waiting the `Retry-After`
seconds when given), server errors (5xx), malformed success bodies (a 200 that is not a chat completion, as
proxies and overloaded servers send), connection errors and timeouts with exponential backoff
(`backoff_s * 2**attempt`; every wait capped at `max_backoff_s`); other 4xx fail at once. It keeps an on-disk
response cache (one JSON file per request, written atomically) and a cost budget. The API key is read from
an environment variable, sent only in the `Authorization` header and never appears in errors or cache files.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from xllava_jax.errors import UserError

_REASON_CHARS = 200
_IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                   ".gif": "image/gif", ".bmp": "image/bmp"}


class ApiError(UserError):
    """A chat endpoint that refused or failed (after retries): endpoint, status or failure, short reason."""


class BudgetExceeded(ApiError):
    """The cost spent so far reached the budget; no further request is sent."""


@dataclass(frozen=True)
class ChatReply:
    """One assistant reply; `cached` replies came from the disk cache and cost nothing."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None


@dataclass
class Usage:
    """Running totals: `requests` answered by the server, `cached` answered from disk, `retries` of failed
    attempts, and the tokens of the server-answered requests (cached replies add no tokens)."""

    requests: int = 0
    cached: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def cost_usd(self, price_in_per_1k: float, price_out_per_1k: float) -> float:
        """Cost in US dollars of the counted tokens at the given prices per 1000 tokens."""
        return self.prompt_tokens / 1000 * price_in_per_1k + self.completion_tokens / 1000 * price_out_per_1k


class _Retryable(Exception):
    """An attempt that failed in a way worth retrying; `wait_s` is the server's Retry-After when given."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s


def _one_line(text: str) -> str:
    """`text` squeezed onto one line and cut to a short length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _REASON_CHARS else flat[: _REASON_CHARS - 3] + "..."


def _error_reason(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's text."""
    text = body.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text or "(empty body)"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds; None when absent or not a number."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class ChatClient:
    """Chat completions against one endpoint and model, with retries, a disk cache and a budget."""

    def __init__(self, api_base: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 6, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 cache_dir: str | Path | None = None, sleep: Callable[[float], None] = time.sleep,
                 price_in_per_1k: float = 0.0, price_out_per_1k: float = 0.0, budget_usd: float | None = None):
        if not api_base.startswith(("http://", "https://")):
            raise ApiError(f"api base {api_base!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        if max_retries < 0 or timeout_s <= 0:
            raise ApiError(f"{api_base}: max_retries must be >= 0 and timeout_s > 0")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.endpoint = f"{self.api_base}/chat/completions"
        self._key = os.environ.get(api_key_env) or None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._sleep = sleep
        self.price_in_per_1k = price_in_per_1k
        self.price_out_per_1k = price_out_per_1k
        self.budget_usd = budget_usd
        self._usage = Usage()
        self._lock = threading.Lock()
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    @property
    def usage(self) -> Usage:
        """A snapshot copy of the running totals."""
        with self._lock:
            return replace(self._usage)

    def cost_usd(self) -> float:
        """Cost so far in US dollars of the server-answered requests."""
        return self.usage.cost_usd(self.price_in_per_1k, self.price_out_per_1k)

    def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
             response_format: dict | None = None, seed: int | None = None) -> ChatReply:
        """One chat completion for `messages` (OpenAI message dicts); from the cache when the same request was
        answered before. Raises BudgetExceeded when the budget is spent, ApiError when the endpoint fails."""
        request = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if response_format is not None:
            request["response_format"] = response_format
        if seed is not None:
            request["seed"] = seed
        key = self._cache_key(request)
        cached = self._cache_read(key)
        if cached is not None:
            with self._lock:
                self._usage.cached += 1
            return cached
        if self.budget_usd is not None and self.cost_usd() >= self.budget_usd:
            raise BudgetExceeded(f"{self.endpoint}: budget of ${self.budget_usd:.2f} reached "
                                 f"(spent ${self.cost_usd():.4f}); no further requests sent")
        reply = self._post_with_retries(json.dumps(request, ensure_ascii=False).encode("utf-8"))
        with self._lock:
            self._usage.requests += 1
            self._usage.prompt_tokens += reply.prompt_tokens
            self._usage.completion_tokens += reply.completion_tokens
        self._cache_write(key, reply)
        return reply

    def _redact(self, text: str) -> str:
        """`text` with the API key (if any server echoed it) replaced."""
        return text.replace(self._key, "***") if self._key else text

    def _fail(self, what: str) -> ApiError:
        """The one-line error for this endpoint."""
        return ApiError(self._redact(f"{self.endpoint}: {_one_line(what)}"))

    def _post_with_retries(self, body: bytes) -> ChatReply:
        """POST `body`, retrying what is worth retrying; the parsed reply."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post_once(body)
            except _Retryable as err:
                if attempt == self.max_retries:
                    raise self._fail(f"{err.reason} (gave up after {attempt + 1} attempts)") from None
                delay = err.wait_s if err.wait_s is not None else self.backoff_s * 2 ** attempt
                with self._lock:
                    self._usage.retries += 1
                self._sleep(min(delay, self.max_backoff_s))
        raise AssertionError("unreachable: the loop returns or raises")

    def _post_once(self, body: bytes) -> ChatReply:
        """One HTTP attempt; raises _Retryable for 429/5xx/malformed bodies/connection trouble and ApiError for the
        rest."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            reason = _error_reason(err.read() or b"")
            if err.code == 429:
                raise _Retryable(f"HTTP 429 {reason}", _retry_after(err.headers.get("Retry-After"))) from None
            if err.code >= 500:
                raise _Retryable(f"HTTP {err.code} {reason}") from None
            raise self._fail(f"HTTP {err.code} {reason}") from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as err:
            cause = getattr(err, "reason", None) or err
            if isinstance(cause, TimeoutError) or "timed out" in str(cause):
                raise _Retryable(f"no answer within {self.timeout_s:g} s") from None
            raise _Retryable(f"connection failed: {cause}") from None
        return self._parse(raw)

    def _parse(self, raw: bytes) -> ChatReply:
        """A ChatReply from a chat.completion JSON body; _Retryable when the body is not one."""
        try:
            data = json.loads(raw.decode("utf-8"))
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(f"malformed chat completion: {raw[:120].decode('utf-8', errors='replace')}") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ChatReply(text=str(text), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0), cached=False,
                         finish_reason=finish)

    def _cache_key(self, request: dict) -> str:
        """sha256 of the canonical JSON of the endpoint and everything that decides the reply (never the key)."""
        canonical = json.dumps({"api_base": self.api_base, **request}, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _cache_read(self, key: str) -> ChatReply | None:
        """The cached reply for `key`, or None (no cache, no file, or an unreadable file: asked again)."""
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return ChatReply(text=data["text"], prompt_tokens=int(data["prompt_tokens"]),
                             completion_tokens=int(data["completion_tokens"]), cached=True,
                             finish_reason=data.get("finish_reason"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _cache_write(self, key: str, reply: ChatReply) -> None:
        """Store `reply` under `key`: a temp file in the cache folder renamed into place."""
        if self.cache_dir is None:
            return
        record = {"model": self.model, "text": reply.text, "prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens, "finish_reason": reply.finish_reason}
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, self.cache_dir / f"{key}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _sniff_mime(data: bytes) -> str | None:
    """The image MIME type from the first bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    return None


def image_part(source: str | Path | bytes, mime: str | None = None) -> dict:
    """An `image_url` content part carrying the image as a base64 data URL. `source`: a file path or the
    encoded image bytes; the MIME type comes from `mime`, else the bytes' signature, else the file suffix."""
    name = "<bytes>"
    if isinstance(source, bytes):
        data = source
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise UserError(f"{name}: cannot read image ({err.strerror or err})") from None
    mime = mime or _sniff_mime(data)
    if mime is None and name != "<bytes>":
        mime = _IMAGE_SUFFIXES.get(Path(name).suffix.lower())
    if mime is None:
        raise UserError(f"{name}: not a recognised image (png, jpeg, gif, webp, bmp); pass mime= explicitly")
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": url}}


def user_message(text: str, images: Sequence[str | Path | bytes] = ()) -> dict:
    """A user message whose content is a list of parts: the images (as data URLs) first, then the text."""
    return {"role": "user", "content": [*(image_part(im) for im in images), {"type": "text", "text": text}]}
