"""Build the docs site and take screenshots of its pages in headless Chromium.

    python scripts/docs_screenshots.py --out /tmp/shots index concepts
    python scripts/docs_screenshots.py --mermaid-js node_modules/mermaid/dist/mermaid.min.js ...

The published site loads mermaid (the diagrams) from a CDN when a page is opened; on
a machine with no internet, ``--mermaid-js`` gives a local copy (``npm install
mermaid``) so the diagrams render in the screenshots too. Needs Debian's chromium
and chromium-driver (as tests/test_browser.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(site: Path, mermaid_js: Path | None) -> None:
    config = ROOT / "mkdocs.yml"
    if mermaid_js is not None:
        # Material uses a mermaid already on the page instead of fetching its own. Beside
        # mkdocs.yml: the paths in it (hooks, mkdocstrings) are relative to its folder.
        overlay = ROOT / f".mkdocs-screenshots-{os.getpid()}.yml"
        overlay.write_text(
            f"INHERIT: {config.name}\nextra_javascript:\n  - {mermaid_js.resolve().as_uri()}\n"
        )
        config = overlay
    try:
        subprocess.run(
            ["mkdocs", "build", "--quiet", "-f", str(config), "--site-dir", str(site)],
            check=True,
            cwd=ROOT,
        )
    finally:
        if config.name != "mkdocs.yml":
            config.unlink()


def shoot(site: Path, pages: list[str], out: Path, width: int, height: int) -> list[Path]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='zdr-docs-chromium-')}")
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    taken = []
    try:
        for page in pages:
            html = site / ("index.html" if page == "index" else f"{page}/index.html")
            browser.get(html.as_uri())
            time.sleep(2)  # fonts, and mermaid drawing its diagrams
            shot = out / f"{page.replace('/', '-')}.png"
            browser.save_screenshot(str(shot))
            taken.append(shot)
    finally:
        browser.quit()
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pages", nargs="+", help="pages by path without .md: index, concepts")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--mermaid-js", type=Path, help="a local mermaid.min.js")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1100)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zdr-docs-site-") as folder:
        site = Path(folder) / "site"
        build(site, args.mermaid_js)
        for shot in shoot(site, args.pages, args.out, args.width, args.height):
            print(shot)


if __name__ == "__main__":
    main()
