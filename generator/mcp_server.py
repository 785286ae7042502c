"""`regen mcp`: regen as an MCP server, so a coding agent can check, plan, build, verify, gate and diff a spec.

- Over stdio (the default), or streamable HTTP on 127.0.0.1 (`--http --port P`), where every request must carry
  `Authorization: Bearer <REGEN_MCP_TOKEN>`: a server that has no token to ask for does not start.
- Every tool has a typed input and output schema; a failure is a tool error (`isError`) whose text is the message the
  command line would print, with `_meta["regen/error"]`: {kind, exit_code, problems: [{file, line, message}]} (a
  spec's problems, each at its file:line).
- Paths are relative to `--root` (the server works there) and may not leave it, symlinks included.
- `regenerate` reports one progress notification per stage and unit; a cancelled build stops at its next stage,
  unit or sandbox poll (the sandbox's tests are killed at once), removes its staging folder and publishes nothing.
  One build per ecosystem at a time, whoever starts it: the second is told "busy" (`artifact/store.build_lock`).
"""

from __future__ import annotations

import hmac
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from . import __version__, cancel
from .artifact.history import VersionLine
from .errors import BuildCancelled, RegenError, SpecError, UserError
from .progress import Reporter

TOKEN_ENV = "REGEN_MCP_TOKEN"
ERROR_META = "regen/error"
T = TypeVar("T")

INSTRUCTIONS = """regen compiles a spec (requirements.md, principles.md, ecosystem.yaml and one YAML file per MAD under
mads/) into a tested, reviewed, signed ecosystem under ecosystems/<name>/<version>/. Edit the spec's files, call
`check`, then `regenerate`; `diff` shows what changed between versions, `verify` rebuilds an artifact from its
transcript, `gate` has the review panel judge it. Paths are relative to the server's root."""


# --- what the tools answer ------------------------------------------------------------------------


class CheckResult(BaseModel):
    spec: str
    ecosystem: str
    mads: int
    tools: int
    requirements: int = Field(description="requirements with ids (R1, R2, ...): the coverage matrix's rows")
    notes: list[str] = Field(description="requirements nothing names, each at its file:line")


class PlannedUnit(BaseModel):
    name: str
    owns: list[str]
    prompt_tokens: int
    max_tokens: int
    over_by: int = Field(description="tokens over the senior's window; 0 when it fits")


class PlanResult(BaseModel):
    ecosystem: str
    startup_order: list[str]
    talks_to: dict[str, list[str]]
    senior: str
    window: int | None = Field(description="the senior's context window in tokens; None offline or unknown")
    units: list[PlannedUnit]


class BuildOutcome(BaseModel):
    ecosystem: str
    version: str
    path: str
    up_to_date: bool = Field(description="nothing changed since `version`: nothing was built")
    bump: str
    bump_reason: str
    review: str = Field(description="the panel's outcome and reason")
    units_synthesised: list[str]
    units_reused: list[str]
    tests_passed: int
    tests_failed: int
    warnings: list[str]


class VerifyResult(BaseModel):
    artifact: str
    ok: bool
    signed_by: str
    files: int = Field(description="files of src/ rebuilt from the transcript")
    review: str
    problems: list[str]
    differences: list[str] = Field(description="files of src/ the rebuild did not reproduce")


class GateResult(BaseModel):
    artifact: str
    outcome: Literal["approve", "reject", "undecided"]
    exit_code: int = Field(description="what `regen gate` exits with: 0 approve, 1 reject, 2 undecided")
    reason: str
    report: str = Field(description="the folder with review.json, review.md and review.html")
    warnings: list[str]


class VersionsResult(BaseModel):
    ecosystem: str
    versions: list[VersionLine]


class DiffResult(BaseModel):
    old: str
    new: str
    spec: dict[str, str] = Field(description="spec file -> added / removed / modified")
    surface: list[str] = Field(description="tools and storage that changed")
    dependencies: dict[str, str]
    files: dict[str, str] = Field(description="file of src/ -> added / removed / modified")
    unchanged_files: int
    text: str = Field(description="the diff as `regen diff` prints it")


class InitResult(BaseModel):
    folder: str
    ecosystem: str
    files: list[str]


# --- the server ---------------------------------------------------------------------------------------


class Workspace:
    """The folder the server works in; every path a tool is given must stay inside it."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def path(self, given: str, what: str) -> Path:
        """`given`, relative to the root (an absolute path must already be inside it); a UserError otherwise."""
        if "\x00" in given:
            raise UserError(f"{what} {given!r} is not a path")
        resolved = (self.root / given).resolve()
        if not resolved.is_relative_to(self.root):
            raise UserError(f"{what} {given!r} is outside {self.root}: regen mcp reads and writes only under its "
                            "--root; give a path inside it")
        return resolved

    def show(self, path: Path) -> str:
        """A path as the caller should give it back: relative to the root."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def artifact(self, given: str) -> Path:
        """An archived build: a folder path (ecosystems/madgroup/1.3.21) or a reference (madgroup@1.3.21, madgroup)."""
        from .artifact.manifest import MANIFEST
        from .artifact.workcopy import resolve

        if "@" in given or "/" not in given:
            return resolve(self.path("ecosystems", "the archive folder"), given)
        folder = self.path(given, "the artifact")
        if not (folder / MANIFEST).is_file():
            raise UserError(f"{given} is not an archived build (it has no {MANIFEST}): give a folder like "
                            "ecosystems/madgroup/1.3.21, or a reference like madgroup@1.3.21; `versions` lists them")
        return folder


class McpReporter(Reporter):
    """A build's stages and units as MCP progress notifications, its warnings kept for the tool's answer."""

    def __init__(self, notify: Callable[[str], None]):
        super().__init__(quiet=True)
        self._notify = notify
        self.warnings: list[str] = []

    @contextmanager
    def stage(self, name: str, doing: str) -> Iterator[dict]:
        with super().stage(name, doing) as info:  # checks for cancellation first
            self._notify(f"{name}: {doing}")
            yield info

    def progress(self, name: str, doing: str) -> None:
        super().progress(name, doing)
        self._notify(f"{name}: {doing}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"warning: {text}", file=sys.stderr)  # the server's log; the answer carries them too


async def in_thread(work: Callable[[], T], cancellable: bool = False) -> T:
    """Run regen's (blocking) `work` in a worker thread. When the request is cancelled, a `cancellable` build is
    told to stop and the request ends only once it has (so no staging folder outlives it); other work is read-only,
    and its thread is left to finish an answer nobody waits for."""
    event = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        cancel.CANCEL.set(event)
        try:
            holder["value"] = work()
        except BaseException as exc:  # raised in the caller's task below
            holder["error"] = exc

    async def watch_for_cancel() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            event.set()  # cancelled (the client's cancel, or the server shutting down) or done: either way, stop

    if not cancellable:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    else:
        async with anyio.create_task_group() as group:
            group.start_soon(watch_for_cancel)
            await anyio.to_thread.run_sync(run)  # not abandoned: a cancel waits for the build to unwind
            group.cancel_scope.cancel()
    if "error" in holder:
        raise holder["error"]
    return holder["value"]


def _progress(ctx: Context) -> Callable[[str], None]:
    """A notifier a worker thread (or a thread it started) can call: one numbered progress message per stage."""
    token = anyio.lowlevel.current_token()
    count = 0
    lock = threading.Lock()

    def notify(message: str) -> None:
        nonlocal count
        with lock:
            count += 1
            step = count
        try:
            anyio.from_thread.run(ctx.report_progress, step, None, message, token=token)
        except Exception:  # a client gone or a loop shutting down: progress is best effort, the build goes on
            pass

    return notify


def tool_error(exc: BaseException) -> CallToolResult:
    """A regen error as the tool's error: the CLI's message, and its kind, exit code and spec problems in _meta."""
    if isinstance(exc, BuildCancelled):
        kind, code, text = "BuildCancelled", exc.exit_code, f"regen: {exc}"
    else:
        assert isinstance(exc, RegenError)
        kind, code, text = type(exc).__name__, exc.exit_code, f"{exc.prefix}{exc}"
    problems = [{"file": p.file, "line": p.line, "message": p.message}
                for p in (exc.problems if isinstance(exc, SpecError) else [])]
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True,
                          _meta={ERROR_META: {"kind": kind, "exit_code": code, "problems": problems}})


def build_server(root: Path) -> MCPServer:
    """The MCP server over the workspace `root` (the process works in it: relative defaults such as .regen/cache and
    pipelines/offline.toml are the root's)."""
    from .cli import default_pipeline

    space = Workspace(root)
    server = MCPServer("regen", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

    def pipeline_path(pipeline: str | None) -> Path:
        return space.path(pipeline, "the pipeline") if pipeline else default_pipeline().resolve()

    async def answer(work: Callable[[], BaseModel], cancellable: bool = False):
        try:
            return await in_thread(work, cancellable)
        except (RegenError, BuildCancelled) as exc:
            return tool_error(exc)

    @server.tool(annotations=read_only)
    async def check(spec: str = "spec") -> CheckResult:
        """Validate a spec folder: every problem at its file:line (in the error's _meta), or what it holds."""
        from .spec.load import load_spec

        def work() -> CheckResult:
            folder = space.path(spec, "the spec")
            loaded = load_spec(folder)
            notes = [f"{space.show(folder / 'requirements.md')}:{r.line}: {r.id} is named by no MAD and no acceptance "
                     "area" for r in loaded.unreferenced_requirements()]
            return CheckResult(spec=space.show(folder), ecosystem=loaded.ecosystem.name, mads=len(loaded.mads),
                               tools=sum(len(m.tools) for m in loaded.mads),
                               requirements=len(loaded.requirement_items), notes=notes)

        return await answer(work)

    @server.tool(annotations=read_only)
    async def plan(spec: str = "spec", pipeline: str | None = None) -> PlanResult:
        """The MAD graph, start-up order and synthesis units, each unit's prompt size against the senior's window."""
        from .config import load_pipeline
        from .senior import context
        from .senior.synthesise import first_request
        from .spec.load import load_spec
        from .spec.plan import make_plan

        def work() -> PlanResult:
            loaded = load_spec(space.path(spec, "the spec"))
            chosen = load_pipeline(pipeline_path(pipeline))
            made = make_plan(loaded)
            fits = context.fit([first_request(loaded, made, u, chosen) for u in made.units], chosen.senior)
            window = None if chosen.senior.is_offline or not fits else fits[0].window
            return PlanResult(
                ecosystem=made.ecosystem, startup_order=list(made.startup_order),
                talks_to={name: list(loaded.mad(name).talks_to) for name in made.startup_order},
                senior=chosen.senior.model, window=window,
                units=[PlannedUnit(name=u.name, owns=list(u.owns), prompt_tokens=f.prompt_tokens,
                                   max_tokens=f.max_tokens, over_by=f.over or 0) for u, f in zip(made.units, fits)])

        return await answer(work)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                             open_world_hint=False))
    async def regenerate(ctx: Context, spec: str = "spec", pipeline: str | None = None, fresh: bool = False
                         ) -> BuildOutcome:
        """Build the spec into the next version under ecosystems/<name>/ (or say it is up to date). Sends progress
        per stage; cancel it and nothing is archived. A second build of the same ecosystem is refused as busy."""
        from .build.context import BuildContext
        from .build.pipeline import regenerate as build
        from .config import RunOptions

        reporter = McpReporter(_progress(ctx))

        def work() -> BuildOutcome:
            options = RunOptions(spec_dir=space.path(spec, "the spec"), pipeline_file=pipeline_path(pipeline),
                                 out_dir=space.path("ecosystems", "the archive folder"), fresh=fresh,
                                 cache_dir=space.path(".regen/cache", "the cache"))
            result = build(BuildContext(options=options, report=reporter))
            m = result.manifest
            return BuildOutcome(
                ecosystem=result.ecosystem, version=result.version, path=space.show(result.path),
                up_to_date=result.up_to_date, bump=m.bump.kind, bump_reason=m.bump.reason,
                review=f"{m.review.outcome}: {m.review.reason}" if m.review else "no review recorded",
                units_synthesised=[u.unit for u in m.units if not u.reused_from],
                units_reused=[u.unit for u in m.units if u.reused_from],
                tests_passed=m.sandbox.passed, tests_failed=m.sandbox.failed, warnings=reporter.warnings)

        return await answer(work, cancellable=True)

    @server.tool(annotations=read_only)
    async def verify(ctx: Context, artifact: str) -> VerifyResult:
        """Check an archived build's signature, hashes and SBOM, and rebuild its src/ from its transcript byte for
        byte. `artifact`: a folder (ecosystems/madgroup/1.3.21) or a reference (madgroup@1.3.21, madgroup@latest)."""
        from .build.verify import verify as check_artifact

        reporter = McpReporter(_progress(ctx))  # made here: a worker thread cannot find the event loop

        def work() -> VerifyResult:
            folder = space.artifact(artifact)
            found = check_artifact(folder, report=reporter)
            return VerifyResult(artifact=space.show(folder), ok=found.ok, signed_by=found.signed_by, files=found.files,
                                review=found.review, problems=list(found.problems),
                                differences=list(found.differences))

        return await answer(work, cancellable=True)  # the rebuild stops, and its temporary folder goes

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                             open_world_hint=False))
    async def gate(ctx: Context, artifact: str | None = None, spec: str = "spec", pipeline: str | None = None,
                   trust_tests: bool = False, scope: Literal["parent", "approved", "full"] | None = None) -> GateResult:
        """Have the pipeline's review panel judge an archived build (default: the spec's newest) against its parent:
        approve, reject or undecided, with the report written under .regen/gate/<name>/<version>/."""
        from .errors import BuildFailed
        from .review.gate import gate as judge

        reporter = McpReporter(_progress(ctx))

        def work() -> GateResult:
            folder = space.artifact(artifact) if artifact else None
            try:
                result, report = judge(folder, space.path(spec, "the spec"), pipeline_path(pipeline),
                                       out_dir=space.path("ecosystems", "the archive folder"),
                                       trust_tests=trust_tests, cache_dir=space.path(".regen/cache", "the cache"),
                                       report=reporter, scope=scope)
            except BuildFailed as exc:  # the tests could not run: undecided, as `regen gate` exits 2
                return GateResult(artifact=space.show(folder) if folder else "", outcome="undecided", exit_code=2,
                                  reason=str(exc).splitlines()[0], report="", warnings=reporter.warnings)
            judged = folder or space.path("ecosystems", "the archive folder") / result.ecosystem / result.version
            return GateResult(artifact=space.show(judged), outcome=result.outcome, exit_code=result.exit_code,
                              reason=result.reason, report=space.show(report), warnings=reporter.warnings)

        return await answer(work, cancellable=True)

    @server.tool(annotations=read_only)
    async def versions(ecosystem: str) -> VersionsResult:
        """The archived versions of an ecosystem, oldest first, with their bumps, reviews and reuse."""
        from .artifact.history import version_lines
        from .artifact.workcopy import parse_ref

        def work() -> VersionsResult:
            name, _ = parse_ref(ecosystem)
            lines = version_lines(space.path("ecosystems", "the archive folder") / name)
            return VersionsResult(ecosystem=name, versions=lines)

        return await answer(work)

    @server.tool(annotations=read_only)
    async def diff(old: str, new: str = "") -> DiffResult:
        """What changed between two archived builds (NAME@VERSION, or NAME@latest): spec, tools, schema, dependencies
        and files. `new` defaults to the newest build of `old`'s ecosystem."""
        from .artifact.history import changes, render_text
        from .artifact.workcopy import parse_ref

        def work() -> DiffResult:
            a = space.artifact(old)
            b = space.artifact(new or f"{parse_ref(old)[0]}@latest")
            found = changes(a, b)
            return DiffResult(old=found.old, new=found.new, spec=found.spec, surface=list(found.surface),
                              dependencies=found.dependencies, files={f.path: f.status for f in found.files},
                              unchanged_files=found.unchanged_files, text=render_text(found, patch=False))

        return await answer(work)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    async def init(folder: str, name: str | None = None) -> InitResult:
        """Write a starter spec (two MADs bound to kernel capabilities) into a new or empty folder, ready to build."""
        from .spec.starter import init as start

        def work() -> InitResult:
            started = start(space.path(folder, "the folder"), name)
            return InitResult(folder=space.show(started.folder.resolve()), ecosystem=started.name,
                              files=list(started.files))

        return await answer(work)

    return server


# --- transports -----------------------------------------------------------------------------------------


def http_app(server: MCPServer, token: str, host: str):
    """The server's streamable HTTP app behind a bearer check: 401 without `Authorization: Bearer <token>`."""
    from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    security = TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                         allowed_hosts=[f"{host}:*", "localhost:*"],
                                         allowed_origins=[f"http://{host}:*", "http://localhost:*"])
    server.streamable_http_app(streamable_http_path="/mcp", host=host, transport_security=security)
    manager = server.session_manager
    inner = StreamableHTTPASGIApp(manager)
    expected = f"Bearer {token}".encode()

    class BearerGate:  # an ASGI app (a plain function would be taken for a GET-only endpoint)
        async def __call__(self, scope, receive, send) -> None:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                refusal = JSONResponse(
                    {"error": "unauthorized",
                     "message": f"regen mcp needs 'Authorization: Bearer <token>' with the value of {TOKEN_ENV}"},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="regen"'})
                await refusal(scope, receive, send)
                return
            await inner(scope, receive, send)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        async with manager.run():
            yield

    return Starlette(routes=[Route("/mcp", BearerGate())], lifespan=lifespan)


def serve(root: Path, http: bool = False, port: int = 8765, host: str = "127.0.0.1") -> None:
    """Run the server until its client goes away (stdio) or it is interrupted (HTTP)."""
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder")
    if http:
        token = os.environ.get(TOKEN_ENV, "")
        if len(token) < 16:
            raise UserError(f"regen mcp --http needs a bearer token of 16 characters or more in {TOKEN_ENV} (e.g. "
                            f"export {TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')); "
                            "every request must send it as 'Authorization: Bearer <token>'")
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise UserError(f"regen mcp serves HTTP on the loopback only, not {host}")
    os.chdir(root)  # the relative defaults of every command are the root's
    server = build_server(Path("."))
    if not http:
        print(f"regen mcp: serving MCP on stdio, root {Path.cwd()} (an MCP client starts this; see the README)",
              file=sys.stderr)
        anyio.run(server.run_stdio_async)  # the SDK points fd 1 at stderr meanwhile: a stray print misses the wire
        return
    import uvicorn

    print(f"regen mcp: http://{host}:{port}/mcp (bearer token from {TOKEN_ENV}), root {Path.cwd()}", file=sys.stderr)
    uvicorn.run(http_app(server, os.environ[TOKEN_ENV], host), host=host, port=port, log_level="warning")
