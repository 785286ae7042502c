"""Context planning: every request is counted against the senior's context window first.

The window comes from the pipeline (`context_window`) or litellm's model info; a unit
whose prompt plus the answer it may need (`max_tokens`) does not fit stops the build
before any call, saying how much is over and what to do about it.
"""

from __future__ import annotations

from ..config import SeniorModel
from ..errors import UserError
from ..frozen import Frozen
from .client import load_litellm
from .models import ModelRequest


class ContextFit(Frozen):
    unit: str
    prompt_tokens: int
    max_tokens: int
    window: int | None

    @property
    def needed(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def over(self) -> int:
        return 0 if self.window is None else max(0, self.needed - self.window)


def count_tokens(request: ModelRequest) -> int:
    """litellm's token counter for the request's model (its default tokenizer when unknown)."""
    if request.model.startswith("offline/"):
        return sum(len(m["content"]) for m in request.messages) // 4
    litellm = load_litellm()
    return int(litellm.token_counter(model=request.model, messages=[dict(m) for m in request.messages]))


def window_of(senior: SeniorModel) -> int | None:
    """The senior's context window: the pipeline's override, else litellm's model info, else unknown."""
    if senior.context_window:
        return senior.context_window
    if senior.is_offline:
        return None
    try:
        info = load_litellm().get_model_info(senior.model)
    except Exception:  # not in litellm's table: unknown, and `context_window` in the pipeline fixes it
        return None
    return info.get("max_input_tokens") or info.get("max_tokens")


def fit(requests: list[ModelRequest], senior: SeniorModel) -> list[ContextFit]:
    window = window_of(senior)
    return [ContextFit(unit=r.unit, prompt_tokens=count_tokens(r), max_tokens=r.max_tokens, window=window) for r in requests]


def require_fit(fits: list[ContextFit], senior: SeniorModel) -> None:
    over = [f for f in fits if f.over]
    if over:
        lines = [
            f"unit {f.unit} needs {f.needed:,} tokens ({f.prompt_tokens:,} of prompt + up to {f.max_tokens:,} "
            f"of answer), over {senior.model}'s window of {f.window:,} by {f.over:,}"
            for f in over
        ]
        raise UserError(
            "\n".join(lines) + "\nLower [senior] max_tokens, choose a senior with a larger window, "
            "or split the MAD's tools across smaller MADs."
        )
