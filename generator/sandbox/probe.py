"""The upgrade test's two halves, run inside the sandbox by an ecosystem's own interpreter.

    python probe.py write PLAN   (the parent version, from its src/)
    python probe.py read PLAN    (the new version, from its src/, on the same state)

`write` starts the parent ecosystem and, through its MCP tools, creates a conversation with a
message and stores a secret; then, through the kernel's storage API, puts a row in every
table the parent declares. `read` starts the new version on that state and reads it all back.
PLAN (JSON) names the package, the state folder, the tool bound to each capability and the
files the halves write (`<phase>.json`: checks, and what was written). It imports nothing
from regen: it runs with only the ecosystem's dependencies.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

MESSAGE = "written by the parent version, read by the new one"
SECRET = "upgrade_check"
SECRET_VALUE = "upgrade-check-value-7f3a"
SAMPLES: dict[str, Any] = {"text": "upgrade check", "integer": 41, "real": 2.5, "blob": b"upgrade", "json": '{"upgrade": true}'}


class Probe:
    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.package = plan["package"]
        self.state = Path(plan["state"])
        self.checks: list[dict[str, Any]] = []

    def check(self, what: str, ok: bool, detail: str = "", skipped: bool = False) -> None:
        self.checks.append({"what": what, "ok": ok, "detail": detail, "skipped": skipped})
        print(f"{'SKIP' if skipped else 'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)

    def tools(self, *capabilities: str) -> list[str] | None:
        """The tools bound to `capabilities`, or None (with a skipped check) when the spec binds none."""
        missing = [c for c in capabilities if c not in self.plan["tools"]]
        if missing:
            self.check(f"{' and '.join(capabilities)} survive the upgrade", True,
                       f"skipped: no tool of the spec is bound to {', '.join(missing)}", skipped=True)
            return None
        return [self.plan["tools"][c] for c in capabilities]

    def serving(self):
        """The version's own test harness, running it: tests/harness.py, or in a version built before the harness
        moved there (a parent), <package>/kernel/testing.py."""
        if (Path.cwd() / "tests" / "harness.py").is_file():
            sys.path.insert(0, str(Path.cwd() / "tests"))
            harness = importlib.import_module("harness")
        else:
            harness = importlib.import_module(f"{self.package}.kernel.testing")
        return harness.running_ecosystem(self.package, self.state, cwd=Path.cwd(), startup_timeout=60)

    def runtime(self):
        """The version's own Runtime on the state, in this process (how the storage API is reached)."""
        config = importlib.import_module(f"{self.package}.ecosystem").CONFIG
        runtime = importlib.import_module(f"{self.package}.kernel.runtime").Runtime(config, self.state)
        asyncio.run(runtime.start())
        return config, runtime

    # ---- the parent ---------------------------------------------------------------------------

    def write(self) -> dict[str, Any]:
        written: dict[str, Any] = {"rows": []}
        with self.serving() as eco:
            listed = set(eco.list_tools())
            if tools := self.present(listed, "conversations.create", "conversations.post", "conversations.history"):
                create, post, _ = tools
                conversation = eco.call(create, title="upgrade check")
                eco.call(post, conversation_id=conversation["id"], content=MESSAGE)
                written["conversation"] = conversation["id"]
            if tools := self.present(listed, "secrets.set", "secrets.get"):
                eco.call(tools[0], name=SECRET, value=SECRET_VALUE)
                written["secret"] = SECRET
        self.check("the parent version serves and takes writes", True)
        config, runtime = self.runtime()
        try:
            for mad in config.mads:
                for table in mad.storage:
                    values = {c["name"]: SAMPLES[c["type"]] for c in table["columns"]}
                    runtime.table_store(mad.name).insert(table["name"], **values)
                    written["rows"].append({"mad": mad.name, "table": table["name"], "columns": table["columns"],
                                            "values": {k: _plain(v) for k, v in values.items()}})
        finally:
            asyncio.run(runtime.stop())
        self.check("a row written to every table of the parent", True, f"{len(written['rows'])} table(s)")
        return written

    def present(self, listed: set[str], *capabilities: str) -> list[str] | None:
        tools = self.tools(*capabilities)
        if tools is not None and not set(tools) <= listed:
            self.check(f"{' and '.join(capabilities)} survive the upgrade", True,
                       f"skipped: the parent version has no {', '.join(sorted(set(tools) - listed))}", skipped=True)
            return None
        return tools

    # ---- the new version ----------------------------------------------------------------------

    def read(self, written: dict[str, Any]) -> None:
        with self.serving() as eco:
            self.check("the new version starts on the parent's state", True)
            if "conversation" in written and (tools := self.tools("conversations.history")):
                history = eco.call(tools[0], conversation_id=written["conversation"], limit=50)
                found = any(m.get("content") == MESSAGE for m in history)
                self.check("the parent's conversation and message are readable", found,
                           "" if found else f"history holds {len(history)} message(s), not the parent's")
            if "secret" in written and (tools := self.tools("secrets.get")):
                value = eco.call(tools[0], name=written["secret"]).get("value")
                # Never the value itself in a report: only whether it matched.
                self.check("the parent's secret decrypts to its value", value == SECRET_VALUE,
                           "" if value == SECRET_VALUE else "the value read differs from the value written")
        config, runtime = self.runtime()
        try:
            tables = {(m.name, t["name"]): t["columns"] for m in config.mads for t in m.storage}
            for row in written["rows"]:
                self.check_row(runtime, row, tables.get((row["mad"], row["table"])))
        finally:
            asyncio.run(runtime.stop())

    def check_row(self, runtime: Any, row: dict[str, Any], columns: list[dict[str, Any]] | None) -> None:
        what = f"the parent's row in {row['mad']}.{row['table']} is readable"
        if columns is None:
            self.check(what, True, "skipped: the new version dropped the table", skipped=True)
            return
        # Compared on the columns both versions declare with the same type (a drop or a narrowing was consented).
        before = {c["name"]: c["type"] for c in row["columns"]}
        same = [c["name"] for c in columns if before.get(c["name"]) == c["type"]]
        stored = runtime.table_store(row["mad"]).select(row["table"], limit=1000)
        found = any(all(_plain(r.get(c)) == row["values"][c] for c in same) for r in stored)
        self.check(what, found, f"compared on {', '.join(same) or 'no column'}" if found
                   else f"no stored row matches on {', '.join(same)} ({len(stored)} row(s))")


def _plain(value: Any) -> Any:
    """A value as JSON can carry it (blobs as hex)."""
    return {"blob": value.hex()} if isinstance(value, bytes) else value


def main(phase: str, plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    sys.path.insert(0, str(Path.cwd()))  # the version's src/, where its package is
    probe = Probe(plan)
    result: dict[str, Any] = {}
    try:
        if phase == "write":
            result["written"] = probe.write()
        else:
            probe.read(json.loads(Path(plan["files"]["write"]).read_text(encoding="utf-8"))["written"])
    except Exception as exc:  # recorded as the failed check it is; the traceback goes to the output
        traceback.print_exc()
        started = "the new version starts on the parent's state"
        what = started if phase == "read" and not any(c["what"] == started for c in probe.checks) else f"the {phase} half"
        probe.check(what, False, f"{type(exc).__name__}: {exc}"[-2000:])
    result["checks"] = probe.checks
    Path(plan["files"][phase]).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
