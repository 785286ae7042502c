"""report.html: in every artifact, under its signature, rendered again to the same bytes by `regen verify`
and `regen report`, self-contained, and readable in a real browser at 1280 and 390 px."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from repo_specs import CORE_MADS, REPO, builtin_only_spec

from generator.artifact.manifest import Manifest, UnitRecord
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.build.report import REPORT, archived_report, render, report_data, report_problem
from generator.build.verify import verify
from generator.cli import main
from generator.config import RunOptions
from generator.progress import Reporter
from generator.senior.models import Exchange, ModelReply, ModelRequest
from generator.senior.transcript import TranscriptLine, read_transcript, write_transcript

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _build(out: Path, spec: Path, **more):
    options = RunOptions(spec_dir=spec, pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out, **more)
    return regenerate(BuildContext(options=options, report=Reporter(quiet=True)))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """1.0.0 of four MADs offline, then 1.0.1 after an edit of grace's spec alone."""
    root = tmp_path_factory.mktemp("report")
    spec = builtin_only_spec(root / "spec", CORE_MADS)
    out = root / "ecosystems"
    first = _build(out, spec)
    grace = spec / "mads" / "grace.yaml"
    grace.write_text(grace.read_text().replace("Health of the ecosystem", "Health of all"))
    second = _build(out, spec)
    assert (first.version, second.version) == ("1.0.0", "1.0.1")
    return root, first, second


# --- in the artifact, under the signature, the same bytes again ----------------------------------


@pytest.mark.slow
def test_report_html_is_in_the_artifact_and_its_manifest(builds):
    _, first, second = builds
    for result in (first, second):
        page = (result.path / REPORT).read_text(encoding="utf-8")
        assert REPORT in result.manifest.outputs and page.startswith("<!DOCTYPE html>")
        assert f"{result.manifest.ecosystem} {result.version}" in page


@pytest.mark.slow
def test_verify_renders_the_report_again_and_finds_the_same_bytes(builds):
    _, first, second = builds
    for result in (first, second):
        checked = verify(result.path, report=Reporter(quiet=True))
        assert checked.ok, (checked.problems, checked.differences)
        assert checked.report == "report.html rendered again: the same bytes"


@pytest.mark.slow
def test_regen_report_on_the_archive_is_the_archived_bytes_and_writes_nothing_into_it(builds, capsys, tmp_path):
    _, first, second = builds
    for result in (first, second):
        before = _files(result.path)
        assert main(["report", str(result.path)]) == 0
        assert "the same bytes" in capsys.readouterr().out
        assert _files(result.path) == before
        _, page = archived_report(result.path)
        assert page.encode("utf-8") == before[REPORT]
    out = tmp_path / "copy.html"
    assert main(["report", str(second.path), "--out", str(out)]) == 0
    assert out.read_bytes() == (second.path / REPORT).read_bytes()


@pytest.mark.slow
def test_a_tampered_report_fails_verify_naming_it(builds, tmp_path):
    _, first, _ = builds
    copy = tmp_path / "madgroup" / "1.0.0"
    shutil.copytree(first.path, copy)
    page = copy / REPORT
    page.write_text(page.read_text(encoding="utf-8").replace("<h2 id=\"units\">Units</h2>", "<h2>Units!</h2>"),
                    encoding="utf-8")
    checked = verify(copy, report=Reporter(quiet=True))
    assert not checked.ok
    assert any(p.startswith(REPORT) for p in checked.problems), checked.problems
    # The re-render alone says so too (the file hashes aside).
    problem, _ = report_problem(copy, Manifest.read(copy))
    assert problem == f"{REPORT}: differs from the report rendered again from the artifact"
    assert main(["report", str(copy)]) == 1


@pytest.mark.slow
def test_a_replayed_rebuild_writes_the_same_report(builds, tmp_path):
    _, first, _ = builds
    # The replay rebuilds 1.0.0 from its own spec copy and transcript into an empty archive: a first build, every
    # unit synthesised, as recorded. (A replay reuses nothing, so a version that reused units from its parent
    # replays into one whose units are all "regenerated": its report says so, and differs there.)
    replayed = _build(tmp_path / "out", first.path / "spec", replay=first.path)
    assert replayed.version == "1.0.0" and replayed.manifest.replayed_from == "madgroup@1.0.0"
    assert replayed.manifest.lock == first.manifest.lock
    assert (replayed.path / REPORT).read_bytes() == (first.path / REPORT).read_bytes()


@pytest.mark.slow
def test_the_graph_marks_the_edited_mad_regenerated_and_the_others_reused(builds):
    _, first, second = builds
    data, _ = archived_report(second.path)
    assert {m.name: m.status for m in data.mads} == {"grace": "regenerated", "rogers": "reused", "fiedler": "reused",
                                                     "turing": "reused"}
    grace = next(m for m in data.mads if m.name == "grace")
    assert "spec/mads/grace.yaml" in grace.why
    assert next(u for u in data.units if u.unit == "mad:rogers").why == "reused from 1.0.0"
    assert data.changes is not None and data.changes.spec == {"mads/grace.yaml": "modified"}
    first_data, first_page = archived_report(first.path)
    assert {m.status for m in first_data.mads} == {"regenerated"} and first_data.changes is None
    assert "The first version: nothing to compare with." in first_page
    page = (second.path / REPORT).read_text(encoding="utf-8")
    assert re.search(r'<g class="mad s-regenerated" data-mad="grace">', page)
    assert len(re.findall(r'<g class="mad s-reused"', page)) == 3
    # talks_to arrows from the plan's graph: grace -> fiedler, rogers, turing; fiedler -> rogers, turing; rogers -> turing
    assert len(re.findall(r'class="edge talks-to"', page)) == 6
    assert len(re.findall(r'class="edge conversation"', page)) == sum(
        1 for m in data.mads if "general" in m.conversations)


@pytest.mark.slow
def test_the_page_is_self_contained(builds):
    _, _, second = builds
    page = (second.path / REPORT).read_text(encoding="utf-8")
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; '
            "img-src data:") in page
    assert "<script" not in page.lower()
    assert not re.search(r"https?://", page), "no address to fetch or follow"
    assert not re.search(r"\b(src|href|action|srcset|xlink:href)\s*=", page, re.I)
    assert "@import" not in page and not re.search(r"url\((?!#)", page)
    for section in ("graph", "units", "tests", "review", "changes"):
        assert f'<h2 id="{section}">' in page


@pytest.mark.slow
def test_hostile_strings_are_escaped(builds):
    _, _, second = builds
    manifest = Manifest.read(second.path)
    data = report_data(second.path, manifest, second.path.parent / "1.0.0")
    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    review = json.loads(json.dumps(data.review))
    review["requirements"][0]["text"] = hostile
    mads = tuple(m.model_copy(update={"role": hostile, "why": hostile}) for m in data.mads)
    page = render(data.model_copy(update={"review": review, "mads": mads, "review_reason": hostile}))
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# --- bad input -------------------------------------------------------------------------------------


def test_regen_report_on_a_missing_path_or_a_folder_that_is_no_artifact_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["report", str(tmp_path / "plain")]) == 2
    assert "not an artifact: it has no manifest.json" in capsys.readouterr().err
    assert list((tmp_path / "plain").iterdir()) == []


@pytest.mark.slow
def test_regen_report_never_writes_into_an_artifact(builds, capsys):
    _, first, _ = builds
    before = _files(first.path)
    assert main(["report", str(first.path), "--out", str(first.path / "src" / "report.html")]) == 2
    assert "archived versions are never written to" in capsys.readouterr().err
    assert _files(first.path) == before


def test_an_old_version_without_a_report_verifies_and_gets_one_outside_the_archive(tmp_path, capsys, monkeypatch):
    artifact = REPO / "ecosystems" / "madgroup" / "1.3.21"
    manifest = Manifest.read(artifact)
    assert REPORT not in manifest.outputs
    assert report_problem(artifact, manifest) == (None, "no report.html (archived before reports)")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(artifact)]) == 0
    assert "archived without a report.html" in capsys.readouterr().out
    page = (tmp_path / ".regen" / "report" / "madgroup" / "1.3.21" / REPORT).read_text(encoding="utf-8")
    assert page.count('<g class="mad s-reused"') == 14  # every unit of 1.3.21 reused from 1.3.20
    assert not (artifact / REPORT).exists()


# --- the time of an answer ---------------------------------------------------------------------------


def _exchange(elapsed: float | None, unit: str = "mad:grace") -> Exchange:
    request = ModelRequest(unit=unit, model="openai/x", messages=({"role": "user", "content": "hi"},), temperature=0.0,
                           seed=0, max_tokens=10)
    reply = ModelReply(content="{}", model="openai/x", prompt_tokens=3, completion_tokens=2, elapsed_s=elapsed)
    return Exchange(request=request, reply=reply, round=1, purpose="synthesise")


def test_an_answers_time_is_kept_in_the_transcript_and_absent_when_unknown(tmp_path):
    path = tmp_path / "transcript.jsonl"
    write_transcript(path, [_exchange(1.23), _exchange(None)])
    timed, untimed = [json.loads(line) for line in path.read_text().splitlines()]
    assert timed["elapsed_s"] == 1.23 and "elapsed_s" not in untimed
    lines = read_transcript(path)
    assert [line.reply().elapsed_s for line in lines] == [1.23, None]  # a replay takes the recorded time
    again = tmp_path / "again.jsonl"
    write_transcript(again, [line.exchange("1.0.0").model_copy(update={"reused_from": None}) for line in lines])
    assert again.read_bytes() == path.read_bytes()
    assert TranscriptLine.of(_exchange(None)).elapsed_s is None


def test_unit_records_carry_the_time_only_when_a_model_recorded_one():
    from generator.build.archive import unit_records
    from generator.senior.synthesise import Synthesis, UnitResult

    def result(unit: str) -> UnitResult:
        return UnitResult(unit=unit, request_hash="h", files=(), rounds=1, prompt_tokens=0, completion_tokens=0,
                          cost_usd=0.0, latency_ms=0, cached=False)

    synthesis = Synthesis.model_construct(units=(result("mad:grace"), result("frame")),
                                          exchanges=(_exchange(1.5), _exchange(0.25), _exchange(None, "frame")))
    grace, frame = unit_records(synthesis)
    assert grace.elapsed_s == 1.75 and frame.elapsed_s is None
    assert "elapsed_s" in grace.model_dump(exclude_unset=True) and "elapsed_s" not in frame.model_dump(exclude_unset=True)
    assert UnitRecord.model_validate(grace.model_dump()).elapsed_s == 1.75


def test_every_archived_manifest_still_reads_and_writes_to_its_own_bytes():
    for path in sorted((REPO / "ecosystems").glob("*/*/manifest.json")):
        assert Manifest.read(path.parent).bytes() == path.read_bytes(), path


# --- in a real browser -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_the_report_reads_in_headless_chromium_at_1280_and_390(builds, tmp_path):
    from playwright.sync_api import sync_playwright

    _, _, second = builds
    page_file = second.path / REPORT
    mads = len(archived_report(second.path)[0].mads)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            for width in (1280, 390):
                page = browser.new_page(viewport={"width": width, "height": 900})
                blocked: list[str] = []
                page.on("request", lambda r: blocked.append(r.url) if not r.url.startswith("file:") else None)
                page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
                page.goto(page_file.as_uri())
                assert page.locator("svg[role=img]").is_visible()
                assert page.locator("svg g.mad").count() == mads
                assert page.locator("table.units tr").count() == len(second.manifest.units) + 1
                assert page.locator("table.units").is_visible()
                overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
                assert overflow <= 0, f"the page is {overflow} px wider than the window at {width} px"
                page.screenshot(path=str(tmp_path / f"report-{width}.png"), full_page=True)
                assert blocked == []
                page.close()
        finally:
            browser.close()
    assert (tmp_path / "report-1280.png").stat().st_size > 10_000 and (tmp_path / "report-390.png").stat().st_size > 10_000
