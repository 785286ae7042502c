"""The litellm custom provider `offline`, serving `offline/reference` through the same
`litellm.completion` path as any real model."""

from __future__ import annotations

import json

from litellm import CustomLLM
from litellm.llms.custom_llm import CustomLLMError
from litellm.types.utils import ModelResponse

from . import UNIT_SPEC, render_unit


class OfflineReference(CustomLLM):
    """The litellm custom handler registered as provider `offline` (model `offline/reference`)."""

    def completion(self, model: str, messages: list, *args, **kwargs) -> ModelResponse:
        prompt = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        match = UNIT_SPEC.search(prompt)
        if match is None:
            raise CustomLLMError(400, "the prompt has no <unit-spec> block; offline/reference only writes units")
        try:
            files = render_unit(json.loads(match.group(1)))
        except ValueError as exc:
            raise CustomLLMError(422, str(exc))
        content = json.dumps({"files": files}, sort_keys=True, ensure_ascii=False)
        response = ModelResponse(model=model)
        response.choices[0].message.content = content
        response.choices[0].finish_reason = "stop"
        # No model ran: an offline build spends no tokens, and says so.
        response.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # type: ignore[assignment]
        return response
