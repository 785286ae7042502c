"""The upgrade test: the new version must read the state the parent version wrote.

Inside the same fence as the ecosystem's own tests (generator.sandbox), each version gets
its own venv from its own lock; the parent is started on a fresh state folder and given
a conversation with a message and a secret (through the tools the spec binds to those
capabilities) and a row in every table it declares (through its kernel's storage API).
Then the new version starts on that same folder, migrating it if it must, and reads
everything back. The two halves are `probe.py`, run by each version's interpreter.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from ..artifact.manifest import UpgradeCheckRecord, UpgradeRecord
from ..config import SandboxLevel, SandboxSettings
from ..spec.model import Spec
from .run import make_venv, run_fenced

PROBE = Path(__file__).with_name("probe.py")
# The capabilities whose data the test writes with the parent and reads with the new version.
CAPABILITIES = ("conversations.create", "conversations.post", "conversations.history", "secrets.set", "secrets.get")


class UpgradeResult(UpgradeRecord):
    """What the manifest records of the test, and the run's raw output for the one who reads why it failed."""

    output_tail: str = ""

    def record(self) -> UpgradeRecord:
        """For the manifest: the checks without the run's raw output (paths and timings vary)."""
        return UpgradeRecord.model_validate(self.model_dump(mode="json", exclude={"output_tail"}))

    def failures(self) -> str:
        return "\n".join(f"  {c.what}: {c.detail}" for c in self.checks if not c.ok)


def capability_tools(spec: Spec) -> dict[str, str]:
    """The MCP tool bound to each capability the test uses (the first MAD by name, when several are)."""
    tools: dict[str, str] = {}
    for mad in spec.mads:
        for tool in mad.tools:
            if tool.builtin in CAPABILITIES:
                tools.setdefault(tool.builtin, f"{mad.name}.{tool.name}")
    return tools


def run_upgrade_test(parent_src: Path, new_src: Path, spec: Spec, settings: SandboxSettings, work: Path,
                     level: SandboxLevel) -> UpgradeResult:
    """Write state with the parent version, read it with the new one; never writes into either src.

    `level` is the isolation the ecosystem's tests ran at (run_tests has already held it to the
    pipeline's `require`); `work` is an empty folder on the same machine.
    """
    work = work.resolve()
    for folder in ("home", "tmp", "state"):
        (work / folder).mkdir(parents=True)
    shutil.copyfile(PROBE, work / PROBE.name)
    versions = {"write": work / "parent", "read": work / "new"}
    for phase, src in (("write", parent_src), ("read", new_src)):
        shutil.copytree(src, versions[phase] / "src")
        make_venv(versions[phase] / "src", versions[phase] / "venv", settings.timeout_seconds)
    files = {phase: str(work / f"{phase}.json") for phase in versions}
    plan = {"package": spec.ecosystem.name, "state": str(work / "state"), "tools": capability_tools(spec), "files": files}
    (work / "plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")

    checks: list[UpgradeCheckRecord] = []
    output: list[str] = []
    for phase, folder in versions.items():
        code, text = _run_phase(phase, folder, work, settings, level)
        output += [f"--- {phase} ({'parent' if phase == 'write' else 'new'} version) ---", *text.splitlines()]
        result = Path(files[phase])
        if result.is_file():
            checks += [UpgradeCheckRecord.model_validate(c) for c in json.loads(result.read_text(encoding="utf-8"))["checks"]]
        if code != 0 or not result.is_file():
            checks.append(UpgradeCheckRecord(what=f"the {phase} half ran", ok=False, detail=f"exit code {code}"))
        if not all(c.ok for c in checks):
            break  # the new version has nothing meaningful to read
    return UpgradeResult(level=level, ok=bool(checks) and all(c.ok for c in checks), checks=tuple(checks),
                         output_tail="\n".join(output[-80:]))


def _run_phase(phase: str, folder: Path, work: Path, settings: SandboxSettings, level: SandboxLevel) -> tuple[int, str]:
    """Run one half fenced, from the version's src/ with its venv; (exit code, output)."""
    venv, src = folder / "venv", folder / "src"
    python = venv / "bin" / "python"
    code, output = run_fenced([str(python), str(work / PROBE.name), phase, str(work / "plan.json")], src, venv, work,
                              level, settings)
    if code is None:
        return -signal.SIGKILL, f"{output}\nthe {phase} half ran over the {settings.timeout_seconds}s sandbox time limit"
    return code, output
