"""`regen mcp` as a coding agent uses it over stdio: the real `mcp` client against a spec in a folder of its own (the
starter spec of `init`, the quickest real build there is). HTTP: tests/test_mcp_http.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest
from mcp_helpers import _env, _error, _files, _started, _value, new_workspace, stdio

from generator.artifact.store import STAGING_PREFIX, build_lock

# --- the whole loop -------------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path) -> Path:
    return new_workspace(tmp_path)



@pytest.mark.slow
def test_an_agent_starts_builds_verifies_gates_edits_and_diffs_over_stdio(workspace):
    progress: list[str] = []

    async def on_progress(step: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def agent() -> dict:
        async with stdio(workspace) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            assert set(listed) == {"check", "plan", "regenerate", "verify", "gate", "diff", "versions", "init"}
            assert all(t.output_schema and t.output_schema["type"] == "object" for t in listed.values())
            started = _value(await client.call_tool("init", {"folder": "notes"}))
            assert started["ecosystem"] == "notes" and started["folder"] == "notes"
            checked = _value(await client.call_tool("check", {"spec": "notes"}))
            assert (checked["ecosystem"], checked["mads"]) == ("notes", 2)
            planned = _value(await client.call_tool("plan", {"spec": "notes"}))
            assert planned["startup_order"] == ["vault", "desk"] and planned["talks_to"]["desk"] == ["vault"]
            built = _value(await client.call_tool("regenerate", {"spec": "notes"}, progress_callback=on_progress))
            assert (built["version"], built["up_to_date"], built["path"]) == ("1.0.0", False, "ecosystems/notes/1.0.0")
            assert built["tests_passed"] > 0 and built["tests_failed"] == 0 and built["review"].startswith("approve")
            again = _value(await client.call_tool("regenerate", {"spec": "notes"}))
            assert again["up_to_date"] and again["version"] == "1.0.0"
            verified = _value(await client.call_tool("verify", {"artifact": "notes@1.0.0"}))
            assert verified["ok"] and verified["files"] > 0, verified
            gated = _value(await client.call_tool("gate", {"spec": "notes", "trust_tests": True}))
            assert (gated["outcome"], gated["exit_code"], gated["artifact"]) == ("approve", 0, "ecosystems/notes/1.0.0")
            assert (workspace / gated["report"] / "review.json").is_file()
            # the agent edits the spec, and regenerates: only what the edit reaches is made again
            requirements = workspace / "notes" / "requirements.md"
            requirements.write_text(requirements.read_text() + "\nNotes are kept for a year.\n")
            edited = _value(await client.call_tool("regenerate", {"spec": "notes"}))
            assert edited["version"] == "1.0.1"
            diff = _value(await client.call_tool("diff", {"old": "notes@1.0.0"}))
            assert diff["new"] == "notes@1.0.1" and diff["spec"] == {"requirements.md": "modified"}
            versions = _value(await client.call_tool("versions", {"ecosystem": "notes"}))
            return {"versions": [v["version"] for v in versions["versions"]]}

    assert anyio.run(agent) == {"versions": ["1.0.0", "1.0.1"]}
    stages = [m.split(":", 1)[0] for m in progress]
    assert {"load", "plan", "synthesise", "test", "emit"} <= set(stages), progress
    assert not list((workspace / "ecosystems" / "notes").glob(STAGING_PREFIX + "*"))


async def _build_until(client, stage: str, arguments: dict, on_stage):
    """Call regenerate; when its progress reaches `stage`, await `on_stage()`; the call's result."""
    reached = anyio.Event()

    async def on_progress(step: float, total: float | None, message: str | None) -> None:
        if (message or "").startswith(stage + ":"):
            reached.set()

    result = {}

    async def build() -> None:
        result["value"] = await client.call_tool("regenerate", arguments, progress_callback=on_progress)

    async with anyio.create_task_group() as group:
        group.start_soon(build)
        await reached.wait()
        await on_stage(group)
    return result.get("value")


# --- errors --------------------------------------------------------------------------------------------


def test_spec_errors_are_tool_errors_with_every_problem_at_its_file_and_line(workspace):
    spec = _started(workspace)
    desk = spec / "mads" / "desk.yaml"
    desk.write_text(desk.read_text().replace("talks_to: [vault]", "talks_to: [nobody]"))
    before = _files(workspace)

    async def agent():
        async with stdio(workspace) as client:
            return [_error(await client.call_tool(tool, {"spec": "notes"})) for tool in ("check", "plan", "regenerate")]

    for text, meta in anyio.run(agent):
        assert meta["kind"] == "SpecError" and meta["exit_code"] == 2
        assert [(p["file"], p["line"] > 0) for p in meta["problems"]] == [("notes/mads/desk.yaml", True)], meta
        assert "nobody" in meta["problems"][0]["message"] and f"notes/mads/desk.yaml:{meta['problems'][0]['line']}:" in text
    assert _files(workspace) == before  # no ecosystems/, nothing staged


@pytest.mark.parametrize(("tool", "arguments", "says"), [
    ("check", {"spec": "../outside"}, "is outside"),
    ("regenerate", {"spec": "/etc"}, "is outside"),
    ("regenerate", {"spec": "notes", "pipeline": "../../pipelines/offline.toml"}, "is outside"),
    ("init", {"folder": "escape/new-spec"}, "is outside"),  # a symlink out of the root
    ("init", {"folder": "../new-spec"}, "is outside"),
    ("verify", {"artifact": "notes@1.x"}, "is not a build reference"),
    ("verify", {"artifact": "notes@9.9.9"}, "no archived ecosystem 'notes'"),
    ("verify", {"artifact": "ecosystems/notes/1.0.0"}, "is not an archived build"),
    ("verify", {"artifact": "../../etc/passwd"}, "is outside"),
    ("gate", {"artifact": "notes@../1.0.0", "spec": "notes"}, "is not a build reference"),
    ("diff", {"old": "notes@1.0.0", "new": "other@1.0.0"}, "no archived ecosystem"),
    ("versions", {"ecosystem": "../notes"}, "is not a build reference"),
    ("versions", {"ecosystem": "notes"}, "no archived versions"),
])
def test_bad_input_is_a_clear_tool_error_and_writes_nothing(workspace, tmp_path, tool, arguments, says):
    _started(workspace)
    (tmp_path / "elsewhere").mkdir()
    (workspace / "escape").symlink_to(tmp_path / "elsewhere")
    before = _files(workspace), _files(tmp_path / "elsewhere"), _files(tmp_path)

    async def agent():
        async with stdio(workspace) as client:
            return _error(await client.call_tool(tool, arguments))

    text, meta = anyio.run(agent)
    assert says in text and meta["exit_code"] == 2 and meta["kind"] == "UserError", text
    assert (_files(workspace), _files(tmp_path / "elsewhere"), _files(tmp_path)) == before


# --- one build at a time, cancellation -------------------------------------------------------------------


@pytest.mark.slow
def test_one_build_per_ecosystem_whoever_starts_it(workspace):
    """A second build of the same ecosystem, by MCP or by the command line, is refused as busy while one runs; a lock
    held by another process refuses the MCP build too; once the build ends, the next one may start."""
    _started(workspace)
    seen = {}

    async def agent():
        async with stdio(workspace) as client:
            async def while_testing(group):
                seen["second"] = _error(await client.call_tool("regenerate", {"spec": "notes"}))
                cli = await anyio.run_process([sys.executable, "-m", "generator.cli", "regenerate", "--spec", "notes"],
                                              cwd=workspace, env=_env(), check=False)
                seen["cli"] = (cli.returncode, cli.stderr.decode())

            seen["first"] = _value(await _build_until(client, "test", {"spec": "notes", "fresh": True}, while_testing))
            with build_lock(workspace / "ecosystems" / "notes"):  # a CLI build in another shell, say
                seen["held"] = _error(await client.call_tool("regenerate", {"spec": "notes", "fresh": True}))

    anyio.run(agent)
    assert seen["first"]["version"] == "1.0.0"
    text, meta = seen["second"]
    assert meta["kind"] == "BuildBusy" and "another build of notes is running (pid" in text, text
    assert seen["cli"][0] == 2 and "another build of notes is running" in seen["cli"][1], seen["cli"]
    assert seen["held"][1]["kind"] == "BuildBusy" and f"pid {os.getpid()}" in seen["held"][0]
    assert sorted(p.name for p in (workspace / "ecosystems" / "notes").iterdir()) == [".lock", "1.0.0"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and str(os.getpid()) != proc.name:
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_a_build_cancelled_while_its_tests_run_stops_them_and_leaves_no_version(workspace):
    _started(workspace)
    eco = workspace / "ecosystems" / "notes"
    seen = {}

    async def agent():
        async with stdio(workspace) as client:
            async def cancel_it(group):
                seen["staged"] = [p.name for p in eco.glob(STAGING_PREFIX + "*")]
                for _ in range(600):  # until the ecosystem's own tests run in the sandbox
                    if seen.setdefault("sandbox", _processes_mentioning("/.sandbox/venv/bin/pytest")):
                        break
                    seen.pop("sandbox")
                    await anyio.sleep(0.1)
                group.cancel_scope.cancel()  # the client's cancellation: notifications/cancelled

            assert await _build_until(client, "test", {"spec": "notes", "fresh": True}, cancel_it) is None
            for _ in range(100):  # the server unwinds the build: the staging folder goes, then the lock
                if not list(eco.glob(STAGING_PREFIX + "*")) and not _processes_mentioning(str(eco / STAGING_PREFIX)):
                    break
                await anyio.sleep(0.1)
            # the lock goes as the build ends, and the folder with it when the build made it and left nothing
            seen["after"] = sorted(p.name for p in eco.iterdir() if p.name != ".build.lock") if eco.exists() else []
            seen["left running"] = _processes_mentioning(str(eco / STAGING_PREFIX))
            for _ in range(50):  # the lock is released once the build's thread has ended
                result = await client.call_tool("regenerate", {"spec": "notes"})
                if not result.is_error:
                    break
                assert result.meta["regen/error"]["kind"] == "BuildBusy", result.content[0].text
                await anyio.sleep(0.2)
            seen["next"] = _value(result)

    anyio.run(agent)
    assert len(seen["staged"]) == 1 and seen["sandbox"], "the build was in its sandbox tests when cancelled"
    assert seen["after"] == [], seen["after"]  # no version, no staging folder
    assert seen["left running"] == []  # the sandbox's processes were killed, not left to finish
    assert seen["next"]["version"] == "1.0.0" and not seen["next"]["up_to_date"]
