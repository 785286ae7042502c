"""`transcript.jsonl`: every exchange of a build with its senior, and that record as a model.

One JSON object a line, in plan order (unit, then round). A build's transcript holds every
exchange its files came from, those of units reused from the parent included (marked with
`reused_from`), so a version replays alone, copied anywhere. Only what the model was asked
and answered is kept (and which model answered), and how long the answer took when it was made
(`elapsed_s`, absent for the offline reference, which is not a model, and in transcripts older than
it): a replay, a reuse or a cache hit takes that from the record, so a rebuild from the transcript
writes the same bytes. Retries and cache hits vary run to run and are shown on screen and in the
run log (senior/runlog.py), never archived.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from pydantic import Field, ValidationError

from ..errors import BuildFailed, UserError
from ..frozen import Frozen
from .answer import Answer
from .models import Exchange, ModelReply, ModelRequest

TRANSCRIPT = "transcript.jsonl"
REPAIRS = ("repair-tests", "repair-review")


class Parameters(Frozen):
    temperature: float
    seed: int | None
    max_tokens: int
    api_base: str | None
    structured_output: bool


class Usage(Frozen):
    prompt_tokens: int
    completion_tokens: int


class TranscriptLine(Frozen):
    """One exchange, as a line of the transcript."""

    request_hash: str
    unit: str
    round: int
    purpose: str
    model: str
    answered_by: str
    parameters: Parameters
    messages: tuple[dict[str, str], ...]
    response: str
    finish_reason: str | None
    usage: Usage
    cost_usd: float
    reused_from: str | None = Field(default=None, description="the version this exchange was made for, when reused")
    elapsed_s: float | None = Field(default=None, description="the answer's wall time when it was made; absent when "
                                                              "unknown (the offline reference, older transcripts)")

    @classmethod
    def of(cls, e: Exchange) -> TranscriptLine:
        return cls(
            request_hash=e.request.hash, unit=e.request.unit, round=e.round, purpose=e.purpose, model=e.request.model,
            answered_by=e.reply.model or e.request.model,
            parameters=Parameters(temperature=e.request.temperature, seed=e.request.seed, max_tokens=e.request.max_tokens,
                                  api_base=e.request.api_base, structured_output=e.request.response_schema is not None),
            messages=e.request.messages, response=e.reply.content, finish_reason=e.reply.finish_reason,
            usage=Usage(prompt_tokens=e.reply.prompt_tokens, completion_tokens=e.reply.completion_tokens),
            cost_usd=e.reply.cost_usd, reused_from=e.reused_from, elapsed_s=e.reply.elapsed_s,
        )

    def reply(self) -> ModelReply:
        """The recorded answer, as a reply that cost nothing now."""
        return ModelReply(content=self.response, model=self.answered_by, finish_reason=self.finish_reason,
                          prompt_tokens=self.usage.prompt_tokens, completion_tokens=self.usage.completion_tokens,
                          cost_usd=self.cost_usd, latency_ms=0, attempts=0, cached=True, elapsed_s=self.elapsed_s)

    def request(self) -> ModelRequest:
        """The request this line answered, as it was sent."""
        return ModelRequest(unit=self.unit, model=self.model, messages=self.messages,
                            temperature=self.parameters.temperature, seed=self.parameters.seed,
                            max_tokens=self.parameters.max_tokens, api_base=self.parameters.api_base,
                            response_schema=Answer.model_json_schema() if self.parameters.structured_output else None)

    def exchange(self, reused_from: str) -> Exchange:
        """This line as an exchange of a build that reuses it; `reused_from` names the version it was made for."""
        return Exchange(request=self.request(), reply=self.reply(), round=self.round, purpose=self.purpose,
                        reused_from=self.reused_from or reused_from)


def write_transcript(path: Path, exchanges: list[Exchange]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for e in exchanges:
            line = TranscriptLine.of(e).model_dump(mode="json", exclude_none=False)
            for key in ("reused_from", "elapsed_s"):  # absent rather than null: as in transcripts older than them
                if line[key] is None:
                    del line[key]
            out.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())


def read_transcript(path: Path) -> list[TranscriptLine]:
    """Every line of a transcript; a line that is not one is a UserError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the transcript: {exc}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            lines.append(TranscriptLine.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            raise UserError(f"{path}:{number}: not a transcript line: {where}: {first['msg']}") from None
    return lines


def by_unit(lines: list[TranscriptLine]) -> dict[str, list[TranscriptLine]]:
    units: dict[str, list[TranscriptLine]] = {}
    for line in lines:
        units.setdefault(line.unit, []).append(line)
    return units


def accepted_answer(lines: list[TranscriptLine]) -> str | None:
    """The answer a unit's conversation ended with: its last answer, with the continuations that followed it.

    By position, not by round number: a check repair during synthesis and the first test repair may share one."""
    starts = [i for i, line in enumerate(lines) if line.purpose != "continue"]
    if not starts:
        return None
    return "".join(line.response for line in lines[starts[-1]:])


class TranscriptModel:
    """A recorded build as the model: each request gets the answer recorded for it.

    A request is matched by its hash. A repair after failed tests or a review is matched by
    its place in the unit's conversation instead, because its prompt quotes the sandbox's
    output or the reviewers' findings, which need not be byte-identical from run to run.
    """

    def __init__(self, transcript: Path):
        self.source = transcript
        self.by_unit = by_unit(read_transcript(transcript))
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}

    def unanswered(self, unit: str) -> int:
        """How many recorded answers of `unit` have not been asked for yet."""
        return len(self.by_unit.get(unit, [])) - self._next.get(unit, 0)

    def complete(self, request: ModelRequest) -> ModelReply:
        with self._lock:
            recorded = self.by_unit.get(request.unit, [])
            index = self._next.get(request.unit, 0)
            after_tests = any(line.purpose in REPAIRS for line in recorded[:index + 1])
            if index < len(recorded) and (recorded[index].request_hash == request.hash or after_tests):
                self._next[request.unit] = index + 1
                return recorded[index].reply()
        raise BuildFailed(
            f"{self.source} has no answer for unit {request.unit} (request {request.hash[:12]}): "
            "its inputs (spec, prompts, kernel or pipeline) differ from the recorded build"
        )
