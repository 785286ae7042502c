"""The senior's answer: one JSON shape for every model, parsed and validated before anything else looks at it."""

from __future__ import annotations

from pydantic import Field, ValidationError, field_validator

from ..errors import AnswerRejected
from ..frozen import Frozen
from .models import ModelReply

MAX_ANSWER_BYTES = 4 * 1024 * 1024


class AnswerFile(Frozen):
    path: str = Field(min_length=1)
    content: str

    @field_validator("content")
    @classmethod
    def _unix_line_endings(cls, content: str) -> str:
        # Files are written with \n line endings, whatever the model answered with.
        return content.replace("\r\n", "\n")


class Answer(Frozen):
    """The senior's answer format, the same for every model."""

    files: list[AnswerFile] = Field(min_length=1)



def unfenced(content: str) -> str:
    """The JSON in a model's answer: models often fence it in ``` despite being asked not to."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[-1].rsplit("```", 1)[0]
    return text


def parse_answer(unit: str, reply: ModelReply) -> Answer:
    """Parse and validate an answer; a bad one is rejected with what was wrong."""
    size = len(reply.content.encode("utf-8", "surrogatepass"))
    if size > MAX_ANSWER_BYTES:
        raise AnswerRejected(unit, [f"the answer is {size} bytes, over the {MAX_ANSWER_BYTES} limit"])
    text = unfenced(reply.content)
    if not text:
        raise AnswerRejected(unit, ["the answer was empty"])
    try:
        return Answer.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise AnswerRejected(unit, [f'the answer is not {{"files": [{{"path", "content"}}]}}: {where}: {first["msg"]}'])
