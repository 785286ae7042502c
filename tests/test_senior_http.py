"""The real HTTP path: litellm → a scripted server on 127.0.0.1, in the OpenAI and the Anthropic wire formats.

The server plays the senior: between the faults a test scripts, it answers what
`offline/reference` would, so every unit has a good answer to come back to. Every test
that talks to the server runs once per format (the `wire` fixture): faults, repairs,
budgets and fallbacks must hold whichever provider answers.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo_specs import CORE_MADS, repo_spec

from generator.artifact.store import versions
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.config import RunOptions, load_pipeline
from generator.errors import BuildFailed, OverBudget, UserError
from generator.progress import Reporter
from generator.senior.client import LiteLLMClient, price_per_token
from generator.senior.context import count_tokens
from generator.senior.scripted import Fault, Reply, ScriptedServer, reference_answer, unit_of
from generator.senior.spend import Spend
from generator.senior.synthesise import SynthesisRun
from generator.spec.load import load_spec
from generator.spec.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
REGEN = [sys.executable, "-m", "generator.cli"]
KEY = "SCRIPTED_API_KEY"


class Senior:
    """A scripted senior: per unit, the listed steps first, then good answers."""

    def __init__(self, faults: dict[str, list] | None = None):
        self.faults = {unit: list(steps) for unit, steps in (faults or {}).items()}
        self.asked: list[str] = []

    def __call__(self, body):
        unit = unit_of(body)
        self.asked.append(unit)
        queue = self.faults.get(unit)
        if queue:
            step = queue.pop(0)
            return step(body) if callable(step) else step
        return Reply(reference_answer(body))


WIRES = ["openai", "anthropic"]


@pytest.fixture(params=WIRES)
def wire(request) -> str:
    return request.param


def write_pipeline(folder: Path, base_url: str, extra: str = "", repair_rounds: int = 2, timeout: int = 60,
                   fallbacks: tuple[str, ...] = (), wire: str = "openai") -> Path:
    """A pipeline whose senior is `<wire>/scripted` at `base_url` (the server's api_base for that wire)."""
    path = folder / "scripted.toml"
    path.write_text(f"""
name = "scripted"
repair_rounds = {repair_rounds}
concurrency = 3

[senior]
model = "{wire}/scripted"
fallbacks = {json.dumps([f.replace("openai/", f"{wire}/", 1) for f in fallbacks])}
api_base = "{base_url}"
api_key_env = "{KEY}"
max_tokens = 32000
context_window = 1000000
timeout_seconds = {timeout}
max_retries = 3
backoff_seconds = 0.01

[prices."{wire}/scripted"]
input_per_mtok = 1.0
output_per_mtok = 4.0

[prices."{wire}/backup"]
input_per_mtok = 2.0
output_per_mtok = 8.0
{extra}
""")
    return path


@pytest.fixture
def spec_and_plan():
    spec = load_spec(REPO / "spec")
    return spec, make_plan(spec)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY, "sk-scripted")


def _synthesise(tmp_path, senior: Senior, spec_and_plan, extra: str = "", repair_rounds: int = 2, timeout: int = 60,
                wire: str = "openai", events: list | None = None):
    spec, plan = spec_and_plan
    with ScriptedServer(senior) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), extra, repair_rounds, timeout,
                                                wire=wire))
        client = LiteLLMClient(pipeline.senior, pipeline.prices,
                               on_event=events.append if events is not None else lambda event: None)
        run = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens,
                           price=lambda model: price_per_token(model, pipeline.prices))
        return run.synthesise(), server


def _unit(synthesis, name):
    return next(u for u in synthesis.units if u.unit == name)


def _exchanges(synthesis, unit):
    return [e for e in synthesis.exchanges if e.request.unit == unit]


def test_happy_path_every_unit_over_http_with_tokens_and_cost(tmp_path, spec_and_plan, wire):
    synthesis, server = _synthesise(tmp_path, Senior(), spec_and_plan, wire=wire)
    assert [u.unit for u in synthesis.units] == [u.name for u in spec_and_plan[1].units]
    assert len(server.requests) == len(spec_and_plan[1].units) == len(spec_and_plan[0].mads) + 1
    first = server.requests[0]
    assert first["temperature"] == 0.0 and first["max_tokens"] == 32000
    if wire == "openai":
        assert first["seed"] == 0 and server.headers[0]["authorization"] == "Bearer sk-scripted"
    else:  # Anthropic takes no seed: it is left out, not sent to be refused
        assert "seed" not in first and server.headers[0]["x-api-key"] == "sk-scripted"
    assert set(server.wires) == {wire}
    # Each answer's wall time, kept with it (the transcript, the unit records, report.html): a model's, so recorded.
    assert all(e.reply.elapsed_s is not None and e.reply.elapsed_s >= 0 for e in synthesis.exchanges)
    for unit in synthesis.units:
        assert unit.prompt_tokens > 0 and unit.completion_tokens > 0 and unit.rounds == 1
        # The pipeline's price table: $1 in, $4 out per million tokens.
        assert unit.cost_usd == pytest.approx((unit.prompt_tokens + 4 * unit.completion_tokens) / 1e6, abs=1e-6)


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(429, headers={"Retry-After": "0"}),
        Fault.status(500),
        Fault.status(503),
        Fault.slow(3, then=Reply("{}")),  # over the 2 s timeout
        Fault.raw(b'{"id": "x", "choices": [{"message": {"content": "trunc'),
        Fault.raw("caf\xe9 \xff\xfe".encode("latin-1")),
        Fault.disconnect(),
    ],
    ids=["429-retry-after", "500", "503", "timeout", "malformed-json", "non-utf8", "disconnect"],
)
def test_transient_faults_are_retried_and_recorded(tmp_path, spec_and_plan, fault, wire):
    synthesis, server = _synthesise(tmp_path, Senior({"mad:turing": [fault, fault]}), spec_and_plan, timeout=2, wire=wire)
    (exchange,) = _exchanges(synthesis, "mad:turing")
    assert exchange.reply.attempts == 3
    assert _unit(synthesis, "mad:turing").rounds == 1
    assert server.errors == []


def test_a_senior_that_keeps_failing_gives_up_clearly(tmp_path, spec_and_plan, wire):
    faults = {"mad:turing": [Fault.status(503)] * 20}
    with pytest.raises(BuildFailed, match=f"unit mad:turing: {wire}/scripted: HTTP 503: the provider failed after 4 tries"):
        _synthesise(tmp_path, Senior(faults), spec_and_plan, repair_rounds=0, wire=wire)


def test_when_the_senior_is_down_the_fallback_model_answers(tmp_path, spec_and_plan, wire):
    spec, plan = spec_and_plan

    def down_unless_fallback(body):
        return Reply(reference_answer(body)) if body["model"] == "backup" else Fault.status(503)

    with ScriptedServer(down_unless_fallback) as server:
        path = write_pipeline(tmp_path, server.api_base(wire), fallbacks=("openai/backup",), wire=wire)
        pipeline = load_pipeline(path)
        client = LiteLLMClient(pipeline.senior, pipeline.prices)
        synthesis = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens).synthesise()
    assert {e.reply.model for e in synthesis.exchanges} == {f"{wire}/backup"}
    asked = [r["model"] for r in server.requests]
    units = len(plan.units)
    assert asked.count("scripted") == units * 4 and asked.count("backup") == units  # per unit: 1 try + 3 retries, then the fallback


def test_a_truncated_answer_is_continued_never_written_half(tmp_path, spec_and_plan, wire):
    def cut(body):
        whole = reference_answer(body)
        return Reply(whole[: len(whole) // 2], finish_reason="length")

    def rest(body):
        whole = reference_answer({"messages": body["messages"][:2]})
        return Reply(whole[len(whole) // 2:])

    if wire == "openai":  # structured output is JSON text: the cut-off text is continued
        steps, expected = [cut, rest], ["synthesise", "continue"]
    else:  # JSON mode is a forced tool call, which arrives cut off with an empty input: nothing to continue
        steps, expected = [cut, cut, rest], ["synthesise", "unstructured", "continue"]
    synthesis, server = _synthesise(tmp_path, Senior({"mad:rogers": steps}), spec_and_plan, wire=wire)
    exchanges = _exchanges(synthesis, "mad:rogers")
    assert [e.purpose for e in exchanges] == expected
    assert "class Rogers(Mad)" in synthesis.files["madgroup/mads/rogers.py"]
    asked = [r for r in server.requests if unit_of(r) == "mad:rogers"]
    assert _unit(synthesis, "mad:rogers").rounds == 1, "a continuation or a re-ask is not a repair round"
    if wire == "anthropic":
        assert asked[0]["tool_choice"]["type"] == "tool" and "tools" not in asked[1], "asked again as plain JSON text"
        assert exchanges[0].reply.finish_reason == "length" and exchanges[0].reply.content == "{}"


def _answer_with(path: str, content: str):
    return lambda body: Reply(json.dumps({"files": [{"path": path, "content": content}]}))


@pytest.mark.parametrize(
    "bad, problem",
    [
        (Reply(""), "the answer was empty"),
        (Reply("Sure, here is the code!"), 'the answer is not {"files"'),
        (_answer_with("../outside.py", "x = 1\n"), "must stay inside the tree"),
        (_answer_with("/etc/cron.d/evil", "* * * * * root true\n"), "absolute paths are not allowed"),
        (_answer_with(".git/config", "[core]\n"), "nothing may be written under .git"),
        (_answer_with("madgroup/mads/turing.py", "def broken(:\n"), "does not parse"),
        (_answer_with("madgroup/mads/turing.py", "x" * (5 * 1024 * 1024)), "over the"),
    ],
    ids=["empty", "prose", "traversal", "absolute", "dot-git", "no-parse", "oversized"],
)
def test_a_bad_answer_gets_a_focused_repair_round(tmp_path, spec_and_plan, bad, problem, wire):
    synthesis, server = _synthesise(tmp_path, Senior({"mad:turing": [bad]}), spec_and_plan, wire=wire)
    rounds = _exchanges(synthesis, "mad:turing")
    assert [e.purpose for e in rounds] == ["synthesise", "repair"]
    repair_prompt = rounds[1].request.messages[-1]["content"]
    assert problem in repair_prompt and "Fix exactly these problems" in repair_prompt
    assert _unit(synthesis, "mad:turing").rounds == 2


def test_the_same_failure_twice_stops_early(tmp_path, spec_and_plan, wire):
    bad = _answer_with("madgroup/mads/turing.py", "def broken(:\n")
    senior = Senior({"mad:turing": [bad] * 10})
    with pytest.raises(BuildFailed, match="repeated the same failure in round 1; stopped early"):
        _synthesise(tmp_path, senior, spec_and_plan, repair_rounds=5, wire=wire)
    assert senior.asked.count("mad:turing") == 2


def test_a_loop_that_never_converges_stops_at_the_round_limit(tmp_path, spec_and_plan, wire):
    different = [_answer_with("madgroup/mads/turing.py", "\n" * n + "def broken(:\n") for n in range(10)]
    senior = Senior({"mad:turing": different})
    with pytest.raises(BuildFailed, match=r"still rejected after 2 repair round\(s\)"):
        _synthesise(tmp_path, senior, spec_and_plan, repair_rounds=2, wire=wire)
    assert senior.asked.count("mad:turing") == 3


def test_a_budget_stops_the_run_before_the_call_that_would_cross_it(tmp_path, spec_and_plan, wire):
    different = [_answer_with("madgroup/mads/turing.py", "\n" * n + "def broken(:\n") for n in range(10)]
    senior = Senior({"mad:turing": different})
    with pytest.raises(OverBudget, match="unit mad:turing's token budget of 45,000 tokens") as err:
        _synthesise(tmp_path, senior, spec_and_plan, extra="[budgets]\nunit_tokens = 45000\n", repair_rounds=9, wire=wire)
    message = str(err.value)
    committed = int(message.split("tokens (")[1].split(" tokens spent")[0].replace(",", ""))
    this_call = int(message.split("+ up to ")[1].split(" tokens")[0].replace(",", ""))
    assert committed <= 45000 < committed + this_call, "stopped exactly when the next call could cross it"
    assert "Spent in this run:" in message and "nothing was archived" in message
    assert senior.asked.count("mad:turing") < 10, "stopped by the budget, long before the round limit"


def test_without_the_key_the_build_fails_at_once_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY)
    pipeline = write_pipeline(tmp_path, "http://127.0.0.1:9/v1")
    done = subprocess.run(REGEN + ["regenerate", "--pipeline", str(pipeline), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"needs the environment variable {KEY}, which is not set" in done.stderr
    assert not (tmp_path / "out").exists()


def test_frontier_pipeline_without_keys_names_the_missing_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    done = subprocess.run(REGEN + ["regenerate", "--pipeline", "pipelines/frontier.toml", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "needs the environment variable" in done.stderr and "_API_KEY" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_unit_over_the_context_window_stops_the_build_with_the_numbers(tmp_path, spec_and_plan, wire):
    spec, plan = spec_and_plan
    with ScriptedServer(Senior()) as server:
        path = write_pipeline(tmp_path, server.api_base(wire), wire=wire)
        path.write_text(path.read_text().replace("context_window = 1000000", "context_window = 20000"))
        with pytest.raises(UserError, match=rf"unit frame needs [\d,]+ tokens .* over {wire}/scripted's window of 20,000 by"):
            regenerate(BuildContext(options=RunOptions(spec_dir=REPO / "spec", pipeline_file=path, out_dir=tmp_path / "out"),
                                    report=Reporter(quiet=True)))
        assert server.requests == []


@pytest.mark.slow
def test_a_scripted_build_is_archived_cached_and_verified_without_the_server(tmp_path):
    """The acceptance story: build over HTTP, rerun (up to date), rebuild from cache (0 tokens),
    verify with the server stopped, replay on a machine without the key."""
    senior = Senior({"mad:grace": [_failing_grace_tests]})
    env = dict(os.environ, **{KEY: "sk-scripted"})
    spec = repo_spec(tmp_path / "spec", CORE_MADS)
    with ScriptedServer(senior) as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        build = REGEN + ["regenerate", "--spec", str(spec), "--pipeline", str(pipeline)]
        first = subprocess.run(build + ["--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
        assert first.returncode == 0, first.stderr
        assert "repair" in first.stderr and "mad:grace (2 rounds)" in first.stderr
        asked = len(server.requests)
        again = subprocess.run(build + ["--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0 and "Up to date" in again.stderr and len(server.requests) == asked
        cached = subprocess.run(build + ["--out", "out2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert cached.returncode == 0, cached.stderr
        assert "5 answered from cache or a recorded build" in cached.stderr and len(server.requests) == asked

    artifact = tmp_path / "out" / "madgroup" / "1.0.0"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["offline"] is False and manifest["tokens"]["prompt"] > 0 and manifest["cost_usd"] > 0
    grace = next(u for u in manifest["units"] if u["unit"] == "mad:grace")
    assert grace["rounds"] == 2
    transcript = [json.loads(line) for line in (artifact / "transcript.jsonl").read_text().splitlines()]
    assert [(t["unit"], t["purpose"]) for t in transcript if t["unit"] == "mad:grace"] == [
        ("mad:grace", "synthesise"), ("mad:grace", "repair-tests")
    ]
    assert len(transcript) == asked == 6  # five units, and grace answered twice

    no_key = {k: v for k, v in env.items() if k != KEY}
    verified = subprocess.run(REGEN + ["verify", str(artifact), "--spec", str(spec)], cwd=tmp_path,
                              env=no_key, capture_output=True, text=True, timeout=600)
    assert verified.returncode == 0, verified.stderr
    assert "reproduced byte for byte" in verified.stdout
    tampered = tmp_path / "tampered"
    shutil.copytree(artifact, tampered)
    with (tampered / "src" / "madgroup" / "mads" / "grace.py").open("a") as f:
        f.write("# edited by hand\n")
    refused = subprocess.run(REGEN + ["verify", str(tampered), "--spec", str(spec)], cwd=tmp_path,
                             env=no_key, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1
    assert "NOT reproduced: 1 file(s) differ, first madgroup/mads/grace.py" in refused.stderr
    shutil.rmtree(tampered)
    replayed = subprocess.run(REGEN + ["regenerate", "--spec", str(spec), "--replay", str(artifact),
                                       "--out", "out3"], cwd=tmp_path, env=no_key, capture_output=True, text=True,
                              timeout=600)
    assert replayed.returncode == 0, replayed.stderr
    rebuilt = json.loads((tmp_path / "out3" / "madgroup" / "1.0.0" / "manifest.json").read_text())
    # The answers' times come from the transcript in a replay: the same unit records, the same report.html.
    assert all("elapsed_s" in t for t in transcript) and all("elapsed_s" in u for u in manifest["units"])
    assert rebuilt["units"] == manifest["units"]
    assert (tmp_path / "out3" / "madgroup" / "1.0.0" / "report.html").read_bytes() == (artifact / "report.html").read_bytes()
    src = {k: v for k, v in manifest["outputs"].items() if k.startswith("src/")}
    assert {k: v for k, v in rebuilt["outputs"].items() if k.startswith("src/")} == src
    assert versions(tmp_path / "out" / "madgroup") == ["1.0.0"]
    shutil.rmtree(tmp_path / "out2")
    # Nothing but the archives and the response cache was written.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".regen", "out", "out3", "scripted.toml", "spec"]
    assert sorted(p.name for p in (tmp_path / "out" / "madgroup").iterdir() if not p.name.startswith(".lock")) == ["1.0.0"]


def _failing_grace_tests(body):
    answer = json.loads(reference_answer(body))
    for f in answer["files"]:
        if f["path"] == "tests/test_grace.py":
            f["content"] += "\n\ndef test_not_yet_right():\n    assert False, 'grace is not done'\n"
    return Reply(json.dumps(answer))


def test_units_run_concurrently_bounded_and_come_out_in_plan_order(tmp_path, spec_and_plan, wire):
    import threading

    spec, plan = spec_and_plan
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    class Counting(LiteLLMClient):
        def complete(self, request, reserve=None):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            try:
                return super().complete(request, reserve)
            finally:
                with lock:
                    state["now"] -= 1

    def slow(body):  # the first unit answers last
        return Reply(reference_answer(body), delay=0.6 if unit_of(body) == plan.units[0].name else 0.3)

    with ScriptedServer(slow) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), wire=wire))  # concurrency = 3
        client = Counting(pipeline.senior, pipeline.prices)
        synthesis = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens).synthesise()
    assert state["most"] == 3
    order = [u.name for u in plan.units]
    assert order == [f"mad:{name}" for name in plan.startup_order] + ["frame"]
    assert [u.unit for u in synthesis.units] == order
    assert [e.request.unit for e in synthesis.exchanges] == order


def test_concurrent_units_cannot_all_squeeze_under_one_budget(tmp_path, spec_and_plan, wire):
    """Every call reserves its worst case first, so five units in flight at once still stop in time."""
    with pytest.raises(OverBudget, match="the run's token budget of 80,000 tokens"):
        _synthesise(tmp_path, Senior(), spec_and_plan, extra="[budgets]\nrun_tokens = 80000\n", wire=wire)


def test_a_cost_budget_uses_the_price_table_before_each_call(tmp_path, spec_and_plan, wire):
    # $1 in / $4 out per million: one call's worst case is about 5k prompt + 32k answer = $0.133.
    with pytest.raises(OverBudget, match=r"the run's cost budget of \$0\.2000") as err:
        _synthesise(tmp_path, Senior(), spec_and_plan, extra="[budgets]\nrun_cost_usd = 0.2\n", wire=wire)
    spent = float(re.search(r"Spent in this run: [\d,]+ tokens, \$(\d+\.\d+)", str(err.value)).group(1))
    assert spent <= 0.2


def test_retry_after_is_honoured(tmp_path, spec_and_plan, wire):
    spec, plan = spec_and_plan
    slept = []
    with ScriptedServer(Senior({"mad:turing": [Fault.status(429, headers={"Retry-After": "7"})]})) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), wire=wire))
        client = LiteLLMClient(pipeline.senior, pipeline.prices, sleep=slept.append)
        SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens).synthesise()
    assert slept and slept[0] == 7.0  # the server's wait, longer than our 0.01 s backoff


def test_only_accepted_answers_are_cached(tmp_path, spec_and_plan, wire):
    """A rejected answer must not come back on the next run; the accepted repair must."""
    from generator.senior.cache import ResponseCache

    spec, plan = spec_and_plan
    bad = _answer_with("madgroup/mads/turing.py", "def broken(:\n")
    senior = Senior({"mad:turing": [bad]})
    cache = ResponseCache(tmp_path / "cache")
    with ScriptedServer(senior) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), wire=wire))
        client = LiteLLMClient(pipeline.senior, pipeline.prices)
        first = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens, cache).synthesise()
        asked = len(server.requests)
        again = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens, cache).synthesise()
    assert asked == len(plan.units) + 1 and len(server.requests) == len(plan.units) + 2, \
        "only turing's first, rejected, request is asked again"
    assert _unit(first, "mad:turing").rounds == 2 and _unit(again, "mad:turing").rounds == 1
    assert again.files == first.files
    assert all(u.cached for u in again.units if u.unit != "mad:turing")


def test_a_conversation_that_grows_past_the_window_stops_before_the_provider_refuses(tmp_path, spec_and_plan, wire):
    spec, plan = spec_and_plan
    huge = _answer_with("madgroup/mads/turing.py", "def broken(:\n" + "# padding\n" * 40_000)
    with ScriptedServer(Senior({"mad:turing": [huge]})) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), wire=wire))
        client = LiteLLMClient(pipeline.senior, pipeline.prices)
        run = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens, window=80_000)
        with pytest.raises(BuildFailed, match="unit mad:turing: its conversation has grown to .* over the senior's window of 80,000"):
            run.synthesise()
    assert [unit_of(r) for r in server.requests].count("mad:turing") == 1, "the oversized repair was never sent"


# --- failures a user can act on, fallbacks, prices ------------------------------------------


@pytest.mark.parametrize(
    "fault, expected",
    [
        (Fault.status(401), "HTTP 401: the key in SCRIPTED_API_KEY was refused; check it is current"),
        (Fault.status(403), "HTTP 403: the key in SCRIPTED_API_KEY was refused"),
        (Fault.status(404), "HTTP 404: the model name 'scripted' is unknown to the provider at http://127.0.0.1:"),
        (Fault.status(400, {"error": {"message": "max_tokens: too large"}}), "HTTP 400: the provider refused the request"),
        (Fault.status(429), "HTTP 429: rate-limited after 4 tries over"),
        (Fault.status(502), "HTTP 502: the provider failed after 4 tries over"),
        (Fault.slow(3, then=Reply("{}")), "no answer within 2s (timeout_seconds) after 4 tries over"),
        (Fault.disconnect(), "was dropped before an answer, after 4 tries over"),
        (Fault.raw(b'{"id": "x", "choi'), "the provider's response could not be read, after 4 tries over"),
    ],
    ids=["401", "403", "404", "400", "429", "502", "timeout", "dropped", "broken-body"],
)
def test_a_failure_names_the_http_status_and_what_to_do(tmp_path, spec_and_plan, wire, fault, expected):
    events: list = []
    with pytest.raises(BuildFailed) as err:
        _synthesise(tmp_path, Senior({"mad:turing": [fault] * 10}), spec_and_plan, timeout=2, repair_rounds=0,
                    wire=wire, events=events)
    message = str(err.value)
    assert message.startswith(f"unit mad:turing: {wire}/scripted: ") and expected in message, message
    assert "litellm" not in message.lower() and "proxy" not in message
    gave_up = [e for e in events if e.event == "gave_up"]
    assert len(gave_up) == 1 and gave_up[0].message in message
    # A refusal is not retried: the same request would be refused again. Everything else is.
    retried = [e for e in events if e.event == "retry"]
    assert len(retried) == (0 if fault_kind(fault) == "refused" else 3)


def fault_kind(fault) -> str:
    return "refused" if getattr(fault, "code", 0) in (400, 401, 403, 404) else "transient"


def test_a_connection_refused_names_the_api_base(tmp_path, spec_and_plan, wire):
    spec, plan = spec_and_plan
    pipeline = load_pipeline(write_pipeline(tmp_path, "http://127.0.0.1:9", wire=wire))
    client = LiteLLMClient(pipeline.senior, pipeline.prices, sleep=lambda s: None)
    run = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens)
    with pytest.raises(BuildFailed, match=r"connection refused to http://127\.0\.0\.1:9 after 4 tries"):
        run.synthesise()


@pytest.mark.parametrize("refusal", [Fault.status(401), Fault.status(400), Fault.status(404)], ids=["401", "400", "404"])
def test_a_refused_senior_is_never_fatal_before_the_fallback_is_tried(tmp_path, spec_and_plan, wire, refusal):
    spec, plan = spec_and_plan
    events: list = []

    def refuse_the_senior(body):
        return refusal if body["model"] == "scripted" else Reply(reference_answer(body))

    with ScriptedServer(refuse_the_senior) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), fallbacks=("openai/backup",), wire=wire))
        client = LiteLLMClient(pipeline.senior, pipeline.prices, on_event=events.append)
        synthesis = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens,
                                 price=lambda model: price_per_token(model, pipeline.prices)).synthesise()
    asked = [r["model"] for r in server.requests]
    units = len(plan.units)
    assert asked.count("scripted") == units and asked.count("backup") == units, "one try each: a refusal is not retried"
    assert all(u.fallbacks == 1 and u.retries == 0 for u in synthesis.units)
    falls = [e for e in events if e.event == "fallback"]
    assert len(falls) == units and {(e.model, e.to_model) for e in falls} == {(f"{wire}/scripted", f"{wire}/backup")}
    assert all(f"HTTP {refusal.code}" in e.message for e in falls)
    # Charged at the fallback's own price: $2 in, $8 out per million tokens.
    for unit in synthesis.units:
        assert unit.cost_usd == pytest.approx((2 * unit.prompt_tokens + 8 * unit.completion_tokens) / 1e6, abs=1e-6)


def test_a_fallback_is_reserved_at_its_own_price(tmp_path, spec_and_plan, wire):
    """The senior's worst case ($1/$4 per Mtok: ~$0.13) fits a $0.20 unit budget; the fallback's ($2/$8: ~$0.27)
    does not, so when the senior is down the fallback is never called."""
    spec, plan = spec_and_plan

    def down_for_turing(body):
        if unit_of(body) == "mad:turing" and body["model"] == "scripted":
            return Fault.status(503)
        return Reply(reference_answer(body))

    with ScriptedServer(down_for_turing) as server:
        path = write_pipeline(tmp_path, server.api_base(wire), "[budgets]\nunit_cost_usd = 0.2\n",
                              fallbacks=("openai/backup",), wire=wire)
        pipeline = load_pipeline(path)
        client = LiteLLMClient(pipeline.senior, pipeline.prices, sleep=lambda s: None)
        run = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens,
                           price=lambda model: price_per_token(model, pipeline.prices))
        with pytest.raises(OverBudget, match=r"unit mad:turing's cost budget of \$0\.2000") as err:
            run.synthesise()
    assert f"It was to be the fallback {wire}/backup, after: {wire}/scripted: HTTP 503" in str(err.value)
    assert not any(unit_of(r) == "mad:turing" and r["model"] == "backup" for r in server.requests)


def test_a_cost_budget_refuses_to_start_with_a_model_of_unknown_price(tmp_path, wire):
    with ScriptedServer(Senior()) as server:
        path = write_pipeline(tmp_path, server.api_base(wire), "[budgets]\nrun_cost_usd = 5.0\n",
                              fallbacks=("openai/unpriced",), wire=wire)
        options = RunOptions(spec_dir=REPO / "spec", pipeline_file=path, out_dir=tmp_path / "out")
        with pytest.raises(UserError, match=rf'no price is known for a fallback {wire}/unpriced.*'
                                            rf'Add \[prices\."{wire}/unpriced"\]'):
            regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
        # Budgets in tokens only need no price: the run gets past the check (and stops at the window here).
        path.write_text(path.read_text().replace("run_cost_usd = 5.0", "run_tokens = 500000")
                        .replace("context_window = 1000000", "context_window = 1000"))
        with pytest.raises(UserError, match="over .* window of 1,000"):
            regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
        assert server.requests == []


def test_an_empty_key_is_told_apart_from_a_missing_one(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY, "  ")
    pipeline = write_pipeline(tmp_path, "http://127.0.0.1:9/v1")
    options = RunOptions(spec_dir=REPO / "spec", pipeline_file=pipeline, out_dir=tmp_path / "out")
    with pytest.raises(UserError, match=f"needs the environment variable {KEY}, which is set but empty"):
        regenerate(BuildContext(options=options, report=Reporter(quiet=True)))


@pytest.mark.parametrize("seed_line, sent", [("", 0), ("seed = 7", 7), ("seed = false", None)])
def test_the_seed_is_sent_where_taken_and_can_be_switched_off(tmp_path, wire, seed_line, sent):
    from generator.senior.models import ModelRequest

    with ScriptedServer([Reply("{}")]) as server:
        path = write_pipeline(tmp_path, server.api_base(wire), wire=wire)
        path.write_text(path.read_text().replace("max_tokens = 32000", f"max_tokens = 32000\n{seed_line}"))
        pipeline = load_pipeline(path)
        request = ModelRequest.for_unit("probe", pipeline.senior, [{"role": "user", "content": "hi"}])
        LiteLLMClient(pipeline.senior, pipeline.prices).complete(request)
    body = server.requests[0]
    if wire == "anthropic":  # Anthropic takes no seed at all: never sent, whatever the pipeline says
        assert "seed" not in body
    else:
        assert body.get("seed") == sent


def test_a_misspelt_provider_is_named_with_the_nearest_before_any_call(tmp_path):
    with ScriptedServer(Senior()) as server:
        path = write_pipeline(tmp_path, server.api_base("anthropic"), wire="antropic")
        options = RunOptions(spec_dir=REPO / "spec", pipeline_file=path, out_dir=tmp_path / "out")
        with pytest.raises(UserError, match=rf"{re.escape(str(path))}: litellm knows no provider 'antropic' "
                                            r"\(model 'antropic/scripted'\); did you mean 'anthropic'"):
            regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
        assert server.requests == []


def test_what_litellm_would_refuse_to_send_is_left_out_not_fatal(tmp_path):
    """OpenAI's o-series take only temperature 1: the pipeline's 0.0 is not sent (and the manifest would say so)."""
    from generator.senior.client import left_out
    from generator.senior.models import ModelRequest

    assert left_out("openai/o3", 0.0, 0) == ("temperature",)
    assert left_out("anthropic/claude-sonnet-4-5", 0.0, 0) == ("seed",)
    assert left_out("openai/gpt-4.1", 0.0, 0) == ()
    with ScriptedServer([Reply("{}")]) as server:
        path = write_pipeline(tmp_path, server.base_url)
        pipeline = load_pipeline(path)
        senior = pipeline.senior.model_copy(update={"model": "openai/o3"})
        request = ModelRequest.for_unit("probe", senior, [{"role": "user", "content": "hi"}])
        LiteLLMClient(senior, pipeline.prices).complete(request)
    assert "temperature" not in server.requests[0] and server.requests[0]["seed"] == 0


def test_a_local_openai_compatible_server_needs_no_key(tmp_path, monkeypatch):
    from generator.senior.client import missing_key
    from generator.senior.models import ModelRequest

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ScriptedServer([Reply("{}")]) as server:
        path = write_pipeline(tmp_path, server.base_url)
        path.write_text(path.read_text().replace(f'api_key_env = "{KEY}"\n', ""))
        senior = load_pipeline(path).senior
        assert senior.api_key_env is None and missing_key(senior) is None
        LiteLLMClient(senior).complete(ModelRequest.for_unit("probe", senior, [{"role": "user", "content": "hi"}]))
    assert server.headers[0]["authorization"].startswith("Bearer ")


def test_every_retry_and_fallback_is_on_screen_and_in_the_run_log(tmp_path, spec_and_plan, wire):
    """429 with Retry-After, then 500, then an answer for one unit; a refused senior and its fallback for another."""
    import io

    from rich.console import Console

    from generator.senior.runlog import RunLog

    spec, plan = spec_and_plan
    queues = {("mad:turing", "scripted"): [Fault.status(429, headers={"Retry-After": "1"}), Fault.status(500)],
              ("mad:grace", "scripted"): [Fault.status(401)]}

    def script(body):
        queue = queues.get((unit_of(body), body["model"]))
        return queue.pop(0) if queue else Reply(reference_answer(body))

    screen = io.StringIO()
    log = RunLog(Reporter(console=Console(file=screen, width=500, color_system=None)))
    log.start(tmp_path / "runs" / "madgroup" / "1.0.0.jsonl")
    with ScriptedServer(script) as server:
        pipeline = load_pipeline(write_pipeline(tmp_path, server.api_base(wire), fallbacks=("openai/backup",), wire=wire))
        client = LiteLLMClient(pipeline.senior, pipeline.prices, on_event=log.record)
        synthesis = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), count_tokens).synthesise()
    turing, grace = _unit(synthesis, "mad:turing"), _unit(synthesis, "mad:grace")
    assert (turing.retries, turing.fallbacks, grace.retries, grace.fallbacks) == (2, 0, 0, 1)
    assert turing.latency_ms >= 1000, "the unit's time includes the wait the server asked for"
    shown = screen.getvalue()
    assert f"mad:turing: {wire}/scripted HTTP 429, retry 1 in 1.0s" in shown
    assert f"mad:turing: {wire}/scripted HTTP 500, retry 2 in " in shown
    assert f"mad:grace: {wire}/scripted gave up: HTTP 401: the key in {KEY} was refused" in shown
    assert f"mad:grace: falling back from {wire}/scripted to {wire}/backup" in shown
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    turing_events = [e for e in lines if e["unit"] == "mad:turing"]
    assert [(e["event"], e.get("status")) for e in turing_events] == [("retry", 429), ("retry", 500), ("answered", None)]
    assert turing_events[0]["wait_s"] == 1.0 and turing_events[1]["wait_s"] >= 0
    assert [(e["event"], e.get("to_model")) for e in lines if e["unit"] == "mad:grace"] == [
        ("gave_up", None), ("fallback", f"{wire}/backup"), ("answered", None)]
    answered = {e["unit"]: e for e in lines if e["event"] == "answered"}
    assert answered["mad:turing"]["attempt"] == 3 and answered["mad:grace"]["model"] == f"{wire}/backup"
    assert all(e["time"].endswith("+00:00") for e in lines)


def test_the_response_cache_keeps_answers_whole_and_never_fails_the_build(tmp_path):
    from generator.senior.cache import ResponseCache
    from generator.senior.models import ModelReply

    cache = ResponseCache(tmp_path / "cache")
    reply = ModelReply(content='{"files": []}', model="openai/scripted-senior", prompt_tokens=7, cached=True)
    cache.put("ab" * 32, reply)
    assert cache.get("ab" * 32) == reply.model_copy(update={"cached": False})  # cached=True is said on the way out
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [f"{'ab' * 32}.json"]  # no temporaries
    (tmp_path / "cache" / "ab" / f"{'ab' * 32}.json").write_text('{"content": ')  # damaged: a miss, and it goes
    assert cache.get("ab" * 32) is None and not list((tmp_path / "cache").rglob("*.json"))
    (tmp_path / "blocked").write_text("not a folder")
    ResponseCache(tmp_path / "blocked").put("cd" * 32, reply)  # nowhere to write: costs tokens later, not the build
    assert ResponseCache(tmp_path / "blocked").get("cd" * 32) is None
