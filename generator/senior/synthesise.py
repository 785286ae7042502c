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

import contextvars
import json
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

from ..artifact.manifest import UnitRecord
from ..config import Pipeline
from ..errors import AnswerRejected, BuildFailed
from ..frozen import Frozen
from ..kernel.capabilities import available
from ..kernel_contract import api_text
from ..render import environment
from ..spec.model import MadSpec, Spec, Tool
from ..spec.plan import Plan, Unit
from . import check
from .answer import Answer, parse_answer
from .cache import ResponseCache
from .models import Exchange, ModelClient, ModelReply, ModelRequest, complete_within
from .spend import Spend

MAX_CONTINUATIONS = 3


class UnitResult(UnitRecord):
    """A unit as this run made it: what it spent now (a cache hit or a reuse spends nothing), how long it took
    (waits for retries included), and how often a model had to be asked again or replaced."""

    latency_ms: int
    cached: bool
    retries: int = 0
    fallbacks: int = 0


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


# --- prompts ------------------------------------------------------------------------------


def _tool_json(tool: Tool) -> dict:
    # Parameters as a list: their order is the signature's, and JSON objects get sorted.
    # A parameter carries "default" only when it has one: absence means required.
    # Hints only when the spec sets them: a spec without any asks exactly what it asked before.
    data = tool.model_dump(mode="json", exclude={"params"} | (set() if tool.hints else {"hints"}))
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
        # Given only when there are any: a spec without roles asks what it always asked.
        if mad.spawns:
            data["roles"] = [{"name": r, "role": spec.mad(r).role, "max_instances": spec.mad(r).max_instances or 1}
                             for r in mad.spawns]
        if spawners := sorted(m.name for m in spec.mads if mad.name in m.spawns):
            data["spawners"] = spawners
    else:
        data["mads"] = [_mad_json(spec.mad(n)) for n in plan.startup_order]
    return data


def prompt_messages(spec: Spec, plan: Plan, unit: Unit) -> list[dict[str, str]]:
    env = environment("senior/prompts")
    system = env.get_template("system.md.j2").render(
        requirements=spec.requirements.strip(),
        principles=spec.principles.strip(),
        rules=spec.ecosystem.principles,
        package=plan.package,
        capabilities=list(available(spec.packs).values()),  # the core's and its packs': a pack unused asks nothing
        kernel_api=api_text(),
        answer_schema=json.dumps(Answer.model_json_schema(), sort_keys=True),
    )
    user = env.get_template("unit.md.j2").render(
        unit=unit,
        package=plan.package,
        startup_order=plan.startup_order,
        unit_spec=json.dumps(unit_spec(spec, plan, unit), sort_keys=True, indent=1),
        requirement_ids=[r.id for r in spec.requirement_items],
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def repair_message(problems: list[str], kind: str) -> str:
    return environment("senior/prompts").get_template("repair.md.j2").render(problems=problems, kind=kind)


CONTINUE = (
    "Your answer was cut off by the output limit. Continue exactly where it stopped: "
    "no repetition, no commentary, only the rest of the JSON."
)


def first_request(spec: Spec, plan: Plan, unit: Unit, pipeline: Pipeline) -> ModelRequest:
    return ModelRequest.for_unit(
        unit.name, pipeline.senior, prompt_messages(spec, plan, unit), Answer.model_json_schema()
    )


# --- the unit conversation ------------------------------------------------------------------


@dataclass
class SynthesisRun:
    """What every unit's conversation of one run shares: the inputs, the senior, the budgets."""

    spec: Spec
    plan: Plan
    pipeline: Pipeline
    client: ModelClient
    spend: Spend
    estimate: Callable[[ModelRequest], int]
    cache: ResponseCache | None = None
    price: Callable[[str], tuple[float, float] | None] = lambda model: None
    window: int | None = None
    """The senior's context window: repairs and continuations grow a conversation past it."""
    stop: threading.Event = field(default_factory=threading.Event)

    def synthesise(
        self, on_unit: Callable[[Unit], None] = lambda unit: None, reuse: dict[str, UnitOutcome] | None = None,
    ) -> Synthesis:
        """Ask the senior for every unit not in `reuse`, concurrently; a unit that cannot be made right stops the run."""

        def job(unit: Unit) -> Callable[[], UnitOutcome]:
            if reuse and unit.name in reuse:
                return lambda: reuse[unit.name]

            def run() -> UnitOutcome:
                on_unit(unit)
                return _Conversation(self, unit).converse(prompt_messages(self.spec, self.plan, unit), "synthesise")

            return run

        return _collect(self._concurrently([job(u) for u in self.plan.units]))

    def repair_units(
        self, synthesis: Synthesis, failures: dict[str, list[str]], round_: int, kind: Literal["tests", "review"] = "tests"
    ) -> Synthesis:
        """Send each unit its failures (from the sandbox tests or the review); the other units keep their answers."""

        def job(outcome: UnitOutcome) -> Callable[[], UnitOutcome]:
            if outcome.result.unit not in failures:
                return lambda: outcome

            def run() -> UnitOutcome:
                conversation = _Conversation(self, self.plan.unit(outcome.result.unit), outcome)
                messages = [
                    *outcome.messages,
                    {"role": "assistant", "content": _quoted(outcome.answer)},
                    {"role": "user", "content": repair_message(failures[outcome.result.unit], kind)},
                ]
                return conversation.converse(messages, f"repair-{kind}", first_round=round_)

            return run

        return _collect(self._concurrently([job(o) for o in synthesis.outcomes]))

    def _concurrently(self, jobs: list[Callable[[], UnitOutcome]]) -> list[UnitOutcome]:
        """At most `concurrency` jobs at a time, results in job order; the first failure stops the rest."""
        pool = ThreadPoolExecutor(max_workers=self.pipeline.concurrency, thread_name_prefix="unit")
        # each job in a copy of this context: a cancellable build's units see its cancel event (generator/cancel.py)
        futures = [pool.submit(contextvars.copy_context().run, job) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            return [f.result() for f in futures]
        except BaseException:
            self.stop.set()  # units in flight stop before their next call
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def reused(request: ModelRequest, files: dict[str, str], version: str, exchanges: tuple[Exchange, ...]) -> UnitOutcome:
    """A unit taken from an earlier version with the exchanges it came from: its answer as if just given, at 0 tokens
    (a test repair can still follow)."""
    answer = json.dumps({"files": [{"path": p, "content": c} for p, c in sorted(files.items())]}, ensure_ascii=False)
    return UnitOutcome(
        result=UnitResult(unit=request.unit, request_hash=request.hash, files=tuple(sorted(files)), rounds=0,
                          prompt_tokens=0, completion_tokens=0, cost_usd=0.0, latency_ms=0, cached=True,
                          reused_from=version),
        files=dict(sorted(files.items())), messages=request.messages, answer=answer, exchanges=exchanges,
    )


def _whole_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _quoted(answer: str) -> str:
    # An earlier answer quoted back in a repair: whole when it is of a reasonable size.
    return answer if len(answer) <= 200_000 else answer[:200_000] + "\n[... cut]"


class _Conversation:
    def __init__(self, run: SynthesisRun, unit: Unit, earlier: UnitOutcome | None = None):
        self.run = run
        self.unit = unit
        self.earlier = earlier
        self.exchanges: list[Exchange] = []

    def _call(self, request: ModelRequest) -> ModelReply:
        if self.run.cache is not None and (hit := self.run.cache.get(request.hash)) is not None:
            return hit.model_copy(update={"cached": True, "latency_ms": 0, "attempts": 0, "retries": 0, "fallbacks": 0})
        if self.run.stop.is_set():
            raise BuildFailed(f"unit {self.unit.name} stopped: another unit failed")
        prompt_tokens = self.run.estimate(request)
        if self.run.window is not None and prompt_tokens + request.max_tokens > self.run.window:
            raise BuildFailed(
                f"unit {self.unit.name}: its conversation has grown to {prompt_tokens:,} tokens of prompt, which with "
                f"up to {request.max_tokens:,} of answer is over the senior's window of {self.run.window:,}; "
                "stopped before the provider would refuse it. Lower max_tokens or repair_rounds, or use a larger window."
            )

        def reserve(model: str):
            # Before every attempt (retries and fallbacks too): a build that has failed elsewhere spends no more.
            if self.run.stop.is_set():
                raise BuildFailed(f"unit {self.unit.name} stopped: another unit failed")
            # Each model asked (the senior, then each fallback) is reserved at its own price.
            price = self.run.price(model)
            worst_cost = (prompt_tokens * price[0] + request.max_tokens * price[1]) if price else 0.0
            return self.run.spend.reservation(self.unit.name, prompt_tokens + request.max_tokens, worst_cost)

        return complete_within(self.run.client, request, reserve)

    def ask(self, messages: list[dict[str, str]], round_: int, purpose: str) -> ModelReply:
        """One answer, continued while it is cut off; returns the whole reply."""
        content = ""
        schema: dict | None = Answer.model_json_schema()
        first = True
        for _ in range(MAX_CONTINUATIONS + 1):
            request = ModelRequest.for_unit(self.unit.name, self.run.pipeline.senior, messages, schema)
            reply = self._call(request)
            self.exchanges.append(Exchange(request=request, reply=reply, round=round_,
                                           purpose=purpose if first else "continue" if content else "unstructured"))
            first = False
            if reply.finish_reason == "length" and schema is not None and _whole_json(reply.content):
                # A structured answer cut off inside a tool call comes back as a complete but empty object:
                # there is nothing to continue from. Asked again for plain JSON text, which can be continued.
                schema = None
                continue
            # A continuation is the rest of a JSON text, not a JSON object: no schema for it.
            schema = None
            content += reply.content
            if reply.finish_reason != "length" or not reply.content:
                break
            messages = [*messages, {"role": "assistant", "content": reply.content}, {"role": "user", "content": CONTINUE}]
        return reply.model_copy(update={"content": content})

    def converse(self, messages: list[dict[str, str]], purpose: str, first_round: int = 0) -> UnitOutcome:
        """Ask, check, repair until accepted or out of rounds; raises BuildFailed when it gives up."""
        spec, plan, pipeline = self.run.spec, self.run.plan, self.run.pipeline
        last_problems: list[str] | None = None
        for round_ in range(first_round, first_round + pipeline.repair_rounds + 1):
            reply = self.ask(messages, round_, purpose if round_ == first_round else "repair")
            try:
                if reply.finish_reason == "length":
                    raise AnswerRejected(self.unit.name, [
                        "the answer was cut off by the output limit"
                        + (" with nothing written" if not reply.content else " even after it was continued")
                        + ": write fewer or shorter files"
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
                    {"role": "assistant", "content": _quoted(reply.content)},
                    {"role": "user", "content": repair_message(rejected.problems, "check")},
                ]
                continue
            self._remember(round_)
            files = {f.path: f.content for f in answer.files}
            return UnitOutcome(
                result=self._result(files),
                files=files,
                messages=tuple(messages),
                answer=reply.content,
                exchanges=tuple(self.earlier.exchanges if self.earlier else ()) + tuple(self.exchanges),
            )
        raise BuildFailed(
            f"unit {self.unit.name} was still rejected after {pipeline.repair_rounds} repair round(s):\n  "
            + "\n  ".join(last_problems or [])
        )

    def _remember(self, round_: int) -> None:
        """Cache the accepted round's answers only: a rejected answer must not come back on a rerun."""
        if self.run.cache is None:
            return
        for e in self.exchanges:
            if e.round == round_ and not e.reply.cached:
                self.run.cache.put(e.request.hash, e.reply)

    def _result(self, files: dict[str, str]) -> UnitResult:
        every = list(self.earlier.exchanges if self.earlier else ()) + self.exchanges
        paid = [e for e in every if not e.reply.cached]
        return UnitResult(
            unit=self.unit.name,
            request_hash=every[0].request.hash,
            files=tuple(sorted(files)),
            rounds=sum(1 for e in every if e.purpose not in ("continue", "unstructured")),
            prompt_tokens=sum(e.reply.prompt_tokens for e in paid),
            completion_tokens=sum(e.reply.completion_tokens for e in paid),
            cost_usd=round(sum(e.reply.cost_usd for e in paid), 6),
            latency_ms=sum(e.reply.latency_ms for e in every),
            cached=all(e.reply.cached for e in every),
            retries=sum(e.reply.retries for e in paid),
            fallbacks=sum(e.reply.fallbacks for e in paid),
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
