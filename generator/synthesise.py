"""Stage 3, synthesise: one conversation with the senior per unit, every answer checked.

The prompts are jinja2 templates in `generator/prompts/`. The unit's spec travels in
the prompt as JSON between `<unit-spec>` tags, which is all any model, the offline
reference included, gets to know about the unit. A unit's conversation is:

    ask → (cut off? continue, up to 3 times) → parse + check
        → rejected? a repair request with the exact problems, up to `repair_rounds`
        → the same problems twice in a row? stop early: more rounds would only burn tokens

Units run concurrently (bounded by `concurrency`); results, files and the transcript
come out in plan order whatever finished first. Every call is charged to the budgets
first: a call that could cross one is never made.
"""

from __future__ import annotations

import ast
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from . import check
from .config import Budgets, Pipeline
from .errors import BuildFailed
from .kernel.capabilities import CAPABILITIES
from .llm import Answer, AnswerRejected, Exchange, ModelClient, ModelReply, ModelRequest, parse_answer
from .plan import Plan, Unit
from .render import environment
from .spec import MadSpec, Spec, Tool

MAX_CONTINUATIONS = 3
KERNEL = Path(__file__).parent / "kernel"


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnitResult(Frozen):
    unit: str
    request_hash: str
    files: tuple[str, ...]
    rounds: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: int
    cached: bool


class UnitOutcome(Frozen):
    """A unit's accepted answer and the conversation that led to it (kept for test repairs)."""

    result: UnitResult
    files: dict[str, str]
    messages: tuple[dict[str, str], ...]
    answer: str
    exchanges: tuple[Exchange, ...]


class Synthesis(Frozen):
    files: dict[str, str]
    """Every synthesised file, by its path relative to src/."""
    units: tuple[UnitResult, ...]
    exchanges: tuple[Exchange, ...]
    outcomes: tuple[UnitOutcome, ...]


class BudgetExceeded(BuildFailed):
    """The next call could cross a budget; the run stops before making it."""


class Spend:
    """Tokens and dollars spent, per run and per unit; checked before every call."""

    def __init__(self, budgets: Budgets):
        self.budgets = budgets
        self.tokens = 0
        self.cost_usd = 0.0
        self.by_unit: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def reserve(self, unit: str, worst_case_tokens: int) -> None:
        """Raise BudgetExceeded if a call of up to `worst_case_tokens` could cross a budget."""
        b = self.budgets
        with self._lock:
            unit_tokens, unit_cost = self.by_unit.get(unit, (0, 0.0))
            tokens = [("the run's token budget", b.run_tokens, self.tokens), (f"unit {unit}'s token budget", b.unit_tokens, unit_tokens)]
            dollars = [("the run's cost budget", b.run_cost_usd, self.cost_usd), (f"unit {unit}'s cost budget", b.unit_cost_usd, unit_cost)]
            for what, limit, spent in tokens:
                if limit is not None and spent + worst_case_tokens > limit:
                    self._stop(unit, f"{what} of {limit} tokens ({spent} spent + up to {worst_case_tokens} for this call)")
            for what, limit, spent in dollars:
                if limit is not None and spent >= limit:  # any further call costs something
                    self._stop(unit, f"{what} of ${limit} (${spent:.4f} spent)")

    def _stop(self, unit: str, why: str) -> None:
        raise BudgetExceeded(
            f"stopped before the next call for unit {unit}: it could cross {why}. "
            f"Spent in this run: {self.tokens} tokens, ${self.cost_usd:.4f}. "
            "Raise [budgets] in the pipeline file to go on; nothing was archived."
        )

    def charge(self, unit: str, reply: ModelReply) -> None:
        if reply.cached:
            return
        with self._lock:
            self.tokens += reply.tokens
            self.cost_usd += reply.cost_usd
            tokens, cost = self.by_unit.get(unit, (0, 0.0))
            self.by_unit[unit] = (tokens + reply.tokens, cost + reply.cost_usd)


# --- prompts ------------------------------------------------------------------------------


# The kernel classes generated code programs against, by source file.
KERNEL_API = (("mad.py", "Mad"), ("db.py", "TableStore"))


@cache
def kernel_api() -> str:
    """The public API of the kernel, read from its own source, so the prompt cannot drift."""
    lines = []
    for filename, class_name in KERNEL_API:
        tree = ast.parse((KERNEL / filename).read_text(encoding="utf-8"))
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
        lines.append(f"`{class_name}`: {(ast.get_docstring(cls) or '').splitlines()[0]}")
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
                doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0].replace("\n", " ")
                signature = f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"
                lines.append(f"- `{signature}`" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


def _tool_json(tool: Tool) -> dict:
    # Parameters as a list: their order is the signature's, and JSON objects get sorted.
    # A parameter carries "default" only when it has one: absence means required.
    data = tool.model_dump(mode="json", exclude={"params"})
    data["params"] = [
        {"name": name} | p.model_dump(mode="json", exclude=set() if p.optional else {"default"})
        for name, p in tool.params.items()
    ]
    return data


def _mad_json(mad: MadSpec) -> dict:
    return mad.model_dump(mode="json", exclude={"tools"}) | {
        "class_name": mad.class_name,
        "tools": [_tool_json(t) for t in mad.tools],
    }


def _interface(mad: MadSpec) -> dict:
    return {"name": mad.name, "class_name": mad.class_name, "role": mad.role, "tools": [_tool_json(t) for t in mad.tools]}


def unit_spec(spec: Spec, plan: Plan, unit: Unit) -> dict:
    """What a model needs to know to write `unit`, and no more (prompts grow with what they carry)."""
    data = {
        "unit": unit.name,
        "kind": unit.kind,
        "package": plan.package,
        "owns": list(unit.owns),
        "startup_order": list(plan.startup_order),
        "ecosystem": spec.ecosystem.model_dump(mode="json"),
        # Which tool serves each kernel capability: tests use it to set up what they need.
        "capability_tools": {
            t.builtin: f"{m.name}.{t.name}" for m in spec.mads for t in m.tools if t.builtin
        },
    }
    if unit.mad:
        mad = spec.mad(unit.mad)
        data["mad"] = _mad_json(mad)
        data["interfaces"] = [_interface(spec.mad(n)) for n in plan.startup_order if n in mad.talks_to]
    else:
        data["mads"] = [_mad_json(spec.mad(n)) for n in plan.startup_order]
    return data


def prompt_messages(spec: Spec, plan: Plan, unit: Unit) -> list[dict[str, str]]:
    env = environment("prompts")
    system = env.get_template("system.md.j2").render(
        requirements=spec.requirements.strip(),
        principles=spec.principles.strip(),
        rules=spec.ecosystem.principles,
        package=plan.package,
        capabilities=list(CAPABILITIES.values()),
        kernel_api=kernel_api(),
        answer_schema=json.dumps(Answer.model_json_schema(), sort_keys=True),
    )
    user = env.get_template("unit.md.j2").render(
        unit=unit,
        package=plan.package,
        startup_order=plan.startup_order,
        unit_spec=json.dumps(unit_spec(spec, plan, unit), sort_keys=True, indent=1),
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def repair_message(problems: list[str], kind: str) -> str:
    return environment("prompts").get_template("repair.md.j2").render(problems=problems, kind=kind)


CONTINUE = (
    "Your answer was cut off by the output limit. Continue exactly where it stopped: "
    "no repetition, no commentary, only the rest of the JSON."
)


def first_request(spec: Spec, plan: Plan, unit: Unit, pipeline: Pipeline) -> ModelRequest:
    return ModelRequest.for_unit(
        unit.name, pipeline.senior, prompt_messages(spec, plan, unit), Answer.model_json_schema()
    )


# --- the unit conversation ------------------------------------------------------------------


class _Conversation:
    def __init__(self, unit: Unit, pipeline: Pipeline, client: ModelClient, spend: Spend, estimate: Callable):
        self.unit = unit
        self.pipeline = pipeline
        self.client = client
        self.spend = spend
        self.estimate = estimate
        self.exchanges: list[Exchange] = []

    def ask(self, messages: list[dict[str, str]], round_: int, purpose: str) -> tuple[ModelRequest, ModelReply]:
        """One answer, continued while it is cut off; returns the first request and the whole reply."""
        first = None
        content = ""
        totals = ModelReply(content="")
        for attempt in range(MAX_CONTINUATIONS + 1):
            request = ModelRequest.for_unit(
                self.unit.name, self.pipeline.senior, messages, Answer.model_json_schema()
            )
            first = first or request
            self.spend.reserve(self.unit.name, self.estimate(request) + request.max_tokens)
            reply = self.client.complete(request)
            self.spend.charge(self.unit.name, reply)
            self.exchanges.append(
                Exchange(request=request, reply=reply, round=round_, purpose=purpose if attempt == 0 else "continue")
            )
            content += reply.content
            totals = totals.model_copy(update={
                "content": content,
                "model": reply.model,
                "finish_reason": reply.finish_reason,
                "prompt_tokens": totals.prompt_tokens + reply.prompt_tokens,
                "completion_tokens": totals.completion_tokens + reply.completion_tokens,
                "cost_usd": totals.cost_usd + reply.cost_usd,
                "latency_ms": totals.latency_ms + reply.latency_ms,
                "cached": reply.cached if attempt == 0 else totals.cached and reply.cached,
            })
            if reply.finish_reason != "length":
                return first, totals
            messages = [*messages, {"role": "assistant", "content": reply.content}, {"role": "user", "content": CONTINUE}]
        return first, totals  # still cut off: parse_answer rejects it, never half a file

    def converse(
        self, spec: Spec, plan: Plan, messages: list[dict[str, str]], purpose: str, first_round: int = 0
    ) -> UnitOutcome:
        """Ask, check, repair until accepted or out of rounds; raises BuildFailed when it gives up."""
        last_problems: list[str] | None = None
        first_request = None
        for round_ in range(first_round, first_round + self.pipeline.repair_rounds + 1):
            request, reply = self.ask(messages, round_, purpose if round_ == first_round else "repair")
            first_request = first_request or request
            try:
                if reply.finish_reason == "length":
                    raise AnswerRejected(self.unit.name, [
                        f"the answer was still cut off after {MAX_CONTINUATIONS} continuations: write shorter files"
                    ])
                answer = parse_answer(self.unit.name, reply)
                check.answer(spec, plan, self.unit, answer)
            except AnswerRejected as rejected:
                if rejected.problems == last_problems:
                    raise BuildFailed(
                        f"unit {self.unit.name} repeated the same failure in round {round_}; stopped early "
                        "rather than spend more:\n  " + "\n  ".join(rejected.problems)
                    )
                last_problems = rejected.problems
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply.content[:20_000]},
                    {"role": "user", "content": repair_message(rejected.problems, "check")},
                ]
                continue
            files = {f.path: f.content for f in answer.files}
            mine = list(self.exchanges)
            result = UnitResult(
                unit=self.unit.name,
                request_hash=first_request.hash,
                files=tuple(sorted(files)),
                rounds=round_ + 1,
                prompt_tokens=sum(e.reply.prompt_tokens for e in mine if not e.reply.cached),
                completion_tokens=sum(e.reply.completion_tokens for e in mine if not e.reply.cached),
                cost_usd=round(sum(e.reply.cost_usd for e in mine if not e.reply.cached), 6),
                latency_ms=sum(e.reply.latency_ms for e in mine),
                cached=all(e.reply.cached for e in mine),
            )
            return UnitOutcome(
                result=result, files=files, messages=tuple(messages), answer=reply.content, exchanges=tuple(mine)
            )
        raise BuildFailed(
            f"unit {self.unit.name} was still rejected after {self.pipeline.repair_rounds} repair round(s):\n  "
            + "\n  ".join(last_problems or [])
        )


def _collect(outcomes: list[UnitOutcome]) -> Synthesis:
    files: dict[str, str] = {}
    for outcome in outcomes:
        files.update(outcome.files)
    return Synthesis(
        files=dict(sorted(files.items())),
        units=tuple(o.result for o in outcomes),
        exchanges=tuple(e for o in outcomes for e in o.exchanges),
        outcomes=tuple(outcomes),
    )


def _run_concurrently(jobs: list[Callable[[], UnitOutcome]], concurrency: int) -> list[UnitOutcome]:
    """Run jobs at most `concurrency` at a time; results in job order; the first failure wins."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="unit") as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def synthesise(
    spec: Spec,
    plan: Plan,
    pipeline: Pipeline,
    client: ModelClient,
    spend: Spend,
    estimate: Callable[[ModelRequest], int],
    on_unit: Callable[[Unit], None] = lambda unit: None,
) -> Synthesis:
    """Ask the senior for every unit, concurrently; any unit that cannot be made right stops the run."""

    def job(unit: Unit) -> Callable[[], UnitOutcome]:
        def run() -> UnitOutcome:
            on_unit(unit)
            conversation = _Conversation(unit, pipeline, client, spend, estimate)
            return conversation.converse(spec, plan, prompt_messages(spec, plan, unit), "synthesise")

        return run

    return _collect(_run_concurrently([job(u) for u in plan.units], pipeline.concurrency))


def repair_after_tests(
    spec: Spec,
    plan: Plan,
    pipeline: Pipeline,
    client: ModelClient,
    spend: Spend,
    estimate: Callable[[ModelRequest], int],
    synthesis: Synthesis,
    failures: dict[str, list[str]],
    round_: int,
) -> Synthesis:
    """Send each unit whose tests failed its failures; the other units keep their answers."""

    def job(outcome: UnitOutcome) -> Callable[[], UnitOutcome]:
        unit = plan.unit(outcome.result.unit)
        if unit.name not in failures:
            return lambda: outcome

        def run() -> UnitOutcome:
            conversation = _Conversation(unit, pipeline, client, spend, estimate)
            messages = [
                *outcome.messages,
                {"role": "assistant", "content": outcome.answer[:20_000]},
                {"role": "user", "content": repair_message(failures[unit.name], "tests")},
            ]
            repaired = conversation.converse(spec, plan, messages, "repair-tests", first_round=round_)
            return repaired.model_copy(update={"exchanges": outcome.exchanges + repaired.exchanges})

        return run

    return _collect(_run_concurrently([job(o) for o in synthesis.outcomes], pipeline.concurrency))
