"""`regen gate`: judge an archived build with a panel and say, by exit code, whether it may ship.

0 the consensus rule holds, 1 the panel rejects, 2 it could not decide (too many
abstentions: errors, timeouts, the budget, missing keys). The report (review.json,
review.md, review.html) goes to a folder of its own: an archived artifact is never edited.
The sandbox tests are run again unless told to trust the artifact's tests.json, so a
planted failing test cannot hide behind a recorded pass.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..artifact.history import changes
from ..artifact.manifest import Manifest
from ..artifact.sign import verify_artifact
from ..artifact.store import versions
from ..config import SandboxSettings, load_pipeline
from ..errors import ArtifactRefused, UserError
from ..hashing import canonical_json, sha256_text
from ..progress import Reporter
from ..sandbox.run import run_tests
from ..senior.cache import ResponseCache
from ..senior.models import ModelClient
from ..senior.runlog import RunLog
from ..spec.load import load_spec
from .material import material
from .models import PanelReport, ReviewBinding, ScopeMode, Subject
from .panel import load_panel, panel_of
from .report import review_html, review_json, review_markdown
from .run import PanelRun, panel_report
from .scope import choose, panel_hash, reviewed_hash


def newest_artifact(out_dir: Path, ecosystem: str) -> Path:
    found = versions(out_dir / ecosystem)
    if not found:
        raise UserError(f"no archived build of {ecosystem} in {out_dir / ecosystem}; run `nox -s regenerate` first, "
                        "or name the artifact: regen gate ecosystems/<name>/<version>")
    return out_dir / ecosystem / found[-1]


def write_report(report: PanelReport, folder: Path) -> None:
    """review.json, review.md and review.html, each replaced whole (never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("review.json", review_json(report)), ("review.md", review_markdown(report)),
                       ("review.html", review_html(report))):
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, folder / name)


def sandbox_tests(src: Path, settings: SandboxSettings, level: str | None, report: Reporter) -> dict:
    with tempfile.TemporaryDirectory(prefix="regen-gate-") as scratch:
        with report.stage("test", "the artifact's own tests in the sandbox, again") as info:
            tests = run_tests(src, settings, Path(scratch) / "work", level=level, warn=report.warn)
            info["note"] = f"{tests.passed} passed, {tests.failed + tests.errors} failed ({tests.level})"
    return tests.record()


def gate(
    artifact: Path | None,
    spec_dir: Path,
    pipeline_file: Path,
    panel_file: Path | None = None,
    report_dir: Path | None = None,
    out_dir: Path = Path("ecosystems"),
    trust_tests: bool = False,
    cache_dir: Path | None = None,
    clients: Mapping[str, ModelClient] | None = None,
    sandbox_level: str | None = None,
    report: Reporter | None = None,
    scope: ScopeMode | None = None,
    trust: Path | None = None,
) -> tuple[PanelReport, Path]:
    """Review `artifact` (default: the newest build of the spec's ecosystem); the report and where it went.
    The artifact is verified first: a tampered or unsigned one is refused before anything is judged."""
    report = report or Reporter()
    with report.stage("load", "spec, pipeline, panel and artifact") as info:
        spec = load_spec(spec_dir)
        pipeline = load_pipeline(pipeline_file)
        panel = load_panel(panel_file) if panel_file else panel_of(pipeline, pipeline_file)
        artifact = artifact or newest_artifact(out_dir, spec.ecosystem.name)
        manifest = Manifest.read(artifact)
        if not (artifact / "src").is_dir():
            raise UserError(f"{artifact}: has no src/ folder to review")
        if manifest.ecosystem != spec.ecosystem.name:
            raise UserError(f"{artifact} is a build of {manifest.ecosystem}, but {spec_dir} is the spec of "
                            f"{spec.ecosystem.name}; pass --spec with the spec it was built from")
        built_from = manifest.spec_inputs
        current = {f"spec/{f.path}": f.sha256 for f in spec.files}
        if built_from and built_from != current:
            changed = sorted(k for k in built_from.keys() | current.keys() if built_from.get(k) != current.get(k))
            report.warn(f"{artifact} was built from another version of the spec ({', '.join(changed[:5])} differ): "
                        "it is judged against the spec as it is now")
        info["note"] = f"{artifact}, panel {panel.name} ({len(panel.reviewers)} reviewers)"
    with report.stage("check", "the artifact's signature and every file hash, before judging it") as info:
        integrity = verify_artifact(artifact, trust)
        if not integrity.signature.signed:
            raise ArtifactRefused(f"{artifact} is not signed ({integrity.signature.problem}): a gate judges only "
                                  "signed artifacts; rebuild it with `nox -s regenerate`")
        if not integrity.ok:
            problems = integrity.problems
            raise ArtifactRefused(f"{artifact} does not verify, so it is not judged: " + "; ".join(problems[:5])
                                  + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
                                  + f". Run `regen verify {artifact}` for the whole list.")
        info["note"] = f"signed by key {integrity.signature.key_id}; {len(manifest.outputs)} files hold"
    if integrity.signature.development:
        report.warn(f"{artifact} is signed by a development key ({integrity.signature.key_id}): anyone with this "
                    "checkout can sign with it")
    elif trust is None:
        report.warn(f"{artifact} is signed by key {integrity.signature.key_id}, which was not checked against a key "
                    "you trust; pass --trust KEY.pub.pem to require yours")
    parent = artifact.parent / manifest.parent if manifest.parent else None
    if parent is not None and not (parent / "src").is_dir():
        report.warn(f"the parent version {parent} is not here: the dependencies reviewer cannot compare locks")
        parent = None
    if parent is not None:
        try:
            Manifest.read(parent)
        except UserError as exc:  # found out now, before anyone is paid to review
            report.warn(f"the parent version {parent} cannot be read ({str(exc).splitlines()[0]}): it is left out")
            parent = None
    baseline, chosen = choose(scope or pipeline.review.scope, panel, artifact.parent, manifest.parent, trust)
    report.progress("review", f"scope: {chosen.reason}")
    if trust_tests or not any(r.kind == "tests" for r in panel.reviewers):
        try:
            tests = json.loads((artifact / "tests.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            hint = "; drop --trust-tests to run the tests again" if trust_tests else ""
            raise UserError(f"{artifact}/tests.json cannot be read ({exc}){hint}") from None
    else:
        tests = sandbox_tests(artifact / "src", pipeline.sandbox, sandbox_level, report)
    subject = Subject(artifact=artifact, parent=parent, spec=spec,
                      material=material(spec, artifact, baseline, manifest.data(), tests, chosen))
    run = PanelRun(panel, clients, pipeline.prices, ResponseCache(cache_dir) if cache_dir else None,
                   on_verdict=lambda v: report.progress("review", v.line),
                   on_event=RunLog(report).record)  # retries and fallbacks on screen; a gate keeps no run log
    with report.stage("review", f"panel {panel.name}: {', '.join(r.name for r in panel.reviewers)}") as info:
        result = panel_report(subject, panel, run.review(subject))
        info["note"] = f"{result.outcome}: {result.final.consensus.arithmetic}"
    if parent is not None:
        result = result.model_copy(update={"changes": changes(parent, artifact).summary()})
    result = result.model_copy(update={"bound": ReviewBinding(
        artifact=f"{manifest.ecosystem}@{manifest.version}",
        # the tests the panel judged: the artifact's tests.json, or the results of running them again
        reviewed_hash=reviewed_hash({**manifest.outputs, "tests.json": sha256_text(canonical_json(tests))}),
        artifact_root_hash=manifest.root_hash, panel_hash=panel_hash(panel), scope=chosen)})
    for line in result.uncertainties:
        report.warn(line)
    folder = report_dir or gate_reports_dir(out_dir) / spec.ecosystem.name / artifact.name
    write_report(result, folder)
    return result, folder


def gate_reports_dir(out_dir: Path) -> Path:
    """Where `regen gate` keeps its reports by default: `.regen/gate` beside the archive folder."""
    return out_dir.parent / ".regen" / "gate"
