"""End-to-end tests of Mcnamara: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R17')


def test_scan(eco):
    """mcnamara.scan: Scan the audit log since the last scan for denial spikes, failed sign-in bursts and unusual use; post findings to the security conversation."""
    from conftest import TOOL_FOR, query

    def security_posts() -> list:
        """What mcnamara posted to the conversation(s) titled 'security', oldest first."""
        titled = [c for c in eco.call(TOOL_FOR["conversations.list"], limit=1000) if c["title"] == 'security']
        assert titled, "no security conversation"
        return [m["content"] for c in titled
                for m in eco.call(TOOL_FOR["conversations.history"], conversation_id=c["id"], limit=1000)
                if m["sender"] == "mcnamara"]

    can_read_posts = "conversations.list" in TOOL_FOR and "conversations.history" in TOOL_FOR

    principal = f"client:{eco.token_name}"  # the audit's on_behalf_of for this test's MCP calls
    provoke = None
    if "files.write" in TOOL_FOR:
        def provoke(n):
            eco.call(TOOL_FOR["files.write"], path=f"../scan-escape-{n}.txt", content="x")
    elif "web.fetch" in TOOL_FOR:
        def provoke(n):
            eco.call(TOOL_FOR["web.fetch"], url=f"http://169.254.169.254/latest/meta-data/{n}")
    before = query(eco.state_dir, "SELECT COALESCE(MAX(id), 0) AS id FROM audit_log")[0]["id"]
    if provoke is not None:
        for n in range(12):
            with pytest.raises(ToolCallError):
                provoke(n)
        refused = query(eco.state_dir, "SELECT COUNT(*) AS n FROM audit_log WHERE id > ? AND ok = 0 AND "
                        "on_behalf_of = ?", (before, principal))[0]["n"]
        assert refused >= 12, "the refusals were not audited"
    scan = eco.call("mcnamara.scan")
    assert set(scan) - {"post_error"} == {"scanned", "since_id", "until_id", "findings", "posted", "backlog"}
    assert not scan.get("post_error")
    assert scan["since_id"] <= before <= scan["until_id"] and scan["scanned"] >= scan["until_id"] - before
    assert isinstance(scan["backlog"], bool) and scan["posted"] >= len(scan["findings"])
    fields = {"id", "kind", "severity", "actor", "remote", "count", "first_ts", "last_ts", "summary", "created_at"}
    assert all(set(f) == fields for f in scan["findings"])
    if provoke is not None:
        assert scan["until_id"] >= before + 12
        spikes = [f for f in scan["findings"] if f["kind"] == "denial-spike" and f["actor"] == principal]
        if not spikes and scan["since_id"] > 0:  # an earlier scan of this session raised it already
            spikes = [f for f in eco.call(tool_for("security.findings"), limit=1000)
                      if f["kind"] == "denial-spike" and f["actor"] == principal]
        assert spikes, f"no denial spike for {principal}: {scan['findings']}"
        assert spikes[0]["count"] >= 10 and spikes[0]["severity"] in ("medium", "high")
        assert principal in spikes[0]["summary"]
        if can_read_posts:
            assert any(f"denial-spike #{spikes[0]['id']}: " in post for post in security_posts())
        # More refusals in the same window: the spike is not raised again.
        for n in range(2):
            with pytest.raises(ToolCallError):
                provoke(100 + n)
    elif scan["posted"] and can_read_posts:
        assert any(post.startswith("Security scan: ") for post in security_posts())
    again = eco.call("mcnamara.scan", post=False)
    assert again["since_id"] == scan["until_id"] and again["until_id"] >= scan["until_id"]
    if provoke is not None:
        assert again["scanned"] >= 2
    assert again["posted"] == 0
    assert not [f for f in again["findings"] if f["kind"] == "denial-spike" and f["actor"] == principal]
    # Bad windows are refused; the pack keeps scanning.
    for window in (-1, 1441):
        with pytest.raises(ToolCallError):
            eco.call("mcnamara.scan", window_minutes=window)
    assert eco.call("mcnamara.scan", window_minutes=5, post=False)["since_id"] == again["until_id"]


def test_findings(eco):
    """mcnamara.findings: Stored security findings, newest first, optionally only those at least as severe as given."""
    from conftest import TOOL_FOR

    fields = {"id", "kind", "severity", "actor", "remote", "count", "first_ts", "last_ts", "summary", "created_at"}
    listed = eco.call("mcnamara.findings", limit=1000)
    assert all(set(f) == fields for f in listed)
    assert [f["id"] for f in listed] == sorted((f["id"] for f in listed), reverse=True)  # newest first
    if "security.report" in TOOL_FOR:
        high = eco.call(TOOL_FOR["security.report"], summary="findings-test: the high one", severity="high")
        low = eco.call(TOOL_FOR["security.report"], summary="findings-test: the low one", severity="low")
        assert eco.call("mcnamara.findings", limit=2) == [low, high]
        at_least_medium = eco.call("mcnamara.findings", limit=1000, severity="medium")
        assert high in at_least_medium and low not in at_least_medium
        assert {f["severity"] for f in at_least_medium} <= {"medium", "high", "critical"}
        assert low in eco.call("mcnamara.findings", limit=1000, severity="low")
    for bad in ({"severity": "urgent"}, {"severity": "HIGH"}, {"limit": 0}, {"limit": 1001}):
        with pytest.raises(ToolCallError):
            eco.call("mcnamara.findings", **bad)
    assert len(eco.call("mcnamara.findings", limit=1)) <= 1


def test_report(eco):
    """mcnamara.report: File a security report of your own, stored as a finding and posted to the security conversation."""
    from conftest import TOOL_FOR

    def security_posts() -> list:
        """What mcnamara posted to the conversation(s) titled 'security', oldest first."""
        titled = [c for c in eco.call(TOOL_FOR["conversations.list"], limit=1000) if c["title"] == 'security']
        assert titled, "no security conversation"
        return [m["content"] for c in titled
                for m in eco.call(TOOL_FOR["conversations.history"], conversation_id=c["id"], limit=1000)
                if m["sender"] == "mcnamara"]

    can_read_posts = "conversations.list" in TOOL_FOR and "conversations.history" in TOOL_FOR

    filed = eco.call("mcnamara.report", summary="report-test: disk on node-7 filled overnight; password=hunter2hunter2",
                     severity="medium")
    assert {k: filed[k] for k in ("kind", "severity", "actor", "remote", "count")} == {
        "kind": "report", "severity": "medium", "actor": "mcnamara", "remote": "", "count": 1}
    # Stored under the calling MAD's name, and never with what looks like a credential.
    assert filed["summary"] == ("report by mcnamara: report-test: disk on node-7 filled overnight; "
                                "password=[redacted]")
    assert filed["first_ts"] == filed["last_ts"]
    if "security.findings" in TOOL_FOR:
        assert filed in eco.call(TOOL_FOR["security.findings"], limit=1000)
        assert filed in eco.call(TOOL_FOR["security.findings"], limit=1000, severity="medium")
    for bad in ({"severity": "urgent"}, {"severity": "HIGH"}, {"severity": ""}, {"summary": "   "},
                {"summary": "x" * 2001}):
        with pytest.raises(ToolCallError):
            eco.call("mcnamara.report", **{"summary": "a bad report", "severity": "info", **bad})
    # The next scan posts it to the security conversation, still without the credential.
    if "security.scan" in TOOL_FOR:
        scan = eco.call(TOOL_FOR["security.scan"])
        assert not scan.get("post_error") and scan["posted"] >= 1
        if can_read_posts:
            posts = security_posts()
            assert any(f"report #{filed['id']}: report by mcnamara: report-test: " in post for post in posts)
            assert not any("hunter2" in post for post in posts)
    assert eco.call("mcnamara.report", summary="report-test: still taking reports")["severity"] == "info"
