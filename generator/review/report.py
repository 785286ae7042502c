"""review.json, review.md and review.html: what a person (or a PR comment) reads about a review.

All three are built from the PanelReport alone and are deterministic: the same report gives the
same bytes. Reviewer text is untrusted (an LLM wrote it): the HTML page autoescapes everything
and allows no script or external resource; the markdown neutralises HTML, table pipes, line
breaks, links and @mentions, keeping paths and `code` as code spans.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

import jinja2

from ..hashing import canonical_json
from ..render import environment
from .models import SEVERITIES, Finding, PanelReport, RequirementCoverage, Round, Verdict

__all__ = ["one_line", "review_html", "review_json", "review_markdown"]


OUTCOME_WORDS = {"approve": "APPROVED", "reject": "REJECTED", "undecided": "UNDECIDED"}
OUTCOME_ICONS = {"approve": "✅", "reject": "❌", "undecided": "⚠️"}
DECISION_WORDS = {"approve": "approve", "request_changes": "request changes", "abstain": "abstain"}
DECISION_ICONS = {"approve": "✅", "request_changes": "❌", "abstain": "⚪"}
OUTCOME_TEST_ICONS = {"passed": "✅", "failed": "❌", "error": "❌", "skipped": "⚪"}  # review.md: GitHub has emoji
OUTCOME_TEST_GLYPHS = {"passed": "✓", "failed": "✗", "error": "✗", "skipped": "–"}  # review.html: any system font
TEST_MARKS = {"passed": "ok", "failed": "bad", "error": "bad", "skipped": "skip"}
SEVERITY_ICONS = {"critical": "🔴", "major": "🟠", "minor": "🟡", "info": "🔵"}
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def review_json(report: PanelReport) -> str:
    """review.json: the whole report, keys sorted, so the same review gives the same bytes."""
    return canonical_json(report.model_dump(mode="json"))


def review_markdown(report: PanelReport) -> str:
    """review.md: reads on GitHub, posted as the PR comment by CI."""
    return _environment(html=False).get_template("review.md.j2").render(r=_view(report))


def review_html(report: PanelReport) -> str:
    """review.html: one self-contained page, everything escaped, no script, no external resource."""
    return _environment(html=True).get_template("review.html.j2").render(r=_view(report))


def one_line(report: PanelReport) -> str:
    """'reject: veto by security: src/x.py:12 secret-in-log: ...' — the outcome and its reason on one line."""
    return f"{report.outcome}: {_one_line_text(report.reason)}"


# --- the view both templates render -------------------------------------------------------


def _view(report: PanelReport) -> dict:
    final = report.final
    consensus = final.consensus
    reviewers_n = len(final.verdicts)
    findings = sorted(((v, f) for v in final.verdicts for f in v.findings), key=_finding_key)
    return {
        "ecosystem": report.ecosystem,
        "version": report.version,
        "parent": report.parent,
        "panel": report.panel,
        "outcome": report.outcome,
        "outcome_word": OUTCOME_WORDS[report.outcome],
        "outcome_icon": OUTCOME_ICONS[report.outcome],
        "exit_code": report.exit_code,
        "reason": report.reason,
        "consensus": {
            "round": final.number,
            "rule": consensus.rule,
            "outcome": consensus.outcome,
            "reason": consensus.reason,
            "arithmetic": consensus.arithmetic,
            "approvals": consensus.approvals,
            "rejections": consensus.rejections,
            "abstentions": consensus.abstentions,
            "vetoed_by": list(consensus.vetoed_by),
            "quorum": consensus.quorum,
            "voting": consensus.approvals + consensus.rejections,
            "reviewers": reviewers_n,
            "quorum_met": consensus.quorum_met,
        },
        "rounds": [_round_view(r, report.rounds[i - 1] if i else None, i == len(report.rounds) - 1) for i, r in enumerate(report.rounds)],
        "dissent": _dissent(report),
        "findings_total": len(findings),
        "severity_counts": _severity_counts(f for _, f in findings),
        "files": _by_file(findings),
        "repairs": report.repairs,
        "changes": report.changes,
        "carried": list(report.carried),
        "prompt_tokens": _int(report.prompt_tokens),
        "completion_tokens": _int(report.completion_tokens),
        "total_tokens": _int(report.prompt_tokens + report.completion_tokens),
        "cost": _usd(report.cost_usd, report.price_known),
        "scope": report.bound.scope.reason if report.bound else None,
        "bound": _bound_view(report),
        "requirements": [_requirement_view(c) for c in report.requirements],
        "requirements_covered": sum(1 for c in report.requirements if c.covered),
        "uncertain": report.uncertainties,
    }


def _bound_view(report: PanelReport) -> dict | None:
    b = report.bound
    if b is None:
        return None
    return {"artifact": b.artifact, "reviewed_hash": b.reviewed_hash, "panel_hash": b.panel_hash,
            "artifact_root_hash": b.artifact_root_hash or "", "baseline": b.scope.baseline or "", "mode": b.scope.mode}


def _requirement_view(c: RequirementCoverage) -> dict:
    title = _one_line_text(re.sub(r"(\*\*|__)(.+?)\1", r"\2", c.text))  # the matrix shows prose, not emphasis
    cases: dict[str, list[str]] = {}  # a parametrised test is one row: its cases counted, its worst outcome shown
    for t in c.tests:
        cases.setdefault(t.id.split("[", 1)[0], []).append(t.outcome)
    tests = []
    for test_id, outcomes in cases.items():
        worst = next((o for o in ("failed", "error", "skipped") if o in outcomes), "passed")
        tests.append({"id": test_id, "outcome": worst, "icon": OUTCOME_TEST_ICONS[worst],
                      "glyph": OUTCOME_TEST_GLYPHS[worst], "mark": TEST_MARKS[worst],
                      "cases": f" ({len(outcomes)} cases)" if len(outcomes) > 1 else ""})
    return {
        "id": c.id,
        "line": c.line,
        "title": _shortened(title, 140),
        "covered": c.covered,
        "icon": "✅" if c.covered else "❌",
        "tests": tests,
    }


def _shortened(text: str, limit: int) -> str:
    """At most `limit` characters; a code span the cut would open is left out whole."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    if cut.count("`") % 2:
        cut = cut[:cut.rindex("`")]
    return cut.rstrip() + "..."


def _round_view(rnd: Round, previous: Round | None, final: bool) -> dict:
    before = {v.reviewer: v.decision for v in previous.verdicts} if previous else {}
    weighted = any(v.weight != 1.0 for v in rnd.verdicts)
    return {
        "number": rnd.number,
        "final": final,
        "outcome": rnd.consensus.outcome,
        "reason": rnd.consensus.reason,
        "arithmetic": rnd.consensus.arithmetic,
        "weighted": weighted,
        "review": rnd.review,
        "phase": rnd.phase,
        "verdicts": [_verdict_view(v, before.get(v.reviewer), rnd.phase == "revision") for v in rnd.verdicts],
    }


def _verdict_view(v: Verdict, before: str | None, revision: bool) -> dict:
    if not revision:
        revised = "—"
    elif v.revised:
        revised = f"yes: {DECISION_WORDS[before]} → {DECISION_WORDS[v.decision]}" if before else "yes"
    else:
        revised = "no"
    error = ""
    if v.decision == "abstain":
        error = v.error or "abstained; no reason recorded"
    elif v.error:
        error = v.error
    return {
        "reviewer": v.reviewer,
        "kind": v.kind,
        "model": v.model or "—",
        "decision": v.decision,
        "decision_word": DECISION_WORDS[v.decision],
        "decision_icon": DECISION_ICONS[v.decision],
        "revised": revised,
        "findings": _severity_text(v.findings),
        "weight": f"{v.weight:g}",
        "tokens": _int(v.prompt_tokens + v.completion_tokens),
        "chunks": v.chunks,
        "cost": _usd(v.cost_usd, v.price_known),
        "error": error,
        "correction": v.correction or "",
        "cached": v.cached,
        "summary": v.summary,
    }


def _dissent(report: PanelReport) -> list[dict]:
    """The reviewers whose final vote went against the outcome (`PanelReport.dissent`)."""
    final = {v.reviewer: v for v in report.final.verdicts}
    rows = []
    for name in report.dissent:
        v = final.get(name)
        rows.append({
            "reviewer": name,
            "decision_word": DECISION_WORDS[v.decision] if v else "—",
            "decision_icon": DECISION_ICONS[v.decision] if v else "",
            "findings": _severity_text(v.findings) if v else "—",
            "summary": (v.summary if v else "") or "—",
        })
    return rows


def _finding_key(pair: tuple[Verdict, Finding]) -> tuple:
    v, f = pair
    return (f.file is not None, f.file or "", f.line or 0, SEVERITY_RANK[f.severity], f.rule, v.reviewer, f.message, f.suggestion)


def _by_file(findings: list[tuple[Verdict, Finding]]) -> list[dict]:
    """Findings grouped by file: artifact-wide ones first, then files by path; within a file by line, then severity."""
    groups: dict[str | None, list[dict]] = {}
    for v, f in findings:
        groups.setdefault(f.file, []).append({
            "line": str(f.line) if f.line else "—",
            "severity": f.severity,
            "severity_icon": SEVERITY_ICONS[f.severity],
            "rule": f.rule,
            "reviewer": v.reviewer,
            "message": f.message,
            "suggestion": f.suggestion,
        })
    return [{"path": path, "findings": items, "counts": _severity_text(items)} for path, items in groups.items()]


def _severity_counts(findings) -> list[dict]:
    counts = Counter(f.severity for f in findings)
    return [{"severity": s, "count": counts[s]} for s in SEVERITIES]


def _severity_text(findings) -> str:
    counts = Counter(f["severity"] if isinstance(f, dict) else f.severity for f in findings)
    return ", ".join(f"{counts[s]} {s}" for s in SEVERITIES if counts[s]) or "none"


def _int(n: int) -> str:
    return f"{n:,}"


def _usd(x: float, known: bool = True) -> str:
    """Dollars; where a price is unknown the sum is a floor and says so, never a plain $0."""
    return f"${x:.4f}" if known else ("unknown" if x == 0 else f"${x:.4f} + unknown")


def _one_line_text(text: str) -> str:
    return " ".join(str(text).split())


# --- markdown escaping ------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_MD_PUNCT = re.compile(r"([\\`*_\[\]|~])")
_MENTION = re.compile(r"@(?=[A-Za-z0-9])")
# What GitHub turns into a link with no markup at all: scheme://..., www...., mailto:/xmpp: addresses.
_BARE_LINK = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*:)(?=//)|\b(www)(?=\.)|\b(mailto|xmpp)(?=:)")


def _md_plain(text: str) -> str:
    """One line of text that renders as itself: no HTML, emphasis, links (bare ones too), images, table breaks or @mentions."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_PUNCT.sub(r"\\\1", text)
    # A zero-width space: shown as written, but no longer a mention (notifies nobody) or a bare link.
    text = _BARE_LINK.sub(lambda m: next(g for g in m.groups() if g) + "\u200b", text)
    return _MENTION.sub("@\u200b", text)


def md_code(text: object, table: bool = True) -> str:
    """A code span holding `text` literally: one line, fenced past any backticks it holds."""
    text = _one_line_text(str(text))
    if table:
        text = text.replace("|", "\\|")  # GFM splits table cells before it parses code spans
    if not text:
        return ""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: object, table: bool = True) -> str:
    """Untrusted prose for markdown: its own `code spans` kept, everything else rendered inert."""
    text = _one_line_text("" if text is None else str(text))
    out, pos = [], 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_md_plain(text[pos:match.start()]))
        out.append(md_code(match.group(2).strip() or match.group(2), table))
        pos = match.end()
    out.append(_md_plain(text[pos:]))
    return "".join(out)


def md_cell(text: object) -> str:
    """A table cell: never empty (an em dash), never breaks the row."""
    return md_text(text, table=True) or "—"


@cache
def _environment(html: bool) -> jinja2.Environment:
    # The HTML page escapes every value; markdown escapes through its filters.
    env = environment("review/templates", html=html)
    env.filters["md"] = lambda v: md_text(v, table=False)
    env.filters["cell"] = md_cell
    env.filters["code"] = lambda v: md_code(v, table=False)
    env.filters["codecell"] = md_code
    return env
