from __future__ import annotations

import asyncio

import pytest


def _errors(runtime):
    return __import__(type(runtime).__module__.rsplit(".", 1)[0] + ".errors", fromlist=["x"])


def test_echo_is_deterministic_and_counts_words(runtime):
    r1 = asyncio.run(runtime.use("models.send", caller="grace", model="default", prompt="hello big world", max_tokens=10))
    r2 = asyncio.run(runtime.use("models.send", caller="grace", model="default", prompt="hello big world", max_tokens=10))
    assert r1["text"] == r2["text"] == "[offline echo model] hello big world"
    assert (r1["prompt_tokens"], r1["completion_tokens"], r1["total_tokens"]) == (3, 6, 9)
    b = asyncio.run(runtime.use("models.budget", caller="fiedler"))
    assert b["mads"]["grace"]["spent"] == 18 and b["mads"]["grace"]["calls"] == 2
    assert b["mads"]["grace"]["remaining"] == 100000 - 18
    assert [m["alias"] for m in asyncio.run(runtime.use("models.list", caller="fiedler"))] == ["default"]


def test_echo_is_labelled_and_answers_the_last_message_not_the_system_prompt(runtime):
    mad = runtime.mad("grace")  # its imperator prompt is "You are Grace."
    assert asyncio.run(mad.think("what\nis new?")) == "[offline echo model] what is new?"
    prompt = "You are Grace.\nBe brief.\n\nearlier paragraph\n  \none two three four five six"
    send = lambda n: asyncio.run(runtime.use("models.send", caller="grace", model="default", prompt=prompt, max_tokens=n))  # noqa: E731
    assert send(5)["text"] == "[offline echo model] one two"  # the whole answer fits max_tokens
    assert (send(5)["completion_tokens"], send(2)["completion_tokens"]) == (5, 2)
    assert send(2)["text"] == "[offline echo model]"
    assert send(100)["text"] == "[offline echo model] one two three four five six"
    gateway = type(runtime.models)
    text, usage = gateway._echo("hello", 10, "You are Fiedler, the model gateway.")
    assert text == "[offline echo model] hello" and usage["prompt_tokens"] == 7  # the system prompt counted, not echoed


def test_budget_refuses_clearly_and_persists(runtime, eco_modules):
    errors = _errors(runtime)
    # fiedler's budget is 60 tokens
    asyncio.run(runtime.use("models.send", caller="fiedler", model="default", prompt="one two three", max_tokens=20))
    spent = asyncio.run(runtime.use("models.budget", caller="fiedler"))["mads"]["fiedler"]["spent"]
    assert spent > 0
    with pytest.raises(errors.BudgetExceeded, match="budget exceeded for fiedler"):
        asyncio.run(runtime.use("models.send", caller="fiedler", model="default", prompt="x " * 30, max_tokens=40))
    with pytest.raises(errors.NotFound):
        asyncio.run(runtime.use("models.send", caller="fiedler", model="nope", prompt="x"))
    asyncio.run(runtime.stop())
    config, _, runtime_mod = eco_modules
    rt2 = runtime_mod.Runtime(config, runtime.state_dir)
    asyncio.run(rt2.start())
    try:
        assert asyncio.run(rt2.use("models.budget", caller="fiedler"))["mads"]["fiedler"]["spent"] == spent
    finally:
        asyncio.run(rt2.stop())


def test_client_calls_are_charged_to_the_client_too(eco_modules, tmp_path):
    config, _, runtime_mod = eco_modules
    # think() reserves prompt + max_tokens (256): the first call fits in 265, the second does not
    small = config.model_copy(update={"client_budget_tokens": 265})
    rt = runtime_mod.Runtime(small, tmp_path / "s")
    asyncio.run(rt.start())
    errors = _errors(rt)
    try:
        out = asyncio.run(rt.invoke_tool("grace", "chat", {"message": "hi"}, principal="client:alice"))
        assert out == "[offline echo model] hi"
        budgets = asyncio.run(rt.use("models.budget", caller="fiedler"))
        assert budgets["clients"]["client:alice"]["spent"] == budgets["mads"]["grace"]["spent"] > 0
        with pytest.raises(errors.BudgetExceeded, match="client:alice"):
            asyncio.run(rt.invoke_tool("grace", "chat", {"message": "again"}, principal="client:alice"))
    finally:
        asyncio.run(rt.stop())
