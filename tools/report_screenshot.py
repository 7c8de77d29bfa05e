"""A run report in a real browser: headless Chromium loads the HTML file and saves a screenshot.

  python tools/report_screenshot.py runs/opd/report.html docs/images/report.png

Chromium runs offline (no background networking, no component updates, no sync) with a fresh
profile in a temporary directory, so the screenshot shows only what the file itself holds: a
report that needed a server or the network would show up broken here. Exit status: Chromium's,
or 2 when it wrote no screenshot. `tests/report/test_report.py` runs it where Chromium is
installed (`/usr/bin/chromium`, Debian's package).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHROMIUM = "/usr/bin/chromium"


def screenshot(
  html_path: str,
  png_path: str,
  *,
  chromium: str = CHROMIUM,
  width: int = 1200,
  height: int = 1600,
  timeout: float = 120,
) -> subprocess.CompletedProcess:
  """Loads `html_path` (file://) in headless `chromium` and writes a `width`×`height` PNG to
  `png_path`; returns the finished process (its output is Chromium's log)."""
  url = "file://" + os.path.abspath(html_path)
  with tempfile.TemporaryDirectory(prefix="jdistill-chromium-") as profile:
    command = [
      chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
      f"--user-data-dir={profile}", f"--window-size={width},{height}",
      f"--screenshot={os.path.abspath(png_path)}", url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("report", help="the report's HTML file")
  parser.add_argument("png", help="where the screenshot goes")
  parser.add_argument("--chromium", default=CHROMIUM)
  parser.add_argument("--width", type=int, default=1200)
  parser.add_argument("--height", type=int, default=1600)
  args = parser.parse_args(argv)
  if os.path.exists(args.png):
    os.remove(args.png)
  done = screenshot(
    args.report, args.png, chromium=args.chromium, width=args.width, height=args.height
  )
  if not os.path.exists(args.png):
    print(done.stdout + done.stderr, file=sys.stderr)
    return done.returncode or 2
  print(args.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
