"""A scripted model server on 127.0.0.1 that speaks each provider's wire format: a real HTTP fake.

The compiler reaches real models only through `litellm.completion(model="<provider>/<name>",
api_base=..., api_key=...)`. This server answers that call the way the provider would,
but from a script, so a test can drive the real litellm/httpx stack through replies *and*
faults. One server speaks every format the README names, told apart by the path litellm
posts to:

    wire        litellm model          api_base to give litellm    endpoint
    openai      openai/<name>          server.base_url  (…/v1)     POST /v1/chat/completions
    anthropic   anthropic/<name>       server.api_base("anthropic") POST /v1/messages
    gemini      gemini/<name>          server.api_base("gemini")    POST /models/<name>:generateContent
    ollama      ollama_chat/<name>     server.api_base("ollama")    POST /api/chat
                ollama/<name>                                       POST /api/generate

    from generator.senior.scripted import Fault, Reply, ScriptedServer

    with ScriptedServer([Reply("hello"), Fault.status(429, headers={"Retry-After": "1"})]) as server:
        litellm.completion(model="anthropic/claude-x", api_base=server.api_base("anthropic"), api_key="k",
                           messages=[...], max_retries=0)
    server.requests   # the JSON bodies received, in order; server.wires says which format each was

A script is a list of steps consumed one per model request, whatever its format, or a
callable `(request: dict) -> step`; the callable sees the body with `messages` as
OpenAI-style `{"role", "content"}` text messages and `wire` naming the format. Steps:
`Reply(...)`, `Fault.status(...)`, `Fault.slow(...)`, `Fault.raw(...)`, `Fault.disconnect()`.
A `Reply` is rendered in the request's format: with `finish_reason="length"` it is cut off
the way that provider says so (`stop_reason: max_tokens`, `finishReason: MAX_TOKENS`,
`done_reason: length`); to an Anthropic request that forces a tool (litellm's JSON mode)
the content comes back as that tool's input, and cut off, as a tool call whose input is
empty. `Fault.status` bodies are that provider's error shape. When a list is exhausted the
server answers 500 "script exhausted after N requests" (and records it in `errors`), so a
test fails loudly instead of hanging.

Besides the script the server enforces what a real endpoint would:
- the key, where the provider sends it: `Authorization: Bearer` (OpenAI), `x-api-key`
  (Anthropic), `x-goog-api-key` or `?key=` (Gemini); else 401 (this proves the key is sent).
  Ollama takes no key. A key listed in `refused_keys` is answered 401 (for Gemini, 400
  API_KEY_INVALID, as Google does).
- `GET /v1/models` lists the one model; any other path is 404;
- a body that is not a JSON object is 400, and streaming is 400: this fake does not
  stream (neither does the compiler). Neither consumes a step.

It uses only the standard library and binds only to 127.0.0.1. Every response closes its
connection, so `stop()` leaves no handler thread or socket behind; sleeping steps wake up
and give up when the server stops.

CLI, for manual demos: `python -m generator.senior.scripted --port 8911 --replies FILE.json`, where
FILE.json is a JSON list of reply contents (strings); serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias
from urllib.parse import parse_qs

HOST = "127.0.0.1"
CREATED = 1_700_000_000  # fixed `created` timestamp: replies are byte-for-byte reproducible

_REASONS: Mapping[int, tuple[str, str | None, str]] = MappingProxyType(
    {
        # code: (error type, error code, default message), after OpenAI's error bodies
        400: ("invalid_request_error", None, "Bad request."),
        401: ("invalid_request_error", "invalid_api_key", "Missing or invalid Authorization bearer token."),
        403: ("invalid_request_error", None, "Forbidden."),
        404: ("invalid_request_error", "not_found", "Not found."),
        408: ("timeout", None, "Request timed out."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached (scripted)."),
        500: ("server_error", None, "The server had an error while processing your request (scripted)."),
        502: ("server_error", None, "Bad gateway (scripted)."),
        503: ("server_error", None, "The engine is currently overloaded, please try again later (scripted)."),
        504: ("server_error", None, "Gateway timeout (scripted)."),
    }
)


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Reply:
    """A 200 chat.completion whose message content is `content`.

    Token counts left as None are estimated as len(text) // 4 (at least 1): the prompt from
    the request's message contents, the completion from `content`. `delay` seconds are slept
    before answering.
    """

    content: str
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class StatusFault:
    """An HTTP error: `code` with an OpenAI-style error body (or `body`), plus `headers`."""

    code: int
    body: bytes | str | Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlowFault:
    """Sleep `seconds`, then answer with `then` (if the client is still there)."""

    seconds: float
    then: Step


@dataclass(frozen=True)
class RawFault:
    """Exactly these bytes as the body, whatever they are (malformed JSON, non-UTF-8...)."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class DisconnectFault:
    """Close the connection without sending any response."""


Step: TypeAlias = Reply | StatusFault | SlowFault | RawFault | DisconnectFault
Script: TypeAlias = Sequence[Step] | Callable[[dict[str, Any]], Step]
_STEP_TYPES = (Reply, StatusFault, SlowFault, RawFault, DisconnectFault)


class Fault:
    """Factories for the fault steps."""

    @staticmethod
    def status(
        code: int,
        body: bytes | str | Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> StatusFault:
        """e.g. `Fault.status(429, headers={"Retry-After": "1"})`, `Fault.status(503)`.

        `body` None gives an OpenAI-style `{"error": {...}}` body; a mapping is sent as JSON;
        str/bytes are sent as they are.
        """
        return StatusFault(code, body, dict(headers or {}))

    @staticmethod
    def slow(seconds: float, then: Step | None = None) -> SlowFault:
        """Sleep, then answer with `then` (default `Reply("")`): for client timeouts."""
        return SlowFault(seconds, then if then is not None else Reply(""))

    @staticmethod
    def raw(body: bytes, status: int = 200, content_type: str = "application/json") -> RawFault:
        return RawFault(body, status, content_type)

    @staticmethod
    def disconnect() -> DisconnectFault:
        return DisconnectFault()


def _check_step(step: object, where: str) -> Step:
    if not isinstance(step, _STEP_TYPES):
        raise TypeError(f"{where}: expected Reply or a Fault step, got {step!r}")
    if isinstance(step, SlowFault):
        _check_step(step.then, f"{where} (Fault.slow then=)")
    return step


# --------------------------------------------------------------------------- bodies

WIRES = ("openai", "anthropic", "gemini", "ollama")

# code: (Anthropic error type, Gemini status), after each provider's documented error bodies
_PROVIDER_ERRORS: Mapping[int, tuple[str, str]] = MappingProxyType({
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "NOT_FOUND"),
    408: ("timeout_error", "DEADLINE_EXCEEDED"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("api_error", "INTERNAL"),
    503: ("overloaded_error", "UNAVAILABLE"),
    504: ("timeout_error", "DEADLINE_EXCEEDED"),
    529: ("overloaded_error", "UNAVAILABLE"),
})


def error_body(code: int, message: str | None = None, wire: str = "openai") -> dict[str, Any]:
    """The error body `wire`'s provider sends with HTTP `code`."""
    kind, err_code, default = _REASONS.get(code, ("server_error" if code >= 500 else "invalid_request_error", None, "Error."))
    text = message or (KEY_REFUSED[wire] if code == 401 and wire != "openai" else default)
    anthropic_type, gemini_status = _PROVIDER_ERRORS.get(code, ("api_error" if code >= 500 else "invalid_request_error",
                                                               "INTERNAL" if code >= 500 else "FAILED_PRECONDITION"))
    if wire == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": text}}
    if wire == "gemini":
        return {"error": {"code": code, "message": text, "status": gemini_status}}
    if wire == "ollama":
        return {"error": text}
    return {"error": {"message": text, "type": kind, "param": None, "code": err_code}}


def _text_of(content: object) -> str:
    """The text of a message `content`: a string, or a list of parts with "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def chat_messages(wire: str, body: Mapping[str, Any]) -> list[dict[str, str]]:
    """A request's conversation as OpenAI-style text messages, whatever format it came in."""
    def listed(value: object) -> list:
        return value if isinstance(value, list) else []

    if wire == "anthropic":
        system = body.get("system")
        head = [{"role": "system", "content": _text_of(system)}] if system else []
        return head + [{"role": str(m.get("role")), "content": _text_of(m.get("content"))}
                       for m in listed(body.get("messages")) if isinstance(m, dict)]
    if wire == "gemini":
        instruction = body.get("system_instruction") or body.get("systemInstruction")
        head = [{"role": "system", "content": _text_of(instruction.get("parts"))}] if isinstance(instruction, dict) else []
        return head + [{"role": "assistant" if c.get("role") == "model" else "user", "content": _text_of(c.get("parts"))}
                       for c in listed(body.get("contents")) if isinstance(c, dict)]
    if wire == "ollama" and "prompt" in body:  # /api/generate: the conversation flattened into one prompt
        return [{"role": "user", "content": str(body.get("prompt"))}]
    return [{"role": str(m.get("role")), "content": _text_of(m.get("content"))}
            for m in listed(body.get("messages")) if isinstance(m, dict)]


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _output_limit(request: Mapping[str, Any]) -> int | None:
    """The request's output limit, wherever its format puts it."""
    config = request.get("generationConfig") or {}
    options = request.get("options") or {}
    for value in (request.get("max_tokens"), request.get("max_completion_tokens"),
                  config.get("max_output_tokens") or config.get("maxOutputTokens"), options.get("num_predict")):
        if isinstance(value, int):
            return value
    return None


def _usage(reply: Reply, request: Mapping[str, Any]) -> tuple[int, int]:
    """Prompt and completion tokens: as scripted, else estimated; an answer cut off used the whole output limit."""
    prompt_text = "".join(m["content"] for m in request.get("messages", []))
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else estimate_tokens(prompt_text)
    completion = reply.completion_tokens
    if completion is None:
        limit = _output_limit(request)
        completion = limit if reply.finish_reason == "length" and limit else estimate_tokens(reply.content)
    return prompt, completion


def completion_body(reply: Reply, request: Mapping[str, Any], number: int) -> dict[str, Any]:
    """A chat.completion body for `reply` to `request` (the n-th model request served)."""
    request = {**request, "messages": chat_messages("openai", request)}
    prompt, completion = _usage(reply, request)
    return {
        "id": f"chatcmpl-scripted-{number}",
        "object": "chat.completion",
        "created": CREATED,
        "model": request.get("model", "scripted"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _forced_tool(body: Mapping[str, Any]) -> str | None:
    """The tool an Anthropic request forces (litellm's JSON mode), if any."""
    choice = body.get("tool_choice")
    return choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" else None


def messages_body(reply: Reply, request: Mapping[str, Any], number: int) -> dict[str, Any]:
    """An Anthropic Messages API response: text, or the forced tool's call when the request forces one."""
    prompt, completion = _usage(reply, request)
    cut = reply.finish_reason == "length"
    block: dict[str, Any] = {"type": "text", "text": reply.content}
    stop = "max_tokens" if cut else "end_turn"
    if (tool := _forced_tool(request)) is not None:
        try:
            arguments = json.loads(reply.content)
        except ValueError:
            arguments = None
        if cut or isinstance(arguments, dict):
            # A tool call cut off by the output limit arrives incomplete: its input is empty.
            block = {"type": "tool_use", "id": f"toolu_scripted_{number}", "name": tool,
                     "input": {} if cut or not isinstance(arguments, dict) else arguments}
            stop = "max_tokens" if cut else "tool_use"
    return {
        "id": f"msg_scripted_{number}", "type": "message", "role": "assistant",
        "model": request.get("model", "scripted"), "content": [block], "stop_reason": stop, "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": completion},
    }


def generate_content_body(reply: Reply, request: Mapping[str, Any], number: int) -> dict[str, Any]:
    """A Gemini generateContent response."""
    prompt, completion = _usage(reply, request)
    return {
        "candidates": [{"content": {"parts": [{"text": reply.content}], "role": "model"},
                        "finishReason": "MAX_TOKENS" if reply.finish_reason == "length" else "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": completion,
                          "totalTokenCount": prompt + completion},
        "modelVersion": request.get("model", "scripted"), "responseId": f"scripted-{number}",
    }


def ollama_body(reply: Reply, request: Mapping[str, Any], number: int) -> dict[str, Any]:
    """An Ollama /api/chat (or /api/generate, for a request with a prompt) response."""
    prompt, completion = _usage(reply, request)
    done = {"done": True, "done_reason": "length" if reply.finish_reason == "length" else "stop",
            "total_duration": 0, "prompt_eval_count": prompt, "eval_count": completion}
    answer = ({"response": reply.content} if "prompt" in request
              else {"message": {"role": "assistant", "content": reply.content}})
    return {"model": request.get("model", "scripted"), "created_at": "2023-11-14T22:13:20Z", **answer, **done}


_BODIES: Mapping[str, Callable[[Reply, Mapping[str, Any], int], dict[str, Any]]] = MappingProxyType({
    "openai": completion_body, "anthropic": messages_body, "gemini": generate_content_body, "ollama": ollama_body,
})


# --------------------------------------------------------------------------- server


class ScriptedServer:
    """A model server on 127.0.0.1 that answers from a script, in each provider's wire format.

    `requests` holds the JSON bodies of the authorised model requests, in order (including
    ones answered 400 for streaming and the one that found the script exhausted); `wires`
    says which format each one came in; `headers` holds each one's request headers
    (lower-cased names), aligned with `requests`; `errors` holds the server-side problems
    (script exhausted, bad step from a callable). A key in `refused_keys` is refused the way
    its provider refuses a bad key.
    """

    def __init__(self, script: Script, *, model: str = "scripted", port: int = 0, quiet: bool = True,
                 refused_keys: Sequence[str] = ()):
        if callable(script):
            self._steps: list[Step] | None = None
            self._callable: Callable[[dict[str, Any]], Step] | None = script
        else:
            self._steps = [_check_step(s, f"script step {i}") for i, s in enumerate(script)]
            self._callable = None
        self.model = model
        self.quiet = quiet
        self.refused_keys = frozenset(refused_keys)
        self.requests: list[dict[str, Any]] = []
        self.wires: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.errors: list[str] = []
        self._wanted_port = port
        self._served = 0  # chat requests that consumed a step
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> ScriptedServer:
        if self._httpd is not None:
            raise RuntimeError("ScriptedServer already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((HOST, self._wanted_port), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"scripted-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping steps, drop open connections and join every thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()  # returns once serve_forever has left its loop
        httpd.drop_connections()
        httpd.server_close()  # joins the handler threads (block_on_close)
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ScriptedServer is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, the `api_base` to give litellm for `openai/` models."""
        return f"http://{HOST}:{self.port}/v1"

    def api_base(self, wire: str = "openai") -> str:
        """The `api_base` to give litellm for a model of `wire`'s provider (litellm adds the rest of the path)."""
        if wire not in WIRES:
            raise ValueError(f"unknown wire format {wire!r}; one of {', '.join(WIRES)}")
        return self.base_url if wire == "openai" else f"http://{HOST}:{self.port}"

    @property
    def remaining(self) -> int | None:
        """Steps not yet consumed (None for a callable script)."""
        with self._lock:
            return None if self._steps is None else len(self._steps) - self._served

    # ---- the script

    def _next_step(self, body: dict[str, Any], headers: dict[str, str], wire: str,
                   seen: dict[str, Any]) -> tuple[Step | str, int]:
        """Record the request and take its step: (step, n), or (error message, n) when there is none."""
        with self._lock:
            self._record_only(body, headers, wire)
            if self._callable is not None:
                try:
                    step = _check_step(self._callable(seen), "script callable")
                except Exception as exc:  # the callable's bug must surface as a loud 500, not a hang
                    self.errors.append(f"script callable failed: {exc!r}")
                    return self.errors[-1], self._served
                self._served += 1
                return step, self._served
            assert self._steps is not None
            if self._served >= len(self._steps):
                self.errors.append(f"script exhausted after {len(self._steps)} requests")
                return self.errors[-1], self._served
            step = self._steps[self._served]
            self._served += 1
            return step, self._served

    def _record_only(self, body: dict[str, Any], headers: dict[str, str], wire: str) -> None:
        self.requests.append(body)
        self.headers.append(headers)
        self.wires.append(wire)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True if it is still running."""
        return not self._stopping.wait(seconds) if seconds > 0 else not self._stopping.is_set()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins handler threads: nothing outlives stop()
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: ScriptedServer):
        self.owner = owner
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[no-untyped-def]
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Unblock handlers still reading from a client that never finished its request."""
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        if not self.owner.quiet:
            super().handle_error(request, client_address)


GEMINI_PATH = re.compile(r"(?:/v1beta|/v1)?/models/([^/:]+):generateContent")
KEY_REFUSED = MappingProxyType({
    "openai": "Incorrect API key provided.",
    "anthropic": "invalid x-api-key",
    "gemini": "API key not valid. Please pass a valid API key.",
    "ollama": "unauthorized",
})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "regen-scripted/1"
    sys_version = ""
    timeout = 10  # a client that connects and sends nothing cannot pin a thread for ever
    server: _HTTPServer
    wire = "openai"

    @property
    def owner(self) -> ScriptedServer:
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.owner.quiet:
            sys.stderr.write(f"scripted {self.address_string()} {format % args}\n")

    # ---- routing

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        self.close_connection = True  # one request per connection: stop() never waits on keep-alive
        path, _, query = self.path.partition("?")
        path = path.rstrip("/")
        body = self._read_body()
        gemini = GEMINI_PATH.fullmatch(path)
        if path in ("/v1/chat/completions", "/chat/completions"):
            wire, endpoint = "openai", "chat"
        elif path in ("/v1/messages", "/messages"):
            wire, endpoint = "anthropic", "chat"
        elif gemini is not None:
            wire, endpoint = "gemini", "chat"
        elif path in ("/api/chat", "/api/generate"):
            wire, endpoint = "ollama", "chat"
        elif path in ("/v1/models", "/models"):
            wire, endpoint = "openai", "models"
        elif path in ("/api/tags", "/api/show"):
            wire, endpoint = "ollama", "models"
        else:
            return self._json(404, error_body(404, f"Unknown path {method} {path or '/'}"))
        self.wire = wire
        refused = self._refused(wire, parse_qs(query).get("key", [""])[0])
        if refused:
            return self._json(refused, error_body(refused, KEY_REFUSED[wire], wire))
        if endpoint == "models":
            return self._models(path)
        if method != "POST":
            return self._json(405, error_body(405, f"Use POST on {path}", wire))
        self._chat(body, gemini.group(1) if gemini else None)

    def _refused(self, wire: str, query_key: str) -> int:
        """The status a request's key earns: 0 when it may pass."""
        if wire == "openai":
            scheme, _, key = (self.headers.get("Authorization") or "").partition(" ")
            key = key.strip() if scheme.lower() == "bearer" else ""
        elif wire == "anthropic":
            key = (self.headers.get("x-api-key") or "").strip()
        elif wire == "gemini":
            key = (self.headers.get("x-goog-api-key") or query_key).strip()
        else:  # Ollama takes no key; one sent anyway is checked like any other
            key = (self.headers.get("Authorization") or "").partition(" ")[2].strip() or None
            if key is None:
                return 0
        if key and key not in self.owner.refused_keys:
            return 0
        return 400 if wire == "gemini" else 401  # Gemini answers a bad key 400 API_KEY_INVALID

    def _models(self, path: str) -> None:
        model = self.owner.model
        if path == "/api/tags":
            return self._json(200, {"models": [{"name": model, "model": model, "details": {}}]})
        if path == "/api/show":
            return self._json(200, {"modelfile": "", "parameters": "", "template": "", "details": {}, "model_info": {}})
        entry = {"id": model, "object": "model", "created": CREATED, "owned_by": "regen-scripted"}
        return self._json(200, {"object": "list", "data": [entry]})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # ---- model requests

    def _chat(self, raw: bytes, gemini_model: str | None) -> None:
        wire = self.wire
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._json(400, error_body(400, f"Request body is not JSON: {exc}", wire))
        if not isinstance(body, dict):
            return self._json(400, error_body(400, "Request body must be a JSON object", wire))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if body.get("stream"):
            with self.owner._lock:
                self.owner._record_only(body, headers, wire)
            return self._json(400, error_body(400, "stream=true is not supported by the scripted server", wire))
        seen = {**body, "model": gemini_model or body.get("model", "scripted"),
                "messages": chat_messages(wire, body), "wire": wire}
        step, number = self.owner._next_step(body, headers, wire, seen)
        if isinstance(step, str):  # no step to play: fail loudly, and tell the openai client not to retry
            return self._json(500, error_body(500, step, wire), {"x-should-retry": "false"})
        self._play(step, seen, number)

    def _play(self, step: Step, request: dict[str, Any], number: int) -> None:
        if isinstance(step, SlowFault):
            if self.owner._sleep(step.seconds):
                self._play(step.then, request, number)
        elif isinstance(step, Reply):
            if self.owner._sleep(step.delay):
                self._json(200, _BODIES[self.wire](step, request, number))
        elif isinstance(step, StatusFault):
            if step.body is None:
                payload = json.dumps(error_body(step.code, wire=self.wire)).encode()
            elif isinstance(step.body, Mapping):
                payload = json.dumps(step.body).encode()
            elif isinstance(step.body, str):
                payload = step.body.encode()
            else:
                payload = step.body
            self._send(step.code, payload, "application/json", step.headers)
        elif isinstance(step, RawFault):
            self._send(step.status, step.body, step.content_type)
        elif isinstance(step, DisconnectFault):
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- writing

    def _json(self, code: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, code: int, payload: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:  # the client hung up (timed out): that is its business, not a server crash
            self.close_connection = True


# --------------------------------------------------------------------------- CLI


WRITTEN_TOOLS = Path(__file__).resolve().parents[2] / "pipelines" / "scripted"


def reference_answer(body: Mapping[str, Any], written: Path | None = WRITTEN_TOOLS) -> str:
    """What a well-behaved senior answers for the unit in a chat request: the offline
    reference's files, with the tools no capability covers taken from `written`
    (`<mad>.<tool>.py`, see generator.senior.offline), for scripts that need good answers over HTTP."""
    from .offline import answer_for
    from .offline.written import load_written

    messages = [{"role": m.get("role"), "content": _text_of(m.get("content"))} for m in body.get("messages", [])]
    tools = load_written(written) if written is not None and written.is_dir() else {}
    return answer_for(messages, tools)


def unit_of(body: Mapping[str, Any]) -> str:
    """The unit a chat request is about, from its <unit-spec> block."""
    from .offline import UNIT_SPEC

    prompt = "\n".join(_text_of(m.get("content")) for m in body.get("messages", []) if m.get("role") == "user")
    match = UNIT_SPEC.search(prompt)
    return json.loads(match.group(1))["unit"] if match else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m generator.senior.scripted",
        description="Serve scripted OpenAI-compatible chat completions on 127.0.0.1: until Ctrl-C, "
        "or while a command given after -- runs (its exit code is returned).",
    )
    parser.add_argument("--port", type=int, default=8911, help="port on 127.0.0.1 (0: any free port; default 8911)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--replies", type=Path, help="JSON file: a list of reply contents (strings)")
    source.add_argument("--reference", action="store_true",
                        help="answer every unit as the reference senior: offline templates plus written tools")
    parser.add_argument("--written", type=Path, default=WRITTEN_TOOLS,
                        help=f"with --reference: the written tools folder (default: {WRITTEN_TOOLS})")
    parser.add_argument("--model", default="scripted", help="the model name /v1/models lists (default: scripted)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...: run CMD while serving, then stop")
    args = parser.parse_args(argv)
    if args.reference:
        script: Script = lambda body: Reply(reference_answer(body, args.written))  # noqa: E731
        what = f"reference senior, written tools from {args.written}"
    else:
        try:
            replies = json.loads(args.replies.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read {args.replies}: {exc}")
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            parser.error(f"{args.replies} must hold a JSON list of strings")
        script, what = [Reply(r) for r in replies], f"{len(replies)} replies"
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    server = ScriptedServer(script, model=args.model, port=args.port, quiet=False)
    try:
        server.start()
    except OSError as exc:
        parser.error(f"cannot listen on {HOST}:{args.port}: {exc}")
    print(f"scripted server: {server.base_url}  ({what})", flush=True)
    # "Until interrupted" whatever started it: a shell starts a background job with SIGINT ignored, and
    # Python then keeps it ignored, so `kill -INT` (or a script's Ctrl-C) would never stop the server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if command:
            return subprocess.run(command).returncode
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(f"scripted server: stopped after {len(server.requests)} requests", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
