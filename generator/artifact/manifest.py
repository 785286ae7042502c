"""`manifest.json`: what an artifact records, as one typed model, read and written only here.

Every archived manifest reads back into `Manifest` and writes out to the same bytes: a field
an older build did not record stays absent (pydantic's "unset"), so `Manifest.read(path).bytes()`
is the file itself. A new build sets every field it records, `None` included.

Schema 1 is a build whose reused units and carried tools may live in sibling versions;
schema 2 (this compiler) is self-contained: its transcript holds every exchange its files
came from, and the manifest what its migrations were planned from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from ..config import Pipeline, SandboxLevel
from ..errors import UserError
from ..frozen import Frozen
from ..hashing import canonical_json, json_hash

MANIFEST = "manifest.json"
SCHEMA = 2

# MAD -> table -> columns ({name, type, primary_key, nullable}, in spec order): artifact/migrate.py's Schema.
Storage = dict[str, dict[str, list[dict[str, Any]]]]


class GeneratorInfo(Frozen):
    name: str
    version: str


class ParamSurface(Frozen):
    type: str
    required: bool


class ToolSurface(Frozen):
    """What an MCP client relies on of one tool: its parameters and its result type."""

    params: dict[str, ParamSurface]
    returns: str


class UnitRecord(Frozen):
    """One synthesis unit as built: what it cost when its answers were made (a reuse or replay costs that on paper)."""

    unit: str
    request_hash: str
    files: tuple[str, ...]
    rounds: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    reused_from: str | None = None
    answered_by: tuple[str, ...] = Field(default=(), description="the models that answered, in order (a fallback, "
                                                                 "say); recorded since schema 2 builds of regen 0.11")
    elapsed_s: float | None = Field(default=None, description="the wall time of its answers when they were made "
                                                              "(seconds); set only when a model recorded one, so "
                                                              "manifests without it read and write as they were")


class Tokens(Frozen):
    prompt: int
    completion: int


class SandboxRecord(Frozen):
    level: SandboxLevel
    passed: int
    failed: int
    errors: int
    skipped: int


class BumpRecord(Frozen):
    kind: Literal["initial", "major", "minor", "patch"]
    reason: str
    changes: tuple[str, ...] = ()


class MigrationRecord(Frozen):
    number: int
    name: str
    destructive: bool


class MigrationBase(Frozen):
    """What this version's migrations were planned from: the parent's storage and how many migrations it had."""

    storage: Storage | None
    migrations: int


class UpgradeCheckRecord(Frozen):
    """One check of the upgrade test: the parent's state, read back by the new version."""

    what: str
    ok: bool
    detail: str = ""
    skipped: bool = False


class UpgradeRecord(Frozen):
    level: SandboxLevel
    ok: bool
    checks: tuple[UpgradeCheckRecord, ...]


class UnitLock(Frozen):
    """The build lock of one unit: hashes of what it was made from and of what it made."""

    inputs: dict[str, str]
    outputs: dict[str, str]
    reused_from: str | None = None
    regenerated_because: str | None = None


class ReviewRecord(Frozen):
    panel: str
    outcome: str
    reason: str
    repairs: int
    dissent: tuple[str, ...]
    cost_usd: float


class SigningRecord(Frozen):
    algorithm: str
    key_id: str
    development: bool
    signature: str
    public_key: str


class CarriedTool(Frozen):
    """A model-written tool the offline senior carried into this build instead of writing it."""

    unit: str
    source: str = Field(description="`name@version` of the archived build it was taken from")
    written_by: str = Field(description="the model that wrote it, in the build that first had it")
    contract: str = Field(description="the hash of its tool contract, the same here and in the source")
    method_sha256: str = Field(description="of the method's code, as lifted")
    tests_sha256: str = Field(description="of the tests that exercise it, as lifted")
    changed_since: tuple[str, ...] = Field(description="inputs of its unit that changed since the source build")

    def line(self, tool: str) -> str:
        """How summaries and review.md say it, one line per tool."""
        since = f"; {', '.join(self.changed_since)} changed since" if self.changed_since else "; nothing of its unit changed since"
        return f"{tool}: carried from {self.source.split('@', 1)[-1]}, written by {self.written_by}{since}"


class Manifest(Frozen):
    schema_version: int = Field(alias="schema")
    ecosystem: str
    version: str
    parent: str | None
    generator: GeneratorInfo
    offline: bool
    replayed_from: str | None
    pipeline: Pipeline
    inputs: dict[str, str]
    inputs_hash: str
    startup_order: tuple[str, ...]
    surface: dict[str, ToolSurface]
    storage: Storage
    units: tuple[UnitRecord, ...]
    tokens: Tokens
    cost_usd: float
    sandbox: SandboxRecord
    outputs: dict[str, str]
    root_hash: str
    bump: BumpRecord
    overrides: dict[str, str]
    migrations: tuple[MigrationRecord, ...]
    upgrade: UpgradeRecord | None
    lock: dict[str, UnitLock]
    review: ReviewRecord
    signing: SigningRecord
    # Schema 1 only: units the offline senior answered with a whole recorded answer (now: carried tools).
    recorded_answers: dict[str, str] | None = None
    # Schema 2: what makes a version self-contained and says where its parts came from.
    fresh: bool = False
    carried: dict[str, CarriedTool] = Field(default_factory=dict)
    migration_base: MigrationBase | None = None
    parameters_left_out: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="model -> the pipeline's parameters its provider does not take, not sent")

    model_config = Frozen.model_config | {"populate_by_name": True}

    @property
    def name(self) -> str:
        """`<ecosystem>@<version>`: how an artifact is named in records (never by a path)."""
        return f"{self.ecosystem}@{self.version}"

    @property
    def src_outputs(self) -> dict[str, str]:
        """The sha256 of every file of src/, by its path inside src/."""
        return {k.removeprefix("src/"): v for k, v in self.outputs.items() if k.startswith("src/")}

    @property
    def spec_inputs(self) -> dict[str, str]:
        return {k: v for k, v in self.inputs.items() if k.startswith("spec/")}

    def data(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def bytes(self) -> bytes:
        return canonical_json(self.data()).encode("utf-8")

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_bytes(self.bytes())
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of the artifact in `folder`; a UserError saying what is wrong when there is none to read."""
        path = folder / MANIFEST
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise UserError(f"{folder}: not an artifact: it has no {MANIFEST}; pass a folder such as "
                            "ecosystems/madgroup/1.0.0") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot be read: {exc.strerror or exc}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the manifest"
            raise UserError(f"{path}: not a manifest regen can read: {where}: {first['msg']}") from None


def root_hash(outputs: dict[str, str]) -> str:
    """The hash that stands for every output: the signature covers the manifest, which carries this."""
    return json_hash(outputs)
