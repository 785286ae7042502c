"""The security pack's catalogue: what it is for, its pinned dependencies,
its capabilities, the shapes of their results and their MCP hints.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import Capability, PackInfo, Shape
from ...capabilities import param as _p

PACK = PackInfo("security", "Security operations over the audit log: denial spikes, failed sign-in bursts, first-time "
                            "actions and secret reads against a rolling baseline, audit-chain damage; findings stored, "
                            "deduplicated and posted to the security conversation; MADs' own reports (stdlib only)")


class SecurityFinding(Shape):
    """A security finding: its kind ("denial-spike", "signin-burst", "new-action", "secret-read", "audit-chain",
    "report"), severity ("info" to "critical"), the actor and remote address it concerns (either may be ""), how
    many audit entries it stands for, the times of the first and last, a one-line summary, and when it was found."""

    id: int
    kind: str
    severity: str
    actor: str
    remote: str
    count: int
    first_ts: str
    last_ts: str
    summary: str
    created_at: str


class SecurityScan(Shape):
    """What a scan read (audit entries after `since_id` up to `until_id`), the findings it raised, how many
    findings its message posted (0 when none), and whether entries remain to scan (`backlog`); `post_error`
    when the post failed (the findings stay stored and are posted by the next scan)."""

    scanned: int
    since_id: int
    until_id: int
    findings: list[SecurityFinding]
    posted: int
    backlog: bool
    post_error: str | None = None


CAPABILITIES: tuple[Capability, ...] = (
    Capability("security.scan", "Scan the audit entries new since the last scan for denial spikes, failed "
                                "sign-in bursts, first-time actions and secret reads, and audit-chain damage; "
                                "store the findings and (post=true) post the unposted ones to the security "
                                "conversation. window_minutes 0 uses the pack's setting. Returns {scanned, "
                                "since_id, until_id, findings, posted, backlog}.",
               (_p("window_minutes", "int", 0), _p("post", "bool", True)), "dict", shape=SecurityScan,
               pack="security"),
    Capability("security.findings", "Stored security findings, newest first; severity '' for all, else only "
                                    "those at least that severe (info, low, medium, high, critical).",
               (_p("limit", "int", 50), _p("severity", "str", "")), "list[dict]", shape=SecurityFinding,
               pack="security"),
    Capability("security.report", "A MAD's own security report, stored as a finding of kind 'report' under "
                                  "its name and posted by the next scan; returns the finding.",
               (_p("summary", "str"), _p("severity", "str", "info")), "dict", shape=SecurityFinding,
               pack="security"),
)

READ_ONLY: frozenset[str] = frozenset({"security.findings"})
