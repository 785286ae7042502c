"""Sessions: `nox -s regenerate` builds spec/ into ecosystems/; `nox -s tests` runs the suite.

Every session installs the project from `uv.lock` exactly (`uv sync --frozen`), so what
runs here is what was locked.
"""

import shutil
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["regenerate"]
nox.options.reuse_venv = "yes"


def _sync(session: nox.Session, *groups: str) -> None:
    args = ["uv", "sync", "--frozen", "--no-default-groups"]
    for group in groups:
        args += ["--group", group]
    session.run_install(*args, env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location})


@nox.session
def regenerate(session: nox.Session) -> None:
    """Compile spec/ into ecosystems/<name>/<version>/ (offline default; pass a pipeline after --)."""
    _sync(session)
    session.run("regen", "regenerate", *session.posargs)


@nox.session
def scripted(session: nox.Session) -> None:
    """Build with the scripted senior on 127.0.0.1 (pipelines/scripted.toml): the HTTP path, no real model."""
    _sync(session)
    session.env["SCRIPTED_API_KEY"] = "scripted"
    session.run(
        "python", "-m", "generator.scripted", "--reference", "--port", "8911", "--model", "scripted-senior",
        # --no-cache: the scripted answers follow pipelines/scripted/, which requests do not carry.
        "--", "regen", "regenerate", "--pipeline", "pipelines/scripted.toml", "--no-cache", *session.posargs,
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The compiler's test suite, including a full offline build in the sandbox."""
    _sync(session, "dev")
    session.run("pytest", *session.posargs)


@nox.session
def gate(session: nox.Session) -> None:
    """Judge the newest build with the pipeline's review panel: exit 0 approve, 1 reject, 2 undecided.

    `nox -s gate -- ecosystems/madgroup/1.0.3 --report DIR --pipeline pipelines/frontier.toml`
    """
    _sync(session)
    session.run("regen", "gate", *session.posargs)


@nox.session
def verify(session: nox.Session) -> None:
    """`regen verify` every archived version (signature, hashes, SBOM, byte-for-byte replay); with diffoscope
    installed, the replayed src/ is also compared with the archived one by diffoscope."""
    _sync(session)
    diffoscope = shutil.which("diffoscope")
    if diffoscope is None:
        session.log("diffoscope is not installed: verifying with regen alone (apt-get install diffoscope adds it)")
    manifests = sorted(Path("ecosystems").glob("*/*/manifest.json"),
                       key=lambda m: (m.parent.parent.name, tuple(int(x) for x in m.parent.name.split("."))))
    for manifest in manifests:
        artifact = manifest.parent
        with tempfile.TemporaryDirectory(prefix="regen-verify-") as kept:
            session.run("regen", "verify", str(artifact), *(["--keep", kept] if diffoscope else []), *session.posargs)
            if diffoscope:
                # File times differ by nature (the archive was written earlier); contents and modes must not.
                session.run(diffoscope, "--exclude-directory-metadata=yes", str(artifact / "src"), str(Path(kept) / "src"),
                            external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, measured side by side in one run; results in .regen/bench/."""
    _sync(session)
    session.run("python", "benchmarks/cli_startup.py")
    session.run("python", "benchmarks/pipeline_overhead.py")
    session.run("python", "benchmarks/panel_wall.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the compiler, its tests and benchmarks."""
    _sync(session, "dev")
    session.run("ruff", "check", "generator", "tests", "benchmarks", "noxfile.py")
