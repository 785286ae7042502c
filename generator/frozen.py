"""`Frozen`: the one base of regen's typed values: immutable, and unknown keys are an error, never ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
