"""The openai pack: model aliases with `provider: openai`, answered by an OpenAI-compatible endpoint (an httpx
MockTransport here: nothing leaves the process), the key read from the secrets store; and a build without the
pack, whose aliases use it, refused at start."""

from __future__ import annotations

import asyncio
import importlib
import json

import httpx
import pytest
from kernel_tests_conftest import importable, without_pack


def _errors(runtime):
    return importlib.import_module(type(runtime).__module__.rsplit(".", 1)[0] + ".errors")


def test_openai_provider_uses_key_from_turing(eco_modules, tmp_path):
    config, kernel, runtime_mod = eco_modules
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"content": "hi from model"}}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 3}})

    models = dict(config.models)
    models["gpt"] = kernel.ModelAlias(provider="openai", model="gpt-x", api_base="http://127.0.0.1:9/v1",
                                      api_key_secret="openai_key")
    cfg = config.model_copy(update={"models": models})
    rt = runtime_mod.Runtime(cfg, tmp_path / "s", model_transport=httpx.MockTransport(handler))
    asyncio.run(rt.start())
    errors = _errors(rt)
    try:
        with pytest.raises(errors.NotFound, match="openai_key"):
            asyncio.run(rt.use("models.send", caller="grace", model="gpt", prompt="hello"))
        asyncio.run(rt.use("secrets.set", caller="turing", name="openai_key", value="sk-test-123"))
        out = asyncio.run(rt.use("models.send", caller="grace", model="gpt", prompt="hello", max_tokens=7))
        assert out["text"] == "hi from model" and out["total_tokens"] == 8
        assert seen["url"] == "http://127.0.0.1:9/v1/chat/completions"
        assert seen["auth"] == "Bearer sk-test-123"
        assert seen["body"]["model"] == "gpt-x" and seen["body"]["max_tokens"] == 7
        audit = asyncio.run(rt.use("secrets.audit", caller="turing"))
        assert any(a["action"] == "use" and a["name"] == "openai_key" and a["ok"] for a in audit)
    finally:
        asyncio.run(rt.stop())


def test_openai_provider_errors_are_model_errors(eco_modules, tmp_path):
    config, kernel, runtime_mod = eco_modules
    answers = iter([httpx.Response(429, json={}), httpx.Response(200, text="not json")])
    models = {"gpt": kernel.ModelAlias(provider="openai", model="m", api_base="http://127.0.0.1:9")}
    rt = runtime_mod.Runtime(config.model_copy(update={"models": models}), tmp_path / "s",
                             model_transport=httpx.MockTransport(lambda r: next(answers)))
    asyncio.run(rt.start())
    errors = _errors(rt)
    try:
        with pytest.raises(errors.ModelError, match="HTTP 429"):
            asyncio.run(rt.use("models.send", caller="grace", model="gpt", prompt="x"))
        with pytest.raises(errors.ModelError, match="malformed"):
            asyncio.run(rt.use("models.send", caller="grace", model="gpt", prompt="x"))
    finally:
        asyncio.run(rt.stop())


def test_a_build_without_the_pack_refuses_an_openai_alias_at_start(tmp_path_factory, tmp_path):
    """A pruned copy (or a hand-edited ecosystem.py) whose alias uses the provider the build did not carry: refused
    before anything serves, saying how to get it; the same build with only the echo model starts."""
    root, name = without_pack(tmp_path_factory, "noopenai", "openai")
    with importable(root):
        config = importlib.import_module(f"{name}.ecosystem").CONFIG
        runtime_mod = importlib.import_module(f"{name}.kernel.runtime")
        errors = importlib.import_module(f"{name}.kernel.errors")
        echo_only = runtime_mod.Runtime(config, tmp_path / "echo")
        asyncio.run(echo_only.start())
        asyncio.run(echo_only.stop())
        alias = importlib.import_module(f"{name}.kernel").ModelAlias(provider="openai", model="m",
                                                                     api_base="http://127.0.0.1:9")
        with pytest.raises(errors.KernelError, match=r"model alias 'gpt' uses the openai provider.*nox -s regenerate"):
            runtime_mod.Runtime(config.model_copy(update={"models": {**config.models, "gpt": alias}}), tmp_path / "gpt")
