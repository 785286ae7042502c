"""review.json / review.md / review.html: what a person reading a review relies on is there, escaped, and stable."""

import re

import pytest

from generator.review.models import Consensus, Finding, PanelReport, Round, Verdict
from generator.review.report import md_cell, md_code, one_line, review_html, review_json, review_markdown

XSS = '<script>alert(1)</script>'
ATTR = '" onmouseover="alert(2)'

PANEL = {"name": "frontier", "reviewers": {"security": {"kind": "llm"}, "tests": {"kind": "tests"}},
         "consensus": {"rule": "unanimous", "veto_on_critical": True, "quorum": None}}


def verdict(reviewer, decision, *findings, kind="llm", round=1, **extra):
    return Verdict(reviewer=reviewer, kind=kind, round=round, decision=decision, summary=f"{reviewer} says {decision}",
                   findings=findings, model="anthropic/claude" if kind == "llm" else None, **extra)


def report(rounds, outcome, reason, **extra):
    fields = dict(ecosystem="madgroup", version="1.3.0", parent="1.2.0", panel="frontier", panel_definition=PANEL,
                  rounds=tuple(rounds), outcome=outcome, reason=reason)
    return PanelReport(**(fields | extra))


def consensus(outcome, reason, approvals, rejections, abstentions=0, vetoed_by=(), rule="unanimous, veto on critical",
              quorum=None):
    n = approvals + rejections + abstentions
    return Consensus(rule=rule, outcome=outcome, reason=reason, approvals=approvals, rejections=rejections,
                     abstentions=abstentions, vetoed_by=vetoed_by, quorum=quorum or n,
                     arithmetic=f"{approvals} approve, {rejections} request changes, {abstentions} abstain of {n}; "
                                f"quorum {approvals + rejections}/{n}")


def approved():
    verdicts = [verdict("security", "approve", prompt_tokens=1000, completion_tokens=200, cost_usd=0.012),
                verdict("correctness", "approve", Finding(severity="info", rule="naming", message="fine")),
                verdict("tests", "approve", kind="tests")]
    reason = "3 of 3 reviewers approve (unanimous, veto on critical)"
    return report([Round(number=1, verdicts=tuple(verdicts), consensus=consensus("approve", reason, 3, 0))], "approve", reason,
                  prompt_tokens=1000, completion_tokens=200, cost_usd=0.012)


def vetoed():
    secret = Finding(file="src/x.py", line=12, severity="critical", rule="secret-in-log",
                     message="the API key is logged", suggestion="log a hash instead")
    findings = [
        secret,
        Finding(file="src/x.py", line=3, severity="minor", rule="style", message="a | b | c\nsecond line"),
        Finding(file="src/a.py", line=40, severity="major", rule="failing-test", message="test_turing fails"),
        Finding(file="src/a.py", line=7, severity="major", rule="race", message=XSS, suggestion="use a lock"),
        Finding(file=f"src/{ATTR}.py", severity="minor", rule="odd", message="weird name"),
        Finding(severity="info", rule="overall", message="@octocat see [link](https://evil.example/x.png)"),
    ]
    verdicts = [verdict("security", "request_changes", *findings[:1], findings[4], findings[5]),
                verdict("correctness", "request_changes", *findings[1:4]),
                verdict("tests", "approve", kind="tests")]
    reason = "veto by security: src/x.py:12 secret-in-log: the API key is logged"
    c = consensus("reject", reason, 1, 2, vetoed_by=("security",))
    return report([Round(number=1, verdicts=tuple(verdicts), consensus=c)], "reject", reason, dissent=("tests",))


def undecided():
    verdicts = [verdict("security", "abstain", error="context window exceeded after 3 chunks"),
                verdict("tests", "approve", kind="tests")]
    reason = "only 1 of 2 reviewers gave a verdict, quorum is 2 (security: context window exceeded after 3 chunks)"
    c = consensus("undecided", reason, 1, 0, abstentions=1)
    return report([Round(number=1, verdicts=tuple(verdicts), consensus=c)], "undecided", reason)


def revised():
    r1 = [verdict("security", "approve"),
          verdict("correctness", "request_changes", Finding(file="src/b.py", line=2, severity="major", rule="bug", message="off by one")),
          verdict("principles", "approve")]
    r2 = [verdict("security", "approve", round=2),
          verdict("correctness", "approve", round=2, revised=True),
          verdict("principles", "request_changes", Finding(severity="minor", rule="docs", message="no README section"),
                  round=2, revised=True)]
    reason = "2 of 3 reviewers approve (2 of 3, veto on critical)"
    rounds = [Round(number=1, verdicts=tuple(r1), consensus=consensus("reject", "changes requested by correctness", 2, 1)),
              Round(number=2, phase="revision", verdicts=tuple(r2),
                    consensus=consensus("approve", reason, 2, 1, rule="2 of 3, veto on critical"))]
    return report(rounds, "approve", reason, dissent=("principles",), repairs=1)


def table_rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("|")]


def cells(row):
    """GFM's own split: unescaped pipes only."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


# --- outcome and reason -------------------------------------------------------------------


def test_one_line_is_the_outcome_and_its_reason():
    assert one_line(approved()) == "approve: 3 of 3 reviewers approve (unanimous, veto on critical)"
    assert one_line(vetoed()) == "reject: veto by security: src/x.py:12 secret-in-log: the API key is logged"
    multi = report(undecided().rounds, "undecided", "first\nsecond  third")
    assert one_line(multi) == "undecided: first second third"


def test_every_outcome_is_stated_plainly_with_its_reason_in_both_formats():
    for built, word in ((approved(), "APPROVED"), (vetoed(), "REJECTED"), (undecided(), "UNDECIDED")):
        md, html = review_markdown(built), review_html(built)
        assert md.startswith("## ") and word in md.splitlines()[0]
        assert f'<div class="word">{word}</div>' in html
        assert f"exit code {built.exit_code}" in html
        for text in (md, html):
            assert "madgroup" in text and "1.3.0" in text and "1.2.0" in text and "frontier" in text
    assert "> **reject:** veto by security: src/x.py:12 secret-in-log: the API key is logged\n" in review_markdown(vetoed())
    assert "veto by security: src/x.py:12 secret-in-log: the API key is logged" in review_html(vetoed())


def test_a_first_build_has_no_parent_and_says_so():
    first = report(approved().rounds, "approve", "ok", parent=None)
    assert "none (first build)" in review_markdown(first)
    assert "none (first build)" in review_html(first)


# --- consensus arithmetic -----------------------------------------------------------------


def test_the_final_rounds_arithmetic_is_shown():
    md, html = review_markdown(vetoed()), review_html(vetoed())
    row = next(r for r in table_rows(md) if "veto on critical" in r)
    assert [c.strip() for c in cells(row)] == ["unanimous, veto on critical", "1", "2", "0", "security",
                                               "3 of 3 voted, 3 needed (met)"]
    assert "1 approve, 2 request changes, 0 abstain of 3; quorum 3/3" in md
    assert "1 approve, 2 request changes, 0 abstain of 3; quorum 3/3" in html
    assert "<td>security</td>" in html


def test_quorum_from_the_consensus_and_not_met():
    built = undecided()
    assert "1 of 2 voted, 2 needed (not met)" in review_markdown(built)
    assert "1 of 2 voted, 2 needed (not met)" in review_html(built)


# --- per-reviewer tables, abstentions, revisions, dissent ------------------------------------


def test_an_abstention_shows_why():
    md, html = review_markdown(undecided()), review_html(undecided())
    row = next(r for r in table_rows(md) if r.startswith("| security"))
    assert "abstain" in row and "context window exceeded after 3 chunks" in row
    assert "context window exceeded after 3 chunks" in html


def test_each_reviewer_row_has_kind_model_decision_counts_tokens_cost():
    md = review_markdown(approved())
    row = [c.strip() for c in cells(next(r for r in table_rows(md) if r.startswith("| security")))]
    assert row == ["security", "llm", "`anthropic/claude`", "✅ approve", "—", "none", "1,200", "$0.0120", "—"]
    row = [c.strip() for c in cells(next(r for r in table_rows(review_markdown(vetoed())) if r.startswith("| security")))]
    assert row[5] == "1 critical, 1 minor, 1 info"
    assert "1,200" in review_html(approved()) and "$0.0120" in review_html(approved())


def test_every_round_has_its_table_and_a_revision_shows_what_changed():
    md, html = review_markdown(revised()), review_html(revised())
    assert "<summary>Round 1 (review 1, independent): reject</summary>" in md
    assert "#### Round 2 (final; review 1, revision): approve" in md
    assert md.index("Round 1") < md.index("Round 2 (final")
    rows = [r for r in table_rows(md) if r.startswith("| correctness")]
    assert len(rows) == 2, "one row per round"
    assert "| — |" in rows[0], "round 1 has nothing to revise"
    assert "yes: request changes → approve" in rows[1]
    assert "yes: approve → request changes" in next(r for r in table_rows(md) if r.startswith("| principles") and "yes" in r)
    assert "| no |" in next(r for r in table_rows(md) if r.startswith("| security") and "| no |" in r)
    assert html.count("<details") == 2 and "<details open>" in html
    assert "yes: request changes → approve" in html
    assert "**Repairs made from review:** 1" in md and "<th>Repairs made from review</th><td>1</td>" in html


def test_dissent_is_listed_never_dropped():
    md, html = review_markdown(revised()), review_html(revised())
    dissent = md.split("### Dissent", 1)[1].split("###", 1)[0]
    assert "**principles** — ❌ request changes (1 minor): principles says request\\_changes" in dissent
    assert "<strong>principles</strong> — request changes (1 minor)" in html
    assert "No reviewer dissents from the outcome." in review_markdown(approved())


# --- findings ---------------------------------------------------------------------------------


def test_findings_are_grouped_by_file_and_sorted():
    md = review_markdown(vetoed())
    headings = [line for line in md.splitlines() if line.startswith("#### ") and "Round" not in line]
    assert headings == ["#### Artifact-wide (1 info)",
                        "#### `src/\" onmouseover=\"alert(2).py` (1 minor)",
                        "#### `src/a.py` (2 major)",
                        "#### `src/x.py` (1 critical, 1 minor)"]
    section = md.split("#### `src/x.py`", 1)[1].split("###", 1)[0]
    lines = [cells(r)[0].strip() for r in table_rows(section)[2:]]
    assert lines == ["3", "12"], "by line within a file"
    a = [cells(r) for r in table_rows(md.split("#### `src/a.py`", 1)[1].split("####", 1)[0])[2:]]
    assert [c[0].strip() for c in a] == ["7", "40"]
    assert "Final round: 1 critical, 2 major, 2 minor, 1 info." in md
    secret = next(r for r in table_rows(md) if "secret" in r)
    assert [c.strip() for c in cells(secret)] == ["12", "🔴 critical", "`secret-in-log`", "security",
                                                  "the API key is logged", "log a hash instead"]
    html = review_html(vetoed())
    order = [html.index(x) for x in ("Artifact-wide", "<code>src/a.py</code>", "<code>src/x.py</code>")]
    assert order == sorted(order)
    assert "log a hash instead" in html and "<code>secret-in-log</code>" in html


def test_no_findings_says_so():
    clean = report([Round(number=1, verdicts=(verdict("tests", "approve", kind="tests"),),
                          consensus=consensus("approve", "ok", 1, 0))], "approve", "ok")
    assert "No findings in the final round." in review_markdown(clean)
    assert "No findings in the final round." in review_html(clean)


# --- escaping ---------------------------------------------------------------------------------


def test_html_renders_untrusted_reviewer_text_inert():
    evil = Verdict(reviewer=f"rev{XSS}", kind="llm", round=1, decision="abstain", summary=XSS, error=ATTR, model=XSS)
    base = vetoed()
    rnd = Round(number=1, verdicts=base.final.verdicts + (evil,), consensus=base.final.consensus)
    html = review_html(report([rnd], "reject", f"because {XSS}", ecosystem=f"eco{ATTR}", dissent=(f"rev{XSS}",)))
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onmouseover="' not in html and "onmouseover=&#34;" in html
    assert "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">" in html
    assert not re.search(r"(src|href)\s*=", html, re.I), "no external resource, no link"
    assert "@import" not in html and "url(" not in html


def test_markdown_table_is_not_broken_by_pipes_or_newlines():
    md = review_markdown(vetoed())
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert len(tables) == 2 + 4 + 1, "header, consensus, one per file, one round"
    for table in tables:
        assert all(row.startswith("|") and row.endswith("|") for row in table)
        assert {len(cells(row)) for row in table} == {len(cells(table[0]))}, table
    style = next(r for r in table_rows(md) if "style" in r)
    assert "a \\| b \\| c second line" in style


def test_markdown_neutralises_html_links_and_mentions():
    md = review_markdown(vetoed())
    assert "<script" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "[link](" not in md and "\\[link\\](https:\u200b//evil.example/x.png)" in md
    assert "@octocat" not in md and "@\u200boctocat" in md
    assert "://" not in md, "no bare URL GitHub would turn into a link"
    html_tags = set(re.findall(r"</?([a-zA-Z]+)", md))
    assert html_tags <= {"details", "summary"}, "the template's own tags only"


@pytest.mark.parametrize(("text", "inert"), [
    ("see https://evil.example/x now", "https:\u200b//evil.example/x"),
    ("HTTP://EVIL.EXAMPLE", "HTTP:\u200b//EVIL.EXAMPLE"),
    ("go to www.evil.example", "www\u200b.evil.example"),
    ("mail mailto:x@evil.example", "mailto\u200b:x@\u200bevil.example"),
    ("write to x@evil.example", "x@\u200bevil.example"),
    ("<https://evil.example>", "&lt;https:\u200b//evil.example&gt;"),
    ("ftp://files.example/a", "ftp:\u200b//files.example/a"),
])
def test_markdown_neutralises_bare_urls_and_autolinks(text, inert):
    assert inert in md_cell(text)
    assert re.search(r"(?i)(https?|ftp)://|www\.|mailto:", md_cell(text)) is None


def test_markdown_keeps_code_spans_and_escapes_the_rest():
    assert md_cell("use `os.environ` not *env*") == "use `os.environ` not \\*env\\*"
    assert md_cell("`a|b` or c|d") == "`a\\|b` or c\\|d"
    assert md_cell("") == "—"
    assert md_code("x`y") == "``x`y``"
    assert md_code("`edge`") == "`` `edge` ``"
    assert md_code("a\nb") == "`a b`"


# --- json ---------------------------------------------------------------------------------------


def test_review_json_round_trips_and_is_deterministic():
    for built in (approved(), vetoed(), undecided(), revised()):
        text = review_json(built)
        assert text == review_json(built)
        assert PanelReport.model_validate_json(text) == built
        assert review_json(PanelReport.model_validate_json(text)) == text
        assert text.endswith("\n")


def test_markdown_and_html_are_deterministic():
    for built in (approved(), vetoed(), undecided(), revised()):
        assert review_markdown(built) == review_markdown(PanelReport.model_validate_json(review_json(built)))
        assert review_html(built) == review_html(built)


def test_the_requirement_matrix_shows_each_requirement_its_tests_and_their_outcome():
    from generator.review.models import RequirementCoverage, TestProof

    matrix = (
        RequirementCoverage(id="R1", text="**Conversations.** Any MAD can post <b>messages</b>.", line=6, covered=True,
                            tests=tuple(TestProof(id=f"tests.test_x::test_refused[{i}]", outcome="passed") for i in range(3))
                            + (TestProof(id="tests.test_rogers::test_post", outcome="passed"),)),
        RequirementCoverage(id="R2", text="Budgets with `python -m madgroup budget " + "x" * 200 + "`", line=9,
                            covered=False, tests=(TestProof(id="tests.test_fiedler::test_budget", outcome="failed"),)),
        RequirementCoverage(id="observability", text="Metrics.", line=12, covered=False),
    )
    r = approved().model_copy(update={"requirements": matrix})
    md, html = review_markdown(r), review_html(r)
    assert "### Requirements (1 of 3 covered)" in md and "<h2>Requirements (1 of 3 covered)</h2>" in html
    row = next(line for line in md.splitlines() if line.startswith("| `R1`"))
    assert "Conversations. Any MAD can post &lt;b&gt;messages&lt;/b&gt;." in row and "| 6 | ✅ yes |" in row
    assert "✅ `tests.test_x::test_refused` (3 cases)<br>✅ `tests.test_rogers::test_post`" in row
    r2 = next(line for line in md.splitlines() if line.startswith("| `R2`"))
    assert "| ❌ no | ❌ `tests.test_fiedler::test_budget` |" in r2 and r2.count("`") % 2 == 0 and "..." in r2
    assert "| `observability` Metrics. | 12 | ❌ no | none |" in md
    assert "<b>" not in html and "&lt;b&gt;messages&lt;/b&gt;" in html
