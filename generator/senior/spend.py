"""What a run may still spend: budgets checked before each call, with what calls in flight may cost.

A call reserves its worst case (prompt + max_tokens, priced when the price is known) before
it is made and settles with the reply after, so concurrent callers (units of a build, the
reviewers of a panel) cannot all squeeze under a budget at once: each sees the others'
reservations. The synthesis stage keeps one per build, the review stage one per review.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..config import Budgets
from ..errors import OverBudget
from .models import ModelReply


class Spend:
    """Tokens and dollars spent, in total and per caller (a unit, a reviewer), with what is in flight.

    `scope` names the whole ("run", "review") and `caller` one spender ("unit", "reviewer") in the
    error that stops a call; `hint` says how to go on.
    """

    def __init__(self, budgets: Budgets, scope: str = "run", caller: str = "unit",
                 hint: str = "Raise [budgets] in the pipeline file to go on; nothing was archived.",
                 wait: bool = False):
        self.budgets = budgets
        self.scope, self.caller, self.hint = scope, caller, hint
        self.wait = wait
        self.tokens = 0
        self.cost_usd = 0.0
        self.by_unit: dict[str, tuple[int, float]] = {}
        self._reserved: dict[str, tuple[int, float]] = {}
        self._lock = threading.Condition()

    @contextmanager
    def reservation(self, unit: str, tokens: int, cost_usd: float) -> Iterator[Callable[[ModelReply], None]]:
        """Reserve a call's worst case; the body settles it with the reply (unsettled: nothing spent).

        With `wait`, a call that fits what is spent but not what is in flight waits for those calls to settle
        (they usually cost far less than their worst case) instead of being refused: which callers get through
        then depends on what was spent, not on who asked first."""
        with self._lock:
            while True:
                try:
                    self._check(unit, tokens, cost_usd)
                    break
                except OverBudget:
                    if not (self.wait and self._reserved.get("", (0, 0.0)) != (0, 0.0)):
                        raise
                    self._check(unit, tokens, cost_usd, in_flight=False)  # over even when all has settled: refuse
                    self._lock.wait()
            self._add(self._reserved, unit, tokens, cost_usd)
            self._add(self._reserved, "", tokens, cost_usd)

        def settle(reply: ModelReply) -> None:
            if reply.cached:
                return
            with self._lock:
                self.tokens += reply.tokens
                self.cost_usd += reply.cost_usd
                self._add(self.by_unit, unit, reply.tokens, reply.cost_usd)

        try:
            yield settle
        finally:
            with self._lock:
                self._add(self._reserved, unit, -tokens, -cost_usd)
                self._add(self._reserved, "", -tokens, -cost_usd)
                self._lock.notify_all()

    @staticmethod
    def _add(table: dict[str, tuple[int, float]], key: str, tokens: int, cost: float) -> None:
        old_tokens, old_cost = table.get(key, (0, 0.0))
        table[key] = (old_tokens + tokens, old_cost + cost)

    def _check(self, unit: str, tokens: int, cost_usd: float, in_flight: bool = True) -> None:
        b = self.budgets
        run_reserved = self._reserved.get("", (0, 0.0)) if in_flight else (0, 0.0)
        unit_reserved = self._reserved.get(unit, (0, 0.0)) if in_flight else (0, 0.0)
        unit_spent = self.by_unit.get(unit, (0, 0.0))
        who = f"{self.caller} {unit}"
        limits = [
            (f"the {self.scope}'s token budget", b.run_tokens, self.tokens + run_reserved[0], tokens, "{:,} tokens"),
            (f"{who}'s token budget", b.unit_tokens, unit_spent[0] + unit_reserved[0], tokens, "{:,} tokens"),
            (f"the {self.scope}'s cost budget", b.run_cost_usd, self.cost_usd + run_reserved[1], cost_usd, "${:.4f}"),
            (f"{who}'s cost budget", b.unit_cost_usd, unit_spent[1] + unit_reserved[1], cost_usd, "${:.4f}"),
        ]
        for what, limit, committed, this_call, unit_format in limits:
            # A cost budget also stops once it is reached: any further call costs something.
            if limit is not None and (committed + this_call > limit or (this_call == 0 and committed >= limit)):
                raise OverBudget(
                    f"stopped before the next call for {who}: it could cross {what} of "
                    f"{unit_format.format(limit)} ({unit_format.format(committed)} spent or in flight, "
                    f"+ up to {unit_format.format(this_call)} for this call). Spent in this {self.scope}: "
                    f"{self.tokens:,} tokens, ${self.cost_usd:.4f}. {self.hint}"
                )
