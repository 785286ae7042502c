"""The panel at work: round 1 independent and concurrent, an optional round 2, the consensus.

Every reviewer of a round runs at once, so a round takes about as long as its slowest
reviewer. Deterministic reviewers keep their verdict into round 2; LLM reviewers see all
round-1 verdicts and may revise. Dissent (a final vote against the outcome) is recorded.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed

from pydantic import ValidationError

from ..artifact.manifest import CarriedTool
from ..config import Budgets, Price
from ..errors import UserError
from ..sandbox.run import SandboxResult
from ..senior.cache import ResponseCache
from ..senior.client import LiteLLMClient, ModelEvent, missing_key
from ..senior.models import Exchange, ModelClient
from ..senior.spend import Spend
from .deterministic import run_check
from .llm import LLMReviewer
from .models import PanelReport, RequirementCoverage, Round, Subject, TestProof, Verdict
from .panel import Panel, Reviewer, decide


def _deterministic(reviewer: Reviewer, subject: Subject) -> Verdict:
    base = {"reviewer": reviewer.name, "kind": reviewer.kind, "round": 1, "weight": reviewer.definition.weight}
    try:
        answer = run_check(reviewer.kind, subject, reviewer.definition.options)
    except UserError:
        raise  # a bad option in the reviewer's file: the user fixes it
    except Exception as exc:  # a check that breaks cannot vote either way
        return Verdict(**base, decision="abstain", summary="no verdict", error=f"{type(exc).__name__}: {exc}")
    return Verdict(**base, decision=answer.decision, summary=answer.summary, findings=tuple(answer.findings))


class PanelRun:
    """One review of one build by one panel: clients per LLM reviewer, a shared budget."""

    def __init__(
        self,
        panel: Panel,
        clients: Mapping[str, ModelClient] | None = None,
        prices: dict[str, Price] | None = None,
        cache: ResponseCache | None = None,
        on_verdict: Callable[[Verdict], None] = lambda verdict: None,
        on_event: Callable[[ModelEvent], None] = lambda event: None,
    ):
        self.panel = panel
        self.spend = self._new_spend()
        self.on_verdict = on_verdict
        self.llm: dict[str, LLMReviewer | str] = {}  # a reviewer, or why it cannot be asked
        for reviewer in panel.reviewers:
            if reviewer.kind != "llm":
                continue
            model = reviewer.definition.model
            assert model is not None
            client = (clients or {}).get(reviewer.name)
            if client is None and (problem := missing_key(model)) is not None:
                self.llm[reviewer.name] = f"{model.model} needs the environment variable {problem}"
                continue
            client = client or LiteLLMClient(model, prices, on_event=on_event)
            self.llm[reviewer.name] = LLMReviewer(reviewer, client, self.spend, cache, prices)

    def _first(self, reviewer: Reviewer, subject: Subject) -> Verdict:
        if reviewer.kind != "llm":
            return _deterministic(reviewer, subject)
        asked = self.llm[reviewer.name]
        if isinstance(asked, str):
            return Verdict(reviewer=reviewer.name, kind="llm", round=1, decision="abstain", summary="no verdict",
                           error=asked, model=reviewer.definition.model.model, weight=reviewer.definition.weight)
        return asked.first_round(subject.material)

    def _second(self, reviewer: Reviewer, subject: Subject, own: Verdict, everyone: list[Verdict]) -> Verdict:
        asked = self.llm.get(reviewer.name)
        if reviewer.kind != "llm" or isinstance(asked, str) or asked is None:
            return own  # a check's verdict does not change with opinions
        return asked.second_round(subject.material, own, everyone)

    def _concurrently(self, jobs: list[Callable[[], Verdict]]) -> list[Verdict]:
        """Every job at once; progress as each finishes, results in panel order (review.json is stable)."""
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="reviewer") as pool:
            futures = [pool.submit(contextvars.copy_context().run, job) for job in jobs]  # see cancel.py
            for future in as_completed(futures):
                self.on_verdict(future.result())
            return [future.result() for future in futures]

    def _new_spend(self) -> Spend:
        """The budget of one review (a repair's review has its own): reviewers running at once wait for each
        other's calls to settle rather than be refused while the budget still has room."""
        definition = self.panel.definition
        return Spend(Budgets(run_tokens=definition.budget_tokens, run_cost_usd=definition.budget_usd),
                     scope="review", caller="reviewer", wait=True,
                     hint="Raise budget_usd or budget_tokens in the panel file to let the reviewers finish.")

    @property
    def exchanges(self) -> list[Exchange]:
        """Every LLM reviewer's requests and answers so far, reviewer by reviewer in panel order: for the transcript."""
        return [e for asked in self.llm.values() if isinstance(asked, LLMReviewer) for e in asked.exchanges]

    def review(self, subject: Subject, first_round: int = 1, review: int = 1) -> list[Round]:
        """Round 1 (and 2, if the panel has one and it can change something); numbered on from `first_round`."""
        self.spend = self._new_spend()
        for asked in self.llm.values():
            if isinstance(asked, LLMReviewer):
                asked.review, asked.spend = review, self.spend
        reviewers = self.panel.reviewers
        rule = self.panel.definition.consensus
        verdicts = self._concurrently([lambda r=r: self._first(r, subject) for r in reviewers])
        first = decide(rule, verdicts)
        rounds = [Round(number=first_round, review=review, verdicts=tuple(verdicts), consensus=first)]
        # Opinions cannot lift a veto, and reviewers that could not answer have nothing to revise.
        llm_voted = any(v.kind == "llm" and v.decision != "abstain" for v in verdicts)
        if self.panel.definition.second_round and llm_voted and not first.vetoed_by:
            revised = self._concurrently(
                [lambda r=r, v=v: self._second(r, subject, v, verdicts) for r, v in zip(reviewers, verdicts, strict=True)]
            )
            rounds.append(Round(number=first_round + 1, review=review, phase="revision", verdicts=tuple(revised),
                                consensus=decide(rule, revised)))
        return [r.model_copy(update={"verdicts": tuple(v.model_copy(update={"round": r.number}) for v in r.verdicts)})
                for r in rounds]


def panel_report(subject: Subject, panel: Panel, rounds: list[Round], repairs: int = 0) -> PanelReport:
    final = rounds[-1].consensus
    side = {"approve": "approve", "reject": "request_changes"}.get(final.outcome)
    dissent = tuple(v.reviewer for v in rounds[-1].verdicts if side and v.decision not in (side, "abstain"))
    verdicts = [v for r in rounds for v in r.verdicts]
    return PanelReport(
        ecosystem=subject.material.ecosystem,
        version=subject.material.version,
        parent=subject.material.parent,
        panel=panel.name,
        panel_definition=panel.describe(),
        rounds=tuple(rounds),
        outcome=final.outcome,
        reason=final.reason,
        repairs=repairs,
        dissent=dissent,
        prompt_tokens=sum(v.prompt_tokens for v in verdicts),
        completion_tokens=sum(v.completion_tokens for v in verdicts),
        cost_usd=round(sum(v.cost_usd for v in verdicts), 6),
        carried=tuple(CarriedTool.model_validate(c).line(tool)
                      for tool, c in sorted(subject.material.manifest.get("carried", {}).items())),
        requirements=coverage(subject),
    )


def coverage(subject: Subject) -> tuple[RequirementCoverage, ...]:
    """The requirement matrix: each requirement with an id, the tests of tests.json that name it, covered when one
    passed. Unreadable results cover nothing (the tests reviewer says why)."""
    try:
        tests = SandboxResult.model_validate(subject.material.tests).tests
    except ValidationError:
        tests = ()
    matrix = []
    for requirement in subject.spec.requirement_items:
        proofs = tuple(TestProof(id=t.id, outcome=t.outcome) for t in tests if requirement.id in t.requirements)
        matrix.append(RequirementCoverage(id=requirement.id, text=requirement.text, line=requirement.line, tests=proofs,
                                          covered=any(p.outcome == "passed" for p in proofs)))
    return tuple(matrix)
