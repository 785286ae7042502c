"""Model aliases and token budgets (Fiedler's side of the kernel).

Providers:
- "echo": deterministic and offline. The answer is "[offline echo model] <last message>": the
  prompt's last paragraph (a MAD's prompt is its imperator prompt, a blank line, then the message;
  the system prompt is never repeated), cut so the whole answer is at most `max_tokens` words
  (under 4, the label alone; its completion tokens never exceed `max_tokens`).
  Tokens are counted as whitespace-separated words.
- "openai": any OpenAI-compatible endpoint, key from the Turing secret named by the alias's
  `api_key_secret`; the openai pack (packs/openai/), which a build has when one of its aliases uses it.

Budgets: every account (a MAD name, or "client:<token-name>") has a budget and a spent
counter persisted in SQLite. A call is refused before it is sent when
spent + prompt tokens + max_tokens would exceed the budget; after it, actual usage is charged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from . import packs
from .bus import now_iso
from .config import ModelAlias
from .db import Database
from .errors import BudgetExceeded, InvalidArgument, KernelError, NotFound
from .logs import get as get_logger

log = get_logger("models")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    account TEXT PRIMARY KEY,
    budget INTEGER NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    accounts TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL
);
"""

# An account's balance as the budget tools show it.
_BALANCE = "SELECT account, budget, spent, CASE WHEN budget > spent THEN budget - spent ELSE 0 END AS remaining, calls FROM budgets"

ECHO_LABEL = "[offline echo model]"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def count_tokens(text: str) -> int:
    return len(text.split())


def openai_pack(aliases: dict[str, ModelAlias]) -> Any:
    """The openai pack's module when an alias uses that provider, else None; a clear error when the build lacks it."""
    if openai := sorted(name for name, alias in aliases.items() if alias.provider == "openai"):
        return packs.module("openai", f"model alias {openai[0]!r} uses the openai provider, but this build has no "
                                      "copy of the openai pack (packs/openai/): rebuild it with `nox -s regenerate`",
                            KernelError)
    return None


class ModelGateway:
    def __init__(self, db: Database, aliases: dict[str, ModelAlias], budgets: dict[str, int], client_budget: int,
                 read_secret: Callable[[str, str], str], transport: Any = None, openai: Any = None):
        """`openai`: the openai pack's module, which the aliases with that provider need (`openai_pack`)."""
        self.db = db
        self.aliases = dict(aliases)
        self._openai_pack = openai
        self.client_budget = int(client_budget)
        self._read_secret = read_secret
        self._transport = transport
        db.script(_SCHEMA, part="models")
        for account, budget in budgets.items():
            self._ensure_account(account, budget, update=True)

    # ---- budgets -----------------------------------------------------------------------------

    def _ensure_account(self, account: str, budget: int, update: bool = False) -> None:
        """Open `account` with `budget` tokens; `update`: an account already open gets the new budget."""
        on_conflict = "DO UPDATE SET budget = excluded.budget" if update else "DO NOTHING"
        self.db.execute("INSERT INTO budgets (account, budget, spent, calls, updated_at) VALUES (?, ?, 0, 0, ?) "
                        f"ON CONFLICT(account) {on_conflict}", (account, int(budget), now_iso()))

    def account_budget(self, account: str) -> dict[str, Any]:
        if account.startswith("client:"):
            self._ensure_account(account, self.client_budget)
        row = self.db.one(f"{_BALANCE} WHERE account = ?", (account,))
        if row is None:
            raise NotFound(f"no budget account {account!r}")
        return row

    def budgets(self) -> dict[str, Any]:
        mads, clients = {}, {}
        for balance in self.db.query(f"{_BALANCE} ORDER BY account"):
            account = balance.pop("account")
            (clients if account.startswith("client:") else mads)[account] = balance
        return {"mads": mads, "clients": clients, "client_budget_tokens": self.client_budget}

    def _charge(self, accounts: list[str], model: str, provider: str, usage: dict[str, int] | None,
                started: float) -> None:
        """Charge the tokens a call used to each account, and log the call, in one transaction (no usage: it failed)."""
        prompt_tokens, completion_tokens = (usage["prompt_tokens"], usage["completion_tokens"]) if usage else (0, 0)
        with self.db.transaction() as conn:
            if total := prompt_tokens + completion_tokens:
                conn.executemany("UPDATE budgets SET spent = spent + ?, calls = calls + 1, updated_at = ?"
                                 " WHERE account = ?", [(total, now_iso(), account) for account in accounts])
            conn.execute("INSERT INTO model_calls (ts, accounts, model, provider, prompt_tokens, completion_tokens, ok,"
                         " latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (now_iso(), ",".join(accounts), model, provider, prompt_tokens, completion_tokens,
                          int(usage is not None), int((time.monotonic() - started) * 1000)))

    # ---- aliases -----------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        return [{"alias": name, "provider": a.provider, "model": a.model, "api_base": a.api_base,
                 "has_key": bool(a.api_key_secret)} for name, a in sorted(self.aliases.items())]

    # ---- sending -----------------------------------------------------------------------------

    async def send(self, accounts: list[str], model: str, prompt: str, max_tokens: int = 256,
                   system: str = "") -> dict[str, Any]:
        """Send `prompt` to alias `model`, charging every account in `accounts` (all must afford it)."""
        alias = self.aliases.get(model)
        if alias is None:
            raise NotFound(f"no model alias {model!r}; known: {', '.join(sorted(self.aliases)) or 'none'}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument("prompt must be a non-empty string")
        if not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens > 1_000_000:
            raise InvalidArgument("max_tokens must be an integer between 1 and 1000000")
        prompt_tokens = count_tokens(system) + count_tokens(prompt)  # unless the model counts them itself
        estimate = prompt_tokens + max_tokens
        for account in accounts:
            b = self.account_budget(account)
            if b["spent"] + estimate > b["budget"]:
                log.warning("budget refused", extra={"account": account, "estimate": estimate, "remaining": b["remaining"]})
                raise BudgetExceeded(f"token budget exceeded for {account}: this call may use up to {estimate} tokens"
                                     f" but only {b['remaining']} of {b['budget']} remain")
        started = time.monotonic()
        usage: dict[str, int] | None = None
        try:
            text, usage = (self._echo(prompt, max_tokens, system) if alias.provider == "echo"
                           else await self._openai(model, alias, prompt, max_tokens, system, prompt_tokens))
        finally:
            self._charge(accounts, model, alias.provider, usage, started)
        return {"model": model, "provider": alias.provider, "text": text, **usage,
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"], "charged_to": accounts}

    @staticmethod
    def _echo(prompt: str, max_tokens: int, system: str) -> tuple[str, dict[str, int]]:
        paragraphs = [p for p in _PARAGRAPH_BREAK.split(prompt) if p.strip()]
        words = (paragraphs[-1] if paragraphs else "").split()[: max(0, max_tokens - count_tokens(ECHO_LABEL))]
        text = " ".join([ECHO_LABEL, *words])
        # Its completion tokens: never more than the caller reserved.
        return text, {"prompt_tokens": count_tokens(system) + count_tokens(prompt),
                      "completion_tokens": min(count_tokens(text), max_tokens)}

    async def _openai(self, alias_name: str, alias: ModelAlias, prompt: str, max_tokens: int, system: str,
                      prompt_tokens: int) -> tuple[str, dict[str, int]]:
        key = (self._read_secret(alias.api_key_secret, f"api key for model alias {alias_name}")
               if alias.api_key_secret else "")
        return await self._openai_pack.complete(alias_name, alias, prompt, max_tokens, system, api_key=key,
                                                prompt_tokens=prompt_tokens, transport=self._transport)
