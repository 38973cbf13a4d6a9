"""Render reports/comparison.html in headless Chromium and check that every image loads.

    python bench/check_report_html.py reports/comparison.html [--screenshot shot.png] [--height 6000]
    python bench/check_report_html.py dvc_plots/index.html --vega      # `dvc plots show`: charts drawn offline

With --vega the page is DVC's plots page: each vega-embed chart must have drawn (an svg with a size),
with the network blocked and Chromium's network log showing no request that leaves the machine.

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
# Every host name resolves to nothing, so a request that tries to leave fails (and is still in the net log).
OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]
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


def network_requests(net_log: Path) -> list[str]:
    """The URLs the page asked for that are not files or inline data, from Chromium's net log. The browser's
    own background calls (update checks, network time) carry no origin and are not the page's."""
    try:
        log = json.loads(net_log.read_text(errors="replace"))
    except (OSError, ValueError):
        raise RuntimeError(f"Chromium wrote no readable net log at {net_log}") from None
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    asked = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    urls = {p["url"] for p in asked if "url" in p and p.get("initiator") != "not an origin"}
    return sorted(u for u in urls if not u.startswith(("file:", "data:", "blob:", "about:", "chrome:")))


def check_vega(html_path: Path, chromium: str, timeout: float = 120) -> dict:
    """{'charts': N, 'drawn': M, 'requests': [URLs that tried to leave]} for a `dvc plots show` page.

    A chart is drawn when the page's DOM, once Chromium's virtual time has run out, holds its vega view: an
    <svg class="marks"> of non-zero width (DVC embeds with the svg renderer). Polling from inside the page does
    not work: headless virtual time races ahead of vega's asynchronous drawing."""
    html = html_path.read_text()
    with tempfile.TemporaryDirectory(prefix="vega-check-") as tmp:
        net_log = Path(tmp) / "net.json"
        result = _run(chromium, [*OFFLINE_FLAGS, f"--log-net-log={net_log}", "--dump-dom", html_path.resolve().as_uri()],
                      str(Path(tmp) / "profile"), timeout)
        requests = network_requests(net_log)
    widths = re.findall(r'<svg\b[^>]*\bclass="marks"[^>]*\bwidth="([0-9.]+)"', result.stdout)
    return {"charts": html.count("vegaEmbed("), "drawn": sum(float(w) > 0 for w in widths), "requests": requests}


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
    parser.add_argument("--vega", action="store_true", help="a `dvc plots show` page: check its charts instead")
    args = parser.parse_args(argv)
    chromium = args.chromium or find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    if args.vega:
        return check_vega_main(args, chromium)
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


def check_vega_main(args, chromium: str) -> int:
    seen = check_vega(args.html, chromium)
    print(f"{args.html}: {seen['drawn']} of {seen['charts']} charts drawn, {len(seen['requests'])} requests off "
          "the machine")
    if args.screenshot:
        print(f"screenshot → {screenshot(args.html, chromium, args.screenshot, args.width, args.height)}")
    problems = [f"request off the machine: {url}" for url in seen["requests"]]
    if seen["charts"] == 0 or seen["drawn"] < seen["charts"]:
        problems.append("not every chart was drawn")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
