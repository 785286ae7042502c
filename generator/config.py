"""The run configuration: the pipeline file (which model, which sandbox) and the run's options.

One validated, immutable object per run: stages take what they need
from it and read no option from globals or the environment.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

from .errors import SpecError, SpecProblem, UserError
from .frozen import Frozen

SandboxLevel = Literal["bubblewrap", "unshare", "none"]


class SeniorModel(Frozen):
    """The model that writes the ecosystem, as a litellm model string and its parameters."""

    model: str
    fallbacks: list[str] = Field(default_factory=list, description="tried in order when the senior fails")
    api_base: str | None = None
    api_key_env: str | None = Field(
        default=None, description="the environment variable holding the API key; default: litellm's own"
    )
    temperature: float = 0.0
    seed: int | None = Field(default=0, description="sent to providers that take one; false: never sent")
    max_tokens: int = Field(default=16_000, gt=0)
    context_window: int | None = Field(default=None, gt=0, description="overrides litellm's model info")
    timeout_seconds: float = Field(default=600, gt=0)
    max_retries: int = Field(default=4, ge=0, description="retries of 429, 5xx and timeouts, with backoff")
    backoff_seconds: float = Field(default=1.0, ge=0)

    @field_validator("model", "fallbacks")
    @classmethod
    def _known_offline_models(cls, value: str | list[str]) -> str | list[str]:
        """`offline/` is regen's own litellm provider: it serves only its reference synthesiser."""
        offline_models = ("offline/reference",)
        for model in [value] if isinstance(value, str) else value:
            if model.startswith("offline/") and model not in offline_models:
                raise ValueError(f"unknown offline model {model!r}; the only offline model is "
                                 f"{', '.join(repr(m) for m in offline_models)}")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_off(cls, value: object) -> object:
        """TOML has no null: `seed = false` switches the seed off (`true` means nothing, so it is refused)."""
        if value is False:
            return None
        if value is True:
            raise ValueError("seed = true is not a seed; give a number, or false to send none")
        return value

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


class ReviewSettings(Frozen):
    panel: str | None = Field(
        default=None,
        description="the panel file that judges each build, relative to the pipeline file; "
                    "default: regen's deterministic panel, reviews/panels/offline.toml",
    )
    scope: Literal["parent", "approved", "full"] = Field(
        default="approved",
        description="what LLM reviewers see of src/: the diff against the parent, against the newest ancestor a panel "
                    "at least this strict approved (the whole tree when none did), or every file",
    )


class Pipeline(Frozen):
    name: str
    senior: SeniorModel
    sandbox: SandboxSettings = SandboxSettings()
    budgets: Budgets = Budgets()
    prices: dict[str, Price] = Field(default_factory=dict, description="by litellm model string")
    repair_rounds: int = Field(default=2, ge=0, description="repair requests per unit after a failed check or test")
    concurrency: int = Field(default=4, ge=1, description="units synthesised at once")
    review: ReviewSettings = ReviewSettings()


class RunOptions(Frozen):
    """What the user asked for on the command line."""

    spec_dir: Path
    pipeline_file: Path
    out_dir: Path
    cache_dir: Path | None = Field(default=None, description="the response cache folder; None: no cache")
    replay: Path | None = Field(default=None, description="an artifact whose transcript answers every request")
    fresh: bool = Field(default=False, description="synthesise every unit again: nothing is reused from the parent, "
                                               "and the sandbox tests run even when this exact tree passed before")
    reports_dir: Path = Field(default=Path(".regen/reports"), description="where a rejected build's review goes")
    runs_dir: Path | None = Field(default=None, description="where run logs go; None: .regen/runs beside the out folder")

    @property
    def runs(self) -> Path:
        """The run logs' folder: every model attempt of a build, `<name>/<version>.jsonl`."""
        return self.runs_dir if self.runs_dir is not None else self.out_dir.parent / ".regen" / "runs"


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate a pipeline TOML file; errors name the file and the key, worded as the spec's."""
    return load_toml(path, Pipeline, "pipeline file", "pipelines/offline.toml", "--pipeline ")


Model = TypeVar("Model", bound=BaseModel)


def load_toml(path: Path, model: type[Model], what: str, example: str, option: str = "") -> Model:
    """Read and validate one TOML file as `model`; every error names the file and the key."""
    from .spec.load import Phrasing, explain_errors

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; pass {option}{example}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}; pass a .toml file such as {example}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 at byte {exc.start}; expected a TOML file saved as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise UserError(f"{path}: not valid TOML: {exc}") from None

    def table(_model: type[BaseModel] | None, keys: tuple) -> str:  # how TOML names a table
        return f"[{'.'.join(str(part) for part in keys)}]" if keys else f"the {what}"

    def key(keys: tuple) -> str:  # a dotted key, as TOML spells it
        dotted = ""
        for part in keys:
            dotted += f"[{part}]" if isinstance(part, int) else f".{part}" if dotted else str(part)
        return f"'{dotted}'" if dotted else f"the {what}"

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        phrasing = Phrasing(noun=table, label=key, text_hint="; quote it to make it text")
        errors = exc.errors(include_url=False)
        raise SpecError([SpecProblem(str(path), 0, message)
                         for _, message in explain_errors(model, data, errors, phrasing)]) from None
