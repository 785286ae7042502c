"""Screenshot an artifact's report.html in headless Chromium (Debian's, driven by Playwright): docs/report.png.

    python benchmarks/report_screenshot.py ecosystems/madgroup/<version> [--out docs/report.png] [--width 1280]

The page is rendered again from the artifact (`regen report`'s way: nothing is written into it); the
screenshot is of the whole page at the given width. Not a benchmark: it sits here with the other scripts
that print and write results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def screenshot(page_file: Path, out: Path, width: int, full_page: bool = True) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
            page.goto(page_file.resolve().as_uri())
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=full_page)
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/report.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--viewport-only", action="store_true", help="the first screen only, not the whole page")
    args = parser.parse_args()
    from generator.build.report import archived_report

    _, html = archived_report(args.artifact)
    with tempfile.TemporaryDirectory(prefix="regen-report-") as scratch:
        page_file = Path(scratch) / "report.html"
        page_file.write_text(html, encoding="utf-8")
        screenshot(page_file, args.out, args.width, full_page=not args.viewport_only)
    print(f"{args.out}: {args.artifact}'s report at {args.width} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
