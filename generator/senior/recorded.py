"""Answers recorded by archived builds, by prompt (transitional: replaced by carried tools)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BuildFailed
from .answer import Answer
from .models import ModelClient, ModelReply, ModelRequest


class RecordedAnswers:
    """Answers from archived builds, by prompt: what a model once wrote for exactly this prompt.

    The offline pipeline answers the units it cannot write (tools with no capability) from
    here, so a spec that once had a model write them rebuilds offline, until its prompts change.
    """

    def __init__(self, transcripts: list[tuple[str, Path]]):
        self.answers: dict[str, tuple[str, ModelReply]] = {}
        for label, path in transcripts:  # newest first: the first answer recorded for a prompt wins
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                continue  # an unreadable record answers nothing; the units it would serve are then named
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                try:
                    request = ModelRequest(
                        unit=entry["unit"], model=entry["model"], messages=tuple(entry["messages"]),
                        temperature=0, seed=None, max_tokens=1,
                        response_schema=Answer.model_json_schema()
                        if entry.get("parameters", {}).get("structured_output") else None,
                    )
                    reply = ModelReply(
                        content=entry["response"], model=entry.get("answered_by") or entry["model"],
                        finish_reason=entry.get("finish_reason"), prompt_tokens=entry["usage"]["prompt_tokens"],
                        completion_tokens=entry["usage"]["completion_tokens"], cost_usd=entry.get("cost_usd", 0.0),
                    )
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
                self.answers.setdefault(request.prompt_hash, (label, reply))

    def source_of(self, request: ModelRequest) -> str | None:
        found = self.answers.get(request.prompt_hash)
        return found[0] if found else None


class OfflineWithRecorded:
    """The offline senior for what it can write; recorded answers for the units it cannot."""

    def __init__(self, offline: ModelClient, recorded: RecordedAnswers, units: set[str]):
        self.offline = offline
        self.recorded = recorded
        self.units = units

    def complete(self, request: ModelRequest) -> ModelReply:
        if request.unit not in self.units:
            return self.offline.complete(request)
        found = self.recorded.answers.get(request.prompt_hash)
        if found is None:
            raise BuildFailed(f"unit {request.unit} needs a model: no archived build answered this prompt")
        return found[1].model_copy(update={"cached": True, "latency_ms": 0, "attempts": 0})
