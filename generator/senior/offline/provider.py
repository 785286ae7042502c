"""The litellm custom provider `offline`, serving `offline/reference` through the same
`litellm.completion` path as any real model."""

from __future__ import annotations

from litellm import CustomLLM
from litellm.llms.custom_llm import CustomLLMError
from litellm.types.utils import ModelResponse

from . import answer_for


class OfflineReference(CustomLLM):
    """The litellm custom handler registered as provider `offline` (model `offline/reference`)."""

    def completion(self, model: str, messages: list, *args, **kwargs) -> ModelResponse:
        try:
            content = answer_for(messages)
        except ValueError as exc:
            raise CustomLLMError(400 if "<unit-spec>" in str(exc) else 422, str(exc))
        response = ModelResponse(model=model)
        response.choices[0].message.content = content
        response.choices[0].finish_reason = "stop"
        # No model ran: an offline build spends no tokens, and says so.
        response.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # type: ignore[assignment]
        return response
