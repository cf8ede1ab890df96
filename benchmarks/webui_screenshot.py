"""The README's picture of the web UI: `imagine serve` on a free port, Debian's headless Chromium through
Playwright, the README's first prompt at seed 0 and then a prompt the model has no words for (its warning
shows), the whole page saved.

    python benchmarks/webui_screenshot.py            # writes docs/webui.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "webui.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        server = subprocess.Popen([sys.executable, "-m", "imagine", "serve", "--port", str(port), "--out", out],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.2)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.fill("#seed", "0")
                for n, prompt in enumerate(["a red circle above a blue square", "draw a cat"], start=1):
                    page.fill("#prompt", prompt)
                    page.click("#generate-button")
                    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length >= {n}",
                                           timeout=120_000)
                time.sleep(0.5)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
