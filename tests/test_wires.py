"""Every model family the README names, over its own wire format, as senior, fallback and reviewer.

One scripted server on 127.0.0.1 speaks OpenAI, Anthropic Messages, Gemini generateContent
and Ollama /api/chat. For each of Anthropic, Gemini and Ollama a whole build runs with that
family's senior and fallback, judged by a panel with a reviewer of each family; along the way
the senior meets a 429 with Retry-After and then a 503, an answer cut off by the output limit
and a refused key (so its fallback answers: after a 429 of its own, or after a 503 and an
answer cut off), and every reviewer meets a 429 with Retry-After, a 503 and a cut-off
verdict. The build must archive, verify byte for byte, record who answered, and show every
retry and fallback on screen and in the run log.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from repo_specs import CORE_MADS, repo_spec
from review_helpers import REPO, verdict, write_panel
from rich.console import Console

from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.build.verify import verify
from generator.config import RunOptions
from generator.progress import Reporter
from generator.senior.scripted import Fault, Reply, ScriptedServer, reference_answer, unit_of

pytestmark = pytest.mark.slow

KEY = "SCRIPTED_API_KEY"

# wire -> (senior, fallback, reviewer): litellm model strings of that family.
FAMILIES = {
    "anthropic": ("anthropic/claude-sonnet-4-5", "anthropic/claude-opus-4-1", "anthropic/claude-haiku-4-5"),
    "gemini": ("gemini/gemini-2.5-pro", "gemini/gemini-2.5-flash", "gemini/gemini-2.0-flash"),
    "ollama": ("ollama_chat/qwen2.5-coder", "ollama_chat/llama3.1", "ollama_chat/mistral"),
}


def _sent(model: str) -> str:
    """The model name as the provider receives it."""
    return model.split("/", 1)[1]


def _cut(body):
    whole = reference_answer(body)
    return Reply(whole[: len(whole) // 2], finish_reason="length")


def _rest(body):
    whole = reference_answer({"messages": body["messages"][:2]})
    return Reply(whole[len(whole) // 2:])


def _cut_or_rest(body):
    """Cut off any first answer; give the rest to a request to continue. (A JSON tool call cut off is asked
    again as plain text first, which is cut off in its turn.)"""
    return _rest(body) if body["messages"][-1]["content"].startswith("Your answer was cut off") else _cut(body)


class Providers:
    """Every family at once: scripted faults per (unit, model as sent), good answers otherwise.

    A request with a <unit-spec> is the senior's (answered as the reference senior would);
    any other is a reviewer's (answered with an approving verdict)."""

    def __init__(self, faults: dict[tuple[str, str], list]):
        self.faults = {key: list(steps) for key, steps in faults.items()}
        self.lock = threading.Lock()

    def __call__(self, body):
        unit = unit_of(body) or "review"
        with self.lock:
            queue = self.faults.get((unit, body["model"]))
            step = queue.pop(0) if queue else None
        if step is not None:
            return step(body) if callable(step) else step
        return Reply(reference_answer(body)) if unit != "review" else Reply(verdict())


def _transcript(artifact: Path) -> list[dict]:
    return [json.loads(line) for line in (artifact / "transcript.jsonl").read_text().splitlines()]


def _pipeline(tmp_path: Path, server: ScriptedServer, wire: str, panel: Path) -> Path:
    senior, fallback, _ = FAMILIES[wire]
    path = tmp_path / "pipeline.toml"
    path.write_text(f"""
name = "{wire}"
repair_rounds = 2
concurrency = 3

[senior]
model = "{senior}"
fallbacks = ["{fallback}"]
api_base = "{server.api_base(wire)}"
api_key_env = "{KEY}"
max_tokens = 32000
context_window = 1000000
timeout_seconds = 60
max_retries = 2
backoff_seconds = 0.01

[review]
panel = "{panel}"
""")
    return path


def _panel(tmp_path: Path, server: ScriptedServer) -> Path:
    reviewers: dict[str, dict] = {"tests": {"kind": "tests", "focus": "tests"}}
    for wire, (_, _, model) in FAMILIES.items():
        reviewers[wire] = {
            "kind": "llm", "focus": "correctness", "rubric": "../rubrics/rubric.md",
            "model": {"model": model, "api_base": server.api_base(wire), "api_key_env": KEY, "max_tokens": 2000,
                      "context_window": 200_000, "timeout_seconds": 20, "max_retries": 2, "backoff_seconds": 0.01},
        }
    return write_panel(tmp_path, reviewers, consensus={"rule": "unanimous"})


@pytest.mark.parametrize("wire", sorted(FAMILIES))
def test_a_whole_build_with_each_family_as_senior_fallback_and_reviewer(tmp_path, monkeypatch, wire):
    monkeypatch.setenv(KEY, "sk-scripted")
    senior, fallback, _ = FAMILIES[wire]
    faults: dict[tuple[str, str], list] = {
        ("mad:turing", _sent(senior)): [Fault.status(429, headers={"Retry-After": "1"}), Fault.status(503)],
        ("mad:rogers", _sent(senior)): [_cut_or_rest] * 3,
        ("mad:fiedler", _sent(senior)): [Fault.status(401)],
        ("mad:fiedler", _sent(fallback)): [Fault.status(429, headers={"Retry-After": "1"})],
        ("mad:grace", _sent(senior)): [Fault.status(401)] * 4,
        ("mad:grace", _sent(fallback)): [Fault.status(503)] + [_cut_or_rest] * 3,
    }
    for _, _, reviewer in FAMILIES.values():
        faults[("review", _sent(reviewer))] = [Fault.status(429, headers={"Retry-After": "1"}), Fault.status(503),
                                               Reply('{"decision": "appro', finish_reason="length")]
    screen = io.StringIO()
    report = Reporter(console=Console(file=screen, width=1000, color_system=None))
    with ScriptedServer(Providers(faults)) as server:
        panel = _panel(tmp_path, server)
        options = RunOptions(spec_dir=repo_spec(tmp_path / "spec", CORE_MADS), pipeline_file=_pipeline(tmp_path, server, wire, panel),
                             out_dir=tmp_path / "out")
        result = regenerate(BuildContext(options=options, report=report))
    assert server.errors == []
    assert {"anthropic", "gemini", "ollama"} <= set(server.wires)

    # Archived, and rebuilt byte for byte from its own transcript, with no server and no key.
    monkeypatch.delenv(KEY)
    checked = verify(result.path, report=Reporter(quiet=True))
    assert checked.ok, (checked.problems, checked.differences)

    # The manifest says who answered each unit, and what the senior's provider was not sent.
    units = {u.unit: u.answered_by for u in result.manifest.units}
    assert units["mad:fiedler"] == units["mad:grace"] == (fallback,)
    assert all(by == (senior,) for unit, by in units.items() if unit not in ("mad:fiedler", "mad:grace"))
    continued = [e["purpose"] for e in _transcript(result.path) if e["unit"] in ("mad:rogers", "mad:grace")]
    assert continued.count("continue") == 2, "both cut-off answers were continued, never written half"
    left_out = result.manifest.parameters_left_out
    # Anthropic takes no seed: left out for the senior and fallback of that family, and for the panel's Claude.
    claude = FAMILIES["anthropic"][2]
    assert left_out == ({senior: ("seed",), fallback: ("seed",), claude: ("seed",)} if wire == "anthropic"
                        else {claude: ("seed",)})
    if wire == "anthropic":
        assert all("seed" not in body for body, w in zip(server.requests, server.wires) if w == "anthropic")

    # The panel of three families decided, each reviewer after a 503 and a cut-off verdict.
    review = json.loads((result.path / "review.json").read_text())
    final = review["rounds"][-1]["verdicts"]
    assert review["outcome"] == "approve"
    assert {v["reviewer"]: v["decision"] for v in final} == {
        "tests": "approve", "anthropic": "approve", "gemini": "approve", "ollama": "approve"}

    # Every retry and fallback on screen as it happened, counted per unit in the summary ...
    shown = screen.getvalue()
    assert f"mad:turing: {senior} HTTP 429, retry 1 in 1.0s" in shown
    assert f"mad:turing: {senior} HTTP 503, retry 2" in shown
    assert f"mad:fiedler: {senior} gave up: HTTP 401: the key in {KEY} was refused" in shown
    assert f"mad:fiedler: falling back from {senior} to {fallback}" in shown
    assert f"mad:fiedler: {fallback} HTTP 429, retry 1 in 1.0s" in shown
    assert f"answered by {senior} (3 units), {fallback} (2 units, fallback)" in shown
    turing = next(line for line in shown.splitlines() if line.strip().startswith("per unit"))
    assert "mad:turing" in turing and "(2 retries)" in turing
    assert f"(1 retry; 1 fallback; by {fallback})" in turing
    seconds = float(turing.split("mad:turing ")[1].split("s (")[0].split("/")[1])
    assert seconds >= 1.0, "the unit's time includes the wait the server asked for"

    # ... and in the run log beside the build, which the signed artifact does not hold.
    log_path = tmp_path / ".regen" / "runs" / "madgroup" / "1.0.0.jsonl"
    assert "run log" in shown and str(log_path) in shown
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    retries = [(e["unit"], e["model"], e.get("status")) for e in log if e["event"] == "retry"]
    assert ("mad:turing", senior, 429) in retries and ("mad:turing", senior, 503) in retries
    assert ("mad:fiedler", fallback, 429) in retries
    assert any(e["event"] == "retry" and e["unit"].startswith("review:") and e.get("status") == 503 for e in log)
    assert {e["to_model"] for e in log if e["event"] == "fallback"} == {fallback}
    assert ("mad:grace", fallback, 503) in retries
    assert {e["unit"] for e in log if e["event"] == "answered"} >= {"mad:turing", "mad:rogers", "frame"}
    assert "run" not in {p.name for p in result.path.iterdir()} and ".regen" not in {p.name for p in result.path.iterdir()}


# --- the shipped pipeline and reviewer files, each against its provider's format -------------


def _wire_of(model: str) -> str:
    provider = model.split("/", 1)[0]
    return {"anthropic": "anthropic", "gemini": "gemini"}.get(provider, "ollama" if provider.startswith("ollama")
                                                            else "openai")


def _shipped_models():
    """(file, SeniorModel, schema) for the frontier senior, its fallbacks, and every LLM reviewer in reviews/."""
    from generator.config import load_pipeline, load_toml
    from generator.review.models import VerdictAnswer
    from generator.review.panel import ReviewerDefinition
    from generator.senior.answer import Answer

    frontier = load_pipeline(REPO / "pipelines" / "frontier.toml").senior
    found = [("pipelines/frontier.toml", frontier.model_copy(update={"model": m, "fallbacks": []}),
              Answer.model_json_schema()) for m in [frontier.model, *frontier.fallbacks]]
    for path in sorted((REPO / "reviews" / "reviewers").glob("*.toml")):
        reviewer = load_toml(path, ReviewerDefinition, "reviewer file", "reviews/reviewers/tests.toml")
        if reviewer.kind == "llm":
            found.append((f"reviews/reviewers/{path.name}", reviewer.model, VerdictAnswer.model_json_schema()))
    return found


def _valid_for_provider(wire: str, body: dict, headers: dict) -> list[str]:
    """What the provider's API would refuse in this request (the parts regen decides)."""
    problems = []
    if wire == "anthropic":
        problems += [f"Anthropic takes no {k!r}" for k in ("seed", "response_format", "random_seed") if k in body]
        if not isinstance(body.get("max_tokens"), int):
            problems.append("Anthropic needs max_tokens")
        if any(m.get("role") not in ("user", "assistant") for m in body.get("messages", [])):
            problems.append("Anthropic messages are user/assistant only; the system prompt goes in 'system'")
        if not headers.get("x-api-key") or not headers.get("anthropic-version"):
            problems.append("Anthropic needs x-api-key and anthropic-version")
    elif wire == "gemini":
        config = body.get("generationConfig", {})
        allowed = {"temperature", "max_output_tokens", "seed", "response_mime_type", "response_json_schema",
                   "response_schema"}
        problems += [f"Gemini's generationConfig takes no {k!r}" for k in set(config) - allowed]
        if not body.get("contents") or not headers.get("x-goog-api-key"):
            problems.append("Gemini needs contents and x-goog-api-key")
    elif wire == "openai":
        if "response_format" in body and body["response_format"].get("type") != "json_schema":
            problems.append("response_format must be a json_schema")
        if body.get("model", "").startswith("mistral") and "seed" in body:
            problems.append("Mistral takes random_seed, not seed")
    return problems


@pytest.mark.parametrize("where, model, schema", _shipped_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shipped_model_file_makes_a_request_its_provider_takes(where, model, schema, monkeypatch):
    from generator.senior.client import LiteLLMClient, price_per_token
    from generator.senior.models import ModelRequest

    monkeypatch.setenv(KEY, "sk-scripted")
    wire = _wire_of(model.model)
    answer = verdict() if "decision" in json.dumps(schema) else json.dumps({"files": [{"path": "a.py", "content": "x"}]})
    with ScriptedServer([Reply(answer)]) as server:
        pointed = model.model_copy(update={"api_base": server.api_base(wire), "api_key_env": KEY, "max_retries": 0})
        request = ModelRequest.for_unit("probe", pointed, [{"role": "system", "content": "You review."},
                                                           {"role": "user", "content": "Judge this."}], schema)
        reply = LiteLLMClient(pointed).complete(request)
    assert server.wires == [wire], f"{where}: {model.model} did not speak {wire}"
    assert reply.content == answer and reply.model == model.model
    assert _valid_for_provider(wire, server.requests[0], server.headers[0]) == [], where
    # The frontier pipeline and panel have cost budgets: every model in them needs a known price.
    assert price_per_token(model.model, {}) is not None, f"{where}: no price known for {model.model}"


def test_the_local_pipeline_builds_against_ollama_archives_and_verifies(tmp_path):
    """pipelines/local.toml as shipped, pointed at the scripted server's Ollama endpoint."""
    text = (REPO / "pipelines" / "local.toml").read_text()
    with ScriptedServer(lambda body: Reply(reference_answer(body))) as server:
        assert 'api_base = "http://127.0.0.1:11434"' in text
        pipeline = tmp_path / "local.toml"
        pipeline.write_text(text.replace("http://127.0.0.1:11434", server.api_base("ollama"))
                            .replace("../reviews/panels/offline.toml", str(REPO / "reviews/panels/offline.toml")))
        options = RunOptions(spec_dir=repo_spec(tmp_path / "spec", CORE_MADS), pipeline_file=pipeline,
                             out_dir=tmp_path / "out")
        result = regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
    assert set(server.wires) == {"ollama"} and all(b["options"]["seed"] == 0 for b in server.requests)
    assert {u.answered_by for u in result.manifest.units} == {("ollama_chat/qwen3-coder:30b",)}
    checked = verify(result.path, report=Reporter(quiet=True))
    assert checked.ok, (checked.problems, checked.differences)
