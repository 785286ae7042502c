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
    api_base: str | None = None
    temperature: float = 0.0
    seed: int | None = 0
    max_tokens: int = Field(default=16_000, gt=0)
    timeout_seconds: float = Field(default=600, gt=0)

    @property
    def is_offline(self) -> bool:
        return self.model.startswith("offline/")


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


class RunOptions(Frozen):
    """What the user asked for on the command line."""

    spec_dir: Path
    pipeline_file: Path
    out_dir: Path
    skip_sandbox: bool = False


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
