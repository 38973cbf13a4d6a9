"""Render reports/comparison.html in headless Chromium and check that every image loads.

    python bench/check_report_html.py reports/comparison.html [--screenshot shot.png] [--height 6000]

The report itself holds no script. A copy of it gets a small inline script that, once the page has
loaded, marks each <img> ok (decoded, naturalWidth > 0) or broken and writes a summary element;
Chromium's --dump-dom prints the resulting DOM, which this script reads. It also checks that the page
references nothing outside itself. Exit status 0 when all is well, 1 otherwise (the problems printed).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Quiet, offline, no profile: nothing may reach the network, and a root user needs --no-sandbox.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--virtual-time-budget=10000"]
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images), broken = [];
  images.forEach(function (img, i) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-check", ok ? "ok" : "broken");
    if (!ok) broken.push(img.closest("figure") ? img.closest("figure").id : "img#" + i);
  });
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({images: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//|file:)""", re.IGNORECASE)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def external_references(html: str) -> list[str]:
    """src/href attributes that leave the file (http, https, protocol-relative, file)."""
    return [html[m.start():m.start() + 80] for m in EXTERNAL.finditer(html)]


def _run(chromium: str, args: list[str], profile: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


def check_images(html_path: Path, chromium: str, timeout: float = 120) -> dict:
    """{'images': N, 'broken': [figure ids]} as the browser saw them."""
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
        result = _run(chromium, ["--dump-dom", probe.as_uri()], str(Path(tmp) / "profile"), timeout)
    match = re.search(r'<pre id="image-check">(.*?)</pre>', result.stdout, re.DOTALL)
    if not match:
        raise RuntimeError(f"Chromium printed no image check (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(match.group(1).replace("&quot;", '"'))


def screenshot(html_path: Path, chromium: str, out: Path, width: int = 1280, height: int = 6000,
               timeout: float = 120) -> Path:
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        _run(chromium, [f"--screenshot={out.resolve()}", f"--window-size={width},{height}", html_path.resolve().as_uri()],
             str(Path(tmp) / "profile"), timeout)
    if not out.is_file():
        raise RuntimeError("Chromium wrote no screenshot")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report, e.g. reports/comparison.html")
    parser.add_argument("--screenshot", type=Path, help="also save a screenshot of the page here")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--chromium", help="browser binary (default: the first of chromium, chromium-browser, ...)")
    args = parser.parse_args(argv)
    chromium = args.chromium or find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    problems = [f"external reference: {ref}" for ref in external_references(args.html.read_text())]
    seen = check_images(args.html, chromium)
    problems += [f"image did not load: {where}" for where in seen["broken"]]
    if seen["images"] == 0:
        problems.append("the page has no images")
    print(f"{args.html}: {seen['images']} images, {len(seen['broken'])} broken")
    if args.screenshot:
        print(f"screenshot → {screenshot(args.html, chromium, args.screenshot, args.width, args.height)}")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
