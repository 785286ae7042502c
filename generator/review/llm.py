"""An LLM reviewer: the material split into requests that fit its window, verdicts parsed strictly.

Each reviewer sees the requirements, the principles, the manifest, the test results and
the diff against the parent version. When all of that does not fit the reviewer's
window, the diff is packed into focused chunks (whole files where they fit, a file's
diff cut at line boundaries where it does not), each reviewed on its own; the
reviewer's verdict is the union of its chunks' findings, and it approves only if every
chunk does. A verdict that is not valid JSON of the right shape is asked for once more,
with the error; a second bad one, or a model error, is an abstention with its reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from pydantic import ConfigDict, ValidationError

from ..artifact.history import ChangedFile
from ..artifact.manifest import BumpRecord, CarriedTool, SandboxRecord, UnitRecord
from ..config import Price
from ..errors import BuildFailed, OverBudget, UserError
from ..frozen import Frozen
from ..render import environment
from ..senior import context
from ..senior.answer import unfenced
from ..senior.cache import ResponseCache
from ..senior.client import price_per_token
from ..senior.models import Exchange, ModelClient, ModelReply, ModelRequest, complete_within
from ..senior.spend import Spend
from .models import BLOCKING, SEVERITIES, Finding, Material, Verdict, VerdictAnswer
from .panel import Reviewer

ROUND_TWO_FAILED = "round 2 failed, round-1 verdict kept: "
# Room left in each request for the answer's own framing and the counter's error.
CHUNK_MARGIN_TOKENS = 1_000


class ManifestSummary(Frozen):
    """The parts of the manifest a reviewer can judge, read through the manifest's own models (a key the
    manifest does not have is an error here, not a null in the prompt); hashes of every file are noise to it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ecosystem: str
    version: str
    parent: str | None = None
    bump: BumpRecord | None = None
    offline: bool
    startup_order: tuple[str, ...] = ()
    sandbox: SandboxRecord
    units: tuple[UnitRecord, ...]
    carried: dict[str, CarriedTool] = {}

    def shown(self) -> dict:
        summary = self.model_dump(mode="json", exclude={"units"})
        summary["units"] = [u.model_dump(mode="json", include={"unit", "rounds", "reused_from", "answered_by",
                                                               "prompt_tokens", "completion_tokens", "cost_usd"})
                            for u in self.units]
        return summary


def _manifest_summary(manifest: dict) -> dict:
    return ManifestSummary.model_validate(manifest).shown()


def _tests_summary(tests: dict) -> dict:
    failing = [t for t in tests.get("tests", []) if t.get("outcome") in ("failed", "error")]
    return {k: tests.get(k) for k in ("level", "passed", "failed", "errors", "skipped", "exit_code")} | {"failing": failing}


def system_message(reviewer: Reviewer) -> str:
    return environment("review/prompts").get_template("review_system.md.j2").render(
        focus=reviewer.definition.focus,
        rubric=reviewer.rubric.strip(),
        severities=SEVERITIES,
        answer_schema=json.dumps(VerdictAnswer.model_json_schema(), sort_keys=True),
    )


def fence(text: str) -> str:
    """A code fence no line of `text` can close: longer than its longest run of backticks."""
    return "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)


def _frame(item: ChangedFile) -> str:
    """What a file costs in a request besides its diff: its heading and its fence."""
    mark = fence(item.diff)
    return f"### {item.status}: {item.path}\n\n{mark}diff\n\n{mark}\n\n"


def chunk_message(material: Material, files: list[ChangedFile], number: int, total: int) -> str:
    return environment("review/prompts").get_template("review_chunk.md.j2").render(
        material=material,
        manifest=json.dumps(_manifest_summary(material.manifest), sort_keys=True, indent=1),
        tests=json.dumps(_tests_summary(material.tests), sort_keys=True, indent=1),
        files=[(f, fence(f.diff)) for f in files],
        number=number,
        total=total,
    )


def second_round_message(material: Material, own: Verdict, everyone: list[Verdict]) -> str:
    verdicts = [v.model_dump(mode="json", include={"reviewer", "kind", "decision", "summary", "findings", "error"})
                for v in everyone]
    return environment("review/prompts").get_template("review_round2.md.j2").render(
        material=material,
        tests=json.dumps(_tests_summary(material.tests), sort_keys=True, indent=1),
        own=own,
        verdicts=json.dumps(verdicts, sort_keys=True, indent=1),
    )


HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


def _split(item: ChangedFile, budget: int, count: Callable[[str], int]) -> list[ChangedFile]:
    """A diff too big for one request, cut at line boundaries into parts that fit. Each part
    repeats the file header, and a part that starts inside a hunk gets a hunk header of its own,
    so line numbers can still be read off every part."""
    lines = item.diff.splitlines(keepends=True)
    body_at = next((i for i, line in enumerate(lines) if line.startswith("@@")), 0)
    header, body = "".join(lines[:body_at]), lines[body_at:]
    parts: list[list[str]] = [[]]
    size, old, new, in_hunk = 0, 0, 0, False
    for line in body:
        if match := HUNK.match(line):
            old, new, in_hunk = int(match[1]), int(match[2]), True
        cost = count(line)
        if parts[-1] and size + cost > budget:
            parts.append([f"@@ -{old} +{new} @@ (continued)\n"] if in_hunk and not match else [])
            size = sum(count(x) for x in parts[-1])
        parts[-1].append(line)
        size += cost
        if not match:
            old += line[:1] in ("-", " ")
            new += line[:1] in ("+", " ")
    return [item.model_copy(update={
        "diff": header + "".join(part),
        "path": f"{item.path} (part {i} of {len(parts)})" if len(parts) > 1 else item.path,
    }) for i, part in enumerate(parts, 1)]


def pack(files: tuple[ChangedFile, ...], budget: int | None, count: Callable[[str], int]) -> list[list[ChangedFile]]:
    """Files into chunks of at most `budget` tokens each, in path order; one chunk when unbounded."""
    if budget is None or not files:
        return [list(files)]
    chunks: list[list[ChangedFile]] = [[]]
    size = 0
    for item in files:
        frame = count(_frame(item))  # the heading and fence every piece repeats
        for piece in _split(item, max(budget - frame, 1), count) if count(item.diff) + frame > budget else [item]:
            cost = count(piece.diff) + frame
            if chunks[-1] and size + cost > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(piece)
            size += cost
    return chunks


def _text_tokens(model: str) -> Callable[[str], int]:
    """Tokens of a piece of text for `model`, without the framing of the message it is counted in."""
    def message_tokens(text: str) -> int:
        request = ModelRequest(unit="count", model=model, messages=({"role": "user", "content": text},),
                               temperature=0, seed=None, max_tokens=1)
        return context.count_tokens(request)

    framing = message_tokens("")
    return lambda text: max(0, message_tokens(text) - framing)


@dataclass
class LLMReviewer:
    """One LLM reviewer over one review: asks, re-asks once on a malformed verdict, else abstains.

    Every call reserves its worst case in the review's `Spend` first (the prompt's tokens plus
    max_tokens, at the price of the model asked), so reviewers running at once cannot all slip
    under the budget; a reviewer whose price is unknown cannot be bounded by a cost budget and
    abstains rather than spend without a ceiling.
    """

    reviewer: Reviewer
    client: ModelClient
    spend: Spend
    cache: ResponseCache | None = None
    prices: dict[str, Price] | None = None
    review: int = 1
    """Which review of the build this is (2 after the first repair, ...): part of each request's transcript name."""
    exchanges: list[Exchange] = field(default_factory=list)
    """Every request and its answer, in order: the build's transcript keeps them, so the review replays."""

    @property
    def model(self):  # the SeniorModel; the validator guarantees it for llm reviewers
        assert self.reviewer.definition.model is not None
        return self.reviewer.definition.model

    def requests(self, material: Material) -> tuple[list[list[dict[str, str]]], tuple[str, ...]]:
        """The first-round conversations (one per chunk of the material), and what is uncertain about them."""
        system = system_message(self.reviewer)
        count = _text_tokens(self.model.model)
        window = context.window_of(self.model)
        budget = None
        if window is not None:
            fixed = count(system) + count(chunk_message(material, [], 1, 1))
            budget = window - self.model.max_tokens - fixed - CHUNK_MARGIN_TOKENS
            if budget <= 0:
                raise UserError(
                    f"reviewer {self.reviewer.name}: the requirements, principles and test results alone need "
                    f"{fixed:,} tokens, which with max_tokens {self.model.max_tokens:,} exceed its window of "
                    f"{window:,}; give it a model with a larger window or lower max_tokens"
                )
        chunks = pack(material.changed, budget, count)
        conversations = [[{"role": "system", "content": system},
                          {"role": "user", "content": chunk_message(material, files, i, len(chunks))}]
                         for i, files in enumerate(chunks, 1)]
        notes = ()
        if window is None and not self.model.is_offline:
            largest = max(count(m[0]["content"]) + count(m[1]["content"]) for m in conversations)
            notes = (f"context window of {self.model.model} unknown: sent {len(conversations)} request(s) unsplit, "
                     f"the largest {largest:,} tokens; set context_window in the reviewer's [model] to split to it",)
        return conversations, notes

    def first_round(self, material: Material) -> Verdict:
        try:
            conversations, notes = self.requests(material)
        except UserError as exc:
            return self._abstain(1, str(exc), 0)
        verdict = self._verdict(conversations, 1)
        return verdict.model_copy(update={"notes": notes + verdict.notes}) if notes else verdict

    def second_round(self, material: Material, own: Verdict, everyone: list[Verdict]) -> Verdict:
        if own.decision == "abstain":
            # It never saw the build (round-2 prompts carry only the verdicts): its abstention stands.
            return own
        conversation = [{"role": "system", "content": system_message(self.reviewer)},
                        {"role": "user", "content": second_round_message(material, own, everyone)}]
        verdict = self._verdict([conversation], 2)
        if verdict.decision == "abstain":
            # A failed revision (timeout, budget) does not unsay round 1: the first verdict stands.
            # Its round-1 spend is on its round-1 verdict already: this one carries round 2's alone.
            return own.model_copy(update={"error": f"{ROUND_TWO_FAILED}{verdict.error}",
                                          "prompt_tokens": verdict.prompt_tokens,
                                          "completion_tokens": verdict.completion_tokens,
                                          "cost_usd": verdict.cost_usd, "cached": verdict.cached,
                                          "price_known": verdict.price_known, "notes": ()})
        return verdict.model_copy(update={"revised": verdict.decision != own.decision})

    def _verdict(self, conversations: list[list[dict[str, str]]], round_: int) -> Verdict:
        answers: list[VerdictAnswer] = []
        replies: list[ModelReply] = []
        for number, messages in enumerate(conversations, 1):
            try:
                answer = self._ask(messages, round_, f"review:{self.reviewer.name}:{self.review}.{round_}:chunk{number}",
                                   replies)
            except (BuildFailed, UserError) as exc:  # model errors after retries, timeouts, the budget, a refused call
                return self._abstain(round_, str(exc), len(conversations), replies, answers)
            except Exception as exc:  # a provider error litellm did not map: still this reviewer's abstention
                return self._abstain(round_, f"{type(exc).__name__}: {exc}", len(conversations), replies, answers)
            if answer is None:
                return self._abstain(round_, "malformed verdict twice: " + replies[-1].content[:200].replace("\n", " "),
                                     len(conversations), replies, answers)
            answers.append(answer)
        findings = tuple(f for a in answers for f in a.findings)
        said = "approve" if all(a.decision == "approve" for a in answers) else "request_changes"
        decision, correction = follow_findings(said, findings)
        summaries = [a.summary for a in answers]
        return Verdict(
            reviewer=self.reviewer.name, kind="llm", round=round_, decision=decision, correction=correction,
            summary=summaries[0] if len(summaries) == 1 else " / ".join(f"[{i}] {s}" for i, s in enumerate(summaries, 1)),
            findings=findings, model=self.model.model,
            weight=self.reviewer.definition.weight, chunks=len(conversations), **self._spent(replies),
        )

    def _reserve(self, model: str, prompt_tokens: int):
        """Reserve one call's worst case at the price of `model` (the reviewer's, or a fallback's)."""
        price = price_per_token(model, self.prices or {})
        if price is None and self.spend.budgets.run_cost_usd is not None:
            raise OverBudget(f"the price of {model} is unknown, so the review's cost budget of "
                             f"${self.spend.budgets.run_cost_usd:.4f} cannot bound it; add it to [prices] "
                             "in the pipeline file")
        cost = (prompt_tokens * price[0] + self.model.max_tokens * price[1]) if price else 0.0
        return self.spend.reservation(self.reviewer.name, prompt_tokens + self.model.max_tokens, cost)

    def _ask(self, messages: list[dict[str, str]], round_: int, unit: str, replies: list[ModelReply]) -> VerdictAnswer | None:
        """A valid verdict, or None after one re-ask; the malformed reply is kept for the record."""
        for attempt in (1, 2):
            request = ModelRequest.for_unit(unit, self.model, messages, VerdictAnswer.model_json_schema())
            cached = self.cache.get(request.hash) if self.cache else None
            reply = cached.model_copy(update={"cached": True}) if cached else None
            if reply is None:
                prompt_tokens = context.count_tokens(request)
                reply = complete_within(self.client, request, partial(self._reserve, prompt_tokens=prompt_tokens))
            replies.append(reply)
            self.exchanges.append(Exchange(request=request, reply=reply, round=round_, purpose="review"))
            try:
                answer = VerdictAnswer.model_validate_json(unfenced(reply.content))
            except ValidationError as exc:
                if attempt == 2:
                    return None
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "verdict"
                messages = [*messages, {"role": "assistant", "content": reply.content},
                            {"role": "user", "content": f"That verdict is not valid: {where}: {first['msg']}. "
                                                        "Answer again with only the JSON object, in the schema given."}]
                continue
            if self.cache and cached is None:  # only valid verdicts are worth keeping
                self.cache.put(request.hash, reply)
            return answer
        return None

    def _abstain(self, round_: int, error: str, chunks: int, replies: list[ModelReply] = (),
                 answered: list[VerdictAnswer] = ()) -> Verdict:
        """No verdict; findings of the chunks that were answered are kept (a critical one still vetoes)."""
        found = tuple(f for a in answered for f in a.findings)
        return Verdict(reviewer=self.reviewer.name, kind="llm", round=round_, decision="abstain",
                       summary=f"no verdict ({len(answered)} of {chunks} parts answered)" if answered else "no verdict",
                       findings=found, error=error.splitlines()[0][:500] if error else "unknown error",
                       model=self.model.model, weight=self.reviewer.definition.weight, chunks=max(chunks, 1),
                       **self._spent(list(replies)))

    def _spent(self, replies: list[ModelReply]) -> dict:
        """What the answers cost when they were made (a cache hit costs that again on paper, as in the manifest, so
        the same answers give the same review.json), how many came from the cache; a reply from a model of unknown
        price cost an unknown amount, not $0."""
        return {
            "prompt_tokens": sum(r.prompt_tokens for r in replies),
            "completion_tokens": sum(r.completion_tokens for r in replies),
            "cost_usd": round(sum(r.cost_usd for r in replies), 6),
            "cached": sum(1 for r in replies if r.cached),
            "price_known": all(price_per_token(r.model or self.model.model, self.prices or {}) is not None
                               for r in replies),
        }


def follow_findings(decision: str, findings: tuple[Finding, ...]) -> tuple[str, str | None]:
    """A verdict's decision as its findings have it: a blocking finding (critical, major) requests changes,
    whatever the reviewer said; the correction says so, for review.json."""
    blocking = [f for f in findings if f.severity in BLOCKING]
    if decision == "approve" and blocking:
        counts = Counter(f.severity for f in blocking)
        found = " and ".join(f"{counts[s]} {s}" for s in SEVERITIES if counts[s])
        return "request_changes", (f"said approve with {found} finding{'s' if len(blocking) > 1 else ''}; "
                                   "counted as request changes, as the rubric asks")
    return decision, None
