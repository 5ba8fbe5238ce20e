"""A screenshot of ``report.html`` as headless Chromium draws it (the one in docs/img/).

Opens the report through playwright with Debian's ``/usr/bin/chromium`` (playwright never downloads a
browser here), waits for every plotly chart, fails on any console error or network request, and
saves the first ``--height`` pixels (the summary and the first model's Pareto plot) as PNG.

Run::

    make report                                       # writes report/report.html
    .venv/bin/python benchmarks/report_screenshot.py [--html report/report.html] [--out docs/img/report.png]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", default=str(ROOT / "report" / "report.html"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "report.png"))
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--height", type=int, default=1500)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).is_file()),
                    shutil.which("chromium"))
    if chromium is None:
        raise SystemExit("error: Chromium is missing; apt-get install chromium (make sysdeps does)")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: errors.append(f"network {r.url}") if not r.url.startswith("file:") else None)
        page.goto(Path(args.html).resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length > 0")
        page.wait_for_timeout(500)
        page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": args.width, "height": args.height})
        browser.close()
    if errors:
        raise SystemExit(f"error: report.html logged {len(errors)} errors, first: {errors[0]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
