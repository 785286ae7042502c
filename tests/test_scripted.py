"""The scripted OpenAI-compatible server, driven through the real litellm -> openai -> httpx stack.

Every call passes `max_retries=0`: without it litellm's openai provider builds its client
with openai's default of 2 retries, so one failing call would silently cost three requests
(`test_without_max_retries_the_openai_client_retries_twice` pins that down).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

# Set before litellm is imported, else it downloads its price table.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402

from generator.senior.scripted import Fault, Reply, ScriptedServer  # noqa: E402

litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banner on every expected error
litellm.telemetry = False

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Write hello world, please."},
]


def chat(server: ScriptedServer, **kwargs):
    """One real litellm call to the scripted server, with no hidden retries unless asked."""
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 5)
    return litellm.completion(model="openai/scripted", api_base=server.base_url, api_key="test-key", messages=MESSAGES, **kwargs)


def http(method: str, url: str, **kwargs) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=5) as client:
        return client.request(method, url, **kwargs)


@pytest.fixture(autouse=True)
def _nothing_left_running(monkeypatch):
    """Each test's servers are stopped: none of their threads outlive the test."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and not t.name.startswith("litellm")]
    assert not left, f"threads left running: {left}"


# --------------------------------------------------------------------------- replies


def test_happy_path_content_finish_reason_usage_and_the_recorded_request():
    with ScriptedServer([Reply("print('hello')", prompt_tokens=12, completion_tokens=3)]) as server:
        response = chat(server, seed=1234, max_tokens=256, temperature=0.0)
    choice = response.choices[0]
    assert choice.message.content == "print('hello')"
    assert choice.finish_reason == "stop"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (12, 3, 15)
    assert response.id == "chatcmpl-scripted-1"
    [sent] = server.requests
    assert sent["model"] == "scripted"
    assert sent["messages"] == MESSAGES
    assert sent["seed"] == 1234 and sent["max_tokens"] == 256 and sent["temperature"] == 0.0
    assert "stream" not in sent
    assert server.headers[0]["authorization"] == "Bearer test-key"
    assert server.remaining == 0 and server.errors == []


def test_usage_is_estimated_when_not_scripted():
    with ScriptedServer([Reply("x" * 40)]) as server:
        usage = chat(server).usage
    prompt_chars = sum(len(m["content"]) for m in MESSAGES)
    assert usage.prompt_tokens == prompt_chars // 4
    assert usage.completion_tokens == 10
    assert usage.total_tokens == usage.prompt_tokens + 10


def test_finish_reason_length_comes_back_as_length():
    with ScriptedServer([Reply("def trunc", finish_reason="length")]) as server:
        choice = chat(server).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("def trunc", "length")


def test_empty_content_is_an_empty_string():
    with ScriptedServer([Reply("")]) as server:
        response = chat(server)
    assert response.choices[0].message.content == ""
    assert response.usage.completion_tokens == 1  # estimates never go below 1


def test_steps_are_consumed_in_order_and_a_callable_script_sees_each_request():
    with ScriptedServer([Reply("one"), Reply("two", delay=0.05)]) as server:
        assert [chat(server).choices[0].message.content for _ in range(2)] == ["one", "two"]

    def echo(request: dict) -> Reply:
        return Reply(f"seed={request.get('seed')}")

    with ScriptedServer(echo) as server:
        assert chat(server, seed=7).choices[0].message.content == "seed=7"
        assert chat(server, seed=8).choices[0].message.content == "seed=8"
    assert server.remaining is None and len(server.requests) == 2


# --------------------------------------------------------------------------- faults


def test_429_is_a_rate_limit_error_whose_retry_after_is_on_the_response_headers():
    with ScriptedServer([Fault.status(429, headers={"Retry-After": "1"})]) as server:
        with pytest.raises(litellm.RateLimitError) as caught:
            chat(server)
    exc = caught.value
    assert exc.status_code == 429
    assert exc.response.headers["retry-after"] == "1"  # httpx.Headers: case-insensitive
    assert exc.litellm_response_headers["Retry-After"] == "1"  # the same httpx.Headers
    assert exc.headers is None  # not here
    assert "Rate limit reached" in str(exc)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        (400, litellm.BadRequestError),
        (401, litellm.AuthenticationError),
        (404, litellm.NotFoundError),
        (500, litellm.InternalServerError),
        (502, litellm.BadGatewayError),
        (503, litellm.ServiceUnavailableError),
    ],
)
def test_http_errors_map_to_litellm_exceptions(code, exception):
    with ScriptedServer([Fault.status(code)]) as server:
        with pytest.raises(exception) as caught:
            chat(server)
    assert caught.value.status_code == code
    assert len(server.requests) == 1


def test_a_custom_error_body_reaches_the_message():
    body = {"error": {"message": "model is warming up", "type": "server_error", "param": None, "code": None}}
    with ScriptedServer([Fault.status(503, body=body)]) as server:
        with pytest.raises(litellm.ServiceUnavailableError, match="model is warming up"):
            chat(server)


def test_a_slow_server_is_a_timeout_quickly_and_the_server_survives_the_hang_up():
    with ScriptedServer([Fault.slow(0.6, then=Reply("too late")), Reply("after")]) as server:
        with pytest.raises(litellm.Timeout):
            chat(server, timeout=0.2)
        time.sleep(0.6)  # the slow handler now writes to a socket its client has closed
        assert chat(server).choices[0].message.content == "after"
    assert len(server.requests) == 2


def test_timeout_half_a_second_against_a_three_second_step_and_stop_does_not_wait_for_it():
    with ScriptedServer([Fault.slow(3)]) as server:
        started = time.monotonic()
        with pytest.raises(litellm.Timeout):
            chat(server, timeout=0.5)
        assert time.monotonic() - started < 1.5
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1.0  # the sleeping step woke up and gave up


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"id": "chatcmpl-1", "choices": [', id="truncated-json"),
        pytest.param(b"\xff\xfe\x00\x80 not utf-8", id="non-utf8"),
        pytest.param(b"[]", id="json-not-an-object"),
    ],
)
def test_a_malformed_200_body_is_an_internal_server_error(body):
    """litellm wraps the openai SDK's parse failure as a 500 InternalServerError."""
    with ScriptedServer([Fault.raw(body)]) as server:
        with pytest.raises(litellm.InternalServerError) as caught:
            chat(server)
    assert caught.value.status_code == 500


def test_a_choiceless_200_is_silently_a_response_with_no_choices():
    """Surprising but true: `{"choices": []}` is not an error; callers must check `choices`."""
    with ScriptedServer([Fault.raw(b'{"choices": []}')]) as server:
        response = chat(server)
    assert response.choices == []


def test_an_html_502_from_a_proxy_is_a_bad_gateway_error():
    with ScriptedServer([Fault.raw(b"<html>bad gateway</html>", status=502, content_type="text/html")]) as server:
        with pytest.raises(litellm.BadGatewayError):
            chat(server)


def test_a_dropped_connection_is_an_internal_server_error_saying_connection_error():
    """openai raises APIConnectionError; litellm maps it to InternalServerError, not APIConnectionError."""
    with ScriptedServer([Fault.disconnect()]) as server:
        with pytest.raises(litellm.InternalServerError, match="Connection error") as caught:
            chat(server)
    assert not isinstance(caught.value, litellm.APIConnectionError)
    assert len(server.requests) == 1


def test_an_exhausted_script_is_a_loud_500_and_is_recorded():
    with ScriptedServer([Reply("only")]) as server:
        chat(server)
        # No max_retries here: the exhaustion answer says x-should-retry: false, so even
        # openai's default retries do not hammer it.
        with pytest.raises(litellm.InternalServerError, match="script exhausted after 1 requests"):
            litellm.completion(model="openai/scripted", api_base=server.base_url, api_key="k", messages=MESSAGES)
    assert server.errors == ["script exhausted after 1 requests"]
    assert len(server.requests) == 2


def test_without_max_retries_the_openai_client_retries_twice():
    """litellm's openai provider defaults the SDK client to max_retries=2: three requests per call."""
    fail = Fault.status(500, headers={"retry-after-ms": "1"})  # openai honours retry-after-ms: keep it fast
    with ScriptedServer([fail] * 3) as server:
        with pytest.raises(litellm.InternalServerError):
            litellm.completion(model="openai/scripted", api_base=server.base_url, api_key="k", messages=MESSAGES)
    assert len(server.requests) == 3
    with ScriptedServer([fail] * 3) as server:
        with pytest.raises(litellm.InternalServerError):
            chat(server, max_retries=None, num_retries=0)  # num_retries=0 also turns them off
    assert len(server.requests) == 1


def test_streaming_is_refused_with_400_and_consumes_no_step():
    with ScriptedServer([Reply("unused")]) as server:
        with pytest.raises(litellm.BadRequestError, match="stream=true is not supported"):
            chat(server, stream=True)
    assert server.requests[0]["stream"] is True
    assert server.remaining == 1


# --------------------------------------------------------------------------- HTTP surface


def test_missing_or_empty_authorization_is_401_and_records_nothing():
    with ScriptedServer([Reply("secret")]) as server:
        url = f"{server.base_url}/chat/completions"
        body = {"model": "scripted", "messages": MESSAGES}
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpw"}):
            response = http("POST", url, json=body, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert http("GET", f"{server.base_url}/models").status_code == 401
    assert server.requests == [] and server.remaining == 1


def test_models_paths_and_bad_requests():
    auth = {"Authorization": "Bearer anything"}
    with ScriptedServer([Reply("via the bare path")], model="tiny") as server:
        root = server.base_url.removesuffix("/v1")
        models = http("GET", f"{server.base_url}/models", headers=auth)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]
        assert http("GET", f"{server.base_url}/embeddings", headers=auth).status_code == 404
        assert http("GET", f"{root}/", headers=auth).status_code == 404
        assert http("GET", f"{server.base_url}/chat/completions", headers=auth).status_code == 405
        not_json = http("POST", f"{root}/chat/completions", content=b"{nope", headers=auth)
        assert not_json.status_code == 400
        answered = http("POST", f"{root}/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=auth)
        assert answered.status_code == 200
        body = answered.json()
        assert body["object"] == "chat.completion" and body["model"] == "m" and isinstance(body["created"], int)
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "via the bare path"}
    assert len(server.requests) == 1  # the non-JSON body was not recorded


def test_lifecycle_frees_the_port_and_rejects_bad_steps():
    server = ScriptedServer([])
    with pytest.raises(RuntimeError):
        server.base_url
    server.start()
    port = server.port
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(TypeError, match="script step 1"):
        ScriptedServer([Reply("ok"), "not a step"])


def test_a_callable_that_fails_is_a_loud_500():
    def broken(request: dict):
        raise ValueError("no reply for you")

    with ScriptedServer(broken) as server:
        with pytest.raises(litellm.InternalServerError, match="no reply for you"):
            chat(server)
    assert server.errors and "ValueError" in server.errors[0]


@pytest.mark.parametrize("started_as", ["foreground", "background job"])
def test_cli_serves_the_replies_until_interrupted(tmp_path, started_as):
    """SIGINT stops it, also when it was started the way a shell starts a background job: with SIGINT
    ignored (which Python would otherwise keep)."""
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps(["first reply"]))
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if started_as == "background job" else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "generator.senior.scripted", "--port", "0", "--replies", str(replies)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint,  # noqa: PLW1509 - a test's child, no threads to worry about
    )
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("scripted server: http://127.0.0.1:")
        base_url = banner.split()[2]
        response = http(
            "POST",
            f"{base_url}/chat/completions",
            json={"model": "scripted", "messages": MESSAGES},
            headers={"Authorization": "Bearer demo"},
        )
        assert response.json()["choices"][0]["message"]["content"] == "first reply"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "stopped after 1 requests" in out
