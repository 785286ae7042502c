"""The run configuration: the pipeline file (which model, which sandbox) and the run's options.

One validated, immutable object per run (STYLE.md rule 6): stages take what they need
from it and read no option from globals or the environment.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError

SandboxLevel = Literal["bubblewrap", "unshare", "none"]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeniorModel(Frozen):
    """The model that writes the ecosystem, as a litellm model string and its parameters."""

    model: str
    fallbacks: list[str] = Field(default_factory=list, description="tried in order when the senior fails")
    api_base: str | None = None
    api_key_env: str | None = Field(
        default=None, description="the environment variable holding the API key; default: litellm's own"
    )
    temperature: float = 0.0
    seed: int | None = 0
    max_tokens: int = Field(default=16_000, gt=0)
    context_window: int | None = Field(default=None, gt=0, description="overrides litellm's model info")
    timeout_seconds: float = Field(default=600, gt=0)
    max_retries: int = Field(default=4, ge=0, description="retries of 429, 5xx and timeouts, with backoff")
    backoff_seconds: float = Field(default=1.0, ge=0)

    @property
    def is_offline(self) -> bool:
        return self.model.startswith("offline/")


class Budgets(Frozen):
    """Ceilings a run stops at, cleanly, before the call that would cross them (None: no ceiling)."""

    run_tokens: int | None = Field(default=None, gt=0)
    run_cost_usd: float | None = Field(default=None, gt=0)
    unit_tokens: int | None = Field(default=None, gt=0)
    unit_cost_usd: float | None = Field(default=None, gt=0)


class Price(Frozen):
    """USD per million tokens, for models litellm has no price for (local, scripted, new)."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class SandboxSettings(Frozen):
    """Where the generated ecosystem's own tests run, and how tightly they are fenced."""

    require: SandboxLevel = Field(
        default="none", description="the weakest isolation level the build accepts"
    )
    timeout_seconds: int = Field(default=600, gt=0)
    memory_mb: int = Field(default=4096, gt=0)


class Pipeline(Frozen):
    name: str
    senior: SeniorModel
    sandbox: SandboxSettings = SandboxSettings()
    budgets: Budgets = Budgets()
    prices: dict[str, Price] = Field(default_factory=dict, description="by litellm model string")
    repair_rounds: int = Field(default=2, ge=0, description="repair requests per unit after a failed check or test")
    concurrency: int = Field(default=4, ge=1, description="units synthesised at once")


class RunOptions(Frozen):
    """What the user asked for on the command line."""

    spec_dir: Path
    pipeline_file: Path
    out_dir: Path
    cache_dir: Path | None = Field(default=None, description="the response cache folder; None: no cache")
    replay: Path | None = Field(default=None, description="an artifact whose transcript answers every request")


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate a pipeline TOML file; errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: pipeline file not found; pass --pipeline pipelines/offline.toml")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML: {exc}")
    try:
        return Pipeline.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise UserError(f"{path}: {problems}")
